"""python -m services.gateway.client photo.jpg: classify a photo through the gateway's HTTP API (like label_image.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.gateway.client", description=__doc__)
    p.add_argument("photo", type=Path)
    p.add_argument("--url", default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080"), help="[$GATEWAY_URL]")
    p.add_argument("--top_k", type=int, default=3)
    p.add_argument("--client_id", default=None)
    args = p.parse_args(argv)
    try:
        body = args.photo.read_bytes()
    except OSError as exc:
        print(f"cannot read {args.photo}: {exc.strerror}", file=sys.stderr)
        return 2
    headers = {"Content-Type": "application/octet-stream", **({"X-Client-Id": args.client_id} if args.client_id else {})}
    request = urllib.request.Request(f"{args.url}/v1/classify?top_k={args.top_k}", data=body, headers=headers)
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        error = json.loads(exc.read() or b"{}").get("error", {})
        print(f"error {exc.code} {error.get('code', '')}: {error.get('message', exc.reason)}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"cannot reach the gateway at {args.url}: {exc.reason}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    for prediction in answer["predictions"]:
        print(f"{prediction['display_name']} ({prediction['label']}) (score = {prediction['score']:.5f})")
    if answer["not_a_mushroom"]:
        print(f"not a mushroom (mushroom score {answer['mushroom_score']:.3f})")
    model = answer["model"]
    print(f"model {model['name']} v{model['version']}{' (cached)' if answer['cached'] else ''}; "
          f"evaluation time: {elapsed:.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
