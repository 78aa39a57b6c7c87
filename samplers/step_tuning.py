"""Per-step tuning of a multistep ODE sampler, fitted by the schedule calibrator.

Two small sets of numbers, one per model call i of a run (``StepTuning``):

* ``query_shift`` d_i (LD3, Tong et al. 2024, "decoupled" query times): the model is evaluated at the
  noise level with log lam = log lam(sigma_i) + d_i instead of sigma_i (lam = s / alpha, schedule.py);
  the solver's coefficients stay those of sigma_i. The state does not move, only where the model is asked.
* ``output_extrapolation`` g_i (D-ODE, Kim et al. 2024): the solver uses D_i + g_i (D_i - D_{i-1}) in place
  of the model output D_i (D_{i-1}: the previous raw output; g_0 must be 0).

Both are 0 for the plain sampler. They only make sense for the schedule they were fitted on (the
calibrator's SIGMAS): a run with another step count is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .schedule import NoiseSchedule

MAX_EXTRAPOLATION = 1.0  # |g| bound the calibrator searches in


@dataclass(frozen=True)
class StepTuning:
    query_shift: tuple = ()
    output_extrapolation: tuple = ()

    @classmethod
    def from_option(cls, option, calls: int, who: str) -> "StepTuning | None":
        """From the sampler option (a dict with either key, lists of ``calls`` floats; None: no tuning)."""
        if option is None:
            return None
        if isinstance(option, StepTuning):
            option = {"query_shift": option.query_shift, "output_extrapolation": option.output_extrapolation}
        if not isinstance(option, dict) or not set(option) <= {"query_shift", "output_extrapolation"}:
            raise ValueError(f"{who}: step_tuning must be a dict with 'query_shift' and / or "
                             f"'output_extrapolation' (lists of one float per step), got {option!r}.")
        parts = {}
        for name in ("query_shift", "output_extrapolation"):
            values = option.get(name) or ()
            values = tuple(float(v) for v in values)
            if values and len(values) != calls:
                raise ValueError(f"{who}: step_tuning {name} has {len(values)} values for a schedule of {calls} "
                                 "steps; it was fitted for another schedule. Use the SIGMAS it was calibrated "
                                 "with (Schedule Calibrator), or calibrate again.")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{who}: step_tuning {name} holds a non-finite value: {values}.")
            parts[name] = values
        if parts["output_extrapolation"] and parts["output_extrapolation"][0] != 0.0:
            raise ValueError(f"{who}: step_tuning output_extrapolation[0] must be 0 (the first step has no "
                             "previous model output).")
        return cls(**parts)

    def for_rows(self, evaluated: list[bool], model_sigmas: torch.Tensor, schedule: NoiseSchedule):
        """(the sigmas the model is asked at, per-row extrapolation weights or None) for a plan whose rows
        call the model where ``evaluated`` is True (one value of each list per such row, in order)."""
        calls = [i for i, e in enumerate(evaluated) if e]
        sigmas = model_sigmas.to(torch.float64).clone()
        if self.query_shift:
            index = torch.tensor(calls)
            sigmas[index] = self.query_sigmas(sigmas[index], schedule)
        weights = None
        if any(self.output_extrapolation):
            weights = [0.0] * len(evaluated)
            for i, g in zip(calls, self.output_extrapolation):
                weights[i] = g
        return sigmas, weights

    def query_sigmas(self, sigmas: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        """Float64 noise levels the model is asked at, for the steps' sigmas (one per model call)."""
        sig = sigmas.to(torch.float64)
        if not self.query_shift:
            return sig.clone()
        shift = torch.tensor(self.query_shift, dtype=torch.float64)
        moved = shift != 0
        if (moved & ~torch.isfinite(schedule.log_lam(sig))).any():
            raise ValueError("step_tuning: a query_shift is set on a step at flow sigma = 1 (log lam is infinite "
                             "there); it must be 0.")
        shifted = schedule.sigma_from_lam(torch.exp(schedule.log_lam(sig) + shift))
        return torch.where(moved, shifted, sig)

    def as_option(self) -> dict:
        """JSON-friendly option value (what the calibrator's report and SAMPLER carry)."""
        return {"query_shift": [round(v, 6) for v in self.query_shift],
                "output_extrapolation": [round(v, 6) for v in self.output_extrapolation]}


def query_shift_bounds(log_lams: list[float], log_lam_max: float) -> list[tuple[float, float]]:
    """(low, high) of each query shift the calibrator searches: at most half the log-lam gap to either
    neighbouring step (so queries keep their order) and never above the model's top noise level; (0, 0) at a
    flow start (infinite log lam). ``log_lams``: log lam of the steps' sigmas (one per model call)."""
    out = []
    for i, z in enumerate(log_lams):
        if not math.isfinite(z):
            out.append((0.0, 0.0))
            continue
        gaps = [log_lams[i - 1] - z if i > 0 else math.inf, log_lams[i + 1] - z if i + 1 < len(log_lams) else None]
        up = 0.5 * gaps[0]  # inf above the first step: only the model's top bounds it
        down = 0.5 * (-gaps[1] if gaps[1] is not None else (gaps[0] if math.isfinite(gaps[0]) else 1.0))
        out.append((-down, max(0.0, min(up, log_lam_max - z))))
    return out
