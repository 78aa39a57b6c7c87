import math
import warnings

import pytest
import torch

from comfyui_fast_samplers.samplers.ddim_gmm import (
    make_offsets, mixture_noise, plan_ddim_gmm, sample_ddim_gmm,
)
from comfyui_fast_samplers.samplers.schedule import NoiseSchedule, flow_shift_sigmas, karras_sigmas
from comfyui_fast_samplers.samplers.testbed import (
    ExactModel, default_mixture, mode_weight_error, random_mixture, sliced_w2,
)


def _euler_ancestral(model, x, sigmas, seed, eta):
    """k-diffusion's sample_euler_ancestral with eta (its get_ancestral_step), the VE reference; CPU step
    noise from seed + 1 as newer ComfyUI (never the initial noise)."""
    g = torch.Generator().manual_seed(seed + 1)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = model(x, torch.full((x.shape[0],), s[i], dtype=torch.float64))
        up = min(s[i + 1], eta * (s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2) ** 0.5)
        down = (s[i + 1] ** 2 - up**2) ** 0.5
        x = x + (x - denoised) / s[i] * (down - s[i])
        if s[i + 1] > 0 and eta > 0:
            x = x + torch.randn(x.shape, dtype=x.dtype, generator=g) * up
    return x


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_gaussian_kernel_is_euler_ancestral_on_ve(eta):
    model = ExactModel(default_mixture(), "ve")
    sigmas = karras_sigmas(10, 0.03, 14.6)
    x = 14.6 * torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = sample_ddim_gmm(model, x, sigmas, extra_args={"seed": 4}, eta=eta, components=1, disable=True)
    torch.testing.assert_close(ours, _euler_ancestral(model, x, sigmas, 4, eta), rtol=1e-10, atol=1e-10)


def test_scale_zero_equals_k_one_bit_for_bit():
    model = ExactModel(random_mixture(64, 3, seed=2), "ve")
    sigmas = karras_sigmas(8, 0.03, 14.6)
    x = 14.6 * torch.randn(4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = sample_ddim_gmm(model, x, sigmas, extra_args={"seed": 1}, eta=0.7, components=8, scale=0.0, disable=True)
    b = sample_ddim_gmm(model, x, sigmas, extra_args={"seed": 1}, eta=0.7, components=1, disable=True)
    assert torch.equal(a, b)


def test_flow_is_the_ve_step_in_ve_variables():
    """Offsets in VP units scale with sqrt(alpha^2 + s^2): a flow run equals the VE run on
    y = x / (1 - sigma), lam = sigma / (1 - sigma), mapped back (same noise, same offsets)."""
    mix = random_mixture(32, 3, seed=5)
    flow = ExactModel(mix, "flow")
    sigmas = flow_shift_sigmas(8, 3.0)[1:]  # start below 1 so y is finite
    sch = NoiseSchedule("flow")
    ve_sigmas = torch.cat([sch.lam(sigmas[:-1]), sigmas.new_zeros(1)])
    x = torch.randn(6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    opts = dict(extra_args={"seed": 2}, eta=0.6, components=4, scale=0.3, covariance="strict", disable=True)
    out_flow = sample_ddim_gmm(flow, x, sigmas, **opts)
    out_ve = sample_ddim_gmm(ExactModel(mix, "ve"), x / (1 - float(sigmas[0])), ve_sigmas, **opts)
    torch.testing.assert_close(out_flow, out_ve, rtol=1e-9, atol=1e-9)


def test_last_step_returns_the_denoised():
    model = ExactModel(default_mixture(), "ve")
    x = torch.randn(8, 2, dtype=torch.float64)
    sigmas = torch.tensor([0.5, 0.0], dtype=torch.float64)
    out = sample_ddim_gmm(model, x, sigmas, eta=1.0, components=1, disable=True)
    torch.testing.assert_close(out, model(x, torch.full((8,), 0.5, dtype=torch.float64)), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["ortho", "rand"])
def test_offsets_are_zero_mean_and_k_one_is_zero(kind):
    g = torch.Generator().manual_seed(0)
    off = make_offsets(16384, 8, kind, g)
    assert off.shape == (8, 16384)
    assert float(off.mean(0).norm()) <= 1e-6 * float(off.norm(dim=1).max())
    if kind == "ortho":
        torch.testing.assert_close(off.norm(dim=1), torch.full((8,), math.sqrt(1 - 1 / 8), dtype=torch.float64))
    single = make_offsets(64, 1, kind, g)
    assert torch.isfinite(single).all() and float(single.abs().max()) == 0.0
    torch.testing.assert_close(make_offsets(64, 4, kind, torch.Generator().manual_seed(3)),
                               make_offsets(64, 4, kind, torch.Generator().manual_seed(3)))


def _one_step(covariance, scale, units="vp", n=400_000, dim=64, K=8, seed=0):
    """Draws of one eta = 1 step's kernel noise (offsets + covariance) around a fixed mean."""
    sigmas = torch.tensor([1.2, 0.9, 0.0], dtype=torch.float64)  # a VE step
    step = plan_ddim_gmm(sigmas, NoiseSchedule("ve"), dim, eta=1.0, components=K, scale=scale, scale_units=units,
                         covariance=covariance, offset_seed=seed)[0]
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, dtype=torch.float64, generator=g)
    index = torch.randint(K, (n,), generator=g)
    return step, mixture_noise(step, z, index)


def test_strict_matches_the_gaussian_kernel_moments():
    n, dim = 400_000, 64
    step, draws = _one_step("strict", 0.9, "relative", n, dim)
    c2 = step.c**2
    assert float((draws.mean(0).abs() / math.sqrt(c2 / n)).max()) < 4.5
    cov = torch.cov(draws.T)
    assert float((cov - c2 * torch.eye(dim, dtype=torch.float64)).norm() / c2) < 1.5 * dim / math.sqrt(n)
    basis = step.basis  # inside the offsets' span, where the mixture lives
    in_span = basis.T @ cov @ basis - c2 * torch.eye(basis.shape[1], dtype=torch.float64)
    assert float(in_span.norm() / c2) < 1.5 * 8 / math.sqrt(n)


def test_diag_matches_per_coordinate_but_not_in_span():
    n, dim = 400_000, 64
    step, draws = _one_step("diag", 0.9 * 0.55, "vp", n, dim)  # scale below the feasible maximum
    c2 = step.c**2
    cov = torch.cov(draws.T)
    assert float((cov.diagonal() / c2 - 1).abs().max()) < 0.03
    basis = torch.linalg.qr(step.offsets.T).Q
    in_span = basis.T @ cov @ basis - c2 * torch.eye(basis.shape[1], dtype=torch.float64)
    assert float(in_span.norm() / c2) > 5 * 8 / math.sqrt(n)  # the paper's diag rule misses cross terms


def test_vub_trace_identity():
    n, dim, K = 200_000, 64, 8
    step, draws = _one_step("vub", 0.4, "vp", n, dim, K)
    c2, size2 = step.c**2, float(step.offsets.norm(dim=1).pow(2).mean()) / (1 - 1 / K)
    expected = dim * c2 + size2 * (1 - 1 / K) - K * min(size2 / K, c2)
    assert abs(float(torch.cov(draws.T).trace()) / expected - 1) < 0.01


def test_strict_infeasible_clamps_with_warning_or_raises():
    sigmas = torch.tensor([1.2, 0.9, 0.0], dtype=torch.float64)
    with pytest.warns(UserWarning, match="feasibility"):
        step = plan_ddim_gmm(sigmas, NoiseSchedule("ve"), 64, eta=1.0, components=8, scale=5.0, covariance="strict")[0]
    lam = torch.linalg.eigvalsh(step.offsets.T @ step.offsets / 8)
    assert float(lam.max()) <= step.c**2 * (1 + 1e-9)
    with pytest.raises(ValueError, match="infeasible"):
        plan_ddim_gmm(sigmas, NoiseSchedule("ve"), 64, eta=1.0, components=8, scale=5.0, covariance="strict",
                      on_infeasible="error")
    with warnings.catch_warnings():  # eta = 0 strict is DDIM: offsets vanish
        warnings.simplefilter("ignore")
        step0 = plan_ddim_gmm(sigmas, NoiseSchedule("ve"), 64, eta=0.0, components=8, covariance="strict")[0]
    assert float(step0.offsets.abs().max()) == 0.0


def test_two_strict_steps_keep_the_marginal_moments():
    """From x_t ~ q(x_t | x0) with a fixed x0 and the true x0 as denoiser, two strict steps land on
    N(x0, sigma^2 I) in mean and covariance (the paper's induction, App. A.1)."""
    dim, n = 32, 200_000
    x0 = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    oracle = lambda x, s, **k: x0.expand_as(x)  # noqa: E731
    sigmas = torch.tensor([2.0, 1.3, 0.8], dtype=torch.float64)
    x = x0 + 2.0 * torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = sample_ddim_gmm(oracle, x, sigmas, extra_args={"seed": 3}, eta=1.0, components=8, scale=0.95,
                          scale_units="relative", covariance="strict", disable=True)
    assert float(((out.mean(0) - x0).abs() / (0.8 / math.sqrt(n))).max()) < 4.5
    cov = torch.cov(out.T)
    assert float((cov - 0.64 * torch.eye(dim, dtype=torch.float64)).norm() / 0.64) < 1.5 * dim / math.sqrt(n)


def test_distribution_on_the_exact_mixture():
    """10 steps, 4 isotropic modes in d = 16: strict GMM within a few percent of DDIM (it cannot
    change the moments); every variant finite."""
    mix = random_mixture(16, 4, seed=0, spread=0.5, std=0.05)
    model = ExactModel(mix, "ve")
    data, _ = mix.sample(20_000, torch.Generator().manual_seed(0))
    # initial noise and step noise from one seed, as in ComfyUI (the CPU step stream is seed + 1)
    x = 14.6 * torch.randn(20_000, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigmas = karras_sigmas(10, 0.029, 14.6)
    results = {}
    for name, opts in {"ddim": {"components": 1}, "strict": {"scale": 0.9, "scale_units": "relative", "covariance": "strict"},
                       "diag": {"scale": 0.1, "covariance": "diag"}, "vub": {"scale": 0.1, "covariance": "vub"}}.items():
        out = sample_ddim_gmm(model, x, sigmas, extra_args={"seed": 0}, eta=0.5, disable=True, **opts)
        assert torch.isfinite(out).all(), name
        results[name] = sliced_w2(out, data), mode_weight_error(out, mix)
    assert abs(results["strict"][0] / results["ddim"][0] - 1) < 0.05, results
    assert all(w < 0.1 for w, _ in results.values()), results


def test_bad_inputs():
    model = ExactModel(default_mixture(), "ve")
    x = torch.randn(4, 2, dtype=torch.float64)
    sig = karras_sigmas(4, 0.1, 10.0)
    with pytest.raises(ValueError, match="eta must be in"):
        sample_ddim_gmm(model, x, sig, eta=1.5, disable=True)
    with pytest.raises(ValueError, match="covariance"):
        sample_ddim_gmm(model, x, sig, covariance="full", disable=True)
    with pytest.raises(ValueError, match="at most the latent size"):
        sample_ddim_gmm(model, x, sig, components=8, disable=True)
    with pytest.raises(ValueError, match="non-increasing"):
        sample_ddim_gmm(model, x, torch.tensor([1.0, 2.0, 0.0]), disable=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_latents(dtype):
    model = ExactModel(random_mixture(4 * 8 * 8, 3, seed=1), "ve")
    x = 14.6 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sample_ddim_gmm(model, x.to(dtype), karras_sigmas(8, 0.03, 14.6).float(), extra_args={"seed": 0}, eta=0.5,
                          covariance="strict", scale=0.9, scale_units="relative", disable=True)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
