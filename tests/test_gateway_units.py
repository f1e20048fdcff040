"""Unit tests of the gateway's pure parts: the shared preprocessing, weighted rendezvous routing, single-flight and
the circuit breaker."""
from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest

import training_job.preprocessing as contract
from bench.common import jpeg_scan_bomb
from services.gateway import classifier, pixels
from services.gateway.cache import CircuitBreaker, cache_key
from services.gateway.version_facts import Facts
from services.gateway.single_flight import SingleFlight
from services.gateway.routing import RoutingError, RoutingTable, parse_assignments, pick_entry

CLIENTS = [f"client-{i}" for i in range(20000)]



class KnownFacts:
    """The classifier's version facts (version_facts.VersionFacts), every version's known at once (a unit-test double:
    the classifier is under test here, not how the facts are learnt): size 224, one identity, classes "a" and "b"."""

    def known(self, version: int) -> Facts:
        return Facts(version, 224, "c0ffee", ("a", "b"))

    async def of(self, version: int, timeout: float | None = None) -> Facts:
        return self.known(version)


def test_cache_key_depends_on_photo_model_version_identity_preprocessing_and_input_size():
    key = cache_key("abc", "mushrooms", 3, "1d", 224)
    assert contract.PREPROCESSING_VERSION in key
    assert len({key, cache_key("abd", "mushrooms", 3, "1d", 224), cache_key("abc", "other", 3, "1d", 224),
                cache_key("abc", "mushrooms", 4, "1d", 224), cache_key("abc", "mushrooms", 3, "2e", 224),
                cache_key("abc", "mushrooms", 3, "1d", 240)}) == 6


def test_split_converges_to_the_weights():
    counts = Counter(pick_entry({1: 90, 2: 10}, c) for c in CLIENTS)
    assert abs(counts[1] / len(CLIENTS) - 0.9) < 0.01


def test_a_weight_shift_moves_few_clients_and_only_towards_the_growing_version():
    before = {c: pick_entry({1: 90, 2: 10}, c) for c in CLIENTS}
    after = {c: pick_entry({1: 80, 2: 20}, c) for c in CLIENTS}
    moved = [c for c in CLIENTS if before[c] != after[c]]
    assert 0.08 < len(moved) / len(CLIENTS) < 0.13  # the ideal is 10 %
    assert all(before[c] == 1 and after[c] == 2 for c in moved)


def test_a_removed_version_only_moves_its_own_clients():
    before = {c: pick_entry({1: 50, 2: 30, 3: 20}, c) for c in CLIENTS}
    after = {c: pick_entry({1: 50, 2: 30}, c) for c in CLIENTS}
    assert all(before[c] == after[c] for c in CLIENTS if before[c] != 3)


@pytest.mark.parametrize("table, message", [
    ({"weights": {"x!": 1}}, "neither a version number nor a version label"),
    ({"weights": {"1.5": 1}}, "neither a version number nor a version label"),
    ({"weights": {"": 1}}, "neither a version number nor a version label"),
    ({"weights": {"1": "heavy"}}, "weights are numbers"),
    ({"weights": {"1": -5}}, ">= 0"),
    ({"weights": [1, 2]}, "routing must be"),
    ({"weights": {"1": 1}, "shadow": "can ary"}, "shadow"),
    ({"weights": {"1": 1}, "shadow": 1.5}, "shadow"),
])
def test_bad_tables_are_refused(table, message):
    with pytest.raises(RoutingError, match=message):
        RoutingTable.from_json(table)


def test_cli_assignments():
    table = parse_assignments(["3=90", "4=10", "shadow=5"])
    assert (table.weights, table.shadow) == ({3: 90.0, 4: 10.0}, 5)


def test_identical_concurrent_misses_make_one_call():
    calls = []

    async def work():
        calls.append(1)
        await asyncio.sleep(0.05)
        return {"answer": 42}

    async def main():
        flight = SingleFlight()
        return await asyncio.gather(*(flight.do("same-photo", work) for _ in range(10)))

    assert asyncio.run(main()) == [{"answer": 42}] * 10
    assert len(calls) == 1


def test_breaker_opens_after_failures_and_retries_later(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("services.gateway.cache.time.monotonic", lambda: now[0])
    breaker = CircuitBreaker(failures_to_open=3, open_seconds=2.0)
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert not breaker.allow()
    now[0] += 2.5
    assert breaker.allow()
    breaker.success()
    assert breaker.allow() and breaker.failures == 0


def _jpeg(size: tuple[int, int]) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, (120, 80, 40)).save(out, "JPEG")
    return out.getvalue()


def test_only_small_photos_are_decoded_on_the_event_loop():
    import io
    import struct
    import zlib

    from PIL import Image

    from training_job.preprocessing import InvalidImage, Limits

    limits = Limits()
    assert pixels.cheap_to_decode(pixels.opened_on_the_loop(_jpeg((640, 480)), limits, 224))
    big = _jpeg((640, 480)) + b"\0" * pixels.INLINE_MAX_BYTES
    assert pixels.opened_on_the_loop(big, limits, 224) is None  # too many bytes: the pool opens it
    assert not pixels.cheap_to_decode(None)
    with pytest.raises(InvalidImage, match="scans"):  # refused at once, before any decode
        pixels.opened_on_the_loop(jpeg_scan_bomb(300, 200), limits, 224)
    png = io.BytesIO()
    Image.new("L", (1, 1)).save(png, "PNG")
    header = png.getvalue()
    ihdr = struct.pack(">IIBBBBB", 1200, 1000, 8, 0, 0, 0, 0)  # a few bytes claiming 1.2 M pixels
    many = header[:8] + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    assert not pixels.cheap_to_decode(pixels.opened_on_the_loop(many + header[33:], limits, 224))


def test_only_jpegs_and_pngs_are_opened_on_the_event_loop():
    """The contract bounds what reading their headers costs (jpeg_markers, png_chunks); Pillow reads another
    format's header with code of its own, as long as it takes (a TIFF of 5,000 tags in 60 KB: 80 ms of the loop,
    before TIFF was refused). The pool opens them, and refuses what it refuses there."""
    import io

    from PIL import Image

    from training_job.preprocessing import Limits

    photo = Image.new("RGB", (64, 48), (200, 30, 10))
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"):
        out = io.BytesIO()
        photo.save(out, fmt)
        opened = pixels.opened_on_the_loop(out.getvalue(), Limits(), 224)
        assert (opened is not None) == (fmt in ("JPEG", "PNG")), fmt
    assert pixels.opened_on_the_loop(b"<html>not a photo</html>", Limits(), 224) is None


def test_only_jpegs_are_decoded_on_the_event_loop():
    """A JPEG decodes at a reduced DCT scale: cheap at a million pixels. Other formats decode every pixel (a 1 M pixel
    JPEG 2000 or PNG of a few KB costs tens of ms), which would stall every request the loop serves: the pool
    decodes them, however small in bytes."""
    import io

    from PIL import Image

    from training_job.preprocessing import Limits

    gradient = Image.linear_gradient("L").resize((1000, 1000)).convert("RGB")
    for fmt in ("PNG", "WEBP", "GIF", "JPEG2000"):
        out = io.BytesIO()
        gradient.save(out, fmt)
        assert len(out.getvalue()) <= pixels.INLINE_MAX_BYTES, fmt
        assert not pixels.cheap_to_decode(pixels.opened_on_the_loop(out.getvalue(), Limits(), 224)), fmt


def test_each_photo_is_opened_once_wherever_it_is_decoded(monkeypatch):
    """The header read that chooses between the event loop and the pool is the one the decode uses: a photo is not
    opened (its markers parsed) twice. The pixels are the contract's."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from training_job.preprocessing import Limits, preprocess_bytes

    opened = []
    real_open = Image.open

    def counting_open(*args, **kwargs):
        opened.append(args)
        return real_open(*args, **kwargs)

    small, many_pixels = _jpeg((64, 48)), _jpeg((1200, 1000))
    assert len(many_pixels) <= pixels.INLINE_MAX_BYTES  # small in bytes, decoded in the pool
    expected = [preprocess_bytes(photo, 224) for photo in (small, many_pixels)]
    monkeypatch.setattr(Image, "open", counting_open)
    with ThreadPoolExecutor(1) as pool:
        preprocessor = pixels.Preprocessor(Limits(), pool)
        for photo, want in zip((small, many_pixels), expected):
            opened.clear()
            np.testing.assert_array_equal(asyncio.run(preprocessor.pixels(photo, 224)), want)
            assert len(opened) == 1


def test_the_only_request_under_way_decodes_its_jpeg_on_the_event_loop(monkeypatch):
    """Alone, a request's JPEG of more pixels and bytes than the loop takes otherwise is opened and decoded there (no
    thread hand-offs); with company, beyond the lone request's bounds, or in another format, it goes to the pool.
    The pixels are the contract's either way."""
    import io
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from training_job import preprocessing
    from training_job.preprocessing import Limits, preprocess_bytes

    decoded_on = []
    real_decode = pixels.preprocess_opened

    def recording(*args, **kwargs):
        decoded_on.append(threading.current_thread() is threading.main_thread())
        return real_decode(*args, **kwargs)

    def gradient_jpeg(noise: int) -> bytes:  # 1600 x 1000, its bytes growing with the noise
        ramp = np.linspace(0, 255, 1600)[None, :, None] * np.ones((1000, 1, 3))
        noisy = ramp + np.random.default_rng(0).integers(-noise, noise + 1, ramp.shape)
        out = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=85)
        return out.getvalue()

    photo, heavy = gradient_jpeg(8), gradient_jpeg(40)
    png = io.BytesIO()
    Image.new("RGB", (600, 400), (90, 60, 30)).save(png, "PNG")
    assert pixels.INLINE_MAX_BYTES < len(photo) <= pixels.ALONE_INLINE_MAX_BYTES < len(heavy)
    assert pixels.INLINE_MAX_PIXELS < 1600 * 1000 <= pixels.ALONE_INLINE_MAX_PIXELS
    expected = {data: preprocess_bytes(data, 224) for data in (photo, heavy, png.getvalue())}
    monkeypatch.setattr(pixels, "preprocess_opened", recording)
    monkeypatch.setattr(preprocessing, "preprocess_opened", recording)  # the pool's path, through preprocess_bytes
    with ThreadPoolExecutor(1) as pool:
        for alone, data, on_the_loop in ((True, photo, True), (False, photo, False), (True, heavy, False),
                                         (True, png.getvalue(), False)):
            decoded_on.clear()
            preprocessor = pixels.Preprocessor(Limits(), pool, alone=lambda alone=alone: alone)
            got = asyncio.run(preprocessor.pixels(data, 224))
            np.testing.assert_array_equal(got, expected[data])
            assert decoded_on == [on_the_loop], (alone, on_the_loop)


def _two_class_gateway(cache, predictions: list | None = None):
    """A Classifier over fakes of one module's neighbours: ``cache``, a model server whose version 1 answers every
    photo "b" at 0.75 (each call's version appended to ``predictions``), a router choosing version 1."""
    from types import SimpleNamespace

    from services.gateway.stats import Stats
    from services.gateway.upstream import Prediction
    from training_job.preprocessing import Limits

    class Upstream:
        model_name = "mushrooms"

        async def input_size(self, version, label=None):
            return version, 224

        async def predict(self, pixels, version, label):
            if predictions is not None:
                predictions.append(version)
            return [Prediction(version, np.float32([0.25, 0.75]), ["a", "b"], 0.9, False)]

    class Redis:
        async def set(self, *args, **kwargs):
            pass

        async def hgetall(self, key):  # the feedback tally: none
            return {}

    router = SimpleNamespace(available={1}, choose=lambda client: (1, "latest"), shadow_version=lambda: None)
    return classifier.Classifier(Upstream(), cache, router, Stats(Redis(), "mushrooms"),
                                 SimpleNamespace(display_names=lambda version: {}), Limits(), SingleFlight(),
                                 KnownFacts())


def test_the_answer_is_cached_off_the_response_path_and_shared_until_stored():
    """The Redis write happens after the answer is returned; an identical request arriving before it lands shares
    the answer instead of calling the model server again (as it joined the single-flight call before)."""
    stored, release, predictions = {}, None, []

    class Cache:
        async def get(self, key, usable=None):
            return stored.get(key)

        async def put(self, key, value):
            await release.wait()
            stored[key] = value

    gateway = _two_class_gateway(Cache(), predictions)
    photo = _jpeg((64, 48))

    async def scenario():
        nonlocal release
        release = asyncio.Event()
        first = await gateway.classify(photo, top_k=1)
        assert not stored and first["predictions"][0]["label"] == "b"  # answered before the write landed
        second = await gateway.classify(photo, top_k=1)
        assert predictions == [1] and not second["cached"]
        release.set()
        while not stored:
            await asyncio.sleep(0.01)
        third = await gateway.classify(photo, top_k=1)
        assert third["cached"] and predictions == [1] and len(stored) == 1

    asyncio.run(scenario())


def test_status_gives_the_latency_of_the_answers_a_version_computed_apart_from_cached_ones():
    """The rollout's latency rule compares versions on their cache misses: a new version's cache starts empty."""
    stored = {}

    class Cache:
        async def get(self, key, usable=None):
            return stored.get(key)

        async def put(self, key, value):
            stored[key] = value

    gateway = _two_class_gateway(Cache())

    async def scenario():
        computed = await gateway.classify(_jpeg((64, 48)), top_k=1)
        while not stored:
            await asyncio.sleep(0.01)
        hits = [await gateway.classify(_jpeg((64, 48)), top_k=1) for _ in range(3)]
        assert [hit["cached"] for hit in hits] == [True] * 3
        return computed, await gateway.stats.summary()

    computed, summary = asyncio.run(scenario())
    row = summary["versions"]["1"]
    assert (row["requests"], row["misses"], row["cache_hit_rate"]) == (4, 1, 0.75)
    assert row["miss_p95_ms"] == pytest.approx(computed["latency_ms"])


def test_a_classify_is_alone_only_while_no_other_is_under_way():
    """The preprocessor is told a request is alone (decode on the loop) only when it is the one classify under way:
    not when another is, and not after one failed."""
    from services.gateway.errors import GatewayError

    class Cache:
        async def get(self, key, usable=None):
            await asyncio.sleep(0)  # a round trip to Redis: the other classify gets its turn
            return None

        async def put(self, key, value):
            pass

    gateway = _two_class_gateway(Cache())
    told = []
    real_pixels = gateway.preprocessor.pixels

    async def recording(photo, size):
        told.append(gateway.preprocessor.alone())
        return await real_pixels(photo, size)

    gateway.preprocessor.pixels = recording

    async def scenario():
        await gateway.classify(_jpeg((64, 48)), top_k=1)
        assert told == [True]
        told.clear()
        await asyncio.gather(gateway.classify(_jpeg((64, 49)), top_k=1), gateway.classify(_jpeg((64, 50)), top_k=1))
        assert told == [False, False]
        told.clear()
        with pytest.raises(GatewayError):
            await gateway.classify(b"not a photo", top_k=1)
        await gateway.classify(_jpeg((64, 51)), top_k=1)
        assert told == [True, True] and gateway.serving == 0

    asyncio.run(scenario())


def test_upstream_reads_outputs_in_either_form_tf_serving_writes():
    """TF Serving's typed fields (its default) and tensor_content (--enable_serialization_as_tensor_content)."""
    from services.gateway.upstream import _array
    from services.model_server.grpc_api import tensor_proto

    for value in (np.float32([[0.25, 0.75]]), np.random.default_rng(0).random((32, 10)).astype(np.float32),
                  np.array([True, False]), np.float32([0.5])):
        for as_content in (False, True):
            np.testing.assert_array_equal(_array(tensor_proto(value, as_content)), value)
    labels = _array(tensor_proto(np.array([[b"a", b"b"]], dtype=object)))
    assert labels.shape == (1, 2) and list(labels[0]) == ["a", "b"]


def test_a_routed_version_unloaded_since_the_last_status_poll_is_routed_around():
    """The model server unloads the routed version before the gateway's next status poll: the request is routed
    again without it instead of answering 404. A version the client asked for by number still gets 404."""
    import grpc as grpc_lib

    from services.gateway.errors import GatewayError
    from services.gateway.routing import Router
    from services.gateway.stats import Stats
    from services.gateway.upstream import Prediction, UpstreamRejected
    from training_job.preprocessing import Limits

    calls = []

    class Upstream:
        model_name = "mushrooms"

        async def input_size(self, version, label=None):
            return version, 224

        async def predict(self, pixels, version, label):
            calls.append(version)
            if version == 1:  # unloaded by the model server; the gateway has not polled since
                raise UpstreamRejected(grpc_lib.StatusCode.NOT_FOUND, "Servable not found for request: 1")
            return [Prediction(version, np.float32([0.25, 0.75]), ["a", "b"], 0.9, False)]

    class Cache:
        async def get(self, key, usable=None):
            return None

        async def put(self, key, value):
            pass

    class Redis:
        async def set(self, *args, **kwargs):
            pass

    from types import SimpleNamespace

    router = Router(Redis(), "mushrooms")
    router.table = RoutingTable.from_request({"weights": {"1": 100}})
    router.available = {1, 2}
    gateway = classifier.Classifier(Upstream(), Cache(), router, Stats(Redis(), "mushrooms"),
                                    SimpleNamespace(display_names=lambda version: {}), Limits(), SingleFlight(),
                                    KnownFacts())

    async def scenario():
        answer = await gateway.classify(_jpeg((64, 48)), client_id="c", top_k=1)
        assert answer["model"]["version"] == 2 and calls == [1, 2]
        assert router.available == {2}
        calls.clear()
        router.available = {1, 2}
        with pytest.raises(GatewayError) as err:
            await gateway.classify(_jpeg((48, 64)), version=1, top_k=1)
        assert err.value.status == 404 and calls == [1]

    asyncio.run(scenario())


def test_each_gateway_flag_has_one_environment_variable(monkeypatch):
    """The name its --help shows, and no other: GATEWAY_<NAME> is not a second spelling of <NAME>."""
    import re

    from services.gateway.main import build_parser

    parser = build_parser()
    named = {a.dest: re.findall(r"\b([A-Z][A-Z_]{3,})\b", a.help or "") for a in parser._actions if a.dest != "help"}
    assert named["model_server"][0] == "GATEWAY_MODEL_SERVER" and named["redis_url"][0] == "GATEWAY_REDIS_URL"
    monkeypatch.setenv("GATEWAY_MODEL_SERVER", "tfserving:8500")
    monkeypatch.setenv("GATEWAY_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("GATEWAY_GATEWAY_HOST", "10.0.0.1")
    monkeypatch.setenv("GATEWAY_MODEL_NAME", "elsewhere")
    monkeypatch.setenv("MODEL_SERVER", "wrong:1")
    args = build_parser().parse_args([])
    assert (args.model_server, args.redis_url) == ("tfserving:8500", "redis://redis:6379/0")
    assert (args.host, args.model_name) == ("0.0.0.0", "mushrooms")


def test_class_names_and_metric_label_values_have_their_own_words(tmp_path):
    """"label" alone means a version label; a model's output columns are class names, a Prometheus label's value
    is a metric value."""
    import json

    from services.gateway import metrics
    from services.gateway.model_info import ModelInfo

    assets = tmp_path / "3" / "assets.extra"
    assets.mkdir(parents=True)
    (assets / "labels.json").write_text(json.dumps({"labels": ["boletus_edulis", "amanita_muscaria"],
                                                    "display_names": {"boletus_edulis": "Penny bun"}}))
    assert ModelInfo(str(tmp_path)).class_names(3) == [
        {"label": "boletus_edulis", "display_name": "Penny bun"},
        {"label": "amanita_muscaria", "display_name": "Amanita muscaria"}]
    assert ModelInfo(None).class_names(3) == []
    assert metrics.version_metric_value(3, {3}) == "3"
    assert metrics.version_metric_value(4, {3}) == metrics.version_metric_value(None, {3}) == "other"


def test_the_web_slideshow_shows_the_test_photos_of_a_version_without_demo_photos(tmp_path):
    """A small folder's demo photos can all be lent to the splits training needs (prepare): /v1/demo then shows
    the test photos, never trained on either, as `make run`'s report does (training_job.dataset.demo_rows)."""
    from services.gateway.model_info import ModelInfo
    from training_job.dataset import ManifestRow, write_manifest

    rows = [ManifestRow(f"/photos/{split}.jpg", "boletus_edulis", split[0] * 64, split, 1, 1, 8)
            for split in ("train", "validation", "test")]
    write_manifest(rows, tmp_path / "3" / "assets.extra" / "manifest.csv")
    assert [p["path"] for p in ModelInfo(str(tmp_path)).demo_photos(3)] == ["/photos/test.jpg"]
    write_manifest([*rows, ManifestRow("/photos/demo.jpg", "boletus_edulis", "d" * 64, "demo", 1, 1, 8)],
                   tmp_path / "3" / "assets.extra" / "manifest.csv")
    assert [p["path"] for p in ModelInfo(str(tmp_path)).demo_photos(3)] == ["/photos/demo.jpg"]


def test_cache_commands_share_a_connection_and_drop_one_that_failed():
    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError

    from services.gateway.cache import ResultCache
    from tests.support import RedisServer

    async def scenario(redis_server):
        client = aioredis.from_url(redis_server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        cache = ResultCache(client, ttl_seconds=60)
        try:
            assert await cache.get("mushroom:result:k") is None
            await cache.put("mushroom:result:k", {"version": 1})
            assert await cache.get("mushroom:result:k") == {"version": 1}
            assert await client.ttl("mushroom:result:k") > 0  # written with the cache TTL
            used = [pipe.connection for pipe in cache.connections._pipes]
            assert len(used) == 1, "one connection for commands one after another"
            redis_server.stop()
            with pytest.raises((RedisConnectionError, OSError)):
                await cache.connections.command("GET", "mushroom:result:k")
            assert cache.connections._pipes == [], "the failed connection is dropped"
            assert await cache.get("mushroom:result:k") is None  # Redis down: served uncached, counted
            assert cache.breaker.failures == 1
            redis_server.start()
            await cache.put("mushroom:result:k", {"version": 2})
            assert await cache.get("mushroom:result:k") == {"version": 2}
            assert [pipe.connection for pipe in cache.connections._pipes] != used
        finally:
            await cache.close()
            await client.aclose()

    with RedisServer() as redis_server:
        asyncio.run(scenario(redis_server))


def test_a_cache_command_to_a_frozen_redis_ends_at_the_clients_socket_timeout():
    import signal
    import time

    import redis.asyncio as aioredis

    from services.gateway.cache import ResultCache
    from tests.support import RedisServer

    async def scenario(redis_server):
        client = aioredis.from_url(redis_server.url, socket_timeout=0.2, socket_connect_timeout=0.2)
        cache = ResultCache(client, ttl_seconds=60)
        try:
            await cache.put("mushroom:result:k", {"version": 1})
            redis_server.process.send_signal(signal.SIGSTOP)
            try:
                start = time.monotonic()
                assert await cache.get("mushroom:result:k") is None  # served uncached
                assert time.monotonic() - start < 2.0  # one deadline of 0.2 s, generously bounded
                while cache.connections._pipes and time.monotonic() - start < 2.0:  # its reader times out too
                    await asyncio.sleep(0.05)
                assert cache.breaker.failures == 1 and cache.connections._pipes == []
            finally:
                redis_server.process.send_signal(signal.SIGCONT)
            assert await cache.get("mushroom:result:k") == {"version": 1}
        finally:
            await cache.close()
            await client.aclose()

    with RedisServer() as redis_server:
        asyncio.run(scenario(redis_server))


def on_command_connections(scenario, socket_timeout: float, max_connections: int):
    """``scenario(redis_server, connections)``'s result, run against a real redis-server through the cache's
    CommandConnections (a client with this socket timeout, at most ``max_connections``), closed afterwards."""
    import redis.asyncio as aioredis

    from services.gateway.cache import CommandConnections
    from tests.support import RedisServer

    async def run(redis_server):
        client = aioredis.from_url(redis_server.url, socket_timeout=socket_timeout,
                                   socket_connect_timeout=socket_timeout)
        connections = CommandConnections(client, max_connections=max_connections)
        try:
            await client.set("k", "v")
            assert await connections.command("GET", "k") == b"v"
            return await scenario(redis_server, connections)
        finally:
            await connections.close()
            await client.aclose()

    with RedisServer() as redis_server:
        return asyncio.run(run(redis_server))


def test_pipelined_cache_commands_each_get_their_own_reply():
    """Many commands at once on at most two connections: each gets its own reply, also when a caller leaves before
    its reply or a command gets an error reply; a Redis that freezes fails every command waiting, within the socket
    timeout, and the next command opens a new connection."""
    import signal
    import time

    import redis.asyncio as aioredis

    async def scenario(redis_server, connections):
        client = aioredis.from_url(redis_server.url)
        try:
            await client.mset({f"k{i}": f"v{i}" for i in range(400)})
            await client.hset("a-hash", "field", "value")
            commands = [("GET", f"k{i}") if i % 50 else ("GET", "a-hash") for i in range(400)]
            tasks = [asyncio.create_task(connections.command(*command)) for command in commands]
            for task in tasks[1::7]:  # callers that leave before their reply
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert 1 <= len(connections._pipes) <= 2
            for i, (task, result) in enumerate(zip(tasks, results)):
                if task.cancelled():
                    continue
                if i % 50 == 0:  # GET on a hash: an error reply, its command's alone
                    assert isinstance(result, aioredis.ResponseError) and "WRONGTYPE" in str(result)
                else:
                    assert result == f"v{i}".encode(), (i, result)
            assert await connections.command("GET", "k7") == b"v7"  # still in step
            redis_server.process.send_signal(signal.SIGSTOP)
            try:
                start = time.monotonic()
                waiting = await asyncio.gather(*(connections.command("GET", f"k{i}") for i in range(50)),
                                               return_exceptions=True)
                assert all(isinstance(result, aioredis.RedisError) for result in waiting), waiting
                assert time.monotonic() - start < 2.0  # a read timeout of 0.3 s, generously bounded
                while connections._pipes and time.monotonic() - start < 2.0:  # its reader's read times out too
                    await asyncio.sleep(0.05)
                assert connections._pipes == []
            finally:
                redis_server.process.send_signal(signal.SIGCONT)
            assert await connections.command("GET", "k9") == b"v9"
        finally:
            await client.aclose()

    on_command_connections(scenario, socket_timeout=0.3, max_connections=2)


def test_cache_commands_answered_while_the_gateway_was_too_busy_to_read_them_do_not_fail():
    """The gateway's loop held up past the socket timeout (a burst of requests, the process descheduled) while
    Redis answered: the timers fired before the replies waiting in the socket were read, and every lookup failed,
    each a miss sent to the model server. Only Redis's silence fails them now."""
    import time

    async def scenario(redis_server, connections):
        lookups = [asyncio.create_task(connections.command("GET", "k")) for _ in range(50)]
        await asyncio.sleep(0)  # all written
        time.sleep(1.0)  # the loop busy elsewhere, five timeouts long, while Redis answers
        return await asyncio.gather(*lookups, return_exceptions=True)

    assert on_command_connections(scenario, socket_timeout=0.2, max_connections=1) == [b"v"] * 50


def test_cache_commands_never_wait_for_a_connection_opening_while_one_is_connected():
    """A burst of lookups on a busy gateway: the first kept its connection busy, so the next opened another, and it
    and every lookup after it waited for that connect (the connection with the fewest commands waiting, none yet).
    The loop too busy to finish the connect within the socket timeout, all of them failed, and the breaker sent the
    rest of the burst to the model server. They go to the connected one now; the other opens beside them, and
    once such a connect failed, no other is tried beside for a while (each would be one more connection)."""
    import time

    async def scenario(redis_server, connections):
        lookups = [asyncio.create_task(connections.command("GET", "k")) for _ in range(50)]
        await asyncio.sleep(0)  # each chose its connection, and a second one is opening
        await asyncio.sleep(0)  # its connect under way
        time.sleep(1.0)  # the loop busy elsewhere, five timeouts long, while Redis answers
        answers = await asyncio.gather(*lookups, return_exceptions=True)
        opened_beside = len(connections._pipes)  # the second connect failed: the loop was too busy
        answers += await asyncio.gather(*(connections.command("GET", "k") for _ in range(50)))
        return answers, opened_beside, len(connections._pipes)

    answers, opened_beside, after = on_command_connections(scenario, socket_timeout=0.2, max_connections=2)
    assert answers == [b"v"] * 100 and opened_beside == after == 1


def test_cache_commands_behind_slow_ones_wait_while_redis_answers():
    """Six commands of 0.15 s each written at once, with a socket timeout of 0.5 s: Redis answers all along, so the
    last waits 0.9 s and is answered, on the same connection, which carries the next command. Only Redis's silence
    for the timeout fails the commands waiting (test_pipelined_cache_commands_each_get_their_own_reply)."""
    import time

    busy = ("EVAL", "local s = redis.call('TIME') local t0 = s[1] * 1e6 + s[2] "
            "repeat local n = redis.call('TIME') until n[1] * 1e6 + n[2] - t0 > 150000 return 1", "0")

    async def scenario(redis_server, connections):
        [pipe] = connections._pipes
        start = time.monotonic()
        assert await asyncio.gather(*(connections.command(*busy) for _ in range(6))) == [1] * 6
        assert time.monotonic() - start > 0.85  # longer than the timeout
        assert await connections.command("GET", "k") == b"v" and connections._pipes == [pipe]

    on_command_connections(scenario, socket_timeout=0.5, max_connections=1)


@pytest.mark.parametrize("code, status, error", [
    ("INVALID_ARGUMENT", 400, "rejected_by_model_server"),
    ("FAILED_PRECONDITION", 400, "rejected_by_model_server"),
    ("INTERNAL", 502, "model_server_error"),
    ("UNKNOWN", 502, "model_server_error"),
    ("DATA_LOSS", 502, "model_server_error"),
])
def test_a_model_server_failure_is_a_502_and_only_its_refusals_are_400s(code, status, error):
    """INVALID_ARGUMENT and FAILED_PRECONDITION refuse what was asked: the client's 4xx. INTERNAL, UNKNOWN and the
    like are the model server failing: a 5xx, which the error rates (and a rollout's verdict) count as failures."""
    import grpc as grpc_lib

    from services.gateway.errors import GatewayError
    from services.gateway.upstream import UpstreamRejected

    async def failing():
        raise UpstreamRejected(getattr(grpc_lib.StatusCode, code), "what the model server said")

    gateway = classifier.Classifier.__new__(classifier.Classifier)
    with pytest.raises(GatewayError) as err:
        asyncio.run(gateway._ask_upstream(failing, None))
    assert (err.value.status, err.value.code) == (status, error)


def test_a_version_and_a_label_together_are_refused_not_one_ignored():
    """?version=1&label=canary named two versions; the label was ignored without a word. gRPC's request makes them a
    oneof; HTTP refuses both at once."""
    from services.gateway.errors import GatewayError

    gateway = classifier.Classifier.__new__(classifier.Classifier)
    with pytest.raises(GatewayError) as err:  # the checks classify runs before any work
        gateway._validate(_jpeg((8, 8)), 1, None, version=1, label="canary", client_id=None)
    assert (err.value.status, err.value.code) == (400, "bad_version")


class _Answering:
    """A classifier's model server whose Predict is ``predict`` (a coroutine function), with a cache that finds
    nothing, a router choosing version 1 and real Stats: what a classify records is what the tests read."""

    def __init__(self, predict):
        from types import SimpleNamespace

        from services.gateway.stats import Stats
        from training_job.preprocessing import Limits

        class Upstream:
            model_name = "mushrooms"

            async def input_size(self, version, label=None):
                return version, 224

        class Cache:
            async def get(self, key, usable=None):
                return None

            async def put(self, key, value):
                pass

        upstream = Upstream()
        upstream.predict = predict
        router = SimpleNamespace(available={1}, choose=lambda client: (1, "latest"), shadow_version=lambda: None)
        self.stats = Stats(None, "mushrooms")
        self.classifier = classifier.Classifier(upstream, Cache(), router, self.stats,
                                                SimpleNamespace(display_names=lambda version: {}), Limits(),
                                                SingleFlight(), KnownFacts())


def _classify_count(result: str) -> float:
    """mushroom_gateway_request_seconds_count of a gRPC classify miss answered by version 1 with ``result``."""
    from services.gateway import metrics

    return metrics.REGISTRY.get_sample_value("mushroom_gateway_request_seconds_count", {
        "protocol": "grpc", "endpoint": "classify", "model_version": "1", "cache": "miss", "result": result}) or 0.0


def test_a_classify_failing_on_a_bug_is_an_internal_error_of_its_version():
    """A failure that is no GatewayError (here a version's answer without mushroom_score: a KeyError, which aiohttp
    answers 500 and gRPC UNKNOWN) is recorded as result="internal_error", not "ok", and counts in the version's error
    rate (/v1/admin/status, which the rollout judge reads)."""
    async def predict(pixels, version, label):
        outputs = {"probabilities": [[0.25, 0.75]], "classes": [["a", "b"]]}
        return [outputs["mushroom_score"]]

    answering = _Answering(predict)
    ok, failed = _classify_count("ok"), _classify_count("internal_error")
    with pytest.raises(KeyError):
        asyncio.run(answering.classifier.classify(_jpeg((64, 48)), protocol="grpc"))
    assert (_classify_count("ok") - ok, _classify_count("internal_error") - failed) == (0, 1)
    assert (answering.stats.versions[1].requests, answering.stats.versions[1].errors) == (1, 1)


def test_a_classify_the_client_left_is_cancelled_not_ok():
    """A gRPC deadline or a cancelled call cancels the classify while it waits for the model server: recorded as
    result="cancelled", not "ok", and not as the version's error (the client left; the version did not fail)."""
    asked = asyncio.Event()

    async def predict(pixels, version, label):
        asked.set()
        await asyncio.Event().wait()  # a model server that has not answered yet

    answering = _Answering(predict)
    ok, cancelled = _classify_count("ok"), _classify_count("cancelled")

    async def scenario():
        call = asyncio.create_task(answering.classifier.classify(_jpeg((48, 64)), protocol="grpc"))
        await asyncio.wait_for(asked.wait(), 10)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(scenario())
    assert (_classify_count("ok") - ok, _classify_count("cancelled") - cancelled) == (0, 1)
    assert getattr(answering.stats.versions.get(1), "errors", 0) == 0  # no figures, or no error among them


def _responses(protocol: str, code: str) -> float:
    from services.gateway import metrics

    return metrics.REGISTRY.get_sample_value("mushroom_gateway_responses_total",
                                             {"protocol": protocol, "code": code}) or 0.0


async def _failing_classify(photo, **options):
    raise KeyError("mushroom_score")  # a bug: no GatewayError


def test_an_http_request_failing_on_a_bug_is_a_json_500_and_counted():
    """The HTTP API's app counts each response by status, the 500 of an exception nothing answered included (its
    classifier here fails with a KeyError): the gateway's JSON error, ``internal_error``, as every other error."""
    from types import SimpleNamespace

    from aiohttp.test_utils import TestClient, TestServer

    from services.gateway.http_api import HttpApi
    from services.gateway.operators import OperatorTokens

    api = HttpApi(SimpleNamespace(classify=_failing_classify), None, None, None, OperatorTokens(), 1024 * 1024,
                  lambda: (True, "ok"))

    async def scenario():
        async with TestClient(TestServer(api.app())) as client:
            failed, healthy = _responses("http", "500"), _responses("http", "200")
            failing = await client.post("/v1/classify", data=_jpeg((8, 8)), headers={"Content-Type": "image/jpeg"})
            assert failing.status == 500 and failing.content_type == "application/json"
            assert (await failing.json())["error"]["code"] == "internal_error"
            assert (await client.get("/healthz")).status == 200
            assert (_responses("http", "500") - failed, _responses("http", "200") - healthy) == (1, 1)

    asyncio.run(scenario())


def test_grpc_calls_failing_on_a_bug_or_naming_no_method_are_counted_by_their_status():
    """UNKNOWN for a Classify whose classifier fails with a KeyError (what gRPC answers an exception with),
    UNIMPLEMENTED for a method the server does not have."""
    import grpc as grpc_lib
    from types import SimpleNamespace

    from devstack.servers import free_port
    from services.gateway.grpc_api import build_server, pb

    async def scenario():
        port = free_port()
        server, _ = build_server(SimpleNamespace(classify=_failing_classify), None, None, "127.0.0.1", port)
        await server.start()
        try:
            unknown, unimplemented = _responses("grpc", "UNKNOWN"), _responses("grpc", "UNIMPLEMENTED")
            async with grpc_lib.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                classify = channel.unary_unary("/mushroom.v1.Classifier/Classify",
                                               request_serializer=pb.ClassifyRequest.SerializeToString,
                                               response_deserializer=pb.ClassifyResponse.FromString)
                nothing = channel.unary_unary("/mushroom.v1.Classifier/NoSuchMethod")
                for call, code in ((classify(pb.ClassifyRequest(photo=_jpeg((8, 8)))), "UNKNOWN"),
                                   (nothing(b""), "UNIMPLEMENTED")):
                    with pytest.raises(grpc_lib.aio.AioRpcError) as failed:
                        await call
                    assert failed.value.code().name == code
            assert (_responses("grpc", "UNKNOWN") - unknown, _responses("grpc", "UNIMPLEMENTED") - unimplemented) \
                == (1, 1)
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_a_caller_leaving_at_its_deadline_is_counted_deadline_exceeded_though_our_clock_is_behind():
    """The caller's deadline runs from the moment it sent the call, ours from the moment we received it, so when its
    RST_STREAM arrives our clock may still show a few milliseconds left: that caller left because of its deadline.
    A caller leaving long before its deadline, or without one, cancelled."""
    import grpc as grpc_lib
    from types import SimpleNamespace

    from services.gateway.grpc_api import _ended_by

    def left_with(remaining):
        return _ended_by(asyncio.CancelledError(), SimpleNamespace(time_remaining=lambda: remaining))

    assert [left_with(remaining) for remaining in (-0.01, 0.0, 0.004, 0.05)] == \
        [grpc_lib.StatusCode.DEADLINE_EXCEEDED] * 4
    assert [left_with(remaining) for remaining in (5.0, None)] == [grpc_lib.StatusCode.CANCELLED] * 2


def test_only_classify_ends_when_its_client_closes_the_connection():
    """The gateway's HTTP server cancels a request whose client closed its connection (aiohttp's
    handler_cancellation), which stops a classify's work; any other route's handler runs to its end regardless
    (``finish_what_was_started``), here a slow one standing for a routing change."""
    from aiohttp import web

    from services.gateway.http_api import ends_with_its_client, finish_what_was_started

    started, finished, cancelled = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow(request):
        started.set()
        await asyncio.sleep(0.3)
        finished.set()
        return web.json_response({})

    @ends_with_its_client
    async def classify(request):
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def scenario():
        app = web.Application(middlewares=[finish_what_was_started])
        app.router.add_put("/v1/admin/routing", slow)
        app.router.add_post("/v1/classify", classify)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            for method, path, outcome in (("PUT", "/v1/admin/routing", finished), ("POST", "/v1/classify", cancelled)):
                started.clear()
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(f"{method} {path} HTTP/1.1\r\nHost: gateway\r\nContent-Length: 0\r\n\r\n".encode())
                await asyncio.wait_for(started.wait(), 5)
                writer.close()  # the client leaves before the answer
                await asyncio.wait_for(outcome.wait(), 5)
            assert finished.is_set() and cancelled.is_set()
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_the_classes_feedback_is_checked_against_are_those_of_the_model_that_answered():
    """A feedback token names the model behind its version number: the classes of that model, else None (checked
    against nothing) when another model holds the number now, however the classes are found."""
    from types import SimpleNamespace

    from training_job.preprocessing import Limits

    class TwoVersions:
        """Version 6's model "current" is known; version 5's model is "learnt" once the model server is asked."""

        def last_known(self, version):
            return Facts(6, 224, "current", ("c", "d")) if version == 6 else None

        async def of(self, version, timeout=None):
            return Facts(version, 224, "learnt", ("e", "f"))

    registry = SimpleNamespace(class_names=lambda version: [{"label": "r"}, {"label": "s"}])
    gateway = classifier.Classifier(SimpleNamespace(model_name="mushrooms"), None, None, None, registry, Limits(),
                                    SingleFlight(), TwoVersions())

    def classes(version, identity=None):
        return asyncio.run(gateway.classes_of(version, identity))

    assert (classes(6), classes(6, "current"), classes(6, "former")) == (["c", "d"], ["c", "d"], None)
    assert (classes(5), classes(5, "learnt"), classes(5, "former")) == (["r", "s"], ["e", "f"], None)


def test_a_cache_entry_is_read_only_when_it_holds_what_an_answer_is_made_of():
    from services.gateway.classifier import readable_answer

    answer = {"version": 2, "classes": ["a", "b"], "probabilities": [0.75, 0.25], "mushroom_score": 1.5,
              "not_a_mushroom": False}
    explained = {**answer, "explanation": {"class_index": 1, "heatmap": [[0.0, 1.0], [0.5, 0.25]]}}
    assert readable_answer(answer, False) and readable_answer(explained, True) and readable_answer(explained, False)
    assert not readable_answer(answer, True)  # an explanation's key holds one
    for damaged in ({**answer, "version": "2"}, {**answer, "classes": []}, {**answer, "probabilities": [1.0]},
                    {**answer, "probabilities": [0.5, None]}, {**answer, "not_a_mushroom": 0},
                    {k: v for k, v in answer.items() if k != "mushroom_score"}):
        assert not readable_answer(damaged, False), damaged
    for explanation in ({"class_index": 2, "heatmap": [[0.0]]}, {"class_index": 1.0, "heatmap": [[0.0]]},
                        {"class_index": 0, "heatmap": [[0.0], [0.0, 1.0]]}, {"class_index": 0, "heatmap": []},
                        {"class_index": 0}):
        assert not readable_answer({**answer, "explanation": explanation}, True), explanation


def test_a_grpc_request_that_does_not_parse_is_invalid_argument_and_counted():
    """Bytes that are no ClassifyRequest (a client built from another proto, a string field that is not UTF-8): the
    client's error, INVALID_ARGUMENT naming the message, counted as one, on a unary call and on a stream's frame."""
    import grpc as grpc_lib
    from types import SimpleNamespace

    from devstack.servers import free_port
    from services.gateway.grpc_api import build_server

    async def scenario():
        port = free_port()
        server, _ = build_server(SimpleNamespace(classify=_failing_classify), None, None, "127.0.0.1", port)
        await server.start()
        try:
            invalid = _responses("grpc", "INVALID_ARGUMENT")
            async with grpc_lib.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                classify = channel.unary_unary("/mushroom.v1.Classifier/Classify")
                stream = channel.stream_stream("/mushroom.v1.Classifier/ClassifyStream")
                not_utf8 = b"\x12\x02\xff\xfe"  # field 2 (client_id), 2 bytes that are not UTF-8
                for call in (classify(b"\xff\xff\xff\xff"), classify(not_utf8), stream(iter([not_utf8]))):
                    with pytest.raises(grpc_lib.aio.AioRpcError) as failed:
                        if hasattr(call, "__aiter__"):
                            async for _ in call:
                                pass
                        else:
                            await call
                    assert failed.value.code().name == "INVALID_ARGUMENT", failed.value
                    assert "not a valid mushroom.v1.ClassifyRequest" in failed.value.details()
            assert _responses("grpc", "INVALID_ARGUMENT") - invalid == 3
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_a_large_base64_photo_is_decoded_handing_the_event_loop_back_between_slices():
    """binascii holds the GIL for a whole decode: a JSON photo at the size limit decoded at once held every other
    request of the gateway for all of it. Decoded a slice at a time, the loop runs other work between slices; the
    bytes and the refusals are those of one base64.b64decode(validate=True)."""
    import base64
    import binascii
    import os

    from services.gateway.http_api import BASE64_SLICE_CHARS, decoded_base64

    photo = os.urandom(4 * BASE64_SLICE_CHARS + 5)  # five slices of base64, the last padded
    text = base64.b64encode(photo).decode()

    async def decode_beside_another_task(encoded: str):
        turns, decoding = 0, True

        async def other():
            nonlocal turns
            while decoding:
                turns += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(other())
        await asyncio.sleep(0)
        before = turns
        try:
            return await decoded_base64(encoded), turns - before
        finally:
            decoding = False
            await task

    decoded, turns = asyncio.run(decode_beside_another_task(text))
    assert decoded == photo
    assert turns >= 4, "the decode held the event loop throughout"
    for bad in (text[:-1],  # not a multiple of 4
                text[:BASE64_SLICE_CHARS - 4] + "AA==" + text[BASE64_SLICE_CHARS:],  # padding before the end
                text[:10] + "*" + text[11:],  # outside the alphabet
                text[:10] + "é" + text[11:]):  # outside ASCII
        with pytest.raises((binascii.Error, ValueError)):
            base64.b64decode(bad, validate=True)
        with pytest.raises((binascii.Error, ValueError)):
            asyncio.run(decode_beside_another_task(bad))
