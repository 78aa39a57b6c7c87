"""Bridge nodes: image-to-image translation and inpainting with DDBM / DBIM checkpoints (DBIM,
high-order DBIM, DDBM Heun), encoding to booting noise, interpolation, and pre-processing helpers."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..samplers.bridge import GRIDS, SCHEDULE_PRESETS, BridgeSchedule, dbim_steps_for_nfe, heun_nfe, heun_steps_for_nfe
from ..samplers.dbim import (
    BRIDGE_PRESETS, SAMPLERS, BridgeDenoiser, BridgePreset, check_finite, detect_preset, encode_dbim,
    interpolate_dbim, load_bridge_checkpoint, row_seeded_noise, sample_dbim, sample_ddbm_heun, save_bridge_safetensors,
)
from .comfy_io import CATEGORY, PREFIX, io, mark_advanced
from .registry import register_model_folder as register_folder

FOLDER = "fs_bridge_models"  # folder_paths key; on disk: models/bridge_models
EXTENSIONS = {".pt", ".pth", ".safetensors", ".sft"}
BRIDGE_MODEL = io.Custom(f"{PREFIX}_BRIDGE_MODEL")
BRIDGE_LATENT = io.Custom(f"{PREFIX}_BRIDGE_LATENT")
CAT = f"{CATEGORY}/bridges"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SIZE_MODES = ("resize_to_model", "keep")
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


# ---- image plumbing ----------------------------------------------------------------------------

def image_to_bridge(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B,H,W,C] in 0..1 -> [B,3,H,W] in -1..1 on the CPU, float64 (grey replicated, alpha dropped);
    bridge_to_image inverts it exactly."""
    x = image[..., :3] if image.shape[-1] >= 3 else image[..., :1].expand(*image.shape[:-1], 3)
    return 2 * x.movedim(-1, 1).to("cpu", torch.float64) - 1


def bridge_to_image(x: torch.Tensor) -> torch.Tensor:
    import comfy.model_management

    x = x.to("cpu", torch.float64)
    return ((x + 1) / 2).clamp(0, 1).movedim(1, -1).float().to(comfy.model_management.intermediate_device())


def _fit(x: torch.Tensor, preset: BridgePreset, size_mode: str, method: str, what: str) -> torch.Tensor:
    size, multiple = preset.adm.image_size, preset.adm.size_multiple
    if size_mode == "resize_to_model" and size is not None:
        if tuple(x.shape[-2:]) == (size, size):
            return x
        if method == "nearest":
            return F.interpolate(x, size=(size, size), mode="nearest")
        return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(f"Bridge: the {what} is {w}x{h}, but this model ({preset.name}) needs sides divisible by "
                         f"{multiple}; use size = resize_to_model or resize the image first.")
    if size is not None and (h, w) != (size, size):
        log.warning("Bridge: running %s at %dx%d; it was trained at %dx%d (untested quality).", preset.name, w, h,
                    size, size)
    return x


def _mask(mask, x: torch.Tensor, preset: BridgePreset):
    if mask is None:
        if preset.task == "inpaint":
            raise ValueError(f"Bridge: {preset.name} is an inpainting model: connect a MASK (1 = regenerate), e.g. "
                             "from the Bridge Centre Mask node.")
        return None
    if preset.task != "inpaint":
        raise ValueError(f"Bridge: {preset.name} translates whole images; a MASK is only for inpainting models.")
    m = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    m = F.interpolate(m, size=tuple(x.shape[-2:]), mode="nearest") if m.shape[-2:] != x.shape[-2:] else m
    m = (m > 0.5).to(x.dtype)
    if m.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"Bridge: {m.shape[0]} masks for {x.shape[0]} images; give one mask or one per image.")
    return m.expand(x.shape[0], -1, -1, -1)


def _work_dtype(device) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS has no float64


@dataclass
class _Run:
    denoiser: BridgeDenoiser
    x_T: torch.Tensor  # condition (hole zeroed for inpainting), work dtype, on the model's device
    mask: torch.Tensor | None
    original: torch.Tensor  # the condition as given (resized), for paste_known


def _prepare(model: BridgeModel, condition, mask, size_mode, class_label, clip=True, who="Bridge") -> _Run:
    import comfy.model_management as mm

    preset = model.preset
    check_finite(condition, f"{who} node")
    x = _fit(image_to_bridge(condition), preset, size_mode, preset.resize, "condition image")
    m = _mask(mask, x, preset)
    mm.load_models_gpu([model.patcher], force_full_load=True)
    device = model.patcher.load_device
    dtype = _work_dtype(device)
    x = x.to(device, dtype)
    m = None if m is None else m.to(device, dtype)
    labels = None
    classes = preset.adm.num_classes
    if classes is not None:
        if not 0 <= class_label < classes:
            raise ValueError(f"Bridge: class_label must be in 0..{classes - 1} for {preset.name}, got {class_label}.")
        labels = torch.full((x.shape[0],), int(class_label), dtype=torch.long, device=device)
    x_T = x if m is None else x * (1 - m)  # the reference zeroes the hole (mid-grey)
    return _Run(BridgeDenoiser(model.patcher.model, preset.schedule, labels, clip), x_T, m, x)


def _callback(total: int):
    """Progress bar, interruption and (when ComfyUI previews are on) the x0 prediction as preview."""
    import comfy.model_management as mm
    import comfy.utils

    pbar = comfy.utils.ProgressBar(total)
    preview = None
    try:
        import latent_preview
        from comfy.cli_args import LatentPreviewMethod, args

        if args.preview_method != LatentPreviewMethod.NoPreviews:
            def preview(x0):
                return ("JPEG", latent_preview.preview_to_image(x0[0].movedim(0, -1).float()),
                        latent_preview.MAX_PREVIEW_RESOLUTION)
    except ImportError:
        pass

    def callback(info):
        mm.throw_exception_if_processing_interrupted()
        pbar.update_absolute(info["i"] + 1, total, preview(info["denoised"]) if preview else None)

    return callback


def _latent(noise: torch.Tensor, model: BridgeModel, **settings) -> dict:
    return {"noise": noise.float().cpu(), "preset": model.preset.name, **settings}


def _latent_noise(latent: dict, like: torch.Tensor, what: str) -> torch.Tensor:
    noise = latent["noise"]
    if noise.shape[0] == 1 and like.shape[0] > 1:
        noise = noise.expand(like.shape[0], -1, -1, -1)
    if tuple(noise.shape) != tuple(like.shape):
        raise ValueError(f"Bridge: {what} has shape {tuple(noise.shape)} but the condition needs {tuple(like.shape)} "
                         "(same batch and resolution as when it was made).")
    return noise.to(like.device, like.dtype)


def _tip_model():
    return "The bridge model from the Bridge Model Loader."


def _common_inputs(with_order=True):
    inputs = [
        io.Int.Input("nfe", default=20, min=2, max=1000,
                     tooltip="Network evaluations. DBIM: 10-20 is usually enough (the paper's default is 20); "
                             "each one is one UNet call.", display_name="model calls (NFE)"),
    ]
    if with_order:
        inputs.append(io.Int.Input("order", default=1, min=1, max=3,
                                   tooltip="Order of the deterministic solver: 1 = plain DBIM, 2 or 3 = high-order "
                                           "DBIM, more accurate at low NFE (try 2 at NFE 10). The Bridge Sampler "
                                           "uses it only with sampler = dbim_high_order (2 or 3)."))
    inputs += [
        io.Combo.Input("grid", options=list(GRIDS), default="uniform_t",
                       tooltip="Where the steps go. uniform_t: the reference (use it for the released VP "
                               "models); karras: denser near the end, needed for VE bridges.",
                       display_name="time grid"),
        io.Combo.Input("size", options=list(SIZE_MODES), default="resize_to_model",
                       tooltip="resize_to_model: scale the input to the model's training size (64 or 256). keep: "
                               "run at the input size (sides must divide by 8 or 32; quality untested)."),
        io.Int.Input("class_label", default=0, min=0, max=999,
                     tooltip="ImageNet class of the image (0-999), only for class-conditional models such as "
                             "the ImageNet inpainting one; ignored otherwise.", display_name="class label"),
    ]
    return inputs


def _check_options(sampler: str, eta: float, order: int, churn: float) -> None:
    """ComfyUI 0.3.64 does not check V3 combo values or ranges before execute: do it here."""
    if sampler not in SAMPLERS:
        raise ValueError(f"Bridge Sampler: sampler must be one of {SAMPLERS}, got {sampler!r}.")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"Bridge Sampler: eta must be in [0, 1] (above 1 the DBIM step is undefined), got {eta}.")
    if sampler == "dbim_high_order" and order not in (2, 3):
        raise ValueError(f"Bridge Sampler: high-order DBIM needs order 2 or 3, got {order}.")
    if not 0.0 <= churn < 1.0:
        raise ValueError(f"Bridge Sampler: churn_step_ratio must be in [0, 1), got {churn}.")


# ---- nodes ---------------------------------------------------------------------------------------

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
                io.Combo.Input("preset", options=["auto", *BRIDGE_PRESETS, "custom"], default="auto",
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

        from ..samplers.adm_unet import build_adm_unet, infer_adm_config

        if dtype not in DTYPES or preset not in ("auto", "custom", *BRIDGE_PRESETS):
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
            chosen = BRIDGE_PRESETS[preset]
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


class BridgeSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}_BridgeSampler",
            display_name="Bridge Sampler (DBIM)",
            category=CAT,
            description="Translates a condition image with a diffusion-bridge model: DBIM (Zheng et al., 2024) "
                        "at 10-20 evaluations, high-order DBIM, or DDBM's Heun sampler (the slow baseline). "
                        "Also outputs the booting noise, so the same image can be re-made or interpolated.",
            inputs=mark_advanced([
                BRIDGE_MODEL.Input("bridge_model", tooltip=_tip_model()),
                io.Image.Input("condition", tooltip="The input image: an edge map, a normal-map rendering, or the "
                                                    "photo to inpaint, depending on the model."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Random seed of the booting noise (image i of a batch uses seed + i)."),
                io.Combo.Input("sampler", options=list(SAMPLERS), default="dbim",
                               tooltip="dbim: fast, eta sets the randomness. dbim_high_order: deterministic, "
                                       "order 2 or 3. ddbm_heun: the original DDBM sampler, needs ~100+ NFE."),
                io.Float.Input("eta", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="dbim only: 0 = deterministic (best for translation); 1 = fully "
                                       "stochastic (can help inpainting at 50+ NFE)."),
                io.Float.Input("churn_step_ratio", default=0.33, min=0.0, max=0.99, step=0.01,
                               tooltip="ddbm_heun only: share of each step done as a random (SDE) step. 0.33 is "
                                       "DDBM's default; 0 makes it deterministic but collapses variety.",
                               display_name="churn (share of steps)"),
                *_common_inputs(),
                io.Boolean.Input("clip_denoised", default=True,
                                 tooltip="Clamp every prediction to the valid pixel range, as the reference does.",
                                 display_name="clip to [-1, 1]"),
                io.Boolean.Input("paste_known", default=False,
                                 tooltip="Inpainting only: copy the known pixels of the input into the result "
                                         "exactly (the reference leaves them as the model made them).",
                                 display_name="paste known pixels back"),
                io.Mask.Input("mask", optional=True,
                              tooltip="Inpainting models: 1 (white) = area to regenerate."),
                BRIDGE_LATENT.Input("latent", optional=True,
                                    tooltip="Booting noise from a Bridge Encode or an earlier run: replaces the "
                                            "seeded noise (reconstruct or edit an image)."),
            ], "clip_denoised"),
            outputs=[io.Image.Output(display_name="image", tooltip="The translated image(s)."),
                     BRIDGE_LATENT.Output(display_name="latent", tooltip="The booting noise that was used.")],
        )

    @classmethod
    def execute(cls, bridge_model, condition, seed, sampler, eta, churn_step_ratio, nfe, order, grid, size,
                class_label, clip_denoised, paste_known, mask=None, latent=None) -> io.NodeOutput:
        _check_options(sampler, eta, order, churn_step_ratio)
        run = _prepare(bridge_model, condition, mask, size, class_label, clip_denoised, who="Bridge Sampler")
        sched = bridge_model.preset.schedule
        noise_sampler = row_seeded_noise(seed, run.x_T)
        eps = noise_sampler()  # drawn even when a latent replaces it: the eta noise stays aligned with the seed
        if latent is not None:
            eps = _latent_noise(latent, run.x_T, "the latent")
        if sampler == "ddbm_heun":
            steps = heun_steps_for_nfe(nfe, churn_step_ratio)
            out = sample_ddbm_heun(run.denoiser, run.x_T, sched, steps, churn_step_ratio=churn_step_ratio,
                                   noise_sampler=noise_sampler, mask=run.mask,
                                   callback=_callback(heun_nfe(steps, churn_step_ratio)), disable=True)
        else:
            out = sample_dbim(run.denoiser, run.x_T, sched, dbim_steps_for_nfe(nfe), spacing=grid,
                              eta=eta if sampler == "dbim" else 0.0, order=order if sampler != "dbim" else 1,
                              noise=eps, noise_sampler=noise_sampler, mask=run.mask, callback=_callback(nfe),
                              disable=True)
        if paste_known and run.mask is not None:
            out = run.mask * out + (1 - run.mask) * run.original
        return io.NodeOutput(bridge_to_image(out), _latent(eps, bridge_model, nfe=nfe, grid=grid))


class BridgeEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}_BridgeEncode",
            display_name="Bridge Encode (DBIM inversion)",
            category=CAT,
            description="Finds the booting noise from which deterministic DBIM turns the condition into the "
                        "given target image (reconstruction error shrinks with NFE). Feed it to the Bridge "
                        "Sampler (latent) to reconstruct, or to Bridge Interpolate.",
            inputs=[
                BRIDGE_MODEL.Input("bridge_model", tooltip=_tip_model()),
                io.Image.Input("condition", tooltip="The condition image (edge map, normal map, masked photo)."),
                io.Image.Input("target", tooltip="The result image to encode, matching the condition."),
                *_common_inputs(),
                io.Mask.Input("mask", optional=True, tooltip="Inpainting models: 1 (white) = area to regenerate."),
            ],
            outputs=[BRIDGE_LATENT.Output(display_name="latent", tooltip="The booting noise of the target.")],
        )

    @classmethod
    def execute(cls, bridge_model, condition, target, nfe, order, grid, size, class_label, mask=None) -> io.NodeOutput:
        run = _prepare(bridge_model, condition, mask, size, class_label, who="Bridge Encode")
        check_finite(target, "Bridge Encode node", "target image")
        x0 = image_to_bridge(target)
        x0 = F.interpolate(x0, size=tuple(run.x_T.shape[-2:]), mode="bicubic", antialias=True).clamp(-1, 1) \
            if x0.shape[-2:] != run.x_T.shape[-2:] else x0
        if x0.shape[0] not in (1, run.x_T.shape[0]):
            raise ValueError(f"Bridge Encode: {x0.shape[0]} targets for {run.x_T.shape[0]} conditions.")
        x0 = x0.expand_as(run.x_T).to(run.x_T)
        eps = encode_dbim(run.denoiser, x0, run.x_T, bridge_model.preset.schedule, dbim_steps_for_nfe(nfe),
                          order=order, spacing=grid, mask=run.mask, callback=_callback(nfe), disable=True)
        return io.NodeOutput(_latent(eps, bridge_model, nfe=nfe, grid=grid, order=order))


class BridgeInterpolate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}_BridgeInterpolate",
            display_name="Bridge Interpolate (DBIM)",
            category=CAT,
            description="Frames between two results for the same condition: spherical interpolation between two "
                        "booting noises (from seeds or latents), each decoded with deterministic DBIM.",
            inputs=[
                BRIDGE_MODEL.Input("bridge_model", tooltip=_tip_model()),
                io.Image.Input("condition", tooltip="The condition image shared by all frames."),
                io.Int.Input("frames", default=8, min=2, max=256, tooltip="Number of frames, both ends included."),
                io.Int.Input("seed_a", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the first end (used when latent_a is not connected)."),
                io.Int.Input("seed_b", default=1, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the last end (used when latent_b is not connected)."),
                *_common_inputs(),
                io.Mask.Input("mask", optional=True, tooltip="Inpainting models: 1 (white) = area to regenerate."),
                BRIDGE_LATENT.Input("latent_a", optional=True, tooltip="Booting noise of the first end."),
                BRIDGE_LATENT.Input("latent_b", optional=True, tooltip="Booting noise of the last end."),
            ],
            outputs=[io.Image.Output(display_name="frames",
                                     tooltip="frames images per condition image, in order (condition-major).")],
        )

    @classmethod
    def execute(cls, bridge_model, condition, frames, seed_a, seed_b, nfe, order, grid, size, class_label,
                mask=None, latent_a=None, latent_b=None) -> io.NodeOutput:
        run = _prepare(bridge_model, condition, mask, size, class_label, who="Bridge Interpolate")
        ends = [_latent_noise(lat, run.x_T, name) if lat is not None else row_seeded_noise(seed, run.x_T)()
                for lat, seed, name in ((latent_a, seed_a, "latent_a"), (latent_b, seed_b, "latent_b"))]
        callback = _callback(nfe * frames)
        counter = {"done": 0}

        def per_frame(info):
            callback({**info, "i": counter["done"]})
            counter["done"] += 1

        outs = interpolate_dbim(run.denoiser, run.x_T, ends[0], ends[1], bridge_model.preset.schedule,
                                dbim_steps_for_nfe(nfe), frames, order=order, spacing=grid, mask=run.mask,
                                callback=per_frame, disable=True)
        video = torch.stack(outs, 1).flatten(0, 1)  # [B * frames, 3, H, W], condition-major
        return io.NodeOutput(bridge_to_image(video))


class BridgeEdgeMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}_BridgeEdgeMap",
            display_name="Bridge Edge Map (for edges->handbags)",
            category=CAT,
            description="Black edge lines on white from a photo or drawing (kornia Canny; kornia comes with "
                        "ComfyUI), the kind of condition the edges->handbags model expects. The dataset used HED "
                        "edges, so expect some mismatch.",
            inputs=[
                io.Image.Input("image", tooltip="A photo or drawing."),
                io.Float.Input("low_threshold", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Weaker edges above this are kept when they touch strong ones."),
                io.Float.Input("high_threshold", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Edges above this are always kept. Raise both for fewer lines."),
                io.Float.Input("blur_sigma", default=1.0, min=0.1, max=10.0, step=0.1,
                               tooltip="Smoothing before edge detection; larger ignores fine texture."),
                io.Int.Input("thickness", default=0, min=0, max=5,
                             tooltip="Thicken the lines by this many pixels (0 = one-pixel lines)."),
            ],
            outputs=[io.Image.Output(display_name="edges", tooltip="Black lines on white, same size.")],
        )

    @classmethod
    def execute(cls, image, low_threshold, high_threshold, blur_sigma, thickness) -> io.NodeOutput:
        try:
            import kornia
        except ImportError:  # optional: ComfyUI's requirements.txt installs it; the pack does not list it
            raise RuntimeError(
                "Bridge Edge Map needs kornia, which ComfyUI's own requirements.txt installs and this Python lacks. "
                "Install it into ComfyUI's Python with a version that fits your torch (kornia 0.9 needs torch >= "
                "2.5.1; 'pip install \"kornia>=0.7,<0.9\"' for older torch), or make the edge map elsewhere and "
                "load it as an image.") from None

        if low_threshold > high_threshold:
            raise ValueError("Bridge Edge Map: low_threshold must not exceed high_threshold.")
        x = image[..., :3].movedim(-1, 1).float()
        k = 2 * int(3 * blur_sigma) + 1
        height, width = x.shape[-2:]
        if k // 2 >= min(height, width):  # the blur pads by k // 2 on each side
            raise ValueError(f"Bridge Edge Map: blur_sigma {blur_sigma} needs a {k}x{k} blur, too large for the "
                             f"{width}x{height} image; use blur_sigma below {min(height, width) / 3:.3g} or a "
                             "larger image.")
        _, edges = kornia.filters.canny(kornia.color.rgb_to_grayscale(x), low_threshold, high_threshold,
                                        kernel_size=(k, k), sigma=(blur_sigma, blur_sigma))
        if thickness:
            kernel = torch.ones(2 * thickness + 1, 2 * thickness + 1, device=edges.device)
            edges = kornia.morphology.dilation(edges, kernel)
        return io.NodeOutput((1 - edges.clamp(0, 1)).expand(-1, 3, -1, -1).movedim(1, -1).contiguous())


def diode_normal_rendering(normals: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """DIODE's ``_normal.png`` rendering (preprocess_depth.py): invalid pixels set to the map's minimum,
    then (n - min n) / 2 clipped to [0, 1]. normals [B,3,H,W] unit vectors, valid [B,1,H,W] bool."""
    if valid is None:
        valid = normals.abs().sum(1, keepdim=True) > 0
    lowest = normals.amin(dim=(1, 2, 3), keepdim=True)
    n = torch.where(valid, normals, lowest)
    lowest = n.amin(dim=(1, 2, 3), keepdim=True)
    return ((n - lowest) / 2).clamp(0, 1)


class BridgeNormalMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}_BridgeNormalMap",
            display_name="Bridge Normal Map (DIODE rendering)",
            category=CAT,
            description="Re-renders an ordinary RGB normal map ((n + 1) / 2 encoding) the way the DIODE "
                        "normal->photo model saw its conditions: per-image offset (n - min n) / 2, invalid "
                        "pixels at the minimum. Use the flips to match axis conventions (check the result "
                        "against a DIODE sample: the reference does not document DIODE's axes).",
            inputs=[
                io.Image.Input("normal_map", tooltip="RGB normal map with n = 2 * rgb - 1 (OpenGL or DirectX style)."),
                io.Boolean.Input("flip_x", default=False, tooltip="Negate the x (red) component."),
                io.Boolean.Input("flip_y", default=False,
                                 tooltip="Negate the y (green) component: converts between OpenGL and DirectX maps."),
                io.Boolean.Input("flip_z", default=False, tooltip="Negate the z (blue) component."),
                io.Mask.Input("invalid", optional=True,
                              tooltip="1 where there is no valid normal (sky, missing depth)."),
            ],
            outputs=[io.Image.Output(display_name="condition", tooltip="The DIODE-style rendering.")],
        )

    @classmethod
    def execute(cls, normal_map, flip_x, flip_y, flip_z, invalid=None) -> io.NodeOutput:
        n = 2 * normal_map[..., :3].movedim(-1, 1).float() - 1
        signs = torch.tensor([-1.0 if f else 1.0 for f in (flip_x, flip_y, flip_z)], device=n.device)
        n = F.normalize(n * signs[:, None, None], dim=1)
        valid = None if invalid is None else (invalid.reshape(-1, 1, *invalid.shape[-2:]) < 0.5).to(n.device)
        return io.NodeOutput(diode_normal_rendering(n, valid).movedim(1, -1).contiguous())


def centre_mask(batch: int, height: int, width: int) -> torch.Tensor:
    """MASK [B,H,W]: 1 in the centre square rows/cols [H/4, 3H/4) (the ImageNet model's 128x128 hole of 256)."""
    m = torch.zeros(batch, height, width)
    m[:, height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1
    return m


class BridgeCentreMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}_BridgeCentreMask",
            display_name="Bridge Centre Mask (inpainting)",
            category=CAT,
            description="The centre-square hole the ImageNet inpainting model was trained on (the middle half "
                        "of each side), plus a preview of the condition with the hole greyed out.",
            inputs=[io.Image.Input("image", tooltip="The photo to inpaint (its size sets the mask size).")],
            outputs=[io.Mask.Output(display_name="mask", tooltip="1 = regenerate; connect to the Bridge Sampler."),
                     io.Image.Output(display_name="preview", tooltip="The image with the hole in mid-grey.")],
        )

    @classmethod
    def execute(cls, image) -> io.NodeOutput:
        m = centre_mask(*image.shape[:3]).to(image.device)
        return io.NodeOutput(m, image * (1 - m[..., None]) + 0.5 * m[..., None])


NODES = [BridgeModelLoader, BridgeSampler, BridgeEncode, BridgeInterpolate, BridgeEdgeMap, BridgeNormalMap,
         BridgeCentreMask]
