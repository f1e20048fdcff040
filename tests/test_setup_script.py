"""scripts/setup.sh, the first half of `make run` and `make test`, on a project folder of its own."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from training_job.paths import PROJECT_ROOT


def test_setup_makes_again_a_virtualenv_whose_making_was_cut_short(tmp_path):
    """A first `make run` stopped (Ctrl-C) while ``python -m venv`` ran leaves a virtualenv with its python and
    without pip, which venv installs last; every setup after it then failed at once for want of pip. Setup makes
    such a virtualenv again. The project here has nothing to install, so setup stops later, at a module of
    the real project's it lacks: what counts is that pip was there to install."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(PROJECT_ROOT / "scripts" / "setup.sh", tmp_path / "scripts")
    (tmp_path / "requirements.txt").write_text("setuptools>=70.1\n")  # what installs the project (tensorflow's)
    (tmp_path / "requirements-nodeps.txt").write_text("")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "cut-short"\nversion = "0"\n'
                                             '[tool.setuptools]\npy-modules = ["cut_short"]\n')
    (tmp_path / "cut_short.py").write_text("")
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(tmp_path / ".venv")], check=True)
    assert (tmp_path / ".venv" / "bin" / "python").exists()

    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": base_python})
    output = done.stdout + done.stderr
    assert "creating virtualenv" in output, output[-2000:]
    assert os.access(tmp_path / ".venv" / "bin" / "pip", os.X_OK), output[-2000:]
    assert (tmp_path / ".venv" / ".setup-stamp").exists(), output[-2000:]  # its pinned dependencies installed
    assert "No module named 'services'" in output, output[-2000:]
