"""Shared plumbing of the pack's sampler functions (k-diffusion calling convention)."""
from __future__ import annotations

import math

import torch

from .comfy_compat import noise_scale_of
from .schedule import NoiseSchedule, resolve_schedule


def check_inputs(x: torch.Tensor, sigmas, sampler: str, schedule: NoiseSchedule) -> torch.Tensor:
    """Validate a run's latent and sigmas; returns sigmas as a float64 host tensor.

    Reads the tensors once, before the sampling loop starts."""
    sig = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    if sig.ndim != 1 or sig.numel() < 2:
        raise ValueError(f"{sampler}: sigmas must be a 1-D schedule with at least 2 entries, got shape {tuple(sig.shape)}.")
    values = sig.tolist()  # checked as host floats: a few microseconds, not a torch op per check
    if not all(map(math.isfinite, values)):
        raise ValueError(f"{sampler}: sigmas contain NaN or infinity: {values}.")
    if min(values) < 0:
        raise ValueError(f"{sampler}: sigmas must be >= 0, got {values}.")
    if any(b > a for a, b in zip(values, values[1:])):
        raise ValueError(
            f"{sampler}: sigmas must be non-increasing (a denoising schedule), got {values}. "
            "Use a scheduler node's output or flip the list."
        )
    if schedule.is_flow and values[0] > 1.0:
        raise ValueError(f"{sampler}: a flow (CONST) model needs sigmas in [0, 1]; the first is {values[0]}.")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"{sampler}: the latent batch is empty (shape {tuple(x.shape)}); connect a latent with at "
                         "least one sample (batch_size >= 1).")
    # a finite sum implies finite entries (one pass, no bool temporary); isfinite only where it overflowed
    if not (torch.isfinite(x.sum()) or torch.isfinite(x).all()):
        raise ValueError(f"{sampler}: the input latent contains NaN or infinity; check the noise and latent inputs.")
    return sig


def setup_run(model, x, sigmas, sampler: str, parametrization=None):
    """(schedule, host float64 sigmas, s_in) for a sampler run."""
    schedule = resolve_schedule(model, parametrization)
    sig = check_inputs(x, sigmas, sampler, schedule)
    return schedule, sig, x.new_ones([x.shape[0]])


def step_noise_seed(seed: int, device) -> int:
    """The seed of a run's per-step noise generator: seed + 1 on the CPU, seed elsewhere (newer ComfyUI's
    ``default_noise_sampler``). ComfyUI draws the initial noise from a CPU generator seeded with the same
    seed, so a CPU step generator seeded with ``seed`` would repeat the initial noise bit for bit."""
    return int(seed) + 1 if torch.device(device).type == "cpu" else int(seed)


def seeded_noise_sampler(x: torch.Tensor, seed=None):
    """Per-step Gaussian noise ``(sigma, sigma_next) -> z`` shaped like x (ComfyUI's noise-sampler
    convention): one generator on x's device seeded ``step_noise_seed(seed)``, one draw per call. The
    stream depends on the device, as ComfyUI's does; ``seed=None`` draws from torch's global generator."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(step_noise_seed(seed, x.device))

    def draw(sigma=None, sigma_next=None):
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return draw


def row_seeded_noise(seed: int, like: torch.Tensor):
    """Device-independent noise ``(sigma=None, sigma_next=None) -> z`` shaped like ``like``: row i from its own
    CPU generator seeded seed + i (ComfyUI's per-batch-index convention), so a row does not depend on the
    batch size or on the device; each call draws the next sample of every row."""
    gens = [torch.Generator().manual_seed((int(seed) + i) % 2**64) for i in range(like.shape[0])]
    shape = tuple(like.shape[1:])

    def draw(sigma=None, sigma_next=None):
        z = torch.stack([torch.randn(shape, generator=g) for g in gens])
        return z.to(like.device, like.dtype)

    return draw


def step_noise_scale(model, s_noise: float) -> float:
    return float(s_noise) * noise_scale_of(model)


def report(callback, i, x, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


def progress(n, disable):
    """tqdm when present (ComfyUI ships it), a plain range otherwise or when ``disable`` is True (a disabled
    bar draws nothing, and building one costs ~10 us a call)."""
    if disable is True:
        return range(n)
    try:
        from tqdm.auto import trange
    except ImportError:
        return range(n)
    return trange(n, disable=disable)
