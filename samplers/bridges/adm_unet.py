"""The ADM (guided-diffusion) UNet of the DDBM / DBIM bridge checkpoints, in torch + einops.

Module names reproduce the released state dicts key for key (``time_embed``, ``label_emb``,
``input_blocks.i.j``, ``middle_block``, ``output_blocks``, ``out``; ResBlock ``in_layers`` /
``emb_layers`` / ``out_layers`` / ``skip_connection``; AttentionBlock ``norm`` / ``qkv`` /
``proj_out``), so ``load_state_dict(strict=True)`` accepts them. Attention 1x1 kernels load from
Conv1d ``[out, in, 1]`` (DBIM files) or Conv2d ``[out, in, 1, 1]`` (DDBM files). The qkv channel
layout is ``new`` ([3, heads, d]: DDBM's flash-attention models) or ``legacy`` ([heads, 3, d]:
OpenAI ADM, the ImageNet inpainting model) and cannot be read from the weights.
Spec: shared/specs/dbim.md section 5.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

ATTENTION_ORDERS = ("new", "legacy")


@dataclass(frozen=True)
class ADMConfig:
    image_size: int | None  # training resolution (None: unknown; any multiple of 2^(levels-1) runs)
    model_channels: int
    channel_mult: tuple
    num_res_blocks: int
    attention_ds: tuple  # downsample factors (1, 2, 4, ...) whose blocks have attention
    num_classes: int | None = None
    attention_order: str = "new"
    out_channels: int = 3
    condition_channels: int = 3  # x_T concatenated to the input (0: unconditional)
    num_head_channels: int = 64
    dropout: float = 0.0

    def __post_init__(self):
        if self.attention_order not in ATTENTION_ORDERS:
            raise ValueError(f"attention_order must be one of {ATTENTION_ORDERS}, got {self.attention_order!r}.")

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ADMConfig":
        d = dict(d)
        d["channel_mult"], d["attention_ds"] = tuple(d["channel_mult"]), tuple(d["attention_ds"])
        return cls(**d)


ADM_CONFIGS = {  # the released checkpoints (attention at resolutions 32, 16, 8)
    "e2h": ADMConfig(64, 192, (1, 2, 3, 4), 3, (2, 4, 8), attention_order="new", dropout=0.1),
    "diode": ADMConfig(256, 256, (1, 1, 2, 2, 4, 4), 2, (8, 16, 32), attention_order="new", dropout=0.1),
    "imagenet_inpaint": ADMConfig(256, 256, (1, 1, 2, 2, 4, 4), 2, (8, 16, 32), num_classes=1000,
                                  attention_order="legacy"),
}
# The toy edges-to-shapes model (16 x 16, attention at 8 x 8): its preset, its trainer in testbeds/bridges.py.
TOY_ADM_CONFIG = ADMConfig(16, 32, (1, 1), 1, (2,), num_head_channels=32)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in float32 whatever the weights' dtype."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).type(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ADM sinusoid in float32: [cos(t f_k), sin(t f_k)], f_k = exp(-ln(max_period) k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepSequential(nn.Sequential):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ResBlock(nn.Module):
    """Scale-shift-norm residual block; ``up`` / ``down`` resample inside (nearest x2 / avg-pool)."""

    def __init__(self, channels, emb_channels, out_channels=None, dropout=0.0, up=False, down=False):
        super().__init__()
        out_channels = out_channels or channels
        self.resample = (lambda v: F.interpolate(v, scale_factor=2, mode="nearest")) if up else \
            (lambda v: F.avg_pool2d(v, 2)) if down else None
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(32, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        if self.resample is not None:
            h = self.resample(self.in_layers[:-1](x))
            x = self.resample(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        scale, shift = self.emb_layers(emb).type(h.dtype)[..., None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        return self.skip_connection(x) + self.out_layers[1:](h)


class AttentionBlock(nn.Module):
    """Self-attention over positions with 1x1 qkv / output projections (Conv1d weights)."""

    def __init__(self, channels, head_channels=64, order="new"):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"attention channels {channels} not divisible by head channels {head_channels}")
        self.heads, self.order = channels // head_channels, order
        self.norm = GroupNorm32(32, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("qkv.weight", "proj_out.weight"):  # DDBM stores Conv2d kernels [out, in, 1, 1]
            w = state_dict.get(prefix + name)
            if w is not None and w.ndim == 4:
                state_dict[prefix + name] = w.squeeze(-1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x.reshape(b, c, -1)))
        pattern = "b (three h d) s -> three b h s d" if self.order == "new" else "b (h three d) s -> three b h s d"
        q, k, v = rearrange(qkv, pattern, three=3, h=self.heads)
        h = rearrange(F.scaled_dot_product_attention(q, k, v), "b h s d -> b (h d) s")
        return x + self.proj_out(h).reshape(b, c, hgt, wid)


class ADMUNet(nn.Module):
    """``forward(x, timesteps, xT=None, y=None)`` -> [B, out_channels, H, W]; x_T is concatenated
    to x on the channel axis (DDBM ``condition_mode=concat``), y are class labels."""

    def __init__(self, config: ADMConfig):
        super().__init__()
        self.config = cfg = config
        mc, emb_ch = cfg.model_channels, 4 * cfg.model_channels

        def attention(ch):
            return AttentionBlock(ch, cfg.num_head_channels, cfg.attention_order)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_ch)
        ch = int(cfg.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([TimestepSequential(
            nn.Conv2d(cfg.out_channels + cfg.condition_channels, ch, 3, padding=1))])
        skip_channels, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_ch, int(mult * mc), cfg.dropout)]
                ch = int(mult * mc)
                if ds in cfg.attention_ds:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(ResBlock(ch, emb_ch, ch, cfg.dropout, down=True)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(ResBlock(ch, emb_ch, dropout=cfg.dropout), attention(ch),
                                               ResBlock(ch, emb_ch, dropout=cfg.dropout))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_ch, int(mc * mult), cfg.dropout)]
                ch = int(mc * mult)
                if ds in cfg.attention_ds:
                    layers.append(attention(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(ResBlock(ch, emb_ch, ch, cfg.dropout, up=True))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(self, x, timesteps, xT=None, y=None):
        cfg = self.config
        if cfg.condition_channels:
            if xT is None:
                raise ValueError("This bridge network needs the condition image xT.")
            x = torch.cat([x, xT], dim=1)
        emb = self.time_embed(timestep_embedding(timesteps, cfg.model_channels).to(self.dtype))
        if cfg.num_classes is not None:
            if y is None:
                raise ValueError(f"This bridge network is class-conditional ({cfg.num_classes} classes): give labels y.")
            emb = emb + self.label_emb(y)
        h, skips = x.to(self.dtype), []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


# ---- state dicts -------------------------------------------------------------------------------

def squeeze_attention_kernels(state_dict: dict) -> dict:
    """DDBM -> DBIM layout (preprocess_ckpt.py): Conv2d attention kernels [o, i, 1, 1] to Conv1d [o, i, 1]."""
    return {k: (v.squeeze(-1) if v.ndim == 4 and k.endswith((".qkv.weight", ".proj_out.weight")) else v)
            for k, v in state_dict.items()}


def _block_index(keys, prefix):
    return sorted({int(k.split(".")[1]) for k in keys if k.startswith(prefix)})


def infer_adm_config(state_dict: dict, **overrides) -> ADMConfig:
    """Structure from the weights' names and shapes; ``overrides`` supply what the weights cannot
    tell (attention_order, num_head_channels, image_size). Raises ValueError for non-ADM files."""
    keys = list(state_dict)
    try:
        first = state_dict["input_blocks.0.0.weight"]
        out_ch = state_dict["out.2.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"Not an ADM / DDBM bridge UNet state dict (missing {err}).") from None
    mc = first.shape[0]
    outputs = _block_index(keys, "output_blocks.")
    up_blocks = [j for j in outputs if f"output_blocks.{j}.1.in_layers.0.weight" in state_dict
                 or f"output_blocks.{j}.2.in_layers.0.weight" in state_dict]
    per_level = (up_blocks[0] + 1) if up_blocks else len(outputs)
    levels = len(outputs) // per_level
    mult = [state_dict[f"output_blocks.{li * per_level}.0.out_layers.3.weight"].shape[0] / mc
            for li in range(levels)][::-1]
    attention_ds = sorted({2 ** ((i - 1) // per_level) for i in _block_index(keys, "input_blocks.")
                           if f"input_blocks.{i}.1.qkv.weight" in state_dict})
    label = state_dict.get("label_emb.weight")
    # the weights do not store the head width: DDBM's 64 where it divides every attention block, else
    # the largest width that does (one head in a 32-channel block, as the toy model)
    widths = [int(mc * mult[int(math.log2(ds))]) for ds in attention_ds if int(math.log2(ds)) < len(mult)]
    heads = math.gcd(64, *widths) if widths else 64
    fields = dict(image_size=None, model_channels=mc, channel_mult=tuple(int(m) if m == int(m) else m for m in mult),
                  num_res_blocks=per_level - 1, attention_ds=tuple(attention_ds),
                  num_classes=None if label is None else label.shape[0], out_channels=out_ch,
                  condition_channels=first.shape[1] - out_ch,
                  attention_order="legacy" if label is not None else "new", num_head_channels=heads)
    fields.update(overrides)
    return ADMConfig(**fields)


def matching_preset(config: ADMConfig, candidates: dict | None = None) -> str | None:
    """The name of the config among ``candidates`` (default: the released checkpoints) whose structure
    ``config`` has; image size, attention order and head width are not in the weights and are ignored."""
    for name, preset in (ADM_CONFIGS if candidates is None else candidates).items():
        if replace(config, image_size=preset.image_size, attention_order=preset.attention_order,
                   num_head_channels=preset.num_head_channels, dropout=preset.dropout) == preset:
            return name
    return None


def build_adm_unet(config: ADMConfig, state_dict: dict | None = None, device=None, dtype=None) -> ADMUNet:
    """An ADMUNet, loaded strictly from ``state_dict`` when given (any attention-kernel layout)."""
    if state_dict is None:
        net = ADMUNet(config)
    else:
        with torch.device("meta"):
            net = ADMUNet(config)
        net.load_state_dict(dict(state_dict), strict=True, assign=True)
    net.eval().requires_grad_(False)
    return net.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else net


def parameter_count(config: ADMConfig) -> int:
    """Parameters of the network (built on the meta device: no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in ADMUNet(config).parameters())
