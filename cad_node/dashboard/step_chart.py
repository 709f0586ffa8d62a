"""Small SVG charts of a job's step times: a stacked bar for the job list, a bar per step for the job page."""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

from cad_node.dashboard.views import StepTime

# The steps in the order a job runs them, each with its colour; other names share the last colours.
STEP_COLOURS = {
    "load series": "#8da0cb",
    "preprocessing": "#66c2a5",
    "candidate detection": "#fc8d62",
    "false-positive reduction": "#e78ac3",
    "segmentation and measurement": "#a6d854",
    "encode results": "#ffd92f",
    "write results": "#e5c494",
}
OTHER_COLOURS = ("#b3b3b3", "#999999", "#cccccc")


def colour(name: str, index: int = 0) -> str:
    return STEP_COLOURS.get(name, OTHER_COLOURS[index % len(OTHER_COLOURS)])


def stacked_bar(steps: Sequence[StepTime], longest_s: float, width: int = 160, height: int = 12) -> Markup:
    """The steps end to end; `longest_s` spans the whole width, so the bars of a page compare."""
    total = sum(s.seconds for s in steps)
    if total <= 0 or longest_s <= 0:
        return Markup("")
    parts = []
    x = 0.0
    for index, step in enumerate(steps):
        w = width * step.seconds / longest_s
        parts.append(
            f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="{height}" fill="{colour(step.name, index)}">'
            f"<title>{escape(step.name)}: {step.seconds:.2f} s</title></rect>"
        )
        x += w
    label = escape(", ".join(f"{s.name} {s.seconds:.1f} s" for s in steps))
    return Markup(
        f'<svg class="steps" width="{width}" height="{height}" role="img" aria-label="{label}">'
        + "".join(parts)
        + "</svg>"
    )


def step_bars(steps: Sequence[StepTime], width: int = 620, row: int = 22) -> Markup:
    """One labelled horizontal bar per step, on a common scale."""
    if not steps:
        return Markup("")
    longest = max(s.seconds for s in steps) or 1.0
    label_w, value_w = 230, 70
    bar_w = width - label_w - value_w
    rows = []
    for index, step in enumerate(steps):
        y = index * row
        w = max(1.0, bar_w * step.seconds / longest)
        rows.append(
            f'<text x="{label_w - 8}" y="{y + row * 0.7:.1f}" text-anchor="end">{escape(step.name)}</text>'
            f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row - 8}" '
            f'fill="{colour(step.name, index)}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + row * 0.7:.1f}">{step.seconds:.2f} s</text>'
        )
    return Markup(
        f'<svg class="step-bars" width="{width}" height="{row * len(steps)}" role="img" '
        f'aria-label="time of each step">' + "".join(rows) + "</svg>"
    )
