"""``calibrate_schedule``: SIGMAS for the user's own model and sampler, without data.

Pipeline (shared/specs/calibration.md section 2): the model's own fine ODE solve from a batch of noises is
the teacher; a dynamic program whose state is the sampler's own trajectory picks K steps on a candidate
grid; coordinate descent with the real sampler function refines them end to end; a hold-out batch with
its own teacher says how well the result generalises, next to stock schedules on the same noises.
"""
from __future__ import annotations

import functools
import math
import time
import warnings

import torch

from ..classic import plan_dpmpp_2m, plan_euler, sample_dpmpp_2m, sample_euler, sample_heun
from ..comfy_compat import model_sigma_range_and_table, start_noise_scaling
from ..dp_schedule import cache_key
from ..er_sde import check_options, plan_er_sde, sample_er_sde
from ..presets import SAMPLERS
from ..schedule import NoiseSchedule, resolve_schedule
from ..step_tuning import StepTuning, TunedModel, sample_tuned
from .report import VERSION, CalibrationReport, load_cached, save_cached
from .search import (
    SigmaRange, Stepper, candidate_grid, fine_grid, fit_step_tuning, mean_error, refine, solver_aware_dp,
    teacher_solve,
)

PACK_FUNCTIONS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}
TEACHER = functools.partial(sample_er_sde, order=3, noise_fn="ode", corrector=True)
TEACHER_ORDER = 4
# what a sampler raises on a schedule it cannot take (ComfyUI's uni_pc: a singular step matrix); an
# interruption (ComfyUI's InterruptProcessingException) is none of these and stops the calibration
SAMPLER_FAILURES = (RuntimeError, ValueError, ArithmeticError, IndexError)


class _CountingModel:
    """Counts batched calls; forwards everything else (ComfyUI samplers read model.inner_model...)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, sigma, **extra_args):
        self.calls += 1
        return self.model(x, sigma, **extra_args)

    def __getattr__(self, name):
        return getattr(self.model, name)


def resolve_sampler(sampler):
    """(function, options, label) for a pack name, a preset function or any k-diffusion-style callable."""
    if isinstance(sampler, str):
        if sampler in SAMPLERS:
            fn = SAMPLERS[sampler]
            return fn.func, dict(fn.options), sampler
        if sampler in PACK_FUNCTIONS:
            return PACK_FUNCTIONS[sampler], {}, sampler
        raise ValueError(f"Schedule calibrator: unknown sampler {sampler!r}; use one of "
                         f"{sorted(SAMPLERS) + sorted(PACK_FUNCTIONS)} or pass a sampler function.")
    if not callable(sampler):
        raise ValueError(f"Schedule calibrator: the sampler must be a name or a function, got "
                         f"{type(sampler).__name__}.")
    if hasattr(sampler, "preset_name"):  # samplers.presets.preset_function
        return sampler.func, dict(sampler.options), sampler.preset_name
    if isinstance(sampler, functools.partial):
        return sampler.func, dict(sampler.keywords), getattr(sampler.func, "__name__", "sampler")
    return sampler, {}, f"{getattr(sampler, '__module__', '')}.{getattr(sampler, '__qualname__', repr(sampler))}"


def planner_for(fn, options: dict, model):
    """The pack's plan function for (fn, options): sigmas -> rows; a DPM-Solver++(2M) stand-in (sigma form, as
    ComfyUI runs it) for any other sampler, whose own steps only the refinement sees."""
    native = resolve_schedule(model, options.get("parametrization"))
    if fn is sample_er_sde:
        kept = {k: options[k] for k in ("order", "derivatives", "quadrature", "flow_start", "final_step", "corrector",
                                        "flow_form") if k in options}
        noise_fn = check_options(**{k: v for k, v in options.items() if k in (
            "order", "derivatives", "quadrature", "flow_start", "final_step", "s_noise", "noise", "noise_fn", "eta",
            "power", "sde_1_a", "p", "a", "corrector", "flow_form")})
        return lambda sig: plan_er_sde(sig, native, noise_fn, s_noise=0.0, **kept).rows
    if fn is sample_euler:
        return plan_euler
    if fn is sample_dpmpp_2m:
        return lambda sig: plan_dpmpp_2m(sig, native)
    return lambda sig: plan_dpmpp_2m(sig, NoiseSchedule("ve"))


def default_variants(fn, options: dict, flow: bool) -> list[dict]:
    """Options of the pack's ER ODE samplers the calibration also tries: the final steps other than the
    sampler's own (denoise, Taylor extrapolation and, with the corrector, the corrected clean prediction) and,
    on flow models, the other flow form of hybrid / sigma (``er_sde.FLOW_FORMS``) with each. None for other
    samplers."""
    if not tunable(fn, options):
        return []
    own = options.get("final_step", "denoise")
    finals = [{}] + [{"final_step": f} for f in ("denoise", "extrapolate", "corrected")
                     if f != own and (f != "corrected" or options.get("corrector"))]
    own_form = options.get("flow_form") or "hybrid"
    forms = [{}] + ([{"flow_form": f} for f in ("hybrid", "sigma") if f != own_form]
                    if flow and options.get("parametrization") is None else [])
    return [{**form, **final} for form in forms for final in finals if form or final]


def tunable(fn, options: dict) -> bool:
    """Whether the pack's ODE variants (final steps, flow forms) apply: its ER samplers in their ODE form."""
    return fn is sample_er_sde and options.get("noise_fn", "sde_5") == "ode"


def calls_per_step(run_on, model, schedule) -> int:
    """Model calls of one run (``run_on(model)``): ``step_tuning`` needs one per step."""
    probe = TunedModel(model, StepTuning(), schedule)
    try:
        run_on(probe)
    except SAMPLER_FAILURES:
        return -1
    return probe.calls


def model_sigma_range(model, parametrization=None, sigma_min=None, sigma_max=None) -> SigmaRange:
    """From ComfyUI's model_sampling (sigma_min / sigma_max, and its table when the model is discrete: its
    timestep() rounds to a table index), from the model's own attributes, or from the options."""
    schedule = resolve_schedule(model, parametrization)
    comfy_range = model_sigma_range_and_table(model)
    if comfy_range is not None:
        lo, hi, table = comfy_range
    else:
        lo, hi, table = getattr(model, "sigma_min", None), getattr(model, "sigma_max", None), None
    lo = float(sigma_min) if sigma_min is not None else lo
    hi = float(sigma_max) if sigma_max is not None else (1.0 if schedule.is_flow and hi is None else hi)
    if lo is None or hi is None:
        raise ValueError("Schedule calibrator: the model has no sigma range; pass sigma_min and sigma_max "
                         "(and parametrization) as options.")
    if not 0 < lo < hi or (schedule.is_flow and hi > 1.0):
        raise ValueError(f"Schedule calibrator: bad sigma range [{lo}, {hi}] for a {schedule.parametrization} model.")
    return SigmaRange(schedule, lo, hi, table)


def start_state(model, noise: torch.Tensor, rng: SigmaRange) -> torch.Tensor:
    """x at the start as a ComfyUI run sees it (model_sampling.noise_scaling at max denoise), else s * noise."""
    sigma = torch.tensor(rng.sigma_max, dtype=torch.float64)
    x = start_noise_scaling(model, sigma, noise)
    return float(rng.schedule.s(sigma)) * noise if x is None else x


def check_deterministic(run, x: torch.Tensor, sigmas: torch.Tensor, who: str) -> None:
    try:
        a, b = run(x[:2], sigmas, seed=0), run(x[:2], sigmas, seed=1)
    except SAMPLER_FAILURES as err:
        raise ValueError(f"{who}: the sampler failed on the schedule {[round(float(s), 4) for s in sigmas]}: "
                         f"{type(err).__name__}: {err}") from err
    if not torch.equal(a, b):
        raise ValueError(f"{who}: the sampler is stochastic (two seeds gave different results); calibrate its "
                         "deterministic (ODE) form: the teacher is the model's ODE.")


def _stock_sigmas(rng: SigmaRange, steps: int) -> dict:
    """Reference schedules on the model's range when the caller gives none: z-uniform (from the top interior
    sigma on flow models) and karras (VE) or shift-3 'simple' (flow)."""
    from ..schedule import flow_shift_sigmas, karras_sigmas, log_lam_uniform_sigmas

    head = torch.tensor([rng.sigma_max], dtype=torch.float64)
    if rng.top < rng.sigma_max:
        uniform = torch.cat([head, log_lam_uniform_sigmas(max(steps - 2, 0), rng.sigma_min, rng.top, rng.schedule,
                                                          True)]) if steps > 1 else torch.cat([head, head * 0])
    else:
        uniform = log_lam_uniform_sigmas(steps - 1, rng.sigma_min, rng.sigma_max, rng.schedule, True)
    out = {"log-SNR uniform": uniform}
    if rng.schedule.is_flow:
        out["simple (shift 3)"] = flow_shift_sigmas(steps, 3.0)
    else:
        out["karras"] = karras_sigmas(steps, rng.sigma_min, rng.sigma_max)
    return {name: s.to(torch.float32) for name, s in out.items()}


def emit(rng: SigmaRange, z: list[float]) -> torch.Tensor:
    """Float32 SIGMAS: the start, the interior sigmas for z, 0."""
    interior = rng.sigma(torch.tensor(z, dtype=torch.float64))
    return torch.cat([torch.tensor([rng.sigma_max], dtype=torch.float64), interior,
                      torch.zeros(1, dtype=torch.float64)]).to(torch.float32)


def check_sigmas(sigmas: torch.Tensor, steps: int, who: str) -> None:
    if sigmas.ndim != 1 or len(sigmas) != steps + 1 or sigmas[-1] != 0 or not (sigmas[1:] < sigmas[:-1]).all():
        raise RuntimeError(f"{who}: produced an invalid schedule {sigmas.tolist()} (a bug: please report it).")


@torch.no_grad()
def calibrate_schedule(model, noise: torch.Tensor, steps: int, sampler, *, extra_args: dict | None = None,
                       parametrization: str | None = None, sigma_min: float | None = None,
                       sigma_max: float | None = None, candidates: int = 64, teacher_substeps: int = 4,
                       holdout: int | torch.Tensor | None = None, seed: int = 0, refine_trials: int | None = None,
                       min_gap: float = 0.05, stock: dict | None = None, variants: list | None = None,
                       tune_steps: bool = True, tune_trials: int | None = None, max_rows: int = 1 << 16,
                       progress=None, cache_dir=None, model_key: str | None = None, who: str = "Schedule calibrator"):
    """(SIGMAS float32 [steps + 1], CalibrationReport) for ``sampler`` on ``model`` (module docstring).

    ``noise``: unit Gaussian noise [N, *latent_shape] (the calibration batch); ``sampler``: a name of the
    pack's dropdown (``SAMPLERS``), 'euler' / 'dpmpp_2m', or any deterministic k-diffusion-convention
    function. The sigma range comes from the model's ``model_sampling`` or from ``sigma_min`` /
    ``sigma_max``. ``holdout``: a number of fresh noises (drawn with ``seed``) or a noise tensor, 0 for none
    (default: as many as ``noise``). ``stock``: {name: SIGMAS} to compare with (default karras / log-SNR
    uniform). ``variants``: option dicts for a pack sampler to try (default ``default_variants``: the final
    steps and, on flow models, the ODE's sigma form); the best goes into the report's ``sampler_options``.
    ``tune_steps`` (samplers that call the model once per step): then fit per-step query shifts and output and
    noise extrapolations (``step_tuning``), first for the schedule, then together with it (``tune_trials``
    runs, default 10 x candidates), kept in ``sampler_options`` only where they lower the error (on the
    hold-out noises when there are any: else the schedule before the tuning is returned); run a sampler with
    them through ``step_tuning.sample_tuned``, as the node's SAMPLER output does.
    ``progress(stage, done, total)`` may raise to stop (nothing is written then). ``cache_dir`` +
    ``model_key`` (a string naming the model, conditioning and cfg): results are stored there, and the same
    call again returns them without a model call."""
    t0 = time.perf_counter()
    extra_args = {} if extra_args is None else dict(extra_args)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{who}: steps must be a positive integer, got {steps!r}.")
    if noise.ndim < 2 or noise.shape[0] < 1 or not torch.isfinite(noise).all():
        raise ValueError(f"{who}: noise must be a finite batch [N, ...] of unit Gaussian noise, got "
                         f"shape {tuple(noise.shape)}.")
    fn, options, label = resolve_sampler(sampler)
    rng = model_sigma_range(model, parametrization, sigma_min, sigma_max)
    key = None
    if cache_dir is not None:
        if not model_key:
            raise ValueError(f"{who}: a cache needs a model_key naming the model, its conditioning and cfg.")
        key = cache_key(VERSION, model_key, noise, holdout if isinstance(holdout, torch.Tensor) else str(holdout),
                        steps, label, sorted(options.items()), rng.schedule.parametrization, rng.sigma_min,
                        rng.sigma_max, candidates, teacher_substeps, seed, refine_trials, min_gap,
                        repr(variants), tune_steps, tune_trials,
                        *[part for name in sorted(stock or {}) for part in (name, stock[name])])
        hit = load_cached(cache_dir, key)
        if hit is not None:
            return hit
    counter = _CountingModel(model)
    calls: dict[str, int] = {}
    report_progress = progress or (lambda stage, done, total: None)

    def stage(name):
        calls[name] = calls.get(name, 0) - counter.calls

    def end(name):
        calls[name] += counter.calls

    grid = candidate_grid(rng, candidates)
    nodes = grid[grid < rng.sigma_max]
    if len(nodes) < steps - 1:
        raise ValueError(f"{who}: {steps} steps need more candidate noise levels than {len(nodes)}; raise "
                         "'candidates' or lower 'steps'.")
    fine, node_index = fine_grid(rng, nodes, teacher_substeps)
    x_cal = start_state(model, noise, rng)

    def teacher(x):
        states, final = teacher_solve(TEACHER, counter, x, fine, node_index, extra_args)
        if not torch.isfinite(final).all():
            raise ValueError(f"{who}: the model returned NaN or infinity during the teacher solve.")
        return states, final

    report_progress("teacher", 0, 3)
    stage("teacher")
    states, final = teacher(x_cal)
    report_progress("teacher", 1, 3)
    coarse, _ = fine_grid(rng, nodes, max(1, teacher_substeps // 2))
    half = TEACHER(counter, x_cal.clone(), coarse, extra_args=dict(extra_args), disable=True)
    teacher_error = mean_error(final, half) / (2**TEACHER_ORDER - 1)
    end("teacher")
    report_progress("teacher", 2, 3)

    def run(fn_options, x, sigmas, seed=None):
        args = dict(extra_args) if seed is None else dict(extra_args, seed=seed)
        sigmas = sigmas.to(torch.promote_types(sigmas.dtype, x.dtype), copy=True)  # samplers may write into it
        if "step_tuning" in fn_options:  # any sampler, through the wrapper the SAMPLER output uses
            return sample_tuned(counter, x.clone(), sigmas, extra_args=args, disable=True, sampler=fn, **fn_options)
        return fn(counter, x.clone(), sigmas, extra_args=args, disable=True, **fn_options)

    stock = _stock_sigmas(rng, steps) if stock is None else dict(stock)
    init = next(iter(stock.values()))
    stage("checks")
    check_deterministic(lambda x, s, seed: run(options, x, s, seed), x_cal, init, who)
    once_per_step = calls_per_step(lambda model: fn(model, x_cal[:1].clone(), init.to(
        torch.promote_types(init.dtype, x_cal.dtype), copy=True), extra_args=dict(extra_args), disable=True, **options),
        counter, rng.schedule) == steps
    end("checks")

    stage("dp")
    stepper = Stepper(planner_for(fn, options, model))
    path, _ = solver_aware_dp(counter, stepper, x_cal, rng.sigma_max, nodes, states, final, steps, extra_args,
                              max_rows, lambda d, t: report_progress("search", d, t))
    end("dp")

    # starting points for the refinement: the DP path and every stock schedule, with every option variant
    stage("refine")
    if variants is None:
        variants = default_variants(fn, options, rng.schedule.is_flow)
    variants = [{}] + [dict(v) for v in variants]
    starts = {"dp": emit(rng, rng.z(torch.tensor(path[1:], dtype=torch.float64)).tolist())}
    starts.update({name: s for name, s in stock.items() if len(s) == steps + 1})
    failures = []

    def score(fn_options, x, sigmas, target) -> float:
        """Error of one run; a schedule the sampler cannot run (e.g. a singular step matrix) scores inf."""
        try:
            return mean_error(run(fn_options, x, sigmas), target)
        except SAMPLER_FAILURES as err:
            failures.append(f"{type(err).__name__}: {err}")
            return math.inf

    stock_cal = {name: score(options, x_cal, s, final) for name, s in stock.items()}
    scored = [(stock_cal[name] if not v and name in stock_cal else score({**options, **v}, x_cal, sigmas, final),
               name, tuple(v.items()), sigmas) for v in variants for name, sigmas in starts.items()]
    if not math.isfinite(min(t[0] for t in scored)):
        raise ValueError(f"{who}: the sampler failed or gave NaN on every schedule tried ({failures[:1]}).")
    # every variant gets a short refinement from its best start; the best of them gets the rest of the budget
    budget = refine_trials if refine_trials is not None else 2 * candidates
    short = max(1, budget // 4) if len(variants) > 1 else budget
    tried = []
    for v in variants:
        error0, _, _, init_sigmas = min((t for t in scored if t[2] == tuple(v.items())), key=lambda t: t[0])
        if not math.isfinite(error0):
            continue
        fn_options = {**options, **v}
        z_v, error_v, _ = refine(lambda z, o=fn_options: score(o, x_cal, emit(rng, z), final),
                                 rng.z(init_sigmas[1:-1].to(torch.float64)).tolist(), rng, min_gap, short,
                                 progress=lambda d, t: report_progress("refine", d, t))
        tried.append((error_v, z_v, fn_options))
    _, z_best, chosen = min(tried, key=lambda t: t[0])
    z_best, cal_error, _ = refine(lambda z: score(chosen, x_cal, emit(rng, z), final), z_best, rng, min_gap,
                                  budget - short if len(variants) > 1 else 1, delta=0.0625,
                                  progress=lambda d, t: report_progress("refine", d, t))
    sigmas = emit(rng, z_best)
    check_sigmas(sigmas, steps, who)
    end("refine")

    # the schedule untuned, tuned, and moved with its tuning: the lowest calibration error wins, or with
    # hold-out noises the lowest error on them (the more freedom, the more room to overfit a small batch)
    fits = [("untuned", chosen, sigmas, cal_error)]
    if tune_steps and once_per_step:
        stage("tune")
        phases, _ = fit_step_tuning(
            lambda z, t: score({**chosen, "step_tuning": t}, x_cal, emit(rng, z), final), rng, z_best, min_gap,
            tune_trials if tune_trials is not None else 10 * candidates,
            progress=lambda d, t: report_progress("tune", d, t))
        end("tune")
        for name, (z, tuning, error) in zip(("tuned", "tuned with the schedule"), phases):
            if error < cal_error:
                fits.append((name, {**chosen, "step_tuning": tuning.as_option()}, emit(rng, z), error))
    fit, chosen, sigmas, cal_error = min(fits, key=lambda t: t[3])
    check_sigmas(sigmas, steps, who)

    holdout_error, stock_errors, warns = None, {name: (err, None) for name, err in stock_cal.items()}, []
    if holdout is None:
        holdout = noise.shape[0]
    if isinstance(holdout, torch.Tensor) or holdout > 0:
        stage("hold-out")
        x_hold = holdout if isinstance(holdout, torch.Tensor) else torch.randn(
            (holdout, *noise.shape[1:]), generator=torch.Generator().manual_seed(int(seed) + 1),
            dtype=noise.dtype).to(noise.device)
        x_hold = start_state(model, x_hold, rng)
        _, final_hold = teacher(x_hold)
        on_hold = [(score(o, x_hold, s, final_hold), name, o, s, e) for name, o, s, e in fits]
        holdout_error, best, best_options, best_sigmas, best_cal = min(on_hold, key=lambda t: t[0])
        if best != fit:
            mine = next(t[0] for t in on_hold if t[1] == fit)
            warns.append(f"{fit}, the best fit of the calibration noises, did worse on the hold-out noises than "
                         f"{best} ({mine:.4g} vs {holdout_error:.4g}): kept {best}")
            chosen, sigmas, cal_error = best_options, best_sigmas, best_cal
        for name, s in stock.items():
            stock_errors[name] = (stock_cal[name], score(options, x_hold, s, final_hold))
        end("hold-out")
        if holdout_error > 1.5 * cal_error:
            warns.append(f"the hold-out error is {holdout_error / cal_error:.1f}x the calibration error: more "
                         "noises would make the schedule generalise better")
    reference = holdout_error if holdout_error is not None else cal_error
    if teacher_error > 0.1 * reference:
        warns.append(f"the teacher is not converged enough (error estimate {teacher_error:.3g} vs the schedule's "
                     f"{reference:.3g}): raise teacher_substeps")
    for w in warns:
        warnings.warn(f"{who}: {w}", stacklevel=2)
    changed = {k: v for k, v in chosen.items() if options.get(k) != v}
    report = CalibrationReport(steps, label, [float(s) for s in sigmas], cal_error, holdout_error, stock_errors,
                               teacher_error, calls, changed, time.perf_counter() - t0, warns)
    if key is not None:
        save_cached(cache_dir, key, sigmas, report)
    return sigmas, report
