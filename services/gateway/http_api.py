"""HTTP JSON API (see DEVELOPERS.md "Gateway HTTP API" and /openapi.json) and the web page's static files."""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from services.gateway import metrics
from services.gateway.bodies import SMALL_BODY_BYTES, body_deadline, read_form_file, read_json, read_limited
from services.gateway.classifier import DEFAULT_TOP_K, Classifier
from services.gateway.errors import GatewayError, redis_unavailable
from services.gateway.feedback_intake import take_feedback
from services.gateway.model_info import ModelInfo
from services.gateway.openapi import OPENAPI
from services.gateway.operators import OperatorTokens
from services.gateway.photo_store import PhotoStore
from services.gateway.rollout_proxy import RolloutProxy
from services.gateway.routing import (
    LeaseNotHeld, Router, RoutingChanged, RoutingError, RoutingTable, VersionUnusable,
)
from services.gateway.stats import Stats
from services.gateway.upstream import UpstreamUnavailable, state_name
from services.http_errors import with_json_errors
from services.http_stop import close_connections_when

log = logging.getLogger("gateway.http")
WEB_DIR = Path(__file__).resolve().parent / "web"
PHOTO_FIELDS = ("photo", "file", "image")  # multipart field names of the photo
FORM_OVERHEAD_BYTES = 64 * 1024  # what a multipart or JSON body may hold besides the photo
# The values a classify JSON body may hold: image_b64 and the options (_json_options), a data: URL's own ',' and ':',
# and room for strings that hold some (bodies.read_json counts them before parsing).
JSON_BODY_VALUES = 1024


def _error_response(exc: GatewayError) -> web.Response:
    headers = {**exc.headers, **({"Retry-After": str(exc.retry_after)} if exc.retry_after else {})}
    return web.json_response(exc.body(), status=exc.status, headers=headers)


@web.middleware
async def errors_as_json(request: web.Request, handler):
    async def answered(request: web.Request):
        try:
            return await handler(request)
        except GatewayError as exc:
            return _error_response(exc)
        except RedisError as exc:  # admin and feedback state
            return _error_response(redis_unavailable(exc))
    return await with_json_errors(request, answered, log, "gateway")


def ends_with_its_client(handler):
    """Marks a route's handler as one whose work stops when its client closes the connection: the server runs with
    aiohttp's ``handler_cancellation``, which cancels the request on a closed connection. Every other handler
    finishes what it started (``finish_what_was_started``)."""
    handler.ends_with_its_client = True
    return handler


@web.middleware
async def finish_what_was_started(request: web.Request, handler):
    """The handler of a route not marked ``ends_with_its_client`` runs to its end even when the client leaves
    meanwhile, as if no connection had closed: a routing change or a feedback is never cut off half way by it."""
    if getattr(request.match_info.handler, "ends_with_its_client", False):
        return await handler(request)
    work = asyncio.ensure_future(handler(request))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        if not work.done():
            work.add_done_callback(_outcome_read)
        raise


def _outcome_read(work: asyncio.Future) -> None:
    if not work.cancelled():
        work.exception()  # read, so a handler whose client left logs no "exception was never retrieved"


async def count_response(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: each response the app sends is one count of mushroom_gateway_responses_total by its
    status, whatever made it: a handler, errors_as_json, or aiohttp's 500 for an exception nothing answered. (A
    request aiohttp cannot parse is answered before any app sees it: not counted.)"""
    metrics.child(metrics.RESPONSES, protocol="http", code=str(response.status)).inc()


def _int_param(request: web.Request, name: str, default: int | None) -> int | None:
    raw = request.query.get(name) or request.headers.get(f"X-{name.replace('_', '-').title()}")
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise GatewayError(400, f"bad_{name}", f"{name} must be an integer, got {raw!r}") from None


# Envoy's header telling the upstream how long the route waits for its answer, "so that the upstream host receiving
# the request can make decisions based on the request timeout, e.g., early exit" (Istio, and so KServe, send it).
EXPECTED_TIMEOUT_HEADER = "x-envoy-expected-rq-timeout-ms"


def _expected_timeout(request: web.Request) -> float | None:
    """Seconds the caller waits once its request has arrived whole (Envoy starts its route timeout at the end of the
    downstream request), when its proxy says (EXPECTED_TIMEOUT_HEADER; 0, Envoy's "no timeout", or no header:
    None)."""
    raw = request.headers.get(EXPECTED_TIMEOUT_HEADER)
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit():
        raise GatewayError(400, "bad_timeout", f"{EXPECTED_TIMEOUT_HEADER} must be a whole number of milliseconds, "
                           f"got {raw[:40]!r}")
    return int(raw) / 1000 or None


def _bool_param(request: web.Request, name: str) -> bool | None:
    raw = request.query.get(name)
    if raw in (None, ""):
        return None
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise GatewayError(400, f"bad_{name}", f"{name} must be 1/true or 0/false, got {raw[:40]!r}")


JSON_OPTIONS = {"top_k": int, "version": int, "label": str, "client_id": str, "explain": bool,
                "explain_class": str}  # besides image_b64
_KIND_NAMES = {int: "integer", str: "string", bool: "boolean (true or false)"}


def _json_options(data: dict) -> dict:
    """The classify options of a JSON body: the query string's ``top_k``, ``version``, ``label``, ``client_id``,
    ``explain`` and ``explain_class``, as JSON integers, strings or booleans; any other field is refused, so a
    misspelt option never goes unnoticed. Their values are checked further on exactly as the query string's are."""
    unknown = sorted(set(data) - {"image_b64", *JSON_OPTIONS})
    if unknown:
        raise GatewayError(400, "unknown_field", f"unknown fields {unknown}: a JSON body holds image_b64 and "
                           f"optionally {', '.join(JSON_OPTIONS)}")
    options = {}
    for name, kind in JSON_OPTIONS.items():
        if name not in data:
            continue
        value = data[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise GatewayError(400, f"bad_{name}", f"{name} must be a JSON {_KIND_NAMES[kind]}, got "
                               f"{json.dumps(value)[:40]}")
        options[name] = value
    return options


def _base64_payload(encoded: str) -> str:
    """The base64 of ``encoded``, which may come as a data: URL (``data:image/jpeg;base64,...``, what a browser's
    FileReader.readAsDataURL gives) and in MIME's lines (Python's base64.encodebytes, `base64` without -w0), their
    line breaks dropped; raises ValueError for a data: URL of another encoding."""
    if encoded.startswith("data:"):
        header, comma, encoded = encoded.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ValueError("a data: URL without ;base64")
    return "".join(encoded.split()) if "\n" in encoded else encoded


# Base64 decoded at a time, the event loop handed back in between: binascii holds the GIL throughout a decode, so a
# photo at the size limit decoded whole kept every other request of the gateway waiting for all of it. A multiple
# of 4, so that each slice but the last decodes whole.
BASE64_SLICE_CHARS = 1024 * 1024


async def decoded_base64(text: str) -> bytes:
    """``base64.b64decode(text, validate=True)``, a slice of BASE64_SLICE_CHARS at a time: the same bytes, and the
    same refusals (binascii.Error, or ValueError for a character outside ASCII), padding included."""
    if len(text) <= BASE64_SLICE_CHARS:
        return base64.b64decode(text, validate=True)
    slices = []
    for start in range(0, len(text), BASE64_SLICE_CHARS):
        piece = text[start:start + BASE64_SLICE_CHARS]
        if "=" in piece and start + BASE64_SLICE_CHARS < len(text):  # whole, data after its padding is refused
            raise binascii.Error("excess data after padding")
        slices.append(base64.b64decode(piece, validate=True))
        await asyncio.sleep(0)
    return b"".join(slices)


class HttpApi:
    def __init__(self, classifier: Classifier, router: Router, stats: Stats, model_info: ModelInfo,
                 operators: OperatorTokens, max_body: int, ready, body_timeout: float = 60.0,
                 rollout: RolloutProxy | None = None, photo_store: PhotoStore | None = None,
                 closing: Callable[[], bool] = lambda: False):
        self.rollout = rollout or RolloutProxy(None)  # the rollout controller's API, for the operator panel
        self.photo_store = photo_store  # opt-in: photos kept by hash so corrections become training data
        self.classifier = classifier
        self.router = router
        self.stats = stats
        self.model_info = model_info
        self.operators = operators
        self.max_body = max_body
        self.ready = ready  # callable -> (bool, reason)
        self.body_timeout = body_timeout  # seconds a request's body may take to arrive (0 = no limit)
        self.closing = closing  # () -> True once the gateway is stopping: answers close their connections

    def app(self) -> web.Application:
        # Bodies are read through bodies.py, which decodes and counts their bytes (413) and answers what does not
        # decode or parse with a 400; client_max_size bounds request.read(), which no route calls.
        app = web.Application(client_max_size=SMALL_BODY_BYTES,
                              middlewares=[finish_what_was_started, errors_as_json, body_deadline(self.body_timeout)])
        app.on_response_prepare.append(count_response)
        app.on_response_prepare.append(close_connections_when(self.closing))
        r = app.router
        r.add_post("/v1/classify", self.classify)
        r.add_get("/v1/models", self.models)
        r.add_post("/v1/feedback", self.feedback)
        r.add_get("/v1/demo", self.demo)
        r.add_get("/v1/demo/photos/{sha256}", self.demo_photo)
        r.add_get("/v1/admin/routing", self.get_routing)
        r.add_put("/v1/admin/routing", self.put_routing)
        r.add_get("/v1/admin/audit", self.audit)
        r.add_get("/v1/admin/status", self.status)
        self.rollout.add_routes(app, self._authorise, self.router)  # commands audited here too
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/openapi.json", self.openapi)
        if WEB_DIR.is_dir():
            r.add_get("/", self.index)
            r.add_static("/static", WEB_DIR)
        return app

    # ------------------------------------------------------------------ classify
    def _body_limit(self, content_type: str) -> int:
        """The most bytes a classify body of this type may hold for a photo of at most --max-bytes."""
        if content_type.startswith("multipart/"):
            return self.max_body + FORM_OVERHEAD_BYTES
        if content_type == "application/json":
            return 4 * -(-self.max_body // 3) + FORM_OVERHEAD_BYTES  # base64 makes 3 bytes into 4 characters
        return self.max_body

    async def _upload(self, request: web.Request) -> tuple[bytes, dict]:
        """The photo, and the options a JSON body gave (see _json_options)."""
        content_type = request.content_type
        limit = self._body_limit(content_type)
        if request.content_length and request.content_length > limit:
            raise GatewayError(413, "too_large", f"the body is {request.content_length} bytes; the limit is "
                               f"{limit}")
        if content_type.startswith("multipart/"):
            return await read_form_file(request, PHOTO_FIELDS, self.max_body, limit), {}
        if content_type != "application/json":
            body = await read_limited(request, limit, "the body")
            if body[:1] == b"{" and body.rstrip()[-1:] == b"}":  # a JSON object: no photo format starts so
                raise GatewayError(400, "not_an_image", f"the body is a JSON object sent as {content_type!r}: send "
                                   "JSON bodies with Content-Type: application/json")
            return body, {}
        data = await read_json(request, limit, JSON_BODY_VALUES)
        encoded = data.get("image_b64") if isinstance(data, dict) else None
        if not isinstance(encoded, str):
            raise GatewayError(400, "missing_photo", 'JSON bodies need {"image_b64": "<base64 photo>"}')
        options = _json_options(data)
        try:
            return await decoded_base64(_base64_payload(encoded)), options
        except (binascii.Error, ValueError):
            raise GatewayError(400, "bad_base64", "image_b64 is not valid standard base64 (RFC 4648 section 4: "
                               "A-Z, a-z, 0-9, + and /, padded with =; line breaks allowed), bare or as a data: "
                               "URL") from None

    @ends_with_its_client
    async def classify(self, request: web.Request) -> web.Response:
        """A client closing its connection cancels its classify (as a gRPC caller's deadline does): the miss it
        started is dropped unless another request waits for the same answer (single_flight.py)."""
        timeout = _expected_timeout(request)
        photo, given = await self._upload(request)
        deadline = None if timeout is None else time.monotonic() + timeout
        options = {"top_k": _int_param(request, "top_k", None), "version": _int_param(request, "version", None),
                   "label": request.query.get("label") or request.headers.get("X-Version-Label"),
                   "client_id": request.headers.get("X-Client-Id") or request.query.get("client_id"),
                   "explain": _bool_param(request, "explain"), "explain_class": request.query.get("explain_class")}
        for name, value in given.items():
            if options[name] is not None:
                raise GatewayError(400, f"bad_{name}", f"{name} is given both in the JSON body and in the query "
                                   "string or a header: give it once")
            options[name] = value
        answer = await self.classifier.classify(
            photo, client_id=options["client_id"],
            top_k=DEFAULT_TOP_K if options["top_k"] is None else options["top_k"],
            version=options["version"], label=options["label"], protocol="http",
            explain=bool(options["explain"]), explain_class=options["explain_class"] or None, deadline=deadline)
        if self.photo_store is not None:
            answer = await self.photo_store.keep(photo, answer)
        return web.json_response(answer)

    # ------------------------------------------------------------------ models, feedback, demo
    async def models(self, request: web.Request) -> web.Response:
        states = await self.classifier.version_states()
        router = self.router
        return web.json_response({"models": [{
            "name": self.router.model_name,
            "versions": [{"version": v, "state": state_name(s),
                          "weight": router.version_weights().get(v, 0.0),
                          "identity": self.classifier.identity_of(v),
                          "labels": self.model_info.class_names(v),
                          **({"unusable": router.unusable[v]} if v in router.unusable else {})}
                         for v, s in sorted(states.items())],
            "routing": router.describe(),
        }]})

    async def feedback(self, request: web.Request) -> web.Response:
        data = await read_json(request, SMALL_BODY_BYTES)
        if not isinstance(data, dict) or not isinstance(data.get("feedback_token"), str) or not isinstance(
                data.get("true_label"), str):
            raise GatewayError(400, "bad_feedback", 'feedback is {"feedback_token": "<the answer\'s '
                               'feedback_token>", "true_label": "..."} (request_id optional)')
        recorded = await take_feedback(self.stats, self.photo_store, self.classifier.classes_of,
                                       data["feedback_token"], data["true_label"], data.get("request_id"))
        return web.json_response(recorded)

    def _demo_version(self) -> int:
        available = self.router.available
        if not available:
            raise GatewayError(503, "no_model", "no model version is AVAILABLE yet", retry_after=2)
        return max(available)

    async def demo(self, request: web.Request) -> web.Response:
        version = self._demo_version()
        photos = [{k: p[k] for k in ("sha256", "label", "display_name")}
                  for p in self.model_info.demo_photos(version)]
        return web.json_response({"model": {"name": self.router.model_name, "version": version},
                                  "photos": photos})

    async def demo_photo(self, request: web.Request) -> web.StreamResponse:
        sha = request.match_info["sha256"]
        for photo in self.model_info.demo_photos(self._demo_version()):
            if photo["sha256"] == sha and Path(photo["path"]).is_file():
                return web.FileResponse(photo["path"], headers={"Cache-Control": "max-age=3600"})
        raise GatewayError(404, "not_found", f"no demo photo {sha}")

    # ------------------------------------------------------------------ admin
    def _authorise(self, request: web.Request, write: bool) -> str:
        """The name of the operator whose bearer token this is. Reads are open only while no token exists."""
        if not self.operators.configured:
            if write:
                raise GatewayError(403, "admin_disabled", "no operator token is configured: routing changes are "
                                   "refused (start the gateway with --operator-tokens FILE or --admin-token)")
            return "anonymous"
        header = request.headers.get("Authorization", "")
        owner = self.operators.owner(header[7:] if header.startswith("Bearer ") else "")
        if owner is None:
            raise GatewayError(401, "unauthorised", "a valid 'Authorization: Bearer <operator token>' is required")
        return owner

    async def get_routing(self, request: web.Request) -> web.Response:
        """The stored table as Redis holds it now (not this replica's copy of up to half a second ago: a reader
        behind a load balancer compares it with what it wrote), its generation and who wrote it; while Redis cannot
        be read, this replica's last known table."""
        self._authorise(request, write=False)
        router = self.router
        try:
            await router.refresh()
        except (RedisError, RoutingError):  # the routing watcher logs and counts the same failure
            pass
        return web.json_response({**router.describe(), "available": sorted(router.available),
                                  "generation": router.stored_generation, "writer": router.stored_writer})

    async def put_routing(self, request: web.Request) -> web.Response:
        """``?expected_generation=N``: apply only while the stored table is generation N (from a GET), else 409
        routing_changed. ``X-Rollout-Lease``: the rollout controller's lease token, applied only while the
        controller holds that lease, else 409 lease_lost (``X-Rollout-Candidate``: the version its table rolls out).
        Without a token the change is an operator's, always applied; replacing a running rollout's table, it is an
        override, which the answer's ``rollout`` says (the controller pauses the rollout)."""
        who = self._authorise(request, write=True)
        expected = _int_param(request, "expected_generation", None)
        lease = request.headers.get("X-Rollout-Lease") or None
        candidate = _int_param(request, "rollout_candidate", None) if lease else None
        data = await read_json(request, SMALL_BODY_BYTES)
        try:
            table = RoutingTable.from_request(data)
            entry = await self.router.set_table(table, who, note=request.headers.get("X-Operator"),
                                                expected_generation=expected, lease=lease, candidate=candidate)
        except VersionUnusable as exc:
            raise GatewayError(400, "version_unusable", str(exc)) from None
        except RoutingError as exc:
            raise GatewayError(400, "bad_routing", str(exc)) from None
        except LeaseNotHeld as exc:
            raise GatewayError(409, "lease_lost", str(exc)) from None
        except RoutingChanged as exc:
            raise GatewayError(409, "routing_changed", str(exc)) from None
        except UpstreamUnavailable as exc:
            raise GatewayError(503, "model_server_unavailable", f"cannot check the labels: {exc}",
                               retry_after=2) from None
        answer = {**self.router.describe(), "audit": entry, "generation": self.router.stored_generation}
        if "rollout" in entry:
            overridden = entry["rollout"]
            answer["rollout"] = {**overridden, "paused": True, "message": (
                f"a rollout of v{overridden['candidate']} by the rollout controller {overridden['controller']} is "
                "running: this table overrides its step, so the rollout is paused at the controller's next tick and "
                "this table left in place until `operator_cli rollout resume` (the step's table again) or `abort`; "
                "a breach of its rules still rolls back")}
        return web.json_response(answer)

    async def audit(self, request: web.Request) -> web.Response:
        self._authorise(request, write=False)
        return web.json_response({"entries": await self.router.audit()})

    async def status(self, request: web.Request) -> web.Response:
        self._authorise(request, write=False)
        summary = await self.stats.summary()
        return web.json_response({**summary, "routing": self.router.describe()})

    # ------------------------------------------------------------------ operations
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ok, reason = self.ready()
        return web.json_response({"ready": ok, "reason": reason}, status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIR / "index.html")
