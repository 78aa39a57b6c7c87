"""Bridge Model Loader: a DDBM / DBIM checkpoint from models/bridge_models as an FS_BRIDGE_MODEL, and the
socket types the bridge nodes share."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ..samplers.bridges.schedule import SCHEDULE_PRESETS, BridgeSchedule
from ..samplers.bridges.checkpoints import (
    BRIDGE_PRESET_NAMES, BridgePreset, bridge_presets, detect_preset, load_bridge_checkpoint, save_bridge_safetensors,
)
from .comfy_io import CATEGORY, PREFIX, io, mark_advanced
from .registry import register_model_folder as register_folder

FOLDER = "fs_bridge_models"  # folder_paths key; on disk: models/bridge_models
EXTENSIONS = {".pt", ".pth", ".safetensors", ".sft"}
BRIDGE_MODEL = io.Custom(f"{PREFIX}_BRIDGE_MODEL")
BRIDGE_LATENT = io.Custom(f"{PREFIX}_BRIDGE_LATENT")
CAT = f"{CATEGORY}/bridges"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
log = logging.getLogger(__name__)


@dataclass
class BridgeModel:
    """FS_BRIDGE_MODEL: the UNet in a ModelPatcher, and what it needs to be sampled."""

    patcher: object
    preset: BridgePreset
    name: str


def register_model_folder() -> None:
    """models/bridge_models under the key fs_bridge_models."""
    register_folder(FOLDER, "bridge_models", EXTENSIONS)


class BridgeModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        register_model_folder()
        return io.Schema(
            node_id=f"{PREFIX}_BridgeModelLoader",
            display_name="Bridge Model Loader (DDBM / DBIM)",
            category=CAT,
            description="Loads a DDBM / DBIM diffusion-bridge checkpoint (edges->handbags, DIODE normals->photo, "
                        "ImageNet centre inpainting) from models/bridge_models. .pt files are read as plain "
                        "tensors only (never arbitrary pickled code).",
            inputs=mark_advanced([
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A file in models/bridge_models (.pt, .pth or .safetensors), e.g. "
                                       "e2h_ema_0.9999_420000.pt from huggingface.co/alexzhou907/DDBM."),
                io.Combo.Input("preset", options=["auto", *BRIDGE_PRESET_NAMES, "custom"], default="auto",
                               tooltip="auto: recognise the released models from their structure (or read it "
                                       "from a file this node converted). custom: use the schedule settings below."),
                io.Combo.Input("dtype", options=list(DTYPES), default="fp32",
                               tooltip="Weight precision. fp32 is what the reference samples with; fp16 / bf16 "
                                       "halve memory on GPUs."),
                io.Boolean.Input("save_safetensors", default=False,
                                 tooltip="Also write a .safetensors copy (with the preset inside) next to a .pt "
                                         "file, once; an existing file is never overwritten.",
                                 display_name="also save as .safetensors"),
                io.Combo.Input("custom_schedule", options=list(SCHEDULE_PRESETS), default="vp",
                               tooltip="custom preset only: the bridge the model was trained with (vp: DDBM's "
                                       "default; ve; i2sb: the ImageNet inpainting model's).",
                               display_name="custom: noise schedule"),
                io.Float.Input("beta_d", default=2.0, min=0.0, max=100.0, step=0.01,
                               tooltip="custom vp only: the schedule's beta_d (DDBM: 2).",
                               display_name="custom: beta_d"),
                io.Float.Input("beta_min", default=0.1, min=0.0, max=100.0, step=0.01,
                               tooltip="custom vp / i2sb only: beta_min (DDBM and I2SB: 0.1).",
                               display_name="custom: beta_min"),
                io.Float.Input("sigma_max", default=80.0, min=0.01, max=1000.0, step=0.01,
                               tooltip="custom ve only: the end time T (DDBM: 80 for edges, 20 for DIODE).",
                               display_name="custom: sigma_max"),
                io.Combo.Input("attention_order", options=["auto", "new", "legacy"], default="auto",
                               tooltip="custom only: how the attention weights are laid out. new: DDBM's models; "
                                       "legacy: OpenAI ADM-based ones (ImageNet). A wrong choice gives garbage.",
                               display_name="attention layout"),
            ], "custom_schedule", "beta_d", "beta_min", "sigma_max", "attention_order"),
            outputs=[BRIDGE_MODEL.Output(display_name="bridge_model",
                                         tooltip="Connect to the Bridge Sampler / Encode / Interpolate nodes.")],
        )

    @classmethod
    def execute(cls, ckpt_name, preset, dtype, save_safetensors, custom_schedule, beta_d, beta_min, sigma_max,
                attention_order) -> io.NodeOutput:
        import folder_paths

        from ..samplers.bridges.adm_unet import build_adm_unet, infer_adm_config

        if dtype not in DTYPES or preset not in ("auto", "custom", *BRIDGE_PRESET_NAMES):
            raise ValueError(f"Bridge Model Loader: unknown dtype {dtype!r} or preset {preset!r}.")
        path = folder_paths.get_full_path_or_raise(FOLDER, ckpt_name)
        state_dict, metadata = load_bridge_checkpoint(path)
        if preset == "auto":
            chosen = detect_preset(state_dict, metadata)
        elif preset == "custom":
            overrides = {} if attention_order == "auto" else {"attention_order": attention_order}
            config = infer_adm_config(state_dict, **overrides)
            schedule = {"vp": BridgeSchedule("vp", beta_d=beta_d, beta_min=beta_min),
                        "ve": BridgeSchedule("ve", sigma_max=sigma_max, t_min=0.002),
                        "i2sb": BridgeSchedule("i2sb", beta_min=beta_min)}[custom_schedule]
            chosen = BridgePreset("custom", config, schedule, "inpaint" if config.num_classes else "translate")
        else:
            chosen = bridge_presets()[preset]
        try:
            net = build_adm_unet(chosen.adm, state_dict, dtype=DTYPES[dtype])
        except RuntimeError as err:
            raise ValueError(f"Bridge Model Loader: {ckpt_name} does not fit the preset {chosen.name!r}: {err}. "
                             "Try preset = auto or custom.") from None
        if save_safetensors and not path.lower().endswith((".safetensors", ".sft")):
            target = os.path.splitext(path)[0] + ".safetensors"
            if save_bridge_safetensors(state_dict, target, chosen):
                log.info("Bridge Model Loader: wrote %s", target)
            else:
                log.info("Bridge Model Loader: %s exists; not overwritten.", target)
        return io.NodeOutput(BridgeModel(_patcher(net), chosen, ckpt_name))


def _patcher(net):
    import comfy.model_management as mm
    import comfy.model_patcher

    net.get_dtype = lambda: net.dtype  # what ModelPatcher.model_dtype() reads
    return comfy.model_patcher.ModelPatcher(net, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())
