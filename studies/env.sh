# Sourced by every study script: the checkout's .venv first on PATH, and sslprune found there (or
# already installed in the user's environment) before anything runs.
export PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin:$PATH"
if ! command -v sslprune > /dev/null || ! python -c "import sslprune" 2> /dev/null; then
  echo "$(basename "$0"): sslprune is not installed; run 'make install' at the checkout's root (or 'pip install -e .' in your own environment)" >&2
  exit 2
fi
