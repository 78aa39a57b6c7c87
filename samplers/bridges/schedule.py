"""Diffusion-bridge schedules: the one place a_t, b_t, c_t of a bridge are computed.

A bridge pins the forward diffusion ``p(x_t | x_0) = N(alpha_t x_0, sigma_t^2)`` at x_T
(Doob h-transform). With rho_t = sigma_t / alpha_t and rho_bar_t^2 = rho_T^2 - rho_t^2,

    q(x_t | x_0, x_T) = N(a_t x_T + b_t x_0, c_t^2),
    a_t = (alpha_t / alpha_T) rho_t^2 / rho_T^2,  b_t = alpha_t rho_bar_t^2 / rho_T^2,
    c_t = alpha_t rho_bar_t rho_t / rho_T.

Kinds (time runs from t = 0, the target, to t = T, the condition):

* ``"vp"``   DDBM VP bridge: alpha_t = exp(-beta_min t/2 - beta_d t^2/4), rho_t^2 = 1/alpha_t^2 - 1, T = 1.
* ``"ve"``   DDBM VE bridge: alpha = 1, rho_t = t, T = sigma_max.
* ``"i2sb"`` I2SB-style discrete bridge (the ImageNet inpainting model): 1000 indices i = round(999 t),
             symmetric betas, rho_t = std_fwd[i], rho_bar_t = std_bwd[i] (includes beta_i).

Also here: the network preconditioning of each kind (DDBM's EDM-style scalings, I2SB's noise
residual) and the sampling grids of DBIM and of the DDBM Heun sampler. All arithmetic float64
on the device of ``t``. Spec: shared/specs/dbim.md sections 1-3.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..schedule import karras_sigmas

BRIDGE_KINDS = ("vp", "ve", "i2sb")
SPACINGS = ("uniform_t", "karras")  # how DBIM places its times (the option ``spacing``)
GRIDS = SPACINGS  # the old name
DBIM_END_OFFSET = 1e-3  # DBIM's grid starts at t_max - 1e-3 (get_sigmas_uniform in the reference)
HEUN_END_OFFSET = 1e-4  # DDBM Heun's grid starts at t_max - 1e-4


@functools.lru_cache(maxsize=8)
def _i2sb_tables(n: int, beta_min: float, beta_max: float, device: str, dtype: torch.dtype = torch.float64):
    """(betas, std_fwd, std_bwd, c_noise levels) of the I2SB schedule, computed in float64, on ``device``."""
    betas = torch.linspace((beta_min / n) ** 0.5, (beta_max / n) ** 0.5, n, dtype=torch.float64) ** 2
    betas = torch.cat([betas[: n // 2], torch.flip(betas[: n // 2], (0,))])
    std_fwd = torch.cumsum(betas, 0).sqrt()
    std_bwd = torch.flip(torch.cumsum(torch.flip(betas, (0,)), 0), (0,)).sqrt()
    levels = torch.linspace(1e-4, 1.0, n, dtype=torch.float64) * n
    return tuple(v.to(device, dtype) for v in (betas, std_fwd, std_bwd, levels))


@dataclass(frozen=True)
class BridgeSchedule:
    """One bridge process and its network preconditioning (DDBM for vp/ve, I2SB for i2sb)."""

    kind: str = "vp"
    beta_d: float = 2.0  # vp
    beta_min: float = 0.1  # vp, i2sb
    beta_max: float = 1.0  # i2sb
    sigma_max: float = 80.0  # ve: T
    t_min: float = 1e-4
    n_timestep: int = 1000  # i2sb
    sigma_data: float = 0.5  # DDBM preconditioning: sigma_0 = sigma_T = sigma_data
    cov_xy: float = 0.0

    def __post_init__(self):
        if self.kind not in BRIDGE_KINDS:
            raise ValueError(f"Unknown bridge schedule {self.kind!r}; choose one of {BRIDGE_KINDS}.")
        if not 0 < self.t_min < self.t_max:
            raise ValueError(f"Bridge schedule: need 0 < t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}.")

    @property
    def t_max(self) -> float:
        return self.sigma_max if self.kind == "ve" else 1.0

    # ---- the process ------------------------------------------------------------------------
    def _t(self, t) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.device.type == "mps":  # MPS has no float64
            return t.to(torch.float32)
        return torch.as_tensor(t, dtype=torch.float64)

    def _index(self, t: torch.Tensor) -> torch.Tensor:
        return ((self.n_timestep - 1) * t).round().long().clamp(0, self.n_timestep - 1)

    def _tables(self, t: torch.Tensor):
        return _i2sb_tables(self.n_timestep, self.beta_min, self.beta_max, str(t.device), t.dtype)

    def _alpha_rho2(self, t):
        """alpha_t and rho_t^2 of the vp / ve processes (closed forms)."""
        if self.kind == "vp":
            exponent = self.beta_min * t + 0.5 * self.beta_d * t * t
            return torch.exp(-0.5 * exponent), torch.expm1(exponent)
        return torch.ones_like(t), t * t

    @property
    def alpha_T(self) -> float:
        return math.exp(-0.5 * self.beta_min - 0.25 * self.beta_d) if self.kind == "vp" else 1.0

    @property
    def rho_T2(self) -> float:
        if self.kind == "vp":
            return math.expm1(self.beta_min + 0.5 * self.beta_d)
        if self.kind == "ve":
            return self.sigma_max**2
        return float(self._tables(torch.zeros((), dtype=torch.float64))[1][-1] ** 2)

    def alpha_rho(self, t):
        """(alpha_t, rho_t, rho_bar_t) as float64 tensors shaped like t."""
        t = self._t(t)
        if self.kind == "i2sb":
            _, std_fwd, std_bwd, _ = self._tables(t)
            i = self._index(t)
            return torch.ones_like(t), std_fwd[i], std_bwd[i]
        alpha, rho2 = self._alpha_rho2(t)
        return alpha, rho2.sqrt(), (self.rho_T2 - rho2).clamp(min=0).sqrt()

    def abc(self, t):
        """Bridge marginal coefficients: x_t = a_t x_T + b_t x_0 + c_t eps."""
        alpha, rho, rho_bar = self.alpha_rho(t)
        rho_T2 = self.rho_T2
        a = alpha / self.alpha_T * rho * rho / rho_T2
        b = alpha * rho_bar * rho_bar / rho_T2
        c = alpha * rho_bar * rho / math.sqrt(rho_T2)
        return a, b, c

    def half_log_snr(self, t):
        """log(b_t / c_t), the half-log-SNR of x_0 in the bridge marginal: DBIM's lambda, the time of its ODE
        (decreasing in t: -inf at T, +inf at 0)."""
        _, b, c = self.abc(t)
        return torch.log(b) - torch.log(c)

    lam = half_log_snr  # the old name (DBIM's lambda)

    def f_g2(self, t):
        """Drift f(t) = dlog alpha/dt and diffusion g^2(t) of the forward SDE (per index for i2sb)."""
        t = self._t(t)
        if self.kind == "vp":
            return -0.5 * (self.beta_min + self.beta_d * t), self.beta_min + self.beta_d * t
        if self.kind == "ve":
            return torch.zeros_like(t), 2 * t
        return torch.zeros_like(t), self._tables(t)[0][self._index(t)]

    @property
    def heun_time_scale(self) -> float:
        """DDBM's Heun sampler multiplies dt by 999 on the discrete i2sb schedule."""
        return float(self.n_timestep - 1) if self.kind == "i2sb" else 1.0

    def t_of_half_log_snr(self, half_log_snr):
        """Inverse of ``half_log_snr`` for vp and ve (closed form: rho^2 = rho_T^2 / (1 + rho_T^2 e^(2 lambda)))."""
        if self.kind == "i2sb":
            raise ValueError("t_of_half_log_snr: the i2sb schedule is discrete.")
        half_log_snr = self._t(half_log_snr)
        rho2 = self.rho_T2 / (1 + self.rho_T2 * torch.exp(2 * half_log_snr))
        if self.kind == "ve":
            return rho2.sqrt()
        log1p = torch.log1p(rho2)  # beta_d/2 t^2 + beta_min t = log(1 + rho^2)
        return 2 * log1p / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * self.beta_d * log1p))

    t_of_lambda = t_of_half_log_snr  # the old name

    # ---- the network's preconditioning ----------------------------------------------------------
    def scalings(self, t):
        """(c_skip, c_in, c_out, c_noise): D = c_skip x_t + c_out F(c_in x_t, c_noise, x_T)."""
        t = self._t(t)
        if self.kind == "i2sb":
            _, std_fwd, _, levels = self._tables(t)
            i = self._index(t)
            one = torch.ones_like(t)
            return one, one, -std_fwd[i], levels[i]
        a, b, c = self.abc(t)
        s0 = sT = self.sigma_data
        cov = self.cov_xy
        A = a * a * sT**2 + b * b * s0**2 + 2 * a * b * cov + c * c
        c_in = torch.rsqrt(A)
        c_skip = (b * s0**2 + a * cov) / A
        c_out = torch.sqrt(a * a * (s0**2 * sT**2 - cov**2) + s0**2 * c * c) * c_in
        return c_skip, c_in, c_out, 250.0 * torch.log(t + 1e-44)

    # ---- grids --------------------------------------------------------------------------------
    def dbim_grid(self, steps: int, spacing: str = "uniform_t", rho: float = 7.0) -> torch.Tensor:
        """DBIM's steps + 1 times t_{N-1} > ... > t_0 = t_min (float64); the sampler adds the call at T.

        ``uniform_t`` is the reference (uniform in t from t_max - 1e-3); ``karras`` (rho = 7) is the
        extension's choice for VE bridges, where the uniform grid needs ~1000 steps. On the discrete
        i2sb schedule, times are snapped to the training indices and repeated indices dropped."""
        if steps < 1:
            raise ValueError(f"DBIM needs at least 1 step (NFE >= 2), got {steps}.")
        t_hi = self.t_max - DBIM_END_OFFSET
        if spacing == "uniform_t":
            ts = torch.linspace(t_hi, self.t_min, steps + 1, dtype=torch.float64)
        elif spacing == "karras":
            ts = karras_sigmas(steps + 1, self.t_min, t_hi, rho)[:-1]
        else:
            raise ValueError(f"Unknown spacing {spacing!r}; choose one of {SPACINGS}.")
        if self.kind == "i2sb":
            ts = torch.unique_consecutive(self._index(ts)).to(torch.float64) / (self.n_timestep - 1)
            ts[-1] = max(float(ts[-1]), self.t_min)
        return ts

    def heun_grid(self, steps: int, rho: float = 7.0) -> torch.Tensor:
        """DDBM's Karras grid from t_max - 1e-4 to t_min with ``steps`` points, then 0."""
        if steps < 1:
            raise ValueError(f"The DDBM Heun sampler needs at least 1 step, got {steps}.")
        return karras_sigmas(steps, self.t_min, self.t_max - HEUN_END_OFFSET, rho)


def dbim_steps_for_nfe(nfe: int) -> int:
    """DBIM (any order) calls the network steps + 1 times."""
    return int(nfe) - 1


def heun_steps_for_nfe(nfe: int, churn_step_ratio: float) -> int:
    """DDBM Heun: NFE = 3 steps - 1 with churn, 2 steps - 1 without (scripts/sample.sh rounding)."""
    per_step = 3 if churn_step_ratio > 0 else 2
    return max(1, int(math.floor((nfe + 1) / per_step + 0.5)))


def heun_nfe(steps: int, churn_step_ratio: float) -> int:
    return (3 if churn_step_ratio > 0 else 2) * steps - 1


SCHEDULE_PRESETS = {
    "vp": BridgeSchedule("vp", beta_d=2.0, beta_min=0.1, t_min=1e-4),
    "ve": BridgeSchedule("ve", sigma_max=80.0, t_min=0.002),
    "i2sb": BridgeSchedule("i2sb", beta_min=0.1, beta_max=1.0, t_min=1e-4),
}
