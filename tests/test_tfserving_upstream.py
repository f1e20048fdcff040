"""TensorFlow Serving's own model-server test suite, run against our server: one pytest result per upstream test.

The upstream files are used unchanged from ``../shared/tfserving-upstream`` (see tests/tfserving_upstream.py for how
the suite is given what Bazel would give it). Tests that cannot apply here are skipped by name with the reason; the
whole module is skipped when the upstream folder is absent (it is not part of a user's checkout)."""
from __future__ import annotations

import pytest

from tests.tfserving_upstream import NOT_APPLICABLE, run_suite, suite_path, suite_test_names
from training_job.paths import tfserving_upstream_dir

UPSTREAM = tfserving_upstream_dir()
NAMES = suite_test_names() if suite_path().is_file() else []
pytestmark = pytest.mark.skipif(
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


@pytest.mark.parametrize("name", NAMES or ["upstream_suite_absent"])
def test_upstream(name, suite_outcomes):
    if name in NOT_APPLICABLE:
        pytest.skip(f"{name}: {NOT_APPLICABLE[name]}")
    outcome = suite_outcomes[name]
    if outcome.status == "skipped":
        pytest.skip(f"upstream test skipped itself: {outcome.message}")
    if outcome.status != "passed":
        pytest.fail(f"upstream {name} {outcome.status} (suite log: {outcome.log}):\n{outcome.message}", pytrace=False)
