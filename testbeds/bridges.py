"""The exact bridge model: paired Gaussian-mixture data whose bridge denoiser is closed-form.

x_0 ~ sum_k pi_k N(mu_k, S_k) (testbed.GaussianMixture, diagonal S_k) and x_T = P x_0 + tau delta.
Given x_T the target is again a mixture, p(x_0 | x_T) = sum_k w_k N(m_k, C_k); observing the
bridge state y = x_t - a_t x_T = b_t x_0 + c_t eps gives the exact denoiser

    D*(x_t, t, x_T) = sum_k w'_k (m_k + b_t C_k V_k^-1 (y - b_t m_k)),  V_k = b_t^2 C_k + c_t^2 I,
    w'_k ∝ w_k N(y; b_t m_k, V_k),

and the marginal q(x_t | x_T) = sum_k w_k N(a_t x_T + b_t m_k, V_k). The same formulas serve every
bridge kind (only a, b, c change). Spec: shared/specs/dbim.md section 7. Float64, CPU, [n, d].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..samplers.bridges.schedule import BridgeSchedule
from .mixtures import GaussianMixture

_EPS_VAR = 1e-24  # keeps V_k invertible at t = T, where b = c = 0 (the weights then equal w_k)


@dataclass
class JointBridgeMixture:
    """Paired data (x_0, x_T = P x_0 + tau delta) with a Gaussian-mixture x_0."""

    prior: GaussianMixture
    P: torch.Tensor  # [d_T, d]
    tau: float = 0.1

    def __post_init__(self):
        self.P = torch.as_tensor(self.P, dtype=torch.float64)
        S = torch.diag_embed(self.prior.stds**2)  # [K, d, d]
        self.mean_T = self.prior.means @ self.P.T  # [K, d_T]
        self.cov_T = self.P @ S @ self.P.T + self.tau**2 * torch.eye(self.P.shape[0], dtype=torch.float64)
        gain = S @ self.P.T @ torch.linalg.inv(self.cov_T)  # G_k = S0T STT^-1
        self.gain = gain
        self.cov_post = S - gain @ self.P @ S  # C_k, independent of x_T

    @property
    def dim(self) -> int:
        return self.prior.dim

    def sample(self, n: int, generator: torch.Generator | None = None):
        """(x_0 [n, d], x_T [n, d_T]) pairs."""
        x0, _ = self.prior.sample(n, generator)
        delta = torch.randn(n, self.P.shape[0], dtype=torch.float64, generator=generator)
        return x0, x0 @ self.P.T + self.tau * delta

    def condition(self, x_T: torch.Tensor):
        """p(x_0 | x_T): log weights [n, K], means [n, K, d], covariances [K, d, d]."""
        r = x_T.unsqueeze(1) - self.mean_T.unsqueeze(0)  # [n, K, d_T]
        log_w = torch.log(self.prior.weights) + _log_normal(r, self.cov_T)
        log_w = log_w - torch.logsumexp(log_w, -1, keepdim=True)
        means = self.prior.means.unsqueeze(0) + torch.einsum("kij,nkj->nki", self.gain, r)
        return log_w, means, self.cov_post

    def sample_target(self, x_T: torch.Tensor, n: int, generator=None) -> torch.Tensor:
        """n exact draws of x_0 | x_T for one condition x_T [d_T]."""
        log_w, means, cov = self.condition(x_T.reshape(1, -1))
        k = torch.multinomial(log_w[0].exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return means[0, k] + torch.einsum("nij,nj->ni", torch.linalg.cholesky(cov)[k], z)


def _log_normal(r: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """log N(r; 0, cov) for r [..., K, d] and cov [..., K, d, d] (broadcasting)."""
    L = torch.linalg.cholesky(cov)
    z = torch.linalg.solve_triangular(L, r.unsqueeze(-1), upper=False).squeeze(-1)
    log_det = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * ((z * z).sum(-1) + log_det + r.shape[-1] * math.log(2 * math.pi))


class ExactBridgeModel:
    """``model(x_t, t, x_T) -> D*`` exact for a JointBridgeMixture under one bridge schedule.

    x_t, x_T: [n, d] (any dtype; computed in float64 on the CPU), t: [n] or scalar.
    ``calls`` counts evaluations (NFE)."""

    def __init__(self, joint: JointBridgeMixture, schedule: BridgeSchedule):
        self.joint = joint
        self.schedule = schedule
        self.calls = 0
        self._memo = None

    def _condition(self, x_T: torch.Tensor):
        """p(x_0 | x_T), memoised for the sampler's fixed condition tensor."""
        key = (x_T.data_ptr(), tuple(x_T.shape), x_T._version)
        if self._memo is None or self._memo[0] != key:
            self._memo = (key, self.joint.condition(x_T))
        return self._memo[1]

    def _observation(self, x_t, t, x_T):
        """Per component: log w_k + log N(y; b m_k, V_k), and the posterior means of x_0."""
        n = x_t.shape[0]
        x_t, x_T = (v.reshape(n, -1).to("cpu", torch.float64) for v in (x_t, x_T))
        t = torch.as_tensor(t, dtype=torch.float64).cpu().reshape(-1)
        if (t == t[0]).all():  # one time for the batch: K small matrices instead of n K
            t = t[:1]
        a, b, c = (v.reshape(-1, 1, 1, 1) for v in self.schedule.abc(t))
        log_w, means, cov = self._condition(x_T)
        eye = torch.eye(x_t.shape[1], dtype=torch.float64)
        V = b**2 * cov + (c**2 + _EPS_VAR) * eye  # [n | 1, K, d, d]
        L = torch.linalg.cholesky(V)
        V_inv = torch.cholesky_inverse(L)
        log_det = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        b = b.reshape(-1, 1, 1)
        r = (x_t - a.reshape(-1, 1) * x_T).unsqueeze(1) - b * means  # y - b m_k, [n, K, d]
        sol = (V_inv @ r.unsqueeze(-1)).squeeze(-1)
        log_p = log_w - 0.5 * ((r * sol).sum(-1) + log_det + r.shape[-1] * math.log(2 * math.pi))
        post = means + b * (cov @ sol.unsqueeze(-1)).squeeze(-1)
        return log_p, post

    def __call__(self, x_t: torch.Tensor, t, x_T: torch.Tensor, **extra) -> torch.Tensor:
        self.calls += 1
        log_p, post = self._observation(x_t, t, x_T)
        out = (torch.softmax(log_p, -1).unsqueeze(-1) * post).sum(1)
        return out.reshape(x_t.shape).to(x_t.device, x_t.dtype)

    def log_marginal(self, x_t: torch.Tensor, t, x_T: torch.Tensor) -> torch.Tensor:
        """log q(x_t | x_T) (differentiable in x_t)."""
        return torch.logsumexp(self._observation(x_t, t, x_T)[0], -1)

    def score(self, x_t, t, x_T):
        """Bridge score -(x_t - a x_T - b D*) / c^2."""
        a, b, c = (float(v) for v in self.schedule.abc(torch.tensor(float(t), dtype=torch.float64)))
        return -(x_t - a * x_T - b * self(x_t, t, x_T)) / c**2

    def sample_marginal(self, x_T: torch.Tensor, t: float, n: int, generator=None) -> torch.Tensor:
        """n exact draws of x_t | x_T (x_T [d_T]): the reference set for distribution errors."""
        x0 = self.joint.sample_target(x_T, n, generator)
        a, b, c = (float(v) for v in self.schedule.abc(torch.tensor(t, dtype=torch.float64)))
        z = torch.randn(x0.shape, dtype=torch.float64, generator=generator)
        return a * x_T.reshape(1, -1) + b * x0 + c * z


def default_joint_mixture() -> JointBridgeMixture:
    """Spec 7.2: 2-D, 3 modes, P = diag(1, 0) (keep one coordinate: p(x_0 | x_T) multimodal), tau 0.1."""
    prior = GaussianMixture(
        weights=[0.3, 0.4, 0.3],
        means=[[-0.5, 0.6], [0.0, -0.5], [0.5, 0.4]],
        stds=[[0.15, 0.2], [0.2, 0.15], [0.17, 0.17]],
    )
    return JointBridgeMixture(prior, torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)), tau=0.1)


def solve_bridge_ode(model: ExactBridgeModel, x: torch.Tensor, x_T: torch.Tensor, lam_start: float,
                     lam_ends, rtol: float = 1e-12) -> list[torch.Tensor]:
    """Exact solution of the DBIM / DDBM probability-flow ODE (DOP853) from lambda = lam_start to each
    of ``lam_ends`` (increasing). In y = x / c the ODE is dy/dlambda = x_T d(a/c)/dlambda + e^lambda D,
    with a/c = e^-lambda / (alpha_T rho_T^2) for every bridge kind. vp / ve only (needs t(lambda))."""
    from scipy.integrate import solve_ivp

    sched = model.schedule
    shape = x.shape
    x_T = x_T.to(torch.float64)
    k = 1.0 / (sched.alpha_T * sched.rho_T2)

    def c_of(lam):
        return float(sched.abc(sched.t_of_half_log_snr(torch.tensor(lam, dtype=torch.float64)))[2])

    def rhs(lam, y):
        t = sched.t_of_half_log_snr(torch.tensor(lam, dtype=torch.float64))
        x_t = torch.from_numpy(y).reshape(shape) * c_of(lam)
        return (-k * math.exp(-lam) * x_T + math.exp(lam) * model(x_t, t, x_T)).reshape(-1).numpy()

    y0 = (x.to(torch.float64) / c_of(lam_start)).reshape(-1).numpy()
    ends = [float(v) for v in lam_ends]
    sol = solve_ivp(rhs, (lam_start, ends[-1]), y0, method="DOP853", t_eval=ends, rtol=rtol, atol=rtol)
    if not sol.success:
        raise RuntimeError(f"solve_bridge_ode failed: {sol.message}")
    return [torch.from_numpy(sol.y[:, i].copy()).reshape(shape) * c_of(lam) for i, lam in enumerate(ends)]


# ---- a tiny learned bridge model: edge maps -> filled shapes ------------------------------------

TOY_SIZE = 16
TOY_PALETTE = torch.tensor([[0.9, -0.7, -0.7], [-0.7, 0.6, -0.6], [-0.6, -0.5, 0.9], [0.8, 0.7, -0.8]])


def toy_pairs(n: int, generator: torch.Generator | None = None, size: int = TOY_SIZE):
    """Paired images in [-1, 1], [n, 3, size, size]: x_0 an ellipse or rectangle filled with one of four
    colours on white, x_T its outline (black lines on white, like the edges2handbags condition).
    Given the edges the target is a 4-mode distribution (the colour). Returns (x_0, x_T, shape mask)."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    u = torch.rand(n, 5, generator=generator)
    cy, cx = ((0.35 + 0.3 * u[:, 0:2]) * size).unbind(1)
    r = (0.15 + 0.13 * u[:, 2]) * size
    aspect = 0.8 + 0.45 * u[:, 3]
    dy, dx = yy - cy[:, None, None], (xx - cx[:, None, None]) * aspect[:, None, None]
    r = r[:, None, None]
    ellipse = dy**2 + dx**2 <= r**2
    box = (dy.abs() <= r) & (dx.abs() <= r)
    mask = torch.where((u[:, 4] < 0.5)[:, None, None], ellipse, box).float().unsqueeze(1)
    colour = torch.randint(0, len(TOY_PALETTE), (n,), generator=generator)
    x0 = 1 - mask + mask * TOY_PALETTE[colour][:, :, None, None]
    eroded = -torch.nn.functional.max_pool2d(-mask, 3, 1, 1)
    x_T = (1 - 2 * (mask - eroded)).expand(-1, 3, -1, -1).contiguous()
    return x0, x_T, mask


def fill_colours(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean colour inside each shape, [n, 3]: the toy task's random feature."""
    return (x * mask).sum((2, 3)) / mask.sum((2, 3))


def toy_adm_config():
    """The toy UNet's structure (``adm_unet.TOY_ADM_CONFIG``, which the toy preset uses)."""
    from ..samplers.bridges.adm_unet import TOY_ADM_CONFIG

    assert TOY_ADM_CONFIG.image_size == TOY_SIZE
    return TOY_ADM_CONFIG


def train_toy_bridge(steps: int = 1500, batch: int = 32, lr: float = 1e-3, seed: int = 0, log=print):
    """DDBM training (VP bridge, preconditioned x0 loss weighted 1/c_out^2, t ~ U[t_min, 1]) of the toy
    UNet on fresh toy pairs; Adam with a cosine decay to lr/10, EMA of the weights. Deterministic on
    the CPU for a given seed. Returns the EMA network (eval mode)."""
    import copy
    import time

    from ..samplers.bridges.adm_unet import ADMUNet
    from ..samplers.bridges.schedule import SCHEDULE_PRESETS

    sched = SCHEDULE_PRESETS["vp"]
    with torch.random.fork_rng():  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(seed)
        net = ADMUNet(toy_adm_config()).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    decay_lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 10)
    g = torch.Generator().manual_seed(seed)
    view = (-1, 1, 1, 1)
    start = time.time()
    for step in range(steps):
        x0, x_T, _ = toy_pairs(batch, g)
        t = sched.t_min + (sched.t_max - sched.t_min) * torch.rand(batch, generator=g, dtype=torch.float64)
        a, b, c = (v.float().reshape(view) for v in sched.abc(t))
        x_t = a * x_T + b * x0 + c * torch.randn(x0.shape, generator=g)
        c_skip, c_in, c_out, c_noise = (v.float() for v in sched.scalings(t))
        denoised = c_skip.reshape(view) * x_t + c_out.reshape(view) * net(c_in.reshape(view) * x_t, c_noise, xT=x_T)
        loss = (((denoised - x0) ** 2).mean((1, 2, 3)) / c_out**2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay_lr.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - min(0.995, (1 + step) / (10 + step)))
        if (step + 1) % 100 == 0:
            log(f"step {step + 1} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    return ema
