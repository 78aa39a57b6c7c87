"""Bridge nodes: image-to-image translation and inpainting with DDBM / DBIM checkpoints (DBIM,
high-order DBIM, DDBM Heun), encoding to booting noise, interpolation, and pre-processing helpers.
The loader is in dbim_loader.py; the tensor preprocessing in samplers/bridges/images.py."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..samplers.bridges.schedule import SPACINGS, dbim_steps_for_nfe
from ..samplers.bridges.images import (
    SIZE_MODES, bridge_mask, centre_mask, edge_map, fit_target, fit_to_model, hole_preview, image_to_bridge,
    latent_noise, normal_map_condition, paste_known_pixels, work_dtype,
)
from ..samplers.bridges.images import bridge_to_image as _bridge_to_image
from ..samplers.bridges.dbim import (
    SAMPLERS, BridgeDenoiser, bridge_nfe, check_finite, encode_dbim, interpolate_dbim, row_seeded_noise, sample_bridge,
)
from .comfy_io import PREFIX, io, mark_advanced
from .dbim_loader import BRIDGE_LATENT, BRIDGE_MODEL, CAT, BridgeModel, BridgeModelLoader


def bridge_to_image(x: torch.Tensor) -> torch.Tensor:
    import comfy.model_management

    return _bridge_to_image(x, comfy.model_management.intermediate_device())


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
    x = fit_to_model(image_to_bridge(condition), preset, size_mode, preset.resize, "condition image")
    m = bridge_mask(mask, x, preset)
    mm.load_models_gpu([model.patcher], force_full_load=True)
    device = model.patcher.load_device
    dtype = work_dtype(device)
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
        io.Combo.Input("grid", options=list(SPACINGS), default="uniform_t",  # id "grid": saved workflows
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


# ---- nodes ---------------------------------------------------------------------------------------

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
        run = _prepare(bridge_model, condition, mask, size, class_label, clip_denoised, who="Bridge Sampler")
        noise_sampler = row_seeded_noise(seed, run.x_T)
        eps = noise_sampler()  # drawn even when a latent replaces it: the eta noise stays aligned with the seed
        if latent is not None:
            eps = latent_noise(latent["noise"], run.x_T, "the latent")
        try:
            out = sample_bridge(sampler, run.denoiser, run.x_T, bridge_model.preset.schedule, nfe, eta=eta,
                                order=order, churn_step_ratio=churn_step_ratio, spacing=grid, booting_noise=eps,
                                noise_sampler=noise_sampler, mask=run.mask,
                                callback=_callback(bridge_nfe(sampler, nfe, churn_step_ratio)), disable=True)
        except ValueError as err:  # an option out of range (ComfyUI 0.3.64 does not check V3 combos or ranges)
            raise ValueError(f"Bridge Sampler: {err}") from None
        if paste_known and run.mask is not None:
            out = paste_known_pixels(out, run.original, run.mask)
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
        x0 = fit_target(image_to_bridge(target), run.x_T)
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
        ends = [latent_noise(lat["noise"], run.x_T, name) if lat is not None else row_seeded_noise(seed, run.x_T)()
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
        return io.NodeOutput(edge_map(image, low_threshold, high_threshold, blur_sigma, thickness))


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
        return io.NodeOutput(normal_map_condition(normal_map, (flip_x, flip_y, flip_z), invalid))


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
        return io.NodeOutput(m, hole_preview(image, m))


NODES = [BridgeModelLoader, BridgeSampler, BridgeEncode, BridgeInterpolate, BridgeEdgeMap, BridgeNormalMap,
         BridgeCentreMask]
