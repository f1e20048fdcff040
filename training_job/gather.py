"""`gather`: download photos from URL lists into a folder of class sub-folders that `prepare` reads.

Input: a folder of ``<class>.txt`` files, one URL per line (``#`` starts a comment). Output:
``<out>/<class>/<sha1 of URL>.<ext>``; a URL whose file exists is not fetched again (resume). Only real photos are
kept: not HTML, not a "photo unavailable" placeholder, at least ``min_bytes``, shorter side at least ``min_side``,
decodable by the preprocessing contract. Every failed URL goes to ``<out>/gather_failures.csv`` with the reason.
"""
from __future__ import annotations

import csv
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from training_job.errors import UserError
from training_job.preprocessing import DEFAULT_LIMITS, InvalidImage, decode_image, open_image

FAILURE_LOG = "gather_failures.csv"
DEFAULT_TIMEOUT = 15.0
DEFAULT_RETRIES = 2
DEFAULT_BACKOFF = 1.0
DEFAULT_WORKERS = 8
DEFAULT_MIN_BYTES = 2048
DEFAULT_MIN_SIDE = 64
PLACEHOLDER_URL_MARKERS = ("photo_unavailable", "placeholder", "no_image", "noimage", "image_not_found")
# Share of a thumbnail's pixels in its single most common (coarsely quantised) colour above which the "photo" is
# an almost flat "no longer available" card rather than a picture of anything.
PLACEHOLDER_FLAT_SHARE = 0.85
USER_AGENT = "mushroom-serving-gather/0.1"
_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "TIFF": ".tif", "BMP": ".bmp"}
_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Task:
    label: str
    url: str

    @property
    def stem(self) -> str:
        return hashlib.sha1(self.url.encode()).hexdigest()


@dataclass
class Failure:
    label: str
    url: str
    reason: str
    detail: str
    attempts: int


@dataclass
class GatherResult:
    downloaded: int = 0
    already_present: int = 0
    failures: list[Failure] = field(default_factory=list)

    def summary(self) -> str:
        text = f"downloaded {self.downloaded}, already present {self.already_present}, failed {len(self.failures)}"
        if self.failures:
            text += " (" + ", ".join(f"{n} {r}" for r, n in Counter(f.reason for f in self.failures).most_common()) + ")"
        return text


class Rejected(Exception):
    """The URL answered, but not with a photo we keep; ``retry`` says whether trying again may help."""

    def __init__(self, reason: str, detail: str, retry: bool = False):
        super().__init__(detail)
        self.reason, self.detail, self.retry = reason, detail, retry


def read_url_lists(lists_dir: str | Path) -> list[Task]:
    """One ``Task`` per distinct URL in ``<lists_dir>/<class>.txt``."""
    folder = Path(lists_dir)
    if not folder.is_dir():
        raise UserError(f"the URL-list folder {folder} does not exist; expected one <class>.txt file of URLs per class")
    files = sorted(p for p in folder.glob("*.txt") if not p.name.startswith("."))
    if not files:
        raise UserError(f"no <class>.txt URL lists in {folder}; expected e.g. {folder}/amanita_muscaria.txt")
    tasks: list[Task] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
        seen = set()
        for line in text.splitlines():
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            url = words[0]  # anything after the URL ("url  # note") is a comment
            if url in seen:
                continue
            seen.add(url)
            tasks.append(Task(path.stem, url))
    if not tasks:
        raise UserError(f"the URL lists in {folder} contain no URLs")
    return tasks


def existing_file(out_dir: Path, task: Task) -> Path | None:
    matches = sorted((out_dir / task.label).glob(f"{task.stem}.*"))
    return matches[0] if matches else None


def _fetch(url: str, timeout: float, max_bytes: int) -> tuple[bytes, str, str]:
    """(body, content type, final URL). Raises ``Rejected`` or network errors; ``timeout`` bounds the whole read."""
    if not url.lower().startswith(("http://", "https://")):
        raise Rejected("invalid_url", f"not an http(s) URL: {url!r}")
    deadline = time.monotonic() + timeout
    try:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            chunks, total = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise Rejected("timeout", f"the download took longer than {timeout:g} s", retry=True)
                chunk = response.read(64 * 1024)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise Rejected("too_large", f"larger than {max_bytes} bytes")
                chunks.append(chunk)
            expected = response.headers.get("Content-Length", "")
            if expected.isdigit() and int(expected) != total:
                raise Rejected("network", f"the connection closed after {total} of {expected} bytes", retry=True)
            return b"".join(chunks), response.headers.get("Content-Type", ""), response.geturl()
    except urllib.error.HTTPError as exc:
        raise Rejected(f"http_{exc.code}", f"HTTP {exc.code} {exc.reason}", retry=exc.code in _RETRY_STATUSES) from None
    except (http.client.InvalidURL, ValueError) as exc:
        raise Rejected("invalid_url", f"cannot request {url!r}: {exc}") from None
    except http.client.HTTPException as exc:  # e.g. the connection closed before Content-Length bytes arrived
        raise Rejected("network", f"{type(exc).__name__}: {exc}", retry=True) from None
    except (TimeoutError, OSError) as exc:  # socket timeouts, refused connections, DNS, resets
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError) or isinstance(exc, TimeoutError):
            raise Rejected("timeout", f"no answer within {timeout:g} s", retry=True) from None
        raise Rejected("network", f"{type(reason).__name__}: {reason}", retry=True) from None


def looks_like_placeholder(image) -> bool:
    """Almost a single flat colour (e.g. Flickr's grey "This photo is no longer available" card)."""
    thumb = image.convert("RGB").resize((64, 64))
    quantised = Counter((r >> 5, g >> 5, b >> 5) for r, g, b in thumb.getdata())
    return quantised.most_common(1)[0][1] / (64 * 64) >= PLACEHOLDER_FLAT_SHARE


def check_photo(data: bytes, content_type: str, final_url: str, min_bytes: int, min_side: int) -> str:
    """The file extension for a photo we keep; raises ``Rejected`` for anything else."""
    head = data[:512].lstrip().lower()
    if "html" in content_type.lower() or head.startswith((b"<!doctype html", b"<html")):
        raise Rejected("html", f"an HTML page (Content-Type {content_type or 'unknown'}), not a photo")
    if any(marker in final_url.lower() for marker in PLACEHOLDER_URL_MARKERS):
        raise Rejected("placeholder", f"redirected to a placeholder: {final_url}")
    if len(data) < min_bytes:
        raise Rejected("too_small", f"only {len(data)} bytes; photos must be at least {min_bytes} bytes")
    try:
        image = decode_image(data)
    except InvalidImage as exc:
        raise Rejected(exc.code, exc.message) from None
    header = open_image(data)
    if min(header.size) < min_side:
        raise Rejected("tiny", f"{header.size[0]}x{header.size[1]} px; the shorter side must be >= {min_side} px")
    if looks_like_placeholder(image):
        raise Rejected("placeholder", "an almost single-colour image (a 'photo unavailable' placeholder?)")
    return _EXTENSIONS.get(header.format or "", "." + (header.format or "img").lower())


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{id(data)}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def download_one(task: Task, out_dir: Path, *, timeout: float, retries: int, backoff: float, min_bytes: int,
                 min_side: int) -> Failure | None:
    """Fetch, check and store one photo; returns a ``Failure`` instead of raising."""
    attempt = 0
    while True:
        attempt += 1
        try:
            data, content_type, final_url = _fetch(task.url, timeout, DEFAULT_LIMITS.max_bytes)
            extension = check_photo(data, content_type, final_url, min_bytes, min_side)
        except Rejected as exc:
            if exc.retry and attempt <= retries:
                time.sleep(backoff * 2 ** (attempt - 1))
                continue
            return Failure(task.label, task.url, exc.reason, exc.detail, attempt)
        except Exception as exc:  # one odd URL must not end a long download run; it is logged like any failure
            return Failure(task.label, task.url, "error", f"{type(exc).__name__}: {exc}", attempt)
        folder = out_dir / task.label
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(folder / f"{task.stem}{extension}", data)
        return None


def gather_photos(
    lists_dir: str | Path,
    out_dir: str | Path,
    *,
    workers: int = DEFAULT_WORKERS,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    min_bytes: int = DEFAULT_MIN_BYTES,
    min_side: int = DEFAULT_MIN_SIDE,
    progress: bool = True,
) -> GatherResult:
    """Download every listed URL not already on disk; write ``<out_dir>/gather_failures.csv``."""
    from tqdm import tqdm

    tasks = read_url_lists(lists_dir)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out}: {exc.strerror or exc}") from None
    result = GatherResult()
    todo = []
    for task in tasks:
        if existing_file(out, task) is not None:
            result.already_present += 1
        else:
            todo.append(task)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(download_one, task, out, timeout=timeout, retries=retries, backoff=backoff,
                               min_bytes=min_bytes, min_side=min_side) for task in todo]
        bar = tqdm(as_completed(futures), total=len(futures), desc="downloading", unit="url", disable=not progress)
        for future in bar:
            failure = future.result()
            if failure is None:
                result.downloaded += 1
            else:
                result.failures.append(failure)
            bar.set_postfix(ok=result.downloaded, failed=len(result.failures))
    write_failure_log(result.failures, out / FAILURE_LOG)
    return result


def write_failure_log(failures: list[Failure], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "url", "reason", "detail", "attempts"])
        for fail in sorted(failures, key=lambda x: (x.label, x.url)):
            writer.writerow([fail.label, fail.url, fail.reason, fail.detail, fail.attempts])
    tmp.replace(path)


def read_failure_log(path: str | Path) -> list[Failure]:
    with open(path, newline="") as f:
        return [Failure(r["class"], r["url"], r["reason"], r["detail"], int(r["attempts"])) for r in csv.DictReader(f)]
