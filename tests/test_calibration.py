"""The schedule calibrator on the exact Gaussian-mixture models (no ComfyUI). Small settings (24 candidates,
2 teacher sub-steps, 32 calibration noises) keep each call to a few seconds; the benchmark runs the defaults."""
import warnings

import pytest
import torch

from comfyui_fast_samplers.samplers import SAMPLERS, calibrate_schedule, sample_dpmpp_2m
from comfyui_fast_samplers.testbeds.mixtures import ExactModel, default_mixture

VE = dict(sigma_min=0.0292, sigma_max=14.615)
FLOW = dict(sigma_min=0.003, sigma_max=1.0)
FAST = dict(candidates=24, teacher_substeps=2, refine_trials=30, holdout=256)


def _noise(n, seed=0):
    return torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _valid(sigmas, steps, sigma_max, sigma_min):
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    assert float(sigmas[0]) == pytest.approx(sigma_max) and float(sigmas[-1]) == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all()
    assert float(sigmas[-2]) >= sigma_min * (1 - 1e-6)


@pytest.fixture(scope="module")
def ve_result():
    model = ExactModel(default_mixture(), "ve")
    return calibrate_schedule(model, _noise(32), 5, "dpmpp_2m", **VE, **FAST), model


def test_contract_and_gain_on_the_exact_ve_model(ve_result):
    """Measured: hold-out 0.07 vs 0.20 (log-SNR uniform) and 0.22 (karras) at 5 steps."""
    (sigmas, report), _ = ve_result
    _valid(sigmas, 5, VE["sigma_max"], VE["sigma_min"])
    best_name, (_, best_hold) = report.best_stock()
    assert report.holdout_error <= 0.6 * best_hold, report.to_text()
    assert report.teacher_error <= 0.1 * report.holdout_error
    assert report.sigmas == sigmas.tolist()


def test_counted_calls_and_determinism(ve_result):
    (sigmas, report), model = ve_result
    assert sum(report.model_calls.values()) == model.calls
    again, _ = calibrate_schedule(ExactModel(default_mixture(), "ve"), _noise(32), 5, "dpmpp_2m", **VE, **FAST)
    assert torch.equal(again, sigmas)


def test_flow_start_and_gain():
    """Flow model from sigma = 1, the corrected ER ODE preset, 6 steps: every interior sigma below 1, no NaN,
    and far below shift-3 'simple' (whose last step is one long denoise)."""
    sigmas, report = calibrate_schedule(ExactModel(default_mixture(), "flow"), _noise(32), 6,
                                        "fs_er_sde_ode_3_unic", **FLOW, **FAST)
    _valid(sigmas, 6, 1.0, FLOW["sigma_min"])
    assert float(sigmas[1]) < 1.0 and torch.isfinite(sigmas).all()
    assert report.holdout_error <= 0.5 * report.stock["simple (shift 3)"][1], report.to_text()


def test_black_box_sampler_is_refined_and_its_inputs_are_never_mutated():
    """A test-local Euler that, like ComfyUI's uni_pc, writes into the sigmas it is given: every call must get
    tensors of its own."""
    seen = []

    def mutating_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        # the tensors stay referenced, so their memory is not reused: equal pointers mean a shared tensor
        assert not any(t.data_ptr() in (sigmas.data_ptr(), x.data_ptr()) for t in seen), "a tensor was handed out twice"
        seen.extend([sigmas, x])
        sig = sigmas[:]
        sig[-1] = 0.0  # in place, on the caller's tensor
        for i in range(len(sig) - 1):
            d = model(x, sig[i] * x.new_ones(len(x)))
            x = x + (sig[i + 1] - sig[i]) * (x - d) / sig[i]
        return x

    noise = _noise(32).float()  # float32 like ComfyUI latents (float64 runs get float64 copies of the sigmas)
    before = noise.clone()
    sigmas, report = calibrate_schedule(ExactModel(default_mixture(), "ve"), noise, 4, mutating_euler, **VE, **FAST)
    assert torch.equal(noise, before)
    _valid(sigmas, 4, VE["sigma_max"], VE["sigma_min"])
    assert report.holdout_error < report.stock["karras"][1], report.to_text()


def test_small_batch_overfits_and_the_report_says_so():
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        _, report = calibrate_schedule(ExactModel(default_mixture(), "ve"), _noise(4), 6, "dpmpp_2m", **VE, **FAST)
    assert report.calibration_error < report.holdout_error
    assert any("hold-out error" in w for w in report.warnings)


def test_cache_hit_makes_no_model_call(tmp_path):
    model = ExactModel(default_mixture(), "ve")
    fast = dict(FAST, holdout=0)
    first, fresh = calibrate_schedule(model, _noise(16), 3, "dpmpp_2m", **VE, **fast, cache_dir=tmp_path,
                                      model_key="exact-2d")
    calls = model.calls
    second, report = calibrate_schedule(model, _noise(16), 3, "dpmpp_2m", **VE, **fast, cache_dir=tmp_path,
                                        model_key="exact-2d")
    assert model.calls == calls and report.cached and torch.equal(first, second)
    # the step tuning (kept here: no hold-out to drop it) comes back from the file as it went in
    assert "step_tuning" in fresh.sampler_options and report.sampler_options == fresh.sampler_options
    calibrate_schedule(model, _noise(16), 4, "dpmpp_2m", **VE, **FAST, cache_dir=tmp_path, model_key="exact-2d")
    assert model.calls > calls  # another step count is another entry
    with pytest.raises(ValueError, match="model_key"):
        calibrate_schedule(model, _noise(16), 3, "dpmpp_2m", **VE, **FAST, cache_dir=tmp_path)


def test_discrete_model_gets_table_values(comfy_like):
    """A ComfyUI-like discrete model (timestep() rounds to a table index): every nonzero sigma is a table entry."""
    from comfyui_fast_samplers.samplers.schedule import discrete_vp_sigmas

    table = discrete_vp_sigmas().to(torch.float32)
    exact = ExactModel(default_mixture(), "ve")
    model = comfy_like(exact, "EPS")
    ms = model.model_sampling
    ms.sigmas, ms.sigma_min, ms.sigma_max = table, table[0], table[-1]
    ms.timestep = lambda sigma: (table.log() - sigma.log().reshape(-1, 1)).abs().argmin(1)
    ms.noise_scaling = lambda sigma, noise, latent, max_denoise: noise * (1 + sigma**2) ** 0.5
    sigmas, _ = calibrate_schedule(model, _noise(16), 4, "dpmpp_2m", **FAST)
    assert all(bool((table == s).any()) for s in sigmas[:-1])


def test_bad_input_is_refused():
    model = ExactModel(default_mixture(), "ve")
    with pytest.raises(ValueError, match="steps"):
        calibrate_schedule(model, _noise(8), 0, "dpmpp_2m", **VE)
    with pytest.raises(ValueError, match="unknown sampler"):
        calibrate_schedule(model, _noise(8), 4, "no_such_sampler", **VE)
    with pytest.raises(ValueError, match="stochastic"):
        calibrate_schedule(model, _noise(8), 4, SAMPLERS["fs_er_sde_3"], **VE, **FAST)
    with pytest.raises(ValueError, match="sigma range"):
        calibrate_schedule(model, _noise(8), 4, "dpmpp_2m")

    def failing_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        raise RuntimeError("linalg.solve: singular")

    with pytest.raises(ValueError, match="sampler failed.*singular"):
        calibrate_schedule(model, _noise(8), 4, failing_sampler, **VE, **FAST)

    def nan_model(x, sigma, **kwargs):
        return torch.full_like(x, float("nan"))

    with pytest.raises(ValueError, match="NaN"):
        calibrate_schedule(nan_model, _noise(8), 4, sample_dpmpp_2m, **VE, **FAST)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "fs_er_sde_ode_3_unic", "fs_er_sde_ode_3"])
@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_dp_steps_are_the_real_sampler_steps(sampler, kind):
    """The DP's windowed stepper (the last 4 sigmas of a path) must reproduce the sampler's own run: the cost it
    reports for its path equals the error of running the real function on that path, to rounding."""
    from comfyui_fast_samplers.samplers.calibration.pipeline import (
        model_sigma_range, planner_for, resolve_sampler, start_state,
    )
    from comfyui_fast_samplers.samplers.calibration.search import (
        Stepper, candidate_grid, fine_grid, mean_error, solver_aware_dp, teacher_solve,
    )
    from comfyui_fast_samplers.samplers.calibration.pipeline import TEACHER

    model = ExactModel(default_mixture(), kind)
    rng = model_sigma_range(model, **(VE if kind == "ve" else FLOW))
    fn, options, _ = resolve_sampler(sampler)
    nodes = candidate_grid(rng, 20)
    nodes = nodes[nodes < rng.sigma_max]
    fine, index = fine_grid(rng, nodes, 2)
    x = start_state(model, _noise(16), rng)
    states, final = teacher_solve(TEACHER, model, x, fine, index, {})
    path, cost = solver_aware_dp(model, Stepper(planner_for(fn, options, model)), x, rng.sigma_max, nodes, states,
                                 final, 6, {}, 1 << 16)
    sigmas = torch.tensor(path + [0.0], dtype=torch.float64)
    assert len(path) == 6 and (sigmas[1:] < sigmas[:-1]).all()
    real = fn(model, x.clone(), sigmas, disable=True, **options)
    assert cost == pytest.approx(mean_error(real, final), rel=1e-9)


def test_refinement_never_reaches_the_start():
    """Feasible interior sigmas stay min_gap below the start (a 20-step VE refinement once put sigma_1 =
    sigma_0)."""
    from comfyui_fast_samplers.samplers.calibration.pipeline import model_sigma_range
    from comfyui_fast_samplers.samplers.calibration.search import feasible

    rng = model_sigma_range(ExactModel(default_mixture(), "ve"), **VE)
    z_start = float(rng.z(rng.sigma_max))
    assert not feasible([z_start, z_start - 1.0], rng, 0.05)
    assert not feasible([z_start - 0.01, z_start - 1.0], rng, 0.05)
    assert feasible([z_start - 0.05, z_start - 1.0], rng, 0.05)


def test_variants_cover_every_final_step_once():
    """The calibration tries each final step and (flow) form once: the sampler's own options as {} and every
    other final step, never the own one again (a duplicate would spend refinement trials twice)."""
    from comfyui_fast_samplers.samplers.calibration.pipeline import default_variants

    preset = SAMPLERS["fs_er_sde_ode_3_unic"]
    own = preset.options["final_step"]
    for flow in (False, True):
        variants = default_variants(preset.func, preset.options, flow)
        finals = [{}] + [v for v in variants if "flow_form" not in v]
        chosen = [v.get("final_step", own) for v in finals]
        assert sorted(chosen) == ["corrected", "denoise", "extrapolate"]
        forms = [v for v in variants if v.get("flow_form") == "sigma"]
        assert len(forms) == (3 if flow else 0) and len(forms) + len(finals) == len(variants) + 1
    plain = SAMPLERS["fs_er_sde_ode_3"]  # no corrector: no corrected final step
    assert sorted(v.get("final_step", "denoise") for v in [{}] + default_variants(plain.func, plain.options, False)) \
        == ["denoise", "extrapolate"]
    assert default_variants(sample_dpmpp_2m, {}, True) == []
