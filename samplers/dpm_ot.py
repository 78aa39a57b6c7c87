"""DPM-OT (Li et al., ICCV 2023, arXiv 2307.11308): an optimal-transport lookup into a pool of latents
at a junction noise level sigma_j, then a few ordinary reverse steps ("finisher").

What the method is (spec dpm_ot.md section 0): a semi-discrete OT map T_h(eps) = y_argmax_i(<eps, y_i> + h_i)
sends ComfyUI's Gaussian unit noise to one of N stored latents y_i (already at sigma_j) with equal mass 1/N.
The start of the finishing run therefore has the law of a uniformly random pick from the pool: it can
never mix modes, and with a deterministic finisher there are at most N distinct outputs.

Differences from the release, on purpose: Gaussian source (what ComfyUI draws, not uniform [0,1]),
centred targets, an exact low-rank factor of the score covariance, decaying Adam steps with Polyak
averaging, fp32 scores, a stopping rule at the Monte-Carlo evaluation floor.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from .classic import sample_dpmpp_2m, sample_euler, sample_heun
from .common import check_inputs, row_seeded_noise, seeded_noise_sampler
from .er_sde import PRESETS as ER_SDE_PRESETS
from .er_sde import sample_er_sde
from .schedule import (
    NoiseSchedule, comfy_model_sampling, ddim_step, log_lam_uniform_sigmas, parametrization_of_prediction,
    prediction_type, resolve_schedule,
)

FORMAT = "dpm_ot_map"
VERSION = "1"
SOURCE = "gaussian_unit"
COST = "inner_product"
PLACEMENTS = ("target", "renoise", "aeot_pair")
FINISHERS = {
    "euler": (sample_euler, {}),
    "euler_ancestral": (sample_er_sde, {"order": 1, "noise_fn": "reverse_sde"}),
    "heun": (sample_heun, {}),
    "dpmpp_2m": (sample_dpmpp_2m, {}),
    **{name: (sample_er_sde, options) for name, options in ER_SDE_PRESETS.items()},
}
SIGMA_TOLERANCE = 1e-4  # relative; the finisher's first sigma must be the map's junction
STOP_FACTOR = 1.25  # stop within this factor of the evaluation floor (1.5 in the spec left fresh checks at ~1.5x)
TILE_ELEMENTS = 1 << 24  # scores per tile (64 MB fp32); no dense matrix beyond a tile
PLACEMENT_SEED_OFFSET = 0x5EED  # the placement's fresh noise is independent of the finisher's stream


# ---- the map / target pool -----------------------------------------------------------------------

@dataclass
class OTMap:
    """A pool of N model-space latents at ``sigma_junction``; with ``heights`` it is a fitted map."""

    targets: torch.Tensor  # (N, *latent_shape) fp16, exactly the values the fit used
    sigma_junction: float
    model_sampling: str  # ComfyUI prediction type: eps | v_prediction | edm | const | ...
    latent_format: str = "unknown"  # ComfyUI latent format class (SD15, SDXL, SD3, Flux, ...)
    heights: torch.Tensor | None = None  # (N,) fp32
    weights: torch.Tensor | None = None  # (N,) fp32 target masses (uniform when None)
    clean: torch.Tensor | None = None  # (N, *latent_shape) fp16 clean latents, for 'renoise'
    target_ids: torch.Tensor | None = None  # (N,) int64, e.g. the input batch index
    info: dict = field(default_factory=dict)  # provenance, conditioning, fit_* (strings)

    @property
    def n_targets(self) -> int:
        return int(self.targets.shape[0])

    @property
    def latent_shape(self) -> tuple:
        return tuple(self.targets.shape[1:])

    @property
    def parametrization(self) -> str:
        return parametrization_of_prediction(self.model_sampling)

    @property
    def is_fitted(self) -> bool:
        return self.heights is not None

    def target_masses(self) -> torch.Tensor:
        if self.weights is None:
            return torch.full((self.n_targets,), 1.0 / self.n_targets, dtype=torch.float64)
        return self.weights.to(torch.float64) / self.weights.to(torch.float64).sum()


def check_junction(sigma_junction: float, schedule: NoiseSchedule, who: str) -> float:
    sigma_junction = float(sigma_junction)
    if not (sigma_junction > 0 and math.isfinite(sigma_junction)):
        raise ValueError(f"{who}: the junction sigma must be > 0, got {sigma_junction}.")
    if schedule.is_flow and sigma_junction >= 1.0:
        raise ValueError(f"{who}: a flow (CONST) model needs a junction sigma below 1, got {sigma_junction}.")
    return sigma_junction


def check_clean_latents(clean: torch.Tensor, who: str) -> None:
    if clean.ndim < 2 or clean.shape[0] == 0:
        raise ValueError(f"{who}: needs a non-empty batch of latents, got shape {tuple(clean.shape)}.")
    if not torch.isfinite(clean).all():
        raise ValueError(f"{who}: the latents contain NaN or infinity.")
    flat = clean.reshape(clean.shape[0], -1)
    if bool((flat.amax(1) == flat.amin(1)).any()):
        raise ValueError(f"{who}: some latents are constant (e.g. an Empty Latent Image); connect VAE Encode of "
                         "real images.")


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


# ---- scoring ---------------------------------------------------------------------------------------

@contextmanager
def exact_fp32_matmul():
    """fp32 scores without TF32 rounding (argmax flips ~0.1% with TF32; spec 6.6); restores the setting."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _tiles(rows: int, cols: int, tile_elements: int):
    row_tile = max(1, min(rows, tile_elements // max(cols, 1)))
    col_tile = max(1, min(cols, tile_elements // max(row_tile, 1)))
    return row_tile, col_tile


def _scores(x, factor, heights, centre, start, stop):
    rows = factor[start:stop].to(x.dtype)
    if centre is not None:
        rows = rows - centre
    return x @ rows.T + heights[start:stop]


def tiled_argmax(x: torch.Tensor, factor: torch.Tensor, heights: torch.Tensor, centre: torch.Tensor | None = None,
                 tile_elements: int = TILE_ELEMENTS) -> torch.Tensor:
    """argmax_i (<x, f_i - centre> + h_i) for each row of x, with a running max over target chunks and
    row chunks (no dense matrix beyond a tile). Ties go to the lowest index, as ``torch.argmax``."""
    rows, n = x.shape[0], factor.shape[0]
    row_tile, col_tile = _tiles(rows, n, tile_elements)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    for r0 in range(0, rows, row_tile):
        xr = x[r0:r0 + row_tile]
        best = idx = None
        for c0 in range(0, n, col_tile):
            value, arg = _scores(xr, factor, heights, centre, c0, c0 + col_tile).max(dim=1)
            if best is None:
                best, idx = value, arg
            else:
                better = value > best
                best, idx = torch.where(better, value, best), torch.where(better, arg + c0, idx)
        out[r0:r0 + row_tile] = idx
    return out


def tiled_top2(x: torch.Tensor, factor: torch.Tensor, heights: torch.Tensor, centre: torch.Tensor | None = None,
               tile_elements: int = TILE_ELEMENTS) -> torch.Tensor:
    """Indices (rows, 2) of the best and second-best cells (AE-OT's pair of neighbouring cells)."""
    rows, n = x.shape[0], factor.shape[0]
    if n < 2:
        raise ValueError("DPM-OT aeot_pair placement needs at least 2 targets.")
    row_tile, col_tile = _tiles(rows, n, tile_elements)
    out = torch.empty(rows, 2, dtype=torch.int64, device=x.device)
    for r0 in range(0, rows, row_tile):
        xr = x[r0:r0 + row_tile]
        best_v = best_i = None
        for c0 in range(0, n, col_tile):
            scores = _scores(xr, factor, heights, centre, c0, c0 + col_tile)
            v, i = scores.topk(min(2, scores.shape[1]), dim=1)
            i = i + c0
            if best_v is not None:
                v, j = torch.cat([best_v, v], 1).topk(2, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_v, best_i = v, i
        out[r0:r0 + row_tile] = best_i
    return out


def score_factor(targets: torch.Tensor, rank_tolerance: float = 1e-7) -> torch.Tensor:
    """A factor C (N x r, fp32) with C C^T = Yc Yc^T for the centred targets Yc: for Gaussian noise the
    scores Yc x and C z (z ~ N(0, I_r)) have the same joint law. Exact eigen-factor of the float64 Gram
    matrix when N <= d/2 (fitting cost then independent of d); Yc itself otherwise."""
    n, d = targets.shape[0], targets[0].numel()
    flat = targets.reshape(n, d)
    centre = flat.to(torch.float64).mean(0)
    if 2 * n > d:
        return (flat.to(torch.float64) - centre).to(torch.float32)
    gram = torch.zeros(n, n, dtype=torch.float64, device=flat.device)
    for c0 in range(0, d, 4096):
        block = flat[:, c0:c0 + 4096].to(torch.float64) - centre[c0:c0 + 4096]
        gram += block @ block.T
    values, vectors = torch.linalg.eigh(gram)
    keep = values > rank_tolerance * values[-1].clamp_min(torch.finfo(torch.float64).tiny)
    return (vectors[:, keep] * values[keep].sqrt()).to(torch.float32)


# ---- fitting -----------------------------------------------------------------------------------------

@dataclass
class FitResult:
    heights: torch.Tensor
    iterations: int
    samples_total: int
    eval_samples: int
    max_rel_err: float
    mean_rel_err: float
    empty: int
    floor_max: float
    floor_mean: float
    seconds: float
    averaged: bool
    converged: bool
    rank: int
    seed: int
    history: list = field(default_factory=list)  # (iteration, max, mean, empty) at each evaluation

    def report(self) -> str:
        how = "Polyak average" if self.averaged else "last iterate"
        stop = "stopped at the evaluation floor" if self.converged else "ran to the iteration limit"
        return (f"cell-mass error |N m_i - 1|: max {self.max_rel_err:.3f}, mean {self.mean_rel_err:.4f} "
                f"(evaluation floor ~{self.floor_max:.3f} / {self.floor_mean:.4f} with {self.eval_samples} noises); "
                f"empty cells {self.empty}; {self.iterations} iterations ({stop}, {how}), "
                f"{self.samples_total} source samples, rank {self.rank}, {self.seconds:.1f} s")

    def metadata(self) -> dict:
        return {"fit_seed": str(self.seed), "fit_iters": str(self.iterations),
                "fit_samples_total": str(self.samples_total), "fit_eval_samples": str(self.eval_samples),
                "fit_max_rel_err": f"{self.max_rel_err:.6g}", "fit_mean_rel_err": f"{self.mean_rel_err:.6g}",
                "fit_empty": str(self.empty), "fit_seconds": f"{self.seconds:.3f}"}


def _count_cells(factor, heights, n_samples, generator, tile_elements):
    n, r = factor.shape
    counts = torch.zeros(n, dtype=torch.float64, device=factor.device)
    row_tile = max(1, tile_elements // max(n, r))
    for r0 in range(0, n_samples, row_tile):
        z = torch.randn(min(row_tile, n_samples - r0), r, generator=generator, device=factor.device)
        index = tiled_argmax(z, factor, heights, tile_elements=tile_elements)
        counts.index_add_(0, index, torch.ones(index.shape, dtype=counts.dtype, device=counts.device))  # no sync
    return counts


def cell_masses(factor: torch.Tensor, heights: torch.Tensor, n_samples: int, seed: int = 0,
                tile_elements: int = TILE_ELEMENTS) -> torch.Tensor:
    """Monte-Carlo masses of the cells under z ~ N(0, I_r) (float64, sums to 1)."""
    generator = torch.Generator(device=factor.device).manual_seed(int(seed))
    with exact_fp32_matmul():
        return _count_cells(factor, heights.to(factor.device, torch.float32), n_samples, generator,
                            tile_elements) / n_samples


def mass_errors(masses: torch.Tensor, nu: torch.Tensor) -> tuple[float, float, int]:
    rel = (masses.cpu() / nu.cpu() - 1).abs()
    return float(rel.max()), float(rel.mean()), int((masses == 0).sum())


def evaluation_floor(nu: torch.Tensor, eval_samples: int) -> tuple[float, float]:
    """(max, mean) of |N m_i - 1| expected from sampling noise alone at the exact heights."""
    spread = torch.sqrt((1 - nu) / (eval_samples * nu))
    return 3.5 * float(spread.max()), math.sqrt(2 / math.pi) * float(spread.mean())


def fit_heights(targets: torch.Tensor, weights: torch.Tensor | None = None, iterations: int = 1500,
                samples_per_iter: int | None = None, eval_samples: int | None = None, eval_every: int | None = None,
                seed: int = 0, kappa: float = 0.02, device=None, tile_elements: int = TILE_ELEMENTS,
                on_progress=None, state: dict | None = None, on_checkpoint=None,
                checkpoint_every_s: float = 60.0, stop_at_floor: bool = True) -> FitResult:
    """Heights h of the semi-discrete OT map from N(0, I_d) to the targets (equal or given masses).

    Averaged Adam on the convex energy E(h) = E_x[max_i <x, y_i> + h_i] - <nu, h>, gradient
    (cell mass - nu), fresh ``samples_per_iter`` noises per iteration (default max(10 N, 4096)),
    step kappa * median|y_i - ybar| / sqrt(1 + t/100), Polyak average over the second half. Every
    ``eval_every`` iterations the current estimate is measured on a fixed held-out set of ``eval_samples``
    noises (default max(50 N, 65536)); it stops when the mean and max errors are within STOP_FACTOR x the
    evaluation floor with no empty cell, and doubles the samples (up to 8x) after 3 evaluations without progress.

    ``on_progress(iteration, total, last_evaluation)`` is called every iteration (may raise to interrupt);
    ``on_checkpoint(state)`` every ``checkpoint_every_s`` seconds and on interruption; pass that state back
    as ``state`` to resume exactly."""
    t_start = time.perf_counter()
    n = int(targets.shape[0])
    if n < 1:
        raise ValueError("DPM-OT fit: the target pool is empty.")
    device = torch.device(device) if device is not None else targets.device
    nu = (torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None
          else weights.to(torch.float64) / weights.to(torch.float64).sum()).to(device)
    if not bool((nu > 0).all()):
        raise ValueError("DPM-OT fit: target weights must be > 0.")
    factor = score_factor(targets.to(device))
    rank = factor.shape[1]
    base_samples = int(samples_per_iter or max(10 * n, 4096))
    eval_samples = int(eval_samples or max(50 * n, 65536))
    eval_every = int(eval_every or max(25, iterations // 20))
    average_from = iterations // 2
    scale = float(factor.norm(dim=1).median()) or 1.0
    floor_max, floor_mean = evaluation_floor(nu, eval_samples)

    generator = torch.Generator(device=device).manual_seed(int(seed))
    h = torch.zeros(n, dtype=torch.float32, device=device)
    m1, m2, avg_sum = torch.zeros_like(h), torch.zeros_like(h), torch.zeros(n, dtype=torch.float64, device=device)
    run = {"iteration": 0, "avg_count": 0, "samples": base_samples, "samples_total": 0, "best_mean": math.inf,
           "stall": 0}
    history: list = []
    if state is not None:
        h, m1, m2 = (state[k].to(device) for k in ("heights", "adam_m", "adam_v"))
        avg_sum = state["avg_sum"].to(device)
        generator.set_state(state["generator"].cpu())
        run.update({k: int(state[k]) for k in ("iteration", "avg_count", "samples", "samples_total", "stall")})
        run["best_mean"] = float(state["best_mean"])

    def snapshot() -> dict:
        return {"heights": h.clone(), "adam_m": m1.clone(), "adam_v": m2.clone(), "avg_sum": avg_sum.clone(),
                "generator": generator.get_state(), "best_mean": torch.tensor(run["best_mean"]),
                **{k: torch.tensor(run[k]) for k in ("iteration", "avg_count", "samples", "samples_total", "stall")}}

    def estimate():
        return (avg_sum / run["avg_count"]).to(torch.float32) if run["avg_count"] else h

    def evaluate():
        heights = estimate()
        masses = cell_masses(factor, heights, eval_samples, seed=int(seed) + 1, tile_elements=tile_elements)
        errors = mass_errors(masses, nu)
        history.append((run["iteration"], *errors))
        return heights, errors

    last_checkpoint = time.perf_counter()
    converged = False
    heights, errors = None, None
    try:
        with exact_fp32_matmul():
            while run["iteration"] < iterations:
                t = run["iteration"] + 1
                counts = _count_cells(factor, h, run["samples"], generator, tile_elements)
                grad = (counts / run["samples"] - nu).to(torch.float32)
                m1.mul_(0.9).add_(grad, alpha=0.1)
                m2.mul_(0.999).addcmul_(grad, grad, value=0.001)
                step = kappa * scale / math.sqrt(1 + t / 100)
                h -= step * (m1 / (1 - 0.9 ** t)) / ((m2 / (1 - 0.999 ** t)).sqrt() + 1e-8)
                h -= h.mean()
                run["iteration"] = t
                run["samples_total"] += run["samples"]
                if t > average_from:
                    avg_sum += h
                    run["avg_count"] += 1
                if t % eval_every == 0:
                    heights, errors = evaluate()
                    if (stop_at_floor and errors[1] <= STOP_FACTOR * floor_mean
                            and errors[0] <= STOP_FACTOR * floor_max and errors[2] == 0):
                        converged = True
                    elif errors[1] < run["best_mean"]:
                        run["best_mean"], run["stall"] = errors[1], 0
                    else:
                        run["stall"] += 1
                        if run["stall"] >= 3 and run["samples"] < 8 * base_samples:
                            run["samples"], run["stall"] = 2 * run["samples"], 0
                if on_progress is not None:
                    on_progress(t, iterations, history[-1] if history else None)
                if converged:
                    break
                if on_checkpoint is not None and time.perf_counter() - last_checkpoint > checkpoint_every_s:
                    on_checkpoint(snapshot())
                    last_checkpoint = time.perf_counter()
    except BaseException:
        if on_checkpoint is not None:
            on_checkpoint(snapshot())
        raise
    if not history or history[-1][0] != run["iteration"]:
        heights, errors = evaluate()
    return FitResult(heights=heights.to("cpu", torch.float32), iterations=run["iteration"],
                     samples_total=run["samples_total"], eval_samples=eval_samples, max_rel_err=errors[0],
                     mean_rel_err=errors[1], empty=errors[2], floor_max=floor_max, floor_mean=floor_mean,
                     seconds=time.perf_counter() - t_start, averaged=run["avg_count"] > 0, converged=converged,
                     rank=rank, seed=int(seed), history=history)


def fit_ot_map(pool: OTMap, **options) -> tuple[OTMap, FitResult]:
    """Fit the heights of a target pool (options: see ``fit_heights``); returns the fitted map."""
    result = fit_heights(pool.targets, pool.weights, **options)
    info = {**pool.info, **result.metadata()}
    return replace(pool, heights=result.heights, info=info), result


# ---- file format (spec 6.7) -------------------------------------------------------------------------

REQUIRED_METADATA = ("format", "version", "sigma_junction", "model_sampling", "latent_format", "latent_shape",
                     "source", "cost", "n_targets")


def map_metadata(ot_map: OTMap, extension_version: str) -> dict:
    meta = {"format": FORMAT, "version": VERSION, "sigma_junction": repr(float(ot_map.sigma_junction)),
            "model_sampling": ot_map.model_sampling, "latent_format": ot_map.latent_format,
            "latent_shape": ",".join(str(s) for s in ot_map.latent_shape), "source": SOURCE, "cost": COST,
            "n_targets": str(ot_map.n_targets), "extension_version": extension_version}
    meta.update({k: str(v) for k, v in ot_map.info.items() if k not in meta})
    meta.setdefault("provenance", "unknown")
    meta.setdefault("conditioning", "unconditional")
    return meta


def save_ot_map(ot_map: OTMap, path, extension_version: str = "0"):
    """Atomic safetensors write; an existing file is never replaced."""
    from .files import atomic_save_safetensors

    if not ot_map.is_fitted:
        raise ValueError("DPM-OT save: this target pool has no fitted heights; run DPM-OT Fit Map first.")
    tensors = {"targets": ot_map.targets.to(torch.float16), "heights": ot_map.heights.to(torch.float32)}
    for name in ("weights", "clean", "target_ids"):
        value = getattr(ot_map, name)
        if value is not None:
            tensors[name] = value.to({"weights": torch.float32, "clean": torch.float16,
                                      "target_ids": torch.int64}[name])
    return atomic_save_safetensors(tensors, path, map_metadata(ot_map, extension_version))


def load_ot_map(path) -> OTMap:
    """Reads and checks a map file; every problem is a ValueError naming the file and the fix."""
    from safetensors import safe_open

    def bad(why):
        return ValueError(f"DPM-OT map {path}: {why}")

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise bad("file not found.") from None
    except Exception as err:
        raise bad(f"cannot be read as safetensors ({err}); the file is damaged or not a map.") from None
    if meta.get("format") != FORMAT:
        raise bad(f"format is {meta.get('format')!r}, not {FORMAT!r}; not a DPM-OT map.")
    if meta.get("version") != VERSION:
        raise bad(f"version {meta.get('version')!r} is not supported (this pack reads version {VERSION}).")
    missing = [k for k in REQUIRED_METADATA if k not in meta] + [k for k in ("targets", "heights") if k not in tensors]
    if missing:
        raise bad(f"missing {missing}; the file is incomplete.")
    if meta["source"] != SOURCE:
        raise bad(f"was fitted for source {meta['source']!r}, but ComfyUI draws {SOURCE!r} (Gaussian unit noise); "
                  "refit it with DPM-OT Fit Map.")
    if meta["cost"] != COST:
        raise bad(f"cost {meta['cost']!r} is not supported (only {COST!r}).")
    targets, heights = tensors["targets"], tensors["heights"]
    shape = tuple(int(s) for s in meta["latent_shape"].split(","))
    n = int(meta["n_targets"])
    if tuple(targets.shape) != (n, *shape) or tuple(heights.shape) != (n,):
        raise bad(f"tensor shapes {tuple(targets.shape)} / {tuple(heights.shape)} disagree with the metadata "
                  f"(n_targets {n}, latent_shape {shape}); the file is damaged.")
    for name, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise bad(f"{name} contains NaN or infinity; the file is damaged.")
    parametrization_of_prediction(meta["model_sampling"])
    info = {k: v for k, v in meta.items() if k not in REQUIRED_METADATA}
    return OTMap(targets=targets, sigma_junction=float(meta["sigma_junction"]), model_sampling=meta["model_sampling"],
                 latent_format=meta["latent_format"], heights=heights, weights=tensors.get("weights"),
                 clean=tensors.get("clean"), target_ids=tensors.get("target_ids"), info=info)


# ---- sampling ---------------------------------------------------------------------------------------

def model_latent_format(model) -> str | None:
    """Class name of the ComfyUI model's latent format (SD15, SDXL, ...), or None outside ComfyUI."""
    try:
        latent_format = model.inner_model.model_patcher.get_model_object("latent_format")
    except AttributeError:
        return None
    return None if latent_format is None else type(latent_format).__name__


def check_map_matches(ot_map: OTMap, model, x: torch.Tensor, schedule: NoiseSchedule, sigma0: float,
                      who: str = "DPM-OT sampler") -> None:
    """Refuse a map made for another latent shape, model type, latent format or junction; names both sides."""
    if ot_map is None or not ot_map.is_fitted:
        raise ValueError(f"{who}: needs a fitted OT map (DPM-OT Fit Map or DPM-OT Load Map).")
    if tuple(x.shape[1:]) != ot_map.latent_shape:
        raise ValueError(f"{who}: the latent has shape {tuple(x.shape[1:])} but the map was made for "
                         f"{ot_map.latent_shape}; use an empty latent of the map's size.")
    model_sampling = comfy_model_sampling(model)
    if model_sampling is not None:
        prediction = prediction_type(model_sampling)
        if prediction != ot_map.model_sampling:
            raise ValueError(f"{who}: the model is a {prediction!r} model but the map was made for "
                             f"{ot_map.model_sampling!r}; build the map with this model.")
    elif schedule.parametrization != ot_map.parametrization:
        raise ValueError(f"{who}: the model is a {schedule.parametrization!r} model but the map was made for "
                         f"{ot_map.model_sampling!r} ({ot_map.parametrization}).")
    latent_format = model_latent_format(model)
    if latent_format is not None and ot_map.latent_format not in ("unknown", latent_format):
        raise ValueError(f"{who}: the model's latent format is {latent_format} but the map's is "
                         f"{ot_map.latent_format}; build the map with this model family.")
    if abs(sigma0 - ot_map.sigma_junction) > SIGMA_TOLERANCE * ot_map.sigma_junction:
        raise ValueError(f"{who}: the schedule starts at sigma {sigma0:.6g} but the map's junction is "
                         f"{ot_map.sigma_junction:.6g}; connect DPM-OT Sigmas (the schedule below the junction).")


def unit_noise(model, x: torch.Tensor, sigma0: float, schedule: NoiseSchedule) -> torch.Tensor:
    """The unit Gaussian noise of this run: ComfyUI keeps it on the wrapped model (``model.noise``);
    otherwise x / s(sigma0), which assumes an empty (zero) latent."""
    noise = getattr(model, "noise", None)
    latent = getattr(model, "latent_image", None)
    if isinstance(latent, torch.Tensor) and bool(latent.any()):
        warnings.warn("DPM-OT sampler: the latent image is not empty; DPM-OT ignores it and starts from the map.")
    if not (isinstance(noise, torch.Tensor) and noise.shape == x.shape):
        noise = x / float(schedule.s(torch.tensor(sigma0, dtype=torch.float64)))
    if not bool(noise.any()):
        warnings.warn("DPM-OT sampler: the noise is zero (add_noise off?), so every image gets the same target; "
                      "turn add_noise on.")
    return noise


def assign_targets(ot_map: OTMap, noise: torch.Tensor, tile_elements: int = TILE_ELEMENTS) -> torch.Tensor:
    """Index of the OT cell of each noise (batch on the first axis); the same argmax the fit measured."""
    targets = ot_map.targets.to(noise.device).reshape(ot_map.n_targets, -1)
    centre = targets.to(torch.float64).mean(0).to(torch.float32)
    with exact_fp32_matmul():
        return tiled_argmax(noise.reshape(noise.shape[0], -1).float(), targets,
                            ot_map.heights.to(noise.device, torch.float32), centre, tile_elements)


def place(ot_map: OTMap, noise: torch.Tensor, schedule: NoiseSchedule, placement: str = "target",
          angle_threshold: float = 0.7, pair_weight: float = 0.75, seed=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(start latent at sigma_j, chosen target indices) for each noise.

    target: the stored noisy target itself (faithful). renoise: its clean latent plus fresh noise at sigma_j.
    aeot_pair: AE-OT's convex pair pair_weight*y_a + (1-pair_weight)*y_b of the best two cells when the
    angle between their facet normals (y, -1)/|(y, -1)| is below angle_threshold (radians), with fresh noise
    restoring the noise level; otherwise the target itself."""
    if placement not in PLACEMENTS:
        raise ValueError(f"DPM-OT sampler: unknown placement {placement!r}; choose one of {PLACEMENTS}.")
    fresh = seeded_noise_sampler(noise, None if seed is None else int(seed) + PLACEMENT_SEED_OFFSET)
    targets = ot_map.targets.to(noise.device)
    s_j = float(schedule.s(torch.tensor(ot_map.sigma_junction, dtype=torch.float64)))
    if placement != "aeot_pair":
        index = assign_targets(ot_map, noise)
        if placement == "target":
            return targets[index].to(noise.dtype), index
        if ot_map.clean is None:
            raise ValueError("DPM-OT sampler: placement 'renoise' needs the clean latents, but this map has none; "
                             "build the targets with keep_clean on, or use placement 'target'.")
        clean = ot_map.clean.to(noise.device)[index].to(noise.dtype)
        return schedule.add_noise(clean, fresh(), ot_map.sigma_junction), index
    flat = targets.reshape(ot_map.n_targets, -1)
    centre = flat.to(torch.float64).mean(0).to(torch.float32)
    with exact_fp32_matmul():
        pair = tiled_top2(noise.reshape(noise.shape[0], -1).float(), flat,
                          ot_map.heights.to(noise.device, torch.float32), centre)
    ya, yb = flat[pair[:, 0]].float(), flat[pair[:, 1]].float()
    cos = ((ya * yb).sum(1) + 1) / torch.sqrt(((ya * ya).sum(1) + 1) * ((yb * yb).sum(1) + 1))
    accept = torch.arccos(cos.clamp(-1, 1)) < angle_threshold
    w = float(pair_weight)
    mixed = w * ya + (1 - w) * yb + s_j * math.sqrt(max(0.0, 1 - w * w - (1 - w) ** 2)) * fresh().reshape(ya.shape)
    start = torch.where(accept[:, None], mixed, ya)
    return start.reshape(noise.shape).to(noise.dtype), pair[:, 0]


@torch.no_grad()
def sample_dpm_ot(model, x, sigmas, extra_args=None, callback=None, disable=None, ot_map: OTMap | None = None,
                  finisher="euler", finisher_options: dict | None = None, placement: str = "target",
                  angle_threshold: float = 0.7, pair_weight: float = 0.75, parametrization=None):
    """DPM-OT: map this run's unit noise to a pool latent at sigma_j, then run the finisher on ``sigmas``
    (which must start at the map's junction: the DPM-OT Sigmas node). The map costs no model call;
    NFE = the finisher's. ``finisher`` is a name in FINISHERS or a k-diffusion sampler function."""
    extra_args = {} if extra_args is None else extra_args
    schedule = resolve_schedule(model, parametrization)
    sig = check_inputs(x, sigmas, "DPM-OT sampler", schedule)
    check_map_matches(ot_map, model, x, schedule, float(sig[0]))
    if isinstance(finisher, str):
        if finisher not in FINISHERS:
            raise ValueError(f"DPM-OT sampler: unknown finisher {finisher!r}; choose one of {list(FINISHERS)}.")
        finisher, options = FINISHERS[finisher]
        options = {**options, **(finisher_options or {})}
    else:
        options = dict(finisher_options or {})
    if parametrization is not None:
        options.setdefault("parametrization", parametrization)
    noise = unit_noise(model, x, float(sig[0]), schedule)
    start, _ = place(ot_map, noise, schedule, placement, angle_threshold, pair_weight, extra_args.get("seed"))
    return finisher(model, start.to(x.dtype), sigmas, extra_args=extra_args, callback=callback, disable=disable,
                    **options)


def junction_schedule(schedule_of_length, steps: int, sigma_junction: float, max_total: int = 100000) -> torch.Tensor:
    """The last ``steps`` steps of the scheduler's shortest T-step schedule whose (T - steps)-th sigma is at
    or below sigma_j, with that sigma raised to sigma_j exactly (like ComfyUI's 'denoise', anchored at the
    junction). ``schedule_of_length(T)`` returns a T-step schedule ending in 0."""
    def entry(total):
        return float(schedule_of_length(total)[total - steps])

    if steps < 1:
        raise ValueError("steps must be >= 1.")
    if entry(steps) < sigma_junction * (1 - SIGMA_TOLERANCE):
        raise ValueError(f"the junction sigma {sigma_junction:.4g} is above the model's largest "
                         f"sigma {entry(steps):.4g}.")
    low, high = steps, steps
    while entry(high) > sigma_junction:  # entry(total) falls as total grows
        if high >= max_total:
            raise ValueError(f"the junction sigma {sigma_junction:.4g} is below what this scheduler "
                             f"reaches in {max_total} steps; use a larger junction or another scheduler.")
        low, high = high, min(2 * high, max_total)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if entry(mid) > sigma_junction else (low, mid)
    tail = torch.as_tensor(schedule_of_length(high)[high - steps:], dtype=torch.float32).clone()
    tail[0] = sigma_junction
    return tail
