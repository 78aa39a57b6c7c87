"""DBIM (Zheng et al., arXiv 2405.15885) for diffusion bridges: sampling, encoding to the booting noise,
reconstruction and interpolation, and the Bridge Sampler's choice between DBIM and DDBM Heun (``sample_bridge``).

A bridge denoiser is ``denoiser(x_t, t, x_T) -> x0_hat`` with ``t`` a [B] tensor of bridge times
(``BridgeDenoiser`` wraps a network with its preconditioning; ``testbeds.bridges.ExactBridgeModel``
is exact). Every DBIM step is ``x <- k x + cT x_T + w0 x0_s + w1 x0_u1 + w2 x0_u2 + omega z`` with
float64 scalars computed once per run (``plan_dbim``); the loops only call the denoiser and do
axpy updates. Spec: shared/specs/dbim.md sections 3, 4.

The bridge family's other rooms (``samplers/bridges/``): ``schedule.py`` (schedules, grids), ``denoiser.py``
(how a denoiser is called), ``ddbm.py`` (DDBM Heun), ``checkpoints.py`` (presets, checkpoint files),
``adm_unet.py`` (the network). Their public names are importable from here too.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .schedule import BridgeSchedule, dbim_steps_for_nfe, heun_nfe, heun_steps_for_nfe
from .checkpoints import (  # noqa: F401  (re-exported: the bridge nodes import them from here)
    BRIDGE_PRESET_NAMES, METADATA_KEY, TASKS, BridgePreset, bridge_presets, detect_preset, load_bridge_checkpoint,
    save_bridge_safetensors,
)
from .denoiser import BridgeDenoiser, bridge_times, check_finite, masked, time_dtype  # noqa: F401
from ..common import report, row_seeded_noise
from .ddbm import _drift, sample_ddbm_heun  # noqa: F401
from ..multistep import StepRow, derivative_weights, run_rows

SAMPLERS = ("dbim", "dbim_high_order", "ddbm_heun")


# ---- inputs and noise ------------------------------------------------------------------------------------

def slerp(eps_a: torch.Tensor, eps_b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation per sample (flattened); linear where the two are (nearly) parallel."""
    dtype = time_dtype(eps_a)
    a, b = eps_a.flatten(1).to(dtype), eps_b.flatten(1).to(dtype)
    cos = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1)
    theta = torch.arccos(cos).unsqueeze(1)
    sin = torch.sin(theta)
    close = sin.abs() < 1e-6
    safe = torch.where(close, torch.ones_like(sin), sin)
    wa = torch.where(close, 1 - weight * torch.ones_like(sin), torch.sin((1 - weight) * theta) / safe)
    wb = torch.where(close, weight * torch.ones_like(sin), torch.sin(weight * theta) / safe)
    return (wa * a + wb * b).reshape(eps_a.shape).to(eps_a.dtype)


# ---- the DBIM plan --------------------------------------------------------------------------------

@dataclass(frozen=True)
class DBIMStep:
    t: float  # the model is evaluated at this time (s)
    t_next: float
    k: float  # weight of x_s
    cT: float  # weight of x_T
    w: tuple  # weights of x0_hat at s, u1, u2 (the last three evaluations)
    noise: float  # std of the fresh noise (omega; 0 on the last step and for eta = 0)
    order: int


def _phis(h: float):
    """phi_1 = 1 - e^-h, phi_2 = e^-h + h - 1, phi_3 = h^2/2 - h + 1 - e^-h (expm1, no cancellation)."""
    em1 = math.expm1(-h)
    return -em1, em1 + h, h * h / 2 - h - em1


def plan_dbim(schedule: BridgeSchedule, ts, eta: float = 0.0, order: int = 1,
              lower_order_final: bool = True) -> list[DBIMStep]:
    """Coefficients of DBIM over the grid ``ts`` (float64 host math).

    Order 1 is DBIM with stochasticity ``eta`` in [0, 1]:
        x_t = a_t x_T + b_t x0 + sqrt(c_t^2 - omega^2) eps_hat + omega z,
        omega = eta alpha_t rho_t sqrt(1 - rho_t^2 / rho_s^2).
    Orders 2, 3 are the exponential multistep solvers of the DBIM ODE in lambda = log(b/c) (the half-log-SNR)
    (eta = 0): x_t = (c_t/c_s) x_s + (a_t - (c_t/c_s) a_s) x_T + b_t [phi_1 x0_s + phi_2 D1 + phi_3 D2].
    The first step is order 1, order 3 uses order 2 on step 2, and (``lower_order_final``) the last
    step is order 1, as the reference. A grid of increasing times gives the inverse map (encoding)."""
    if order not in (1, 2, 3):
        raise ValueError(f"DBIM: order must be 1, 2 or 3, got {order}.")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DBIM: eta must be in [0, 1] (eta > 1 makes c_t^2 - omega^2 negative), got {eta}.")
    if order > 1 and eta != 0.0:
        raise ValueError("DBIM: the high-order solvers (order 2, 3) are deterministic; use eta = 0.")
    ts = torch.as_tensor(ts, dtype=torch.float64).cpu()
    if ts.numel() < 2:
        raise ValueError("DBIM: the grid needs at least two times.")
    ascending = bool(ts[-1] > ts[0])
    if eta > 0 and ascending:
        raise ValueError("DBIM: eta > 0 has no inverse; encode with eta = 0.")
    a, b, c = (v.tolist() for v in schedule.abc(ts))
    alpha, rho, _ = (v.tolist() for v in schedule.alpha_rho(ts))
    half_log_snr = [math.log(bi) - math.log(ci) for bi, ci in zip(b, c)]  # BridgeSchedule.half_log_snr
    last = len(ts) - 2
    steps = []
    for n in range(last + 1):
        s, t = n, n + 1
        step_order = 1 if n == 0 or (lower_order_final and n == last) else min(order, n + 1)
        if eta > 0:
            omega = eta * alpha[t] * rho[t] * math.sqrt(max(1 - rho[t] ** 2 / rho[s] ** 2, 0.0))
            var = c[t] ** 2 - omega**2
            if var < -1e-12 * c[t] ** 2:
                raise ValueError(f"DBIM: c_t^2 - omega^2 < 0 at t = {float(ts[t])} (eta = {eta}).")
            k = math.sqrt(max(var, 0.0)) / c[s]
        else:
            omega, k = 0.0, c[t] / c[s]
        w = [0.0, 0.0, 0.0]
        if step_order == 1:
            w[0] = b[t] - k * b[s]
        else:  # derivatives in lambda of the polynomial through the last step_order outputs
            phi1, phi2, phi3 = _phis(half_log_snr[t] - half_log_snr[s])
            d1, d2 = np.zeros(3), np.zeros(3)
            nodes = half_log_snr[s::-1][:step_order]  # of the last step_order model calls, newest first
            d1[:step_order], d2[:step_order] = derivative_weights(nodes, half_log_snr[s], 2)
            w = [b[t] * (phi1 * (j == 0) + phi2 * d1[j] + phi3 * d2[j]) for j in range(3)]
        steps.append(DBIMStep(t=float(ts[s]), t_next=float(ts[t]), k=k, cT=a[t] - k * a[s], w=tuple(w),
                              noise=omega if n < last else 0.0, order=step_order))
    return steps


def _run_plan(denoiser, x, x_T, plan, noise_sampler, callback, first_index, disable):
    rows = [StepRow(step.t, step.t_next, A=step.k, W=step.w, C=step.cT, E=step.noise, draw=step.noise != 0.0,
                    order=step.order) for step in plan]
    shifted = None if callback is None else (lambda d: callback({**d, "i": d["i"] + first_index}))
    return run_rows(None, x, rows, callback=shifted, disable=disable, constant=x_T,
                    noise_sampler=noise_sampler,
                    call=lambda x_t, row: denoiser(x_t, bridge_times(x_t, row.sigma), x_T))


def _grid(schedule, steps, ts, spacing):
    if ts is not None:
        return torch.as_tensor(ts, dtype=torch.float64).cpu()
    if steps is None:
        raise ValueError("DBIM: give steps (NFE - 1) or an explicit grid ts.")
    return schedule.dbim_grid(int(steps), spacing)


# ---- samplers ---------------------------------------------------------------------------------

@torch.no_grad()
def sample_dbim(denoiser, x_T: torch.Tensor, schedule: BridgeSchedule, steps: int | None = None, *,
                eta: float = 0.0, order: int = 1, spacing: str = "uniform_t", ts=None, booting_noise=None,
                noise_sampler=None, seed: int = 0, mask=None, lower_order_final: bool = True,
                callback=None, disable=None, noise=None) -> torch.Tensor:
    """DBIM from the condition x_T: NFE = steps + 1 (one call at T, then one per step).

    ``booting_noise``: the latent of eta = 0 sampling (``noise`` is its deprecated name); drawn from
    ``noise_sampler(t, t_next)`` (ComfyUI's convention) when None (default: per-row generators seeded
    seed + i; the booting noise is their first draw, eta noise the following draws). The seed is an
    argument here: the bridge samplers have no extra_args. ``mask`` [B,1,H,W] (1 = regenerate) for
    inpainting models. ``order`` 2, 3: high-order DBIM (eta must be 0). Returns x at t_min (not clamped)."""
    check_finite(x_T, "DBIM")
    booting_noise = _renamed(booting_noise, noise)
    ts = _grid(schedule, steps, ts, spacing)
    plan = plan_dbim(schedule, ts, eta, order, lower_order_final)
    denoiser = masked(denoiser, mask)
    if noise_sampler is None:
        noise_sampler = row_seeded_noise(seed, x_T)
    eps = noise_sampler(schedule.t_max, float(ts[0])) if booting_noise is None else \
        booting_noise.to(x_T.device, x_T.dtype)
    a, b, c = (float(v) for v in schedule.abc(ts[:1]))
    x0 = denoiser(x_T, bridge_times(x_T, schedule.t_max), x_T)
    report(callback, 0, x_T, schedule.t_max, x0)
    x = a * x_T + b * x0 + c * eps  # the eta = 1 step out of T: the booting noise enters here
    return _run_plan(denoiser, x, x_T, plan, noise_sampler, callback, 1, disable)


@torch.no_grad()
def encode_dbim(denoiser, x_0: torch.Tensor, x_T: torch.Tensor, schedule: BridgeSchedule,
                steps: int | None = None, *, order: int = 1, spacing: str = "uniform_t", ts=None, mask=None,
                callback=None, disable=None) -> torch.Tensor:
    """The booting noise whose eta = 0 DBIM decode is x_0 (inversion on the same grid, NFE = steps + 1)."""
    check_finite(x_T, "DBIM encode")
    check_finite(x_0, "DBIM encode", "target image")
    ts = _grid(schedule, steps, ts, spacing)
    plan = plan_dbim(schedule, ts.flip(0), 0.0, order)
    denoiser = masked(denoiser, mask)
    x = _run_plan(denoiser, x_0.to(x_T.dtype), x_T, plan, None, callback, 0, disable)
    x0 = denoiser(x_T, bridge_times(x_T, schedule.t_max), x_T)
    report(callback, len(plan), x, schedule.t_max, x0)
    a, b, c = (float(v) for v in schedule.abc(ts[:1]))
    return (x - a * x_T - b * x0) / c


def interpolate_dbim(denoiser, x_T: torch.Tensor, eps_a: torch.Tensor, eps_b: torch.Tensor,
                     schedule: BridgeSchedule, steps: int, frames: int, **options) -> list[torch.Tensor]:
    """eta = 0 decodes of slerp(eps_a, eps_b; i / (frames - 1)), i = 0..frames-1."""
    weights = [0.0] if frames == 1 else [i / (frames - 1) for i in range(frames)]
    return [sample_dbim(denoiser, x_T, schedule, steps, booting_noise=slerp(eps_a, eps_b, w), eta=0.0, **options)
            for w in weights]


def _renamed(booting_noise, noise):
    if noise is not None:
        if booting_noise is not None:
            raise ValueError("DBIM: pass booting_noise only (noise is its deprecated name).")
        warnings.warn("DBIM: 'noise' is now 'booting_noise'.", DeprecationWarning, stacklevel=3)
    return booting_noise if noise is None else noise


def bridge_nfe(sampler: str, nfe: int, churn_step_ratio: float = 0.33) -> int:
    """Model calls ``sample_bridge`` makes for a budget of ``nfe`` (DDBM Heun rounds to whole steps)."""
    return heun_nfe(heun_steps_for_nfe(nfe, churn_step_ratio), churn_step_ratio) if sampler == "ddbm_heun" else nfe


def sample_bridge(sampler: str, denoiser, x_T: torch.Tensor, schedule: BridgeSchedule, nfe: int, *,
                  eta: float = 0.0, order: int = 1, churn_step_ratio: float = 0.33, spacing: str = "uniform_t",
                  booting_noise=None, noise_sampler=None, mask=None, callback=None, disable=None,
                  noise=None) -> torch.Tensor:
    """The Bridge Sampler's choice at ``nfe`` model calls: ``dbim`` (order 1, ``eta``), ``dbim_high_order``
    (``order`` 2 or 3, eta 0) or ``ddbm_heun`` (``churn_step_ratio``; ``booting_noise`` unused). Every option
    is checked here or in the sampler it picks (``noise``: the deprecated name of ``booting_noise``)."""
    booting_noise = _renamed(booting_noise, noise)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
    if sampler == "ddbm_heun":
        return sample_ddbm_heun(denoiser, x_T, schedule, heun_steps_for_nfe(nfe, churn_step_ratio),
                                churn_step_ratio=churn_step_ratio, noise_sampler=noise_sampler, mask=mask,
                                callback=callback, disable=disable)
    if sampler == "dbim_high_order" and order not in (2, 3):
        raise ValueError(f"high-order DBIM needs order 2 or 3, got {order}.")
    return sample_dbim(denoiser, x_T, schedule, dbim_steps_for_nfe(nfe), spacing=spacing,
                       eta=eta if sampler == "dbim" else 0.0, order=order if sampler != "dbim" else 1,
                       booting_noise=booting_noise,
                       noise_sampler=noise_sampler, mask=mask, callback=callback, disable=disable)


def __getattr__(name: str):  # PEP 562: BRIDGE_PRESETS stays importable without building it at import time
    if name == "BRIDGE_PRESETS":
        return bridge_presets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
