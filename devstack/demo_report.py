"""Classifying the model's demo split through the gateway (HTTP and gRPC) and printing a label_image-style report."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc

from devstack.grpc_client import ClassifierClient
from training_job.dataset import demo_rows, read_manifest
from training_job.registry import version_dirs


@dataclass
class DemoPhoto:
    path: Path
    label: str
    split: str = "demo"  # the manifest's split it was taken from


@dataclass
class Answer:
    photo: DemoPhoto
    predictions: list[dict]  # [{label, score, ...}] best first
    seconds: float

    @property
    def top(self) -> str:
        return self.predictions[0]["label"] if self.predictions else ""


def latest_version_dir(registry: Path, model_name: str) -> Path | None:
    """The newest version of ``model_name`` that holds a SavedModel (None when there is none)."""
    try:
        found = version_dirs(registry / model_name)
    except FileNotFoundError:
        return None
    complete = [v for v, path in found.items() if (path / "saved_model.pb").exists()]
    return found[max(complete)] if complete else None


def demo_photos(version_dir: Path) -> list[DemoPhoto]:
    """The photos the demo classifies (``demo_rows`` of the version's manifest, those still on disk)."""
    rows = [r for r in read_manifest(version_dir / "assets.extra" / "manifest.csv") if Path(r.path).is_file()]
    return [DemoPhoto(Path(r.path), r.label, r.split) for r in demo_rows(rows)]


def classify_http(gateway_url: str, photo: DemoPhoto, top_k: int = 3) -> Answer:
    request = urllib.request.Request(f"{gateway_url}/v1/classify?top_k={top_k}", data=photo.path.read_bytes(),
                                     headers={"Content-Type": "application/octet-stream"}, method="POST")
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    return Answer(photo, body["predictions"], time.perf_counter() - started)


def classify_grpc(client: ClassifierClient, photo: DemoPhoto, top_k: int = 3) -> Answer:
    started = time.perf_counter()
    body = client.classify(photo.path.read_bytes(), top_k)
    return Answer(photo, body.get("predictions", []), time.perf_counter() - started)


def label_image_lines(answer: Answer) -> list[str]:
    """The tutorial's label_image output: one ``label (score=0.xxxxx)`` line per class, then the evaluation time."""
    lines = [f"{answer.photo.path.name} (true: {answer.photo.label})"]
    lines += [f"  {p['label']} (score={float(p.get('score', 0.0)):.5f})" for p in answer.predictions]
    lines.append(f"  Evaluation time (1-image): {answer.seconds:.3f}s")
    return lines


def accuracy(answers: list[Answer]) -> float:
    return sum(a.top == a.photo.label for a in answers) / len(answers) if answers else 0.0


def run_demo(gateway_url: str, gateway_grpc: str, photos: list[DemoPhoto]) -> tuple[list[Answer], list[Answer], str]:
    """Every demo photo over HTTP and over gRPC; the third value explains a gRPC failure ('' when fine)."""
    http_answers = [classify_http(gateway_url, p) for p in photos]
    try:
        with ClassifierClient(gateway_grpc) as client:
            grpc_answers = [classify_grpc(client, p) for p in photos]
    except grpc.RpcError as exc:
        return http_answers, [], f"gRPC classification failed at {gateway_grpc}: {exc.code().name} ({exc.details()})"
    return http_answers, grpc_answers, ""


def format_report(http_answers: list[Answer], grpc_answers: list[Answer], grpc_problem: str, urls: dict[str, str],
                  run_dir: Path, examples: int = 3) -> str:
    if not http_answers:
        lines = ["Demo split: no photo to classify (the version's manifest has no demo or test photo)"]
    else:
        shown = "Demo split" if http_answers[0].photo.split == "demo" else "Test split (no demo photos)"
        count = f"{len(http_answers)} photo{'' if len(http_answers) == 1 else 's'}"
        lines = [f"{shown}: {count} the model never trained on", f"  accuracy over HTTP: {accuracy(http_answers):.1%}"]
    if grpc_answers:
        agree = sum(h.top == g.top for h, g in zip(http_answers, grpc_answers))
        lines.append(f"  accuracy over gRPC: {accuracy(grpc_answers):.1%} (same top label as HTTP for {agree}/"
                     f"{len(grpc_answers)})")
    elif grpc_problem:
        lines.append(f"  {grpc_problem}")
    if http_answers:
        lines.append("")
        lines.append("A few predictions (label_image format):")
        for answer in http_answers[:examples]:
            lines += label_image_lines(answer)
        wrong = [a for a in http_answers if a.top != a.photo.label]
        lines.append("")
        lines.append(f"Misclassified: {len(wrong)}")
        for answer in wrong:
            score = float(answer.predictions[0].get("score", 0.0)) if answer.predictions else 0.0
            lines.append(f"  {answer.photo.path}: true {answer.photo.label}, got {answer.top} (score={score:.5f})")
    lines.append("")
    lines += [f"{name:>18}: {url}" for name, url in urls.items()]
    lines.append(f"{'run folder (logs)':>18}: {run_dir}")
    lines.append("Stop everything with `make stop` (scripts/stack.py down).")
    return "\n".join(lines)
