"""Operators' CLI for A/B routing: `python -m services.gateway.admin set 1=90 2=10 [shadow=3]`, `status`, `audit`.

Talks to the gateway's admin API with the bearer token from --token or $GATEWAY_ADMIN_TOKEN.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

from services.gateway.routing import RoutingError, parse_assignments


def call(url: str, token: str, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json", "X-Operator": os.environ.get(
            "USER", "cli")})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        error = json.loads(exc.read()).get("error", {})
        raise SystemExit(f"error {exc.code}: {error.get('message', exc.reason)}") from None
    except urllib.error.URLError as exc:
        raise SystemExit(f"cannot reach the gateway at {url}: {exc.reason}") from None


def print_status(status: dict) -> None:
    weights = status.get("routing", {}).get("weights", {})
    print(f"{'version':>7} {'weight':>7} {'requests':>9} {'p50 ms':>7} {'p95 ms':>7} {'errors':>7} {'cache':>6} "
          f"{'feedback acc':>13}")
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    for version, row in status["versions"].items():
        acc = row["feedback_accuracy"]
        print(f"{version:>7} {weights.get(version, 0):>7g} {row['requests']:>9} {fmt(row['p50_ms'], '7.1f')} "
              f"{fmt(row['p95_ms'], '7.1f')} {row['error_rate']:>7.1%} {row['cache_hit_rate']:>6.0%} "
              f"{fmt(acc, '.1%'):>8} of {row['feedback']['total']}")
    sig = status.get("significance")
    if sig:
        verdict = "significant" if sig["significant"] else "not significant"
        print(f"versions {sig['versions'][0]} vs {sig['versions'][1]}: z = {sig['z']:.2f}, p = {sig['p_value']:.3f} "
              f"({verdict} at 5 %)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.gateway.admin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080"), help="[$GATEWAY_URL]")
    parser.add_argument("--token", default=os.environ.get("GATEWAY_ADMIN_TOKEN", ""), help="[$GATEWAY_ADMIN_TOKEN]")
    sub = parser.add_subparsers(dest="command", required=True)
    set_parser = sub.add_parser("set", help="set the weights: VERSION=WEIGHT ... [shadow=VERSION]")
    set_parser.add_argument("assignments", nargs="+")
    sub.add_parser("status", help="per-version figures and the significance test")
    sub.add_parser("audit", help="who changed the routing, when, from what to what")
    args = parser.parse_args(argv)
    if args.command == "set":
        try:
            table = parse_assignments(args.assignments)
        except RoutingError as exc:
            raise SystemExit(f"error: {exc}") from None
        applied = call(args.url, args.token, "PUT", "/v1/admin/routing", table.to_json())
        print(f"routing now {applied['weights']} (shadow {applied['shadow']})")
    elif args.command == "status":
        print_status(call(args.url, args.token, "GET", "/v1/admin/status"))
    else:
        for entry in call(args.url, args.token, "GET", "/v1/admin/audit")["entries"]:
            print(f"{entry['when']} {entry['who']}: {entry['old']['weights']} -> {entry['new']['weights']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
