"""DDIM with moment-matched Gaussian-mixture kernels (Gabbur, arXiv 2311.04938), for eps, v
and flow models. shared/specs/ddim_gmm.md has the derivation; in (alpha, s) form a step is

    x' = alpha_t D + sqrt(s_t^2 - c^2) eps_hat + delta_k + n_k,   k ~ uniform(K)

with c the DDIM(eta) ancestral std and (delta_k, n_k) a zero-mean mixture of total covariance
(about) c^2 I. The offsets are delta_k = size (u_k - u_bar) for K orthonormal directions u_k
(u_bar their mean): in the span E of the u's the offsets have covariance
S = (size^2 / K) P_C, with C the (K-1)-dim centred part of E (u_bar's direction gets none).
The noise n_k is c z with its variance changed inside E only:

    strict  C: c^2 - size^2/K,  u_bar: c^2       total covariance exactly c^2 I
    vub     every direction of E: max(c^2 - size^2/K, 0)   (the paper's eigenvalue upper bound
            size^2/K of Delta_k, Eq. 12, taken off along the u's)
    diag    every direction of E: max(c^2 - (size^2/K)(1 - 1/K), 0)   (the paper's ORTHO rule:
            the diagonal of Delta_k = S in the u basis)

K = 1, scale 0, or eta = 0 with strict, run the Gaussian DDIM(eta) step itself (same code, same
noise). One set of directions per run is drawn on the latent's device from ``offset_seed``;
steps use cyclic shifts of it (fresh directions at no cost) unless ``share_across_steps``.
Component picks are drawn on the device once, before the loop.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch

from .common import progress, report, seeded_noise_sampler, setup_run
from .schedule import NoiseSchedule

PICK_SEED_OFFSET = 0x6D1C  # component picks: a stream apart from the step noise (seed + 1 on the CPU)
ETA_CONVENTIONS = ("ddim", "rfim")
# "rand" is kept so saved workflows load; it builds the same orthonormal directions as "ortho"
# (centred random Gaussian directions are orthogonal to 1/sqrt(D) in latent sizes; the paper
# measured no difference between the two).
OFFSETS = ("ortho", "rand")
COVARIANCES = ("auto", "strict", "diag", "vub")
SCALE_UNITS = ("vp", "relative")
ON_INFEASIBLE = ("clamp", "error")
# Above this many numbers (and when K divides D) the K directions are cyclic shifts of one Gaussian
# vector (one noise draw instead of K), orthonormalised exactly; otherwise K independent Gaussian vectors.
_DENSE_DIRECTIONS_MAX = 1 << 17
_CACHED_DIRECTIONS_MAX = 1 << 22  # 16 MB of float32 directions kept between runs at most


@dataclass
class GMMStep:
    final: bool = False
    A: float = 1.0  # coefficient of x   (sqrt(s_t^2 - c^2) / s_s)
    B: float = 0.0  # coefficient of D   (alpha_t - A alpha_s)
    c: float = 0.0  # ancestral std of the Gaussian kernel
    size: float = 0.0  # offset size: delta_k = size (u_k - u_bar); 0 = the Gaussian kernel
    std_centred: float = 0.0  # noise std along the K-1 centred offset directions
    std_mean: float = 0.0  # noise std along u_bar (the K-th direction of the offsets' span)
    shift: int = 0  # cyclic shift of the run's directions at this step

    @property
    def mixture(self) -> bool:
        return self.size > 0


def noise_variances(covariance: str, c: float, size: float, components: int) -> tuple[float, float]:
    """(variance along the centred offset directions, along u_bar) of the noise n_k."""
    bound = size**2 / components  # every eigenvalue bound of Delta_k (uniform priors)
    if covariance == "strict":
        return c**2 - bound, c**2
    removed = bound if covariance == "vub" else bound * (1 - 1 / components)
    var = max(c**2 - removed, 0.0)  # the paper clips negative variances (App. A.5)
    return var, var


def plan_ddim_gmm(sigmas, schedule: NoiseSchedule, dim: int, eta=0.0, eta_convention="ddim", components=8,
                  scale=1.0, scale_units="vp", offsets="ortho", covariance="auto", share_across_steps=False,
                  offset_seed=0, skip_last_offsets=0, on_infeasible="clamp") -> list[GMMStep]:
    """Every scalar of a run, in float64 on the host, before the loop. ``components`` is capped
    at the latent size ``dim`` (orthonormal directions)."""
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
    K = min(int(components), int(dim))
    tab = schedule.coefficients(sigmas)
    alpha, s, log_lam = tab.alpha.tolist(), tab.s.tolist(), tab.log_lam.tolist()
    n = len(alpha) - 1
    last_mixture_step = n - 1 - skip_last_offsets  # the final step (to sigma = 0) never has offsets
    shifts = torch.Generator().manual_seed(int(offset_seed) + 1)  # host ints: no device values read
    steps, clamped = [], 0
    for i in range(n):
        if s[i + 1] == 0:
            steps.append(GMMStep(final=True))
            continue
        ratio = math.exp(2 * (log_lam[i + 1] - log_lam[i])) if math.isfinite(log_lam[i]) else 0.0
        c = eta * s[i + 1] * (1.0 if eta_convention == "rfim" else math.sqrt(max(1.0 - ratio, 0.0)))
        A = math.sqrt(max(s[i + 1] ** 2 - c**2, 0.0)) / s[i]
        step = GMMStep(A=A, B=alpha[i + 1] - A * alpha[i], c=c)
        if K > 1 and scale > 0 and i < last_mixture_step:
            if scale_units == "vp":  # paper units: VP-normalised, converted to the native scale
                size = scale * math.hypot(alpha[i + 1], s[i + 1])
            else:  # fraction of the largest strictly feasible scale
                size = scale * c * math.sqrt(K)
            if covariance == "strict" and size**2 / K > c**2 * (1 + 1e-12):
                if on_infeasible == "error":
                    raise ValueError(
                        f"DDIM-GMM: strict moment matching is infeasible at step {i} (offset variance "
                        f"{size**2 / K:.3g} > kernel variance {c**2:.3g}); lower the scale, raise eta, or use "
                        "scale_units='relative'.")
                clamped += 1
                size = c * math.sqrt(K)
            if size > 0:
                var_c, var_m = noise_variances(covariance, c, size, K)
                step.size, step.std_centred, step.std_mean = size, math.sqrt(max(var_c, 0.0)), math.sqrt(var_m)
                if not share_across_steps:
                    step.shift = int(torch.randint(dim, (1,), generator=shifts))
        steps.append(step)
    if clamped:
        warnings.warn(f"DDIM-GMM: strict offsets were scaled down to feasibility on {clamped} step(s) "
                      "(at eta = 0 strict moment matching is plain DDIM).", stacklevel=3)
    return steps


def make_directions(dim: int, components: int, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """K orthonormal directions [K, D] in ``dtype`` on ``device`` from their own seed: K Gaussian
    vectors orthonormalised by Cholesky-QR (the K x K Gram matrix factored in float64), or for
    large latents K shifts of one Gaussian vector (below). No D x D matrix, nothing copied from
    the host."""
    device = torch.device("cpu") if device is None else torch.device(device)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    eye = torch.eye(components, dtype=torch.float64, device=device)
    if components * dim > _DENSE_DIRECTIONS_MAX and dim % components == 0:
        # K shifts by multiples of D/K of one Gaussian vector g: their Gram matrix is circulant, so is its
        # inverse square root C, and C @ rows is again K shifts of one vector h = sum_j C[0, j] shift_j(g):
        # exactly orthonormal for the cost of a few passes over D.
        step = dim // components
        g = torch.randn(dim, device=device, dtype=dtype, generator=generator)
        lags = torch.stack([torch.dot(g, torch.roll(g, k * step)) for k in range(components)]).to(torch.float64)
        gram = lags[(torch.arange(components, device=device)[None, :] - torch.arange(components, device=device)[:, None])
                    % components]
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        first_row = (eigenvectors[0] * eigenvalues.clamp(min=1e-300).rsqrt()) @ eigenvectors.T
        h = first_row.to(dtype) @ _cyclic_shifts(g, components, step)
        return _cyclic_shifts(h, components, step)
    raw = torch.randn(components, dim, device=device, dtype=dtype, generator=generator)
    chol = torch.linalg.cholesky_ex((raw @ raw.T).to(torch.float64)).L
    return torch.linalg.solve_triangular(chol, eye, upper=False).to(dtype) @ raw


def _cyclic_shifts(v: torch.Tensor, count: int, step: int) -> torch.Tensor:
    """[count, D]: row j is torch.roll(v, j * step), copied straight into one tensor."""
    out = torch.empty((count, v.numel()), dtype=v.dtype, device=v.device)
    for j in range(count):
        shift = (j * step) % v.numel()
        out[j, shift:] = v[:v.numel() - shift]
        out[j, :shift] = v[v.numel() - shift:]
    return out


def mixture_noise(step: GMMStep, directions: torch.Tensor, z: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """delta_k + n_k for a batch: z [B, D] standard normal, onehot [B, K] the picks, directions
    [K, D] orthonormal (unshifted; the step's shift is applied here)."""
    K = directions.shape[0]
    picks = step.size * (onehot - 1.0 / K)  # delta_k = size (u_k - u_bar) in the u basis
    if step.c > 0:
        z_shifted = torch.roll(z, -step.shift, dims=1) if step.shift else z
        coords = z_shifted @ directions.T  # [B, K]
        mean = coords.mean(dim=1, keepdim=True)  # along u_bar (times sqrt(K))
        picks = picks + (step.std_centred - step.c) * (coords - mean) + (step.std_mean - step.c) * mean
    in_span = picks @ directions
    if step.c > 0:
        return _add_rolled_(step.c * z, in_span, step.shift)
    return torch.roll(in_span, step.shift, dims=1) if step.shift else in_span


def _add_rolled_(out: torch.Tensor, t: torch.Tensor, shift: int) -> torch.Tensor:
    """out += torch.roll(t, shift, dims=1), in place, without the rolled copy."""
    if not shift:
        return out.add_(t)
    width = t.shape[1]
    out[:, shift:] += t[:, :width - shift]
    out[:, :shift] += t[:, width - shift:]
    return out


@functools.lru_cache(maxsize=1)
def _cached_directions(dim: int, components: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return make_directions(dim, components, seed, device, dtype)


def run_directions(dim: int, components: int, seed: int, device, dtype) -> torch.Tensor:
    """``make_directions`` through a one-entry cache (a queue of runs with one offset seed draws them once;
    nothing writes to them), for up to _CACHED_DIRECTIONS_MAX numbers (larger ones are made per run)."""
    if components * dim > _CACHED_DIRECTIONS_MAX:
        return make_directions(dim, components, seed, device, dtype)
    return _cached_directions(int(dim), int(components), int(seed), torch.device(device), dtype)


@torch.no_grad()
def sample_ddim_gmm(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, eta_convention="ddim",
                    components=8, scale=1.0, scale_units="vp", offsets="ortho", covariance="auto",
                    share_across_steps=False, offset_seed=0, skip_last_offsets=0, on_infeasible="clamp",
                    parametrization=None):
    """DDIM(eta) with K-component Gaussian-mixture kernels, k-diffusion convention.

    ``covariance``: 'strict' (exact moment matching; at eta = 0 this is DDIM), 'diag' (paper
    ORTHO), 'vub' (paper ORTHO-VUB: clipped variance bound, the source of its eta = 0 gains;
    breaks the second moment), 'auto' = strict if eta > 0 else vub. ``scale`` in VP units
    (paper) or 'relative' (fraction of the strictly feasible maximum). Offsets come from
    ``offset_seed``; noise and component picks from extra_args['seed']."""
    extra_args = {} if extra_args is None else extra_args
    schedule, sig, s_in = setup_run(model, x, sigmas, "DDIM-GMM (DDIM-GMM Sampler node / fs_ddim_* KSampler entries)", parametrization)
    batch, dim = x.shape[0], x[0].numel()
    plan = plan_ddim_gmm(sig, schedule, dim, eta, eta_convention, components, scale, scale_units, offsets, covariance,
                         share_across_steps, offset_seed, skip_last_offsets, on_infeasible)
    seed = extra_args.get("seed")
    noise = seeded_noise_sampler(x, seed)
    if any(step.mixture for step in plan):  # directions and every pick of the run, on the device, once
        K = min(int(components), dim)
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        directions = run_directions(dim, K, offset_seed, x.device, work)
        pick_seed = PICK_SEED_OFFSET + (int(seed) if seed is not None else 0)
        pick_gen = torch.Generator(device=x.device).manual_seed(pick_seed)
        picks = torch.randint(K, (len(plan), batch), device=x.device, generator=pick_gen)
        onehot = torch.nn.functional.one_hot(picks, K).to(work)  # [steps, B, K]
    for i in progress(len(plan), disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, x, sigmas[i], denoised)
        step = plan[i]
        if step.final:
            x = denoised
            continue
        x = step.A * x  # a new tensor (the model and the callback saw the old one); the other terms added in place
        x += step.B * denoised
        if step.mixture:
            z = noise().reshape(batch, dim).to(work) if step.c > 0 else None
            x += mixture_noise(step, directions, z, onehot[i]).reshape(x.shape).to(x.dtype)
        elif step.c > 0:
            x += step.c * noise()
    return x
