"""Classic reference samplers, written against the same schedule abstraction.

``sample_euler`` and ``sample_heun`` are k-diffusion's (Karras et al. 2022, Alg. 1-2 without
churn) in their literal sigma form, which holds for VE and flow models alike
(dx/dsigma = (x - D)/sigma). ``sample_dpmpp_2m`` is DPM-Solver++(2M) in (alpha, s, lam) form."""
from __future__ import annotations

import math

import torch

from .common import progress, report, setup_run
from .multistep import StepRow, run_rows
from .schedule import NoiseSchedule


def _require_sigma_form(schedule, name):
    if schedule.parametrization == "vp":
        raise ValueError(f"{name}: the k-diffusion sigma form covers 've' and 'flow' models, not 'vp'.")


def plan_euler(sigmas: torch.Tensor) -> list[StepRow]:
    """x_t = x + (sigma_t - sigma_s) (x - D)/sigma_s = (sigma_t/sigma_s) x + (1 - sigma_t/sigma_s) D."""
    sig = sigmas.tolist()
    return [StepRow(s, t, A=t / s, W=(1 - t / s,)) if t != s else StepRow(s, t, A=1.0, evaluate=False)
            for s, t in zip(sig[:-1], sig[1:])]


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, parametrization=None):
    schedule, sig, _ = setup_run(model, x, sigmas, "Euler", parametrization)
    _require_sigma_form(schedule, "Euler")
    return run_rows(model, x, plan_euler(sig), extra_args, callback, disable,
                    model_sigmas=torch.as_tensor(sigmas).detach())


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, parametrization=None):
    extra_args = {} if extra_args is None else extra_args
    schedule, sig, s_in = setup_run(model, x, sigmas, "Heun", parametrization)
    _require_sigma_form(schedule, "Heun")
    sig_list = sig.tolist()
    for i in progress(len(sig_list) - 1, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, x, sigmas[i], denoised)
        dt = sig_list[i + 1] - sig_list[i]
        d = (x - denoised) / sig_list[i]
        x_euler = x + d * dt
        if sig_list[i + 1] == 0:
            x = x_euler
        else:
            denoised_2 = model(x_euler, sigmas[i + 1] * s_in, **extra_args)
            x = x + (d + (x_euler - denoised_2) / sig_list[i + 1]) * (dt / 2)
    return x


def plan_dpmpp_2m(sigmas: torch.Tensor, schedule: NoiseSchedule) -> list[StepRow]:
    """DPM-Solver++(2M): x_t = (s_t/s_s) x - alpha_t expm1(-h) d, d = (1 + 1/2r) D_i - (1/2r) D_{i-1},
    h the step in half-log-SNR and r = h_{i-1}/h; first order on the first step, from flow sigma = 1
    (h infinite) and on the final denoise."""
    tab = schedule.coefficients(sigmas)
    sig, alpha, s, log_lam = (t.tolist() for t in (tab.sigma, tab.alpha, tab.s, tab.log_lam))
    rows, h_last = [], None
    for i in range(len(sig) - 1):
        if sig[i + 1] == sig[i]:
            rows.append(StepRow(sig[i], sig[i + 1], A=1.0, evaluate=False))
            continue
        if s[i + 1] == 0:
            rows.append(StepRow(sig[i], 0.0, A=0.0, W=(1.0,)))
            continue
        h = log_lam[i] - log_lam[i + 1]
        base = -alpha[i + 1] * math.expm1(-h)
        W = (base, 0.0)
        if h_last is not None and math.isfinite(h_last) and math.isfinite(h):
            half_inv_r = h / (2 * h_last)
            W = (base * (1 + half_inv_r), -base * half_inv_r)
        rows.append(StepRow(sig[i], sig[i + 1], A=s[i + 1] / s[i], W=W, order=len(W) if W[1] else 1))
        h_last = h
    return rows


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, parametrization=None):
    schedule, sig, _ = setup_run(model, x, sigmas, "DPM-Solver++(2M)", parametrization)
    return run_rows(model, x, plan_dpmpp_2m(sig, schedule), extra_args, callback, disable,
                    model_sigmas=torch.as_tensor(sigmas).detach())
