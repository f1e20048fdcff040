"""`gather` against a real local HTTP server serving photos, 404s, HTML, truncated JPEGs, placeholders and stalls."""
from __future__ import annotations

import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import MUSHROOMS
from training_job import cli
from training_job.gather import FAILURE_LOG, gather_photos, read_failure_log, read_url_lists
from training_job.preprocessing import open_image


def _real_jpegs(count: int) -> list[bytes]:
    found = []
    for path in sorted((MUSHROOMS / "amanita_muscaria").iterdir()):
        data = path.read_bytes()
        img = open_image(data)
        if img.format == "JPEG" and len(data) > 20_000 and min(img.size) >= 128:
            found.append(data)
        if len(found) == count:
            return found
    raise AssertionError("not enough real JPEGs in the shared data")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _flat_placeholder() -> bytes:
    """A grey 'photo unavailable' card: flat colour with a small noisy icon, well over 2 KB."""
    pixels = np.full((374, 500, 3), 200, np.uint8)
    pixels[150:200, 200:300] = np.random.default_rng(0).integers(0, 255, (50, 100, 3), dtype=np.uint8)
    return _png(Image.fromarray(pixels))


def _thin_strip() -> bytes:
    """Big enough in bytes (noise), but only 20 px tall."""
    return _png(Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 400, 3), dtype=np.uint8)))


class PhotoSite:
    """What the fake web site serves at each path; counts the requests per path."""

    def __init__(self):
        photos = _real_jpegs(5)
        self.routes: dict[str, tuple[int, str, bytes]] = {
            f"/photos/{i}.jpg": (200, "image/jpeg", data) for i, data in enumerate(photos[:3])
        }
        self.routes.update({
            "/gone.jpg": (404, "text/html", b"<html><body>Not found</body></html>"),
            "/page.jpg": (200, "text/html; charset=utf-8", b"<!DOCTYPE html><html>" + b"x" * 5000 + b"</html>"),
            "/lying-html.jpg": (200, "image/jpeg", b"<html><head></head>" + b"y" * 5000 + b"</html>"),
            "/truncated.jpg": (200, "image/jpeg", photos[3][: len(photos[3]) // 2]),
            "/tiny.png": (200, "image/png", _png(Image.new("RGB", (1, 1), (128, 128, 128)))),
            "/strip.png": (200, "image/png", _thin_strip()),
            "/unavailable.png": (200, "image/png", _flat_placeholder()),
            "/photo_unavailable.gif": (200, "image/png", _thin_strip()),
        })
        self.requests: Counter[str] = Counter()
        self.flaky_failures_left = 1
        self.photo_for_flaky = photos[4]

    def handler(self):
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, content_type, body):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                site.requests[self.path] += 1
                if self.path == "/slow.jpg":
                    time.sleep(2.0)
                    return self._send(200, "image/jpeg", site.routes["/photos/0.jpg"][2])
                if self.path == "/flaky.jpg":
                    if site.flaky_failures_left > 0:
                        site.flaky_failures_left -= 1
                        return self._send(503, "text/plain", b"busy")
                    return self._send(200, "image/jpeg", site.photo_for_flaky)
                if self.path == "/cut.jpg":  # promises more bytes than it sends, then hangs up
                    body = site.routes["/photos/0.jpg"][2]
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[:3000])
                    self.close_connection = True
                    return
                if self.path == "/moved.jpg":
                    self.send_response(302)
                    self.send_header("Location", "/photo_unavailable.gif")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                status, content_type, body = site.routes.get(self.path, (404, "text/plain", b"no such path"))
                self._send(status, content_type, body)

        return Handler


@pytest.fixture
def site():
    site = PhotoSite()
    server = ThreadingHTTPServer(("127.0.0.1", 0), site.handler())
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    site.base = f"http://127.0.0.1:{server.server_address[1]}"
    yield site
    server.shutdown()
    server.server_close()


def _write_lists(folder: Path, base: str) -> Path:
    folder.mkdir()
    (folder / "fly_agaric.txt").write_text(
        "# photos of Amanita muscaria\n"
        f"{base}/photos/0.jpg\n"
        f"{base}/photos/1.jpg   # a comment after the URL\n"
        "\n"
        f"{base}/photos/0.jpg\n"  # listed twice: fetched once
        f"{base}/gone.jpg\n"
        f"{base}/page.jpg\n"
        f"{base}/lying-html.jpg\n"
        f"{base}/flaky.jpg\n"
        "ftp://example.invalid/photo.jpg\n"
    )
    (folder / "puffball.txt").write_text(
        f"{base}/photos/2.jpg\n"
        f"{base}/truncated.jpg\n"
        f"{base}/tiny.png\n"
        f"{base}/strip.png\n"
        f"{base}/unavailable.png\n"
        f"{base}/moved.jpg\n"
        f"{base}/slow.jpg\n"
        f"{base}/cut.jpg\n"
        "http://[::1\n"
    )
    return folder


def test_keeps_only_real_photos_logs_every_failure_and_resumes(site, tmp_path):
    lists = _write_lists(tmp_path / "lists", site.base)
    out = tmp_path / "photos"
    options = dict(workers=4, timeout=0.5, retries=1, backoff=0.05, progress=False)

    result = gather_photos(lists, out, **options)

    kept = {p.parent.name: sorted(q.name for q in p.parent.iterdir() if not q.name.startswith(".")) for p in
            out.glob("*/*")}
    assert sorted(kept) == ["fly_agaric", "puffball"]
    assert len(kept["fly_agaric"]) == 3 and len(kept["puffball"]) == 1  # photos 0, 1, flaky / photo 2
    assert all(name.endswith(".jpg") for names in kept.values() for name in names)
    assert not list(out.rglob(".*tmp*")), "no temporary files are left behind"
    for path in out.glob("*/*.jpg"):
        open_image(path.read_bytes())
    assert result.downloaded == 4 and result.already_present == 0

    reasons = {f.url.rsplit("/", 1)[-1]: f.reason for f in read_failure_log(out / FAILURE_LOG)}
    assert reasons == {
        "gone.jpg": "http_404",
        "page.jpg": "html",
        "lying-html.jpg": "html",
        "photo.jpg": "invalid_url",
        "truncated.jpg": "corrupt",
        "tiny.png": "too_small",
        "strip.png": "tiny",
        "unavailable.png": "placeholder",
        "moved.jpg": "placeholder",
        "slow.jpg": "timeout",
        "cut.jpg": "network",
        "[::1": "invalid_url",
    }
    attempts = {f.url.rsplit("/", 1)[-1]: f.attempts for f in result.failures}
    assert attempts["slow.jpg"] == 2, "timeouts are retried"
    assert attempts["gone.jpg"] == 1, "a 404 is not retried"
    assert attempts["cut.jpg"] == 2, "a dropped connection is retried"
    assert site.requests["/flaky.jpg"] == 2, "a 503 is retried and then succeeds"
    assert site.requests["/photos/0.jpg"] == 1, "a URL listed twice is fetched once"

    site.requests.clear()
    again = gather_photos(lists, out, **options)
    assert again.already_present == 4 and again.downloaded == 0
    assert not any(path.startswith("/photos/") or path == "/flaky.jpg" for path in site.requests), \
        "photos already on disk are not downloaded again"
    assert len(again.failures) == 12, "failed URLs are tried again on the next run"


def test_url_list_parsing_and_bad_input(tmp_path, capsys):
    lists = tmp_path / "lists"
    lists.mkdir()
    assert cli.main(["gather", str(lists), "--out", str(tmp_path / "o")]) == 2
    assert "no <class>.txt URL lists" in capsys.readouterr().err

    (lists / "a b ünïcode.txt").write_text("# only comments\n\n   \n")
    assert cli.main(["gather", str(lists), "--out", str(tmp_path / "o")]) == 2
    assert "contain no URLs" in capsys.readouterr().err

    (lists / "a b ünïcode.txt").write_text("http://127.0.0.1:9/x.jpg # note\n#http://127.0.0.1:9/y.jpg\n")
    tasks = read_url_lists(lists)
    assert [(t.label, t.url) for t in tasks] == [("a b ünïcode", "http://127.0.0.1:9/x.jpg")]
    assert len(tasks[0].stem) == 40
