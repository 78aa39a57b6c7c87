"""The schedule plot the pack's SIGMAS nodes show: drawn here as an image (Pillow, which ComfyUI has) and
returned as an ordinary image preview, so every front end shows it the same way (classic canvas and Vue
nodes) below the widgets. No ComfyUI import: tier 1 tests the drawing directly."""
from __future__ import annotations

import math

from ..samplers.schedule import karras_sigmas

WIDTH, HEIGHT = 600, 360  # a node shows it scaled to its width: large type
BACKGROUND, AXES, TEXT = (30, 30, 30), (110, 110, 110), (220, 220, 220)
SCHEDULE_COLOUR, REFERENCE_COLOUR = (79, 195, 247), (255, 167, 38)
MARGIN = {"left": 80, "right": 18, "top": 84, "bottom": 48}


def describe(sigmas: list[float]) -> str:
    """'N steps, N+1 sigmas: first -> smallest nonzero -> 0' (N steps take N+1 sigmas, usually ending in 0)."""
    steps = len(sigmas) - 1
    ends = [sigmas[0]]
    positive = [s for s in sigmas if s > 0]
    if sigmas[-1] <= 0 and positive and len(sigmas) > 2:
        ends.append(positive[-1])
    ends.append(sigmas[-1])
    return (f"{steps} step{'s' if steps != 1 else ''}, {len(sigmas)} sigmas: "
            + " -> ".join(f"{s:.4g}" for s in ends[:len(sigmas)]))


def karras_reference(sigmas: list[float]) -> list[float]:
    """Karras (rho 7) with as many nonzero sigmas as the schedule and the same first and last nonzero ones."""
    positive = [s for s in sigmas if s > 0]
    if len(positive) < 2:
        return positive
    return [float(s) for s in karras_sigmas(len(positive), min(positive), max(positive))[:-1]]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap size
        return ImageFont.load_default()


def render(sigmas: list[float]):
    """A PIL RGB image: log sigma against step index for the schedule (blue line, dots) over the Karras
    reference of the same length and ends (wide orange line, drawn first so an equal schedule stays
    visible on top of it), a legend and the 'N steps, N+1 sigmas' line. A final 0 is drawn at the
    bottom edge (log 0 does not exist) and labelled."""
    from PIL import Image, ImageDraw

    sigmas = [float(s) for s in sigmas]
    image = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(image)
    small, normal = _font(17), _font(21)
    draw.text((10, 8), describe(sigmas), fill=TEXT, font=normal)
    positive = [s for s in sigmas if s > 0]
    if not positive:
        draw.text((10, 40), "no nonzero sigma to plot", fill=TEXT, font=small)
        return image
    reference = karras_reference(sigmas)
    same = len(reference) == len(positive) and all(
        abs(a - b) <= 1e-3 * max(abs(b), 1e-12) for a, b in zip(positive, reference))
    left, top = MARGIN["left"], MARGIN["top"]
    right, bottom = WIDTH - MARGIN["right"], HEIGHT - MARGIN["bottom"]
    lo, hi = math.log(min(positive)), math.log(max(positive))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    floor = bottom - 16  # log-sigma of the smallest nonzero sigma; below it only the final 0
    steps = max(len(sigmas) - 1, 1)

    def x(i):
        return left + (right - left) * i / steps

    def y(s):
        return bottom if s <= 0 else floor - (floor - top) * (math.log(s) - lo) / (hi - lo)

    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXES, width=1)
    ends = {max(positive), min(positive)}
    ticks = ends | {d for d in _decades(lo, hi) if all(abs(y(d) - y(e)) > 20 for e in ends)}
    for s in sorted(ticks):
        draw.line([(left - 5, y(s)), (left, y(s))], fill=AXES)
        draw.text((left - 8, y(s)), f"{s:.3g}", fill=TEXT, font=small, anchor="rm")
    draw.text((left - 8, bottom), "0", fill=TEXT, font=small, anchor="rm")
    for i in sorted({0, steps // 2, steps}):
        draw.text((x(i), bottom + 4), str(i), fill=TEXT, font=small, anchor="mt")
    draw.text(((left + right) / 2, bottom + 24), "step", fill=AXES, font=small, anchor="mt")
    if len(reference) >= 2:
        draw.line([(x(i), y(s)) for i, s in enumerate(reference)], fill=REFERENCE_COLOUR, width=8)
    points = [(x(i), y(s)) for i, s in enumerate(sigmas)]
    draw.line(points, fill=SCHEDULE_COLOUR, width=3)
    for px, py in points:
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=SCHEDULE_COLOUR)
    legend = [(SCHEDULE_COLOUR, "this schedule (log sigma)"),
              (REFERENCE_COLOUR, "karras rho=7, same ends" + (" (equal)" if same else ""))]
    for row, (colour, label) in enumerate(legend):
        ly = 44 + 20 * row
        draw.line([(WIDTH - 318, ly), (WIDTH - 290, ly)], fill=colour, width=5)
        draw.text((WIDTH - 282, ly), label, fill=TEXT, font=small, anchor="lm")
    return image


def _decades(lo: float, hi: float) -> set[float]:
    """Powers of ten inside (e^lo, e^hi), at most four, for the y-axis ticks."""
    first, last = math.floor(lo / math.log(10)) + 1, math.ceil(hi / math.log(10)) - 1
    values = {10.0 ** k for k in range(first, last + 1)}
    return values if len(values) <= 4 else set()
