import itertools
import math

import numpy as np
import pytest
import torch

from comfyui_fast_samplers.samplers.dp_schedule import (
    cost_matrix, dp_optimal_path, nearest_path, optimize_schedule, path_cost, probe_mse, snr,
)
from comfyui_fast_samplers.samplers.schedule import NoiseSchedule, discrete_vp_sigmas, karras_sigmas
from comfyui_fast_samplers.testbeds.mixtures import ExactModel, random_mixture

GRID = discrete_vp_sigmas()  # SD1.5's 1000 sigmas, 0.0292 ... 14.61


def _random_cost(g, seed):
    gen = torch.Generator().manual_seed(seed)
    cost = torch.full((g, g), math.inf, dtype=torch.float64)
    for t in range(1, g):
        cost[t, :t] = torch.rand(t, dtype=torch.float64, generator=gen)
    return cost


@pytest.mark.parametrize("seed", range(3))
def test_dp_equals_exhaustive_search(seed):
    cost = _random_cost(24, seed)
    start, steps = 23, 4
    best = min((path_cost(cost, [start, *mid, 0]), [start, *mid, 0])
               for mid in itertools.combinations(range(22, 0, -1), steps - 1))
    value, path = dp_optimal_path(cost, steps, start)
    assert value == pytest.approx(best[0], rel=1e-12) and path == best[1]


def test_dp_never_worse_than_stock_paths():
    cost = _random_cost(200, 7)
    grid = torch.linspace(0.03, 14.6, 199, dtype=torch.float64)
    for steps in (5, 10):
        value, _ = dp_optimal_path(cost, steps, 199)
        for sigmas in (karras_sigmas(steps, 0.03, 14.6), torch.cat([torch.linspace(14.6, 0.03, steps), torch.zeros(1)])):
            stock = nearest_path(grid, sigmas)
            if len(set(stock)) == len(stock):
                assert value <= path_cost(cost, stock) + 1e-12


def test_kl_identity_small_variance():
    """KL(q(x_s | x_t, x0) || p(x_s | x_t)) with the posterior variance equals 1/2 (SNR_s - SNR_t) ||x0 - x0_hat||^2,
    the DDPM posterior written in VP units from the schedule's sigmas."""
    vp = NoiseSchedule("vp")
    gen = torch.Generator().manual_seed(0)
    x0, x0_hat = torch.randn(2, 16, dtype=torch.float64, generator=gen)
    for sig_t, sig_s in ((14.6, 1.0), (0.9, 0.89), (0.9, 0.05), (0.1, 0.0292)):
        tab = vp.coefficients(torch.tensor([sig_t, sig_s], dtype=torch.float64))
        abar_t, abar_s = float(tab.alpha[0]) ** 2, float(tab.alpha[1]) ** 2
        beta = 1 - abar_t / abar_s
        c0 = math.sqrt(abar_s) * beta / (1 - abar_t)
        var = (1 - abar_s) / (1 - abar_t) * beta
        direct = float(((c0 * (x0 - x0_hat)) ** 2).sum()) / (2 * var)
        snrs = snr(torch.tensor([sig_t, sig_s], dtype=torch.float64), NoiseSchedule("ve"))
        identity = 0.5 * float(snrs[1] - snrs[0]) * float(((x0 - x0_hat) ** 2).sum())
        assert direct == pytest.approx(identity, rel=1e-9)


def _gaussian_kl(mean_q, var_q, mean_p, var_p):
    """KL(N(mean_q, var_q I) || N(mean_p, var_p I)) per row (numpy float64)."""
    ratio = var_q / var_p
    return 0.5 * (ratio - 1 - np.log(ratio) + (mean_q - mean_p) ** 2 / var_p).sum(-1)


@pytest.mark.parametrize("parametrization", ["ve", "flow"])
@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("decoder", ["sigma", "mse"])
def test_cost_matrix_equals_an_independent_gaussian_kl(parametrization, variance, decoder):
    """Every entry of the cost matrix against the ELBO terms written out from the schedule's own forward
    process x = alpha x0 + s eps, in model space, by Gaussian conditioning: q(x_u | x_t, x0) from the joint of
    (x_u, x_t) given x0, the model p(x_u | x_t) = the same formula with x0_hat, variance the posterior one
    ("small") or the VP chain's beta = 1 - abar_t / abar_u scaled to model space ("large"); decoder -log
    N(x0; x0_hat(x_t), v) with v = 1/SNR ("sigma") or m/D ("mse"). Per-sample KLs averaged over 5 samples
    whose denoising errors differ per candidate, on a random unequal grid (flow: with sigma = 1)."""
    rng = np.random.default_rng(sum(map(ord, parametrization + variance + decoder)))
    schedule = NoiseSchedule(parametrization)
    lo, hi = (0.03, 14.6) if parametrization == "ve" else (0.02, 0.95)
    grid = torch.tensor(np.sort(np.exp(rng.uniform(math.log(lo), math.log(hi), 9))), dtype=torch.float64)
    if parametrization == "flow":  # the node's flow grid ends at sigma = 1 (SNR 0, alpha 0)
        grid = torch.cat([grid, torch.ones(1, dtype=torch.float64)])
    n, dim = 5, 6
    x0 = rng.normal(size=(n, dim))
    eps = rng.normal(size=(n, dim))
    errors = rng.normal(size=(len(grid), n, dim)) * rng.uniform(0.05, 1.0, size=(len(grid), 1, 1))
    x0_hat = x0 + errors  # the denoiser's output at each candidate
    m = torch.tensor((errors**2).sum(-1).mean(1))
    cost = cost_matrix(grid, m, dim, schedule, variance, decoder).numpy()

    tab = schedule.coefficients(grid)
    alpha, s = tab.alpha.numpy(), tab.s.numpy()
    for t in range(len(grid)):
        x_t = alpha[t] * x0 + s[t] * eps
        for u in range(len(grid)):
            if u >= t:
                assert cost[t + 1, u + 1] == math.inf
                continue
            a = alpha[t] / alpha[u]  # x_t = a x_u + noise: Cov(x_u, x_t | x0) = a s_u^2, Var(x_t | x0) = s_t^2
            gain = a * s[u] ** 2 / s[t] ** 2
            var_post = s[u] ** 2 - gain * a * s[u] ** 2
            mean_q = alpha[u] * x0 + gain * (x_t - alpha[t] * x0)
            mean_p = alpha[u] * x0_hat[t] + gain * (x_t - alpha[t] * x0_hat[t])
            if variance == "small":
                var_p = var_post
            else:
                abar_t, abar_u = (alpha[k] ** 2 / (alpha[k] ** 2 + s[k] ** 2) for k in (t, u))
                var_p = (1 - abar_t / abar_u) * (alpha[u] ** 2 + s[u] ** 2)  # VP state = x / sqrt(alpha^2 + s^2)
            expected = _gaussian_kl(mean_q, var_post, mean_p, var_p).mean()
            assert cost[t + 1, u + 1] == pytest.approx(expected, rel=1e-9), (t, u)
        if decoder == "sigma":
            v = math.inf if alpha[t] == 0 else (s[t] / alpha[t]) ** 2  # 1/SNR: flow sigma = 1 never decodes
        else:
            v = float(m[t]) / dim
        nll = (0.5 * np.log(2 * math.pi * v) + (x0 - x0_hat[t]) ** 2 / (2 * v)).sum(-1).mean()
        assert cost[t + 1, 0] == pytest.approx(nll, rel=1e-9), t


@pytest.fixture(scope="module")
def toy():
    """Spec §10: 4 isotropic modes in d = 16 (std 0.05), exact denoiser, SD1.5 table. m from 64
    latents with common noise (what the node does) and from 2000 held-out latents (the truth)."""
    mix = random_mixture(16, 4, seed=0, spread=0.5, std=0.05)
    model = ExactModel(mix, "ve")
    data, _ = mix.sample(64, torch.Generator().manual_seed(1))
    held_out, _ = mix.sample(2000, torch.Generator().manual_seed(2))
    grid = GRID[::4]  # 250 candidates
    m_true = probe_mse(model, held_out, grid, model.schedule, seed=3).mean(0)
    return model, data, grid, m_true


def _bits_per_dim(cost, path, dim=16):
    return path_cost(cost, path) / (dim * math.log(2))


def test_dp_schedule_beats_stock_schedules_on_the_exact_model(toy):
    model, data, grid, m_true = toy
    true_cost = cost_matrix(grid, m_true, 16, model.schedule)
    calls = model.calls
    for steps in (5, 10, 20):
        sigmas, errors = optimize_schedule(model, data, steps, grid, seed=0)
        dp = _bits_per_dim(true_cost, nearest_path(grid, sigmas))
        exact_dp = dp_optimal_path(true_cost, steps, len(grid))[0] / (16 * math.log(2))
        stock = {"uniform": torch.cat([torch.linspace(float(grid[-1]), float(grid[0]), steps), torch.zeros(1)]),
                 "karras": karras_sigmas(steps, float(grid[0]), float(grid[-1]))}
        quadratic_t = (torch.linspace(1, 0, steps) ** 2 * (len(grid) - 1)).round().long()
        stock["quadratic"] = torch.cat([grid[quadratic_t], torch.zeros(1, dtype=torch.float64)])
        stock_bits = {name: _bits_per_dim(true_cost, nearest_path(grid, s)) for name, s in stock.items()}
        assert all(dp < bits for bits in stock_bits.values()), (steps, dp, stock_bits)
        # 64 latents with common noise recover > 90% of the gain of the exact-cost DP over the best stock
        # schedule (measured 96-99%: excess 0.02-0.06 / 0.007-0.016 / 0.003-0.005 bits/dim at K = 5/10/20).
        assert dp - exact_dp < 0.1 * (min(stock_bits.values()) - exact_dp), (steps, dp, exact_dp, stock_bits)
    assert model.calls - calls == 3 * len(grid)  # one call per candidate (batched over the 64 latents)


def test_sigmas_contract_and_determinism(toy):
    model, data, grid, _ = toy
    sigmas, errors = optimize_schedule(model, data, 8, grid, seed=5)
    assert sigmas.dtype == torch.float32 and len(sigmas) == 9 and sigmas[-1] == 0
    assert (sigmas[1:] < sigmas[:-1]).all() and sigmas[0] == float(grid[-1])
    assert all(any(abs(float(s) - float(g)) < 1e-6 * float(g) for g in grid) for s in sigmas[:-1])
    again, _ = optimize_schedule(model, data, 8, grid, seed=5)
    assert torch.equal(sigmas, again)
    calls = model.calls
    cached, _ = optimize_schedule(model, data, 8, grid, seed=5, errors=errors)
    assert torch.equal(cached, sigmas) and model.calls == calls  # reusing the probe: no model calls
    pinned, _ = optimize_schedule(model, data, 4, grid, seed=5, errors=errors, start_sigma=2.0)
    assert abs(float(pinned[0]) - 2.0) < 0.05


@pytest.mark.parametrize("bad,match", [(torch.zeros(4, 16), "constant"), (torch.full((4, 16), float("nan")), "NaN"),
                                       (torch.zeros(0, 16), "batch")])
def test_refuses_data_that_is_not_data(toy, bad, match):
    model, _, grid, _ = toy
    with pytest.raises(ValueError, match=match):
        optimize_schedule(model, bad.double(), 5, grid)


def test_too_many_steps_for_the_grid():
    with pytest.raises(ValueError, match="cannot be taken"):
        dp_optimal_path(_random_cost(6, 0), 6, 5)


def test_probe_cache_round_trip_and_misses(tmp_path, toy):
    from comfyui_fast_samplers.samplers.dp_schedule import cache_key, load_probe, save_probe

    model, data, grid, _ = toy
    errors = probe_mse(model, data, grid, model.schedule, seed=0)
    key = cache_key("model", data, grid, 0)
    assert key != cache_key("model", data, grid, 1) and key == cache_key("model", data.clone(), grid, 0)
    assert load_probe(tmp_path, key, grid) is None
    save_probe(tmp_path, key, grid, errors, {"seed": 0})
    assert torch.equal(load_probe(tmp_path, key, grid), errors)
    assert load_probe(tmp_path, key, grid[1:]) is None  # another grid is a miss
    (tmp_path / f"{key}.safetensors").write_bytes(b"damaged")
    assert load_probe(tmp_path, key, grid) is None
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("parametrization", ["ve", "flow"])
def test_local_error_cost_is_the_one_step_error_against_the_exact_ode(parametrization):
    from comfyui_fast_samplers.samplers.dp_schedule import probe_local_error
    from comfyui_fast_samplers.testbeds.mixtures import default_mixture, solve_pf_ode

    mix = default_mixture()
    model = ExactModel(mix, parametrization)
    schedule = model.schedule
    x0, _ = mix.sample(32, torch.Generator().manual_seed(1))
    top = 5.0 if parametrization == "ve" else 0.9
    grid = torch.exp(torch.linspace(math.log(0.05), math.log(top), 8, dtype=torch.float64))
    cost = probe_local_error(model, x0, grid, schedule, seed=0, substeps=64)
    assert model.calls == 8 + 64 * 8 * 7 // 2  # one reference walk per candidate
    assert cost[1, 0] == 0 and torch.isinf(cost[2, 3]) and bool((cost[2:, 1:-1][torch.tril(
        torch.ones(7, 7, dtype=torch.bool))] > 0).all())
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t, s in ((8, 3), (5, 1)):
        sig_t, sig_s = torch.tensor(float(grid[t - 1]), dtype=torch.float64), torch.tensor(float(grid[s - 1]), dtype=torch.float64)
        xt = schedule.add_noise(x0, eps, sig_t)
        reference = solve_pf_ode(model, xt, float(sig_t), float(sig_s))
        d = model(xt, torch.full((32,), float(sig_t), dtype=torch.float64))
        ddim = schedule.alpha(sig_s) * (d + schedule.lam(sig_s) / schedule.lam(sig_t) * (xt / schedule.alpha(sig_t) - d))
        direct = float((ddim - reference).pow(2).sum(1).mean()) / 2
        assert float(cost[t, s]) == pytest.approx(direct, rel=0.02)


def test_local_error_objective_through_optimize_schedule(toy):
    model, data, grid, _ = toy
    small = grid[::10]  # 25 candidates
    sigmas, cost = optimize_schedule(model, data[:16], 5, small, objective="local_error", substeps=2)
    assert cost.shape == (26, 26) and len(sigmas) == 6 and float(sigmas[-1]) == 0
    assert bool((sigmas[1:] < sigmas[:-1]).all()) and set(sigmas[:-1].tolist()) <= set(small.float().tolist())
    again, _ = optimize_schedule(None, data[:16], 5, small, objective="local_error", errors=cost)
    assert torch.equal(again, sigmas)
    with pytest.raises(ValueError, match="unknown objective"):
        optimize_schedule(model, data, 5, small, objective="fid")


def test_local_error_with_flow_sigma_one_as_a_candidate():
    """The node's flow grid always holds sigma = 1 (lambda infinite): costs stay finite (the segment to it is
    sub-stepped in sigma, states stay in model space) and the DP gives a strictly decreasing schedule."""
    from comfyui_fast_samplers.samplers.dp_schedule import probe_local_error
    from comfyui_fast_samplers.testbeds.mixtures import default_mixture

    mix = default_mixture()
    model = ExactModel(mix, "flow")
    x0, _ = mix.sample(16, torch.Generator().manual_seed(1))
    grid = torch.cat([torch.linspace(0.02, 0.95, 9, dtype=torch.float64), torch.ones(1, dtype=torch.float64)])
    cost = probe_local_error(model, x0, grid, model.schedule, seed=0, substeps=4)
    lower = torch.tril(torch.ones(11, 11, dtype=torch.bool), diagonal=-1)
    assert bool(torch.isfinite(cost[lower]).all())
    sigmas, _ = optimize_schedule(None, x0, 5, grid, "flow", objective="local_error", errors=cost)
    assert float(sigmas[0]) == 1.0 and bool((sigmas[1:] < sigmas[:-1]).all()) and float(sigmas[-1]) == 0


def test_half_precision_latents_are_probed_in_float32(toy):
    """fp16 latents (a half-precision VAE) are probed in float32: the model sees float32 inputs, the
    errors are finite and equal those of the float32 probe of the same (fp16-rounded) data."""
    model, data, grid, _ = toy
    seen = []

    def spy(x, sigma, **extra):
        seen.append(x.dtype)
        return model(x, sigma, **extra)

    half = probe_mse(spy, data.half(), grid[::10], model.schedule, seed=0)
    full = probe_mse(model, data.half().float(), grid[::10], model.schedule, seed=0)
    assert set(seen) == {torch.float32} and torch.isfinite(half).all()
    torch.testing.assert_close(half, full, rtol=1e-6, atol=0)


def test_start_sigma_below_the_candidates_is_refused(toy):
    model, data, grid, _ = toy
    errors = torch.ones(4, len(grid), dtype=torch.float64)
    for start_sigma, steps in ((0.5 * float(grid[0]), 1), (float(grid[2]), 5)):
        with pytest.raises(ValueError, match="raise start_sigma .* or lower steps"):
            optimize_schedule(model, data, steps, grid, errors=errors, start_sigma=start_sigma)
    sigmas, _ = optimize_schedule(model, data, 3, grid, errors=errors, start_sigma=float(grid[2]))
    assert float(sigmas[0]) == pytest.approx(float(grid[2]))


def test_schedule_from_probe_and_its_report():
    """The node's path: per-sample errors -> cost matrix -> exact DP -> report. The report's totals are
    the path costs in bits per element (cost / (dim ln 2)) for the chosen path and every stock schedule;
    a stock schedule two of whose sigmas snap to one candidate reports nan."""
    from comfyui_fast_samplers.samplers.dp_schedule import cost_matrix, schedule_from_probe

    grid = GRID[::25]
    gen = torch.Generator().manual_seed(3)
    errors = torch.rand(4, len(grid), dtype=torch.float64, generator=gen) * grid**2 / (1 + grid**2)
    dim, steps = 16, 5
    result = schedule_from_probe(errors, grid, steps, dim, "ve", "large", "mse")
    cost = cost_matrix(grid, errors.mean(0), dim, NoiseSchedule("ve"), "large", "mse")
    assert torch.equal(result.cost, cost)
    assert (result.total, result.path) == dp_optimal_path(cost, steps, len(grid))
    expected = torch.cat([grid[[j - 1 for j in result.path[:-1]]], torch.zeros(1, dtype=grid.dtype)]).float()
    assert result.path[-1] == 0 and torch.equal(result.sigmas, expected)
    karras = karras_sigmas(steps, float(grid[0]), float(grid[-1]))
    clumped = torch.tensor([float(grid[-1]), float(grid[-1]) * 0.999, 1.0, 0.5, 0.1, 0.0], dtype=torch.float64)
    lines = result.report(grid, {"karras": karras, "clumped": clumped}, n_latents=4).splitlines()
    bits = dim * math.log(2)
    assert lines[3] == f"total: {result.total / bits:.4g} bits/dim (relative: latents are continuous)"
    assert lines[4] == f"karras: {path_cost(cost, nearest_path(grid, karras)) / bits:.4g} bits/dim"
    assert lines[5] == "clumped: nan bits/dim"
    assert "fewer than 16" in lines[0]
