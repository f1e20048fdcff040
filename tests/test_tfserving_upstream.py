"""TensorFlow Serving's own model-server test suite, run against our server: one pytest result per upstream test.

The upstream files are used unchanged from ``../shared/tfserving-upstream`` (see tests/tfserving_upstream.py for how
the suite is given what Bazel would give it). Tests that cannot apply here are skipped by name with the reason; the
upstream tests are skipped when the upstream folder is absent (it is not part of a user's checkout). The harness
itself is tested on its own at the end."""
from __future__ import annotations

import subprocess

import pytest

from tests.tfserving_upstream import (
    NOT_APPLICABLE, prepare_srcdir, read_report, run_suite, suite_path, suite_test_names,
)

NAMES = suite_test_names() if suite_path().is_file() else []
needs_upstream = pytest.mark.skipif(
    not suite_path().is_file(),
    reason=f"TF Serving's upstream test suite is not here ({suite_path()}): it is only beside the project's own "
           "checkouts (../shared/tfserving-upstream)")


@pytest.fixture(scope="module")
def suite_outcomes(request, tmp_path_factory):
    """Runs, in one subprocess, the upstream tests this pytest session selected (minus those not applicable)."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    names = [n for n in selected if n not in NOT_APPLICABLE]
    if not names:
        return {}
    return run_suite(names, tmp_path_factory.mktemp("tfserving-upstream"))


@needs_upstream
@pytest.mark.parametrize("name", NAMES or ["upstream_suite_absent"])
def test_upstream(name, suite_outcomes):
    if name in NOT_APPLICABLE:
        pytest.skip(f"{name}: {NOT_APPLICABLE[name]}")
    outcome = suite_outcomes[name]
    if outcome.status == "skipped":
        pytest.skip(f"upstream test skipped itself: {outcome.message}")
    if outcome.status != "passed":
        pytest.fail(f"upstream {name} {outcome.status} (suite log: {outcome.log}):\n{outcome.message}", pytrace=False)


REPORT = """<?xml version="1.0"?>
<testsuites><testsuite name="TensorflowModelServerTest">
<testcase name="testA" classname="TensorflowModelServerTest" status="run" result="completed"/>
<testcase name="testB" classname="TensorflowModelServerTest" status="run" result="completed">
<failure message="3.0 != 4.0" type="AssertionError">Traceback ...</failure></testcase>
<testcase name="testC" classname="TensorflowModelServerTest" status="run" result="skipped">
<skipped message="no GPU"/></testcase>
</testsuite></testsuites>"""


def test_the_harness_lays_out_bazels_runfiles_and_reads_absltests_report(tmp_path):
    upstream = tmp_path / "upstream"
    (upstream / "tensorflow_serving" / "servables" / "tensorflow" / "testdata").mkdir(parents=True)
    launcher = prepare_srcdir(tmp_path / "srcdir", upstream)
    assert launcher == tmp_path / "srcdir/tf_serving/tensorflow_serving/model_servers/tensorflow_model_server"
    assert (tmp_path / "srcdir/tf_serving/tensorflow_serving/servables/tensorflow/testdata").is_dir()
    started = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0 and "python -m services.model_server" in started.stdout  # our server starts

    (tmp_path / "report.xml").write_text(REPORT)
    outcomes = read_report(tmp_path / "report.xml", tmp_path / "suite.log")
    assert {name: o.status for name, o in outcomes.items()} == {"testA": "passed", "testB": "failed",
                                                                 "testC": "skipped"}
    assert "3.0 != 4.0" in outcomes["testB"].message and outcomes["testC"].message == "no GPU"
