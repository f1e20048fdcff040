"""HTTP JSON API (aiohttp): POST /v1/classify (multipart, raw body or JSON base64), /healthz, /readyz."""
from __future__ import annotations

import base64
import binascii
import json

from aiohttp import web

from services.gateway.classify import ClassifyError, Classifier


def error(status: int, code: str, message: str, headers=None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


async def _photo(request: web.Request, max_bytes: int) -> bytes:
    if request.content_length is not None and request.content_length > max_bytes + 64 * 1024:
        raise ClassifyError(413, "too_large", f"the request body is over the {max_bytes}-byte limit")
    ctype = request.content_type
    if ctype.startswith("multipart/"):
        reader = await request.multipart()
        async for part in reader:
            if part.name == "photo":
                return bytes(await part.read())
        raise ClassifyError(400, "missing_photo", "multipart body has no 'photo' field")
    body = await request.read()
    if ctype == "application/json":
        try:
            payload = json.loads(body)
            data = payload["image_b64"]
            return base64.b64decode(data, validate=True)
        except (ValueError, UnicodeDecodeError):
            raise ClassifyError(400, "bad_json", "the JSON body or its base64 'image_b64' is malformed") from None
        except (KeyError, TypeError):
            raise ClassifyError(400, "bad_json", "the JSON body needs a string field 'image_b64'") from None
        except binascii.Error:
            raise ClassifyError(400, "bad_base64", "'image_b64' is not valid base64") from None
    return body


def _int_param(request: web.Request, name: str, default=None):
    value = request.query.get(name, request.headers.get(f"X-{name.replace('_', '-').title()}"))
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ClassifyError(400, f"bad_{name}", f"{name} must be an integer, got {value!r}") from None


def make_app(classifier: Classifier, max_bytes: int) -> web.Application:
    async def classify(request: web.Request) -> web.Response:
        try:
            photo = await _photo(request, max_bytes)
            answer = await classifier.classify(
                photo, top_k=_int_param(request, "top_k", 3), client_id=request.headers.get("X-Client-Id"),
                version=_int_param(request, "version"), label=request.query.get("label") or None)
        except ClassifyError as exc:
            return error(exc.status, exc.code, exc.message, {"Retry-After": "1"} if exc.status == 503 else None)
        except web.HTTPRequestEntityTooLarge:
            return error(413, "too_large", f"the request body is over the {max_bytes}-byte limit")
        return web.json_response(answer.to_json())

    async def healthz(request):
        return web.json_response({"status": "ok"})

    async def readyz(request):
        try:
            classifier.available = await classifier.upstream.available_versions()
        except Exception as exc:  # noqa: BLE001 - any upstream failure means not ready
            return error(503, "upstream_unavailable", str(exc), {"Retry-After": "1"})
        if not classifier.available:
            return error(503, "no_model", "no AVAILABLE model version", {"Retry-After": "1"})
        return web.json_response({"status": "ready", "versions": sorted(classifier.available)})

    app = web.Application(client_max_size=max_bytes + 64 * 1024)
    app.add_routes([web.post("/v1/classify", classify), web.get("/healthz", healthz), web.get("/readyz", readyz)])
    return app
