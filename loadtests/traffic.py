"""What the load test sends (``MIX``): many distinct shared photos (new to the cache), a few phone-size photos (new to
the cache too; loadtests/phone_photos.py), a small hot set repeated (cache hits after the first), a few bad inputs;
what each request's row is called (``request_label``) and the mix in words (``describe_mix``); and how the operator
user moves the A/B weights (``shifted_routing``) and tells tables apart (``settable``)."""
from __future__ import annotations

import json
import os
import random
import statistics
from pathlib import Path

from PIL import Image

from training_job.paths import shared_data_dir, var_dir

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
HOT_SET_SIZE = 20
# Each request's kind and its share of the requests; a run without phone-size photos sends "distinct" in their stead.
MIX = {"bad": 0.05, "hot": 0.35, "phone": 0.05, "distinct": 0.55}
DEFAULT_REQUEST_TIMEOUT_S = 5.0  # a request unanswered this long is a failure (run.py --request-timeout)
# (name, body): each must be answered with a 4xx over HTTP / INVALID_ARGUMENT over gRPC, never a 5xx.
BAD_INPUTS = [("empty", b""), ("text", b"this is not a photo"), ("truncated-jpeg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")]


def photo_paths() -> list[Path]:
    folder = Path(os.environ.get("LOADTEST_PHOTOS") or shared_data_dir() / "mushrooms")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    if not paths:
        raise SystemExit(f"no photos under {folder}: set LOADTEST_PHOTOS to a folder of photos")
    return paths


def phone_photo_paths() -> list[Path]:
    """The phone-size photos to send: $LOADTEST_PHONE_PHOTOS, paths joined by os.pathsep (run.py sets it to those of
    loadtests/phone_photos.py); none without it."""
    value = os.environ.get("LOADTEST_PHONE_PHOTOS", "")
    return [Path(path) for path in value.split(os.pathsep) if path]


class PhotoFiles:
    """The bytes of photo files, each read once; one per process, shared by its users (a phone-size photo is MBs)."""

    def __init__(self):
        self._bytes: dict[Path, bytes] = {}

    def __getitem__(self, path: Path) -> bytes:
        if path not in self._bytes:
            self._bytes[path] = path.read_bytes()
        return self._bytes[path]


class Traffic:
    """Per user, the requests of ``MIX``. A distinct photo, and a phone-size one (``phones``), is sent with bytes of
    its own after the image's end (``distinct``), so the gateway's cache, keyed by the bytes' sha256, has never seen
    it, in this run or an earlier one; the hot set is sent as it is, so it is answered from the cache once each photo
    has been answered once. ``next`` tells which kind a request is; the locustfile names it by kind and by the
    answer's ``cached`` (``request_label``)."""

    def __init__(self, paths: list[Path], phones: list[Path] = (), seed: int | None = None,
                 files: PhotoFiles | None = None):
        self.rng = random.Random(seed)
        self.paths = paths
        self.phones = list(phones)
        self.hot = paths[:: max(1, len(paths) // HOT_SET_SIZE)][:HOT_SET_SIZE]
        self.files = files or PhotoFiles()
        self._tag = os.urandom(8).hex()  # not from the seed: a seeded run must not repeat an earlier run's bytes
        self._sent = 0

    def distinct(self, path: Path) -> bytes:
        """The photo at ``path`` followed by bytes no other request carries. Decoders stop at the image's end (JPEG's
        EOI marker, PNG's IEND chunk, WebP's RIFF length), so the pixels are the photo's own
        (tests/test_loadtest.py checks the three formats against ``preprocess_bytes``)."""
        self._sent += 1
        return self.files[path] + f"\n(load test {self._tag} photo {self._sent})".encode()

    def next(self) -> tuple[str, bytes, bool]:
        """(kind: "distinct", "phone", "hot" or "bad:<name>", body, expected to be rejected)."""
        roll = self.rng.random()
        if roll < MIX["bad"]:
            name, body = self.rng.choice(BAD_INPUTS)
            return f"bad:{name}", body, True
        roll -= MIX["bad"]
        if roll < MIX["hot"]:
            return "hot", self.files[self.rng.choice(self.hot)], False
        roll -= MIX["hot"]
        if roll < MIX["phone"] and self.phones:
            return "phone", self.distinct(self.rng.choice(self.phones)), False
        return "distinct", self.distinct(self.rng.choice(self.paths)), False


def describe_mix(paths: list[Path], phones: list[Path]) -> str:
    """The traffic ``Traffic(paths, phones)`` sends, in words, with the photos' median bytes and pixels."""
    def sizes(files: list[Path]) -> str:
        pixels = []
        for path in files:
            with Image.open(path) as image:
                pixels.append(image.width * image.height)
        size = statistics.median(path.stat().st_size for path in files)
        shown = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} KB"
        return f"median {shown}, {statistics.median(pixels) / 1e6:.2f} MP"

    pct = {kind: round(share * 100) for kind, share in MIX.items()}
    parts = [f"{pct['distinct'] + (0 if phones else pct['phone'])} % distinct photos ({len(paths)} photos, "
             f"{sizes(paths)}; new bytes each time)"]
    if phones:
        parts.append(f"{pct['phone']} % phone-size photos ({len(phones)} JPEGs, {sizes(phones)}; new bytes each "
                     "time)")
    parts.append(f"{pct['hot']} % the hot set ({min(HOT_SET_SIZE, len(paths))} photos as they are)")
    parts.append(f"{pct['bad']} % bad inputs ({', '.join(name for name, _ in BAD_INPUTS)})")
    return ", ".join(parts)


def request_label(kind: str, cached: bool | None) -> str:
    """What a request's row is called after its kind and the answer's ``cached`` field: "hot:hit", "distinct:miss";
    the kind alone for a bad input or a request without an answer (``cached`` None)."""
    if cached is None:
        return kind
    return f"{kind}:{'hit' if cached else 'miss'}"


def stack_state() -> dict:
    """The latest local stack's stack.json (ports, URLs), or {} when none."""
    state_file = var_dir() / "run" / "latest" / "stack.json"
    return json.loads(state_file.read_text()) if state_file.exists() else {}


def admin_token() -> str:
    token = os.environ.get("LOADTEST_ADMIN_TOKEN") or os.environ.get("GATEWAY_ADMIN_TOKEN")
    if token:
        return token
    token_file = var_dir() / "run" / "latest" / "admin_token"
    return token_file.read_text().strip() if token_file.exists() else ""


def grpc_target() -> str:
    return os.environ.get("LOADTEST_GRPC_TARGET") or stack_state().get("urls", {}).get("gateway gRPC", "")


def request_timeout_s() -> float:
    """Seconds each request may take before it counts as failed: $LOADTEST_REQUEST_TIMEOUT_S (run.py sets it)."""
    return float(os.environ.get("LOADTEST_REQUEST_TIMEOUT_S") or DEFAULT_REQUEST_TIMEOUT_S)


def routing_entries(routing: dict) -> dict[str, float]:
    """The table's weights by entry name ("3" or a version label such as "canary"), as GET /v1/admin/routing
    answers them."""
    return {str(entry): float(weight) for entry, weight in (routing.get("weights") or {}).items()}


def settable(routing: dict) -> dict:
    """The PUT /v1/admin/routing body that sets the table ``routing`` describes (what GET answered, or a body the
    operator sent), in the form the gateway stores it: entries of weight 0 left out, {"clear": true} for no entry.
    Two tables are the same table when their ``settable`` are equal."""
    weights = {entry: weight for entry, weight in routing_entries(routing).items() if weight > 0}
    return {"weights": weights, "shadow": routing.get("shadow")} if weights else {"clear": True}


def shifted_routing(routing: dict, share: float) -> dict:
    """The table to PUT so that the two entries on the newest versions get ``share`` / ``1 - share`` (the older one
    gets ``share``) and every other entry 0. ``routing`` is what GET /v1/admin/routing answered: entries are version
    numbers or version labels, ordered by the version they resolve to now (``resolved``); labels are sent back as
    labels and the shadow unchanged. With fewer than two entries, the newest AVAILABLE versions fill in; an entry the
    gateway would refuse now (a label the model server no longer knows, a version or label on a version that is not
    AVAILABLE) is set to 0. With nothing to move between, the table is sent back as it is (an empty one as
    {"clear": true})."""
    weights = routing_entries(routing)
    resolved = routing.get("resolved") or {}
    available = set(routing.get("available") or [])

    def version_of(entry: str) -> int | None:
        return int(entry) if entry.isdigit() else resolved.get(entry)

    live = [e for e in weights if version_of(e) is not None and (not available or version_of(e) in available)]
    covered = {version_of(entry) for entry in live}
    newest = [str(v) for v in sorted(available, reverse=True) if v not in covered]
    candidates = live + newest[:max(0, 2 - len(live))]
    pair = sorted(candidates, key=lambda e: (version_of(e), not e.isdigit(), e))[-2:]
    if len(pair) == 2:
        weights = {**{entry: 0.0 for entry in weights}, pair[0]: share, pair[1]: 1 - share}
    if not any(weight > 0 for weight in weights.values()):
        return {"clear": True}  # an empty table stays empty: the gateway refuses empty weights without "clear"
    return {"weights": weights, "shadow": routing.get("shadow")}
