"""Sampling through a DPM-OT map: match checks, the noise -> target assignment, placements, the sampler and
the finishing schedule below the junction."""
from __future__ import annotations

import math
import warnings

import torch

from ..classic import sample_dpmpp_2m, sample_euler, sample_heun
from ..comfy_compat import comfy_model_sampling, model_latent_format, prediction_type, run_noise_and_latent
from ..common import check_inputs, seeded_noise_sampler
from ..er_sde import PRESETS as ER_SDE_PRESETS
from ..er_sde import sample_er_sde
from ..schedule import NoiseSchedule, resolve_schedule
from .map import SIGMA_TOLERANCE, OTMap
from .scoring import TILE_ELEMENTS, exact_fp32_matmul, tiled_argmax, tiled_top2

PLACEMENTS = ("target", "renoise", "aeot_pair")
FINISHERS = {
    "euler": (sample_euler, {}),
    "euler_ancestral": (sample_er_sde, {"order": 1, "noise_fn": "reverse_sde"}),
    "heun": (sample_heun, {}),
    "dpmpp_2m": (sample_dpmpp_2m, {}),
    **{name: (sample_er_sde, options) for name, options in ER_SDE_PRESETS.items()},
}
PLACEMENT_SEED_OFFSET = 0x5EED  # the placement's fresh noise is independent of the finisher's stream


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
    noise, latent = run_noise_and_latent(model)
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
