"""DBIM (Zheng et al., arXiv 2405.15885) and the DDBM hybrid Heun sampler (Zhou et al., arXiv
2309.16948) for diffusion bridges, plus DBIM encoding, reconstruction and interpolation.

A bridge denoiser is ``denoiser(x_t, t, x_T) -> x0_hat`` with ``t`` a [B] tensor of bridge times
(``BridgeDenoiser`` wraps a network with its preconditioning; ``bridge_testbed.ExactBridgeModel``
is exact). Every DBIM step is ``x <- k x + cT x_T + w0 x0_s + w1 x0_u1 + w2 x0_u2 + omega z`` with
float64 scalars computed once per run (``plan_dbim``); the loops only call the denoiser and do
axpy updates. Spec: shared/specs/dbim.md sections 3, 4.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .bridge import BridgeSchedule, dbim_steps_for_nfe, heun_nfe, heun_steps_for_nfe
import numpy as np

from .common import progress, report, row_seeded_noise
from .multistep import StepRow, derivative_weights, run_rows

if TYPE_CHECKING:
    from .adm_unet import ADMConfig

SAMPLERS = ("dbim", "dbim_high_order", "ddbm_heun")


# ---- inputs and noise ------------------------------------------------------------------------------------

def check_finite(x: torch.Tensor, who: str, what: str = "condition image") -> None:
    """One host read before a run: NaN or infinity in an input would come out as a NaN image, silently."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{who}: the {what} contains NaN or infinity; check the nodes that made it (a failed "
                         "decode, a division by zero in an image operation).")


def slerp(eps_a: torch.Tensor, eps_b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation per sample (flattened); linear where the two are (nearly) parallel."""
    dtype = _time_dtype(eps_a)
    a, b = eps_a.flatten(1).to(dtype), eps_b.flatten(1).to(dtype)
    cos = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1)
    theta = torch.arccos(cos).unsqueeze(1)
    sin = torch.sin(theta)
    close = sin.abs() < 1e-6
    safe = torch.where(close, torch.ones_like(sin), sin)
    wa = torch.where(close, 1 - weight * torch.ones_like(sin), torch.sin((1 - weight) * theta) / safe)
    wb = torch.where(close, weight * torch.ones_like(sin), torch.sin(weight * theta) / safe)
    return (wa * a + wb * b).reshape(eps_a.shape).to(eps_a.dtype)


def _masked(denoiser, mask):
    """Inpainting: keep the known pixels (mask 0) of x_T in every x0 prediction (mask 1 = hole)."""
    if mask is None:
        return denoiser

    def call(x_t, t, x_T):
        return mask * denoiser(x_t, t, x_T) + (1 - mask) * x_T

    return call


def _time_dtype(x: torch.Tensor):
    return torch.float32 if x.device.type == "mps" else torch.float64


def _times(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=_time_dtype(x), device=x.device)


# ---- the DBIM plan --------------------------------------------------------------------------------

@dataclass(frozen=True)
class DBIMStep:
    t: float  # the model is evaluated at this time (s)
    t_next: float
    k: float  # weight of x_s
    cT: float  # weight of x_T
    w: tuple  # weights of x0_hat at s, u1, u2 (the last three evaluations)
    noise: float  # std of the fresh noise (omega; 0 on the last step and for eta = 0)
    order: int


def _phis(h: float):
    """phi_1 = 1 - e^-h, phi_2 = e^-h + h - 1, phi_3 = h^2/2 - h + 1 - e^-h (expm1, no cancellation)."""
    em1 = math.expm1(-h)
    return -em1, em1 + h, h * h / 2 - h - em1


def plan_dbim(schedule: BridgeSchedule, ts, eta: float = 0.0, order: int = 1,
              lower_order_final: bool = True) -> list[DBIMStep]:
    """Coefficients of DBIM over the grid ``ts`` (float64 host math).

    Order 1 is DBIM with stochasticity ``eta`` in [0, 1]:
        x_t = a_t x_T + b_t x0 + sqrt(c_t^2 - omega^2) eps_hat + omega z,
        omega = eta alpha_t rho_t sqrt(1 - rho_t^2 / rho_s^2).
    Orders 2, 3 are the exponential multistep solvers of the DBIM ODE in lambda = log(b/c)
    (eta = 0): x_t = (c_t/c_s) x_s + (a_t - (c_t/c_s) a_s) x_T + b_t [phi_1 x0_s + phi_2 D1 + phi_3 D2].
    The first step is order 1, order 3 uses order 2 on step 2, and (``lower_order_final``) the last
    step is order 1, as the reference. A grid of increasing times gives the inverse map (encoding)."""
    if order not in (1, 2, 3):
        raise ValueError(f"DBIM: order must be 1, 2 or 3, got {order}.")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DBIM: eta must be in [0, 1] (eta > 1 makes c_t^2 - omega^2 negative), got {eta}.")
    if order > 1 and eta != 0.0:
        raise ValueError("DBIM: the high-order solvers (order 2, 3) are deterministic; use eta = 0.")
    ts = torch.as_tensor(ts, dtype=torch.float64).cpu()
    if ts.numel() < 2:
        raise ValueError("DBIM: the grid needs at least two times.")
    ascending = bool(ts[-1] > ts[0])
    if eta > 0 and ascending:
        raise ValueError("DBIM: eta > 0 has no inverse; encode with eta = 0.")
    a, b, c = (v.tolist() for v in schedule.abc(ts))
    alpha, rho, _ = (v.tolist() for v in schedule.alpha_rho(ts))
    lam = [math.log(bi) - math.log(ci) for bi, ci in zip(b, c)]
    last = len(ts) - 2
    steps = []
    for n in range(last + 1):
        s, t = n, n + 1
        step_order = 1 if n == 0 or (lower_order_final and n == last) else min(order, n + 1)
        if eta > 0:
            omega = eta * alpha[t] * rho[t] * math.sqrt(max(1 - rho[t] ** 2 / rho[s] ** 2, 0.0))
            var = c[t] ** 2 - omega**2
            if var < -1e-12 * c[t] ** 2:
                raise ValueError(f"DBIM: c_t^2 - omega^2 < 0 at t = {float(ts[t])} (eta = {eta}).")
            k = math.sqrt(max(var, 0.0)) / c[s]
        else:
            omega, k = 0.0, c[t] / c[s]
        w = [0.0, 0.0, 0.0]
        if step_order == 1:
            w[0] = b[t] - k * b[s]
        else:  # derivatives in lambda of the polynomial through the last step_order outputs
            phi1, phi2, phi3 = _phis(lam[t] - lam[s])
            d1, d2 = np.zeros(3), np.zeros(3)
            d1[:step_order], d2[:step_order] = derivative_weights(lam[s::-1][:step_order], lam[s], 2)
            w = [b[t] * (phi1 * (j == 0) + phi2 * d1[j] + phi3 * d2[j]) for j in range(3)]
        steps.append(DBIMStep(t=float(ts[s]), t_next=float(ts[t]), k=k, cT=a[t] - k * a[s], w=tuple(w),
                              noise=omega if n < last else 0.0, order=step_order))
    return steps


def _run_plan(denoiser, x, x_T, plan, noise_sampler, callback, first_index, disable):
    rows = [StepRow(step.t, step.t_next, A=step.k, W=step.w, C=step.cT, E=step.noise, draw=step.noise != 0.0,
                    order=step.order) for step in plan]
    shifted = None if callback is None else (lambda d: callback({**d, "i": d["i"] + first_index}))
    return run_rows(None, x, rows, callback=shifted, disable=disable, constant=x_T,
                    noise_sampler=None if noise_sampler is None else (lambda sigma, sigma_next: noise_sampler()),
                    call=lambda x_t, row: denoiser(x_t, _times(x_t, row.sigma), x_T))


def _grid(schedule, steps, ts, spacing):
    if ts is not None:
        return torch.as_tensor(ts, dtype=torch.float64).cpu()
    if steps is None:
        raise ValueError("DBIM: give steps (NFE - 1) or an explicit grid ts.")
    return schedule.dbim_grid(int(steps), spacing)


# ---- samplers ---------------------------------------------------------------------------------

@torch.no_grad()
def sample_dbim(denoiser, x_T: torch.Tensor, schedule: BridgeSchedule, steps: int | None = None, *,
                eta: float = 0.0, order: int = 1, spacing: str = "uniform_t", ts=None, noise=None,
                noise_sampler=None, seed: int = 0, mask=None, lower_order_final: bool = True,
                callback=None, disable=None) -> torch.Tensor:
    """DBIM from the condition x_T: NFE = steps + 1 (one call at T, then one per step).

    ``noise``: the booting noise (the latent of eta = 0 sampling); drawn from ``noise_sampler``
    when None (default: per-row generators seeded seed + i; the booting noise is their first draw,
    eta noise the following draws). ``mask`` [B,1,H,W] (1 = regenerate) for inpainting models.
    ``order`` 2, 3: high-order DBIM (eta must be 0). Returns x at t_min (not clamped)."""
    check_finite(x_T, "DBIM")
    ts = _grid(schedule, steps, ts, spacing)
    plan = plan_dbim(schedule, ts, eta, order, lower_order_final)
    denoiser = _masked(denoiser, mask)
    if noise_sampler is None:
        noise_sampler = row_seeded_noise(seed, x_T)
    eps = noise_sampler() if noise is None else noise.to(x_T.device, x_T.dtype)
    a, b, c = (float(v) for v in schedule.abc(ts[:1]))
    x0 = denoiser(x_T, _times(x_T, schedule.t_max), x_T)
    report(callback, 0, x_T, schedule.t_max, x0)
    x = a * x_T + b * x0 + c * eps  # the eta = 1 step out of T: the booting noise enters here
    return _run_plan(denoiser, x, x_T, plan, noise_sampler, callback, 1, disable)


@torch.no_grad()
def encode_dbim(denoiser, x_0: torch.Tensor, x_T: torch.Tensor, schedule: BridgeSchedule,
                steps: int | None = None, *, order: int = 1, spacing: str = "uniform_t", ts=None, mask=None,
                callback=None, disable=None) -> torch.Tensor:
    """The booting noise whose eta = 0 DBIM decode is x_0 (inversion on the same grid, NFE = steps + 1)."""
    check_finite(x_T, "DBIM encode")
    check_finite(x_0, "DBIM encode", "target image")
    ts = _grid(schedule, steps, ts, spacing)
    plan = plan_dbim(schedule, ts.flip(0), 0.0, order)
    denoiser = _masked(denoiser, mask)
    x = _run_plan(denoiser, x_0.to(x_T.dtype), x_T, plan, None, callback, 0, disable)
    x0 = denoiser(x_T, _times(x_T, schedule.t_max), x_T)
    report(callback, len(plan), x, schedule.t_max, x0)
    a, b, c = (float(v) for v in schedule.abc(ts[:1]))
    return (x - a * x_T - b * x0) / c


def interpolate_dbim(denoiser, x_T: torch.Tensor, eps_a: torch.Tensor, eps_b: torch.Tensor,
                     schedule: BridgeSchedule, steps: int, frames: int, **options) -> list[torch.Tensor]:
    """eta = 0 decodes of slerp(eps_a, eps_b; i / (frames - 1)), i = 0..frames-1."""
    weights = [0.0] if frames == 1 else [i / (frames - 1) for i in range(frames)]
    return [sample_dbim(denoiser, x_T, schedule, steps, noise=slerp(eps_a, eps_b, w), eta=0.0, **options)
            for w in weights]


def _drift(schedule: BridgeSchedule, ts, stochastic: bool):
    """Weights (P, S, R, g^2) of DDBM's drift at times ts written around x_T: d = P (x - x_T) + S x_T + R D,
    from d = f x - g^2 (m s - h), s = -(x - a x_T - b D)/c^2, h = -(x - (alpha/alpha_T) x_T)/(alpha rho_bar)^2,
    m = 1 (reverse SDE) or 1/2 (probability-flow ODE); dt already scaled (i2sb: x 999). Near T, P ~ -5000
    multiplies x and the x_T weight P + Q ~ +5000 nearly cancels it: S = P + Q is formed here in float64,
    so a float32 latent only ever meets P through the small x - x_T."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    f, g2 = schedule.f_g2(ts)
    alpha, _, rho_bar = schedule.alpha_rho(ts)
    a, b, c = schedule.abc(ts)
    m = 1.0 if stochastic else 0.5
    inv_h = 1 / (alpha * rho_bar) ** 2
    P = f + g2 * (m / c**2 - inv_h)
    Q = -g2 * m * a / c**2 + g2 * (alpha / schedule.alpha_T) * inv_h
    R = -g2 * m * b / c**2
    return P.tolist(), (P + Q).tolist(), R.tolist(), g2.tolist()


@torch.no_grad()
def sample_ddbm_heun(denoiser, x_T: torch.Tensor, schedule: BridgeSchedule, steps: int, *,
                     churn_step_ratio: float = 0.33, rho: float = 7.0, noise_sampler=None, seed: int = 0,
                     mask=None, callback=None, disable=None) -> torch.Tensor:
    """DDBM's hybrid sampler: per step an Euler-Maruyama step of the bridge SDE over a fraction
    ``churn_step_ratio`` of the step, then a Heun step of the probability-flow ODE (Euler on the
    last step, to t = 0). Starts at x = x_T; NFE = 3 steps - 1 (churn > 0) or 2 steps - 1.
    The state is carried as u = x - x_T (the drift's large weights act on it; see ``_drift``)."""
    if not 0.0 <= churn_step_ratio < 1.0:
        raise ValueError(f"DDBM Heun: churn_step_ratio must be in [0, 1), got {churn_step_ratio}.")
    check_finite(x_T, "DDBM Heun")
    ts = schedule.heun_grid(int(steps), rho).tolist()
    scale = schedule.heun_time_scale
    churn = churn_step_ratio > 0
    t_hats = [t + churn_step_ratio * (t_next - t) for t, t_next in zip(ts[:-1], ts[1:])] if churn else ts[:-1]
    sde = _drift(schedule, ts[:-1], True)
    ode_hat = _drift(schedule, t_hats, False)
    ode_next = _drift(schedule, [max(t, schedule.t_min) for t in ts[1:]], False)  # unused where t_next = 0
    denoiser = _masked(denoiser, mask)
    if noise_sampler is None and churn:
        noise_sampler = row_seeded_noise(seed, x_T)
    u = torch.zeros_like(x_T)
    call = 0
    for i in progress(len(ts) - 1, disable):
        t, t_hat, t_next = ts[i], t_hats[i], ts[i + 1]
        if churn:
            x = x_T + u
            x0 = denoiser(x, _times(x, t), x_T)
            report(callback, call, x, t, x0)
            call += 1
            dt = (t_hat - t) * scale
            u = u + (sde[0][i] * u + sde[1][i] * x_T + sde[2][i] * x0) * dt \
                + (math.sqrt(abs(dt) * sde[3][i]) * noise_sampler())
        x = x_T + u
        x0 = denoiser(x, _times(x, t_hat), x_T)
        report(callback, call, x, t_hat, x0)
        call += 1
        dt = (t_next - t_hat) * scale
        d1 = ode_hat[0][i] * u + ode_hat[1][i] * x_T + ode_hat[2][i] * x0
        if t_next == 0.0:
            u = u + d1 * dt
            continue
        u_pred = u + d1 * dt
        x_pred = x_T + u_pred
        x0 = denoiser(x_pred, _times(x, t_next), x_T)
        report(callback, call, x_pred, t_next, x0)
        call += 1
        d2 = ode_next[0][i] * u_pred + ode_next[1][i] * x_T + ode_next[2][i] * x0
        u = u + 0.5 * (d1 + d2) * dt
    return x_T + u


def bridge_nfe(sampler: str, nfe: int, churn_step_ratio: float = 0.33) -> int:
    """Model calls ``sample_bridge`` makes for a budget of ``nfe`` (DDBM Heun rounds to whole steps)."""
    return heun_nfe(heun_steps_for_nfe(nfe, churn_step_ratio), churn_step_ratio) if sampler == "ddbm_heun" else nfe


def sample_bridge(sampler: str, denoiser, x_T: torch.Tensor, schedule: BridgeSchedule, nfe: int, *,
                  eta: float = 0.0, order: int = 1, churn_step_ratio: float = 0.33, spacing: str = "uniform_t",
                  noise=None, noise_sampler=None, mask=None, callback=None, disable=None) -> torch.Tensor:
    """The Bridge Sampler's choice at ``nfe`` model calls: ``dbim`` (order 1, ``eta``), ``dbim_high_order``
    (``order`` 2 or 3, eta 0) or ``ddbm_heun`` (``churn_step_ratio``; ``noise`` unused). Every option is
    checked here or in the sampler it picks."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
    if sampler == "ddbm_heun":
        return sample_ddbm_heun(denoiser, x_T, schedule, heun_steps_for_nfe(nfe, churn_step_ratio),
                                churn_step_ratio=churn_step_ratio, noise_sampler=noise_sampler, mask=mask,
                                callback=callback, disable=disable)
    if sampler == "dbim_high_order" and order not in (2, 3):
        raise ValueError(f"high-order DBIM needs order 2 or 3, got {order}.")
    return sample_dbim(denoiser, x_T, schedule, dbim_steps_for_nfe(nfe), spacing=spacing,
                       eta=eta if sampler == "dbim" else 0.0, order=order if sampler != "dbim" else 1, noise=noise,
                       noise_sampler=noise_sampler, mask=mask, callback=callback, disable=disable)


# ---- the network denoiser ------------------------------------------------------------------------

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


# ---- presets and checkpoint files ----------------------------------------------------------------

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
    from .adm_unet import ADM_CONFIGS
    from .bridge import SCHEDULE_PRESETS
    from .bridge_testbed import toy_adm_config

    presets = {
        "e2h": BridgePreset("e2h", ADM_CONFIGS["e2h"], SCHEDULE_PRESETS["vp"], "translate", "bicubic"),
        "diode": BridgePreset("diode", ADM_CONFIGS["diode"], SCHEDULE_PRESETS["vp"], "translate", "nearest"),
        "imagenet_inpaint": BridgePreset("imagenet_inpaint", ADM_CONFIGS["imagenet_inpaint"], SCHEDULE_PRESETS["i2sb"],
                                         "inpaint", "bicubic"),
        "toy_shapes16": BridgePreset("toy_shapes16", toy_adm_config(), SCHEDULE_PRESETS["vp"], "translate", "nearest"),
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
    from .bridge import SCHEDULE_PRESETS

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
    from .files import atomic_save_safetensors

    try:
        atomic_save_safetensors(squeeze_attention_kernels(state_dict), path, metadata={METADATA_KEY: preset.to_json()})
    except FileExistsError:  # there already, or appeared while writing: left untouched
        return False
    return True
