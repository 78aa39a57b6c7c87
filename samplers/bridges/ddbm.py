"""The DDBM hybrid Heun sampler (Zhou et al., arXiv 2309.16948) for diffusion bridges: Euler-Maruyama
steps of the bridge SDE and Heun steps of its probability-flow ODE. Spec: shared/specs/dbim.md section 4."""
from __future__ import annotations

import math

import torch

from .schedule import BridgeSchedule
from .denoiser import bridge_times, check_finite, masked
from ..common import progress, report, row_seeded_noise


def _drift(schedule: BridgeSchedule, ts, stochastic: bool):
    """Weights (P, S, R, g^2) of DDBM's drift at times ts written around x_T: d = P (x - x_T) + S x_T + R D,
    from d = f x - g^2 (m s - h), s = -(x - a x_T - b D)/c^2, h = -(x - (alpha/alpha_T) x_T)/(alpha rho_bar)^2,
    m = 1 (reverse SDE) or 1/2 (probability-flow ODE); dt already scaled (i2sb: x 999). Near T, P ~ -5000
    multiplies x and the x_T weight P + Q ~ +5000 nearly cancels it: S = P + Q is formed here in float64,
    so a float32 latent only ever meets P through the small x - x_T."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    f, g2 = schedule.f_g2(ts)
    alpha, _, rho_bar = schedule.alpha_rho(ts)
    a, b, c = schedule.abc(ts)
    m = 1.0 if stochastic else 0.5
    inv_h = 1 / (alpha * rho_bar) ** 2
    P = f + g2 * (m / c**2 - inv_h)
    Q = -g2 * m * a / c**2 + g2 * (alpha / schedule.alpha_T) * inv_h
    R = -g2 * m * b / c**2
    return P.tolist(), (P + Q).tolist(), R.tolist(), g2.tolist()


@torch.no_grad()
def sample_ddbm_heun(denoiser, x_T: torch.Tensor, schedule: BridgeSchedule, steps: int, *,
                     churn_step_ratio: float = 0.33, rho: float = 7.0, noise_sampler=None, seed: int = 0,
                     mask=None, callback=None, disable=None) -> torch.Tensor:
    """DDBM's hybrid sampler: per step an Euler-Maruyama step of the bridge SDE over a fraction
    ``churn_step_ratio`` of the step, then a Heun step of the probability-flow ODE (Euler on the
    last step, to t = 0). Starts at x = x_T; NFE = 3 steps - 1 (churn > 0) or 2 steps - 1.
    The state is carried as u = x - x_T (the drift's large weights act on it; see ``_drift``)."""
    if not 0.0 <= churn_step_ratio < 1.0:
        raise ValueError(f"DDBM Heun: churn_step_ratio must be in [0, 1), got {churn_step_ratio}.")
    check_finite(x_T, "DDBM Heun")
    ts = schedule.heun_grid(int(steps), rho).tolist()
    scale = schedule.heun_time_scale
    churn = churn_step_ratio > 0
    t_hats = [t + churn_step_ratio * (t_next - t) for t, t_next in zip(ts[:-1], ts[1:])] if churn else ts[:-1]
    sde = _drift(schedule, ts[:-1], True)
    ode_hat = _drift(schedule, t_hats, False)
    ode_next = _drift(schedule, [max(t, schedule.t_min) for t in ts[1:]], False)  # unused where t_next = 0
    denoiser = masked(denoiser, mask)
    if noise_sampler is None and churn:
        noise_sampler = row_seeded_noise(seed, x_T)
    u = torch.zeros_like(x_T)
    call = 0
    for i in progress(len(ts) - 1, disable):
        t, t_hat, t_next = ts[i], t_hats[i], ts[i + 1]
        if churn:
            x = x_T + u
            x0 = denoiser(x, bridge_times(x, t), x_T)
            report(callback, call, x, t, x0)
            call += 1
            dt = (t_hat - t) * scale
            u = u + (sde[0][i] * u + sde[1][i] * x_T + sde[2][i] * x0) * dt \
                + (math.sqrt(abs(dt) * sde[3][i]) * noise_sampler(t, t_hat))
        x = x_T + u
        x0 = denoiser(x, bridge_times(x, t_hat), x_T)
        report(callback, call, x, t_hat, x0)
        call += 1
        dt = (t_next - t_hat) * scale
        d1 = ode_hat[0][i] * u + ode_hat[1][i] * x_T + ode_hat[2][i] * x0
        if t_next == 0.0:
            u = u + d1 * dt
            continue
        u_pred = u + d1 * dt
        x_pred = x_T + u_pred
        x0 = denoiser(x_pred, bridge_times(x, t_next), x_T)
        report(callback, call, x_pred, t_next, x0)
        call += 1
        d2 = ode_next[0][i] * u_pred + ode_next[1][i] * x_T + ode_next[2][i] * x0
        u = u + 0.5 * (d1 + d2) * dt
    return x_T + u
