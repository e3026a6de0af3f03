# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: here it is a local CPU wheel; a looser pin would pull GBs of CUDA packages.
TORCH ?= torch==2.13.0

$(BIN)/sslprune: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

.PHONY: install demo test bench clean
install: $(BIN)/sslprune

demo: install
	$(BIN)/sslprune demo --out demo_out

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf $(VENV) demo_out
