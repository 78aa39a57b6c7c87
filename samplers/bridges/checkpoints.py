"""Bridge presets and checkpoint files: what a DDBM / DBIM checkpoint needs besides its weights
(``BridgePreset``), the released models' presets and the toy model's, preset detection from a state dict,
and reading / writing checkpoint files (never an unsafe load; safetensors written atomically)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .schedule import BridgeSchedule

if TYPE_CHECKING:
    from .adm_unet import ADMConfig

TASKS = ("translate", "inpaint")


@dataclass(frozen=True)
class BridgePreset:
    """What a checkpoint needs besides its weights: network structure, bridge schedule (with its
    preconditioning), task, and how a condition image is resized to the training resolution."""

    name: str
    adm: ADMConfig
    schedule: BridgeSchedule
    task: str = "translate"
    resize: str = "bicubic"  # bicubic (photos, edge maps) | nearest (normal maps)

    def to_json(self) -> str:
        import json
        from dataclasses import asdict

        return json.dumps({"name": self.name, "adm": self.adm.to_dict(), "schedule": asdict(self.schedule),
                           "task": self.task, "resize": self.resize})

    @classmethod
    def from_json(cls, text: str) -> "BridgePreset":
        import json

        from .adm_unet import ADMConfig

        d = json.loads(text)
        return cls(d["name"], ADMConfig.from_dict(d["adm"]), BridgeSchedule(**d["schedule"]), d["task"], d["resize"])


BRIDGE_PRESET_NAMES = ("e2h", "diode", "imagenet_inpaint", "toy_shapes16")  # the keys of bridge_presets()


@functools.cache
def bridge_presets() -> dict[str, BridgePreset]:
    """The released models' presets and the toy model's, built on first use (imports the UNet configs)."""
    from .adm_unet import ADM_CONFIGS, TOY_ADM_CONFIG
    from .schedule import SCHEDULE_PRESETS

    presets = {
        "e2h": BridgePreset("e2h", ADM_CONFIGS["e2h"], SCHEDULE_PRESETS["vp"], "translate", "bicubic"),
        "diode": BridgePreset("diode", ADM_CONFIGS["diode"], SCHEDULE_PRESETS["vp"], "translate", "nearest"),
        "imagenet_inpaint": BridgePreset("imagenet_inpaint", ADM_CONFIGS["imagenet_inpaint"], SCHEDULE_PRESETS["i2sb"],
                                         "inpaint", "bicubic"),
        "toy_shapes16": BridgePreset("toy_shapes16", TOY_ADM_CONFIG, SCHEDULE_PRESETS["vp"], "translate", "nearest"),
    }
    assert tuple(presets) == BRIDGE_PRESET_NAMES
    return presets


def __getattr__(name: str):  # PEP 562: BRIDGE_PRESETS stays importable without building it at import time
    if name == "BRIDGE_PRESETS":
        return bridge_presets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


METADATA_KEY = "fs_bridge_preset"


def detect_preset(state_dict: dict, metadata: dict | None = None) -> BridgePreset:
    """The preset stored in our safetensors metadata, else the preset (a released checkpoint or the toy
    model) with this structure, else a custom preset from the inferred structure (label_emb -> ImageNet-style
    i2sb inpainting with legacy attention, otherwise a VP translation model with the DDBM attention order)."""
    from .adm_unet import infer_adm_config, matching_preset
    from .schedule import SCHEDULE_PRESETS

    if metadata and METADATA_KEY in metadata:
        return BridgePreset.from_json(metadata[METADATA_KEY])
    config = infer_adm_config(state_dict)
    presets = bridge_presets()
    name = matching_preset(config, {key: preset.adm for key, preset in presets.items()})
    if name is not None:
        return presets[name]
    inpaint = config.num_classes is not None
    return BridgePreset("custom", config, SCHEDULE_PRESETS["i2sb" if inpaint else "vp"],
                        "inpaint" if inpaint else "translate")


def load_bridge_checkpoint(path: str, who: str = "Bridge Model Loader"):
    """(state_dict, metadata) from .safetensors or a .pt / .pth of plain tensors (weights_only=True:
    never arbitrary pickle). Accepts {'state_dict': ...} / {'model': ...} wrappers and 'module.' prefixes.
    An unreadable file raises ValueError naming ``who`` and the file; none suggests an unsafe load."""
    import os
    import pickle

    path = str(path)
    name = os.path.basename(path)
    if path.lower().endswith((".safetensors", ".sft")):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{who}: {name} is not a readable safetensors file ({err}). It is probably truncated "
                             "or damaged (an interrupted download?): download or copy it again.") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{who}: {name} stores Python objects besides tensors, and the loader only reads "
                         "plain tensors, since unpickling other objects can run code from the file. Use a "
                         "checkpoint that holds only a state dict (the released DDBM / DBIM .pt files do) or a "
                         ".safetensors file.") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{who}: {name} is not a readable PyTorch checkpoint ({err}). It is probably truncated "
                         "or damaged: download or copy it again.") from None
    for key in ("state_dict", "model", "ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{who}: {name} holds no state dict of tensors (a DDBM / DBIM UNet checkpoint).")
    return {k.removeprefix("module."): v for k, v in sd.items()}, {}


def save_bridge_safetensors(state_dict: dict, path: str, preset: BridgePreset) -> bool:
    """Write ``path`` atomically and never over an existing file (False if it exists). Attention
    kernels are stored squeezed (Conv1d); the preset goes into the metadata."""
    from .adm_unet import squeeze_attention_kernels
    from ..files import atomic_save_safetensors

    try:
        atomic_save_safetensors(squeeze_attention_kernels(state_dict), path, metadata={METADATA_KEY: preset.to_json()})
    except FileExistsError:  # there already, or appeared while writing: left untouched
        return False
    return True
