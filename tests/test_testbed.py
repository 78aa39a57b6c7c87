import math

import torch

from comfyui_fast_samplers.samplers.schedule import NoiseSchedule
from comfyui_fast_samplers.testbeds.mixtures import (
    ExactModel, default_mixture, exact_w2, gaussian_w2, marginal_sample, mode_weight_error,
    off_mode_rate, single_gaussian, sliced_w2, solve_pf_ode,
)


def test_denoiser_satisfies_tweedie(generator):
    """E[x0 | y] = y + lam^2 grad log p_lam(y), checked by finite differences of the exact density."""
    mix = default_mixture()
    y = 2 * torch.randn(50, 2, dtype=torch.float64, generator=generator)
    lam = 0.7
    y.requires_grad_(True)
    log_p = torch.logsumexp(mix.log_component_densities(y, lam), dim=-1).sum()
    (score,) = torch.autograd.grad(log_p, y)
    torch.testing.assert_close(mix.denoise(y.detach(), lam), y.detach() + lam**2 * score, rtol=1e-10, atol=1e-12)


def test_denoiser_matches_monte_carlo_posterior_mean(generator):
    mix = single_gaussian()
    lam = 0.5
    x0, _ = mix.sample(400_000, generator)
    y = x0 + lam * torch.randn(x0.shape, dtype=torch.float64, generator=generator)
    # Linear regression of x0 on y is exact for Gaussian data: compare slopes coordinate-wise.
    d = mix.denoise(y, lam)
    for k in range(2):
        slope_mc = torch.cov(torch.stack([x0[:, k], y[:, k]]))[0, 1] / y[:, k].var()
        slope_exact = torch.cov(torch.stack([d[:, k], y[:, k]]))[0, 1] / y[:, k].var()
        assert abs(slope_mc - slope_exact) < 0.01


def test_flow_model_at_sigma_one_returns_data_mean():
    mix = default_mixture()
    model = ExactModel(mix, "flow")
    out = model(torch.randn(4, 2, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(out, mix.mean.expand(4, 2), rtol=1e-12, atol=1e-12)


def test_parametrizations_agree_on_the_same_state(generator):
    mix = default_mixture()
    y = torch.randn(8, 2, dtype=torch.float64, generator=generator)
    sigma = torch.full((8,), 0.8, dtype=torch.float64)
    ve = ExactModel(mix, "ve")(y, sigma)
    vp = ExactModel(mix, "vp")(y / math.sqrt(1 + 0.8**2), sigma)
    torch.testing.assert_close(ve, vp, rtol=1e-12, atol=1e-12)


def test_pf_ode_transports_the_marginals(generator):
    """Exact samples at sigma = 10 pushed by the exact ODE to sigma = 0.2 have that marginal."""
    mix = single_gaussian()
    model = ExactModel(mix, "ve")
    x, _ = marginal_sample(mix, 4000, 10.0, NoiseSchedule("ve"), generator)
    out = solve_pf_ode(model, x, 10.0, 0.2, rtol=1e-9)
    target_cov = mix.covariance + 0.2**2 * torch.eye(2, dtype=torch.float64)
    assert gaussian_w2(out, mix.mean, target_cov) < 0.03
    # the ODE is a deterministic bijection: going back recovers the start
    back = solve_pf_ode(model, out[:50], 0.2, 10.0, rtol=1e-11)
    torch.testing.assert_close(back, x[:50], rtol=0, atol=1e-7)


def test_metrics(generator):
    mix = default_mixture()
    a, _ = mix.sample(300, generator)
    assert exact_w2(a, a) < 1e-6  # sqrt of a round-off-level cost
    assert math.isclose(exact_w2(a, a + torch.tensor([0.3, 0.4], dtype=torch.float64)), 0.5, rel_tol=1e-9)
    assert math.isclose(sliced_w2(a, a + torch.tensor([3.0, 0.0], dtype=torch.float64), directions=256), 3 / math.sqrt(2), rel_tol=0.1)
    big, _ = mix.sample(50_000, generator)
    assert mode_weight_error(big, mix) < 0.02
    assert off_mode_rate(big, mix) < 0.01
    assert off_mode_rate(torch.full((10, 2), 30.0, dtype=torch.float64), mix) == 1.0
    single = single_gaussian()
    assert gaussian_w2(single.sample(100_000, generator)[0], single.mean, single.covariance) < 0.01
