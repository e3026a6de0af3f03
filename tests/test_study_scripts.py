"""The study scripts (studies/*/*.sh) a user runs from the README: without sslprune installed they
refuse in one line, naming the fix, before anything is written."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

STUDIES = Path(__file__).resolve().parents[1] / "studies"
SCRIPTS = sorted(STUDIES.glob("*/*.sh"))


@pytest.mark.skipif(shutil.which("sslprune", path="/usr/bin:/bin") is not None,
                    reason="sslprune is installed system-wide here")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_study_script_without_sslprune_says_to_install_it(script, tmp_path):
    copy = tmp_path / "checkout" / "studies"          # a checkout with no .venv beside studies/
    shutil.copytree(STUDIES, copy, ignore=shutil.ignore_patterns("runs", "report", "logs"))
    before = sorted(p for p in copy.rglob("*"))
    res = subprocess.run(["bash", str(copy / script.relative_to(STUDIES))], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, cwd=tmp_path, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().count("\n") == 0 and "sslprune is not installed; run 'make install'" in res.stderr
    assert sorted(p for p in copy.rglob("*")) == before


def test_with_sslprune_installed_the_script_goes_on(tmp_path):
    """env.sh lets an installed sslprune through (the checkout's .venv, or the environment running
    these tests): publish.sh gets to its own check (no runs yet)."""
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    res = subprocess.run(["bash", str(STUDIES / "cifar10-cpu" / "publish.sh"), str(tmp_path)],
                         capture_output=True, text=True, env={"PATH": path, "HOME": str(tmp_path)}, timeout=60)
    assert res.returncode == 2 and "cifar10-cpu/runs does not exist; run the studies first" in res.stderr
