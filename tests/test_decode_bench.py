"""bench/decode_bench.py: CPU per photo of each decode path, split into stages, and each path's pixels against
Pillow's, on photos made here (EXIF-rotated, grey, CMYK, RGBA PNG) so the test needs no shared folder."""
from __future__ import annotations

import io

import pytest
from PIL import Image

import bench.decode_bench as decode_bench
import bench.run_all as run_all

STAGES = ("decode", "orient_convert", "resize")


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


@pytest.fixture
def photo_folder(tmp_path):
    gradient = Image.linear_gradient("L").resize((1000, 700)).convert("RGB")
    gradient.paste((200, 30, 30), (100, 100, 400, 300))
    exif = Image.Exif()
    exif[0x0112] = 6
    photos = {
        "a/rotated.jpg": encode(gradient, "JPEG", quality=90, exif=exif.tobytes()),
        "a/grey.jpg": encode(gradient.convert("L"), "JPEG"),
        "b/cmyk.jpg": encode(gradient.convert("CMYK"), "JPEG"),
        "b/alpha.png": encode(gradient.convert("RGBA"), "PNG"),
    }
    for name, data in photos.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    return tmp_path


def test_the_bench_writes_stage_times_and_pixel_differences_per_path(photo_folder, monkeypatch):
    written = {}
    monkeypatch.setattr(decode_bench, "write_result", lambda name, result: written.update({name: result}))
    assert decode_bench.main(["--data", str(photo_folder), "--photos", "4", "--rounds", "2"]) == 0
    result = written["decode"]
    assert result["photos"] == 4 and result["jpeg_photos"] == 3
    assert (result["reference_path"], result["contract_path"]) == ("pillow_before", "pillow")
    paths = result["paths"]
    assert {"pillow_before", "pillow", "pillow_reduce", "pillow_reducing_gap", "preprocess_bytes"} <= set(paths)
    for name, path in paths.items():
        ms = path["ms_per_photo"]
        assert ms["total"] > 0, name
        if name != "preprocess_bytes":
            assert all(ms[stage] >= 0 for stage in STAGES), name
            assert ms["total"] == pytest.approx(sum(ms[stage] for stage in STAGES), rel=1e-6), name
        assert path["vs_before"] == pytest.approx(ms["total"] / paths["pillow_before"]["ms_per_photo"]["total"])
    for name in ("pillow", "preprocess_bytes"):  # the contract now gives the pixels it gave before
        assert paths[name]["pixels_vs_before"] == {"mean_abs": 0.0, "max_abs": 0, "identical_photos": 4}, name
    if "simplejpeg" in result["skipped"]:
        assert not {"turbo_draft_scale", "turbo_min_size", "turbo_fast"} & set(paths)
    else:
        assert paths["turbo_draft_scale"]["pixels_vs_before"]["max_abs"] == 0, "draft's scale, accurate DCT"
        # 1000 x 700: draft decodes at 1/2, libjpeg-turbo's smallest scale that fits 224 is 3/8
        assert paths["turbo_min_size"]["pixels_vs_before"]["max_abs"] > 0
    assert ("pyturbojpeg" in paths) != ("pyturbojpeg" in result["skipped"])


def test_without_photos_the_bench_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(decode_bench, "write_result", lambda name, result: pytest.fail("wrote a result"))
    assert decode_bench.main(["--data", str(tmp_path / "absent")]) == 0
    assert "no photos" in capsys.readouterr().out


def test_run_all_lists_the_decode_bench_and_reports_its_row(monkeypatch):
    assert run_all.SCRIPTS["decode"] == ["-m", "bench.decode_bench"]
    stored = {"decode": {"photos": 200, "reference_path": "pillow_before", "contract_path": "pillow", "paths": {
        "pillow_before": {"ms_per_photo": {"total": 1.6}, "vs_before": 1.0},
        "pillow": {"ms_per_photo": {"total": 1.3}, "vs_before": 0.8125}}}}
    monkeypatch.setattr(run_all, "load", lambda name: stored.get(name, {}))
    rows = [row for row in run_all.rows() if row["source"] == "decode.json"]
    assert len(rows) == 1 and "1.60 → 1.30 ms" in rows[0]["measured"] and "0.81x" in rows[0]["measured"]
