"""Runs TensorFlow Serving's own model-server test suite (``tensorflow_model_server_test.py``, unchanged upstream files
in ``../shared/tfserving-upstream``) against ``python -m services.model_server``.

The suite finds everything the way Bazel lays it out: the server binary at
``$TEST_SRCDIR/tf_serving/tensorflow_serving/model_servers/tensorflow_model_server`` and its test data under
``$TEST_SRCDIR/tf_serving/tensorflow_serving/servables/tensorflow/testdata``. ``prepare_srcdir`` builds that tree in a
temporary folder: the test data linked in place (read-only) and a small launcher script that starts our server with
the command line the suite gives. ``run_suite`` runs the chosen tests in one subprocess (as ``bazel test`` runs one
file in one process, so servers started by one test are reused by the next, as upstream; the few that need a fresh
process get their own) and returns each test's outcome from absltest's XML report. Run as ``python -m tests.tfserving_upstream`` it is that subprocess.
"""
from __future__ import annotations

import ast
import os
import signal
import stat
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from training_job.paths import PROJECT_ROOT, tfserving_upstream_dir

SUITE_FILE = Path("tensorflow_serving/model_servers/tensorflow_model_server_test.py")
SUITE_MODULE = "tensorflow_serving.model_servers.tensorflow_model_server_test"
SUITE_CLASS = "TensorflowModelServerTest"

# Upstream tests that cannot apply to this server or this snapshot, by name, with the reason.
NOT_APPLICABLE = {
    "test_tf_text": "needs TF Text's model, whose saved_model.pb blob is absent from the upstream snapshot "
                    "(and the tensorflow-text ops, which are not installed)",
}


# Upstream tests that need a process of their own, by name, with the reason (Bazel may shard the file; here one
# process runs the rest, in upstream order).
OWN_PROCESS = {
    "test_distrat_sequential_keras_saved_model_save": "configures two virtual CPUs, which TensorFlow allows only "
                                                      "before its runtime has started in the process",
}


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # "passed", "failed", "skipped" or "missing" (the test did not report: the run died)
    message: str = ""
    log: Path | None = None  # the log of the run it was part of


def suite_path(upstream: Path | None = None) -> Path:
    return (upstream or tfserving_upstream_dir()) / SUITE_FILE


def suite_test_names(upstream: Path | None = None) -> list[str]:
    """The suite's test methods, read from its source (importing it needs TensorFlow and the upstream packages)."""
    tree = ast.parse(suite_path(upstream).read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == SUITE_CLASS:
            return [f.name for f in node.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test")]
    raise ValueError(f"{suite_path(upstream)} has no class {SUITE_CLASS}")


LAUNCHER = """#!/bin/sh
# tensorflow_model_server as TF Serving's test suite starts it: our server, on loopback, same flags.
cd {root}
PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}} exec {python} -m services.model_server --host=127.0.0.1 "$@"
"""


def prepare_srcdir(srcdir: Path, upstream: Path | None = None, python: str = sys.executable) -> Path:
    """Lay out ``srcdir`` as Bazel's runfiles for the suite; returns the launcher's path."""
    upstream = upstream or tfserving_upstream_dir()
    tree = srcdir / "tf_serving" / "tensorflow_serving"
    (tree / "model_servers").mkdir(parents=True, exist_ok=True)
    servables = tree / "servables"
    if not servables.exists():
        servables.symlink_to(upstream / "tensorflow_serving" / "servables", target_is_directory=True)
    launcher = tree / "model_servers" / "tensorflow_model_server"
    launcher.write_text(LAUNCHER.format(root=PROJECT_ROOT, python=python))
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return launcher


def run_suite(names: list[str], workdir: Path, timeout: float = 900.0, upstream: Path | None = None,
              python: str = sys.executable) -> dict[str, Outcome]:
    """Run the named tests: those of OWN_PROCESS each in a subprocess of its own, the others in one."""
    groups = [[n for n in names if n not in OWN_PROCESS]] + [[n] for n in names if n in OWN_PROCESS]
    outcomes: dict[str, Outcome] = {}
    for number, group in enumerate(g for g in groups if g):
        outcomes.update(run_in_one_process(group, workdir / f"run{number}", timeout, upstream, python))
    return outcomes


def run_in_one_process(names: list[str], workdir: Path, timeout: float = 900.0, upstream: Path | None = None,
                       python: str = sys.executable) -> dict[str, Outcome]:
    """Run the named tests in one subprocess; returns their outcomes.

    The subprocess gets its own process group, which is killed afterwards: any server the suite left running (it
    kills them itself at exit) goes with it."""
    upstream = upstream or tfserving_upstream_dir()
    srcdir, tmpdir = workdir / "srcdir", workdir / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)  # makes workdir too
    prepare_srcdir(srcdir, upstream, python)
    report, log_path = workdir / "report.xml", workdir / "suite.log"
    env = {
        **os.environ,
        "TEST_SRCDIR": str(srcdir),
        "TEST_TMPDIR": str(tmpdir),
        "XML_OUTPUT_FILE": str(report),
        "TF_USE_LEGACY_KERAS": "1",  # the suite's Keras tests are written for Keras 2 (tf-keras)
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": str(PROJECT_ROOT),
        "TFSERVING_UPSTREAM": str(upstream),
    }
    with open(log_path, "w") as log:
        process = subprocess.Popen([python, "-m", "tests.tfserving_upstream", *names], cwd=PROJECT_ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.write(f"\n*** the suite did not finish within {timeout:.0f}s: stopped\n")
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
    outcomes = read_report(report, log_path) if report.exists() else {}
    for name in names:
        outcomes.setdefault(name, Outcome(name, "missing", f"no result reported (exit code {process.returncode})",
                                          log_path))
    return outcomes


def read_report(report: Path, log: Path | None = None) -> dict[str, Outcome]:
    """Each test's outcome from absltest's JUnit-style XML report."""
    outcomes = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        name = case.get("name", "")
        problems = case.findall("failure") + case.findall("error")
        if problems:
            text = "\n".join(f"{p.get('message', '')}\n{p.text or ''}" for p in problems)
            outcomes[name] = Outcome(name, "failed", text.strip(), log)
        elif case.find("skipped") is not None or case.get("status") == "notrun":
            skipped = case.find("skipped")
            outcomes[name] = Outcome(name, "skipped", skipped.get("message", "") if skipped is not None else "", log)
        else:
            outcomes[name] = Outcome(name, "passed", "", log)
    return outcomes


def _run_in_this_process(names: list[str]) -> None:
    """The subprocess: import the upstream suite beside the installed ``tensorflow_serving`` package (its ``apis``
    and ``config``), then let absltest run the named tests and write its XML report to ``$XML_OUTPUT_FILE``."""
    import importlib

    import tensorflow_serving
    from absl.testing import absltest

    upstream = Path(os.environ["TFSERVING_UPSTREAM"])
    tensorflow_serving.__path__.append(str(upstream / "tensorflow_serving"))
    module = importlib.import_module(SUITE_MODULE)
    sys.argv = [str(suite_path(upstream)), *(f"{SUITE_CLASS}.{n}" for n in names)]
    absltest.main(module=module)


if __name__ == "__main__":
    _run_in_this_process(sys.argv[1:])
