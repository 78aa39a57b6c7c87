"""The DPM-OT map: a pool of latents at the junction sigma (with fitted heights) and its file format (spec 6.7)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..comfy_compat import parametrization_of_prediction
from ..schedule import NoiseSchedule

FORMAT = "dpm_ot_map"
VERSION = "1"
SOURCE = "gaussian_unit"
COST = "inner_product"
SIGMA_TOLERANCE = 1e-4  # relative; the finisher's first sigma must be the map's junction


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
    from ..files import atomic_save_safetensors

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
