import math
import warnings

import pytest
import torch
from sync_counter import CountSyncs

from comfyui_fast_samplers.samplers import sample_dpmpp_2m, sample_er_sde, sample_euler, sample_heun
from comfyui_fast_samplers.samplers.er_sde import (
    check_options, make_noise_function, taylor_coefficients_power, taylor_coefficients_quadrature,
)
from comfyui_fast_samplers.samplers.schedule import (
    flow_shift_sigmas, karras_sigmas, log_lam_uniform_sigmas,
)
from comfyui_fast_samplers.testbeds.mixtures import (
    ExactModel, default_mixture, gaussian_w2, marginal_sample, random_mixture, single_gaussian, solve_pf_ode,
)

STEPS = (20, 40, 80, 160)


def _slope(errors):
    return -(math.log(errors[-1]) - math.log(errors[0])) / math.log(STEPS[-1] / STEPS[0])


@pytest.fixture(scope="module")
def ode_problems():
    """Exact ODE endpoints for 256 samples: VE (sigma 14.6 -> 0.029) and flow (0.99 -> 0.1)."""
    mix = default_mixture()
    out = {}
    for kind, s_max, s_min in (("ve", 14.6, 0.029), ("flow", 0.99, 0.1)):
        model = ExactModel(mix, kind)
        x, _ = marginal_sample(mix, 256, s_max, model.schedule, torch.Generator().manual_seed(0))
        out[kind] = (model, x, solve_pf_ode(model, x, s_max, s_min), s_max, s_min)
    return out


def _errors(problem, sampler, **options):
    model, x, ref, s_max, s_min = problem
    errors = []
    for n in STEPS:
        sigmas = log_lam_uniform_sigmas(n, s_min, s_max, model.schedule)
        out = sampler(model, x.clone(), sigmas, disable=True, **options)
        errors.append(float((out - ref).norm(dim=1).median()))
    return errors


@pytest.mark.parametrize("kind", ["ve", "flow"])
@pytest.mark.parametrize("order,min_slope", [(1, 0.9), (2, 1.8), (3, 2.5)])
def test_ode_convergence_order(ode_problems, kind, order, min_slope):
    errors = _errors(ode_problems[kind], sample_er_sde, noise_fn="ode", order=order)
    assert _slope(errors) >= min_slope, errors


def test_ode_third_order_absolute_error_on_a_karras_grid(ode_problems):
    """Absolute error at a fixed step count against the exact ODE (not a slope): VE, Karras, 80 steps.
    Measured 8.7e-6 (median over 256 samples); with c3 10% low 1.9e-5, with the paper's derivative 1.5e-4.
    On log-uniform and random grids a 10% c3 error moves the error by < 30% at <= 160 steps, too little
    for a robust bound: test_plan_rows_integrate_the_er_sde_exactly_for_polynomial_denoisers guards there."""
    model, x, ref, s_max, s_min = ode_problems["ve"]
    out = sample_er_sde(model, x.clone(), karras_sigmas(80, s_min, s_max)[:-1], noise_fn="ode", order=3, disable=True)
    error = float((out - ref).norm(dim=1).median())
    assert error < 1.2e-5, error


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_paper_third_order_is_second_order(ode_problems, kind):
    """The published estimator D' = f01 is the midpoint slope: its 'order 3' measures ~2 (spec §2);
    the corrected default is an order of magnitude more accurate at 160 steps."""
    paper = _errors(ode_problems[kind], sample_er_sde, noise_fn="ode", order=3, derivatives="paper")
    corrected = _errors(ode_problems[kind], sample_er_sde, noise_fn="ode", order=3)
    assert 1.8 <= _slope(paper) <= 2.4, paper
    assert corrected[-1] < paper[-1] / 5


def test_classic_samplers_orders(ode_problems):
    assert _slope(_errors(ode_problems["ve"], sample_euler)) >= 0.9
    assert _slope(_errors(ode_problems["ve"], sample_heun)) >= 1.8
    assert _slope(_errors(ode_problems["ve"], sample_dpmpp_2m)) >= 1.8
    assert _slope(_errors(ode_problems["flow"], sample_dpmpp_2m)) >= 1.8


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 2.5, 7.0])
@pytest.mark.parametrize("lam_t,lam_s", [(0.5, 0.53), (0.03, 0.05), (1.0, 14.6), (2.0, 3e4)])
def test_power_law_closed_forms_match_quadrature(p, lam_t, lam_s):
    closed = taylor_coefficients_power(p, lam_t, lam_s)
    quad = taylor_coefficients_quadrature(make_noise_function("power", power=p), lam_t, lam_s)
    for c, q in zip(closed, quad):
        assert c == pytest.approx(q, rel=1e-10, abs=1e-300)


@pytest.mark.parametrize("name", ["sde_1", "sde_4", "sde_5"])
def test_quadrature_matches_the_defining_integrals(name):
    """c2, c3 from the sign-definite Gauss-Legendre form vs scipy's adaptive quadrature of the
    original definitions (spec §2)."""
    from scipy.integrate import quad

    fn = make_noise_function(name)

    def phi(lam):
        return math.exp(float(fn.log_phi(math.log(lam))))

    for lam_t, lam_s in ((0.03, 0.06), (0.5, 1.2), (3.0, 14.6)):
        c2, c3 = taylor_coefficients_quadrature(fn, lam_t, lam_s)
        i1 = quad(lambda lam: 1 / phi(lam), lam_t, lam_s, epsabs=0, epsrel=1e-13)[0]
        i2 = quad(lambda lam: (lam - lam_s) / phi(lam), lam_t, lam_s, epsabs=0, epsrel=1e-13)[0]
        # the defining forms cancel; compare at the precision they can carry
        assert c2 == pytest.approx((lam_t - lam_s) + phi(lam_t) * i1, rel=1e-7)
        assert c3 == pytest.approx((lam_t - lam_s) ** 2 / 2 + phi(lam_t) * i2, rel=1e-6)


# phi and d phi / d lam written out from their definitions (not through NoiseFunction's log-space forms)
_PHI = {
    "ode": (lambda lam: lam, lambda lam: 1.0),
    "reverse_sde": (lambda lam: lam**2, lambda lam: 2 * lam),
    "sde_3": (lambda lam: lam**2.5, lambda lam: 2.5 * lam**1.5),
    "sde_5": (lambda lam: lam * (math.exp(lam**0.3) + 10), lambda lam: math.exp(lam**0.3) * (1 + 0.3 * lam**0.3) + 10),
}


def _unequal_grid(kind, grid):
    if grid == "karras":
        return karras_sigmas(12, 0.03, 14.6) if kind == "ve" else karras_sigmas(12, 0.02, 0.97)
    lo, hi = (0.03, 14.6) if kind == "ve" else (0.02, 0.97)
    u = torch.rand(12, dtype=torch.float64, generator=torch.Generator().manual_seed(len(kind)))
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)  # the grid spans [lo, hi]
    log_sigmas = math.log(lo) + (math.log(hi) - math.log(lo)) * torch.cat([ends, u])
    return torch.cat([log_sigmas.exp().sort(descending=True).values, torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("kind", ["ve", "flow"])
@pytest.mark.parametrize("grid", ["karras", "random"])
@pytest.mark.parametrize("noise_fn", ["ode", "reverse_sde", "sde_3", "sde_5"])
def test_plan_rows_integrate_the_er_sde_exactly_for_polynomial_denoisers(kind, grid, noise_fn):
    """Independent reference for every step of an order-3 plan on unequal grids: the ER-SDE step
    y_t = (phi_t/phi_s) y_s + phi_t int_{lam_t}^{lam_s} phi'(lam)/phi(lam)^2 D(lam) dlam + noise, y = x/alpha,
    noise std sqrt(lam_t^2 - lam_s^2 phi_t^2/phi_s^2), is exact when D is a polynomial of degree < the step's
    order through its nodes (the last evaluated lams). Weights on (D_i, D_{i-1}, D_{i-2}) against scipy quad of
    that integral for D = 1, (lam - lam_i), (lam - lam_i)^2; A and E against the closed forms. Catches a 10%
    error in c2 or c3 and a wrong node order (a 10% low c3 still measured slope 2.64 >= 2.5)."""
    from scipy.integrate import quad

    from comfyui_fast_samplers.samplers.er_sde import plan_er_sde

    schedule = ExactModel(default_mixture(), kind).schedule
    sigmas = _unequal_grid(kind, grid)
    plan = plan_er_sde(sigmas, schedule, make_noise_function(noise_fn), order=3)
    tab = schedule.coefficients(sigmas)
    lam, alpha = tab.lam.tolist(), tab.alpha.tolist()
    phi, dphi = _PHI[noise_fn]
    assert [row.order for row in plan.rows[:3]] == [1, 2, 3] and all(r.order == 3 for r in plan.rows[2:])
    for i, row in enumerate(plan.rows[:-1]):
        lam_s, lam_t = lam[i], lam[i + 1]
        ratio = phi(lam_t) / phi(lam_s)
        assert row.A == pytest.approx(alpha[i + 1] / alpha[i] * ratio, rel=1e-12)
        if noise_fn != "ode":
            assert row.E == pytest.approx(alpha[i + 1] * math.sqrt(lam_t**2 - lam_s**2 * ratio**2), rel=1e-10)
        nodes = [lam[i - k] for k in range(row.order)]
        for degree in range(row.order):
            def D(x):
                return (x - lam_s) ** degree
            integral = quad(lambda x: dphi(x) / phi(x) ** 2 * D(x), lam_t, lam_s, epsabs=0, epsrel=1e-13)[0]
            expected = alpha[i + 1] * phi(lam_t) * integral
            got = sum(w * D(node) for w, node in zip(row.W, nodes))
            assert got == pytest.approx(expected, rel=1e-8), (i, degree)
    assert plan.rows[-1].W[0] == 1.0 and plan.rows[-1].A == 0.0  # the final step to sigma 0: the denoised output


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_first_order_ode_is_euler(kind):
    mix = default_mixture()
    model = ExactModel(mix, kind)
    sigmas = karras_sigmas(12, 0.03, 14.6) if kind == "ve" else flow_shift_sigmas(12, 3.0)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    if kind == "ve":
        x = x * 14.6
    ours = sample_er_sde(model, x, sigmas, order=1, noise_fn="ode", disable=True)
    euler = sample_euler(model, x, sigmas, disable=True)
    torch.testing.assert_close(ours, euler, rtol=1e-12, atol=1e-12)


def _euler_ancestral(model, x, sigmas, seed):
    """k-diffusion's sample_euler_ancestral (eta = 1), the reference for phi = lam^2 at order 1, with newer
    ComfyUI's CPU step noise (generator seeded seed + 1, so it differs from the initial noise)."""
    g = torch.Generator().manual_seed(seed + 1)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = model(x, torch.full((x.shape[0],), s[i], dtype=torch.float64))
        sigma_up = min(s[i + 1], (s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2) ** 0.5)
        sigma_down = (s[i + 1] ** 2 - sigma_up**2) ** 0.5
        x = x + (x - denoised) / s[i] * (sigma_down - s[i])
        if s[i + 1] > 0:
            x = x + torch.randn(x.shape, dtype=x.dtype, generator=g) * sigma_up
    return x


def test_first_order_reverse_sde_is_euler_ancestral():
    model = ExactModel(default_mixture(), "ve")
    sigmas = karras_sigmas(10, 0.03, 14.6)
    x = 14.6 * torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ours = sample_er_sde(model, x, sigmas, extra_args={"seed": 7}, order=1, noise_fn="reverse_sde", disable=True)
    torch.testing.assert_close(ours, _euler_ancestral(model, x, sigmas, 7), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("noise_fn,order", [("sde_5", 3), ("reverse_sde", 2), ("ode", 3)])
def test_ve_and_vp_forms_are_one_family(noise_fn, order):
    """Driving the VP-scaled model from x_vp = alpha x_ve with the same noise gives alpha x the VE
    result at every noise level (here at the end, where alpha = 1)."""
    mix = default_mixture()
    sigmas = karras_sigmas(15, 0.03, 14.6)
    x = 14.6 * torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    ve = sample_er_sde(ExactModel(mix, "ve"), x, sigmas, extra_args={"seed": 1}, order=order,
                       noise_fn=noise_fn, disable=True)
    vp = sample_er_sde(ExactModel(mix, "vp"), x / math.sqrt(1 + 14.6**2), sigmas, extra_args={"seed": 1},
                       order=order, noise_fn=noise_fn, disable=True)
    torch.testing.assert_close(vp, ve, rtol=1e-10, atol=1e-10)


def _distribution_errors(kind, **options):
    mix = single_gaussian()
    model = ExactModel(mix, kind)
    if kind == "ve":
        x, _ = marginal_sample(mix, 100_000, 14.6, model.schedule, torch.Generator().manual_seed(1))
    else:
        x = torch.randn(100_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    errors = []
    for nfe in (10, 20, 50):
        sigmas = karras_sigmas(nfe, 0.029, 14.6) if kind == "ve" else flow_shift_sigmas(nfe, 3.0)
        out = sample_er_sde(model, x.clone(), sigmas, extra_args={"seed": 0}, disable=True, **options)
        errors.append(gaussian_w2(out, mix.mean, mix.covariance))
    return errors


@pytest.mark.parametrize("kind", ["ve", "flow"])
@pytest.mark.parametrize("noise_fn", ["sde_5", "reverse_sde"])
def test_stochastic_variants_converge_in_distribution(kind, noise_fn):
    """Bures-W2 to the true data: decreases with NFE, and order 3 beats order 1 at NFE 20.
    (Measured VE sde_5: order 3 .020/.0049/.0034, order 1 .12/.063/.027; MC floor ~.003.)"""
    third = _distribution_errors(kind, noise_fn=noise_fn, order=3)
    first = _distribution_errors(kind, noise_fn=noise_fn, order=1)
    assert third[0] > third[1] > third[2] or third[2] < 0.006, third
    assert third[1] < 0.5 * first[1], (third, first)


def test_power_and_sde_1_a_keep_their_old_names_p_and_a():
    """p= and a= (deprecated) give the very run power= and sde_1_a= give; both names with different values are
    an error. The non-default values change the run, so an alias that was silently dropped would fail here."""
    model = ExactModel(default_mixture(), "ve")
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10.0
    sigmas = karras_sigmas(6, 0.05, 10.0)
    for noise_fn, name, old, value in (("power", "power", "p", 3.0), ("sde_1", "sde_1_a", "a", 0.5)):
        run = dict(extra_args={"seed": 2}, noise_fn=noise_fn, disable=True)
        new_name = sample_er_sde(model, x, sigmas, **run, **{name: value})
        with pytest.warns(DeprecationWarning, match=f"{old}= is deprecated; use {name}="):
            old_name = sample_er_sde(model, x, sigmas, **run, **{old: value})
        assert torch.equal(new_name, old_name)
        assert not torch.equal(new_name, sample_er_sde(model, x, sigmas, **run)), name  # the value is used
        with pytest.warns(DeprecationWarning):  # the same value under both names is accepted
            assert torch.equal(sample_er_sde(model, x, sigmas, **run, **{name: value, old: value}), new_name)
        with pytest.raises(ValueError, match=f"{old}= is the old name of {name}=; give one of them"):
            sample_er_sde(model, x, sigmas, **run, **{name: value, old: value + 1})
        with pytest.raises(ValueError, match=f"{old}= is the old name of {name}="):
            check_options(noise_fn=noise_fn, **{name: value, old: value + 1})


def test_bad_inputs_raise_clear_errors():
    model = ExactModel(default_mixture(), "ve")
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="non-increasing"):
        sample_er_sde(model, x, torch.tensor([1.0, 2.0, 0.0]), disable=True)
    with pytest.raises(ValueError, match="NaN"):
        sample_er_sde(model, torch.full_like(x, float("nan")), karras_sigmas(4, 0.1, 10.0), disable=True)
    with pytest.raises(ValueError, match="NaN"):
        sample_er_sde(model, x, torch.tensor([10.0, float("nan"), 0.0]), disable=True)
    with pytest.raises(ValueError, match="unknown noise function 'sde_9'"):
        sample_er_sde(model, x, karras_sigmas(4, 0.1, 10.0), noise_fn="sde_9", disable=True)
    with pytest.raises(ValueError, match=r"exponent \(power\) must be >= 1"):
        sample_er_sde(model, x, karras_sigmas(4, 0.1, 10.0), noise_fn="power", power=0.5, disable=True)
    with pytest.raises(ValueError, match="order must be one of"):
        sample_er_sde(model, x, karras_sigmas(4, 0.1, 10.0), order=4, disable=True)
    with pytest.raises(ValueError, match="flow"):
        sample_er_sde(ExactModel(default_mixture(), "flow"), x, torch.tensor([2.0, 0.5, 0.0]), disable=True)


def test_repeated_sigma_is_a_zero_length_step():
    """ComfyUI's er_sde returns NaN here; a repeated sigma must simply be skipped."""
    model = ExactModel(default_mixture(), "ve")
    x = 14.6 * torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    base = torch.tensor([14.6, 8.0, 4.0, 2.0, 1.0, 0.5, 0.1, 0.0], dtype=torch.float64)
    repeated = torch.tensor([14.6, 8.0, 4.0, 4.0, 2.0, 1.0, 0.5, 0.1, 0.0], dtype=torch.float64)
    model.calls = 0
    out = sample_er_sde(model, x, repeated, noise_fn="ode", disable=True)
    assert model.calls == len(base) - 1
    torch.testing.assert_close(out, sample_er_sde(model, x, base, noise_fn="ode", disable=True), rtol=0, atol=0)


@pytest.mark.parametrize("noise_fn", ["sde_5", "ode"])
def test_no_host_device_sync_inside_the_loop(noise_fn):
    """Between the first and the last model call (the step loop) nothing reads a tensor value
    back to the host; the float64 plan is built before the loop."""
    sigmas = karras_sigmas(20, 0.03, 14.6).to(torch.float32)
    x = torch.randn(2, 4, 8, 8)
    counter = CountSyncs()
    at_call = []

    def model(x, sigma, **extra_args):
        at_call.append(counter.syncs)
        return 0.5 * x

    with counter:
        sample_er_sde(model, x, sigmas, extra_args={"seed": 0}, noise_fn=noise_fn, disable=True)
    assert len(at_call) == 20
    assert at_call[-1] == at_call[0], at_call


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_latent_dtypes_and_image_shaped_batches(dtype, tol):
    mix = random_mixture(4 * 8 * 8, components=3, seed=1)
    model = ExactModel(mix, "ve")
    sigmas = karras_sigmas(10, 0.03, 14.6).to(torch.float32)
    x = 14.6 * torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ref = sample_er_sde(model, x.double(), sigmas.double(), extra_args={"seed": 3}, noise_fn="ode", disable=True)
    out = sample_er_sde(model, x.to(dtype), sigmas, extra_args={"seed": 3}, noise_fn="ode", disable=True)
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
    rel = float((out.double() - ref).norm() / ref.norm())
    assert rel < tol, rel


def test_batch_members_are_independent():
    model = ExactModel(default_mixture(), "ve")
    sigmas = karras_sigmas(10, 0.03, 14.6)
    x = 14.6 * torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    whole = sample_er_sde(model, x, sigmas, noise_fn="ode", disable=True)
    single = sample_er_sde(model, x[2:3], sigmas, noise_fn="ode", disable=True)
    torch.testing.assert_close(whole[2:3], single, rtol=1e-13, atol=1e-13)


def test_callback_reports_every_step():
    model = ExactModel(default_mixture(), "flow")
    sigmas = flow_shift_sigmas(6)
    seen = []
    sample_er_sde(model, torch.randn(3, 2, dtype=torch.float64), sigmas, callback=seen.append, disable=True)
    assert [d["i"] for d in seen] == list(range(6))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}


def test_reads_the_model_type_from_comfy_model_sampling(comfy_like):
    """A ComfyUI CONST model is sampled as flow without any option; telling it 've' changes it."""
    exact = ExactModel(default_mixture(), "flow")
    sigmas = flow_shift_sigmas(8)
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    wrapped = comfy_like(exact, "CONST")
    as_comfy = sample_er_sde(wrapped, x, sigmas, noise_fn="ode", disable=True)
    torch.testing.assert_close(as_comfy, sample_er_sde(exact, x, sigmas, noise_fn="ode", disable=True), rtol=0, atol=0)
    assert not torch.allclose(as_comfy, sample_er_sde(wrapped, x, sigmas[1:], noise_fn="ode", parametrization="ve",
                                                      disable=True))


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_extreme_strengths_stay_finite_in_float32(kind):
    """phi_eta for eta up to 100 and lam^p up to p = 101 overflow in ComfyUI's arithmetic (NaN for
    eta >= 28); the log-space coefficients must stay finite."""
    model = ExactModel(default_mixture(), kind)
    sigmas = (karras_sigmas(20, 0.029, 14.6) if kind == "ve" else flow_shift_sigmas(20, 3.0)).float()
    x = torch.randn(8, 2) * float(sigmas[0])
    for options in ({"noise_fn": "sde_5", "eta": 100.0}, {"noise_fn": "power", "power": 101.0}):
        out = sample_er_sde(model, x, sigmas, extra_args={"seed": 0}, disable=True, **options)
        assert torch.isfinite(out).all(), options


def test_kappa_below_one_warns_and_adds_no_noise():
    model = ExactModel(default_mixture(), "flow")
    with pytest.warns(UserWarning, match="kappa < 1"):
        sample_er_sde(model, torch.randn(4, 2, dtype=torch.float64), flow_shift_sigmas(10, 3.0),
                      noise_fn="sde_4", disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample_er_sde(ExactModel(default_mixture(), "ve"), torch.randn(4, 2, dtype=torch.float64),
                      karras_sigmas(10, 0.03, 14.6), noise_fn="sde_4", disable=True)


def test_brownian_increments_compose_and_have_unit_variance():
    """The Brownian tree runs in the latent's dtype (float32 for ComfyUI latents). On reverse_sde's clock
    (at 40 steps the first take ~3e-7 of the span) every step's normalised increment has unit variance
    (2^14 numbers, below torch's parallel grain: 3.5% is ~6 standard errors; with query points rounded to
    1e-6 of the span, torchsde's default tolerance, a step misses it by 4.7%), and two half-steps of a 40-step run add up to the step of the
    20-step run with the same seed, to float32 rounding (1e-5 of the increment)."""
    pytest.importorskip("torchsde")
    from comfyui_fast_samplers.samplers.er_sde import brownian_noise_sampler, make_noise_function, plan_er_sde

    from comfyui_fast_samplers.samplers.schedule import NoiseSchedule

    base = karras_sigmas(41, 0.029, 14.6)[:-1]
    dtype = torch.float32
    x = torch.zeros(1, 2**14, dtype=dtype)
    fn, schedule = make_noise_function("reverse_sde"), NoiseSchedule("ve")
    increments = {}
    for name, sig in (("fine", base), ("coarse", base[::2])):
        plan = plan_er_sde(torch.cat([sig, sig.new_zeros(1)]), schedule, fn, 3)
        draw = brownian_noise_sampler(x, plan, seed=7)
        increments[name] = []
        for (sigma, sigma_next), (tau_s, tau_t) in plan.clocks.items():
            z = draw(sigma, sigma_next)
            assert z.dtype == dtype and abs(float(z.double().std()) - 1.0) < 0.035, (name, sigma)
            increments[name].append(z.double() * math.sqrt(tau_t - tau_s))
    assert len(increments["fine"]) == 2 * len(increments["coarse"]) == 40
    for j, coarse in enumerate(increments["coarse"]):
        composed = increments["fine"][2 * j] + increments["fine"][2 * j + 1]
        assert float((composed - coarse).abs().max()) < 1e-5 * float(coarse.abs().max()), j


def test_brownian_noise_is_one_path_across_step_counts():
    """With one seed, Brownian noise makes runs at N and 2N steps sample the same path, so their
    outputs are far closer than with independent per-step noise; the distribution stays right."""
    pytest.importorskip("torchsde")
    model = ExactModel(default_mixture(), "ve")
    x = 14.6 * torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gaps = {}
    for noise in ("gaussian", "brownian"):
        a, b = (sample_er_sde(model, x, karras_sigmas(n, 0.029, 14.6), extra_args={"seed": 3}, noise=noise,
                              noise_fn="reverse_sde", disable=True) for n in (40, 80))
        gaps[noise] = float((a - b).norm(dim=1).mean())
    assert gaps["brownian"] < gaps["gaussian"] / 4, gaps
    mix = single_gaussian()
    x = 14.6 * torch.randn(20_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = sample_er_sde(ExactModel(mix, "ve"), x, karras_sigmas(20, 0.029, 14.6), extra_args={"seed": 3},
                        noise="brownian", disable=True)
    assert gaussian_w2(out, mix.mean, mix.covariance) < 0.03


def test_plan_cache_keys_on_every_input_and_still_warns():
    """The plan cache returns the plan of the same inputs (equal to a fresh one), a new plan when the
    sigmas, the noise function's strength or an option differ, and the kappa < 1 warning on every run."""
    from comfyui_fast_samplers.samplers.er_sde import _plan_of, cached_plan, plan_er_sde
    from comfyui_fast_samplers.samplers.schedule import NoiseSchedule

    _plan_of.cache_clear()
    model = ExactModel(default_mixture(), "flow")
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigmas = flow_shift_sigmas(10, 3.0)
    runs = []
    for _ in range(2):
        with pytest.warns(UserWarning, match="kappa < 1"):
            runs.append(sample_er_sde(model, x, sigmas, extra_args={"seed": 1}, noise_fn="sde_4", disable=True))
    assert _plan_of.cache_info().hits == 1 and torch.equal(*runs)
    schedule, options = NoiseSchedule("flow"), (3, "corrected", "exact", "exact", "denoise", 1.0, None, False)
    plan = cached_plan(sigmas, schedule, make_noise_function("sde_5", eta=0.5), *options)
    assert plan.rows == plan_er_sde(sigmas, schedule, make_noise_function("sde_5", eta=0.5), *options).rows
    assert cached_plan(sigmas, schedule, make_noise_function("sde_5", eta=0.5), *options) is plan
    others = [cached_plan(sigmas, schedule, make_noise_function("sde_5", eta=0.5000001), *options),
              cached_plan(sigmas * 0.999, schedule, make_noise_function("sde_5", eta=0.5), *options),
              cached_plan(sigmas, schedule, make_noise_function("sde_5", eta=0.5), *options[:5], 0.9, None, False)]
    assert all(other.rows != plan.rows for other in others)
