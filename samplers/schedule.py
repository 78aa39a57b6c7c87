"""The one noise-schedule abstraction every sampler of the pack uses.

A k-diffusion sigma is turned into the VP-form scalars of ``x = alpha * x0 + s * eps``:

* ``"ve"``   (ComfyUI EPS / V_PREDICTION / EDM / X0 models): alpha = 1, s = sigma.
* ``"vp"``   (the same model family with the state scaled to unit variance, DDPM style):
             alpha = 1/sqrt(1 + sigma^2), s = sigma * alpha.
* ``"flow"`` (ComfyUI CONST, rectified flow): alpha = 1 - sigma, s = sigma.

In all three ``lam = s / alpha`` (the noise-to-signal ratio, SNR = 1 / lam^2) is the VE noise level:
``lam = sigma`` for ve/vp and ``sigma / (1 - sigma)`` for flow (infinite at sigma = 1). Its log
``log_lam = log(s / alpha)`` is minus the half-log-SNR ``half_log_snr = log(alpha / s)``: log_lam grows
with sigma, the half-log-SNR falls. No other module computes alpha, s or lambda.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .comfy_compat import (  # noqa: F401  (the ComfyUI reads, importable from here as before)
    comfy_model_sampling, noise_scale_of, parametrization_of_model_sampling, parametrization_of_prediction,
    prediction_type,
)

PARAMETRIZATIONS = ("ve", "vp", "flow")

@dataclass(frozen=True)
class NoiseSchedule:
    """Maps k-diffusion sigmas to (alpha, s, lam, log_lam) for one parametrisation."""

    parametrization: str = "ve"

    def __post_init__(self):
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"Unknown parametrization {self.parametrization!r}; choose one of {PARAMETRIZATIONS}."
            )

    @property
    def is_flow(self) -> bool:
        return self.parametrization == "flow"

    def sigma_max_limit(self) -> float:
        """The largest sigma the parametrisation admits (flow time runs in [0, 1])."""
        return 1.0 if self.is_flow else math.inf

    def alpha(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.parametrization == "ve":
            return torch.ones_like(sigma)
        if self.parametrization == "vp":
            return torch.rsqrt(1.0 + sigma * sigma)
        return 1.0 - sigma

    def s(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.alpha(sigma) if self.parametrization == "vp" else sigma.clone()

    def log_lam(self, sigma: torch.Tensor) -> torch.Tensor:
        """log(s / alpha), minus the half-log-SNR (increasing in sigma); +inf at flow sigma = 1, -inf at sigma = 0."""
        if self.is_flow:
            return torch.log(sigma) - torch.log1p(-sigma)
        return torch.log(sigma)

    def half_log_snr(self, sigma: torch.Tensor) -> torch.Tensor:
        """log(alpha / s) = -log_lam, the DPM-Solver lambda (decreasing in sigma; +inf at sigma = 0)."""
        return -self.log_lam(sigma)

    def lam(self, sigma: torch.Tensor) -> torch.Tensor:
        """s / alpha, the noise-to-signal ratio (the VE noise level; 0 at sigma = 0)."""
        return torch.exp(self.log_lam(sigma))

    def sigma_from_lam(self, lam: torch.Tensor) -> torch.Tensor:
        """Inverse of ``lam``."""
        return lam / (1.0 + lam) if self.is_flow else lam.clone()

    def coefficients(self, sigmas) -> "ScheduleTable":
        """Float64 host table of every scalar a sampler needs for a whole run."""
        sig = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
        return ScheduleTable(
            sigma=sig, alpha=self.alpha(sig), s=self.s(sig), lam=self.lam(sig), log_lam=self.log_lam(sig)
        )

    # Data-space helpers (used by tests, the CLI and samplers that need x0 / eps conversions).
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return float(self.alpha(sigma)) * x0 + float(self.s(sigma)) * noise

    def to_ve(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The VE-scaled state y = x / alpha (noise level lam)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return x / float(self.alpha(sigma))


@dataclass(frozen=True)
class ScheduleTable:
    """The scalars of ``NoiseSchedule`` at every sigma of a run (lam = s / alpha, log_lam = -half-log-SNR)."""

    sigma: torch.Tensor
    alpha: torch.Tensor
    s: torch.Tensor
    lam: torch.Tensor
    log_lam: torch.Tensor


def resolve_schedule(model, parametrization: str | None = None) -> NoiseSchedule:
    """Explicit option, else the ComfyUI model's own type, else the model's ``parametrization``
    attribute (the built-in exact models), else k-diffusion's VE convention."""
    if parametrization is not None:
        return NoiseSchedule(parametrization)
    model_sampling = comfy_model_sampling(model)
    if model_sampling is not None:
        return NoiseSchedule(parametrization_of_model_sampling(model_sampling))
    return NoiseSchedule(getattr(model, "parametrization", "ve"))


def ddim_step(x: torch.Tensor, denoised: torch.Tensor, s_from, s_to, alpha_from, alpha_to) -> torch.Tensor:
    """Deterministic DDIM step (exponential Euler; exact for a constant denoiser) of the state
    x = alpha x0 + s eps from (alpha_from, s_from) to (alpha_to, s_to), in either direction:
    x_to = alpha_to D + (s_to / s_from) (x - alpha_from D). Finite at flow sigma = 1 (alpha = 0)."""
    ratio = s_to / s_from
    return ratio * x + (alpha_to - ratio * alpha_from) * denoised


# ---- reference step schedules (the CLI, tests and benchmarks compare against these) -------

def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) schedule, n steps, ending in 0 (as k-diffusion / ComfyUI 'karras')."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def log_lam_uniform_sigmas(n: int, sigma_min: float, sigma_max: float, schedule: NoiseSchedule,
                           final_zero: bool = False) -> torch.Tensor:
    """n steps uniform in log(lam) (so in the half-log-SNR, its negative) from sigma_max to sigma_min."""
    ends = torch.tensor([sigma_max, sigma_min], dtype=torch.float64)
    log_lam = schedule.log_lam(ends)
    sigmas = schedule.sigma_from_lam(torch.exp(torch.linspace(float(log_lam[0]), float(log_lam[1]), n + 1,
                                                              dtype=torch.float64)))
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if final_zero else sigmas


def flow_shift_sigmas(n: int, shift: float = 3.0, t_min: float = 0.0) -> torch.Tensor:
    """Flow-model schedule: t linear from 1 to t_min, sigma = shift t / (1 + (shift - 1) t)
    (SD3-style time shift, like ComfyUI's 'simple' on a shifted flow model), ending in 0."""
    t = torch.linspace(1.0, t_min, n + 1, dtype=torch.float64)
    sigmas = shift * t / (1 + (shift - 1) * t)
    return sigmas if t_min == 0.0 else torch.cat([sigmas, sigmas.new_zeros(1)])


def discrete_vp_sigmas(timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """The k-diffusion sigma table of a discrete DDPM with a 'scaled linear' beta schedule
    (SD1.x / SDXL defaults), ascending: sigma_t = sqrt((1 - abar_t) / abar_t)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - abar) / abar).sqrt()
