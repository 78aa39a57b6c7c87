"""A small learned diffusion model of scikit-learn's 8x8 digits, in two parametrisations.

``load_digits_model("ve")`` is an eps-prediction network (x = x0 + sigma eps, SD1.5's sigma range
0.0292 ... 14.615, like ComfyUI's EPS models), ``load_digits_model("flow")`` a rectified-flow velocity
network (x = (1 - t) x0 + t eps, t = sigma, trained on all of [0, 1]; ``sigma_min`` = 0.003 is
ComfyUI's shift-3 minimum). Both are served as k-diffusion x0-denoisers like
``testbeds.mixtures.ExactModel``: ``model(x, sigma_batch) -> denoised``, with ``denoised = x - sigma *
prediction`` in both cases. The weights are trained once by ``scripts/train_digits_model.py``; loading
needs only torch and safetensors.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..samplers.schedule import NoiseSchedule

DIM = 64
FILES = {"ve": "digits_eps.safetensors", "flow": "digits_flow.safetensors"}
FORMAT = "comfyui_fast_samplers.digits/1"


class DigitsNet(torch.nn.Module):
    """MLP on [x_in, c_noise, sin/cos(pi 2^k c_noise)] (``depth`` SiLU layers of ``width``, linear out)
    plus a linear skip from x_in: at high noise both targets (eps, v) are close to linear in x."""

    def __init__(self, width: int = 256, depth: int = 4, frequencies: int = 6):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(frequencies), persistent=False)
        sizes = [DIM + 1 + 2 * frequencies] + [width] * depth
        layers = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [torch.nn.Linear(n_in, n_out), torch.nn.SiLU()]
        self.mlp = torch.nn.Sequential(*layers, torch.nn.Linear(width, DIM))
        self.skip = torch.nn.Linear(DIM, DIM, bias=False)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise[:, None] * self.freqs
        return self.mlp(torch.cat([x_in, c_noise[:, None], angles.sin(), angles.cos()], dim=-1)) + self.skip(x_in)


class DigitsModel:
    """k-diffusion denoiser ``model(x, sigma, **extra_args) -> x0`` around a ``DigitsNet``.

    ``x``: any shape [B, ...] with 64 values per sample ([B, 64], [B, 1, 8, 8]); the output has x's
    shape, dtype and device, the network runs in float32. "ve": the net predicts eps from
    (x / sqrt(sigma^2 + sigma_data^2), log(sigma) / 4); "flow": it predicts v = eps - x0 from (x, t).
    ``calls`` counts evaluations (NFE); ``data_scaling`` = {"scale", "offset"} with x0 = scale *
    pixels + offset (pixels 0..16); ``data_mean`` / ``data_std`` are the training set's per-pixel
    statistics in those units."""

    def __init__(self, net: DigitsNet, parametrization: str, sigma_min: float, sigma_max: float,
                 sigma_data: float, data_scaling: dict, data_mean: torch.Tensor, data_std: torch.Tensor,
                 metadata: dict | None = None):
        if parametrization not in FILES:
            raise ValueError(f"Unknown digits model {parametrization!r}; choose one of {sorted(FILES)}.")
        self.net = net
        self.parametrization = parametrization
        self.schedule = NoiseSchedule(parametrization)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.data_scaling = data_scaling
        self.data_mean, self.data_std = data_mean, data_std
        self.metadata = metadata or {}
        self.calls = 0

    def predict(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The network's raw output (eps for "ve", velocity for "flow") for float32 x [B, 64], sigma [B]."""
        if self.parametrization == "ve":
            c_in = torch.rsqrt(sigma**2 + self.sigma_data**2)
            return self.net(x * c_in[:, None], torch.log(sigma) / 4)
        return self.net(x, sigma)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        self.calls += 1
        flat = x.reshape(x.shape[0], -1).to(torch.float32)
        if flat.shape[1] != DIM:
            raise ValueError(f"The digits model needs {DIM} values per sample, got x of shape {tuple(x.shape)}.")
        sigma = torch.as_tensor(sigma).to(x.device, torch.float32).reshape(-1).expand(x.shape[0])
        self.net.to(x.device)
        with torch.no_grad():
            denoised = flat - sigma[:, None] * self.predict(flat, sigma)
        return denoised.reshape(x.shape).to(x.dtype)


def default_path(parametrization: str) -> Path:
    """The shipped weights file of "ve" or "flow"."""
    if parametrization not in FILES:
        raise ValueError(f"Unknown digits model {parametrization!r}; choose one of {sorted(FILES)}.")
    return Path(__file__).with_name(FILES[parametrization])


def load_digits_model(parametrization: str, path=None) -> DigitsModel:
    """The trained digits model "ve" (eps prediction) or "flow" (velocity), from the shipped
    safetensors or ``path``. Raises ValueError for an unknown name or a missing / corrupt file."""
    from safetensors import safe_open

    path = Path(path) if path is not None else default_path(parametrization)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key).to(torch.float32) for key in f.keys()}
        if meta.get("format") != FORMAT or meta.get("parametrization") != parametrization:
            raise ValueError(f"format {meta.get('format')!r}, parametrization {meta.get('parametrization')!r}")
        net = DigitsNet(**json.loads(meta["network"]))
        net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")})
        model = DigitsModel(net.eval(), parametrization, float(meta["sigma_min"]), float(meta["sigma_max"]),
                            float(meta["sigma_data"]), json.loads(meta["data_scaling"]),
                            tensors["data.mean"], tensors["data.std"], meta)
    except Exception as err:  # safetensors, JSON and state-dict errors all mean the same to the caller
        raise ValueError(
            f"Cannot load the digits {parametrization!r} model from {path} ({err}); "
            "re-create it with scripts/train_digits_model.py."
        ) from err
    return model
