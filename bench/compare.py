"""Compare two bench reports: which throughput or latency figures got worse, and by how much.

Usage: python -m bench.compare BEFORE/report.json [AFTER/report.json] [--tolerance 0.05]

AFTER defaults to bench/results/report.json (the last `make bench`). Compared:
- every gateway cell (protocol x cache x concurrency): requests/s (higher is better) and p50 (lower is better);
- every report row whose measured value is a number and whose target says its direction (">= x": higher is
  better, "<= x": lower is better), matched by its text.
Rows that are text, or have no target, are listed as not compared. Exit status 1 when a figure is worse than
BEFORE by more than the tolerance, so a refactoring can be held to "no row more than 5 % worse".
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.common import RESULTS_DIR


@dataclass(frozen=True)
class Change:
    what: str
    before: float
    after: float
    higher_is_better: bool

    @property
    def change(self) -> float:
        """after / before - 1 (0 when before is 0)."""
        return (self.after - self.before) / abs(self.before) if self.before else 0.0

    @property
    def worse_by(self) -> float:
        """The relative loss (0.1 = 10 % worse); negative when better."""
        return -self.change if self.higher_is_better else self.change


def _direction(target: str) -> bool | None:
    target = target.strip()
    if target.startswith(">"):
        return True
    if target.startswith("<"):
        return False
    return None


def changes(before: dict, after: dict) -> tuple[list[Change], list[str]]:
    """The comparable figures of two reports, and the texts of rows that could not be compared."""
    found, skipped = [], []
    cells_before = {(c["protocol"], c["cache"]): c for c in before.get("gateway_cells", [])}
    for cell in after.get("gateway_cells", []):
        old = cells_before.get((cell["protocol"], cell["cache"]))
        if old is None:
            continue
        for level in ("c1", "c8", "c32"):
            if level not in cell or level not in old:
                continue
            name = f"gateway {cell['protocol']} cache {cell['cache']} {level}"
            found.append(Change(f"{name} req/s", old[level]["requests_per_s"], cell[level]["requests_per_s"], True))
            found.append(Change(f"{name} p50 ms", old[level]["p50_ms"], cell[level]["p50_ms"], False))
    rows_before = {r["what"]: r for r in before.get("rows", [])}
    for row in after.get("rows", []):
        old = rows_before.get(row["what"])
        direction = _direction(str(row.get("target", "")))
        numbers = old is not None and all(isinstance(r["measured"], (int, float)) and not isinstance(
            r["measured"], bool) for r in (row, old))
        if not numbers or direction is None:
            skipped.append(row["what"])
            continue
        found.append(Change(row["what"], float(old["measured"]), float(row["measured"]), direction))
    return found, skipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path, nargs="?", default=RESULTS_DIR / "report.json")
    parser.add_argument("--tolerance", type=float, default=0.05, help="relative loss allowed (default 0.05 = 5 %%)")
    args = parser.parse_args(argv)
    before, after = (json.loads(p.read_text()) for p in (args.before, args.after))
    found, skipped = changes(before, after)
    print(f"before: {before.get('machine', {}).get('revision', '?')}  after: "
          f"{after.get('machine', {}).get('revision', '?')}")
    print("| figure | before | after | change | worse than the tolerance |\n|---|---|---|---|---|")
    worse = [c for c in found if c.worse_by > args.tolerance]
    for c in found:
        flag = "**yes**" if c in worse else ""
        print(f"| {c.what} | {c.before:.3g} | {c.after:.3g} | {c.change:+.1%} | {flag} |")
    if skipped:
        print(f"\nnot compared (text or no target): {len(skipped)} rows")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
