"""The batched ER ODE planner (samplers/er_sde_ode_plan.py) against the step-by-step one it stands in for, and
the closed-form c4 of the power laws it uses."""
import itertools
import math

import numpy as np
import pytest
import torch

from comfyui_fast_samplers.samplers import er_sde
from comfyui_fast_samplers.samplers.er_sde import FINAL_STEPS, make_noise_function, plan_er_sde
from comfyui_fast_samplers.samplers.noise_scales import (
    power_taylor_columns, quadrature_rows, taylor_coefficient_rows, taylor_coefficients_power,
)
from comfyui_fast_samplers.samplers.schedule import NoiseSchedule, karras_sigmas

ODE = make_noise_function("ode")


def _grids():
    """Karras (with and without the final 0), random unequal steps, a flow grid below sigma = 1, and a grid whose
    last steps are short enough (u < 0.05) for c3, c4 to come from quadrature."""
    g = torch.Generator().manual_seed(3)
    rand = torch.sort(torch.rand(9, generator=g, dtype=torch.float64) * 14 + 0.03, descending=True).values
    flow = torch.sort(torch.rand(8, generator=g, dtype=torch.float64) * 0.97 + 0.01, descending=True).values
    fine = torch.cat([karras_sigmas(6, 0.5, 14.6)[:-1], torch.tensor([0.48, 0.47, 0.465], dtype=torch.float64)])
    zero = torch.zeros(1, dtype=torch.float64)
    return {
        "karras": ("ve", karras_sigmas(10, 0.03, 14.6)),
        "karras_no_zero": ("vp", karras_sigmas(7, 0.03, 14.6)[:-1]),
        "random": ("vp", torch.cat([rand, zero])),
        "flow": ("flow", torch.cat([flow, zero])),
        "fine_steps": ("ve", torch.cat([fine, zero])),
        "two_steps": ("ve", torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64)),
        "one_step": ("ve", torch.tensor([3.0, 0.0], dtype=torch.float64)),
    }


@pytest.fixture
def batched_calls(monkeypatch):
    calls = []
    real = er_sde.batched_ode_rows
    monkeypatch.setattr(er_sde, "batched_ode_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("grid", list(_grids()))
def test_batched_ode_plan_equals_the_step_by_step_plan_bit_for_bit(grid, batched_calls):
    """Every order, corrector on and off, each final step and derivative estimator (and the flow forms on the flow
    grid): the same rows, compared with ==, so one misplaced weight, swapped step or shifted corrector fails."""
    kind, sigmas = _grids()[grid]
    forms = ("lambda", "sigma", "hybrid") if kind == "flow" else (None,)
    cases = list(itertools.product((1, 2, 3), (False, True), FINAL_STEPS, ("corrected", "paper"), forms))
    for order, corrector, final_step, derivatives, form in cases:
        options = dict(order=order, derivatives=derivatives, final_step=final_step, corrector=corrector,
                       flow_form=form, warn=False)
        fast = plan_er_sde(sigmas, NoiseSchedule(kind), ODE, **options)
        reference = plan_er_sde(sigmas, NoiseSchedule(kind), ODE, per_step=True, **options)
        assert fast.rows == reference.rows, (order, corrector, final_step, derivatives, form)
        assert fast.clamped_steps == reference.clamped_steps == 0 and fast.clocks == reference.clocks == {}
    assert len(batched_calls) == len(cases)  # the batched planner did plan every case


def test_the_batched_planner_leaves_other_runs_to_the_step_by_step_one(batched_calls):
    """A flow start at sigma = 1 (infinite lambda), a repeated sigma, the SDE and ComfyUI's Riemann sums."""
    karras = karras_sigmas(8, 0.03, 14.6)
    flow = torch.cat([torch.tensor([1.0], dtype=torch.float64), karras_sigmas(6, 0.01, 0.9)])
    repeated = torch.cat([karras[:3], karras[2:]])
    plan_er_sde(flow, NoiseSchedule("flow"), ODE, warn=False)
    plan_er_sde(repeated, NoiseSchedule("ve"), ODE, warn=False)
    plan_er_sde(karras, NoiseSchedule("ve"), make_noise_function("sde_5"), warn=False)
    plan_er_sde(karras, NoiseSchedule("ve"), ODE, quadrature="comfy_riemann", warn=False)
    assert batched_calls == []


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 7.0])
@pytest.mark.parametrize("u", [0.05, 0.3, 1.0, 4.0])
def test_power_law_c4_closed_form_matches_quadrature(p, u):
    """c4 (the corrector's third Taylor term) in closed form against the Gauss-Legendre quadrature (~5e-15);
    1e-10 covers the closed form's cancellation at u = 0.05 (measured 2e-11), and a wrong factorial (1/5 for
    1/6) or binomial is off by more than 10%."""
    lam_t = 0.7
    lam_s = lam_t * math.exp(u)
    closed = taylor_coefficients_power(p, lam_t, lam_s, 3)
    quad = quadrature_rows(make_noise_function("power", power=p), [lam_t], [lam_s], 3)[0]
    for c, q in zip(closed, quad):
        assert c == pytest.approx(q, rel=1e-10)


def test_batched_taylor_columns_equal_the_one_step_coefficients():
    """Closed forms where u >= 0.05, quadrature below (the short steps), in one batched call: equal to
    taylor_coefficient_rows entry for entry."""
    lam_s = np.array([14.6, 5.0, 1.0, 0.5, 0.49, 0.2])
    lam_t = np.array([5.0, 1.0, 0.5, 0.49, 0.485, 0.19])
    for terms in (1, 2, 3):
        columns = power_taylor_columns(ODE, lam_t, lam_s, terms)
        rows = taylor_coefficient_rows(ODE, lam_t.tolist(), lam_s.tolist(), "exact", terms)
        assert [list(r) for r in np.array(columns).T.tolist()] == [list(r) for r in rows]


@pytest.mark.parametrize("order", [2, 3])
def test_extrapolated_final_step_is_the_interpolant_at_lam_zero(order):
    """final_step='extrapolate' returns the Taylor expansion at lam_i of the polynomial through the last
    ``order`` outputs, evaluated at lam = 0: exact for a denoiser that is a polynomial of degree order - 1 in
    lam, on unequal nodes (the 'corrected' derivatives; 'paper' replaces D' by a slope and is not exact)."""
    from comfyui_fast_samplers.samplers.er_sde_ode_plan import final_step_weights

    nodes = [0.37, 1.3, 4.1][:order]
    coefficients = [0.8, -1.7, 0.45][:order]

    def denoiser(lam):
        return sum(c * lam**k for k, c in enumerate(coefficients))

    W = final_step_weights(nodes, order, "corrected", "extrapolate", None)
    assert sum(w * denoiser(lam) for w, lam in zip(W, nodes)) == pytest.approx(denoiser(0.0), rel=1e-12)
    assert final_step_weights(nodes, order, "corrected", "denoise", None) == (1.0,) + (0.0,) * (order - 1)
    pending = (0.1, -0.2, 0.05, 0.02)[:order + 1]
    corrected = final_step_weights(nodes, order, "corrected", "corrected", pending)
    assert corrected == pytest.approx([1.0 + pending[0], *pending[1:]], rel=1e-15)
