"""The bridge nodes' preprocessing (samplers/bridges/images.py), the Bridge Sampler's dispatch
(samplers/dbim.sample_bridge), and that importing the samplers loads no test bed, network or einops."""
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from comfyui_fast_samplers.samplers.bridges.schedule import SCHEDULE_PRESETS, heun_nfe
from comfyui_fast_samplers.samplers.bridges.images import (
    bridge_mask, bridge_to_image, centre_mask, diode_normal_rendering, edge_map, fit_target, fit_to_model,
    hole_preview, image_to_bridge, latent_noise, normal_map_condition, paste_known_pixels,
)
from comfyui_fast_samplers.samplers.bridges.dbim import bridge_nfe, sample_bridge, sample_dbim, sample_ddbm_heun

F64 = torch.float64


@dataclass
class _ADM:
    image_size: int | None
    size_multiple: int


@dataclass
class _Preset:  # the fields of BridgePreset the preprocessing reads
    name: str
    adm: _ADM
    task: str


# ---- images, sizes, masks ------------------------------------------------------------------------

def test_image_round_trip_and_grey_replication():
    image = torch.rand(2, 5, 7, 4, generator=torch.Generator().manual_seed(0))  # RGBA: alpha dropped
    x = image_to_bridge(image)
    assert x.shape == (2, 3, 5, 7) and x.dtype == F64
    assert torch.equal(x[:, 1], 2 * image[..., 1].double() - 1)
    assert torch.allclose(bridge_to_image(x), image[..., :3], atol=1e-7)
    grey = image_to_bridge(image[..., :1])
    assert torch.equal(grey[:, 0], grey[:, 2]) and torch.equal(grey[:, 0], x[:, 0])


def test_fit_to_model_resizes_or_checks_the_multiple():
    preset = _Preset("toy", _ADM(16, 8), "translate")
    x = torch.linspace(-1, 1, 3 * 20 * 24, dtype=F64).reshape(1, 3, 20, 24)
    assert fit_to_model(x, preset, "resize_to_model", "nearest", "image").shape == (1, 3, 16, 16)
    bicubic = fit_to_model(x * 1.5, preset, "resize_to_model", "bicubic", "image")
    assert bicubic.shape == (1, 3, 16, 16) and bicubic.abs().max() <= 1  # clamped overshoot
    same = torch.zeros(1, 3, 16, 16, dtype=F64)
    assert fit_to_model(same, preset, "resize_to_model", "bicubic", "image") is same
    assert fit_to_model(x[..., :16, :24], preset, "keep", "bicubic", "image").shape == (1, 3, 16, 24)
    with pytest.raises(ValueError, match=r"the image is 24x20, but this model \(toy\) needs sides divisible by 8"):
        fit_to_model(x, preset, "keep", "bicubic", "image")


def test_bridge_mask_thresholds_resizes_and_checks_the_task():
    inpaint = _Preset("inp", _ADM(8, 8), "inpaint")
    x = torch.zeros(3, 3, 8, 8, dtype=F64)
    raw = torch.zeros(1, 4, 4)
    raw[0, 1, 2] = 0.6   # above 0.5: hole
    raw[0, 2, 1] = 0.4   # below: known
    m = bridge_mask(raw, x, inpaint)
    assert m.shape == (3, 1, 8, 8) and m.dtype == F64
    expected = torch.zeros(8, 8, dtype=F64)
    expected[2:4, 4:6] = 1  # nearest x2: each mask pixel becomes a 2x2 block
    assert torch.equal(m[2, 0], expected)
    with pytest.raises(ValueError, match="inpainting model: connect a MASK"):
        bridge_mask(None, x, inpaint)
    with pytest.raises(ValueError, match="a MASK is only for inpainting models"):
        bridge_mask(raw, x, _Preset("tr", _ADM(8, 8), "translate"))
    with pytest.raises(ValueError, match="2 masks for 3 images"):
        bridge_mask(torch.zeros(2, 8, 8), x, inpaint)
    assert bridge_mask(None, x, _Preset("tr", _ADM(8, 8), "translate")) is None


def test_paste_known_keeps_known_pixels_exactly_and_the_hole_from_the_sample():
    gen = torch.Generator().manual_seed(1)
    sample, original = torch.randn(2, 3, 6, 6, generator=gen, dtype=F64), torch.randn(2, 3, 6, 6, generator=gen,
                                                                                        dtype=F64)
    mask = (torch.rand(2, 1, 6, 6, generator=gen) > 0.5).to(F64)
    out = paste_known_pixels(sample, original, mask)
    hole = mask.expand_as(out).bool()
    assert torch.equal(out[hole], sample[hole]) and torch.equal(out[~hole], original[~hole])


def test_fit_target_and_latent_noise_broadcast_and_check_shapes():
    like = torch.zeros(3, 3, 8, 8, dtype=torch.float32)
    target = fit_target(torch.full((1, 3, 16, 16), 0.25, dtype=F64), like)
    assert target.shape == like.shape and target.dtype == like.dtype
    assert torch.allclose(target, torch.full_like(like, 0.25))  # a constant image stays constant
    with pytest.raises(ValueError, match="2 targets for 3 conditions"):
        fit_target(torch.zeros(2, 3, 8, 8), like)
    noise = torch.randn(1, 3, 8, 8, dtype=F64)
    assert torch.equal(latent_noise(noise, like, "the latent"), noise.float().expand(3, -1, -1, -1))
    with pytest.raises(ValueError, match=r"the latent has shape \(3, 3, 4, 4\) but the condition needs"):
        latent_noise(torch.zeros(1, 3, 4, 4), like, "the latent")


# ---- condition images ----------------------------------------------------------------------------

def test_diode_normal_rendering_is_offset_by_the_per_image_minimum():
    # image 0: components down to -1; image 1: the lowest component is -0.6; the last pixel of each is invalid
    normals = torch.tensor([[[1.0, 0, 0], [0, -1, 0], [0, 0, 1], [0, 0, 0]],
                            [[0.6, 0.8, 0], [0, 0.6, 0.8], [-0.6, 0, 0.8], [0, 0, 0]]]).permute(0, 2, 1)[..., None]
    out = diode_normal_rendering(normals)  # [2, 3, 4, 1]; invalid = all-zero normal
    lowest = torch.tensor([-1.0, -0.6]).reshape(2, 1, 1, 1)
    assert torch.equal(out[..., :3, :], ((normals - lowest) / 2)[..., :3, :])
    assert torch.equal(out[..., 3, :], torch.zeros(2, 3, 1))  # invalid pixels at the minimum: 0
    valid = torch.ones(2, 1, 4, 1, dtype=torch.bool)
    valid[1, 0, 0] = False  # an explicit mask wins over the zero test
    explicit = diode_normal_rendering(normals, valid)
    assert torch.equal(explicit[1, :, 0], torch.zeros(3, 1))
    assert torch.equal(explicit[1, :, 3], (0 - lowest[1, :, 0]) / 2 * torch.ones(3, 1))  # zero normal, valid


def test_normal_map_condition_flips_components_before_rendering():
    gen = torch.Generator().manual_seed(2)
    n = torch.nn.functional.normalize(torch.randn(1, 3, 5, 5, generator=gen), dim=1)
    rgb = ((n + 1) / 2).movedim(1, -1)
    flipped = n * torch.tensor([-1.0, 1.0, 1.0])[:, None, None]
    out = normal_map_condition(rgb, (True, False, False))
    assert torch.allclose(out, diode_normal_rendering(flipped).movedim(1, -1), atol=1e-6)
    invalid = torch.zeros(1, 5, 5)
    invalid[0, 0, 0] = 1
    masked = normal_map_condition(rgb, (False, False, False), invalid)
    assert torch.allclose(masked[0, 0, 0], torch.zeros(3)) and masked.shape == (1, 5, 5, 3)


@pytest.mark.parametrize("height,width", [(256, 256), (10, 7)])
def test_centre_mask_area_and_placement(height, width):
    m = centre_mask(2, height, width)
    rows, cols = slice(height // 4, 3 * height // 4), slice(width // 4, 3 * width // 4)
    assert m.shape == (2, height, width)
    assert bool((m[:, rows, cols] == 1).all()) and float(m.sum()) == 2 * (rows.stop - rows.start) * (
        cols.stop - cols.start)
    if height == 256:
        assert float(m[0].sum()) == 128 * 128 and m[0, 64, 64] == 1 and m[0, 63, 64] == 0 and m[0, 192, 64] == 0
    preview = hole_preview(torch.ones(2, height, width, 3), m)
    assert bool((preview[m.bool()] == 0.5).all()) and bool((preview[~m.bool()] == 1).all())


def test_edge_map_outlines_a_square_and_thickens():
    pytest.importorskip("kornia")
    image = torch.ones(1, 32, 32, 3)
    image[:, 10:22, 10:22] = 0  # a black square on white
    edges = edge_map(image, 0.1, 0.2, 1.0, 0)
    assert edges.shape == (1, 32, 32, 3) and bool((edges[..., 0] == edges[..., 2]).all())
    line = edges[0, ..., 0] < 0.5
    assert bool(line[8:24, 8:24].any()) and not bool(line[:6].any()) and not bool(line[14:18, 14:18].any())
    thick = edge_map(image, 0.1, 0.2, 1.0, 1)[0, ..., 0] < 0.5
    grown = torch.nn.functional.max_pool2d(line[None, None].float(), 3, stride=1, padding=1)[0, 0].bool()
    assert torch.equal(thick, grown) and int(thick.sum()) > int(line.sum())  # a 3x3 square dilation
    with pytest.raises(ValueError, match="low_threshold must not exceed"):
        edge_map(image, 0.3, 0.2, 1.0, 0)
    with pytest.raises(ValueError, match="a 61x61 blur, too large for the 24x24 image"):
        edge_map(image[:, :24, :24], 0.1, 0.2, 10.0, 0)


# ---- the Bridge Sampler's dispatch ----------------------------------------------------------------

def _linear_denoiser(calls):
    def denoiser(x_t, t, x_T):  # any smooth function of (x_t, t, x_T) does; this one is cheap
        calls.append(1)
        return 0.5 * x_t + 0.3 * x_T + 0.1 * t.reshape(-1, 1)
    return denoiser


def _noise():
    gen = torch.Generator().manual_seed(3)
    return lambda sigma, sigma_next: torch.randn(4, 2, dtype=F64, generator=gen)


@pytest.mark.parametrize("sampler,options,reference", [
    ("dbim", dict(eta=0.4, order=3), lambda *a, **k: sample_dbim(*a, steps=9, eta=0.4, order=1, **k)),
    ("dbim_high_order", dict(eta=0.7, order=2), lambda *a, **k: sample_dbim(*a, steps=9, eta=0.0, order=2, **k)),
    ("ddbm_heun", dict(churn_step_ratio=0.33), None)])
def test_sample_bridge_runs_the_chosen_sampler_at_the_nfe(sampler, options, reference):
    """dbim ignores order, dbim_high_order ignores eta, ddbm_heun rounds NFE 10 to 4 steps (11 calls)."""
    s = SCHEDULE_PRESETS["vp"]
    x_T = torch.linspace(-1, 1, 8, dtype=F64).reshape(4, 2)
    calls = []
    out = sample_bridge(sampler, _linear_denoiser(calls), x_T, s, 10, noise_sampler=_noise(), disable=True,
                        **options)
    assert len(calls) == bridge_nfe(sampler, 10, options.get("churn_step_ratio", 0.33))
    if reference is None:
        assert len(calls) == heun_nfe(4, 0.33) == 11
        expected = sample_ddbm_heun(_linear_denoiser([]), x_T, s, 4, churn_step_ratio=0.33, noise_sampler=_noise(),
                                    disable=True)
    else:
        assert len(calls) == 10
        expected = reference(_linear_denoiser([]), x_T, s, noise_sampler=_noise(), disable=True)
    assert torch.equal(out, expected)


def test_sample_bridge_checks_its_options():
    s, x_T = SCHEDULE_PRESETS["vp"], torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample_bridge("euler", _linear_denoiser([]), x_T, s, 10)
    with pytest.raises(ValueError, match="high-order DBIM needs order 2 or 3, got 1"):
        sample_bridge("dbim_high_order", _linear_denoiser([]), x_T, s, 10, order=1)
    with pytest.raises(ValueError, match="eta must be in"):
        sample_bridge("dbim", _linear_denoiser([]), x_T, s, 10, eta=1.5)
    with pytest.raises(ValueError, match="churn_step_ratio must be in"):
        sample_bridge("ddbm_heun", _linear_denoiser([]), x_T, s, 10, churn_step_ratio=1.0)


# ---- import weight -------------------------------------------------------------------------------

def test_importing_the_samplers_loads_no_test_bed_network_or_einops():
    heavy = ["comfyui_fast_samplers.testbeds.bridges", "comfyui_fast_samplers.testbeds.mixtures",
             "comfyui_fast_samplers.samplers.bridges.adm_unet", "einops"]
    code = ("import sys, comfyui_fast_samplers.samplers, comfyui_fast_samplers.samplers.bridges.images\n"
            "from comfyui_fast_samplers.samplers.bridges.dbim import BRIDGE_PRESET_NAMES\n"
            f"print([m for m in {heavy!r} if m in sys.modules])\n"
            "from comfyui_fast_samplers.samplers.bridges.dbim import BRIDGE_PRESETS\n"  # the compatibility name still works
            "print(tuple(BRIDGE_PRESETS) == BRIDGE_PRESET_NAMES)\n"
            f"print([m for m in {heavy[:2]!r} if m in sys.modules])")  # the presets (UNet configs) need no test bed
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split("\n")[:3] == ["[]", "True", "[]"], result.stdout + result.stderr
