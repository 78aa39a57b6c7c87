"""Image preprocessing for the bridge nodes, in pure torch (no ComfyUI import): IMAGE <-> bridge tensors,
resizing to the model, masks, paste-known, the DIODE normal rendering, the centre mask and the edge map.

ComfyUI's IMAGE is [B,H,W,C] in 0..1, MASK [B,H,W]; a bridge tensor is [B,3,H,W] in -1..1."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

SIZE_MODES = ("resize_to_model", "keep")
log = logging.getLogger(__name__)


def image_to_bridge(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B,H,W,C] in 0..1 -> [B,3,H,W] in -1..1 on the CPU, float64 (grey replicated, alpha dropped);
    bridge_to_image inverts it exactly."""
    x = image[..., :3] if image.shape[-1] >= 3 else image[..., :1].expand(*image.shape[:-1], 3)
    return 2 * x.movedim(-1, 1).to("cpu", torch.float64) - 1


def bridge_to_image(x: torch.Tensor, device="cpu") -> torch.Tensor:
    """[B,3,H,W] in -1..1 -> IMAGE [B,H,W,3] float32 in 0..1 (clamped) on ``device``."""
    x = x.to("cpu", torch.float64)
    return ((x + 1) / 2).clamp(0, 1).movedim(1, -1).float().to(device)


def fit_to_model(x: torch.Tensor, preset, size_mode: str, method: str, what: str) -> torch.Tensor:
    """resize_to_model: scale x to the preset's training size (``method`` nearest or bicubic, the latter
    antialiased and clamped to [-1, 1]); keep: check the sides divide by the model's multiple."""
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


def bridge_mask(mask, x: torch.Tensor, preset):
    """MASK [B,H,W] or None -> [B,1,H,W] of 0 / 1 (1 = regenerate) at x's size and dtype (nearest resize,
    threshold 0.5), or None for translation models; checks that mask and model task agree."""
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


def work_dtype(device) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS has no float64


def paste_known_pixels(sample: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sample where mask = 1 (the hole), the original where mask = 0 (the known pixels)."""
    return mask * sample + (1 - mask) * original


def fit_target(target: torch.Tensor, like: torch.Tensor, who: str = "Bridge Encode") -> torch.Tensor:
    """A bridge tensor target resized (bicubic, antialiased, clamped) to ``like``'s size and broadcast to its
    batch, in its dtype and device."""
    if target.shape[-2:] != like.shape[-2:]:
        target = F.interpolate(target, size=tuple(like.shape[-2:]), mode="bicubic", antialias=True).clamp(-1, 1)
    if target.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"{who}: {target.shape[0]} targets for {like.shape[0]} conditions.")
    return target.expand_as(like).to(like)


def latent_noise(noise: torch.Tensor, like: torch.Tensor, what: str) -> torch.Tensor:
    """Booting noise of a bridge latent, broadcast from batch 1, checked against the condition ``like``."""
    if noise.shape[0] == 1 and like.shape[0] > 1:
        noise = noise.expand(like.shape[0], -1, -1, -1)
    if tuple(noise.shape) != tuple(like.shape):
        raise ValueError(f"Bridge: {what} has shape {tuple(noise.shape)} but the condition needs {tuple(like.shape)} "
                         "(same batch and resolution as when it was made).")
    return noise.to(like.device, like.dtype)


# ---- condition images ------------------------------------------------------------------------------

def diode_normal_rendering(normals: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """DIODE's ``_normal.png`` rendering (preprocess_depth.py): invalid pixels set to the map's minimum,
    then (n - min n) / 2 clipped to [0, 1]. normals [B,3,H,W] unit vectors, valid [B,1,H,W] bool."""
    if valid is None:
        valid = normals.abs().sum(1, keepdim=True) > 0
    lowest = normals.amin(dim=(1, 2, 3), keepdim=True)
    n = torch.where(valid, normals, lowest)
    lowest = n.amin(dim=(1, 2, 3), keepdim=True)
    return ((n - lowest) / 2).clamp(0, 1)


def normal_map_condition(normal_map: torch.Tensor, flips=(False, False, False), invalid=None) -> torch.Tensor:
    """IMAGE of an RGB normal map (n = 2 rgb - 1), components negated where ``flips`` (x, y, z), renormalised,
    -> IMAGE of its DIODE rendering; ``invalid`` MASK: 1 where there is no valid normal."""
    n = 2 * normal_map[..., :3].movedim(-1, 1).float() - 1
    signs = torch.tensor([-1.0 if f else 1.0 for f in flips], device=n.device)
    n = F.normalize(n * signs[:, None, None], dim=1)
    valid = None if invalid is None else (invalid.reshape(-1, 1, *invalid.shape[-2:]) < 0.5).to(n.device)
    return diode_normal_rendering(n, valid).movedim(1, -1).contiguous()


def centre_mask(batch: int, height: int, width: int) -> torch.Tensor:
    """MASK [B,H,W]: 1 in the centre square rows/cols [H/4, 3H/4) (the ImageNet model's 128x128 hole of 256)."""
    m = torch.zeros(batch, height, width)
    m[:, height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1
    return m


def hole_preview(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """IMAGE with the mask's hole (MASK = 1) in mid-grey."""
    return image * (1 - mask[..., None]) + 0.5 * mask[..., None]


def edge_map(image: torch.Tensor, low_threshold: float, high_threshold: float, blur_sigma: float,
             thickness: int) -> torch.Tensor:
    """IMAGE -> IMAGE of black Canny edge lines (kornia) on white, lines dilated by ``thickness`` pixels."""
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
    return (1 - edges.clamp(0, 1)).expand(-1, 3, -1, -1).movedim(1, -1).contiguous()
