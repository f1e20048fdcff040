"""tensorflow_model_server's flags on our server: each real flag is accepted and does what it does in TF Serving
(model_servers/main.cc, server.cc), or is refused by name with the reason in --help."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.model_server_harness import MODEL, start_server, stop_server, version_states, wait_until, write_config
from tests.tiny_model import write_tiny_model
from training_job.paths import PROJECT_ROOT

AVAILABLE = 30


def run_server_until_exit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run([sys.executable, "-m", "services.model_server", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=PROJECT_ROOT)


def test_bad_model_config_is_reported_in_tf_servings_words(tmp_path):
    """TF Serving's testBadModelConfig looks for this text on stderr."""
    config = tmp_path / "bad_model_config.txt"
    config.write_text("improperly formatted file")
    result = run_server_until_exit("--port=0", "--rest_api_port=0", f"--model_config_file={config}")
    assert result.returncode != 0
    assert "Error parsing text-format tensorflow.serving.ModelServerConfig" in result.stderr
