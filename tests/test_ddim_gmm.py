import math
import warnings

import pytest
import torch

from comfyui_fast_samplers.samplers.ddim_gmm import (
    make_directions, mixture_noise, plan_ddim_gmm, run_directions, sample_ddim_gmm,
)
from comfyui_fast_samplers.samplers.schedule import NoiseSchedule, flow_shift_sigmas, karras_sigmas
from comfyui_fast_samplers.testbeds.mixtures import (
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


@pytest.mark.parametrize("dim", [64, 32768])  # K independent Gaussian rows / K shifts of one vector
def test_directions_are_orthonormal_and_seeded(dim):
    u = make_directions(dim, 8, 3, dtype=torch.float64)
    assert u.shape == (8, dim)
    torch.testing.assert_close(u @ u.T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(u, make_directions(dim, 8, 3, dtype=torch.float64))
    assert not torch.equal(u, make_directions(dim, 8, 4, dtype=torch.float64))


def test_run_directions_cache_returns_each_keys_own_directions():
    """The one-entry cache of a run's directions gives make_directions' result for every (size, count, seed,
    dtype), also after another key evicted it (a cache keyed without the seed or the size would hand one run's
    directions to the next)."""
    first = run_directions(64, 4, 1, "cpu", torch.float64)
    assert torch.equal(first, make_directions(64, 4, 1, dtype=torch.float64))
    for dim, count, seed, dtype in ((64, 4, 2, torch.float64), (32, 4, 1, torch.float64), (64, 2, 1, torch.float64),
                                    (64, 4, 1, torch.float32)):
        assert torch.equal(run_directions(dim, count, seed, "cpu", dtype), make_directions(dim, count, seed, dtype=dtype))
    assert torch.equal(run_directions(64, 4, 1, "cpu", torch.float64), first)


C2_STEP = torch.tensor([1.2, 0.9, 0.0], dtype=torch.float64)  # one VE step, eta = 1: c^2 = 0.354


def _draws(covariance, scale, units="vp", n=100_000, dim=32, K=8, seed=0):
    """n draws of one step's kernel noise (offsets + noise) around a fixed mean, and the step's
    own (shifted) offset directions."""
    step = plan_ddim_gmm(C2_STEP, NoiseSchedule("ve"), dim, eta=1.0, components=K, scale=scale, scale_units=units,
                         covariance=covariance, offset_seed=seed)[0]
    directions = make_directions(dim, K, seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 10)
    z = torch.randn(n, dim, dtype=torch.float64, generator=g)
    onehot = torch.nn.functional.one_hot(torch.randint(K, (n,), generator=g), K).to(torch.float64)
    return step, torch.roll(directions, step.shift, dims=1), mixture_noise(step, directions, z, onehot)


def _paper_covariance(covariance, c2, b, K):
    """The kernel covariance in the u basis from the paper's equations (independent of the code):
    offsets delta_k = size (u_k - u_bar) give b (I - J/K), b = size^2/K; the noise is c^2 I minus
    strict: the offsets' covariance; vub: the eigenvalue bound b per direction (Eq. 12);
    diag: the diagonal of Delta_k = S; negative variances clipped to 0."""
    offsets = b * (torch.eye(K, dtype=torch.float64) - 1.0 / K)
    if covariance == "strict":
        return c2 * torch.eye(K, dtype=torch.float64)
    removed = b if covariance == "vub" else b * (1 - 1 / K)
    return max(c2 - removed, 0.0) * torch.eye(K, dtype=torch.float64) + offsets


@pytest.mark.parametrize("covariance,scale,units", [
    ("strict", 0.9, "relative"),  # b = 0.81 c^2: a 10% error in the removed variance moves >= 0.07 c^2
    ("vub", 0.97, "vp"),  # b = 0.6 c^2 (feasible)
    ("vub", 1.77, "vp"),  # b = 2 c^2: clipped, the offsets' variance b survives along the centred directions
    ("diag", 0.97, "vp"),  # removed b (1 - 1/K) = 0.53 c^2
])
def test_variance_along_every_offset_direction(covariance, scale, units):
    """Per-direction variance along the u_k, along the offsets delta_k and along u_bar (not the
    trace) equals the paper's kernel within 0.03 c^2 (Monte-Carlo std 0.0045 v at n = 1e5, so
    the bound is > 5 sigma); a 10% error in any mode's correction moves one of them by >= 0.05 c^2.
    Outside the offsets' span the variance is c^2; the mean is zero."""
    K, n = 8, 100_000
    step, u, draws = _draws(covariance, scale, units, n=n, K=K)
    c2, b = step.c**2, step.size**2 / K
    expected = _paper_covariance(covariance, c2, b, K)
    coords = draws @ u.T  # [n, K]
    measured = torch.cov(coords.T)
    axes = torch.cat([torch.eye(K, dtype=torch.float64),  # the u_k
                      torch.eye(K, dtype=torch.float64) - 1.0 / K,  # the offsets delta_k / size
                      torch.full((1, K), 1.0, dtype=torch.float64)])  # u_bar
    axes = axes / axes.norm(dim=1, keepdim=True)
    along = lambda cov: torch.einsum("ai,ij,aj->a", axes, cov, axes)  # noqa: E731
    assert float((along(measured) - along(expected)).abs().max()) < 0.03 * c2, (along(measured) / c2,
                                                                                 along(expected) / c2)
    rest = torch.linalg.qr(torch.cat([u.T, torch.randn(u.shape[1], 8, dtype=torch.float64,
                                                       generator=torch.Generator().manual_seed(1))], 1)).Q[:, K:]
    assert float((torch.var(draws @ rest, dim=0) / c2 - 1).abs().max()) < 0.03
    assert float((coords.mean(0).abs() / (measured.diagonal() / n).sqrt().clamp(min=1e-30)).max()) < 5


def test_strict_total_covariance_is_the_gaussian_kernels():
    n, dim = 200_000, 32
    step, _, draws = _draws("strict", 0.9, "relative", n=n, dim=dim)
    c2 = step.c**2
    cov = torch.cov(draws.T)
    assert float((cov - c2 * torch.eye(dim, dtype=torch.float64)).norm() / c2) < 1.5 * dim / math.sqrt(n)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_vub_and_diag_offsets_move_the_mean_by_the_pick(eta):
    """eta = 0: no noise at all, the step adds exactly delta_k = size (u_k - u_bar); zero-mean over k."""
    step = plan_ddim_gmm(C2_STEP, NoiseSchedule("ve"), 16, eta=eta, components=4, scale=0.3, covariance="vub")[0]
    u = make_directions(16, 4, 0, dtype=torch.float64)
    if eta == 0:
        out = mixture_noise(step, u, None, torch.eye(4, dtype=torch.float64))
        shifted = torch.roll(u, step.shift, dims=1)
        torch.testing.assert_close(out, step.size * (shifted - shifted.mean(0)), rtol=0, atol=1e-14)
        torch.testing.assert_close(out.norm(dim=1), torch.full((4,), step.size * math.sqrt(0.75), dtype=torch.float64))
        assert float(out.mean(0).abs().max()) < 1e-15
    else:
        assert step.c > 0 and step.std_centred == step.std_mean


def test_strict_infeasible_clamps_with_warning_or_raises():
    with pytest.warns(UserWarning, match="feasibility"):
        step = plan_ddim_gmm(C2_STEP, NoiseSchedule("ve"), 64, eta=1.0, components=8, scale=5.0, covariance="strict")[0]
    assert step.size**2 / 8 <= step.c**2 * (1 + 1e-12) and step.std_centred < 1e-6
    with pytest.raises(ValueError, match="infeasible"):
        plan_ddim_gmm(C2_STEP, NoiseSchedule("ve"), 64, eta=1.0, components=8, scale=5.0, covariance="strict",
                      on_infeasible="error")
    with warnings.catch_warnings():  # eta = 0 strict is DDIM: no mixture
        warnings.simplefilter("ignore")
        step0 = plan_ddim_gmm(C2_STEP, NoiseSchedule("ve"), 64, eta=0.0, components=8, covariance="strict")[0]
    assert not step0.mixture


def test_eta_zero_strict_is_ddim_bit_for_bit():
    model = ExactModel(random_mixture(64, 3, seed=2), "ve")
    sigmas = karras_sigmas(8, 0.03, 14.6)
    x = 14.6 * torch.randn(4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = sample_ddim_gmm(model, x, sigmas, extra_args={"seed": 1}, eta=0.0, components=8, covariance="strict",
                            disable=True)
    b = sample_ddim_gmm(model, x, sigmas, extra_args={"seed": 1}, eta=0.0, components=1, disable=True)
    assert torch.equal(a, b)
    # and that is DDIM(0) = Euler on VE
    torch.testing.assert_close(b, _euler_ancestral(model, x, sigmas, 1, 0.0), rtol=1e-12, atol=1e-12)


def test_video_and_flat_latents_are_one_sample_per_batch_row():
    """A 5-D video latent [B, C, T, H, W] and ComfyUI's flattened nested latent [B, N] of the same
    numbers give the same bits: the mixture acts per sample on the flattened latent."""
    mix = random_mixture(4 * 3 * 4 * 4, 3, seed=1)
    model = ExactModel(mix, "flow")
    sigmas = flow_shift_sigmas(6, 3.0)
    x = torch.randn(2, 4, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    opts = dict(extra_args={"seed": 5}, eta=0.7, components=8, scale=0.9, scale_units="relative", covariance="strict",
                disable=True)
    video = sample_ddim_gmm(model, x, sigmas, **opts)
    flat = sample_ddim_gmm(model, x.reshape(2, -1), sigmas, **opts)
    assert video.shape == x.shape and torch.isfinite(video).all()
    assert torch.equal(video.reshape(2, -1), flat)


def test_no_host_device_sync_in_the_loop():
    """The plan, the directions and every pick exist before the first model call; the loop
    reads nothing back to the host."""
    from sync_counter import CountSyncs

    sigmas = karras_sigmas(12, 0.03, 14.6).to(torch.float32)
    x = torch.randn(2, 4, 8, 8)
    counter = CountSyncs()
    at_call = []

    def model(x, sigma, **extra_args):
        at_call.append(counter.syncs)
        return 0.5 * x

    for opts in ({"eta": 0.5, "covariance": "strict", "scale": 0.9, "scale_units": "relative"},
                 {"eta": 0.0, "covariance": "vub", "scale": 0.1}, {"eta": 0.5, "covariance": "diag", "scale": 0.1}):
        at_call.clear()
        with counter:
            sample_ddim_gmm(model, x, sigmas, extra_args={"seed": 0}, disable=True, **opts)
        assert len(at_call) == 12 and at_call[-1] == at_call[0], (opts, at_call)


def test_empty_batch_is_named():
    model = ExactModel(default_mixture(), "ve")
    with pytest.raises(ValueError, match="DDIM-GMM Sampler node.*empty"):
        sample_ddim_gmm(model, torch.zeros(0, 2, dtype=torch.float64), karras_sigmas(4, 0.1, 10.0), disable=True)


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
    """10 steps, 4 isotropic modes in d = 16: strict GMM close to DDIM (it cannot change the
    moments); every variant finite. The seed-to-seed spread of sliced W2 here is about +-7%
    (seeds 0-2: DDIM 0.083 / 0.089 / 0.098, strict 0.092 / 0.089 / 0.096), so the 15% bound
    catches gross errors only; the per-direction moment tests guard the corrections."""
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
    assert abs(results["strict"][0] / results["ddim"][0] - 1) < 0.15, results
    assert all(w < 0.1 for w, _ in results.values()), results


def test_bad_inputs():
    model = ExactModel(default_mixture(), "ve")
    x = torch.randn(4, 2, dtype=torch.float64)
    sig = karras_sigmas(4, 0.1, 10.0)
    with pytest.raises(ValueError, match="eta must be in"):
        sample_ddim_gmm(model, x, sig, eta=1.5, disable=True)
    with pytest.raises(ValueError, match="covariance"):
        sample_ddim_gmm(model, x, sig, covariance="full", disable=True)
    capped = sample_ddim_gmm(model, x, sig, extra_args={"seed": 0}, eta=0.5, components=8, scale=0.5, scale_units="relative", disable=True)
    two = sample_ddim_gmm(model, x, sig, extra_args={"seed": 0}, eta=0.5, components=2, scale=0.5, scale_units="relative", disable=True)
    assert torch.equal(capped, two)  # K is capped at the latent size (2 here)
    with pytest.raises(ValueError, match="non-increasing"):
        sample_ddim_gmm(model, x, torch.tensor([1.0, 2.0, 0.0]), disable=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_latents(dtype):
    model = ExactModel(random_mixture(4 * 8 * 8, 3, seed=1), "ve")
    x = 14.6 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sample_ddim_gmm(model, x.to(dtype), karras_sigmas(8, 0.03, 14.6).float(), extra_args={"seed": 0}, eta=0.5,
                          covariance="strict", scale=0.9, scale_units="relative", disable=True)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


def test_every_preset_keeps_samples_on_the_modes():
    """Every DDIM-GMM dropdown entry puts no more samples between the modes, and no worse mode
    weights, than DDIM with its eta (K = 1) on the 64-D exact mixture at 20 karras steps, where
    the paper's eta = 0 vub setting (the old fs_ddim_gmm) put 83% between modes. Bounds: DDIM's
    rate + 0.015 (500 samples: binomial std ~0.0045 at rate 0.01) and mode-TV + 0.03 (its seed std
    is ~0.01); they catch mode mixing, not a small loss of mode-weight accuracy."""
    from comfyui_fast_samplers.samplers.presets import PRESET_OPTIONS
    from comfyui_fast_samplers.testbeds.mixtures import chi2_rms_radius, off_mode_rate

    mix = random_mixture(64, 6, seed=1)
    model = ExactModel(mix, "ve")
    sigmas = karras_sigmas(20, 0.0292, 14.615)
    x = 14.615 * torch.randn(500, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    radius = chi2_rms_radius(64)
    presets = {name: opts for name, (fn, opts) in PRESET_OPTIONS.items() if fn is sample_ddim_gmm}
    assert presets
    ddim = {eta: sample_ddim_gmm(model, x, sigmas, extra_args={"seed": 0}, disable=True, eta=eta, components=1)
            for eta in {opts["eta"] for opts in presets.values()}}
    for name, opts in presets.items():
        out = sample_ddim_gmm(model, x, sigmas, extra_args={"seed": 0}, disable=True, **opts)
        assert off_mode_rate(out, mix, radius) <= off_mode_rate(ddim[opts["eta"]], mix, radius) + 0.015, name
        assert mode_weight_error(out, mix) <= mode_weight_error(ddim[opts["eta"]], mix) + 0.03, name
