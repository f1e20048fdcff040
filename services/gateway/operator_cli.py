"""Operators' CLI for A/B routing: `python -m services.gateway.operator_cli set stable=90 canary=10 [shadow=canary]`,
`clear`, `status`, `audit`.

An entry is a version number (`set 1=90 2=10 shadow=3`) or a version label of the model server's config
(`version_labels` in its --model_config_file: letters, digits and '_', not all digits); both mix
(`set 1=90 canary=10`). The gateway resolves labels through the model server and follows a label moved there within
a second or two; the cache and the answers always carry the resolved version. Each client id sticks to its entry
(label or version), so moving a label moves no client. An unknown label or a version that is not AVAILABLE is
refused, and so are weights outside 0..1,000,000 or all 0: `clear` empties the table (every request then goes to
the latest AVAILABLE version). `status` shows each entry with the version it points at now; `audit` shows the
entries as they were set.

`rollout [status|pause|resume|abort|promote|retry VERSION]` talks to the rollout controller (services/rollout)
through the gateway's admin API (the gateway forwards to its --rollout-url) with the same operator token: its step,
timers, judged figures and decisions, or a command for its next tick, which the gateway's audit records too
(`retry 3` takes the rejected version 3 out of the controller's rejected list, so that it may be rolled out again). With
--rollout-url the CLI talks to the controller's own API instead (commands are then only in its history).

Talks to the gateway's admin API with an operator's bearer token from --token or $GATEWAY_ADMIN_TOKEN; the audit
records the token's owner ($USER goes along as X-Operator, a note only).
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


def describe_entry(entry: str, resolved: dict) -> str:
    """'canary (version 2)' for a label, '1' for a version; '(unknown)' for a label the model server dropped."""
    if entry.isdigit():
        return entry
    version = resolved.get(entry)
    return f"{entry} (version {version})" if version is not None else f"{entry} (unknown)"


def print_routing(routing: dict) -> None:
    resolved = routing.get("resolved", {})
    arms = ", ".join(f"{describe_entry(e, resolved)} {w:g}" for e, w in routing.get("weights", {}).items())
    shadow = routing.get("shadow")
    print(f"routing: {arms or 'none (latest version)'}"
          + (f"; shadow {describe_entry(str(shadow), resolved)}" if shadow is not None else ""))
    if routing.get("fallback") is not None:
        print(f"no routed version is AVAILABLE: version {routing['fallback']} answers in their place (fallback)")


def print_status(status: dict) -> None:
    routing = status.get("routing", {})
    print_routing(routing)
    weights = routing.get("effective", routing.get("weights", {}))  # per resolved version
    print(f"{'version':>7} {'model':<12} {'weight':>7} {'requests':>9} {'p50 ms':>7} {'p95 ms':>7} {'miss p95':>8} "
          f"{'errors':>7} {'cache':>6} {'feedback acc':>13}")
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    for version, row in status["versions"].items():
        acc = row["feedback_accuracy"]
        print(f"{version:>7} {row.get('identity') or '-':<12} {weights.get(version, 0):>7g} {row['requests']:>9} "
              f"{fmt(row['p50_ms'], '7.1f')} "
              f"{fmt(row['p95_ms'], '7.1f')} {fmt(row.get('miss_p95_ms'), '8.1f')} {row['error_rate']:>7.1%} "
              f"{row['cache_hit_rate']:>6.0%} "
              f"{fmt(acc, '.1%'):>8} of {row['feedback']['total']}")
    sig = status.get("significance")
    if sig:
        verdict = "significant" if sig["significant"] else "not significant"
        print(f"versions {sig['versions'][0]} vs {sig['versions'][1]}: z = {sig['z']:.2f}, p = {sig['p_value']:.3f} "
              f"({verdict} at 5 %)")


def print_rollout(body: dict) -> None:
    state = body.get("state") or {}
    print(f"model {body['model']}: stable v{state.get('stable')}; lease held by {body.get('leader') or 'nobody'}")
    step, timers, judgement = body.get("step"), body.get("timers"), state.get("judgement") or {}
    if step:
        print(f"rolling out v{state['candidate']}: step {step['index'] + 1} of {step['of']} {step['name']} "
              f"({step['weight']:g} %{', shadow' if step['shadow'] else ''}){' PAUSED' if state.get('paused') else ''}"
              f"; held {timers['held_seconds']:.0f} of {timers['hold_seconds']:g} s")
        if state.get("override"):
            print(f"operator override: routing kept at {state['override'].get('weights')} until `rollout resume` "
                  "(the step's table again) or `rollout abort`")
        print(f"last judgement: {judgement.get('decision')}: {judgement.get('reason')}")
        for verdict in judgement.get("verdicts", []):
            print(f"  {verdict['rule']:<18} {verdict['outcome']:<12} {verdict['reason']}")
    else:
        print("no rollout running" + (f"; rejected versions: {state['rejected']}" if state.get("rejected") else ""))
    for event in body.get("history", [])[:10]:
        rule = f" [{event['rule']}]" if event.get("rule") else ""
        print(f"  {event['outcome']:<9} v{event.get('version')} {event.get('step') or '':<10} by {event['who']}{rule}: "
              f"{event['reason']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.gateway.operator_cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080"), help="[$GATEWAY_URL]")
    parser.add_argument("--token", default=os.environ.get("GATEWAY_ADMIN_TOKEN", ""), help="[$GATEWAY_ADMIN_TOKEN]")
    sub = parser.add_subparsers(dest="command", required=True)
    set_parser = sub.add_parser("set", help="set the weights: VERSION=WEIGHT or LABEL=WEIGHT ... "
                                "[shadow=VERSION|LABEL]")
    set_parser.add_argument("assignments", nargs="+", metavar="ENTRY=WEIGHT",
                            help="e.g. stable=90 canary=10 shadow=canary, or 1=90 2=10 shadow=3")
    sub.add_parser("clear", help="empty the routing table: every request goes to the latest AVAILABLE version")
    sub.add_parser("status", help="routing entries with the versions they resolve to, per-version figures and the "
                   "significance test")
    sub.add_parser("audit", help="who changed the routing, when, from what to what (and rollout commands)")
    rollout = sub.add_parser("rollout", help="the rollout controller: status, or pause / resume / abort / promote, "
                             "or retry VERSION (a rejected version may be rolled out again)")
    rollout.add_argument("action", nargs="?", default="status",
                         choices=("status", "pause", "resume", "abort", "promote", "retry"))
    rollout.add_argument("version", nargs="?", type=int, help="retry: the rejected version")
    rollout.add_argument("--rollout-url", default="",
                         help="the controller's own API, e.g. http://127.0.0.1:8095 (default: through the gateway)")
    args = parser.parse_args(argv)
    if args.command == "rollout" and (args.action == "retry") != (args.version is not None):
        parser.error("rollout retry takes the rejected version (rollout retry 3); no other rollout command takes one")
    if args.command == "rollout":
        base, path = (args.rollout_url, "/v1/rollout") if args.rollout_url else (args.url, "/v1/admin/rollout")
        if args.action == "status":
            print_rollout(call(base, args.token, "GET", path))
        else:
            body = {"version": args.version} if args.version is not None else {}
            queued = call(base, args.token, "POST", f"{path}/{args.action}", body)["queued"]
            what = f"{queued['action']} of v{queued['version']}" if "version" in queued else queued["action"]
            print(f"queued {what} by {queued['who']}: applied at the controller's next tick")
    elif args.command == "set":
        try:
            table = parse_assignments(args.assignments)
        except RoutingError as exc:
            raise SystemExit(f"error: {exc}") from None
        applied = call(args.url, args.token, "PUT", "/v1/admin/routing", table.to_json())
        print_routing(applied)
    elif args.command == "clear":
        print_routing(call(args.url, args.token, "PUT", "/v1/admin/routing", {"clear": True}))
    elif args.command == "status":
        print_status(call(args.url, args.token, "GET", "/v1/admin/status"))
    else:
        for entry in call(args.url, args.token, "GET", "/v1/admin/audit")["entries"]:
            if "unreadable" in entry:
                print(f"(an entry not written by the gateway: {entry['unreadable']!r})")
                continue
            if "action" in entry:  # a rollout command sent through the gateway, and the controller's answer
                print(f"{entry['when']} {entry['who']}: {entry['action']} -> {entry['status']}")
                continue
            (old, old_shadow), (new, new_shadow) = _audited(entry["old"]), _audited(entry["new"])
            shadows = f" (shadow {old_shadow} -> {new_shadow})" if (old_shadow, new_shadow) != (None, None) else ""
            print(f"{entry['when']} {entry['who']}: {old} -> {new}{shadows}")
    return 0


def _audited(table) -> tuple:
    """(weights, shadow) of a table as the audit recorded it; what was stored instead of a table (by hand, say) is
    shown as it was (its repr), with no shadow."""
    if isinstance(table, dict) and isinstance(table.get("weights"), dict):
        return table["weights"], table.get("shadow")
    return repr(table), None


if __name__ == "__main__":
    sys.exit(main())
