"""The ER ODE's flow forms: the variable a flow model's denoiser is interpolated in (lambda = sigma/(1-sigma),
sigma, or the hybrid: sigma on the steps whose history holds sigma = 1, lambda after them)."""
import pytest
import torch

from comfyui_fast_samplers.samplers import sample_er_sde
from comfyui_fast_samplers.samplers.er_sde import make_noise_function, plan_er_sde
from comfyui_fast_samplers.samplers.schedule import NoiseSchedule, karras_sigmas
from comfyui_fast_samplers.testbeds.mixtures import ExactModel, default_mixture, solve_pf_ode

FLOW = NoiseSchedule("flow")
ODE = make_noise_function("ode")


def _flow_karras(n):
    """sigma = 1, then a Karras grid below it: a long first step (where the lambda form drops D(sigma = 1))."""
    return torch.cat([torch.tensor([1.0], dtype=torch.float64), karras_sigmas(n - 1, 0.002, 0.9)])


def _rows(sigmas, form, **options):
    return plan_er_sde(sigmas, FLOW, ODE, flow_form=form, **options).rows


@pytest.mark.parametrize("order", [2, 3])
def test_hybrid_takes_sigma_rows_while_the_history_holds_sigma_one_and_lambda_rows_after(order):
    """Without the corrector each row depends on its own step and history only: the hybrid's first `order` rows
    are the sigma form's, the rest the lambda form's (a swapped rule or an off-by-one boundary fails)."""
    sigmas = _flow_karras(10)
    hybrid, sigma, lam = (_rows(sigmas, form, order=order) for form in ("hybrid", "sigma", "lambda"))
    assert hybrid[:order] == sigma[:order]
    assert hybrid[order:] == lam[order:]
    assert sigma[order - 1] != lam[order - 1] and sigma[order] != lam[order]  # the boundary is visible


def test_hybrid_with_the_corrector_rejoins_the_lambda_form_one_step_later():
    """With the corrector, the change of the state after the last sigma-form step is folded into the next row;
    from the row after that the hybrid's rows are the lambda form's again."""
    sigmas = _flow_karras(10)
    hybrid, lam = (_rows(sigmas, form, order=3, corrector=True) for form in ("hybrid", "lambda"))
    assert hybrid[3] != lam[3]
    assert hybrid[4:] == lam[4:]


def test_sigma_form_is_the_ve_parametrization_and_forms_agree_where_they_must():
    model = ExactModel(default_mixture(), "flow")
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigmas = _flow_karras(8)
    run = lambda **o: sample_er_sde(model, x.clone(), sigmas, noise_fn="ode", disable=True, **o)  # noqa: E731
    torch.testing.assert_close(run(flow_form="sigma", corrector=True), run(parametrization="ve", corrector=True),
                               rtol=0, atol=0)
    # order 1 (DDIM) is the same step in every form; on a VE model the flow form changes nothing
    torch.testing.assert_close(run(order=1, flow_form="sigma"), run(order=1, flow_form="lambda"), rtol=0, atol=1e-12)
    ve_model = ExactModel(default_mixture(), "ve")
    ve_sigmas = karras_sigmas(8, 0.029, 14.6)
    a = sample_er_sde(ve_model, 14.6 * x, ve_sigmas, noise_fn="ode", flow_form="sigma", disable=True)
    b = sample_er_sde(ve_model, 14.6 * x, ve_sigmas, noise_fn="ode", flow_form="lambda", disable=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hybrid_is_the_ode_default_and_fixes_the_long_first_step():
    """ComfyUI's karras schedule on a flow model (10 steps from sigma = 1, few steps near the top): the lambda
    form loses D(sigma = 1) for the next steps, the hybrid keeps it (measured on 256 noises: mean error 0.049
    vs 0.191 for lambda, 0.057 for sigma throughout; mode flips 5 / 10 / 5)."""
    mix = default_mixture()
    model = ExactModel(mix, "flow")
    x = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigmas = karras_sigmas(10, 0.002, 1.0)
    truth = solve_pf_ode(model, x, 1.0 - 1e-9, 0.002, rtol=1e-10)
    truth = model(truth, torch.full((256,), 0.002, dtype=torch.float64))
    errors = {}
    for form in (None, "hybrid", "lambda", "sigma"):
        out = sample_er_sde(model, x.clone(), sigmas, noise_fn="ode", corrector=True, flow_form=form, disable=True)
        errors[form] = float((out - truth).norm(dim=1).mean())
    assert errors[None] == errors["hybrid"]
    assert errors["hybrid"] < 0.4 * errors["lambda"]
    assert errors["hybrid"] < errors["sigma"]


def test_flow_form_errors():
    model = ExactModel(default_mixture(), "flow")
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="flow_form must be one of"):
        sample_er_sde(model, x, _flow_karras(4), noise_fn="ode", flow_form="log", disable=True)
    with pytest.raises(ValueError, match="for the ODE only"):
        sample_er_sde(model, x, _flow_karras(4), noise_fn="sde_5", flow_form="hybrid", disable=True)
    sample_er_sde(model, x, _flow_karras(4), noise_fn="sde_5", disable=True)  # the SDE's default: lambda
