"""Shared pieces of the DPM-OT nodes: socket types, tooltips, model identity and pool helpers."""
from __future__ import annotations

from ...samplers.dpm_ot import OTMap, check_junction
from ...samplers.comfy_compat import parametrization_of_model_sampling, prediction_type
from ...samplers.schedule import NoiseSchedule
from ..comfy_io import CATEGORY, PREFIX, io
from ..guided import conditioning_tensors

FOLDER = "fs_ot_maps"  # folder_paths key; on disk: models/fs_ot_maps
OT_TARGETS = io.Custom(f"{PREFIX}_OT_TARGETS")
OT_MAP = io.Custom(f"{PREFIX}_OT_MAP")
CAT = f"{CATEGORY}/dpm_ot"

JUNCTION_TOOLTIP = ("Junction noise level sigma_j where the pool latents sit and the finishing steps start. Small "
                    "(eps models ~0.02-0.2, flow ~0.02-0.1) = near copies of the pool; larger (eps 1-5, flow "
                    "0.3-0.7) = img2img-like variations of pool members.")
HONEST_NOTE = ("DPM-OT is an OT-balanced lookup into a pool of latents: every image starts from one pool member "
               "at the junction sigma, so there is no mode mixing, but there is no novelty beyond the pool and the "
               "finishing steps either (a deterministic finisher gives at most N distinct images). Not a general "
               "text-to-image accelerator: the prompt only acts in the finishing steps.")


def model_identity(model, who: str):
    """(prediction type, latent format class name, NoiseSchedule, model_sampling) of a ComfyUI MODEL."""
    ms = model.get_model_object("model_sampling")
    try:
        schedule = NoiseSchedule(parametrization_of_model_sampling(ms))
    except ValueError as err:
        raise ValueError(f"{who}: {err}") from None
    return prediction_type(ms), type(model.get_model_object("latent_format")).__name__, schedule, ms


def check_junction_for_model(sigma_junction, schedule, ms, who):
    sigma_junction = check_junction(sigma_junction, schedule, who)
    low, high = float(ms.sigma_min), float(ms.sigma_max)
    if not low <= sigma_junction <= high * 1.0001:
        raise ValueError(f"{who}: the junction sigma {sigma_junction:.4g} is outside the model's range "
                         f"[{low:.4g}, {high:.4g}].")
    return sigma_junction


def data_latents(model, latents: dict, who: str):
    import torch

    samples = latents.get("samples") if isinstance(latents, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim < 3 or samples.shape[0] == 0:
        raise ValueError(f"{who}: needs a non-empty LATENT batch (e.g. VAE Encode of your images).")
    return model.model.process_latent_in(samples.clone().float())


def conditioning_tag(conditioning) -> str:
    """'unconditional' when empty, else a short hash of the conditioning tensors (stored in the map)."""
    from ...samplers.dp_schedule import cache_key

    tensors = conditioning_tensors(conditioning)
    return f"prompt:{cache_key(*tensors)[:16]}" if tensors else "unconditional"


def pool_report(pool: OTMap) -> str:
    return (f"{pool.n_targets} targets of shape {pool.latent_shape} at sigma_j {pool.sigma_junction:.4g} "
            f"({pool.model_sampling}, {pool.latent_format}, {pool.info.get('provenance', '?')})")
