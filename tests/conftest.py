"""Shared fixtures. ``published_model`` is a real MobileNet model trained quickly on a subset of the shared photos
and published into a temporary registry; the model server, gateway and web tests serve it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import MUSHROOMS

SMALL_PER_CLASS = 60


@dataclass(frozen=True)
class PublishedModel:
    registry_path: Path
    model_name: str
    version: int
    version_dir: Path
    run_dir: Path  # the training run it was exported from (manifest, head, open-set, metrics)


@pytest.fixture(scope="session")
def base_network():
    """The frozen ImageNet MobileNet base (features + ImageNet head), built once per session."""
    from training_job.bottlenecks import BaseNetwork

    return BaseNetwork("mobilenet_1.0_224")


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A prepared manifest of SMALL_PER_CLASS shared photos per class (hash-chosen, so stable between runs)."""
    from training_job.prepare import prepare_dataset

    if not MUSHROOMS.is_dir():
        pytest.fail(f"the shared photos are missing: {MUSHROOMS}")
    out = tmp_path_factory.mktemp("small-dataset")
    rows = prepare_dataset(MUSHROOMS, out, per_class=SMALL_PER_CLASS, validation_pct=20, test_pct=25, demo_pct=5,
                           progress=False)
    return out / "manifest.csv", rows


@pytest.fixture(scope="session")
def trained_run(small_dataset, base_network, tmp_path_factory):
    """A short training run (bottlenecks from the user's cache, so warm after the first session)."""
    from training_job.pipeline import train_run
    from training_job.train import TrainConfig

    _, rows = small_dataset
    work = tmp_path_factory.mktemp("training")
    config = TrainConfig(architecture=base_network.architecture, epochs=80, patience=15, fine_tune_whole=False)
    run_dir, metrics = train_run(rows, config, work / "runs" / "small",
                                 base=base_network, tensorboard_root=work / "tensorboard", progress=False)
    return run_dir, metrics


@pytest.fixture(scope="session")
def published_model(trained_run, base_network, tmp_path_factory) -> PublishedModel:
    """A real model published into a temporary registry."""
    from training_job.pipeline import publish_run

    run_dir, _ = trained_run
    registry = tmp_path_factory.mktemp("registry")
    version, version_dir, _ = publish_run(run_dir, registry, "mushrooms", base=base_network, tflite=False,
                                          progress=False)
    return PublishedModel(registry, "mushrooms", version, version_dir, run_dir)
