"""How a bridge denoiser ``denoiser(x_t, t, x_T) -> x0_hat`` is called: the network wrapper with its
preconditioning (``BridgeDenoiser``), the inpainting mask over any denoiser, the [B] time tensor it
takes, and the one input check of the bridge samplers (DBIM in dbim.py, DDBM in ddbm.py)."""
from __future__ import annotations

import torch

from .schedule import BridgeSchedule


def check_finite(x: torch.Tensor, who: str, what: str = "condition image") -> None:
    """One host read before a run: NaN or infinity in an input would come out as a NaN image, silently."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{who}: the {what} contains NaN or infinity; check the nodes that made it (a failed "
                         "decode, a division by zero in an image operation).")


def masked(denoiser, mask):
    """Inpainting: keep the known pixels (mask 0) of x_T in every x0 prediction (mask 1 = hole)."""
    if mask is None:
        return denoiser

    def call(x_t, t, x_T):
        return mask * denoiser(x_t, t, x_T) + (1 - mask) * x_T

    return call


def time_dtype(x: torch.Tensor):
    return torch.float32 if x.device.type == "mps" else torch.float64


def bridge_times(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=time_dtype(x), device=x.device)


class BridgeDenoiser:
    """D(x_t, t, x_T) = c_skip x_t + c_out F(c_in x_t, c_noise, x_T[, y]) for a bridge network F
    (DDBM / DBIM UNets: x_T enters unscaled as extra channels). The network runs in its own dtype
    with an fp32 noise level; the result comes back in x_t's dtype, clamped to [-1, 1] when ``clip``."""

    def __init__(self, net, schedule: BridgeSchedule, class_labels: torch.Tensor | None = None,
                 clip: bool = True, dtype: torch.dtype | None = None):
        self.net, self.schedule, self.class_labels, self.clip = net, schedule, class_labels, clip
        self.dtype = dtype if dtype is not None else next(net.parameters()).dtype

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, x_T: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        c_skip, c_in, c_out, c_noise = (v.to(x_t.dtype).reshape(shape) for v in self.schedule.scalings(t))
        out = self.net((c_in * x_t).to(self.dtype), c_noise.reshape(-1).to(torch.float32), x_T.to(self.dtype),
                       y=self.class_labels)
        denoised = c_skip * x_t + c_out * out.to(x_t.dtype)
        return denoised.clamp(-1, 1) if self.clip else denoised
