"""ER-SDE-Solvers (Cui et al., arXiv 2309.06169): exact-coefficient multistep solvers of the
extended reverse-time SDE family, orders 1-3, for VE, VP and flow models.

Every step is a row of the shared multistep core, ``x <- A x + W0 D_i + W1 D_{i-1} + ... + E z``, with
float64 scalars computed once per run (``plan_er_sde``), executed by ``multistep.run_rows``.
Derivation and measurements: shared/specs/er_sde.md.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .comfy_compat import flow_start_offset_sigma
from .common import seeded_noise_sampler, setup_run, step_noise_scale
from .er_sde_ode_plan import (
    batched_ode_rows, batched_plan_applies, corrector_change, final_step_weights, predictor_weight_rows, weighted_rows,
)
from .multistep import StepRow, merged_weights, run_rows
from .noise_scales import (  # noqa: F401  (re-exported: the public names of ER-SDE's noise functions)
    LOG10, NOISE_FUNCTIONS, NoiseFunction, make_noise_function, power_law, sde_1, taylor_coefficient_rows,
    taylor_coefficients, taylor_coefficients_comfy, taylor_coefficients_power, taylor_coefficients_quadrature,
)
from .schedule import NoiseSchedule


# ---- the plan: one row of float64 scalars per step -------------------------------------------

@dataclass
class ERSDEPlan:
    model_sigmas: torch.Tensor  # float64, the sigmas the model is queried at
    rows: list = field(default_factory=list)  # multistep.StepRow, weights on D_i, D_{i-1}, ...
    clocks: dict = field(default_factory=dict)  # (sigma, sigma_next) -> Brownian clock (tau_s, tau_t)
    clamped_steps: int = 0  # steps where kappa < 1 forced q <= 1 (no noise)


ORDERS = (1, 2, 3)
DERIVATIVES = ("corrected", "paper")
QUADRATURES = ("exact", "comfy_riemann")
FLOW_STARTS = ("exact", "comfy_offset")
FINAL_STEPS = ("denoise", "extrapolate", "corrected")
# The variable a flow model's ODE steps interpolate the denoiser in: lambda = sigma / (1 - sigma) (infinite at
# sigma = 1, so the first evaluation drops out of the next steps' history), sigma (keeps it: what ComfyUI's
# samplers do), or sigma on the steps whose history holds sigma = 1 and lambda after them.
FLOW_FORMS = ("hybrid", "lambda", "sigma")
NOISE_KINDS = ("gaussian", "brownian")


def check_options(order=3, derivatives="corrected", quadrature="exact", flow_start="exact",
                  final_step="denoise", s_noise=1.0, noise="gaussian", noise_fn="sde_5", eta=1.0, power=None,
                  sde_1_a=None, corrector=False, flow_form=None, *, p=None, a=None):
    """The noise function of these options; a ValueError naming a bad one (the node calls this before sampling
    starts). ``p``, ``a``: the deprecated names of ``power``, ``sde_1_a``."""
    for value, allowed, what in ((order, ORDERS, "order"), (derivatives, DERIVATIVES, "derivatives"),
                                 (quadrature, QUADRATURES, "quadrature"), (flow_start, FLOW_STARTS, "flow_start"),
                                 (final_step, FINAL_STEPS, "final_step"), (noise, NOISE_KINDS, "noise")):
        if value not in allowed:
            raise ValueError(f"ER-SDE: {what} must be one of {allowed}, got {value!r}.")
    if s_noise < 0:
        raise ValueError(f"ER-SDE: s_noise must be >= 0, got {s_noise}.")
    fn = make_noise_function(noise_fn, eta=eta, power=power, sde_1_a=sde_1_a, p=p, a=a)
    if corrector and not fn.deterministic:
        raise ValueError(f"ER-SDE: the corrector is for the ODE only (noise_fn 'ode' or eta 0), got {fn.name}.")
    if flow_form is not None and flow_form not in FLOW_FORMS:
        raise ValueError(f"ER-SDE: flow_form must be one of {FLOW_FORMS}, got {flow_form!r}.")
    if flow_form not in (None, "lambda") and not fn.deterministic:
        raise ValueError(f"ER-SDE: flow_form {flow_form!r} is for the ODE only (noise_fn 'ode' or eta 0); the SDE "
                         "runs in lambda.")
    return fn


def resolved_flow_form(flow_form, noise_fn: NoiseFunction) -> str:
    """The default: 'hybrid' for the ODE (lower error than 'lambda' in 52 of 72 stock flow-schedule cells,
    benchmarks/results/preset_options.md), 'lambda' for the SDE."""
    if flow_form is not None:
        return flow_form
    return "hybrid" if noise_fn.deterministic else "lambda"


def _ode_correction(lam_t: float, lam_s: float, alpha_t: float, nodes: list[float], predictor, fn: NoiseFunction,
                    quadrature: str, c=None):
    """Weights on (D_t, D_s, D_{s1}, ...) of the corrector's change of x_t (UniC-style, exact weights;
    ``er_sde_ode_plan.corrector_change``). ``c``: the step's (c2, ..., c_{len(nodes)+1}) when already known."""
    c = taylor_coefficients(fn, lam_t, lam_s, quadrature, len(nodes)) if c is None else c
    return tuple(corrector_change(lam_t, lam_s, alpha_t, nodes, predictor, c))


def plan_er_sde(
    sigmas: torch.Tensor,
    schedule: NoiseSchedule,
    noise_fn: NoiseFunction,
    order: int = 3,
    derivatives: str = "corrected",
    quadrature: str = "exact",
    flow_start: str = "exact",
    final_step: str = "denoise",
    s_noise: float = 1.0,
    flow_start_sigma: float | None = None,
    corrector: bool = False,
    flow_form: str | None = None,
    warn: bool = True,
    per_step: bool = False,
) -> ERSDEPlan:
    """All coefficients of a run, in float64 on the host. Row i depends only on sigmas[: i + 2].
    The ODE on a regular schedule: all steps at once (``er_sde_ode_plan.batched_ode_rows``; ``per_step=True``
    skips it, the reference its tests compare with). Otherwise two passes: the shape of every step (order,
    nodes), then the Taylor coefficients of all steps in one evaluation (``taylor_coefficient_rows``) and the rows."""
    check_options(order=order, derivatives=derivatives, quadrature=quadrature, flow_start=flow_start,
                  final_step=final_step, s_noise=s_noise)
    if corrector and not noise_fn.deterministic:
        raise ValueError(f"ER-SDE: the corrector is for the ODE only (noise_fn 'ode' or eta 0), got {noise_fn.name}.")
    flow_form = resolved_flow_form(flow_form, noise_fn) if schedule.is_flow else "lambda"
    if flow_form != "lambda" and not noise_fn.deterministic:
        raise ValueError(f"ER-SDE: flow_form {flow_form!r} is for the ODE only; the SDE runs in lambda.")
    sig = sigmas.to(torch.float64).clone()
    if schedule.is_flow and flow_start == "comfy_offset" and sig[0] >= 1.0:
        sig[0] = flow_start_sigma if flow_start_sigma is not None else 1.0 - 1e-4
    tab = schedule.coefficients(sig)
    sig_list, log_lam = tab.sigma.tolist(), tab.log_lam.tolist()
    own_form = tuple(t.tolist() for t in (tab.alpha, tab.s, tab.lam))  # (alpha, s, lam) per sigma
    sigma_form = own_form
    if flow_form != "lambda":  # the same ODE, dx/dsigma = (x - D)/sigma, with the denoiser a polynomial in sigma
        ve = NoiseSchedule("ve").coefficients(sig)
        sigma_form = tuple(t.tolist() for t in (ve.alpha, ve.s, ve.lam))
    plan = ERSDEPlan(model_sigmas=sig)
    whole_form = sigma_form if flow_form == "sigma" else own_form  # every step's, where all lam are finite
    if not per_step and batched_plan_applies(noise_fn, quadrature, sig_list, whole_form[2]):
        plan.rows = batched_ode_rows(sig_list, whole_form, order, derivatives, final_step, corrector, noise_fn)
        return plan
    L_arr = np.array(log_lam)
    finite = np.isfinite(L_arr)
    log_psi = np.where(finite, noise_fn.log_phi(np.where(finite, L_arr, 0.0)) - L_arr, np.nan).tolist()
    own_finite = [math.isfinite(v) for v in own_form[2]]
    stochastic = s_noise > 0 and not noise_fn.deterministic
    # pass 1: every step's form, order and interpolation nodes (lam of past evaluations, newest first)
    steps, evaluated = [], []
    for i in range(len(sig) - 1):
        if sig_list[i + 1] == sig_list[i]:
            steps.append(None)
            continue
        evaluated.insert(0, i)
        del evaluated[order:]  # only the newest `order` evaluations enter a step
        at_top = flow_form == "hybrid" and not all(own_finite[j] for j in evaluated)
        form = sigma_form if flow_form == "sigma" or at_top else own_form
        lam = form[2]
        history = [lam[j] for j in evaluated]
        usable = 0
        for h in history:
            if not math.isfinite(h) or usable >= order:
                break
            usable += 1
        step_order = min(order, max(usable, 1))
        if sig_list[i + 1] == 0.0:
            terms = 0
        else:
            terms = step_order if corrector and math.isfinite(lam[i]) else step_order - 1
        steps.append((step_order, history[:step_order], terms, form))
    # pass 2: the Taylor coefficients of every step at once, then the rows
    need = [i for i, step in enumerate(steps) if step is not None and step[2] > 0]
    coeffs = dict(zip(need, taylor_coefficient_rows(noise_fn, [steps[i][3][2][i + 1] for i in need],
                                                    [steps[i][3][2][i] for i in need], quadrature,
                                                    max((steps[i][2] for i in need), default=1))))
    pending = None  # the corrector's change of the current state, folded into the step that leaves it
    for i, step in enumerate(steps):
        sig_s, sig_t = sig_list[i], sig_list[i + 1]
        if step is None:
            plan.rows.append(StepRow(sig_s, sig_t, A=1.0, evaluate=False))
            continue
        step_order, nodes, _, (alpha, s, lam) = step
        if sig_t == 0.0:  # final denoise (optionally Taylor-extrapolated to lam = 0, or corrected)
            W = final_step_weights(nodes, step_order, derivatives, final_step, pending)
            plan.rows.append(StepRow(sig_s, sig_t, A=0.0, W=W, order=step_order))
            pending = None
            continue
        if math.isfinite(log_psi[i]):
            log_q = log_psi[i + 1] - log_psi[i]
        else:  # flow start at sigma = 1: the exact limit of the step
            log_q = log_psi[i + 1] - noise_fn.log_psi_inf
        if log_q > 0:
            plan.clamped_steps += 1
            log_q = 0.0
        q = math.exp(log_q)
        A = s[i + 1] / s[i] * q
        W = [alpha[i + 1] - A * alpha[i]] + [0.0] * (step_order - 1)
        c = coeffs.get(i, ())
        deriv = predictor_weight_rows(nodes, step_order, derivatives)  # rows: D', D'', ...
        if step_order >= 2:
            W = [w + alpha[i + 1] * d for w, d in zip(W, weighted_rows(c[:step_order - 1], deriv, step_order))]
        E = s[i + 1] * math.sqrt(-math.expm1(2.0 * log_q)) * s_noise if stochastic else 0.0
        if stochastic:
            log_psi_s = log_psi[i] if math.isfinite(log_psi[i]) else noise_fn.log_psi_inf
            plan.clocks[(sig_s, sig_t)] = (math.exp(-2.0 * log_psi_s), math.exp(-2.0 * log_psi[i + 1]))
        W = tuple(W) if pending is None or A == 0.0 else merged_weights(A, W, pending)  # = merge_correction
        plan.rows.append(StepRow(sig_s, sig_t, A, W, 0.0, E, stochastic, True, step_order))
        pending = None
        if corrector and math.isfinite(lam[i]):
            pending = _ode_correction(lam[i + 1], lam[i], alpha[i + 1], nodes, deriv, noise_fn, quadrature, c)
    if warn:
        _warn_clamped(plan, noise_fn, stacklevel=4)
    return plan


def _warn_clamped(plan: ERSDEPlan, noise_fn: NoiseFunction, stacklevel: int):
    if plan.clamped_steps:
        warnings.warn(
            f"ER-SDE: the noise function {noise_fn.name} has kappa < 1 on {plan.clamped_steps} step(s) of this "
            "schedule (e.g. sde_4 above lam ~ 1e3, the first steps of flow models); those steps add no noise.",
            stacklevel=stacklevel,
        )


@functools.lru_cache(maxsize=16)
def _plan_of(sigma_values: tuple, schedule: NoiseSchedule, noise_fn: NoiseFunction, *options) -> ERSDEPlan:
    return plan_er_sde(torch.tensor(sigma_values, dtype=torch.float64), schedule, noise_fn, *options, warn=False)


def cached_plan(sigmas: torch.Tensor, schedule: NoiseSchedule, noise_fn: NoiseFunction, *options) -> ERSDEPlan:
    """``plan_er_sde`` through a small cache keyed on the sigmas' values, the schedule, the noise function
    (``make_noise_function`` returns one object per setting) and the options: a queue that re-runs one
    schedule plans it once. The plan is shared; nothing writes to it."""
    plan = _plan_of(tuple(sigmas.tolist()), schedule, noise_fn, *options)
    _warn_clamped(plan, noise_fn, stacklevel=4)
    return plan


def brownian_noise_sampler(x: torch.Tensor, plan: ERSDEPlan, seed=None):
    """Step noise ``(sigma, sigma_next) -> z`` as normalised increments of one Brownian path in the clock
    tau = 1/psi^2: the ER-SDE step's noise variance is s_t^2 psi_t^2 (tau_t - tau_s), so two half-steps
    compose into one and runs with N and 2N steps share the path. tau is mapped affinely to [0, 1].

    The tree is in the latent's dtype, float32 for half-precision latents (like ComfyUI's
    BrownianTreeNoiseSampler): a float64 tree draws 4x slower on CPU, and float32 keeps an
    increment's relative rounding error near 1e-6 at the tree's depth. The tolerance stays 1e-12:
    the first steps of reverse_sde take about 1e-6 of the clock span (query points are rounded to it)."""
    try:
        import torchsde
    except ImportError as err:
        raise ImportError("ER-SDE: noise='brownian' needs the torchsde package (ComfyUI ships it); "
                          "use noise='gaussian' or pip install torchsde.") from err
    clocks = [t for pair in plan.clocks.values() for t in pair]
    if not clocks:
        return lambda sigma, sigma_next: torch.zeros_like(x)
    lo, hi = min(clocks), max(clocks)
    span = hi - lo if hi > lo else 1.0
    seed = int(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item())
    tree_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    tree = torchsde.BrownianTree(t0=torch.tensor(0.0, dtype=torch.float64), w0=torch.zeros_like(x, dtype=tree_dtype),
                                 t1=torch.tensor(1.0, dtype=torch.float64), entropy=seed, tol=1e-12)

    def sample(sigma, sigma_next):
        tau_s, tau_t = plan.clocks[(sigma, sigma_next)]
        t0, t1 = (tau_s - lo) / span, (tau_t - lo) / span
        if t1 <= t0:
            return torch.zeros_like(x)
        return (tree(t0, t1) / math.sqrt(t1 - t0)).to(x.dtype)

    return sample


# ---- the sampler ---------------------------------------------------------------------------------

# Parameter-free settings shared by the KSampler dropdown and other samplers' finishers.
PRESETS = {
    "er_sde_3": {"order": 3, "noise_fn": "sde_5"},
    "er_sde_ode_3": {"order": 3, "noise_fn": "ode"},
    "er_sde_sde_3": {"order": 3, "noise_fn": "reverse_sde"},
    # final_step "corrected": lower error than "denoise" in 109 of 144 stock-schedule cells, higher in 35 (ratio
    # to ComfyUI's best there: geometric mean 1.12 vs 1.25; benchmarks/results/preset_options.md)
    "er_sde_ode_3_unic": {"order": 3, "noise_fn": "ode", "corrector": True, "final_step": "corrected"},
}


@torch.no_grad()
def sample_er_sde(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback=None,
    disable=None,
    order: int = 3,
    noise_fn: str = "sde_5",
    eta: float = 1.0,
    power: float | None = None,
    sde_1_a: float | None = None,
    s_noise: float = 1.0,
    derivatives: str = "corrected",
    quadrature: str = "exact",
    flow_start: str = "exact",
    final_step: str = "denoise",
    parametrization: str | None = None,
    noise: str = "gaussian",
    noise_sampler=None,
    corrector: bool = False,
    flow_form: str | None = None,
    *,
    p: float | None = None,
    a: float | None = None,
):
    """ER-SDE-Solver (Cui et al.) of order 1-3 in the k-diffusion convention; the seed is extra_args['seed'].

    ``noise_fn``: the noise-scale curve (one of NOISE_FUNCTIONS), ``eta`` its strength (0 = ODE), ``power`` the
    exponent of 'power' (phi = lam^power, default 2), ``sde_1_a`` the parameter of 'sde_1' (default 0; ``p``
    and ``a`` are their deprecated names); ``s_noise`` multiplies the added noise. ``derivatives``:
    'corrected' (true 3rd order) or 'paper' (the published / ComfyUI estimator, 2nd order). ``quadrature``:
    'exact' or 'comfy_riemann' (ComfyUI's sums). ``flow_start``: 'exact' (the model at flow sigma = 1) or
    'comfy_offset' (ComfyUI's start just below 1). ``final_step``: 'denoise', 'extrapolate' (Taylor of the
    denoiser to lam = 0) or 'corrected' (the clean prediction plus the corrector's change of the last state).
    ``corrector`` (ODE only): each state corrected with the model output taken there (UniC-style; no extra
    call, one order more). ``flow_form`` (flow models, ODE): the variable the denoiser is interpolated in,
    'lambda' (sigma / (1 - sigma)), 'sigma', or 'hybrid' (sigma on the steps whose history holds sigma = 1, then
    lambda; the ODE's default). ``parametrization`` 've' | 'vp' | 'flow' overrides the type read from
    the ComfyUI model. ``noise``: 'gaussian' (ComfyUI's seeded per-step stream) or 'brownian' (one Brownian
    path per seed whatever the step count; needs torchsde); ``noise_sampler(sigma, sigma_next)`` overrides both.
    Per-step tuning from the calibrator runs through ``step_tuning.sample_tuned``."""
    extra_args = {} if extra_args is None else extra_args
    schedule, sig, _ = setup_run(model, x, sigmas, "ER-SDE", parametrization)
    fn = check_options(order, derivatives, quadrature, flow_start, final_step, s_noise, noise, noise_fn, eta, power,
                       sde_1_a, corrector, flow_form, p=p, a=a)
    offset_sigma = flow_start_offset_sigma(model) if flow_start == "comfy_offset" else None
    plan = cached_plan(sig, schedule, fn, order, derivatives, quadrature, flow_start, final_step,
                       step_noise_scale(model, s_noise), offset_sigma, corrector, flow_form)
    if noise_sampler is None and any(row.draw for row in plan.rows):  # (the ODE draws nothing)
        if noise == "brownian":
            noise_sampler = brownian_noise_sampler(x, plan, extra_args.get("seed"))
        else:
            noise_sampler = seeded_noise_sampler(x, extra_args.get("seed"))
    device_sigmas = plan.model_sigmas.to(torch.as_tensor(sigmas).dtype, copy=True)  # the cached plan's stays as is
    return run_rows(model, x, plan.rows, extra_args, callback, disable, noise_sampler, model_sigmas=device_sigmas)
