"""Shared pieces of the benchmarks: where results go, a model to measure, photos, latency statistics."""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from training_job import registry as registry_layout
from training_job.open_set import DEFAULT_REJECT_RATE

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# the quantiles the benches calibrate the "not a mushroom" threshold at (bench/accuracy_cv.py and
# bench/open_set_rates.py), the training job's own among them
OPEN_SET_RATES = tuple(sorted({0.005, 0.01, 0.015, 0.02, 0.03, DEFAULT_REJECT_RATE}))
# issue 14's targets for the check: at most this share of mushrooms wrongly rejected, at least this share of
# not-mushroom photos answered "not a mushroom"
MUSHROOMS_REJECTED_AT_MOST, NOT_MUSHROOMS_REJECTED_AT_LEAST = 0.05, 0.90
OPEN_SET_TARGETS = f"<= {MUSHROOMS_REJECTED_AT_MOST:.2f} / >= {NOT_MUSHROOMS_REJECTED_AT_LEAST:.2f}"


def machine_description() -> dict:
    import subprocess

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  cwd=RESULTS_DIR.parent).stdout.strip()
        # "-dirty": the code measured differs from that commit (the results and the report built from them, which a
        # run of several benchmarks rewrites as it goes, do not count)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  f":!{RESULTS_DIR.relative_to(RESULTS_DIR.parents[1])}", ":!bench/REPORT.md",
                                  ":!README.md"],
                                 capture_output=True, text=True, cwd=RESULTS_DIR.parents[1]).stdout.strip()
        if revision and changed:
            revision += "-dirty"
    except OSError:
        revision = ""
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "revision": revision,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_result(name: str, result: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    result = {"machine": machine_description(), **result}
    path.write_text(json.dumps(result, indent=2, sort_keys=True))
    print(f"wrote {path}")
    return path


def percentiles_ms(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "n": int(ms.size)}


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU time a process (or ``"<pid>/task/<tid>"``, one thread) has used so far
    (/proc/<pid>/stat, children excluded)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_memory_mib(pid: int | str) -> float:
    """The most memory a process has held so far (VmHWM of /proc/<pid>/status), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def zeros_gzipped(mebibytes: int) -> bytes:
    """``mebibytes`` MiB of zero bytes gzipped (a compression bomb): about a thousandth of that to send."""
    encoder, zeros = zlib.compressobj(9, wbits=31), bytes(1 << 20)
    return b"".join([encoder.compress(zeros) for _ in range(mebibytes)] + [encoder.flush()])


def jpeg_scan_bomb(side: int, scans: int) -> bytes:
    """A progressive JPEG of ``scans`` scans of a flat grey ``side`` x ``side`` picture: the first AC scan of its
    luma repeated. One end-of-band run covers a whole scan of a flat picture, so each repeat is some thirty bytes,
    yet a decoder passes over every coefficient of the component again for it (libjpeg-turbo's LJT-01-003, "Two
    Issues with the JPEG Standard"): the CPU a photo costs grows with its scans times its pixels."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (side, side), (120, 130, 140)).save(out, "JPEG", progressive=True, quality=90)
    data = out.getvalue()
    sos, at = [], 2  # (start, end) of each scan: its SOS segment and the entropy-coded data after it
    while data[at + 1] != 0xD9:
        end = at + 2 + int.from_bytes(data[at + 2:at + 4], "big")
        if data[at + 1] == 0xDA:
            while data[end] != 0xFF or data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end += 1
            sos.append((at, end))
        at = end
    if scans < len(sos):
        raise ValueError(f"Pillow's progressive JPEG has {len(sos)} scans already")
    start, end = sos[1]
    return data[:end] + data[start:end] * (scans - len(sos)) + data[end:]


def gif_of_blocks(block: bytes, copies: int) -> bytes:
    """A flat 64 x 64 GIF with ``copies`` of ``block`` before its picture: an extension (introducer, label, its
    sub-blocks, the empty one that ends them) or stray bytes, which GIF readers skip. Pillow reads each sub-block and
    each stray byte there in a turn of a Python loop: a one-byte comment, ``b"!\\xfe\\x01x\\x00"``, is five bytes."""
    from PIL import Image

    from training_job.preprocessing import gif_header_bytes

    out = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(out, "GIF")
    data = out.getvalue()
    blocks_from = gif_header_bytes(data)
    return data[:blocks_from] + block * copies + data[blocks_from:]


def gif_of_pictures(pictures: int, side: int) -> bytes:
    """An animated GIF of ``pictures`` flat ``side`` x ``side`` pictures, each of another colour: a few KB each, whose
    decoding costs their pixels."""
    from PIL import Image

    frames = [Image.new("P", (side, side), i % 200) for i in range(pictures)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    return out.getvalue()


def post(url: str, body: bytes, headers: dict) -> int:
    """POSTs ``body``; the HTTP status of the answer."""
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


class ClassifyProbe:
    """Another client of the gateway: classify calls sent back to back from a thread, ``photos`` in turn, while in
    its ``with`` block; ``seconds`` holds how long each took. With ``cached``, the first photo is sent once before,
    so one photo makes every call a cache hit; distinct photos on a flushed cache are misses."""

    def __init__(self, gateway_url: str, photos: list[bytes], cached: bool = True):
        self.url, self.photos = f"{gateway_url}/v1/classify", photos
        self.seconds: list[float] = []
        self._stop = threading.Event()
        if cached:
            post(self.url, photos[0], {"Content-Type": "image/jpeg"})
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            post(self.url, self.photos[len(self.seconds) % len(self.photos)], {"Content-Type": "image/jpeg"})
            self.seconds.append(time.perf_counter() - started)

    def __enter__(self) -> "ClassifyProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def others_wait(gateway_url: str, photos: list[bytes], cached: bool, settle: float, send) -> dict:
    """``send()`` while another client (ClassifyProbe) sends the gateway ``photos`` in turn: the slowest and the
    median of its calls from then to ``settle`` seconds after, beside those of the ``settle`` seconds before."""
    with ClassifyProbe(gateway_url, photos, cached) as probe:
        time.sleep(settle)
        quiet = len(probe.seconds)
        send()
        time.sleep(settle)
    during, before = probe.seconds[quiet:], probe.seconds[:quiet]
    return {"other_client_worst_ms": round(max(during) * 1000, 1),
            "other_client_worst_ms_without_bomb": round(max(before) * 1000, 1),
            "other_client_p50_ms": round(median(during) * 1000, 1),
            "other_client_p50_ms_without_bomb": round(median(before) * 1000, 1),
            "other_client_calls": len(during)}


def time_calls(call, seconds: float) -> list[float]:
    """Calls ``call()`` back to back for ``seconds`` (after one untimed warm-up call); the time of each call."""
    call()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def throughput(times: list[float], batch: int) -> dict:
    """Images per second and latency percentiles of calls that each classified ``batch`` images."""
    return {"batch": batch, "images_per_s": batch * len(times) / sum(times), **percentiles_ms(times)}


def median(values) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


def alternating_rounds(phases: dict, rounds: int, *, abba: bool = False) -> dict[str, list]:
    """Runs each of ``phases`` (name -> call returning a figure) in turn, ``rounds`` times over (a, b, a, b, ...), never
    two at once: on a shared machine every phase then sees the load of the same minutes. ``abba``: the order reversed
    every other round (a b, b a, a b, ...), so that a drift in the machine's speed over the run weighs on the first
    phase as on the last. Each phase's figures in order."""
    out = {name: [] for name in phases}
    for index in range(rounds):
        for name in reversed(phases) if abba and index % 2 else phases:
            out[name].append(phases[name]())
    return out


def batch_of(pixels: np.ndarray, batch: int) -> np.ndarray:
    """``batch`` photos from ``pixels`` (repeated when there are fewer)."""
    return np.resize(pixels, (batch,) + pixels.shape[1:])


def raw_throughput(signature, pixels: np.ndarray, batch: int, seconds: float) -> dict:
    """The published model's serving signature called in-process (no server) at one batch size, for ``seconds``."""
    import tensorflow as tf

    batch_pixels = tf.constant(batch_of(pixels, batch))
    times = time_calls(lambda: signature(images=batch_pixels)["probabilities"].numpy(), seconds)
    return throughput(times, batch)


FASTEST_ENGINE_THREADS = 2  # LiteRT's threads for the reference (bench/tflite_bench.py measures it too)


class SplitRows:
    """A version's ``model.tflite`` run as the model server's row workers run one batch
    (services/model_server/tflite_servable.py): one single-thread interpreter per usable core, side by side, each fed
    its share of the rows one at a time. ``classify(pixels)`` returns the probabilities, in row order."""

    def __init__(self, path: Path):
        from concurrent.futures import ThreadPoolExecutor

        from services.model_server.tflite_servable import usable_cores
        from training_job.tflite_export import tflite_interpreter

        self.interpreters = [tflite_interpreter(path, threads=1) for _ in range(usable_cores())]
        self.threads = ThreadPoolExecutor(max(1, len(self.interpreters) - 1))

    def classify(self, pixels: np.ndarray) -> np.ndarray:
        from training_job.tflite_export import tflite_predict

        parts = min(len(self.interpreters), len(pixels))
        bounds = np.linspace(0, len(pixels), parts + 1).astype(int)

        def part(k: int) -> list[np.ndarray]:
            return [tflite_predict(self.interpreters[k], pixels[row:row + 1])
                    for row in range(bounds[k], bounds[k + 1])]

        others = [self.threads.submit(part, k) for k in range(1, parts)]
        rows = part(0)
        for other in others:
            rows += other.result()
        return np.concatenate(rows)


def fastest_engine(version_dir: Path, pixels: np.ndarray, batch: int):
    """The fastest engine in this process at one batch size: the version's ``model.tflite`` (float) run by LiteRT
    with XNNPACK, the reference of bench/run_all.py's speed targets, the faster of its two ways of running a batch:
    whole, on one interpreter of FASTEST_ENGINE_THREADS threads, or split (``SplitRows``, as the model server runs
    one). The interpreters are made once, here; the returned ``measure(seconds) -> throughput dict`` times each way
    for half the seconds and returns the faster's figures, with ``way`` naming it, ``ways`` both throughputs and
    ``cpu_ms_per_image`` its CPU (this process's), so a bench that alternates it with its own phases compares the two
    on the same minutes' machine."""
    from training_job.tflite_export import tflite_interpreter, tflite_predict

    interpreter = tflite_interpreter(Path(version_dir) / "model.tflite", batch=batch, threads=FASTEST_ENGINE_THREADS)
    split = SplitRows(Path(version_dir) / "model.tflite")
    batch_pixels = batch_of(pixels, batch)
    ways = {"whole": lambda: tflite_predict(interpreter, batch_pixels), "split": lambda: split.classify(batch_pixels)}

    def measure(seconds: float) -> dict:
        figures = {}
        for way, call in ways.items():
            cpu = time.process_time()
            times = time_calls(call, seconds / 2)
            figures[way] = {**throughput(times, batch),
                            "cpu_ms_per_image": (time.process_time() - cpu) * 1e3 / (batch * (len(times) + 1))}
        way = max(figures, key=lambda name: figures[name]["images_per_s"])
        return {**figures[way], "way": way, "ways": {name: f["images_per_s"] for name, f in figures.items()}}

    return measure


def load_serving_signature(version_dir: Path):
    import tensorflow as tf

    return tf.saved_model.load(str(version_dir)).signatures["serving_default"]


def stack_bench_parser(description: str, settle: float = 2.0) -> argparse.ArgumentParser:
    """The arguments of a bench that runs a stack on the newest published version and measures what one costly
    request does to it: --registry, --model-name, --settle (``published_version_of`` reads the first two)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--registry", type=Path, default=None, help="default: the project's registry")
    p.add_argument("--model-name", default="mushrooms")
    p.add_argument("--settle", type=float, default=settle, help="seconds measured after each answer")
    return p


def published_version_of(args: argparse.Namespace) -> Path:
    """The newest published version of ``args.model_name`` in ``args.registry`` (the project's by default); exits
    saying so when there is none."""
    from training_job.paths import default_registry

    return published_version_or_exit(args.registry or default_registry(), args.model_name)


def published_version_or_exit(registry: Path, model_name: str) -> Path:
    version_dir = latest_published_version(registry, model_name)
    if version_dir is None:
        print(f"no published model under {registry}/{model_name}: run `make run` first", file=sys.stderr)
        raise SystemExit(2)
    return version_dir


def latest_published_version(registry: Path, model_name: str = "mushrooms") -> Path | None:
    return registry_layout.latest_version_dir(registry / model_name)


def sample_photos(n: int, folder: Path | None = None) -> list[Path]:
    """``n`` photos spread over ``folder``/<class>/* (default ../shared/data/mushrooms)."""
    from training_job.paths import shared_data_dir

    folder = folder or shared_data_dir() / "mushrooms"
    photos = sorted(folder.glob("*/*"))
    if not photos:
        raise SystemExit(f"the benchmarks need photos in {folder}")
    step = max(1, len(photos) // n)
    return photos[::step][:n]
