"""Fitting the heights of the semi-discrete OT map (averaged Adam on the dual energy) and its report."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch

from .map import OTMap
from .scoring import TILE_ELEMENTS, exact_fp32_matmul, score_factor, tiled_argmax

STOP_FACTOR = 1.25  # stop within this factor of the evaluation floor (1.5 in the spec left fresh checks at ~1.5x)


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


COUNTERS = ("iteration", "avg_count", "samples", "samples_total", "stall")  # the integer counters of a fit state


class HeightFit:
    """One fit of the heights with its state in plain attributes: the heights, the Adam moments, the Polyak
    sum, the fitting-noise generator and the run counters. ``snapshot()`` / ``restore()`` turn the state into
    a dict of tensors and back (the checkpoint format)."""

    def __init__(self, factor: torch.Tensor, nu: torch.Tensor, device, seed: int, base_samples: int,
                 eval_samples: int, average_from: int, kappa: float, tile_elements: int):
        self.factor, self.nu, self.seed, self.base_samples = factor, nu, int(seed), base_samples
        self.eval_samples, self.average_from, self.kappa, self.tile_elements = (eval_samples, average_from, kappa,
                                                                                tile_elements)
        self.scale = float(factor.norm(dim=1).median()) or 1.0  # median |y_i - ybar|
        self.generator = torch.Generator(device=device).manual_seed(int(seed))
        n = int(nu.shape[0])
        self.heights = torch.zeros(n, dtype=torch.float32, device=device)
        self.adam_m, self.adam_v = torch.zeros_like(self.heights), torch.zeros_like(self.heights)
        self.avg_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.iteration = self.avg_count = self.samples_total = self.stall = 0
        self.samples = base_samples
        self.best_mean = math.inf
        self.history: list = []  # (iteration, max, mean, empty) at each evaluation

    @property
    def rank(self) -> int:
        return int(self.factor.shape[1])

    def restore(self, state: dict, device) -> None:
        self.heights, self.adam_m, self.adam_v = (state[k].to(device) for k in ("heights", "adam_m", "adam_v"))
        self.avg_sum = state["avg_sum"].to(device)
        self.generator.set_state(state["generator"].cpu())
        for name in COUNTERS:
            setattr(self, name, int(state[name]))
        self.best_mean = float(state["best_mean"])

    def snapshot(self) -> dict:
        return {"heights": self.heights.clone(), "adam_m": self.adam_m.clone(), "adam_v": self.adam_v.clone(),
                "avg_sum": self.avg_sum.clone(), "generator": self.generator.get_state(),
                "best_mean": torch.tensor(self.best_mean),
                **{name: torch.tensor(getattr(self, name)) for name in COUNTERS}}

    def estimate(self) -> torch.Tensor:
        """The Polyak average once averaging has started, else the current heights."""
        return (self.avg_sum / self.avg_count).to(torch.float32) if self.avg_count else self.heights

    def step(self) -> None:
        """One Adam step on fresh noise: gradient = Monte-Carlo cell masses - nu; then the running average."""
        t = self.iteration + 1
        counts = _count_cells(self.factor, self.heights, self.samples, self.generator, self.tile_elements)
        grad = (counts / self.samples - self.nu).to(torch.float32)
        self.adam_m.mul_(0.9).add_(grad, alpha=0.1)
        self.adam_v.mul_(0.999).addcmul_(grad, grad, value=0.001)
        step = self.kappa * self.scale / math.sqrt(1 + t / 100)
        h = self.heights
        h -= step * (self.adam_m / (1 - 0.9 ** t)) / ((self.adam_v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        h -= h.mean()
        self.iteration = t
        self.samples_total += self.samples
        if t > self.average_from:
            self.avg_sum += h
            self.avg_count += 1

    def evaluate(self) -> tuple[torch.Tensor, tuple[float, float, int]]:
        """(estimate, its mass errors) on the fixed held-out noise set (seed + 1); appended to the history."""
        heights = self.estimate()
        masses = cell_masses(self.factor, heights, self.eval_samples, seed=self.seed + 1,
                             tile_elements=self.tile_elements)
        errors = mass_errors(masses, self.nu)
        self.history.append((self.iteration, *errors))
        return heights, errors

    @staticmethod
    def at_floor(errors, floor_max: float, floor_mean: float) -> bool:
        """Mean and max errors within STOP_FACTOR x the evaluation floor, and no empty cell."""
        return errors[1] <= STOP_FACTOR * floor_mean and errors[0] <= STOP_FACTOR * floor_max and errors[2] == 0

    def note_progress(self, mean_error: float) -> None:
        """Track the best mean error; after 3 evaluations without progress double the samples (up to 8x)."""
        if mean_error < self.best_mean:
            self.best_mean, self.stall = mean_error, 0
            return
        self.stall += 1
        if self.stall >= 3 and self.samples < 8 * self.base_samples:
            self.samples, self.stall = 2 * self.samples, 0


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
    eval_samples = int(eval_samples or max(50 * n, 65536))
    eval_every = int(eval_every or max(25, iterations // 20))
    fit = HeightFit(score_factor(targets.to(device)), nu, device, seed, int(samples_per_iter or max(10 * n, 4096)),
                    eval_samples, iterations // 2, kappa, tile_elements)
    floor_max, floor_mean = evaluation_floor(nu, eval_samples)
    if state is not None:
        fit.restore(state, device)

    last_checkpoint = time.perf_counter()
    converged = False
    heights, errors = None, None
    try:
        with exact_fp32_matmul():
            while fit.iteration < iterations:
                fit.step()
                if fit.iteration % eval_every == 0:
                    heights, errors = fit.evaluate()
                    if stop_at_floor and fit.at_floor(errors, floor_max, floor_mean):
                        converged = True
                    else:
                        fit.note_progress(errors[1])
                if on_progress is not None:
                    on_progress(fit.iteration, iterations, fit.history[-1] if fit.history else None)
                if converged:
                    break
                if on_checkpoint is not None and time.perf_counter() - last_checkpoint > checkpoint_every_s:
                    on_checkpoint(fit.snapshot())
                    last_checkpoint = time.perf_counter()
    except BaseException:
        if on_checkpoint is not None:
            on_checkpoint(fit.snapshot())
        raise
    if not fit.history or fit.history[-1][0] != fit.iteration:
        heights, errors = fit.evaluate()
    return FitResult(heights=heights.to("cpu", torch.float32), iterations=fit.iteration,
                     samples_total=fit.samples_total, eval_samples=eval_samples, max_rel_err=errors[0],
                     mean_rel_err=errors[1], empty=errors[2], floor_max=floor_max, floor_mean=floor_mean,
                     seconds=time.perf_counter() - t_start, averaged=fit.avg_count > 0, converged=converged,
                     rank=fit.rank, seed=int(seed), history=fit.history)


def fit_ot_map(pool: OTMap, **options) -> tuple[OTMap, FitResult]:
    """Fit the heights of a target pool (options: see ``fit_heights``); returns the fitted map."""
    result = fit_heights(pool.targets, pool.weights, **options)
    info = {**pool.info, **result.metadata()}
    return replace(pool, heights=result.heights, info=info), result
