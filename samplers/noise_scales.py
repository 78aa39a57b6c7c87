"""The ER-SDE noise-scale functions phi(lam) (Cui et al., arXiv 2309.06169) and the exact step
coefficients c2, c3, ... of the Taylor terms, in float64 on the host (shared/specs/er_sde.md)."""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

LOG10 = math.log(10.0)


# ---- noise-scale functions phi(lam), written in log-space ---------------------------------

@dataclass(frozen=True)
class NoiseFunction:
    """phi through l(L) = log phi(e^L) and kappa(L) = d log phi / d log lam (= 1 + eta(lam)^2).

    ``power`` is p when phi = lam^p (closed-form coefficients); ``log_psi_inf`` is the limit of
    log(phi/lam) as lam -> inf, which gives the exact first step of a flow model from sigma = 1."""

    name: str
    log_phi: Callable[[np.ndarray], np.ndarray]
    kappa: Callable[[np.ndarray], np.ndarray]
    power: float | None = None
    log_psi_inf: float = math.inf

    @property
    def deterministic(self) -> bool:
        return self.power == 1.0

    def with_strength(self, eta: float) -> "NoiseFunction":
        """phi_eta = lam (phi/lam)^eta: eta scales the diffusion variance rate; 0 is the ODE."""
        if eta < 0:
            raise ValueError(f"ER-SDE: eta must be >= 0, got {eta}.")
        if eta == 1.0:
            return self
        base = self
        return NoiseFunction(
            name=f"{self.name}^{eta:g}",
            log_phi=lambda L: L + eta * (base.log_phi(L) - L),
            kappa=lambda L: 1.0 + eta * (base.kappa(L) - 1.0),
            power=None if base.power is None else 1.0 + eta * (base.power - 1.0),
            log_psi_inf=0.0 if eta == 0 else eta * base.log_psi_inf,
        )


def power_law(p: float) -> NoiseFunction:
    if not p >= 1.0:
        raise ValueError(f"ER-SDE: the power-law exponent (power) must be >= 1 (below 1 the noise variance is "
                         f"negative), got {p}.")
    return NoiseFunction(
        name=f"power({p:g})", log_phi=lambda L: p * L, kappa=lambda L: np.full_like(L, p),
        power=float(p), log_psi_inf=0.0 if p == 1.0 else math.inf,
    )


def sde_1(a: float = 0.0) -> NoiseFunction:
    """phi = lam (exp(lam^(a-1)/(a-1)) + 10)."""
    if a == 1.0:
        raise ValueError("ER-SDE: sde_1 is undefined for sde_1_a = 1; use another value (default 0).")

    def g(L):
        return np.exp((a - 1.0) * L) / (a - 1.0)

    return NoiseFunction(
        name=f"sde_1(a={a:g})",
        log_phi=lambda L: L + np.logaddexp(g(L), LOG10),
        kappa=lambda L: 1.0 + np.exp((a - 1.0) * L) / (1.0 + 10.0 * np.exp(-g(L))),
        log_psi_inf=math.log(11.0) if a < 1.0 else math.inf,
    )


def _sde_4() -> NoiseFunction:
    """phi = lam^0.9 log10(1 + 100 lam^1.5): kappa < 1 above lam ~ 1e3 (flow starts)."""

    def y(L):
        return np.exp(math.log(100.0) + 1.5 * L)

    return NoiseFunction(
        name="sde_4",
        log_phi=lambda L: 0.9 * L + np.log(np.log1p(y(L))) - math.log(LOG10),
        kappa=lambda L: 0.9 + 1.5 * (y(L) / (1.0 + y(L))) / np.log1p(y(L)),
        log_psi_inf=-math.inf,  # psi = phi/lam -> 0 (slowly): the first flow step is an ODE step
    )


def _sde_5() -> NoiseFunction:
    """phi = lam (exp(lam^0.3) + 10): the published default (ComfyUI's er_sde)."""
    return NoiseFunction(
        name="sde_5",
        log_phi=lambda L: L + np.logaddexp(np.exp(0.3 * L), LOG10),
        kappa=lambda L: 1.0 + 0.3 * np.exp(0.3 * L) / (1.0 + 10.0 * np.exp(-np.exp(0.3 * L))),
    )


NOISE_FUNCTIONS = ("ode", "reverse_sde", "sde_1", "sde_2", "sde_3", "sde_4", "sde_5", "power")


def renamed_option(value, old_value, name: str, old_name: str, default, who: str = "ER-SDE"):
    """``value`` (None: not given) or its deprecated old spelling ``old_value``; an error if both differ."""
    if old_value is None:
        return default if value is None else value
    if value is not None and value != old_value:
        raise ValueError(f"{who}: {old_name}= is the old name of {name}=; give one of them "
                         f"(got {name}={value}, {old_name}={old_value}).")
    warnings.warn(f"{who}: {old_name}= is deprecated; use {name}=.", DeprecationWarning, stacklevel=3)
    return old_value


def make_noise_function(name: str = "sde_5", eta: float = 1.0, power: float | None = None,
                        sde_1_a: float | None = None, *, p: float | None = None, a: float | None = None) -> NoiseFunction:
    """ode: phi = lam; reverse_sde: lam^2 (Anderson); sde_2: lam^1.5; sde_3: lam^2.5;
    sde_1 (parameter ``sde_1_a``, default 0), sde_4, sde_5: the paper's families; power: lam^power (default 2;
    ComfyUI's 'Reverse-time SDE' with slider eta is power = 1 + eta). ``eta`` is the strength phi_eta of any
    of them. ``p`` and ``a`` are the deprecated names of ``power`` and ``sde_1_a``."""
    return noise_function(name, eta, renamed_option(power, p, "power", "p", 2.0),
                          renamed_option(sde_1_a, a, "sde_1_a", "a", 0.0))


@functools.lru_cache(maxsize=64)
def noise_function(name: str, eta: float, power: float, sde_1_a: float) -> NoiseFunction:
    """``make_noise_function`` with every option given under its current name: one (immutable) object per
    setting, so a plan cache can key on it."""
    builders = {
        "ode": lambda: power_law(1.0),
        "reverse_sde": lambda: power_law(2.0),
        "sde_1": lambda: sde_1(sde_1_a),
        "sde_2": lambda: power_law(1.5),
        "sde_3": lambda: power_law(2.5),
        "sde_4": _sde_4,
        "sde_5": _sde_5,
        "power": lambda: power_law(power),
    }
    if name not in builders:
        raise ValueError(f"ER-SDE: unknown noise function {name!r}; choose one of {', '.join(NOISE_FUNCTIONS)}.")
    return builders[name]().with_strength(eta)


# ---- step coefficients c2, c3 --------------------------------------------------------------

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)
_GL_NODES_PLUS_1 = 1 + _GL_NODES
_PANEL_WIDTH = 0.5  # in v = log(lam/lam_t); 8-node panels of this width: ~5e-15 relative error
CLOSED_FORM_MIN_U = 0.05  # below this the power-law closed forms of c3, c4 cancel; use quadrature


def taylor_coefficients_quadrature(fn: NoiseFunction, lam_t: float, lam_s: float, terms: int = 2) -> tuple:
    """c_{k+1} = phi_t int_{lam_t}^{lam_s} kappa (lam - lam_s)^k / (k! phi) dlam / lam ... in the sign-definite
    form (integration by parts), k = 1..terms: c2 = phi_t int 1/phi + (lam_t - lam_s),
    c3 = phi_t int (lam - lam_s)/phi + (lam_t - lam_s)^2/2; composite Gauss-Legendre in v = log(lam / lam_t)."""
    return tuple(float(c) for c in quadrature_rows(fn, [lam_t], [lam_s], terms)[0])


def quadrature_rows(fn: NoiseFunction, lam_t, lam_s, terms: int) -> np.ndarray:
    """``taylor_coefficients_quadrature`` of many steps in one evaluation: [steps, terms]. Step r has
    ceil(u_r / panel width) panels (at least one); the panels a step lacks get zero weight."""
    lam_t, lam_s = np.asarray(lam_t, dtype=np.float64), np.asarray(lam_s, dtype=np.float64)
    u = np.log(lam_s / lam_t)
    panels = np.maximum(1.0, np.ceil(u / _PANEL_WIDTH))
    width = (u / panels)[:, None, None]
    index = np.arange(int(panels.max()))[None, :, None]
    live = index < panels[:, None, None]  # [steps, panels, 1]
    half_width = width / 2
    v = np.where(live, index * width + half_width * _GL_NODES_PLUS_1, 0.0)
    w = np.where(live, half_width * _GL_WEIGHTS, 0.0)
    L_t = np.log(lam_t)[:, None, None]
    L = L_t + v
    kernel = w * fn.kappa(L) * np.exp(fn.log_phi(L_t) - fn.log_phi(L))
    gap = np.exp(v) - np.exp(u)[:, None, None]  # <= 0
    out = np.empty((len(u), terms))
    for k in range(1, terms + 1):
        kernel = kernel * gap if k == 1 else kernel * gap / k  # gap^k / k! times the kernel
        out[:, k - 1] = (lam_t if k == 1 else lam_t**k) * kernel.sum(axis=(1, 2))
    return out


def taylor_coefficients_power(p: float, lam_t: float, lam_s: float, terms: int = 2, xp=math) -> tuple:
    """Closed forms of c2, c3 (and c4 with ``terms`` 3) for phi = lam^p with E(a) = (rho^a - 1)/a:
    c_{k+1} = lam_t^k p / k! sum_j binom(k, j) (-rho)^(k-j) E(j - p), written out (relative error ~1e-11 at
    u = log(rho) = 0.05, where ``taylor_coefficient_rows`` switches to quadrature). ``xp``: the module whose log
    and expm1 are used (math; an array namespace for lam_t, lam_s arrays of many steps)."""
    u = xp.log(lam_s / lam_t)
    rho_m1 = xp.expm1(u)
    known = {0.0: u, 1.0: rho_m1}

    def E(a):
        if a not in known:
            known[a] = xp.expm1(a * u) / a
        return known[a]

    e1 = E(1 - p)
    c2 = lam_t * (e1 - rho_m1)
    c3 = lam_t**2 * (rho_m1**2 / 2 + E(2 - p) - (rho_m1 + 1) * e1)
    if terms < 3:
        return c2, c3
    rho = rho_m1 + 1
    # cubes as products: numpy's power of an array may round differently from math's pow of each entry
    c4 = lam_t * lam_t * lam_t * p / 6 * (E(3 - p) - 3 * rho * E(2 - p) + 3 * rho * rho * e1 - rho * rho * rho * E(-p))
    return c2, c3, c4


def taylor_coefficients_comfy(fn: NoiseFunction, lam_t: float, lam_s: float) -> tuple[float, float]:
    """ComfyUI's 200-point left Riemann sums in float32 (parity mode only)."""
    f32 = np.float32
    lam_t32, lam_s32 = f32(lam_t), f32(lam_s)
    dt = lam_t32 - lam_s32
    step = -dt / f32(200.0)
    pos = lam_t32 + np.arange(200, dtype=np.float32) * step
    phi = np.exp(fn.log_phi(np.log(pos.astype(np.float64)))).astype(np.float32)
    phi_t = np.exp(fn.log_phi(np.log(np.float64(lam_t32)))).astype(np.float32)
    s1 = np.sum(f32(1.0) / phi, dtype=np.float32) * step
    s_u = np.sum((pos - lam_s32) / phi, dtype=np.float32) * step
    return float(dt + s1 * phi_t), float(dt * dt / 2 + s_u * phi_t)


def taylor_coefficients(fn: NoiseFunction, lam_t: float, lam_s: float, quadrature: str = "exact",
                        terms: int = 2) -> tuple:
    """(c2, ..., c_{terms+1}); c5 and beyond always by quadrature (c4 too but for power laws)."""
    return taylor_coefficient_rows(fn, [lam_t], [lam_s], quadrature, terms)[0]


class _MathOnArrays:
    """log and expm1 of numpy arrays through the math module, entry by entry: numpy's own may round the last bit
    differently, and the batched coefficients are to equal the one-step ones exactly."""

    @staticmethod
    def log(values):
        return np.array([math.log(v) for v in values.tolist()])

    @staticmethod
    def expm1(values):
        return np.array([math.expm1(v) for v in values.tolist()])


def power_taylor_columns(fn: NoiseFunction, lam_t: np.ndarray, lam_s: np.ndarray, terms: int) -> list:
    """``taylor_coefficient_rows`` (exact quadrature, a power law, terms <= 3) of many steps in numpy:
    ``terms`` arrays c2, c3, ... over the steps (closed forms, quadrature where u < 0.05), equal to the one-step
    values bit for bit."""
    closed = taylor_coefficients_power(fn.power, lam_t, lam_s, terms, xp=_MathOnArrays)[:terms]
    small = _MathOnArrays.log(lam_s / lam_t) < CLOSED_FORM_MIN_U
    if not small.any():
        return list(closed)
    quad = quadrature_rows(fn, lam_t[small], lam_s[small], max(terms, 2))
    return [_patched(c, small, quad[:, k]) for k, c in enumerate(closed)]


def _patched(values: np.ndarray, where: np.ndarray, replacement: np.ndarray) -> np.ndarray:
    out = np.array(values, dtype=np.float64)
    out[where] = replacement
    return out


def taylor_coefficient_rows(fn: NoiseFunction, lam_t, lam_s, quadrature: str = "exact", terms: int = 2) -> list:
    """``taylor_coefficients`` of many steps (lists of lam_t, lam_s), the quadratures in one evaluation."""
    heads = []
    for t, s in zip(lam_t, lam_s):
        if quadrature == "comfy_riemann":
            heads.append(taylor_coefficients_comfy(fn, t, s))
        elif fn.power is not None and math.log(s / t) >= CLOSED_FORM_MIN_U:
            heads.append(taylor_coefficients_power(fn.power, t, s, min(terms, 3)))
        else:
            heads.append(None)
    need = [r for r, head in enumerate(heads) if head is None or len(head) < terms]
    quad = dict(zip(need, quadrature_rows(fn, [lam_t[r] for r in need], [lam_s[r] for r in need],
                                          max(terms, 2)).tolist())) if need else {}
    return [tuple(quad[r][:terms]) if head is None else head[:terms] + tuple(quad.get(r, ())[len(head):terms])
            for r, head in enumerate(heads)]
