"""The exact test bed: Gaussian-mixture data whose denoiser E[x0 | x_t] is closed-form.

Used by the tests, the CLI and the benchmarks; nothing is downloaded. A model here follows
the k-diffusion convention of ComfyUI's sampler functions: ``model(x, sigma * s_in) -> x0``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..samplers.schedule import NoiseSchedule


@dataclass
class GaussianMixture:
    """sum_k w_k N(mu_k, diag(std_k^2)) in d dimensions (float64)."""

    weights: torch.Tensor  # [K]
    means: torch.Tensor  # [K, d]
    stds: torch.Tensor  # [K, d]

    def __post_init__(self):
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.stds = torch.as_tensor(self.stds, dtype=torch.float64).expand_as(self.means).clone()
        if self.means.ndim != 2 or self.weights.shape[0] != self.means.shape[0]:
            raise ValueError("GaussianMixture needs weights [K], means [K, d] and stds [K, d].")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    @property
    def covariance(self) -> torch.Tensor:
        mean = self.mean
        second = torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        return second - torch.outer(mean, mean) + torch.diag(self.weights @ self.stds**2)

    def sample(self, n: int, generator: torch.Generator | None = None):
        """(x0 [n, d], component labels [n])."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[labels] + self.stds[labels] * eps, labels

    def log_component_densities(self, y: torch.Tensor, lam) -> torch.Tensor:
        """log w_k N(y; mu_k, std_k^2 + lam^2) for y [n, d], lam [n] or scalar -> [n, K]."""
        lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1, 1, 1)
        var = self.stds.unsqueeze(0) ** 2 + lam**2  # [n|1, K, d]
        diff = y.unsqueeze(1) - self.means.unsqueeze(0)
        log_n = -0.5 * ((diff**2 / var) + torch.log(2 * math.pi * var)).sum(-1)
        return log_n + torch.log(self.weights)

    def denoise(self, y: torch.Tensor, lam) -> torch.Tensor:
        """E[x0 | x0 + lam * eps = y] for y [n, d] and lam [n] (VE variables, float64)."""
        lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1)
        gamma = torch.softmax(self.log_component_densities(y, lam), dim=-1)  # [n, K]
        shrink = self.stds.unsqueeze(0) ** 2 / (self.stds.unsqueeze(0) ** 2 + lam.reshape(-1, 1, 1) ** 2)
        posterior = self.means.unsqueeze(0) + shrink * (y.unsqueeze(1) - self.means.unsqueeze(0))
        return torch.einsum("nk,nkd->nd", gamma, posterior)

    def classify(self, x0: torch.Tensor) -> torch.Tensor:
        """Most likely component of each clean sample."""
        return self.log_component_densities(x0, 0.0).argmax(-1)


def default_mixture() -> GaussianMixture:
    """The 2-D, 3-mode mixture of the ER-SDE spec's test plan."""
    return GaussianMixture(
        weights=[0.3, 0.5, 0.2],
        means=[[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]],
        stds=[[0.3, 0.5], [0.4, 0.2], [0.25, 0.25]],
    )


def single_gaussian() -> GaussianMixture:
    """N((.5, -.3), diag(.36, .09)): exact moments for distribution tests."""
    return GaussianMixture(weights=[1.0], means=[[0.5, -0.3]], stds=[[0.6, 0.3]])


def random_mixture(dim: int, components: int = 4, seed: int = 0, spread: float = 1.0, std: float = 0.3):
    """A reproducible mixture in ``dim`` dimensions (for latent-shaped tests)."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(components, dim, dtype=torch.float64, generator=g)
    stds = std * (0.5 + torch.rand(components, dim, dtype=torch.float64, generator=g))
    weights = 0.5 + torch.rand(components, dtype=torch.float64, generator=g)
    return GaussianMixture(weights, means, stds)


class ExactModel:
    """A denoiser ``model(x, sigma_batch) -> x0`` that is exact for a Gaussian mixture.

    ``x`` may have any shape [B, ...] whose trailing size is the mixture's dimension; the
    output has x's dtype and device. ``calls`` counts model evaluations (NFE)."""

    def __init__(self, mixture: GaussianMixture, parametrization: str = "ve"):
        self.mixture = mixture
        self.schedule = NoiseSchedule(parametrization)
        self.parametrization = parametrization
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        self.calls += 1
        sigma = torch.as_tensor(sigma).to(torch.float64).reshape(-1).expand(x.shape[0]).cpu()
        alpha = self.schedule.alpha(sigma)
        # At flow sigma = 1 (alpha = 0) the exact denoiser is the data mean: a huge finite lam
        # gives exactly that without a host-side branch.
        safe_alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
        lam = torch.where(alpha > 0, self.schedule.lam(sigma), torch.full_like(sigma, 1e100))
        flat = x.reshape(x.shape[0], -1).to("cpu", torch.float64)
        y = flat / safe_alpha.reshape(-1, 1)
        return self.mixture.denoise(y, lam).reshape(x.shape).to(x.device, x.dtype)


def marginal_sample(mixture: GaussianMixture, n: int, sigma: float, schedule: NoiseSchedule, generator=None):
    """Exact samples of x_sigma = alpha x0 + s eps (and the clean x0 they came from)."""
    x0, _ = mixture.sample(n, generator)
    eps = torch.randn(x0.shape, dtype=torch.float64, generator=generator)
    return schedule.add_noise(x0, eps, sigma), x0


def solve_pf_ode(model: ExactModel, x: torch.Tensor, sigma_start: float, sigma_end: float, rtol: float = 1e-12):
    """Exact probability-flow ODE solution from sigma_start to sigma_end > 0 (DOP853).

    For VE and flow models dx/dsigma = (x - D(x, sigma)) / sigma in the k-diffusion sigma; we
    integrate in t = log sigma. A VP-scaled model is solved in VE variables and rescaled."""
    from scipy.integrate import solve_ivp

    if sigma_end <= 0:
        raise ValueError("solve_pf_ode: sigma_end must be > 0 (the ODE ends in a final denoise).")
    schedule = model.schedule
    if schedule.parametrization == "vp":
        ve = ExactModel(model.mixture, "ve")
        y = schedule.to_ve(x.to(torch.float64), sigma_start)
        y_end = solve_pf_ode(ve, y, sigma_start, sigma_end, rtol)
        return y_end * float(schedule.alpha(torch.tensor(sigma_end, dtype=torch.float64)))
    shape = x.shape
    x64 = x.detach().to("cpu", torch.float64).reshape(-1)

    def rhs(t, flat):
        xt = torch.from_numpy(flat).reshape(shape)
        sigma = torch.full((shape[0],), math.exp(t), dtype=torch.float64)
        return (xt - model(xt, sigma)).reshape(-1).numpy()

    sol = solve_ivp(rhs, (math.log(sigma_start), math.log(sigma_end)), x64.numpy(), method="DOP853",
                    rtol=rtol, atol=rtol)
    if not sol.success:
        raise RuntimeError(f"solve_pf_ode failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)


# ---- distribution metrics ---------------------------------------------------------------

def exact_w2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact W2 between two empirical point clouds (POT's network simplex)."""
    import ot

    a = a.reshape(a.shape[0], -1).to(torch.float64).numpy()
    b = b.reshape(b.shape[0], -1).to(torch.float64).numpy()
    cost = ot.dist(a, b)  # squared Euclidean
    wa, wb = np.full(len(a), 1.0 / len(a)), np.full(len(b), 1.0 / len(b))
    return math.sqrt(max(ot.emd2(wa, wb, cost, numItermax=10_000_000), 0.0))


def sliced_w2(a: torch.Tensor, b: torch.Tensor, directions: int = 64, seed: int = 0) -> float:
    """Sliced W2 over fixed random directions (sensitive at large n, where exact W2 is not)."""
    a = a.reshape(a.shape[0], -1).to(torch.float64)
    b = b.reshape(b.shape[0], -1).to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], directions, dtype=torch.float64, generator=g)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = torch.sort(a @ dirs, dim=0).values, torch.sort(b @ dirs, dim=0).values
    q = torch.linspace(0, 1, max(len(a), len(b)), dtype=torch.float64)
    qa = _quantiles(pa, q)
    qb = _quantiles(pb, q)
    return math.sqrt(float(((qa - qb) ** 2).mean()))


def _quantiles(sorted_proj: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    pos = q * (sorted_proj.shape[0] - 1)
    lo = pos.floor().long()
    hi = torch.clamp(lo + 1, max=sorted_proj.shape[0] - 1)
    frac = (pos - lo).unsqueeze(1)
    return sorted_proj[lo] * (1 - frac) + sorted_proj[hi] * frac


def gaussian_w2(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    """Bures-W2 between the Gaussian with the samples' moments and N(mean, cov)."""
    x = samples.reshape(samples.shape[0], -1).to(torch.float64)
    m = x.mean(0)
    c = torch.cov(x.T).reshape(x.shape[1], x.shape[1])
    root = _sqrtm(cov)
    cross = _sqrtm(root @ c @ root)
    bures = torch.trace(c + cov - 2 * cross)
    return math.sqrt(max(float(((m - mean) ** 2).sum() + bures), 0.0))


def _sqrtm(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T


def mode_weight_error(samples: torch.Tensor, mixture: GaussianMixture) -> float:
    """Total-variation distance between the samples' mode frequencies and the mixture weights."""
    labels = mixture.classify(samples.reshape(samples.shape[0], -1).to(torch.float64))
    freq = torch.bincount(labels, minlength=len(mixture.weights)).to(torch.float64) / len(labels)
    return 0.5 * float((freq - mixture.weights).abs().sum())


def off_mode_rate(samples: torch.Tensor, mixture: GaussianMixture, radius: float = 3.0) -> float:
    """Fraction of samples farther than ``radius`` standard deviations (RMS per dimension)
    from every component: the 'mode mixture' failure of few-step samplers."""
    x = samples.reshape(samples.shape[0], -1).to(torch.float64)
    z2 = ((x.unsqueeze(1) - mixture.means.unsqueeze(0)) / mixture.stds.unsqueeze(0)) ** 2
    rms = z2.mean(-1).sqrt().min(-1).values
    return float((rms > radius).to(torch.float64).mean())


def separated_mixture(dim: int = 16, components: int = 8, seed: int = 0, spread: float = 3.0, std: float = 0.5):
    """DPM-OT spec E3: well separated isotropic modes (means spread * N(0, I), weights 0.3 ... 0.05)."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(components, dim, dtype=torch.float64, generator=g)
    weights = torch.linspace(0.3, 0.05, components, dtype=torch.float64)
    return GaussianMixture(weights, means, torch.full((components, dim), std, dtype=torch.float64))


def chi2_rms_radius(dim: int, z: float = 3.0902) -> float:
    """RMS-per-dimension radius of the chi-square ball holding ~99.9% (z = 3.09) of a mode
    (Wilson-Hilferty), for ``off_mode_rate(..., radius=...)``."""
    k = float(dim)
    quantile = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    return math.sqrt(quantile / k)


def pool_distance_ratio(samples: torch.Tensor, pool: torch.Tensor, fresh: torch.Tensor) -> float:
    """Memorisation metric: median distance of the samples to their nearest pool point over the same for
    fresh true samples. < 1 means the outputs hug the pool (near copies)."""
    def median_nn(x):
        return torch.cdist(x.reshape(len(x), -1).double(), pool.reshape(len(pool), -1).double()).min(1).values.median()

    return float(median_nn(samples) / median_nn(fresh))
