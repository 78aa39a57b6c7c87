"""Per-step tuning of a few-step ODE sampler, fitted by the schedule calibrator for its schedule.

Three small sets of numbers, one per model call i of a run (``StepTuning``):

* ``query_shift`` d_i (LD3, Tong et al. 2024, "decoupled" query times): the model is asked at the noise
  level whose log lam is log lam(sigma_i) + d_i instead of at sigma_i (lam = s / alpha, schedule.py);
  the sampler's own coefficients stay those of sigma_i. The state does not move, only where the model is asked.
* ``output_extrapolation`` g_i (D-ODE, Kim et al. 2024): the sampler gets D_i + g_i (D_i - D_{i-1}) in place
  of the model output D_i (D_{i-1}: the previous raw output; g_0 must be 0).
* ``noise_extrapolation`` k_i (gradient estimation, Permenter & Yuan 2024; on VE models ComfyUI's
  gradient_estimation sampler is Euler with k = 1 but on the last step): the noise the output implies,
  eps = (x - alpha D) / s at the sampler's own sigma, is extrapolated to eps_i + k_i (eps_i - eps_{i-1}); the
  sampler gets the matching clean prediction D_i - k_i (s_i / alpha_i)(eps_i - eps_{i-1}) (k_0 must be 0).
  Through eps it brings in the previous state x_{i-1}, which the two above cannot.

Both are applied by ``TunedModel``, a wrapper of the model that counts its calls, so they work with any
sampler that calls the model once per step, in order (the pack's ODE presets, ComfyUI's euler, dpmpp_2m,
ipndm, deis, uni_pc, gradient_estimation...; the calibrator checks this before tuning). ``sample_tuned``
is a sampler function (k-diffusion convention) that runs another one through it: the one way to run a
sampler with its tuning. All sets are 0 for the plain sampler and only make sense for the schedule they were
fitted on: another step count is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .schedule import NoiseSchedule, resolve_schedule

MAX_EXTRAPOLATION = 1.0  # |g| bound the calibrator searches in


@dataclass(frozen=True)
class StepTuning:
    query_shift: tuple = ()
    output_extrapolation: tuple = ()
    noise_extrapolation: tuple = ()

    @classmethod
    def from_option(cls, option, steps: int, who: str) -> "StepTuning":
        """From the sampler option: a dict with some of 'query_shift', 'output_extrapolation' and
        'noise_extrapolation', lists of one float per step (what the calibrator's report and SAMPLER output
        carry), or a StepTuning."""
        if isinstance(option, StepTuning):
            option = option.as_option()
        if not isinstance(option, dict) or not set(option) <= set(TUNING_SETS):
            raise ValueError(f"{who}: step_tuning must be a dict with some of {', '.join(map(repr, TUNING_SETS))} "
                             f"(lists of one float per step), got {option!r}.")
        parts = {}
        for name in TUNING_SETS:
            values = tuple(float(v) for v in option.get(name) or ())
            if values and len(values) != steps:
                raise ValueError(f"{who}: step_tuning {name} has {len(values)} values for a schedule of {steps} "
                                 "steps; it was fitted for another schedule. Use the SIGMAS it was calibrated "
                                 "with (Schedule Calibrator), or calibrate again.")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{who}: step_tuning {name} holds a non-finite value: {values}.")
            parts[name] = values
        for name in ("output_extrapolation", "noise_extrapolation"):
            if parts[name] and parts[name][0] != 0.0:
                raise ValueError(f"{who}: step_tuning {name}[0] must be 0 (the first step has no previous "
                                 "model output).")
        return cls(**parts)

    def as_option(self) -> dict:
        """JSON-friendly option value."""
        return {name: [round(v, 6) for v in getattr(self, name)] for name in TUNING_SETS}

    def flat(self, steps: int) -> list[float]:
        """All sets, each padded with zeros to ``steps`` values, one after the other (what the calibrator
        searches); ``from_flat`` is the inverse."""
        return [v for name in TUNING_SETS for v in (list(getattr(self, name)) or [0.0] * steps)]

    @classmethod
    def from_flat(cls, values: list[float], steps: int) -> "StepTuning":
        return cls(*(tuple(values[k * steps:(k + 1) * steps]) for k in range(len(TUNING_SETS))))


TUNING_SETS = ("query_shift", "output_extrapolation", "noise_extrapolation")


class TunedModel:
    """``model`` with call i asked at the shifted noise level and its output extrapolated (module docstring).
    Everything else (ComfyUI samplers read model.inner_model...) is forwarded."""

    def __init__(self, model, tuning: StepTuning, schedule: NoiseSchedule):
        self.model, self.tuning, self.schedule = model, tuning, schedule
        self.calls, self.previous, self.previous_noise = 0, None, None
        self.uses_noise = any(v != 0.0 for v in tuning.noise_extrapolation)

    def __call__(self, x, sigma, **extra_args):
        i, self.calls = self.calls, self.calls + 1
        shifts, weights = self.tuning.query_shift, self.tuning.output_extrapolation
        work = torch.float32 if sigma.device.type == "mps" else torch.float64  # MPS has no float64
        query = sigma
        if i < len(shifts) and shifts[i] != 0.0:
            log_lam = self.schedule.log_lam(sigma.to(work)) + shifts[i]
            query = self.schedule.sigma_from_lam(torch.exp(log_lam)).to(sigma.dtype)
        denoised = self.model(x, query, **extra_args)
        out = denoised
        if i < len(weights) and weights[i] != 0.0:
            out = torch.lerp(self.previous, denoised, 1.0 + weights[i])
        if self.uses_noise:  # eps at the sampler's own sigma (x = alpha D + s eps)
            shape = (-1,) + (1,) * (x.ndim - 1)
            alpha, s = self.schedule.alpha(sigma.to(work)), self.schedule.s(sigma.to(work))
            noise = (x - alpha.to(x.dtype).reshape(shape) * denoised) / s.to(x.dtype).reshape(shape)
            k = self.tuning.noise_extrapolation[i] if i < len(self.tuning.noise_extrapolation) else 0.0
            if k != 0.0:
                out = out - (k * s / alpha).to(x.dtype).reshape(shape) * (noise - self.previous_noise)
            self.previous_noise = noise
        self.previous = denoised
        return out

    def __getattr__(self, name):
        return getattr(self.model, name)


@torch.no_grad()
def sample_tuned(model, x, sigmas, extra_args=None, callback=None, disable=None, sampler=None, step_tuning=None,
                 **options):
    """Runs ``sampler`` (any k-diffusion-convention function, with ``options``) with ``step_tuning`` (a
    calibrator result, ``StepTuning.from_option``) through ``TunedModel``: what the Schedule Calibrator's
    SAMPLER output runs. Refused before the run for another step count, after it when the sampler did not
    call the model once per step."""
    who = "Tuned sampler"
    if not callable(sampler):
        raise ValueError(f"{who}: 'sampler' must be a sampler function.")
    steps = len(sigmas) - 1
    tuning = StepTuning.from_option(step_tuning, steps, who)
    schedule = resolve_schedule(model, options.get("parametrization"))
    if tuning.query_shift and tuning.query_shift[0] != 0.0 and schedule.is_flow and float(sigmas[0]) >= 1.0:
        raise ValueError(f"{who}: step_tuning query_shift[0] must be 0 on a flow model started at sigma = 1 "
                         "(log lam is infinite there).")
    tuned = TunedModel(model, tuning, schedule)
    out = sampler(tuned, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **options)
    if tuned.calls != steps:
        raise ValueError(f"{who}: the sampler called the model {tuned.calls} times for {steps} steps; step tuning "
                         "needs a sampler that calls it once per step (euler, dpmpp_2m, ipndm, uni_pc, the pack's "
                         "ODE presets...).")
    return out


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
