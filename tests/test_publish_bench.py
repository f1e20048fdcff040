"""bench/publish_bench.py: which run it publishes when none is named."""
from bench.publish_bench import newest_run


def test_the_newest_finished_run_is_published_and_an_unfinished_one_is_not(tmp_path):
    assert newest_run(tmp_path) is None
    for name, finished in (("20261130-101010-a", True), ("20261201-090000-b", True), ("20261201-120000-c", False)):
        (tmp_path / name).mkdir()
        if finished:
            (tmp_path / name / "train_summary.json").write_text("{}")
    assert newest_run(tmp_path) == tmp_path / "20261201-090000-b"
