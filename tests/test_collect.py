"""Photos come back: a gateway started with --photo-store keeps classified photos by hash; feedback that corrects an
answer is logged with its provenance; `python -m training_job collect` turns the corrections into class folders,
de-duplicated against the existing data. Real redis-server, model server (tiny model) and gateway processes."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter

import pytest
from PIL import Image
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from services.gateway.feedback import FeedbackTokens
from services.gateway.photo_store import BoundedFolder
from tests.model_server_harness import MODEL, start_server, stop_server, version_states, wait_until, write_config
from tests.support import MUSHROOMS, RedisServer, exit_code_within
from tests.test_gateway_state import Gateway
from training_job.paths import PROJECT_ROOT
from training_job.tiny_model import LABELS, publish_tiny_versions

AVAILABLE = ModelVersionStatus.AVAILABLE

PHOTOS = {label: sorted((MUSHROOMS / label).iterdir()) for label in LABELS}


def test_feedback_tokens_name_the_kept_photo_and_old_tokens_still_verify():
    tokens = FeedbackTokens(b"0123456789abcdef0123", MODEL)
    sha = hashlib.sha256(b"photo").hexdigest()
    assert tokens.verify(tokens.issue("r1", 2, "boletus_edulis", photo_sha256=sha)).photo_sha256 == sha
    assert tokens.verify(tokens.issue("r2", 2, "boletus_edulis")).photo_sha256 is None


def test_the_token_naming_a_kept_photo_is_the_answers_own_with_the_photo(tmp_path):
    """The same answer (request, version, model identity, issue time) with the photo's hash, however long keeping
    the photo took: even past a short --feedback-window (the token then expires as the answer's would)."""
    import asyncio

    from services.gateway.photo_store import PhotoStore

    now = [1_000_000.0]
    tokens = FeedbackTokens(b"0123456789abcdef0123", MODEL, lifetime_seconds=1, clock=lambda: now[0])
    store = PhotoStore(tmp_path / "store", tokens, max_bytes=10_000)
    answer = {"request_id": "r1", "model": {"name": MODEL, "version": 2},
              "predictions": [{"label": "boletus_edulis"}],
              "feedback_token": tokens.issue("r1", 2, "boletus_edulis", identity="0a1b2c3d4e5f")}
    now[0] += 2  # the answer's token expired meanwhile
    kept = asyncio.run(store.keep(b"photo", answer))["feedback_token"]
    now[0] -= 2
    claim = tokens.verify(kept)
    assert (claim.request_id, claim.version, claim.predicted, claim.identity, claim.issued_at, claim.photo_sha256) \
        == ("r1", 2, "boletus_edulis", "0a1b2c3d4e5f", 1_000_000, hashlib.sha256(b"photo").hexdigest())


def test_bounded_folder_deletes_the_oldest_photos_past_its_size(tmp_path):
    folder = BoundedFolder(tmp_path / "pending", max_bytes=1000)
    shas = [hashlib.sha256(bytes([i])).hexdigest() for i in range(6)]
    for i, sha in enumerate(shas):
        folder.put(sha, bytes(300))
        stamp = time.time() - 100 + i  # explicit ages: the oldest first
        os.utime(folder.file(sha), (stamp, stamp))
    kept = sorted(p.name for p in (tmp_path / "pending").iterdir())
    assert sum(p.stat().st_size for p in (tmp_path / "pending").iterdir()) <= 1000
    assert kept == sorted(shas[-len(kept):]) and len(kept) == 3  # down to 90 %: the newest three
    with pytest.raises(ValueError):
        folder.file("../../etc/passwd")
    assert BoundedFolder(tmp_path / "pending", max_bytes=1000).bytes == 900  # the size is re-read at start


def test_a_photo_the_volume_has_no_room_for_leaves_no_part_behind(tmp_path, monkeypatch):
    """A write that fills the volume half way (ENOSPC) raises, and the part written is removed: the folder holds
    whole photos only, and its size count is unchanged."""
    import errno
    from pathlib import Path

    folder = BoundedFolder(tmp_path / "pending", max_bytes=10_000)
    write_bytes = Path.write_bytes

    def volume_full(path, data):
        write_bytes(path, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Path, "write_bytes", volume_full)
    with pytest.raises(OSError) as exc:
        folder.put(hashlib.sha256(b"photo").hexdigest(), bytes(1000))
    assert exc.value.errno == errno.ENOSPC
    assert list((tmp_path / "pending").iterdir()) == [] and folder.bytes == 0


def test_a_photo_store_whose_writes_block_answers_without_it_and_stops_trying_past_its_bound(tmp_path, monkeypatch):
    """Writes that block (a network volume away) cost a classify at most the store's wait: the answer comes back
    as it is, its token naming no photo; past MAX_OPERATIONS blocked writes the store is skipped at once, without
    another thread; once the writes return, photos are kept again. Before: keep waited for its write for ever."""
    import asyncio
    import threading

    from services.gateway import photo_store

    monkeypatch.setattr(photo_store, "STORE_WAIT_S", 0.2)
    tokens = FeedbackTokens(b"k" * 32, MODEL)
    store = photo_store.PhotoStore(tmp_path / "store", tokens, max_bytes=10**6)
    volume_back = threading.Event()
    put = photo_store.BoundedFolder.put

    def blocked_put(folder, sha256, data):
        volume_back.wait()
        put(folder, sha256, data)

    monkeypatch.setattr(photo_store.BoundedFolder, "put", blocked_put)

    def answer() -> dict:
        return {"feedback_token": tokens.issue(request_id="r", version=1, predicted=LABELS[0])}

    async def keep_all() -> list[bool]:
        named = []
        for i in range(photo_store.MAX_OPERATIONS + 3):
            given = answer()
            kept = await asyncio.wait_for(store.keep(bytes([i]) * 100, given), 10)
            named.append(kept != given)
        return named

    assert asyncio.run(keep_all()) == [False] * (photo_store.MAX_OPERATIONS + 3)  # answered as they were
    blocked = [t for t in threading.enumerate() if t.name == "photo-store"]
    assert len(blocked) == photo_store.MAX_OPERATIONS  # the blocked writes' threads, no more
    volume_back.set()
    wait_until(lambda: store._running == 0, what="the blocked writes to return")
    given = answer()
    kept = asyncio.run(store.keep(b"a photo", given))
    assert tokens.verify(kept["feedback_token"]).photo_sha256 == hashlib.sha256(b"a photo").hexdigest()


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    registry = tmp_path_factory.mktemp("registry")
    publish_tiny_versions(registry, MODEL, biases=(0.0,))
    config = registry / "models.config"
    write_config(config, {MODEL: registry / MODEL}, policy="all {}")
    server = start_server(registry, config)
    wait_until(lambda: version_states(server.grpc_target, MODEL).get(1, (0,))[0] == AVAILABLE, what="version 1")
    yield server
    stop_server(server)


def jpeg_resized(path, scale: float) -> bytes:
    image = Image.open(path).convert("RGB")
    image = image.resize((int(image.width * scale), int(image.height * scale)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def test_corrections_become_class_folders_with_provenance_and_no_duplicates(model_server, tmp_path):
    data = tmp_path / "data"
    for label in LABELS[:3]:  # the existing training photos: 3 per class, the model's fourth class not among them
        (data / label).mkdir(parents=True)
        for photo in PHOTOS[label][:3]:
            shutil.copy(photo, data / label / photo.name)
    store = tmp_path / "store"
    with RedisServer() as redis_server:
        gateway = Gateway(model_server.grpc_target, redis_server.url, f"--photo-store={store}")
        try:
            def answer(photo: bytes):
                code, body, _ = gateway.classify(photo)
                assert code == 200, body
                return body

            def feedback(body, true_label):
                code, reply, _ = gateway.request("POST", "/v1/feedback", {"feedback_token": body["feedback_token"],
                                                                          "true_label": true_label})
                assert code == 200, reply
                return reply

            def other_than(label):
                return next(x for x in LABELS if x != label)

            new = PHOTOS["boletus_edulis"][10].read_bytes()  # not in the data: a real new training photo
            a = answer(new)
            assert feedback(a, other_than(a["predictions"][0]["label"]))["photo_kept"] is True
            confirmed = answer(PHOTOS["boletus_edulis"][11].read_bytes())
            assert feedback(confirmed, confirmed["predictions"][0]["label"])["photo_kept"] is None  # no correction
            # a class of the model's that the data lacks (the gateway refuses labels that are no class of the model)
            unknown = next(body for body in map(answer, (p.read_bytes() for p in PHOTOS["boletus_edulis"][12:20]))
                           if body["predictions"][0]["label"] != LABELS[3])
            feedback(unknown, LABELS[3])
            in_data = answer(PHOTOS["amanita_muscaria"][0].read_bytes())  # byte-identical to a data photo
            feedback(in_data, other_than(in_data["predictions"][0]["label"]))
            resized = answer(jpeg_resized(PHOTOS["amanita_vaginata"][1], 0.5))  # a smaller copy of a data photo
            feedback(resized, other_than(resized["predictions"][0]["label"]))
            disputed_photo = PHOTOS["boletus_erythropus"][13].read_bytes()
            first, second = answer(disputed_photo), answer(disputed_photo)
            feedback(first, LABELS[2])
            feedback(second, LABELS[3])
            [identity] = [v["identity"] for v in gateway.request("GET", "/v1/models").body["models"][0]["versions"]
                          if v["version"] == 1]
        finally:
            gateway.stop()

    records = [json.loads(line) for line in (store / "corrections.jsonl").read_text().splitlines()]
    assert len(records) == 6 and oct((store / "corrections.jsonl").stat().st_mode & 0o777) == "0o600"
    first_record = records[0]
    assert first_record["sha256"] == hashlib.sha256(new).hexdigest() and first_record["version"] == 1
    assert first_record["identity"] == identity  # the model behind version 1 (a number can be given again)
    assert first_record["request_id"] == a["request_id"] and first_record["predicted"] == a["predictions"][0]["label"]
    assert (store / "corrected" / first_record["sha256"]).read_bytes() == new

    out = tmp_path / "collected"
    run = subprocess.run([sys.executable, "-m", "training_job", "collect", f"--store={store}", f"--data={data}",
                          f"--out={out}"], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "6 corrections read; 1 new photos collected" in run.stdout
    report = json.loads((out / "collect_report.json").read_text())
    assert report["dropped"] == {"unknown_class": 1, "duplicate": 1, "near_duplicate": 1, "disagreement": 1}
    label = first_record["true_label"]
    sha = first_record["sha256"]
    assert (out / label / f"{sha}.jpg").read_bytes() == new
    [row] = list(csv.DictReader(open(out / "provenance.csv")))
    assert (row["sha256"], row["label"], row["version"], row["identity"], row["request_id"], row["file"]) == (
        sha, label, "1", identity, a["request_id"], f"{label}/{sha}.jpg")
    assert row["answered_at"] and row["corrected_at"] and row["predicted"] == a["predictions"][0]["label"]

    again = subprocess.run([sys.executable, "-m", "training_job", "collect", f"--store={store}", f"--data={data}",
                            f"--out={out}"], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert again.returncode == 0 and "0 new photos collected" in again.stdout  # collecting twice adds nothing
    assert len(list(csv.DictReader(open(out / "provenance.csv")))) == 1


def test_collect_and_retrain_script_trains_on_the_data_plus_collected_photos(tmp_path):
    """scripts/collect_and_retrain.sh with a `python` on PATH that runs collect for real and records `run`."""
    data, store, work, bin_dir = tmp_path / "data", tmp_path / "store", tmp_path / "work", tmp_path / "bin"
    for label in LABELS[:2]:
        (data / label).mkdir(parents=True)
        shutil.copy(PHOTOS[label][0], data / label / "old.jpg")
    (store / "collected" / LABELS[1]).mkdir(parents=True)
    shutil.copy(PHOTOS[LABELS[1]][20], store / "collected" / LABELS[1] / "new.jpg")  # collected on an earlier night
    bin_dir.mkdir()
    shim = bin_dir / "python"
    shim.write_text(f"""#!/bin/sh
if [ "$3" = "run" ]; then echo "run $*" > {tmp_path}/run.txt; find "$8" -type f | sort >> {tmp_path}/run.txt; exit 0; fi
exec {sys.executable} "$@"
""")
    shim.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "DATA": str(data), "PHOTO_STORE_DIR": str(store),
           "MUSHROOM_REGISTRY": str(tmp_path / "registry"), "WORK_DIR": str(work), "RETRAIN_ARGS": "--epochs 3",
           "PYTHONPATH": str(PROJECT_ROOT), "HOME": str(tmp_path)}
    result = subprocess.run(["sh", "scripts/collect_and_retrain.sh"], capture_output=True, text=True,
                            cwd=PROJECT_ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "0 corrections read" in result.stdout  # nobody corrected anything yet: not an error
    lines = (tmp_path / "run.txt").read_text().splitlines()
    assert lines[0] == (f"run -m training_job run --challenge --corrections {store}/collected/provenance.csv "
                        f"--data {work}/data --registry {tmp_path / 'registry'} --epochs 3")
    assert lines[1:] == sorted([f"{work}/data/{LABELS[0]}/old.jpg", f"{work}/data/{LABELS[1]}/new.jpg",
                                f"{work}/data/{LABELS[1]}/old.jpg"])


def test_collect_drops_missing_unreadable_and_malformed_corrections(tmp_path):
    from training_job.collect import collect, format_collect_summary

    data = tmp_path / "data"
    for label in LABELS:
        (data / label).mkdir(parents=True)
        shutil.copy(PHOTOS[label][0], data / label / "one.jpg")
    store = tmp_path / "store"
    (store / "corrected").mkdir(parents=True)
    good = PHOTOS["boletus_edulis"][30].read_bytes()
    good_sha = hashlib.sha256(good).hexdigest()
    (store / "corrected" / good_sha).write_bytes(good)
    text_sha = hashlib.sha256(b"not a photo").hexdigest()
    (store / "corrected" / text_sha).write_bytes(b"not a photo")
    missing_sha = hashlib.sha256(b"evicted").hexdigest()
    lines = [json.dumps({"sha256": sha, "true_label": "boletus_edulis", "version": 3, "request_id": f"r{i}",
                         "corrected_at": i}) for i, sha in enumerate((good_sha, text_sha, missing_sha))]
    retried = json.dumps({**json.loads(lines[0]), "corrected_at": 9})  # a client's retry of a logged feedback
    (store / "corrections.jsonl").write_text(
        "\n".join([*lines, retried, "{not json", json.dumps({"sha256": 5})]) + "\n")
    report = collect(store, data, data)  # straight into the data folder: the next run trains on it
    assert (report.corrections, report.repeated) == (3, 1)
    assert "3 corrections read (and 1 repeated lines)" in format_collect_summary(report, data)
    assert [r["sha256"] for r in report.collected] == [good_sha]
    assert report.counts() == {"not_an_image": 1, "photo_missing": 1, "unreadable_record": 2}
    assert (data / "boletus_edulis" / f"{good_sha}.jpg").read_bytes() == good
    assert collect(store, data, data).counts()["duplicate"] == 1  # the second time it is already there
    with pytest.raises(Exception, match="does not exist"):
        collect(tmp_path / "nowhere", data, data)


def test_grpc_feedback_records_once_and_keeps_corrected_photos(model_server, tmp_path):
    import grpc

    from services.gateway.protos import load

    pb, pb_grpc = load()
    store = tmp_path / "store"
    with RedisServer() as redis_server:
        gateway = Gateway(model_server.grpc_target, redis_server.url, f"--photo-store={store}")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
                stub = pb_grpc.ClassifierStub(channel)
                photo = PHOTOS["amanita_vaginata"][40].read_bytes()
                answer = stub.Classify(pb.ClassifyRequest(photo=photo), timeout=30)
                top = answer.predictions[0].label
                wrong = next(x for x in LABELS if x != top)
                reply = stub.Feedback(pb.FeedbackRequest(feedback_token=answer.feedback_token, true_label=wrong),
                                      timeout=30)
                assert (reply.request_id, reply.model_version, reply.predicted, reply.correct) == (
                    answer.request_id, 1, top, False)
                assert reply.HasField("photo_kept") and reply.photo_kept
                again = stub.Feedback(pb.FeedbackRequest(feedback_token=answer.feedback_token, true_label=wrong),
                                      timeout=30)  # the same feedback again (a retry): answered as recorded
                assert (again.request_id, again.correct, again.photo_kept) == (answer.request_id, False, True)
                with pytest.raises(grpc.RpcError) as other:
                    stub.Feedback(pb.FeedbackRequest(feedback_token=answer.feedback_token,
                                                     true_label=next(x for x in LABELS if x not in (top, wrong))),
                                  timeout=30)
                assert other.value.code() == grpc.StatusCode.ALREADY_EXISTS
                confirmed = stub.Classify(pb.ClassifyRequest(photo=PHOTOS["amanita_vaginata"][41].read_bytes()),
                                          timeout=30)
                agree = stub.Feedback(pb.FeedbackRequest(feedback_token=confirmed.feedback_token,
                                                         true_label=confirmed.predictions[0].label), timeout=30)
                assert agree.correct and not agree.HasField("photo_kept")  # no correction, nothing logged
                with pytest.raises(grpc.RpcError) as forged:
                    stub.Feedback(pb.FeedbackRequest(feedback_token=answer.feedback_token[:-4] + "AAAA",
                                                     true_label=wrong), timeout=30)
                assert forged.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            gateway.stop()
    # logged again by the retry (its first try may have been answered 503): the same correction, which collect
    # reads as one
    records = [json.loads(line) for line in (store / "corrections.jsonl").read_text().splitlines()]
    assert {(r["sha256"], r["true_label"], r["request_id"]) for r in records} == {
        (hashlib.sha256(photo).hexdigest(), wrong, answer.request_id)} and len(records) == 2
    record = records[0]
    assert (store / "corrected" / record["sha256"]).read_bytes() == photo


def test_a_broken_photo_store_never_costs_an_answer_and_a_correction_waits_for_it(model_server, tmp_path):
    """The store's folders stop taking files (here replaced by a file; a full or read-only volume fails the same
    way): a classify is still answered 200, its token naming no photo, and the failure is counted. A correction
    whose log line cannot be written is a 503 with Retry-After (the feedback itself is recorded, and the same
    feedback again is safe); once the store works, the retry logs the correction, once. (Before: both were 500s.)"""
    store = tmp_path / "store"
    kept_photo, unkept_photo = PHOTOS["boletus_edulis"][20].read_bytes(), PHOTOS["boletus_edulis"][21].read_bytes()
    with RedisServer() as redis_server:
        gateway = Gateway(model_server.grpc_target, redis_server.url, f"--photo-store={store}")
        try:
            code, kept, _ = gateway.classify(kept_photo)
            assert code == 200, kept
            (store / "pending").rename(store / "pending-away")
            (store / "pending").write_text("not a folder any more")
            failures = gateway.metric("mushroom_gateway_photo_store_failures_total", operation="keep")
            code, unkept, _ = gateway.classify(unkept_photo)
            assert code == 200, unkept
            assert gateway.metric("mushroom_gateway_photo_store_failures_total", operation="keep") == failures + 1
            wrong = next(label for label in LABELS if label != unkept["predictions"][0]["label"])
            code, reply, _ = gateway.request("POST", "/v1/feedback", {"feedback_token": unkept["feedback_token"],
                                                                      "true_label": wrong})
            assert code == 200 and reply["photo_kept"] is None, reply  # counted; no photo to attach
            (store / "pending").unlink()
            (store / "pending-away").rename(store / "pending")

            (store / "corrections.jsonl").mkdir()  # the log cannot be appended to
            wrong = next(label for label in LABELS if label != kept["predictions"][0]["label"])
            correction = {"feedback_token": kept["feedback_token"], "true_label": wrong}
            code, reply, headers = gateway.request("POST", "/v1/feedback", correction)
            assert (code, reply["error"]["code"]) == (503, "photo_store_unavailable"), reply
            assert int(headers["Retry-After"]) >= 1
            (store / "corrections.jsonl").rmdir()
            code, reply, _ = gateway.request("POST", "/v1/feedback", correction)
            assert code == 200 and reply["photo_kept"] is True, reply
        finally:
            gateway.stop()
    [line] = (store / "corrections.jsonl").read_text().splitlines()
    assert json.loads(line)["true_label"] == wrong
    assert (store / "corrected" / json.loads(line)["sha256"]).read_bytes() == kept_photo


def test_a_hung_photo_store_costs_no_answer_holds_no_request_and_no_exit(model_server, tmp_path):
    """A store on a network volume whose server stopped answering (an NFS hard mount) blocks each of its file
    operations for as long as it is away. Here the correction log is a FIFO nobody reads, which blocks the same way
    the moment it is opened for writing. Each correction is answered 503 ``photo_store_unavailable``, more of them
    than the store runs at once, classify goes on, and the gateway stops on SIGTERM. Before: the first correction
    was never answered, and the gateway's exit waited for the blocked thread."""
    store = tmp_path / "store"
    photos = PHOTOS["boletus_erythropus"][20:24]
    with RedisServer() as redis_server:
        gateway = Gateway(model_server.grpc_target, redis_server.url, f"--photo-store={store}")
        try:
            code, answer, _ = gateway.classify(photos[0].read_bytes())
            assert code == 200, answer
            os.mkfifo(store / "corrections.jsonl")
            wrong = next(label for label in LABELS if label != answer["predictions"][0]["label"])
            correction = {"feedback_token": answer["feedback_token"], "true_label": wrong}
            for _ in range(8):  # more than the store's operations at once (and the default executor's threads)
                code, reply, headers = gateway.request("POST", "/v1/feedback", correction, timeout=20)
                assert (code, reply["error"]["code"]) == (503, "photo_store_unavailable"), reply
                assert int(headers["Retry-After"]) >= 1
            for photo in photos[1:]:
                code, other, _ = gateway.classify(photo.read_bytes(), timeout=20)
                assert code == 200, other
            gateway.process.terminate()
            assert exit_code_within(gateway.process, 20) is not None, "the gateway did not stop on SIGTERM"
        finally:
            gateway.stop()


def test_provenance_rows_are_appended_under_the_columns_the_file_already_has(tmp_path):
    """A provenance.csv written before a column was added keeps its header: new rows fill its columns."""
    from training_job.collect import append_provenance

    provenance = tmp_path / "provenance.csv"
    old_columns = ["sha256", "label", "version", "file"]
    provenance.write_text(",".join(old_columns) + "\nabc,boletus_edulis,1,boletus_edulis/abc.jpg\n")
    append_provenance(provenance, [{"sha256": "def", "label": "amanita_muscaria", "version": 2, "identity": "0a1b",
                                    "file": "amanita_muscaria/def.jpg", "request_id": "r9"}])
    rows = list(csv.DictReader(open(provenance)))
    assert [list(row) for row in rows] == [old_columns, old_columns]
    assert [row["sha256"] for row in rows] == ["abc", "def"] and rows[1]["file"] == "amanita_muscaria/def.jpg"
    fresh = tmp_path / "fresh.csv"
    append_provenance(fresh, [{"sha256": "def", "identity": "0a1b"}])
    [row] = list(csv.DictReader(open(fresh)))
    assert row["identity"] == "0a1b" and row["label"] == ""


def test_a_correction_joins_the_folder_its_label_came_from_when_that_name_is_not_the_label(tmp_path):
    """A class folder named on a Mac (NFD) or in Windows-1252 gives its label in NFC UTF-8; a collected photo
    goes into that folder, not into a new one spelled as the label (which the next prepare would refuse as a
    second folder with the same label)."""
    import os
    import unicodedata

    from training_job.collect import collect
    from training_job.prepare import prepare_dataset

    data = tmp_path / "data"
    folders = {"boletus_edulis_été": unicodedata.normalize("NFD", "boletus_edulis_été"),
               "amanita_muscaria_ä": os.fsdecode(b"amanita_muscaria_\xe4")}
    for i, (label, folder) in enumerate(folders.items()):
        (data / folder).mkdir(parents=True)
        for n in range(3):
            shutil.copy(PHOTOS[LABELS[i]][n], data / folder / f"{n}.jpg")
    store = tmp_path / "store"
    (store / "corrected").mkdir(parents=True)
    photo = PHOTOS[LABELS[0]][30].read_bytes()
    sha = hashlib.sha256(photo).hexdigest()
    (store / "corrected" / sha).write_bytes(photo)
    # corrected by the answer of a model trained before labels were NFC, which named the class as its folder (NFD)
    (store / "corrections.jsonl").write_text(json.dumps({"sha256": sha, "true_label": folders["boletus_edulis_été"],
                                                         "version": 1, "request_id": "r1", "corrected_at": 1}) + "\n")
    elsewhere = tmp_path / "collected"  # OUT a folder of its own: named as the data's, so that copies merge
    assert [r["sha256"] for r in collect(store, data, elsewhere).collected] == [sha]
    assert (elsewhere / folders["boletus_edulis_été"] / f"{sha}.jpg").read_bytes() == photo
    assert [r["sha256"] for r in collect(store, data, data).collected] == [sha]
    assert (data / folders["boletus_edulis_été"] / f"{sha}.jpg").read_bytes() == photo
    assert sorted(p.name for p in data.iterdir() if p.is_dir()) == sorted(folders.values())
    rows = prepare_dataset(data, tmp_path / "out", progress=False)
    assert Counter(r.label for r in rows) == {"boletus_edulis_été": 4, "amanita_muscaria_ä": 3}
