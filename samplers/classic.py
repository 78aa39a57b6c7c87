"""Classic reference samplers, written against the same schedule abstraction.

``sample_euler`` and ``sample_heun`` are k-diffusion's (Karras et al. 2022, Alg. 1-2 without
churn) in their literal sigma form, which holds for VE and flow models alike
(dx/dsigma = (x - D)/sigma). ``sample_dpmpp_2m`` is DPM-Solver++(2M) in (alpha, s, lam) form."""
from __future__ import annotations

import math

import torch

from .common import progress, report, setup_run


def _require_sigma_form(schedule, name):
    if schedule.parametrization == "vp":
        raise ValueError(f"{name}: the k-diffusion sigma form covers 've' and 'flow' models, not 'vp'.")


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, parametrization=None):
    extra_args = {} if extra_args is None else extra_args
    schedule, sig, s_in = setup_run(model, x, sigmas, "Euler", parametrization)
    _require_sigma_form(schedule, "Euler")
    sig_list = sig.tolist()
    for i in progress(len(sig_list) - 1, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, x, sigmas[i], denoised)
        x = x + (sig_list[i + 1] - sig_list[i]) * ((x - denoised) / sig_list[i])
    return x


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


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, parametrization=None):
    extra_args = {} if extra_args is None else extra_args
    schedule, sig, s_in = setup_run(model, x, sigmas, "DPM-Solver++(2M)", parametrization)
    tab = schedule.coefficients(sig)
    alpha, s, log_lam = tab.alpha.tolist(), tab.s.tolist(), tab.log_lam.tolist()
    old_denoised, h_last = None, None
    for i in progress(len(alpha) - 1, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, x, sigmas[i], denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        h = log_lam[i] - log_lam[i + 1]  # step in half-log-SNR (inf from flow sigma = 1)
        d = denoised
        if old_denoised is not None and math.isfinite(h_last) and math.isfinite(h):
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (s[i + 1] / s[i]) * x - alpha[i + 1] * math.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return x
