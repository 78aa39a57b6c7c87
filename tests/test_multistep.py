"""The shared multistep core: divided differences against exact polynomials, and the corrector's order
on unequal grids (Karras, and a random grid refined by splitting each of its steps)."""
import math

import numpy as np
import pytest
import torch

from comfyui_fast_samplers.samplers import sample_dpmpp_2m, sample_er_sde
from comfyui_fast_samplers.samplers.multistep import StepRow, derivative_weights, merge_correction, run_rows
from comfyui_fast_samplers.samplers.schedule import karras_sigmas
from comfyui_fast_samplers.testbeds.mixtures import ExactModel, default_mixture, marginal_sample, solve_pf_ode


@pytest.mark.parametrize("nodes", [[0.7, 0.3], [2.0, 1.1, 0.2], [5.0, 3.2, 1.0, -0.4], [1e-3, 7e-4, 2e-4, 1e-4],
                                   [3.0, 2.2, 1.3, 0.9, 0.1]])
@pytest.mark.parametrize("where", ["first node", "second node", "between nodes"])
def test_derivative_weights_are_exact_on_polynomials(nodes, where):
    """Weights of P', P'', P''' reproduce the derivatives of a random polynomial of the interpolation degree
    (and give 0 beyond it) at the first node (the predictors), the second (the corrector) and between nodes:
    the closed forms of 2-4 nodes and Fornberg's recursion (5 nodes)."""
    rng = np.random.default_rng(len(nodes))
    spread = max(nodes) - min(nodes)  # O(1) coefficients in units of the node spread: a well-posed test
    poly = np.polynomial.Polynomial(rng.normal(size=len(nodes)))
    u = (np.array(nodes) - 0.3 * spread) / spread
    values = poly(u)
    at = {"first node": nodes[0], "second node": nodes[1], "between nodes": 0.6 * nodes[0] + 0.4 * nodes[1]}[where]
    weights = derivative_weights(nodes, at, 3)
    for k in range(3):
        expected = poly.deriv(k + 1)((at - 0.3 * spread) / spread) / spread ** (k + 1) if k + 1 < len(nodes) else 0.0
        assert weights[k] @ values == pytest.approx(expected, rel=1e-9, abs=1e-9 / spread ** (k + 1))


def test_merge_correction_folds_the_state_change_into_the_next_step():
    row = StepRow(2.0, 1.0, A=0.5, W=(0.3, 0.2))
    merged = merge_correction(row, (0.1, -0.1, 0.04))
    assert merged.W == pytest.approx((0.3 + 0.05, 0.2 - 0.05, 0.02))
    assert merge_correction(StepRow(1.0, 0.0, A=0.0, W=(1.0,)), (0.1, 0.2)).W == (1.0,)  # final denoise


STEPS = (20, 40, 80, 160)


def _random_grid(n, s_min, s_max):
    """A 10-step grid with random log-sigma gaps (ratios up to ~6), each gap split into n/10 equal parts."""
    gaps = np.random.default_rng(5).uniform(0.3, 1.8, 10)
    knots = math.log(s_max) - np.concatenate([[0], np.cumsum(gaps)]) / gaps.sum() * math.log(s_max / s_min)
    fine = np.concatenate([np.linspace(a, b, n // 10 + 1)[:-1] for a, b in zip(knots[:-1], knots[1:])] + [knots[-1:]])
    return torch.tensor(np.exp(fine), dtype=torch.float64)


@pytest.fixture(scope="module")
def ve_problem():
    mix = default_mixture()
    model = ExactModel(mix, "ve")
    x, _ = marginal_sample(mix, 256, 14.6, model.schedule, torch.Generator().manual_seed(0))
    return model, x, solve_pf_ode(model, x, 14.6, 0.029)


def _slope(problem, grid, **options):
    model, x, ref = problem
    errors = []
    for n in STEPS:
        sigmas = karras_sigmas(n, 0.029, 14.6)[:-1] if grid == "karras" else _random_grid(n, 0.029, 14.6)
        out = sample_er_sde(model, x.clone(), sigmas, disable=True, noise_fn="ode", **options)
        errors.append(float((out - ref).norm(dim=1).median()))
    return math.log(errors[0] / errors[-1]) / math.log(STEPS[-1] / STEPS[0]), errors


@pytest.mark.parametrize("grid", ["karras", "random"])
@pytest.mark.parametrize("order,plain,corrected", [(2, 1.8, 2.7), (3, 2.5, 3.7)])
def test_corrector_raises_the_order_on_unequal_grids(ve_problem, grid, order, plain, corrected):
    """Measured (VE, median error 20 -> 160 steps): order 2 2.0 -> 2.8-2.9, order 3 2.9-3.0 -> 4.1-4.3.
    These bounds do not catch a 10% error in c4 (its effect stays below the h^4 term at these step counts):
    test_corrector_weights_integrate_the_corrector_polynomial does."""
    slope_plain, _ = _slope(ve_problem, grid, order=order)
    slope_corr, errors = _slope(ve_problem, grid, order=order, corrector=True)
    assert slope_plain >= plain and slope_corr >= corrected, (slope_plain, slope_corr, errors)


def test_corrector_costs_no_extra_evaluation():
    model = ExactModel(default_mixture(), "ve")
    x = 14.6 * torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sample_er_sde(model, x, karras_sigmas(7, 0.029, 14.6), noise_fn="ode", corrector=True, disable=True)
    assert model.calls == 7


def test_corrector_refuses_stochastic_noise():
    model = ExactModel(default_mixture(), "ve")
    with pytest.raises(ValueError, match="corrector is for the ODE"):
        sample_er_sde(model, torch.zeros(2, 2), karras_sigmas(5, 0.029, 14.6), noise_fn="sde_5", corrector=True)


def test_dpmpp_2m_step_ratio_on_a_karras_grid(ve_problem):
    """DPM-Solver++(2M) against an independent transcription of k-diffusion's update on a Karras grid
    (every step ratio differs from 1), to 1e-12: an inverted ratio r would differ by ~1e-2."""
    model, x, _ = ve_problem
    sigmas = karras_sigmas(12, 0.029, 14.6)
    ours = sample_dpmpp_2m(model, x.clone(), sigmas, disable=True)
    s = sigmas.tolist()
    y, old = x.clone(), None
    for i in range(len(s) - 1):
        denoised = model(y, torch.full((len(y),), s[i], dtype=torch.float64))
        if s[i + 1] == 0:
            y = denoised
            break
        t, t_next = -math.log(s[i]), -math.log(s[i + 1])
        h = t_next - t
        if old is None:
            y = (s[i + 1] / s[i]) * y - math.expm1(-h) * denoised
        else:
            r = (t - (-math.log(s[i - 1]))) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            y = (s[i + 1] / s[i]) * y - math.expm1(-h) * d
        old = denoised
    torch.testing.assert_close(ours, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lams", [[0.8, 1.0], [0.5, 0.9, 1.6], [0.05, 0.09, 0.12, 0.3], [2.0, 3.7, 5.1, 9.0]])
def test_corrector_weights_integrate_the_corrector_polynomial(lams):
    """Independent reference: the corrector changes y_t by lam_t * int_{lam_t}^{lam_s} (P_corr - P_pred)/lam^2,
    P_corr through (lam_t, lam_s, history...), P_pred through (lam_s, history...), by numpy polyfit and scipy
    quad. Catches a 10% error in any c_k and a wrong node set."""
    from scipy.integrate import quad

    from comfyui_fast_samplers.samplers.er_sde import _ode_correction, make_noise_function
    from comfyui_fast_samplers.samplers.er_sde_ode_plan import predictor_weight_rows

    lam_t, nodes = lams[0], lams[1:]  # nodes: lam_s, lam_s1, ... (newest first)
    values = np.random.default_rng(len(lams)).normal(size=len(lams))  # D_t, D_s, D_s1, ...
    predictor = predictor_weight_rows(nodes, len(nodes), "corrected")
    change = _ode_correction(lam_t, nodes[0], 1.0, list(nodes), predictor, make_noise_function("ode"), "exact")
    p_corr = np.polynomial.Polynomial.fit(lams, values, len(lams) - 1)
    p_pred = np.polynomial.Polynomial.fit(nodes, values[1:], len(nodes) - 1)
    integrand = lambda lam: (p_corr(lam) - p_pred(lam)) / lam**2  # noqa: E731
    expected = lam_t * quad(integrand, lam_t, nodes[0], epsabs=0, epsrel=1e-13)[0]
    assert float(np.dot(change, values)) == pytest.approx(expected, rel=1e-9, abs=1e-13)


def test_flow_first_step_keeps_the_mode_assignment_of_the_exact_ode():
    """From flow sigma = 1 (lambda infinite, the first step exact, the next without the infinite node) the
    corrected ODE puts every one of 500 samples in the mode the exact ODE does (measured: 0 flips at 50
    steps, 1 at 20), and on average close to it."""
    from comfyui_fast_samplers.samplers.schedule import flow_shift_sigmas

    mix = default_mixture()
    model = ExactModel(mix, "flow")
    noise = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    end = solve_pf_ode(model, noise, 1.0 - 1e-9, 1e-4, rtol=1e-10)
    truth = model(end, torch.full((500,), 1e-4, dtype=torch.float64))
    out = sample_er_sde(model, noise.clone(), flow_shift_sigmas(50, 3.0), noise_fn="ode", corrector=True,
                        disable=True)
    assert int((mix.classify(out) != mix.classify(truth)).sum()) == 0
    assert float((out - truth).norm(dim=1).mean()) < 0.01  # measured 0.0062 (the last step, 0.06 -> 0, dominates)


def test_corrected_final_step_adds_the_corrector_change_of_the_last_state():
    """final_step='corrected' = D(x_pred) + (x_corr - x_pred) at the last noise level. x_corr comes here from
    another route: the same run with the final 0 replaced by a step of length ~0 (that step starts from the
    corrected state, folded in by merge_correction)."""
    model = ExactModel(default_mixture(), "ve")
    x = 14.6 * torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sigmas = karras_sigmas(6, 0.029, 14.6)
    states = []
    denoise = sample_er_sde(model, x.clone(), sigmas, noise_fn="ode", corrector=True, disable=True,
                            callback=lambda d: states.append(d["x"]))
    corrected = sample_er_sde(model, x.clone(), sigmas, noise_fn="ode", corrector=True, final_step="corrected",
                              disable=True)
    almost = sigmas.clone()
    almost[-1] = sigmas[-2] * (1 - 1e-9)
    x_corr = sample_er_sde(model, x.clone(), almost, noise_fn="ode", corrector=True, disable=True)
    torch.testing.assert_close(corrected, denoise + (x_corr - states[-1]), rtol=0, atol=1e-7)
    assert float((corrected - denoise).abs().max()) > 1e-4  # the correction is not nothing
    plain = sample_er_sde(model, x.clone(), sigmas, noise_fn="ode", final_step="corrected", disable=True)
    torch.testing.assert_close(plain, sample_er_sde(model, x.clone(), sigmas, noise_fn="ode", disable=True))


def test_batched_quadrature_matches_each_step_alone():
    """Steps of one to seven Gauss-Legendre panels in one evaluation give what each gives alone (the panels
    a step lacks carry no weight), and match the power-law closed forms."""
    from comfyui_fast_samplers.samplers.noise_scales import (
        make_noise_function, quadrature_rows, taylor_coefficients_power,
    )

    lam_t, lam_s = [0.5, 0.03, 1.0, 2.0], [0.6, 0.9, 2.0, 60.0]  # u = 0.18 .. 3.4
    for name in ("sde_5", "reverse_sde"):
        fn = make_noise_function(name)
        together = quadrature_rows(fn, lam_t, lam_s, 3)
        for r in range(len(lam_t)):
            alone = quadrature_rows(fn, [lam_t[r]], [lam_s[r]], 3)[0]
            np.testing.assert_allclose(together[r], alone, rtol=1e-14, atol=0)
            if name == "reverse_sde":
                np.testing.assert_allclose(together[r][:2], taylor_coefficients_power(2.0, lam_t[r], lam_s[r]), rtol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_run_rows_calls_the_model_with_each_rows_sigma_batch_in_the_latents_dtype(dtype):
    """The sigma batches built before the loop are what ``model_sigmas[i] * x.new_ones(batch)`` gives per step
    (ComfyUI's ``sigma * s_in``): the row's sigma in x's dtype, one per sample; a shifted index or a missing cast
    fails. Skipped rows (evaluate=False) call nothing."""
    x = torch.ones(3, 2, dtype=dtype)
    rows = [StepRow(2.0, 1.5, A=0.5, W=(0.5,)), StepRow(1.5, 1.5, A=1.0, evaluate=False),
            StepRow(1.5, 0.3, A=0.2, W=(0.8,)), StepRow(0.3, 0.0, A=0.0, W=(1.0,))]
    model_sigmas = torch.tensor([2.0, 1.5, 1.5, 0.3], dtype=torch.float64) + 1e-9  # rounds in float32 / float16
    seen = []
    run_rows(lambda x, sigma: seen.append(sigma.clone()) or x, x, rows, model_sigmas=model_sigmas)
    expected = [model_sigmas[i] * x.new_ones([3]) for i in (0, 2, 3)]
    assert len(seen) == 3
    for got, want in zip(seen, expected):
        assert got.dtype == want.dtype == dtype and got.shape == (3,)
        assert torch.equal(got, want)
