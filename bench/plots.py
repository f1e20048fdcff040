"""Charts of bench/REPORT.md, written as plain SVG (no plotting library is a dependency of the project): a browser
and GitHub's Markdown renderer show them as they are.

``fault_timelines`` draws the load-under-fault runs of bench/faults.py: where the tables say "0 lost, recovered in
0.13 s", the strips show the answers arriving through the fault (and bench/overload.py's spikes, with other words).
``cv_top1`` draws every recipe's cross-validated top-1 (bench/accuracy_cv.py) against the accuracy target, its
folds' spread beside its mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from xml.sax.saxutils import escape

OUTCOME_COLOURS = {"ok": "#43a047", "unavailable": "#fb8c00", "lost": "#e53935"}  # stacked in this order, ok lowest
OUTCOME_NAMES = {"ok": "200", "unavailable": "503 + Retry-After", "lost": "lost"}


@dataclass(frozen=True)
class TimelineWords:
    """What a timeline plot's marks stand for: its outcomes' names, the shaded span, the mark of full service, the
    time axis, and a strip's tally (``{ok}``, ``{unavailable}``, ``{lost}``: its answers of each outcome)."""
    outcomes: dict[str, str]
    span: str
    recovered: str
    axis: str
    tally: str


FAULT_WORDS = TimelineWords(OUTCOME_NAMES, "fault until the dependency is back", "full service back",
                            "seconds from the fault", "{lost} lost, {unavailable} × 503")
LABEL_W, PLOT_W, RIGHT_W = 270, 640, 20
STRIP_H, STRIP_GAP, TOP_H, AXIS_H = 54, 12, 62, 40
LABEL_CHARS, LINE_H = 38, 13  # a strip's label is wrapped to lines of at most this many characters
CHAR_W = 6.2  # about the width of a character of 11 px sans-serif, to leave room for the longest label


def _wrapped(text: str, width: int = LABEL_CHARS) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _tick_step(span: float) -> float:
    """Seconds between the time axis' ticks: about ten ticks over ``span``."""
    return next((step for step in (0.5, 1, 2, 5, 10, 20, 30, 60) if span / step <= 12), 120)


def fault_timelines(rows: list[tuple[str, dict]], title: str, words: TimelineWords = FAULT_WORDS) -> str:
    """One strip per (label, timeline) row, a timeline as bench/faults.timeline gives it: the answers of each bin
    as stacked bars of answers per second by outcome, on one scale and one time axis (seconds from the fault) for
    all strips; the fault's span shaded up to the dependency back, a blue mark where full service came back (a red
    "not recovered" where it did not; nothing where the timeline has no ``recovered_s``: not measured). ``words``
    name them (the overload bench's timelines are drawn alike)."""
    rows = [(label, line) for label, line in rows if line.get("ok") is not None]
    starts = [line["first_s"] for _, line in rows] + [0.0]
    ends = [line["first_s"] + line["bin_s"] * len(line["ok"]) for _, line in rows] + [0.0]
    low, high = min(starts), max(ends)
    span = max(high - low, 1e-9)
    peak = max((sum(line[o][i] for o in OUTCOME_COLOURS) / line["bin_s"]
                for _, line in rows for i in range(len(line["ok"]))), default=0.0) or 1.0
    height = TOP_H + len(rows) * (STRIP_H + STRIP_GAP) + AXIS_H
    width = LABEL_W + PLOT_W + RIGHT_W

    def x(seconds: float) -> float:
        return round(LABEL_W + (seconds - low) / span * PLOT_W, 2)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{LABEL_W}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>']
    legend_x = LABEL_W
    for outcome, colour in OUTCOME_COLOURS.items():  # the outcomes on one line, the marks on the next
        out.append(f'<rect x="{legend_x}" y="26" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{legend_x + 14}" y="35">{escape(words.outcomes[outcome])}</text>')
        legend_x += 24 + 7 * len(words.outcomes[outcome])
    legend_x = LABEL_W
    out.append(f'<rect x="{legend_x}" y="42" width="10" height="10" fill="#000" fill-opacity="0.12"/>'
               f'<text x="{legend_x + 14}" y="51">{escape(words.span)}</text>')
    legend_x += 24 + 7 * len(words.span)
    out.append(f'<line x1="{legend_x}" y1="40" x2="{legend_x}" y2="54" stroke="#1e88e5" stroke-width="2"/>'
               f'<text x="{legend_x + 6}" y="51">{escape(words.recovered)}</text>')
    for index, (label, line) in enumerate(rows):
        top = TOP_H + index * (STRIP_H + STRIP_GAP)
        base = top + STRIP_H
        total = {o: sum(line[o]) for o in OUTCOME_COLOURS}
        out.append(f'<g class="strip" data-label="{escape(label)}">')
        lines = _wrapped(label)
        for number, text in enumerate(lines):
            out.append(f'<text x="{LABEL_W - 8}" y="{top + 12 + number * LINE_H}" text-anchor="end" '
                       f'font-weight="bold">{escape(text)}</text>')
        out.append(f'<text x="{LABEL_W - 8}" y="{top + 12 + len(lines) * LINE_H}" text-anchor="end" fill="#555">'
                   f'{sum(total.values())} answers: {escape(words.tally.format(**total))}</text>')
        out.append(f'<line x1="{LABEL_W}" y1="{base}" x2="{LABEL_W + PLOT_W}" y2="{base}" stroke="#999"/>')
        back = line["back_s"]
        if back > 0:
            out.append(f'<rect class="fault" x="{x(0)}" y="{top}" width="{round(x(back) - x(0), 2)}" '
                       f'height="{STRIP_H}" fill="#000" fill-opacity="0.12"/>')
        else:  # a fault with nothing to come back (a publish, a removal): when it struck
            out.append(f'<line class="fault" x1="{x(0)}" y1="{top}" x2="{x(0)}" y2="{base}" stroke="#000" '
                       'stroke-opacity="0.4" stroke-dasharray="3,3"/>')
        bar_w = max(round(line["bin_s"] / span * PLOT_W - 0.5, 2), 0.5)
        for i in range(len(line["ok"])):
            left = x(line["first_s"] + i * line["bin_s"])
            y = base
            for outcome, colour in OUTCOME_COLOURS.items():
                count = line[outcome][i]
                if not count:
                    continue
                h = round(count / line["bin_s"] / peak * (STRIP_H - 4), 2)
                y = round(y - h, 2)
                out.append(f'<rect class="{outcome}" x="{left}" y="{y}" width="{bar_w}" height="{h}" '
                           f'fill="{colour}"><title>{count} {escape(words.outcomes[outcome])}, slowest '
                           f'{line["slowest_ms"][i]:.0f} ms</title></rect>')
        recovered = line.get("recovered_s")  # None when it did not recover, and when it was not measured
        if recovered is None and "recovered_s" in line:
            out.append(f'<text x="{LABEL_W + PLOT_W - 4}" y="{top + 14}" text-anchor="end" fill="#e53935" '
                       'font-weight="bold">not recovered</text>')
        elif recovered is not None and recovered > back:
            out.append(f'<line class="recovered" x1="{x(recovered)}" y1="{top}" x2="{x(recovered)}" y2="{base}" '
                       f'stroke="#1e88e5" stroke-width="2"><title>{escape(words.recovered)} '
                       f'{recovered - back:.2f} s after the span\'s end</title></line>')
        out.append("</g>")
    axis_y = TOP_H + len(rows) * (STRIP_H + STRIP_GAP)
    out.append(f'<line x1="{LABEL_W}" y1="{axis_y}" x2="{LABEL_W + PLOT_W}" y2="{axis_y}" stroke="#333"/>')
    step = _tick_step(span)
    tick = step * -(-low // step)
    while tick <= high + 1e-9:
        out.append(f'<line x1="{x(tick)}" y1="{axis_y}" x2="{x(tick)}" y2="{axis_y + 5}" stroke="#333"/>'
                   f'<text x="{x(tick)}" y="{axis_y + 18}" text-anchor="middle">{tick:g}</text>')
        tick += step
    out.append(f'<text x="{LABEL_W + PLOT_W / 2}" y="{axis_y + 34}" text-anchor="middle">{escape(words.axis)}; '
               f'bar height: answers per second (highest bar {peak:.0f}/s)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def cv_top1(rows: list[dict], target: float, title: str) -> str:
    """Cross-validated top-1 of each recipe measured, one row each, sorted by mean: a bar from its lowest to its
    highest fold, a dot at the mean of its folds, the ``target`` as a dashed line; the row with ``default`` true drawn
    in blue and bold. A row: ``label``, ``mean``, ``min``, ``max``, ``default``."""
    rows = sorted(rows, key=lambda row: -row["mean"])
    low = min([row["min"] for row in rows] + [target]) - 0.005
    high = max([row["max"] for row in rows] + [target]) + 0.005
    row_h, top, plot_w, axis_h = 17, 46, 420, 40
    label_w = round(CHAR_W * max(len(row["label"]) for row in rows)) + 16
    width, height = label_w + plot_w + 30, top + len(rows) * row_h + axis_h

    def x(value: float) -> float:
        return round(label_w + (value - low) / (high - low) * plot_w, 2)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
           f'<text x="10" y="36" fill="#555" font-size="12">bar: the folds\' lowest to highest top-1; dot: their '
           f'mean; dashed: the target ({target:g}); blue: the recipe make run trains</text>']
    bottom = top + len(rows) * row_h
    for index, row in enumerate(rows):
        y = top + index * row_h + row_h / 2
        colour = "#1e88e5" if row.get("default") else "#333"
        weight = ' font-weight="bold"' if row.get("default") else ""
        out.append(f'<g class="recipe" data-label="{escape(row["label"])}">'
                   f'<text x="{label_w - 8}" y="{y + 4}" text-anchor="end" fill="{colour}"{weight}>'
                   f'{escape(row["label"])}</text>'
                   f'<line class="folds" x1="{x(row["min"])}" y1="{y}" x2="{x(row["max"])}" y2="{y}" '
                   f'stroke="{colour}" stroke-width="2"/>'
                   f'<circle class="mean" cx="{x(row["mean"])}" cy="{y}" r="3.5" fill="{colour}">'
                   f'<title>{row["mean"]:.3f} ({row["min"]:.3f} to {row["max"]:.3f})</title></circle></g>')
    out.append(f'<line class="target" x1="{x(target)}" y1="{top - 4}" x2="{x(target)}" y2="{bottom}" stroke="#e53935" '
               'stroke-dasharray="4,3"/>')
    out.append(f'<line x1="{label_w}" y1="{bottom}" x2="{label_w + plot_w}" y2="{bottom}" stroke="#333"/>')
    for hundredth in range(math.ceil(low * 100), math.floor(high * 100) + 1):
        tick = hundredth / 100
        out.append(f'<line x1="{x(tick)}" y1="{bottom}" x2="{x(tick)}" y2="{bottom + 5}" stroke="#333"/>'
                   f'<text x="{x(tick)}" y="{bottom + 18}" text-anchor="middle">{tick:.2f}</text>')
    out.append(f'<text x="{label_w + plot_w / 2}" y="{bottom + 34}" text-anchor="middle">top-1 on the test folds'
               '</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
