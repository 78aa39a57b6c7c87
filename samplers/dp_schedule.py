"""ELBO-optimal step schedules by exact dynamic programming (Watson et al., arXiv 2106.03802).

With the posterior ("small") variance every ELBO term of a jump t -> s is
L(t, s) = 1/2 (SNR(s) - SNR(t)) m(t),  m(t) = E ||x0 - D(x_t, t)||^2,
so one model evaluation per (data latent, candidate sigma) gives the whole cost matrix, and the
least-cost path with exactly K edges is found in O(K G^2). shared/specs/dp_schedule.md.
Node index 0 is the terminal sigma = 0; node j >= 1 is candidate grid[j - 1] (ascending).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .schedule import NoiseSchedule, ddim_step

VARIANCES = ("small", "large")
DECODERS = ("sigma", "mse")
OBJECTIVES = ("elbo", "local_error")  # local_error: experimental, beyond the paper (spec section 8)


def snr(sigmas: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """SNR = (alpha / s)^2 = 1 / lam^2 (float64; 0 at flow sigma = 1)."""
    return torch.exp(2.0 * schedule.half_log_snr(torch.as_tensor(sigmas, dtype=torch.float64)))


def check_data_latents(latents: torch.Tensor, who: str = "Schedule optimizer") -> None:
    if latents.ndim < 2 or latents.shape[0] == 0:
        raise ValueError(f"{who}: needs a batch of data latents [N, ...], got shape {tuple(latents.shape)}.")
    if not torch.isfinite(latents).all():
        raise ValueError(f"{who}: the data latents contain NaN or infinity.")
    spread = latents.to(torch.float64).flatten(1).std(dim=1)
    if (spread < 1e-6).any():
        raise ValueError(f"{who}: {int((spread < 1e-6).sum())} of the latents are constant (e.g. EmptyLatentImage); "
                         "feed VAE-encoded images of the kind you want to generate.")


def probe_latents(latents: torch.Tensor) -> torch.Tensor:
    """Checked data latents in at least float32 (the model gets float32 inputs; ComfyUI casts them to the
    network's dtype itself). Probed in float16 through ComfyUI, every error came back NaN and the schedule
    repeated one sigma."""
    check_data_latents(latents)
    return latents.to(torch.promote_types(latents.dtype, torch.float32))


def probe_noise(latents: torch.Tensor, seed: int) -> torch.Tensor:
    """The probe's common noise: a CPU generator seeded ``seed`` in float64 (device independent)."""
    eps = torch.randn(latents.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    return eps.to(latents.device, latents.dtype)


@torch.no_grad()
def probe_mse(model, latents: torch.Tensor, grid: torch.Tensor, schedule: NoiseSchedule, seed: int = 0,
              callback=None, extra_args: dict | None = None) -> torch.Tensor:
    """Per-sample squared denoising error ||x0 - D(x_sigma, sigma)||^2, [N, G] float64: exactly one
    model call per candidate for the whole batch, with the same noise at every candidate (common
    random numbers). ``callback(j, G)`` after each candidate (progress / interruption)."""
    latents = probe_latents(latents)
    eps = probe_noise(latents, seed)
    tab = schedule.coefficients(grid)
    ones = latents.new_ones(latents.shape[0])
    errors = []
    for j, (sigma, alpha, s) in enumerate(zip(tab.sigma.tolist(), tab.alpha.tolist(), tab.s.tolist())):
        x = alpha * latents + s * eps
        denoised = model(x, sigma * ones, **(extra_args or {}))
        errors.append((latents.to(torch.float64) - denoised.to(torch.float64)).flatten(1).pow(2).sum(1))
        if callback is not None:
            callback(j, len(grid))
    return torch.stack(errors, dim=1).cpu()


@torch.no_grad()
def probe_local_error(model, latents: torch.Tensor, grid: torch.Tensor, schedule: NoiseSchedule, seed: int = 0,
                      substeps: int = 4, callback=None, extra_args: dict | None = None) -> torch.Tensor:
    """Solver-aware edge costs (experimental; spec section 8): C[t, s] = mean over latents of
    ||DDIM(x_t; t -> s) - ref(x_t; t -> s)||^2 / d (model-space units per element), where x_t is the
    data noised with common noise, DDIM is one deterministic DDIM (= Euler) jump and ref is a DDIM solve
    with ``substeps`` log-lambda-uniform steps between neighbouring candidates. One reference walk from each
    candidate records every lower candidate: about G^2 / 2 * substeps model calls (batched over latents).
    Errors of earlier steps do not propagate in this cost. [G + 1, G + 1] float64, node order as cost_matrix."""
    latents = probe_latents(latents)
    if substeps < 1:
        raise ValueError("local_error: substeps must be >= 1.")
    eps = probe_noise(latents, seed)
    g = torch.as_tensor(grid, dtype=torch.float64)
    nodes = len(g) + 1
    fine = schedule.coefficients(_fine_grid(g, schedule, substeps))  # node j (grid[j-1]) at (j - 1) * substeps
    sigma, alpha, s_ = fine.sigma.tolist(), fine.alpha.tolist(), fine.s.tolist()
    ones = latents.new_ones(latents.shape[0])
    dim = latents[0].numel()
    cost = torch.full((nodes, nodes), math.inf, dtype=torch.float64)
    clean = latents.to(torch.float64)

    def denoise(x, k):
        return model(x.to(latents.dtype), sigma[k] * ones, **(extra_args or {})).to(torch.float64)

    def step(x, d, k_from, k_to):
        return ddim_step(x, d, s_[k_from], s_[k_to], alpha[k_from], alpha[k_to])

    def mean_sq(a, b):
        return float((a - b).flatten(1).pow(2).sum(1).mean()) / dim

    for t in range(1, nodes):  # model-space states x = alpha x0 + s eps: finite at flow sigma = 1
        k_t = (t - 1) * substeps
        x_t = alpha[k_t] * clean + s_[k_t] * eps.to(torch.float64)
        d_t = denoise(x_t, k_t)
        x, d = x_t, d_t
        for k in range(k_t, 0, -1):  # reference walk down the fine grid
            if k != k_t:
                d = denoise(x, k)
            x = step(x, d, k, k - 1)
            if (k - 1) % substeps == 0:
                j = (k - 1) // substeps  # node j + 1
                cost[t, j + 1] = mean_sq(step(x_t, d_t, k_t, k - 1), x)
        d_final = d_t if t == 1 else denoise(x, 0)
        cost[t, 0] = mean_sq(d_t, d_final)
        if callback is not None:
            callback(t - 1, len(g))
    return cost


def _fine_grid(grid: torch.Tensor, schedule: NoiseSchedule, substeps: int) -> torch.Tensor:
    """Ascending candidates with ``substeps`` sub-steps between neighbours, uniform in log lambda (in sigma on a
    segment that ends at flow sigma = 1, where lambda is infinite); the candidates themselves exactly."""
    parts = []
    for a, b in zip(grid[:-1].tolist(), grid[1:].tolist()):
        ends = torch.tensor([a, b], dtype=torch.float64)
        log_lam = schedule.log_lam(ends)
        if torch.isfinite(log_lam).all():
            seg = schedule.sigma_from_lam(torch.exp(torch.linspace(float(log_lam[0]), float(log_lam[1]), substeps + 1,
                                                                   dtype=torch.float64)))
        else:
            seg = torch.linspace(a, b, substeps + 1, dtype=torch.float64)
        seg[0], seg[-1] = a, b
        parts.append(seg[:-1])
    return torch.cat(parts + [grid[-1:]])


def cost_matrix(grid: torch.Tensor, m: torch.Tensor, dim: int, schedule: NoiseSchedule, variance: str = "small",
                decoder: str = "sigma") -> torch.Tensor:
    """C[t, s] (nats per data point) of jumping from node t to node s < t; inf elsewhere."""
    if variance not in VARIANCES or decoder not in DECODERS:
        raise ValueError(f"variance must be one of {VARIANCES} and decoder one of {DECODERS}.")
    g = grid.to(torch.float64)
    if (g[1:] <= g[:-1]).any() or g[0] <= 0:
        raise ValueError("the candidate grid must be strictly increasing and positive.")
    snr_g = snr(g, schedule)
    m = m.to(torch.float64)
    n = len(g) + 1
    cost = torch.full((n, n), math.inf, dtype=torch.float64)
    t_idx, s_idx = torch.tril_indices(len(g), len(g), offset=-1)
    snr_t, snr_s, m_t = snr_g[t_idx], snr_g[s_idx], m[t_idx]
    if variance == "small":
        cost[t_idx + 1, s_idx + 1] = 0.5 * (snr_s - snr_t) * m_t
    else:  # sigma^2 = beta_{t,s} (DDPM 'large'), in VP units abar = SNR / (1 + SNR)
        abar_t, abar_s = snr_t / (1 + snr_t), snr_s / (1 + snr_s)
        beta = 1 - abar_t / abar_s
        ratio = (1 - abar_s) / (1 - abar_t)  # beta_tilde / beta
        cost[t_idx + 1, s_idx + 1] = abar_s * beta * m_t / (2 * (1 - abar_t) ** 2) + dim / 2 * (ratio - 1 - torch.log(ratio))
    v = 1.0 / snr_g if decoder == "sigma" else (m / dim).clamp(min=1e-300)
    cost[1:, 0] = dim / 2 * torch.log(2 * math.pi * v) + m / (2 * v)
    return cost


def dp_optimal_path(cost: torch.Tensor, steps: int, start: int) -> tuple[float, list[int]]:
    """Least-cost path start -> ... -> 0 with exactly ``steps`` edges (each edge to a lower node)."""
    if not 1 <= steps <= start:
        raise ValueError(f"{steps} steps cannot be taken from candidate {start} (at most {start}).")
    best = cost[:, 0].clone()  # one edge: straight to the terminal node
    choices = []
    for _ in range(steps - 1):
        total = cost[:, 1:] + best[1:].unsqueeze(0)  # via node s >= 1
        best, arg = total.min(dim=1)
        choices.append(arg + 1)
    path = [start]
    for arg in reversed(choices):
        path.append(int(arg[path[-1]]))
    path.append(0)
    return float(best[start]), path


def path_cost(cost: torch.Tensor, path: list[int]) -> float:
    return float(sum(cost[a, b] for a, b in zip(path[:-1], path[1:])))


def nearest_path(grid: torch.Tensor, sigmas: torch.Tensor) -> list[int]:
    """Node indices of the candidates nearest (in log sigma) to a schedule's sigmas (0 -> terminal)."""
    out = []
    for s in torch.as_tensor(sigmas, dtype=torch.float64).tolist():
        out.append(0 if s == 0 else int(torch.argmin((grid.log() - math.log(s)).abs())) + 1)
    return out


def path_sigmas(grid: torch.Tensor, path: list[int]) -> torch.Tensor:
    """SIGMAS for a node path (descending, ending in 0), float32 as ComfyUI's schedulers give."""
    return torch.tensor([0.0 if j == 0 else float(grid[j - 1]) for j in path], dtype=torch.float32)


def start_node(grid: torch.Tensor, start_sigma: float | None, steps: int, who: str = "Schedule optimizer") -> int:
    """The node the schedule starts from: the candidate nearest ``start_sigma`` (None or 0: the largest).
    Refuses a start below the smallest candidate or with fewer candidates at or below it than steps."""
    if start_sigma is None or start_sigma <= 0:
        return len(grid)
    smallest = float(grid[0])
    start = int(torch.argmin((grid - start_sigma).abs())) + 1
    if start_sigma < smallest * (1 - 1e-6) or start < steps:
        raise ValueError(f"{who}: start_sigma {start_sigma:.4g} leaves {start} of the candidate noise levels "
                         f"({smallest:.4g} ... {float(grid[-1]):.4g}) at or below it, and {steps} steps need "
                         f"{steps}; raise start_sigma (0 = the model's largest sigma) or lower steps.")
    return start


@dataclass(frozen=True)
class OptimalSchedule:
    """The DP's answer on a candidate grid: ``sigmas`` (descending, ending in 0), the candidate
    ``path`` (indices into [0] + grid), its ``total`` cost and the edge-cost matrix it was chosen on."""

    sigmas: torch.Tensor
    path: list
    total: float
    cost: torch.Tensor
    objective: str
    dim: int

    def report(self, grid: torch.Tensor, stock: dict, n_latents: int) -> str:
        """Text report: the chosen sigmas, per-step and total cost (bits/dim for the ELBO), and the same
        totals for ``stock`` = {name: sigmas} snapped to the grid (nan where two sigmas snap together)."""
        elbo = self.objective == "elbo"
        scale, unit = (self.dim * math.log(2), "bits/dim") if elbo else (1.0, "local error per element")
        title = "ELBO-optimal" if elbo else "Local-error-optimal (experimental)"
        steps = len(self.path) - 1
        lines = [f"{title} schedule, {steps} steps, {len(grid)} candidates, {n_latents} data latents"
                 + (" (fewer than 16: noisy estimate)" if n_latents < 16 else ""),
                 "sigmas: " + ", ".join(f"{float(grid[j - 1]) if j else 0.0:.4g}" for j in self.path),
                 f"cost per step ({unit}): " + ", ".join(f"{float(self.cost[a, b]) / scale:.4g}"
                                                         for a, b in zip(self.path[:-1], self.path[1:])),
                 f"total: {self.total / scale:.4g} {unit}" + (" (relative: latents are continuous)" if elbo else "")]
        for name, sigmas in stock.items():
            snapped = nearest_path(grid, sigmas)
            value = path_cost(self.cost, snapped) / scale if len(set(snapped)) == len(snapped) else float("nan")
            lines.append(f"{name}: {value:.4g} {unit}")
        return "\n".join(lines)


def schedule_from_probe(errors: torch.Tensor, grid: torch.Tensor, steps: int, dim: int, parametrization: str = "ve",
                        variance: str = "small", decoder: str = "sigma", start_sigma: float | None = None,
                        objective: str = "elbo", who: str = "Schedule optimizer") -> OptimalSchedule:
    """The exact K-step DP on a probe result (per-sample errors [N, G] for 'elbo', the edge-cost
    matrix for 'local_error'); ``dim`` = elements per latent."""
    if objective not in OBJECTIVES:
        raise ValueError(f"{who}: unknown objective {objective!r}; choose one of {OBJECTIVES}.")
    grid = torch.as_tensor(grid, dtype=torch.float64)
    start = start_node(grid, start_sigma, steps, who)
    if objective == "elbo":
        cost = cost_matrix(grid, errors.mean(0), dim, NoiseSchedule(parametrization), variance, decoder)
    else:
        cost = errors
    total, path = dp_optimal_path(cost, steps, start)
    return OptimalSchedule(path_sigmas(grid, path), path, total, cost, objective, dim)


def optimize_schedule(model, latents: torch.Tensor, steps: int, grid: torch.Tensor, parametrization: str = "ve",
                      variance: str = "small", decoder: str = "sigma", seed: int = 0, start_sigma: float | None = None,
                      errors: torch.Tensor | None = None, callback=None, extra_args: dict | None = None,
                      objective: str = "elbo", substeps: int = 4):
    """(SIGMAS of the optimal K-step schedule, probe result). objective 'elbo': the probe result is the
    per-sample errors [N, G]; 'local_error' (experimental): the edge-cost matrix [G + 1, G + 1]. Pass
    ``errors`` from an earlier probe (a cache) to skip the model entirely."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}.")
    schedule = NoiseSchedule(parametrization)
    grid = torch.as_tensor(grid, dtype=torch.float64)
    start_node(grid, start_sigma, steps)  # a bad start fails before the probe runs
    if errors is None:
        probe = probe_mse if objective == "elbo" else probe_local_error
        options = {} if objective == "elbo" else {"substeps": substeps}
        errors = probe(model, latents, grid, schedule, seed, callback=callback, extra_args=extra_args, **options)
    result = schedule_from_probe(errors, grid, steps, latents[0].numel(), parametrization, variance, decoder,
                                 start_sigma, objective)
    return result.sigmas, errors


# ---- the probe cache: m(sigma) per sample, so any step count / variance / decoder is free -----

def cache_key(*parts) -> str:
    """SHA-256 over strings, bytes and tensors (their dtype, shape and bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"|")
    return digest.hexdigest()


def load_probe(folder, key: str, grid: torch.Tensor):
    """Cached per-sample errors [N, G] for this key, or None (missing, unreadable or another grid)."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(folder) / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        stored = load_file(str(path))
    except Exception:  # a damaged file is a miss (left in place; the probe just runs again)
        return None
    if not torch.equal(stored["grid"], grid.to(torch.float64)):
        return None
    return stored["errors"]


def save_probe(folder, key: str, grid: torch.Tensor, errors: torch.Tensor, metadata: dict) -> None:
    """Atomic write (temp file + rename in the same folder); an existing entry is left as it is."""
    import json
    from pathlib import Path

    from .files import atomic_save_safetensors

    try:
        atomic_save_safetensors({"grid": grid.to(torch.float64), "errors": errors.to(torch.float64)},
                                Path(folder) / f"{key}.safetensors",
                                metadata={"format": "fs_dp_probe/1", "info": json.dumps(metadata)})
    except FileExistsError:
        pass
