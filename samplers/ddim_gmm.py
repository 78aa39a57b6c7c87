"""DDIM with moment-matched Gaussian-mixture kernels (Gabbur, arXiv 2311.04938), for eps, v
and flow models. shared/specs/ddim_gmm.md has the derivation; in (alpha, s) form a step is

    x' = alpha_t D + sqrt(s_t^2 - c^2) eps_hat + delta_k + n_k,   k ~ uniform(K)

with c the DDIM(eta) ancestral std and (delta_k, n_k) a zero-mean mixture of total covariance
c^2 I. K = 1 (or scale 0) is the Gaussian DDIM(eta) kernel. Offsets are built once per step
(or once per run) on the host, from their own seed, before the loop.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .common import gaussian_noise_sampler, progress, report, setup_run
from .schedule import NoiseSchedule

ETA_CONVENTIONS = ("ddim", "rfim")
OFFSETS = ("ortho", "rand")
COVARIANCES = ("auto", "strict", "diag", "vub")
SCALE_UNITS = ("vp", "relative")
ON_INFEASIBLE = ("clamp", "error")


@dataclass
class GMMStep:
    final: bool = False
    A: float = 1.0  # coefficient of x   (sqrt(s_t^2 - c^2) / s_s)
    B: float = 0.0  # coefficient of D   (alpha_t - A alpha_s)
    c: float = 0.0  # ancestral std of the Gaussian kernel
    offsets: torch.Tensor | None = None  # [K, D] zero-mean offsets (None: Gaussian kernel)
    basis: torch.Tensor | None = None  # strict: [D, r] orthonormal span of the offsets
    shrink: torch.Tensor | None = None  # strict: [r] sqrt(c^2 - lam) - c along the basis
    std: torch.Tensor | None = None  # diag: [K, D]; vub: [1, D] per-coordinate noise std


def make_offsets(dim: int, components: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Unit-scale zero-mean offsets [K, D] (uniform priors). ortho: centred orthonormal columns
    (norm sqrt(1 - 1/K)); rand: centred Gaussian columns over one common RMS norm."""
    if components > dim:
        raise ValueError(f"DDIM-GMM: components ({components}) must be at most the latent size ({dim}).")
    raw = torch.randn(dim, components, dtype=torch.float64, generator=generator)
    if kind == "ortho":
        raw, _ = torch.linalg.qr(raw)
    centred = (raw - raw.mean(dim=1, keepdim=True)).T  # [K, D]
    if kind == "rand":
        rms = centred.norm(dim=1).pow(2).mean().sqrt()
        centred = centred / rms if rms > 0 else centred  # K = 1: all zero, no division
    return centred


def _offset_covariance(offsets: torch.Tensor):
    """Eigenpairs of S = (1/K) sum_k delta_k delta_k^T without forming D x D: (basis [D, r], lam [r])."""
    q, r = torch.linalg.qr(offsets.T)  # offsets^T = Q R, S = Q (R R^T / K) Q^T
    lam, w = torch.linalg.eigh(r @ r.T / offsets.shape[0])
    keep = lam > 1e-12 * max(float(lam.max()), 1e-300)
    return q @ w[:, keep], lam[keep].clamp(min=0.0)


def plan_ddim_gmm(sigmas, schedule: NoiseSchedule, dim: int, eta=0.0, eta_convention="ddim", components=8,
                  scale=1.0, scale_units="vp", offsets="ortho", covariance="auto", share_across_steps=False,
                  offset_seed=0, skip_last_offsets=0, on_infeasible="clamp") -> list[GMMStep]:
    for value, allowed, what in ((eta_convention, ETA_CONVENTIONS, "eta_convention"), (offsets, OFFSETS, "offsets"),
                                 (covariance, COVARIANCES, "covariance"), (scale_units, SCALE_UNITS, "scale_units"),
                                 (on_infeasible, ON_INFEASIBLE, "on_infeasible")):
        if value not in allowed:
            raise ValueError(f"DDIM-GMM: {what} must be one of {allowed}, got {value!r}.")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM-GMM: eta must be in [0, 1], got {eta}.")
    if components < 1 or scale < 0 or skip_last_offsets < 0:
        raise ValueError("DDIM-GMM: components must be >= 1, scale >= 0 and skip_last_offsets >= 0.")
    if scale_units == "relative" and scale > 1:
        raise ValueError(f"DDIM-GMM: a relative scale is a fraction of the feasible maximum, in [0, 1]; got {scale}.")
    if covariance == "auto":
        covariance = "strict" if eta > 0 else "vub"
    tab = schedule.coefficients(sigmas)
    alpha, s, log_lam = tab.alpha.tolist(), tab.s.tolist(), tab.log_lam.tolist()
    n = len(alpha) - 1
    last_mixture_step = n - 1 - skip_last_offsets  # the final step (to sigma = 0) never has offsets
    generator = torch.Generator().manual_seed(int(offset_seed))
    shared = make_offsets(dim, components, offsets, generator) if components > 1 and share_across_steps else None
    steps, clamped = [], 0
    for i in range(n):
        if s[i + 1] == 0:
            steps.append(GMMStep(final=True))
            continue
        ratio = math.exp(2 * (log_lam[i + 1] - log_lam[i])) if math.isfinite(log_lam[i]) else 0.0
        c = eta * s[i + 1] * (1.0 if eta_convention == "rfim" else math.sqrt(max(1.0 - ratio, 0.0)))
        A = math.sqrt(max(s[i + 1] ** 2 - c**2, 0.0)) / s[i]
        step = GMMStep(A=A, B=alpha[i + 1] - A * alpha[i], c=c)
        if components > 1 and scale > 0 and i < last_mixture_step:
            unit = shared if shared is not None else make_offsets(dim, components, offsets, generator)
            if scale_units == "vp":  # paper units: VP-normalised, converted to the native scale
                size = scale * math.hypot(alpha[i + 1], s[i + 1])
            else:  # fraction of the largest strictly feasible ortho scale
                size = scale * c * math.sqrt(components)
            delta = size * unit
            if covariance == "strict":
                basis, lam = _offset_covariance(delta)
                worst = float(lam.max()) if lam.numel() else 0.0
                if worst > c**2 * (1 + 1e-9):
                    if on_infeasible == "error":
                        raise ValueError(
                            f"DDIM-GMM: strict moment matching is infeasible at step {i} (offset variance {worst:.3g} > "
                            f"kernel variance {c**2:.3g}); lower the scale, raise eta, or use scale_units='relative'.")
                    clamped += 1
                    shrink_to = math.sqrt(c**2 / worst) if worst > 0 else 0.0
                    delta, lam = delta * shrink_to, lam * shrink_to**2
                step.basis, step.shrink = basis, (c**2 - lam).clamp(min=0).sqrt() - c
            elif covariance == "diag":  # paper ORTHO: Delta_k = S / (K pi_k) = S, diagonal only
                var = c**2 - (delta**2).mean(dim=0, keepdim=True).expand_as(delta)
                step.std = var.clamp(min=0).sqrt()
            else:  # vub: the eigenvalue upper bound s^2/K taken off the first K coordinates
                var = torch.full((1, dim), c**2, dtype=torch.float64)
                var[0, :components] -= size**2 / components
                step.std = var.clamp(min=0).sqrt()
            step.offsets = delta
        steps.append(step)
    if clamped:
        warnings.warn(f"DDIM-GMM: strict offsets were scaled down to feasibility on {clamped} step(s) "
                      "(at eta = 0 strict moment matching is plain DDIM).", stacklevel=3)
    return steps


def mixture_noise(step: GMMStep, z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """delta_k + n_k for a batch: z [B, D] standard normal, index [B] components."""
    out = step.offsets[index]
    if step.basis is not None:  # exact: covariance c^2 I - S in span(offsets), c^2 I elsewhere
        return out + step.c * z + ((z @ step.basis) * step.shrink) @ step.basis.T
    std = step.std[index] if step.std.shape[0] > 1 else step.std
    return out + std * z


@torch.no_grad()
def sample_ddim_gmm(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, eta_convention="ddim",
                    components=8, scale=1.0, scale_units="vp", offsets="ortho", covariance="auto",
                    share_across_steps=False, offset_seed=0, skip_last_offsets=0, on_infeasible="clamp",
                    parametrization=None):
    """DDIM(eta) with K-component Gaussian-mixture kernels, k-diffusion convention.

    ``covariance``: 'strict' (exact low-rank moment matching; at eta = 0 this is DDIM), 'diag'
    (paper ORTHO, diagonal only), 'vub' (paper ORTHO-VUB: clipped variance bound, the source of
    its eta = 0 gains; breaks the second moment), 'auto' = strict if eta > 0 else vub.
    ``scale`` in VP units (paper) or 'relative' (fraction of the strictly feasible maximum).
    Offsets come from ``offset_seed``; noise and component draws from extra_args['seed']."""
    extra_args = {} if extra_args is None else extra_args
    schedule, sig, s_in = setup_run(model, x, sigmas, "DDIM-GMM", parametrization)
    batch, dim = x.shape[0], x[0].numel()
    plan = plan_ddim_gmm(sig, schedule, dim, eta, eta_convention, components, scale, scale_units, offsets, covariance,
                         share_across_steps, offset_seed, skip_last_offsets, on_infeasible)
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    for step in plan:  # one host -> device copy per step's tables, before the loop
        for name in ("offsets", "basis", "shrink", "std"):
            if getattr(step, name) is not None:
                setattr(step, name, getattr(step, name).to(x.device, work))
    seed = extra_args.get("seed")
    noise = gaussian_noise_sampler(x, seed)
    picks = torch.Generator().manual_seed(int(seed) + 1 if seed is not None else 0)
    for i in progress(len(plan), disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, x, sigmas[i], denoised)
        step = plan[i]
        if step.final:
            x = denoised
            continue
        x = step.A * x + step.B * denoised
        if step.offsets is not None:
            index = torch.randint(components, (batch,), generator=picks).to(x.device)
            z = noise().reshape(batch, dim).to(work)
            x = x + mixture_noise(step, z, index).reshape(x.shape).to(x.dtype)
        elif step.c > 0:
            x = x + step.c * noise()
    return x
