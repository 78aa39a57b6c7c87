"""Sanity checks of benchmarks/comfy_peers.py (ComfyUI's samplers on the exact test-bed models)."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from comfyui_fast_samplers.samplers import sample_dpmpp_2m, sample_euler
from comfyui_fast_samplers.testbeds.mixtures import ExactModel, default_mixture

_spec = importlib.util.spec_from_file_location(
    "comfy_peers", Path(__file__).resolve().parents[2] / "benchmarks" / "comfy_peers.py")
cp = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(cp)


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(kind, n=8):
    ms = cp.model_sampling(kind)
    denoiser = ExactModel(default_mixture(), kind)
    noise = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return ms, denoiser, cp.ComfyModel(denoiser, ms), noise


def _sampler(name):
    k = cp.import_comfy().samplers.sampler_object(name)
    return k.sampler_function, k.extra_options


def test_model_sampling_objects_are_comfys():
    ve, flow = cp.model_sampling("ve"), cp.model_sampling("flow")
    assert math.isclose(float(ve.sigma_min), 0.029168, rel_tol=1e-4)
    assert math.isclose(float(ve.sigma_max), 14.615, rel_tol=1e-4)
    assert float(flow.sigma_max) == 1.0 and flow.shift == 3.0 and cp.is_flow(flow) and not cp.is_flow(ve)
    assert {"oss_FLUX", "oss_Wan", "oss_Chroma"} <= set(cp.schedule_names(flow))
    assert not any(n.startswith(("ays", "gits")) for n in cp.schedule_names(flow))
    ve_names = cp.schedule_names(ve)
    assert {"ays_SD1", "ays_SDXL", "gits_0.80", "gits_1.50", "karras", "kl_optimal"} <= set(ve_names)
    assert len(ve_names) == 9 + 2 + 15


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_comfy_euler_equals_the_packs_euler(kind):
    ms, _, model, noise = _setup(kind)
    sigmas = cp.schedule(ms, "karras", 10)
    ours, nfe = cp.run_sampler(sample_euler, {}, model, noise, sigmas, ms)
    theirs, comfy_nfe = cp.run_sampler(*_sampler("euler"), model, noise, sigmas, ms)
    assert nfe == comfy_nfe == 10 and model.calls == 20
    assert theirs.dtype == torch.float64 and torch.allclose(theirs, ours, rtol=0, atol=1e-12)


def test_comfy_dpmpp_2m_equals_the_packs_on_ve():
    """Same method in VE variables (on flow the pack's steps in flow's own log-SNR, ComfyUI's in sigma)."""
    ms, _, model, noise = _setup("ve")
    sigmas = cp.schedule(ms, "beta", 8)
    ours, _ = cp.run_sampler(sample_dpmpp_2m, {}, model, noise, sigmas, ms)
    theirs, _ = cp.run_sampler(*_sampler("dpmpp_2m"), model, noise, sigmas, ms)
    assert torch.allclose(theirs, ours, rtol=0, atol=1e-12)


def test_start_state_and_counted_nfe():
    ms, _, model, noise = _setup("ve")
    sigmas = cp.schedule(ms, "karras", 10)
    assert torch.allclose(cp.start_state(ms, noise, sigmas.double()), noise * math.sqrt(1 + float(sigmas[0]) ** 2))
    assert cp.run_sampler(*_sampler("heun"), model, noise, sigmas, ms)[1] == 19  # 2 per step, 1 on the last
    ks = cp.ksampler_sigmas(ms, "dpm_2", "karras", 10)
    assert len(ks) == len(sigmas) and not torch.equal(ks, sigmas)  # 11 steps, penultimate dropped
    assert torch.equal(cp.ksampler_sigmas(ms, "euler", "karras", 10), sigmas)


def test_uni_pc_runs_in_float64_on_a_clone():
    ms, _, model, noise = _setup("ve")
    sigmas = cp.schedule(ms, "karras", 10)
    before = sigmas.clone()
    out, nfe = cp.run_sampler(*_sampler("uni_pc"), model, noise, sigmas, ms)
    assert out.dtype == torch.float64 and nfe == 10 and torch.equal(sigmas, before)
    fn, _ = _sampler("uni_pc")
    fn(model, noise.float() * 14.6, sigmas, extra_args={"seed": 0}, callback=None, disable=True)
    assert float(sigmas[-1]) == pytest.approx(0.001)  # what run_sampler's clone protects against


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_fine_runs_converge_to_the_exact_reference(kind):
    ms, denoiser, model, noise = _setup(kind)
    reference = cp.exact_reference_fn(denoiser, ms, noise)
    errors = []
    for steps in (10, 40, 160):
        sigmas = cp.schedule(ms, "karras", steps)
        out, _ = cp.run_sampler(*_sampler("dpmpp_2m"), model, noise, sigmas, ms)
        errors.append(float((out - reference(sigmas)).flatten(1).norm(dim=1).mean()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3, errors


def test_peer_table_matches_counted_nfe():
    ms, denoiser, model, noise = _setup("ve", n=4)
    reference = cp.exact_reference_fn(denoiser, ms, noise)
    samplers = {name: _sampler(name) for name in ("euler", "heun", "dpm_2")}
    rows = cp._table(model, ms, noise, reference, [5], samplers, ["karras", "ays_SD1"])
    assert {(r.sampler, r.schedule, r.rule) for r in rows} == {
        ("euler", "karras", "both"), ("heun", "karras", "both"), ("dpm_2", "karras", "SamplerCustom"),
        ("dpm_2", "karras", "KSampler"), ("euler", "ays_SD1", "SamplerCustom"), ("heun", "ays_SD1", "SamplerCustom"),
        ("dpm_2", "ays_SD1", "SamplerCustom")}
    assert all(r.nfe == 5 and r.exact_nfe and math.isfinite(r.error) for r in rows)
    assert {r.steps for r in rows if r.sampler in ("heun", "dpm_2")} == {3}
    assert cp.best_peer(rows, 5).error == min(r.error for r in rows)
