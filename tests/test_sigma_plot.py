"""The schedule plot image (nodes/sigma_plot.py; every SIGMAS node of the pack shows it as a preview)."""
import math

import numpy as np
import pytest
import torch

from comfyui_fast_samplers.nodes import sigma_plot
from comfyui_fast_samplers.samplers.schedule import karras_sigmas


def _count(image, colour, box=None) -> int:
    pixels = np.asarray(image).astype(int)
    if box is not None:
        left, top, right, bottom = box
        pixels = pixels[top:bottom, left:right]
    return int((np.abs(pixels - np.array(colour)).sum(-1) <= 30).sum())


def _plot_area():
    m = sigma_plot.MARGIN
    return (m["left"] + 1, m["top"], sigma_plot.WIDTH - m["right"], sigma_plot.HEIGHT - m["bottom"])


def test_wording_counts_steps_and_sigmas():
    karras = karras_sigmas(20, 0.0292, 14.6).tolist()
    assert sigma_plot.describe(karras) == "20 steps, 21 sigmas: 14.6 -> 0.0292 -> 0"
    assert sigma_plot.describe([3.0, 1.0]) == "1 step, 2 sigmas: 3 -> 1"  # a split schedule ending above 0


def test_reference_is_karras_with_the_same_ends():
    linear = torch.linspace(10.0, 0.1, 8, dtype=torch.float64).tolist() + [0.0]
    reference = sigma_plot.karras_reference(linear)
    assert len(reference) == 8 and reference[0] == pytest.approx(10.0) and reference[-1] == pytest.approx(0.1)
    # Karras et al. eq. 5 written out: straight in sigma^(1/rho), rho = 7
    expected = [(10.0 ** (1 / 7) + i / 7 * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7 for i in range(8)]
    assert reference == pytest.approx(expected, rel=1e-12)


def test_a_karras_schedule_keeps_both_lines_visible():
    """The reference is drawn first and wider, so a schedule equal to it still shows both colours."""
    image = sigma_plot.render(karras_sigmas(20, 0.0292, 14.6).tolist())
    assert image.size == (sigma_plot.WIDTH, sigma_plot.HEIGHT)
    area = _plot_area()
    assert _count(image, sigma_plot.REFERENCE_COLOUR, area) > 1500
    assert _count(image, sigma_plot.SCHEDULE_COLOUR, area) > 1500


def test_the_schedule_line_follows_log_sigma():
    """Each sigma's dot lies where log sigma puts it: the blue run in its column is at the expected row."""
    sigmas = [14.6, 3.0, 0.5, 0.03, 0.0]
    image = np.asarray(sigma_plot.render(sigmas)).astype(int)
    m = sigma_plot.MARGIN
    left, right, top = m["left"], sigma_plot.WIDTH - m["right"], m["top"]
    floor = sigma_plot.HEIGHT - m["bottom"] - 16
    lo, hi = math.log(0.03), math.log(14.6)
    blue = np.abs(image - np.array(sigma_plot.SCHEDULE_COLOUR)).sum(-1) <= 30
    for i, s in enumerate(sigmas[:-1]):
        col = round(left + (right - left) * i / 4)
        row = floor - (floor - top) * (math.log(s) - lo) / (hi - lo)
        rows = np.nonzero(blue[:, col])[0]
        assert rows.size and abs(np.median(rows) - row) < 4, (s, row, rows)
