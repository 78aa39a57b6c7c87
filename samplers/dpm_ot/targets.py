"""Target pools for DPM-OT: clean latents noised to the junction, the schedule above it, DDIM inversion."""
from __future__ import annotations

import torch

from ..common import row_seeded_noise
from ..comfy_compat import parametrization_of_prediction
from ..schedule import NoiseSchedule, ddim_step, log_lam_uniform_sigmas
from .map import SIGMA_TOLERANCE, OTMap, check_clean_latents, check_junction


def pool_from_clean(clean: torch.Tensor, sigma_junction: float, model_sampling: str, latent_format: str = "unknown",
                    seed: int = 0, keep_clean: bool = True, who: str = "DPM-OT targets") -> OTMap:
    """Targets y_i = alpha_j x0_i + s_j eps_i with a fixed per-target seed (seed + i); no model call."""
    check_clean_latents(clean, who)
    schedule = NoiseSchedule(parametrization_of_prediction(model_sampling))
    sigma_junction = check_junction(sigma_junction, schedule, who)
    clean = clean.detach().to("cpu", torch.float32)
    noise = row_seeded_noise(seed, clean)()
    targets = schedule.add_noise(clean, noise, sigma_junction)
    return OTMap(targets=targets.to(torch.float16), sigma_junction=sigma_junction, model_sampling=model_sampling,
                 latent_format=latent_format, clean=clean.to(torch.float16) if keep_clean else None,
                 target_ids=torch.arange(clean.shape[0], dtype=torch.int64),
                 info={"provenance": "encode", "conditioning": "unconditional", "target_seed": str(int(seed))})


def junction_prefix(sigmas, sigma_junction: float, who: str = "DPM-OT targets") -> torch.Tensor:
    """The part of a schedule above sigma_j, ending exactly at sigma_j (a run over it stops at the junction)."""
    sig = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    above = sig[sig > sigma_junction * (1 + SIGMA_TOLERANCE)]
    if above.numel() == 0:
        raise ValueError(f"{who}: the schedule starts at {float(sig[0]):.4g}, not above the junction sigma "
                         f"{sigma_junction:.4g}; use a schedule that starts higher or a smaller junction.")
    return torch.cat([above, torch.tensor([float(sigma_junction)], dtype=torch.float64)])


@torch.no_grad()
def invert_to_junction(model, clean: torch.Tensor, sigma_junction: float, steps: int, sigma_min: float,
                       schedule: NoiseSchedule, extra_args=None, callback=None) -> torch.Tensor:
    """Deterministic DDIM (= Euler in log-lambda) inversion of clean latents from sigma_min up to sigma_j.
    ``steps`` model calls per latent; an ODE finisher on the same grid walks back to the image."""
    extra_args = {} if extra_args is None else extra_args
    if not 0 < sigma_min < sigma_junction:
        raise ValueError(f"DPM-OT invert: sigma_min {sigma_min:.4g} must lie in (0, junction {sigma_junction:.4g}).")
    sigmas = log_lam_uniform_sigmas(int(steps), sigma_min, sigma_junction, schedule).flip(0)
    tab = schedule.coefficients(sigmas)
    alpha, s = tab.alpha.tolist(), tab.s.tolist()
    s_in = clean.new_ones([clean.shape[0]])
    x = alpha[0] * clean
    for i in range(int(steps)):
        denoised = model(x, sigmas[i].to(clean) * s_in, **extra_args)
        x = ddim_step(x, denoised, s[i], s[i + 1], alpha[i], alpha[i + 1])
        if callback is not None:
            callback(i, denoised, x, int(steps))
    return x
