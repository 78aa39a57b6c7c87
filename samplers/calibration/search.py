"""The calibrator's stages: candidate grid, teacher, solver-aware dynamic program, end-to-end refinement.

Notation (shared/specs/calibration.md): a schedule is sigma_0 (the start) > sigma_1 > ... > sigma_{K-1} > 0
followed by 0; ``z = log lam(sigma)`` is the coordinate schedules are searched in (the negative
half-log-SNR: lam = s / alpha, schedule.py). Errors are mean per-sample L2 distances.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..multistep import StepRow, apply_row
from ..schedule import NoiseSchedule
from ..step_tuning import MAX_EXTRAPOLATION, TUNING_SETS, StepTuning, query_shift_bounds

FLOW_TOP = 0.9997  # largest interior flow sigma without a table (shift 3's table tops out at 0.99967)


@dataclass
class SigmaRange:
    """What the calibrator knows of the model's noise levels."""

    schedule: NoiseSchedule
    sigma_min: float
    sigma_max: float  # the start of every schedule (flow: 1)
    table: torch.Tensor | None = None  # ascending float64 table of a discrete model: sigmas are snapped to it

    @property
    def top(self) -> float:
        """Largest interior sigma (the start for VE; below 1 for flow)."""
        if not self.schedule.is_flow or self.sigma_max < 1.0:
            return self.sigma_max
        if self.table is not None and (self.table < 1.0).any():
            return float(self.table[self.table < 1.0].max())
        return FLOW_TOP

    def z(self, sigma) -> torch.Tensor:
        return self.schedule.log_lam(torch.as_tensor(sigma, dtype=torch.float64))

    def sigma(self, z) -> torch.Tensor:
        sig = self.schedule.sigma_from_lam(torch.exp(torch.as_tensor(z, dtype=torch.float64)))
        return self.snap(sig)

    def snap(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            return sigma
        index = (self.table.log().unsqueeze(0) - sigma.reshape(-1, 1).log()).abs().argmin(1)
        return self.table[index].reshape(sigma.shape)


def candidate_grid(rng: SigmaRange, count: int) -> torch.Tensor:
    """Descending interior candidates, uniform in z from the top sigma to sigma_min (table values on a
    discrete model, duplicates dropped)."""
    z = torch.linspace(float(rng.z(rng.top)), float(rng.z(rng.sigma_min)), count, dtype=torch.float64)
    grid = rng.sigma(z)
    grid[0], grid[-1] = rng.snap(torch.tensor([rng.top, rng.sigma_min], dtype=torch.float64))
    return torch.unique(grid).flip(0)


def fine_grid(rng: SigmaRange, nodes: torch.Tensor, substeps: int):
    """The teacher's grid: the start, every candidate with ``substeps`` z-uniform sub-steps between neighbours
    (from flow sigma = 1 to the top candidate: uniform in sigma), then 0. Returns (grid, index of each node)."""
    parts, index = [], []
    points = torch.cat([torch.tensor([rng.sigma_max], dtype=torch.float64), nodes]) if nodes[0] < rng.sigma_max \
        else nodes
    for a, b in zip(points[:-1].tolist(), points[1:].tolist()):
        if math.isinf(float(rng.z(a))):
            seg = torch.linspace(a, b, substeps + 1, dtype=torch.float64)
        else:
            seg = rng.sigma(torch.linspace(float(rng.z(a)), float(rng.z(b)), substeps + 1, dtype=torch.float64))
        seg[0], seg[-1] = a, b
        parts.append(seg[:-1])
    parts.append(points[-1:])
    fine = torch.unique(torch.cat(parts)).flip(0)  # snapping can merge sub-steps on a table
    for sigma in nodes.tolist():
        index.append(int((fine == sigma).nonzero()[0]))
    return torch.cat([fine, fine.new_zeros(1)]), index


@torch.no_grad()
def teacher_solve(solver, model, x_start, grid, node_index, extra_args):
    """(states at the nodes [G, N, ...], final output): the model's own fine solve."""
    states = {}
    wanted = set(node_index)

    def keep(info):
        if info["i"] in wanted:
            states[info["i"]] = info["x"]

    final = solver(model, x_start.clone(), grid, extra_args=dict(extra_args), callback=keep, disable=True)
    return torch.stack([states[i] for i in node_index]), final


def mean_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).flatten(1).to(torch.float64).norm(dim=1).mean())


class Stepper:
    """The update of a planned sampler for one step given the sigmas before it: the last row of the plan
    of (the last 4 sigmas of the path, the target). Rows of the pack's planners depend only on these."""

    WINDOW = 4

    def __init__(self, planner):
        self.planner = planner
        self.memo: dict[tuple, StepRow] = {}

    def row(self, path: tuple, target: float) -> StepRow:
        key = path[-self.WINDOW:] + (target,)
        if key not in self.memo:
            self.memo[key] = self.planner(torch.tensor(key, dtype=torch.float64))[-1]
        return self.memo[key]


@dataclass
class _State:
    cost: float
    x: torch.Tensor
    history: list  # model outputs along the path, newest first
    path: tuple  # sigmas so far (the last one is where x is)


@torch.no_grad()
def solver_aware_dp(model, stepper: Stepper, x_start, start_sigma: float, nodes: torch.Tensor,
                    teacher_states: torch.Tensor, teacher_final: torch.Tensor, steps: int, extra_args,
                    max_rows: int, progress=None) -> tuple[list[float], float]:
    """Exactly-K-step DP whose state is the sampler's own trajectory (OSS-style), with its history:
    level k evaluates the model once at every live node (batched), applies the sampler's real update to
    every lower node and keeps the best landing per node. The last level takes the real final step.
    Returns (schedule without the final 0, its calibration error)."""
    G = len(nodes)
    node_sigmas = nodes.tolist()
    live = {-1: _State(0.0, x_start, [], (start_sigma,))}  # -1: the start
    for level in range(steps):
        keys = sorted(live)
        outputs = _evaluate(model, [live[j].x for j in keys], [live[j].path[-1] for j in keys], extra_args, max_rows)
        final = level == steps - 1
        best: dict[int, _State] = {}
        for j, denoised in zip(keys, outputs):
            state = live[j]
            history = [denoised] + state.history[:3]
            if final:
                out = apply_row(state.x, stepper.row(state.path, 0.0), history)
                cost = mean_error(out, teacher_final)
                if -2 not in best or cost < best[-2].cost:
                    best[-2] = _State(cost, out, history, state.path)
                continue
            last = G - (steps - level - 2)  # leave room for the remaining intermediate steps
            for m in range(j + 1, last):
                x_m = apply_row(state.x, stepper.row(state.path, node_sigmas[m]), history)
                cost = mean_error(x_m, teacher_states[m])
                if m not in best or cost < best[m].cost:
                    best[m] = _State(cost, x_m, history, state.path + (node_sigmas[m],))
        live = best
        if progress is not None:
            progress(level + 1, steps)
    return list(live[-2].path), live[-2].cost


def _evaluate(model, xs, sigmas, extra_args, max_rows):
    """Model outputs at several states with per-state sigmas, in batches of at most ``max_rows`` rows."""
    outputs, start = [], 0
    while start < len(xs):
        n = max(1, max_rows // max(1, xs[0].shape[0]))
        chunk = xs[start:start + n]
        x = torch.cat(chunk)
        sigma = torch.cat([x.new_full((c.shape[0],), s) for c, s in zip(chunk, sigmas[start:start + n])])
        out = model(x, sigma, **extra_args)
        outputs += list(torch.split(out, [c.shape[0] for c in chunk]))
        start += n
    return outputs


def feasible(z: list[float], rng: SigmaRange, min_gap: float) -> bool:
    """z of sigma_1..sigma_{K-1}: strictly decreasing by min_gap from the start on, within [z(sigma_min), z(top)]."""
    z_top = min(float(rng.z(rng.top)), float(rng.z(rng.sigma_max)) - min_gap)  # VE: top = the start
    z_min = float(rng.z(rng.sigma_min))
    if z[0] > z_top + 1e-12 or z[-1] < z_min - 1e-12:
        return False
    return all(a - b >= min_gap for a, b in zip(z[:-1], z[1:]))


def coordinate_descent(objective, x0: list[float], move, budget_trials: int, delta: float = 0.25,
                       min_delta: float = 0.01, progress=None) -> tuple[list[float], float, int]:
    """Minimise ``objective(x)`` by +-delta moves of one coordinate at a time (``move(x, k, step)`` returns the
    trial point, or None where it is not allowed), delta halved when no move helps, until min_delta or the
    trial budget. Returns (x, objective(x), trials)."""
    best_x, best = list(x0), objective(x0)
    trials = 1
    while delta >= min_delta and trials < budget_trials:
        improved = False
        for k in range(len(best_x)):
            for sign in (1.0, -1.0):
                if trials >= budget_trials:
                    break
                trial = move(best_x, k, sign * delta)
                if trial is None or trial == best_x:
                    continue
                value = objective(trial)
                trials += 1
                if value < best:
                    best_x, best, improved = trial, value, True
                    break
        if progress is not None:
            progress(trials, budget_trials)
        if not improved:
            delta /= 2
    return best_x, best, trials


def refine(objective, z0: list[float], rng: SigmaRange, min_gap: float, budget_trials: int,
           delta: float = 0.25, min_delta: float = 0.01, progress=None) -> tuple[list[float], float, int]:
    """``coordinate_descent`` on the interior z of a schedule with the real sampler (``objective(z) -> error``),
    every trial snapped to the model's table and ``feasible``."""
    return coordinate_descent(objective, z0, _schedule_move(rng, min_gap), budget_trials, delta, min_delta, progress)


def _schedule_move(rng: SigmaRange, min_gap: float):
    def move(z, k, step):
        trial = list(z)
        trial[k] += step
        trial = _snapped(trial, rng)
        return trial if feasible(trial, rng, min_gap) else None

    return move


def _snapped(z: list[float], rng: SigmaRange) -> list[float]:
    if rng.table is None:
        return z
    return rng.z(rng.sigma(torch.tensor(z, dtype=torch.float64))).tolist()


def refine_box(objective, x0: list[float], bounds: list[tuple[float, float]], budget_trials: int,
               delta: float = 0.25, min_delta: float = 0.01, progress=None) -> tuple[list[float], float, int]:
    """``coordinate_descent`` for independent parameters in boxes ``bounds`` (low, high): moves clipped to the
    box."""
    def move(x, k, step):
        trial = list(x)
        trial[k] = min(bounds[k][1], max(bounds[k][0], trial[k] + step))
        return trial

    return coordinate_descent(objective, x0, move, budget_trials, delta, min_delta, progress)


def fit_step_tuning(objective, rng: SigmaRange, z0: list[float], min_gap: float, budget_trials: int,
                    progress=None) -> tuple[list[tuple[list[float], StepTuning, float]], int]:
    """Per-step tuning (``step_tuning``) for the schedule with interior ``z0``, then that schedule and its
    tuning together: ``objective(z, StepTuning) -> error``. Two ``coordinate_descent`` runs: the tuning alone
    from zero (2/5 of the budget), then every coordinate at once (the rest; a schedule fitted without the
    tuning is not the best one with it). Query shifts stay within ``query_shift_bounds`` of the current
    schedule, extrapolations within +-MAX_EXTRAPOLATION, each first one at 0. Returns ([(z, tuning, error)
    after each run], trials): the caller chooses on fresh noises (more freedom, more room to overfit)."""
    calls = len(z0) + 1
    top = float(rng.z(rng.top))
    start = float(rng.z(rng.sigma_max))
    extrapolation = [(0.0, 0.0)] + [(-MAX_EXTRAPOLATION, MAX_EXTRAPOLATION)] * (calls - 1)

    def bounds(z):
        return query_shift_bounds([start] + list(z), top) + extrapolation * (len(TUNING_SETS) - 1)

    def clipped(values, z):
        return [min(high, max(low, v)) for v, (low, high) in zip(values, bounds(z))]

    def tuning_move(z):
        box = bounds(z)

        def move(values, k, step):
            trial = list(values)
            trial[k] = min(box[k][1], max(box[k][0], trial[k] + step))
            return trial

        return move

    first = max(1, 2 * budget_trials // 5)
    values, fixed_error, trials = coordinate_descent(lambda v: objective(z0, StepTuning.from_flat(v, calls)),
                                                     [0.0] * (len(TUNING_SETS) * calls), tuning_move(z0), first,
                                                     progress=progress)
    n = len(z0)
    schedule_move = _schedule_move(rng, min_gap)

    def joint_move(point, k, step):
        z, values = point[:n], point[n:]
        if k >= n:
            return z + tuning_move(z)(values, k - n, step)
        z = schedule_move(z, k, step)
        return None if z is None else z + clipped(values, z)

    point, error, more = coordinate_descent(lambda p: objective(p[:n], StepTuning.from_flat(p[n:], calls)),
                                            list(z0) + values, joint_move, budget_trials - trials, delta=0.125,
                                            progress=progress and (lambda d, t: progress(trials + d, trials + t)))
    return ([(list(z0), StepTuning.from_flat(values, calls), fixed_error),
             (point[:n], StepTuning.from_flat(point[n:], calls), error)], trials + more)
