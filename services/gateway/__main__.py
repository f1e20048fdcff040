"""python -m services.gateway: the HTTP gateway in front of a TF-Serving-API model server."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os




def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="mushroom-gateway", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_server", default=env("GATEWAY_MODEL_SERVER", "127.0.0.1:8500"),
                   help="model server gRPC host:port (TF Serving API) [$GATEWAY_MODEL_SERVER]")
    p.add_argument("--model_name", default=env("GATEWAY_MODEL_NAME", "mushrooms"), help="[$GATEWAY_MODEL_NAME]")
    p.add_argument("--redis_url", default=env("GATEWAY_REDIS_URL", "redis://127.0.0.1:6379/0"),
                   help="Redis for the result cache and routing table [$GATEWAY_REDIS_URL]")
    p.add_argument("--http_port", type=int, default=int(env("GATEWAY_HTTP_PORT", "8080")), help="[$GATEWAY_HTTP_PORT]")
    p.add_argument("--host", default=env("GATEWAY_HOST", "127.0.0.1"), help="listen address [$GATEWAY_HOST]")
    p.add_argument("--max_bytes", type=int, default=int(env("GATEWAY_MAX_BYTES", str(20 * 1024 * 1024))),
                   help="largest photo accepted, bytes [$GATEWAY_MAX_BYTES]")
    p.add_argument("--max_pixels", type=int, default=int(env("GATEWAY_MAX_PIXELS", "60000000")),
                   help="largest photo accepted, width x height [$GATEWAY_MAX_PIXELS]")
    p.add_argument("--cache_ttl_seconds", type=int, default=int(env("GATEWAY_CACHE_TTL", "3600")),
                   help="[$GATEWAY_CACHE_TTL]")
    p.add_argument("--deadline_seconds", type=float, default=float(env("GATEWAY_DEADLINE", "5")),
                   help="deadline of each Predict call [$GATEWAY_DEADLINE]")
    return p.parse_args(argv)


async def _poll_status(classifier, interval: float = 1.0) -> None:
    while True:
        with contextlib.suppress(Exception):  # the model server may be down; keep the last known set
            classifier.available = await classifier.upstream.available_versions()
        await asyncio.sleep(interval)


async def serve(args: argparse.Namespace) -> None:
    from aiohttp import web
    from redis.asyncio import Redis

    from services.gateway.cache import ResultCache
    from services.gateway.classify import Classifier
    from services.gateway.http_app import make_app
    from services.gateway.preprocess import Limits, Preprocessor
    from services.gateway.upstream import ModelServerClient

    upstream = ModelServerClient(args.model_server, args.model_name, deadline_seconds=args.deadline_seconds)
    redis = Redis.from_url(args.redis_url, socket_connect_timeout=0.1, socket_timeout=0.2)
    classifier = Classifier(upstream, ResultCache(redis, ttl_seconds=args.cache_ttl_seconds),
                            Preprocessor(Limits(args.max_bytes, args.max_pixels)))
    poller = asyncio.create_task(_poll_status(classifier))
    runner = web.AppRunner(make_app(classifier, args.max_bytes), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.http_port).start()
    print(json.dumps({"event": "listening", "http_port": args.http_port}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        poller.cancel()
        await runner.cleanup()
        await upstream.close()


def main(argv=None) -> None:
    args = parse_args(argv)
    from services.gateway.light_tf import use_light_tensorflow_protos
    use_light_tensorflow_protos()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
