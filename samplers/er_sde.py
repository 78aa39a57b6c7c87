"""ER-SDE-Solvers (Cui et al., arXiv 2309.06169): exact-coefficient multistep solvers of the
extended reverse-time SDE family, orders 1-3, for VE, VP and flow models.

Every step is ``x <- A x + B0 D_i + B1 D_{i-1} + B2 D_{i-2} + E z`` with float64 scalars
computed once per run (``plan_er_sde``); the loop only calls the model and does axpy updates.
Derivation and measurements: shared/specs/er_sde.md.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .common import gaussian_noise_sampler, progress, report, setup_run, step_noise_scale
from .schedule import NoiseSchedule, comfy_model_sampling

LOG10 = math.log(10.0)


# ---- noise-scale functions phi(lam), written in log-space ---------------------------------

@dataclass(frozen=True)
class NoiseFunction:
    """phi through l(L) = log phi(e^L) and kappa(L) = d log phi / d log lam (= 1 + eta(lam)^2).

    ``power`` is p when phi = lam^p (closed-form coefficients); ``log_psi_inf`` is the limit of
    log(phi/lam) as lam -> inf, which gives the exact first step of a flow model from sigma = 1."""

    name: str
    log_phi: Callable[[np.ndarray], np.ndarray]
    kappa: Callable[[np.ndarray], np.ndarray]
    power: float | None = None
    log_psi_inf: float = math.inf

    @property
    def deterministic(self) -> bool:
        return self.power == 1.0

    def with_strength(self, eta: float) -> "NoiseFunction":
        """phi_eta = lam (phi/lam)^eta: eta scales the diffusion variance rate; 0 is the ODE."""
        if eta < 0:
            raise ValueError(f"ER-SDE: eta must be >= 0, got {eta}.")
        if eta == 1.0:
            return self
        base = self
        return NoiseFunction(
            name=f"{self.name}^{eta:g}",
            log_phi=lambda L: L + eta * (base.log_phi(L) - L),
            kappa=lambda L: 1.0 + eta * (base.kappa(L) - 1.0),
            power=None if base.power is None else 1.0 + eta * (base.power - 1.0),
            log_psi_inf=0.0 if eta == 0 else eta * base.log_psi_inf,
        )


def power_law(p: float) -> NoiseFunction:
    if not p >= 1.0:
        raise ValueError(f"ER-SDE: the power-law exponent p must be >= 1 (p < 1 has negative noise variance), got {p}.")
    return NoiseFunction(
        name=f"power({p:g})", log_phi=lambda L: p * L, kappa=lambda L: np.full_like(L, p),
        power=float(p), log_psi_inf=0.0 if p == 1.0 else math.inf,
    )


def sde_1(a: float = 0.0) -> NoiseFunction:
    """phi = lam (exp(lam^(a-1)/(a-1)) + 10)."""
    if a == 1.0:
        raise ValueError("ER-SDE: sde_1 is undefined for a = 1; use a != 1 (default 0).")

    def g(L):
        return np.exp((a - 1.0) * L) / (a - 1.0)

    return NoiseFunction(
        name=f"sde_1(a={a:g})",
        log_phi=lambda L: L + np.logaddexp(g(L), LOG10),
        kappa=lambda L: 1.0 + np.exp((a - 1.0) * L) / (1.0 + 10.0 * np.exp(-g(L))),
        log_psi_inf=math.log(11.0) if a < 1.0 else math.inf,
    )


def _sde_4() -> NoiseFunction:
    """phi = lam^0.9 log10(1 + 100 lam^1.5): kappa < 1 above lam ~ 1e3 (flow starts)."""

    def y(L):
        return np.exp(math.log(100.0) + 1.5 * L)

    return NoiseFunction(
        name="sde_4",
        log_phi=lambda L: 0.9 * L + np.log(np.log1p(y(L))) - math.log(LOG10),
        kappa=lambda L: 0.9 + 1.5 * (y(L) / (1.0 + y(L))) / np.log1p(y(L)),
        log_psi_inf=-math.inf,  # psi = phi/lam -> 0 (slowly): the first flow step is an ODE step
    )


def _sde_5() -> NoiseFunction:
    """phi = lam (exp(lam^0.3) + 10): the published default (ComfyUI's er_sde)."""
    return NoiseFunction(
        name="sde_5",
        log_phi=lambda L: L + np.logaddexp(np.exp(0.3 * L), LOG10),
        kappa=lambda L: 1.0 + 0.3 * np.exp(0.3 * L) / (1.0 + 10.0 * np.exp(-np.exp(0.3 * L))),
    )


NOISE_KINDS = ("gaussian", "brownian")
NOISE_FUNCTIONS = ("ode", "reverse_sde", "sde_1", "sde_2", "sde_3", "sde_4", "sde_5", "power")


def make_noise_function(name: str = "sde_5", eta: float = 1.0, p: float = 2.0, a: float = 0.0) -> NoiseFunction:
    """ode: phi = lam; reverse_sde: lam^2 (Anderson); sde_2: lam^1.5; sde_3: lam^2.5;
    sde_1(a), sde_4, sde_5: the paper's families; power: lam^p (ComfyUI's 'Reverse-time SDE'
    with slider eta is p = 1 + eta). ``eta`` is the strength phi_eta of any of them."""
    builders = {
        "ode": lambda: power_law(1.0),
        "reverse_sde": lambda: power_law(2.0),
        "sde_1": lambda: sde_1(a),
        "sde_2": lambda: power_law(1.5),
        "sde_3": lambda: power_law(2.5),
        "sde_4": _sde_4,
        "sde_5": _sde_5,
        "power": lambda: power_law(p),
    }
    if name not in builders:
        raise ValueError(f"ER-SDE: unknown noise function {name!r}; choose one of {', '.join(NOISE_FUNCTIONS)}.")
    return builders[name]().with_strength(eta)


# ---- step coefficients c2, c3 --------------------------------------------------------------

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)
_PANEL_WIDTH = 0.5  # in v = log(lam/lam_t); 8-node panels of this width: ~5e-15 relative error
_CLOSED_FORM_MIN_U = 0.05  # below this the power-law closed form of c3 cancels; use quadrature


def taylor_coefficients_quadrature(fn: NoiseFunction, lam_t: float, lam_s: float) -> tuple[float, float]:
    """c2 = phi_t int 1/phi + (lam_t - lam_s), c3 = phi_t int (lam - lam_s)/phi + (lam_t - lam_s)^2/2
    over [lam_t, lam_s], from their sign-definite forms (integration by parts), composite
    Gauss-Legendre in v = log(lam / lam_t)."""
    u = math.log(lam_s / lam_t)
    rho = math.exp(u)
    panels = max(1, math.ceil(u / _PANEL_WIDTH))
    edges = np.linspace(0.0, u, panels + 1)
    half = np.diff(edges)[:, None] / 2
    v = (edges[:-1, None] + half * (1 + _GL_NODES[None, :])).ravel()
    w = (half * _GL_WEIGHTS[None, :]).ravel()
    L_t = math.log(lam_t)
    kernel = w * fn.kappa(L_t + v) * np.exp(fn.log_phi(np.array(L_t)) - fn.log_phi(L_t + v))
    gap = np.exp(v) - rho  # <= 0
    return float(lam_t * np.sum(gap * kernel)), float(lam_t**2 * np.sum(gap**2 / 2 * kernel))


def taylor_coefficients_power(p: float, lam_t: float, lam_s: float) -> tuple[float, float]:
    """Closed forms for phi = lam^p with E(a) = (rho^a - 1)/a."""
    u = math.log(lam_s / lam_t)

    def E(a):
        return u if a == 0 else math.expm1(a * u) / a

    rho_m1 = math.expm1(u)
    c2 = lam_t * (E(1 - p) - rho_m1)
    c3 = lam_t**2 * (rho_m1**2 / 2 + E(2 - p) - (rho_m1 + 1) * E(1 - p))
    return c2, c3


def taylor_coefficients_comfy(fn: NoiseFunction, lam_t: float, lam_s: float) -> tuple[float, float]:
    """ComfyUI's 200-point left Riemann sums in float32 (parity mode only)."""
    f32 = np.float32
    lam_t32, lam_s32 = f32(lam_t), f32(lam_s)
    dt = lam_t32 - lam_s32
    step = -dt / f32(200.0)
    pos = lam_t32 + np.arange(200, dtype=np.float32) * step
    phi = np.exp(fn.log_phi(np.log(pos.astype(np.float64)))).astype(np.float32)
    phi_t = np.exp(fn.log_phi(np.log(np.float64(lam_t32)))).astype(np.float32)
    s1 = np.sum(f32(1.0) / phi, dtype=np.float32) * step
    s_u = np.sum((pos - lam_s32) / phi, dtype=np.float32) * step
    return float(dt + s1 * phi_t), float(dt * dt / 2 + s_u * phi_t)


def taylor_coefficients(fn: NoiseFunction, lam_t: float, lam_s: float, quadrature: str = "exact"):
    if quadrature == "comfy_riemann":
        return taylor_coefficients_comfy(fn, lam_t, lam_s)
    if fn.power is not None and math.log(lam_s / lam_t) >= _CLOSED_FORM_MIN_U:
        return taylor_coefficients_power(fn.power, lam_t, lam_s)
    return taylor_coefficients_quadrature(fn, lam_t, lam_s)


# ---- the plan: one row of float64 scalars per step -------------------------------------------

@dataclass
class StepRow:
    evaluate: bool = True  # call the model at this step (False for zero-length steps)
    A: float = 1.0
    B: tuple = (0.0, 0.0, 0.0)  # weights of D_i, D_{i-1}, D_{i-2} (the last evaluations)
    E: float = 0.0  # noise coefficient (already times s_noise)
    draw: bool = False  # draw a noise sample (ComfyUI draws at every step to sigma > 0)
    order: int = 0
    clock: tuple = (0.0, 0.0)  # Brownian clock tau = 1/psi^2 at (lam_s, lam_t), see brownian_noise_sampler


@dataclass
class ERSDEPlan:
    model_sigmas: torch.Tensor  # float64, the sigmas the model is queried at
    rows: list = field(default_factory=list)
    clamped_steps: int = 0  # steps where kappa < 1 forced q <= 1 (no noise)


ORDERS = (1, 2, 3)
DERIVATIVES = ("corrected", "paper")
QUADRATURES = ("exact", "comfy_riemann")
FLOW_STARTS = ("exact", "comfy_offset")
FINAL_STEPS = ("denoise", "extrapolate")


def check_options(order=3, derivatives="corrected", quadrature="exact", flow_start="exact",
                  final_step="denoise", s_noise=1.0, noise="gaussian", noise_fn="sde_5", eta=1.0, p=2.0, a=0.0):
    """Raise a ValueError naming the bad option (the node calls this before sampling starts)."""
    for value, allowed, what in ((order, ORDERS, "order"), (derivatives, DERIVATIVES, "derivatives"),
                                 (quadrature, QUADRATURES, "quadrature"), (flow_start, FLOW_STARTS, "flow_start"),
                                 (final_step, FINAL_STEPS, "final_step"), (noise, NOISE_KINDS, "noise")):
        if value not in allowed:
            raise ValueError(f"ER-SDE: {what} must be one of {allowed}, got {value!r}.")
    if s_noise < 0:
        raise ValueError(f"ER-SDE: s_noise must be >= 0, got {s_noise}.")
    return make_noise_function(noise_fn, eta=eta, p=p, a=a)


def _derivative_weights(lams: list[float], order: int, derivatives: str):
    """Weights on (D_i, D_{i-1}, D_{i-2}) of D' and D'' from Newton divided differences in lam."""
    d1 = np.zeros(3)
    d2 = np.zeros(3)
    if order < 2:
        return d1, d2
    l0, l1 = lams[0], lams[1]
    f01 = np.array([1.0, -1.0, 0.0]) / (l0 - l1)
    d1 = f01
    if order >= 3:
        l2 = lams[2]
        f12 = np.array([0.0, 1.0, -1.0]) / (l1 - l2)
        f012 = (f01 - f12) / (l0 - l2)
        d2 = 2.0 * f012
        if derivatives == "corrected":  # slope at lam_i, not at the midpoint: true 3rd order
            d1 = f01 + (l0 - l1) * f012
    return d1, d2


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
) -> ERSDEPlan:
    """All coefficients of a run, in float64 on the host."""
    check_options(order=order, derivatives=derivatives, quadrature=quadrature, flow_start=flow_start,
                  final_step=final_step, s_noise=s_noise)
    sig = sigmas.to(torch.float64).clone()
    if schedule.is_flow and flow_start == "comfy_offset" and sig[0] >= 1.0:
        sig[0] = flow_start_sigma if flow_start_sigma is not None else 1.0 - 1e-4
    tab = schedule.coefficients(sig)
    alpha, s, lam, log_lam = (t.tolist() for t in (tab.alpha, tab.s, tab.lam, tab.log_lam))
    L_arr = np.array(log_lam)
    log_psi = np.where(np.isfinite(L_arr), noise_fn.log_phi(np.where(np.isfinite(L_arr), L_arr, 0.0)) - L_arr, np.nan)
    plan = ERSDEPlan(model_sigmas=sig)
    history: list[float] = []  # lam of past evaluations, newest first
    stochastic = s_noise > 0 and not noise_fn.deterministic
    for i in range(len(sig) - 1):
        sig_s, sig_t = float(sig[i]), float(sig[i + 1])
        if sig_t == sig_s:
            plan.rows.append(StepRow(evaluate=False))
            continue
        history.insert(0, lam[i])
        usable = 0
        for h in history:
            if not math.isfinite(h) or usable >= 3:
                break
            usable += 1
        step_order = min(order, max(usable, 1))
        if sig_t == 0.0:  # final denoise (optionally Taylor-extrapolated to lam = 0)
            B = np.array([1.0, 0.0, 0.0])
            if final_step == "extrapolate" and step_order >= 2:
                d1, d2 = _derivative_weights(history, step_order, derivatives)
                B = B - lam[i] * d1 + lam[i] ** 2 / 2 * d2
            plan.rows.append(StepRow(A=0.0, B=tuple(B), order=step_order))
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
        B = np.array([alpha[i + 1] - A * alpha[i], 0.0, 0.0])
        if step_order >= 2:
            c2, c3 = taylor_coefficients(noise_fn, lam[i + 1], lam[i], quadrature)
            d1, d2 = _derivative_weights(history, step_order, derivatives)
            B = B + alpha[i + 1] * c2 * d1 + (alpha[i + 1] * c3 * d2 if step_order >= 3 else 0.0)
        E = s[i + 1] * math.sqrt(-math.expm1(2.0 * log_q)) * s_noise if stochastic else 0.0
        log_psi_s = log_psi[i] if math.isfinite(log_psi[i]) else noise_fn.log_psi_inf
        clock = (math.exp(-2.0 * log_psi_s), math.exp(-2.0 * log_psi[i + 1]))
        plan.rows.append(StepRow(A=A, B=tuple(B), E=E, draw=stochastic, order=step_order, clock=clock))
    if plan.clamped_steps:
        warnings.warn(
            f"ER-SDE: the noise function {noise_fn.name} has kappa < 1 on {plan.clamped_steps} step(s) of this "
            "schedule (e.g. sde_4 above lam ~ 1e3, the first steps of flow models); those steps add no noise.",
            stacklevel=3,
        )
    return plan


def brownian_noise_sampler(x: torch.Tensor, plan: ERSDEPlan, seed=None):
    """Step noise as normalised increments of one Brownian path in the clock tau = 1/psi^2:
    the ER-SDE step's noise variance is s_t^2 psi_t^2 (tau_t - tau_s), so two half-steps compose
    into one and runs with N and 2N steps share the path. tau is mapped affinely to [0, 1]."""
    try:
        import torchsde
    except ImportError as err:
        raise ImportError("ER-SDE: noise='brownian' needs the torchsde package (ComfyUI ships it); "
                          "use noise='gaussian' or pip install torchsde.") from err
    clocks = [t for row in plan.rows if row.draw for t in row.clock]
    if not clocks:
        return lambda row: torch.zeros_like(x)
    lo, hi = min(clocks), max(clocks)
    span = hi - lo if hi > lo else 1.0
    seed = int(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item())
    tree = torchsde.BrownianTree(t0=torch.tensor(0.0, dtype=torch.float64), w0=torch.zeros_like(x, dtype=torch.float64),
                                 t1=torch.tensor(1.0, dtype=torch.float64), entropy=seed, tol=1e-12)

    def sample(row):
        t0, t1 = (row.clock[0] - lo) / span, (row.clock[1] - lo) / span
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
    p: float = 2.0,
    a: float = 0.0,
    s_noise: float = 1.0,
    derivatives: str = "corrected",
    quadrature: str = "exact",
    flow_start: str = "exact",
    final_step: str = "denoise",
    parametrization: str | None = None,
    noise: str = "gaussian",
    noise_sampler=None,
):
    """ER-SDE-Solver of order 1-3 in the k-diffusion convention.

    Options: ``order``; ``noise_fn`` (one of NOISE_FUNCTIONS) with ``eta`` (strength: 0 = ODE),
    ``p`` (power) and ``a`` (sde_1); ``s_noise``; ``derivatives`` 'corrected' (true 3rd order,
    default) or 'paper' (the published / ComfyUI estimator, globally 2nd order); ``quadrature``
    'exact' or 'comfy_riemann'; ``flow_start`` 'exact' (model at sigma = 1, exact limit) or
    'comfy_offset'; ``final_step`` 'denoise' or 'extrapolate'; ``parametrization`` 've' | 'vp' |
    'flow' overrides the type read from the ComfyUI model; ``noise`` 'gaussian' (ComfyUI's seeded
    per-step stream) or 'brownian' (one Brownian path per seed whatever the step count; needs
    torchsde, which ComfyUI ships); ``noise_sampler(row)`` overrides both."""
    extra_args = {} if extra_args is None else extra_args
    schedule, sig, s_in = setup_run(model, x, sigmas, "ER-SDE", parametrization)
    fn = check_options(order, derivatives, quadrature, flow_start, final_step, s_noise, noise, noise_fn, eta, p, a)
    offset_sigma = None
    if flow_start == "comfy_offset":
        ms = comfy_model_sampling(model)
        if ms is not None and hasattr(ms, "percent_to_sigma"):
            offset_sigma = float(ms.percent_to_sigma(1e-4))
    plan = plan_er_sde(sig, schedule, fn, order, derivatives, quadrature, flow_start, final_step,
                       step_noise_scale(model, s_noise), offset_sigma)
    device_sigmas = plan.model_sigmas.to(x.device, torch.as_tensor(sigmas).dtype)
    if noise_sampler is None:
        if noise == "brownian":
            noise_sampler = brownian_noise_sampler(x, plan, extra_args.get("seed"))
        else:
            gaussian = gaussian_noise_sampler(x, extra_args.get("seed"))
            noise_sampler = lambda row: gaussian()  # noqa: E731
    history = [None, None, None]
    for i in progress(len(plan.rows), disable):
        row = plan.rows[i]
        if not row.evaluate:
            continue
        denoised = model(x, device_sigmas[i] * s_in, **extra_args)
        history = [denoised, history[0], history[1]]
        report(callback, i, x, device_sigmas[i], denoised)
        update = row.A * x if row.A != 0.0 else torch.zeros_like(x)
        for weight, d in zip(row.B, history):
            if weight != 0.0:
                update = update + weight * d
        if row.draw:
            update = update + row.E * noise_sampler(row)
        x = update
    return x
