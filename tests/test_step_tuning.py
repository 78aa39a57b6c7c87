"""Per-step tuning (``step_tuning``, run through ``sample_tuned``: query shifts, output and noise extrapolations)
against independent references: a model wrapper that does the same by call index around the untuned sampler,
and an Euler written with the noise extrapolation in its own terms (gradient estimation); and the calibrator's
use of it on the exact 2-D model."""
import math

import pytest
import torch

from comfyui_fast_samplers.samplers import calibrate_schedule, sample_er_sde, sample_tuned
from comfyui_fast_samplers.samplers.schedule import flow_shift_sigmas, karras_sigmas
from comfyui_fast_samplers.samplers.step_tuning import StepTuning, query_shift_bounds
from comfyui_fast_samplers.testbeds.mixtures import ExactModel, default_mixture

ODE = dict(order=3, noise_fn="ode", corrector=True, final_step="corrected")


class ByCall:
    """The reference: per model call i, ask the model at ``sigma_of(i, sigma)`` and hand the sampler
    D_i + g_i (D_i - D_{i-1}) - k_i (s / alpha)(eps_i - eps_{i-1}) (raw outputs; eps = (x - alpha D) / s at the
    sampler's sigma, alpha and s written here for VE (1, sigma) and flow (1 - sigma, sigma))."""

    def __init__(self, model, sigma_of, gammas, ks=None, flow=False):
        self.model, self.sigma_of, self.gammas, self.i, self.prev, self.asked = model, sigma_of, gammas, 0, None, []
        self.ks, self.flow, self.prev_eps = ks or [0.0] * len(gammas), flow, None

    def __call__(self, x, sigma, **kw):
        i, self.i = self.i, self.i + 1
        own = float(sigma[0])
        sigma = torch.full_like(sigma, self.sigma_of(i, own))
        self.asked.append(float(sigma[0]))
        d = self.model(x, sigma, **kw)
        out = d if self.gammas[i] == 0 else d + self.gammas[i] * (d - self.prev)
        alpha = 1 - own if self.flow else 1.0
        eps = (x - alpha * d) / own
        if self.ks[i] != 0:
            out = out - self.ks[i] * own / alpha * (eps - self.prev_eps)
        self.prev, self.prev_eps = d, eps
        return out

    def __getattr__(self, name):  # the model's type (VE / flow) as the sampler reads it
        return getattr(self.model, name)


def _noise(n, seed=0):
    return torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_tuning_equals_the_by_call_reference(kind):
    """On an unequal grid (Karras / shift 3 plus a random jitter) every shift and weight differs per step; the
    tuned run equals the untuned sampler around the reference wrapper. The flow start (sigma = 1) keeps
    shift 0; the VE query sigma is sigma e^d, the flow one the sigma of log lam + d computed here by hand."""
    steps = 6
    gen = torch.Generator().manual_seed(3)
    if kind == "ve":
        sigmas = karras_sigmas(steps, 0.03, 14.6).to(torch.float64)
    else:
        sigmas = flow_shift_sigmas(steps, 3.0).to(torch.float64)
    jitter = 1 + 0.05 * torch.rand(steps - 1, generator=gen, dtype=torch.float64)
    sigmas[1:-1] = (sigmas[1:-1] * jitter).clamp(max=0.99 if kind == "flow" else 14.0)
    sigmas[1:-1] = sigmas[1:-1].sort(descending=True).values
    shifts = [0.0 if kind == "flow" else -0.2, 0.13, -0.07, 0.21, -0.11, 0.05]
    gammas = [0.0, 0.4, -0.3, 0.25, -0.15, 0.1]
    ks = [0.0, -0.35, 0.6, 0.2, -0.45, 0.3]
    model = ExactModel(default_mixture(), kind)
    x = _noise(64) * (14.6 if kind == "ve" else 1.0)

    def shifted(i, sigma):
        if shifts[i] == 0:
            return sigma
        if kind == "ve":
            return sigma * math.exp(shifts[i])
        lam = sigma / (1 - sigma) * math.exp(shifts[i])
        return lam / (1 + lam)

    reference = ByCall(model, shifted, gammas, ks, flow=kind == "flow")
    expected = sample_er_sde(reference, x.clone(), sigmas.clone(), **ODE)
    recorder = ByCall(model, lambda i, s: s, [0.0] * steps)
    tuned = sample_tuned(recorder, x.clone(), sigmas.clone(), sampler=sample_er_sde, **ODE,
                         step_tuning={"query_shift": shifts, "output_extrapolation": gammas,
                                      "noise_extrapolation": ks})
    assert recorder.asked == pytest.approx(reference.asked, rel=1e-12)
    torch.testing.assert_close(tuned, expected, rtol=1e-12, atol=1e-12)
    plain = sample_er_sde(model, x.clone(), sigmas.clone(), **ODE)
    assert (tuned - plain).abs().max() > 1e-3  # the tuning changes the result
    zeros = sample_tuned(model, x.clone(), sigmas.clone(), sampler=sample_er_sde, **ODE,
                         step_tuning={"query_shift": [0.0] * steps, "output_extrapolation": [0.0] * steps})
    assert torch.equal(zeros, plain)


def test_bad_tuning_is_refused():
    model = ExactModel(default_mixture(), "ve")
    sigmas = karras_sigmas(4, 0.03, 14.6)
    x = _noise(4) * 14.6

    def run(tuning, model=model, x=x, sigmas=sigmas):
        return sample_tuned(model, x, sigmas, sampler=sample_er_sde, **ODE, step_tuning=tuning)

    with pytest.raises(ValueError, match="3 values for a schedule of 4 steps"):
        run({"query_shift": [0.1, 0.0, 0.0]})
    with pytest.raises(ValueError, match=r"output_extrapolation\[0\] must be 0"):
        run({"output_extrapolation": [0.1, 0.0, 0.0, 0.0]})
    with pytest.raises(ValueError, match=r"noise_extrapolation\[0\] must be 0"):
        run({"noise_extrapolation": [0.1, 0.0, 0.0, 0.0]})
    with pytest.raises(ValueError, match="must be a dict"):
        run({"shift": [0.0] * 4})
    with pytest.raises(ValueError, match="non-finite"):
        run({"query_shift": [0.0, math.nan, 0.0, 0.0]})
    with pytest.raises(ValueError, match="started at sigma = 1"):
        run({"query_shift": [0.1, 0.0, 0.0, 0.0]}, ExactModel(default_mixture(), "flow"), x / 14.6,
            flow_shift_sigmas(4, 3.0))


def _euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A black-box VE Euler (what a ComfyUI sampler is to the wrapper)."""
    for i in range(len(sigmas) - 1):
        d = model(x, sigmas[i] * x.new_ones(len(x)), **(extra_args or {}))
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - d) / sigmas[i]
    return x


def _heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
    for i in range(len(sigmas) - 1):
        d = (x - model(x, sigmas[i] * x.new_ones(len(x)))) / sigmas[i]
        if sigmas[i + 1] == 0:
            x = x - sigmas[i] * d
            continue
        x2 = x + (sigmas[i + 1] - sigmas[i]) * d
        d2 = (x2 - model(x2, sigmas[i + 1] * x.new_ones(len(x)))) / sigmas[i + 1]
        x = x + (sigmas[i + 1] - sigmas[i]) * (d + d2) / 2
    return x


def _gradient_estimation_euler(model, x, sigmas, shifts, gammas, ks):
    """Euler with every tuning written in its own terms: the direction d = (x - D~) / sigma of the
    output-extrapolated D~, plus k_i times the change of the raw direction (x - D_i) / sigma_i since the
    previous step (Permenter & Yuan's gradient estimation, ComfyUI's gradient_estimation for k = 1)."""
    previous = previous_d = None
    for i in range(len(sigmas) - 1):
        raw = model(x, sigmas[i] * math.exp(shifts[i]) * x.new_ones(len(x)))
        extrapolated = raw if previous is None else raw + gammas[i] * (raw - previous)
        raw_d = (x - raw) / sigmas[i]
        d = (x - extrapolated) / sigmas[i] + (ks[i] * (raw_d - previous_d) if previous_d is not None else 0)
        x, previous, previous_d = x + (sigmas[i + 1] - sigmas[i]) * d, raw, raw_d
    return x


def test_any_sampler_through_the_tuned_model():
    """sample_tuned around a black-box Euler equals the Euler with the tuning written in by hand; a sampler
    with two calls a step is refused after its run, with the node-free name."""
    steps = 5
    sigmas = karras_sigmas(steps, 0.03, 14.6).to(torch.float64)
    sigmas[2] *= 1.07  # an unequal grid that is not Karras either
    shifts, gammas, ks = [-0.3, 0.2, -0.1, 0.15, -0.05], [0.0, 0.5, -0.2, 0.3, 0.1], [0.0, 0.7, -0.4, 1.0, 0.25]
    model = ExactModel(default_mixture(), "ve")
    x = _noise(32) * 14.6
    expected = _gradient_estimation_euler(model, x.clone(), sigmas, shifts, gammas, ks)
    tuned = sample_tuned(model, x.clone(), sigmas, sampler=_euler, step_tuning={
        "query_shift": shifts, "output_extrapolation": gammas, "noise_extrapolation": ks})
    torch.testing.assert_close(tuned, expected, rtol=1e-12, atol=1e-12)
    plain = _euler(model, x.clone(), sigmas)
    assert (tuned - plain).abs().max() > 1e-2
    with pytest.raises(ValueError, match="called the model 9 times for 5 steps"):
        sample_tuned(model, x.clone(), sigmas, sampler=_heun, step_tuning={"query_shift": shifts})


def test_query_shift_bounds_keep_queries_ordered_and_in_range():
    z = [2.0, 1.0, -0.5, -2.5]
    bounds = query_shift_bounds(z, 2.0)
    assert bounds == [(-0.5, 0.0), (-0.75, 0.5), (-1.0, 0.75), (-1.0, 1.0)]
    flow = query_shift_bounds([math.inf, 1.0, 0.0], 1.5)
    assert flow[0] == (0.0, 0.0) and flow[1] == (-0.5, 0.5) and flow[2] == (-0.5, 0.5)
    # the extremes of neighbouring bounds meet at the midpoint: queries stay in the schedule's order
    for (lo_a, _), (_, hi_b), a, b in zip(bounds[:-1], bounds[1:], z[:-1], z[1:]):
        assert a + lo_a == pytest.approx(b + hi_b)


def test_calibrator_tunes_the_ode_and_the_tuning_generalises():
    """Exact 2-D VE model, 5 steps, the default ODE preset: the tuning, fitted with the schedule, lowers the
    hold-out error (measured 0.036 -> 0.014; 0.024 with the tuning fitted after the schedule); the schedule it returns is valid and the query shifts stay within
    the bounds of that schedule (not only of the one the tuning started from)."""
    model = ExactModel(default_mixture(), "ve")
    common = dict(sigma_min=0.0292, sigma_max=14.615, candidates=24, teacher_substeps=2, refine_trials=30,
                  holdout=256)
    plain_sigmas, plain = calibrate_schedule(model, _noise(128), 5, "fs_er_sde_ode_3_unic", tune_steps=False,
                                             **common)
    sigmas, tuned = calibrate_schedule(model, _noise(128), 5, "fs_er_sde_ode_3_unic", **common)
    assert "step_tuning" in tuned.sampler_options and "step_tuning" not in plain.sampler_options
    assert tuned.model_calls["tune"] > 0
    assert tuned.holdout_error < 0.85 * plain.holdout_error, (tuned.to_text(), plain.to_text())
    assert tuned.sigmas == [float(s) for s in sigmas] and not torch.equal(sigmas, plain_sigmas)
    assert sigmas[0] == plain_sigmas[0] and sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()
    tuning = StepTuning.from_option(tuned.sampler_options["step_tuning"], 5, "test")
    assert any(tuning.query_shift) and any(tuning.output_extrapolation) and any(tuning.noise_extrapolation)
    log_lams = torch.log(sigmas[:-1].to(torch.float64)).tolist()  # VE: lam = sigma
    for d, (low, high) in zip(tuning.query_shift, query_shift_bounds(log_lams, math.log(14.615))):
        assert low - 1e-9 <= d <= high + 1e-9
    text = tuned.to_text()
    assert "step tuning (in the SAMPLER output" in text and "noise extrapolations" in text
    assert "step tuning" not in plain.to_text()


def test_calibrator_tunes_a_black_box_sampler_and_skips_one_with_two_calls_a_step():
    """Euler at 5 steps, measured 0.185 -> 0.033 on the hold-out noises; Heun (two calls a step) is not tuned."""
    model = ExactModel(default_mixture(), "ve")
    common = dict(sigma_min=0.0292, sigma_max=14.615, candidates=24, teacher_substeps=2, refine_trials=30,
                  holdout=256)
    sigmas, plain = calibrate_schedule(model, _noise(128), 5, _euler, tune_steps=False, **common)
    _, tuned = calibrate_schedule(model, _noise(128), 5, _euler, **common)
    assert tuned.holdout_error < 0.85 * plain.holdout_error, (tuned.to_text(), plain.to_text())
    out = sample_tuned(model, _noise(8) * 14.615, sigmas, sampler=_euler, **tuned.sampler_options)
    assert torch.isfinite(out).all()
    _, heun = calibrate_schedule(model, _noise(64), 3, _heun, **common)
    assert "tune" not in heun.model_calls and "step_tuning" not in heun.sampler_options


def test_joint_search_keeps_the_query_shifts_within_the_moving_schedule():
    """fit_step_tuning on a synthetic objective that rewards large upward query shifts and pulls the schedule
    together (smaller gaps, so smaller shift bounds): every trial it makes, and its result, keep each shift
    within ``query_shift_bounds`` of that trial's own schedule, and the schedule does move."""
    from comfyui_fast_samplers.samplers.calibration.search import SigmaRange, fit_step_tuning
    from comfyui_fast_samplers.samplers.schedule import NoiseSchedule

    rng = SigmaRange(NoiseSchedule("ve"), 0.03, 14.6)
    z0 = [1.5, 0.5, -0.5, -2.0]
    target = [1.0, 0.6, 0.2, -0.2]
    start, top = math.log(14.6), math.log(14.6)
    violations = []

    def objective(z, tuning):
        bounds = query_shift_bounds([start] + list(z), top)
        violations.extend(d for d, (low, high) in zip(tuning.query_shift, bounds) if not low - 1e-9 <= d <= high + 1e-9)
        return sum((a - b) ** 2 for a, b in zip(z, target)) - 0.1 * sum(tuning.query_shift)

    phases, trials = fit_step_tuning(objective, rng, z0, 0.05, 400)
    (z_fixed, _, fixed_error), (z, tuning, error) = phases
    assert not violations and trials <= 400 and z_fixed == z0 and error <= fixed_error
    assert max(abs(a - b) for a, b in zip(z, z0)) > 0.2
    assert error < objective(z0, StepTuning()) - 0.1


def test_hold_out_noises_choose_between_the_fits(monkeypatch):
    """The calibrator keeps, of the untuned schedule, the tuned one and the one moved with its tuning, the one
    with the lowest hold-out error: a fit that claims the lowest calibration error (here a stand-in that
    reports 0 for a tuning that extrapolates far too much) is dropped, with a warning naming both."""
    from comfyui_fast_samplers.samplers.calibration import pipeline
    from comfyui_fast_samplers.samplers.calibration.search import fit_step_tuning

    def overfitted(*args, **kwargs):
        phases, trials = fit_step_tuning(*args, **kwargs)
        z, tuning, _ = phases[1]
        bad = StepTuning(tuning.query_shift, (0.0,) + (1.0,) * (len(z)), (0.0,) + (-1.0,) * (len(z)))
        return [phases[0], (z, bad, 0.0)], trials

    monkeypatch.setattr(pipeline, "fit_step_tuning", overfitted)
    model = ExactModel(default_mixture(), "ve")
    common = dict(sigma_min=0.0292, sigma_max=14.615, candidates=24, teacher_substeps=2, refine_trials=30,
                  holdout=256)
    with pytest.warns(UserWarning, match="tuned with the schedule, the best fit of the calibration noises, did "
                                         "worse on the hold-out noises than tuned"):
        _, report = calibrate_schedule(model, _noise(128), 5, "fs_er_sde_ode_3_unic", **common)
    kept = StepTuning.from_option(report.sampler_options["step_tuning"], 5, "test")
    assert kept.output_extrapolation[1:] != (1.0,) * 4 and report.calibration_error > 0
    assert report.holdout_error < 0.03  # the tuned fit's (measured 0.024; untuned 0.036, the stand-in 0.56)
