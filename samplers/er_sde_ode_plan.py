"""The ER-SDE ODE plan batched over the steps: the rows ``er_sde.plan_er_sde`` builds one step at a time,
computed for all steps at once with float64 numpy arrays (a schedule's first run plans in a fixed handful
of array operations instead of a Python pass per step; the corrector's rows included).

It covers the ODE (noise_fn 'ode', or any power law at strength 0: q = 1, no noise) with exact quadrature on
a strictly decreasing schedule whose interpolation variable is finite at every evaluation (VE, VP, and
flow schedules that start below sigma = 1 or use flow_form 'sigma'). ``plan_er_sde`` plans everything else
step by step, and tests/test_er_sde_ode_plan.py checks both planners give the same rows. The formulas are
the shared ones: ``multistep.closed_form_weight_rows`` and ``noise_scales.taylor_coefficients_power``.
"""
from __future__ import annotations

import math

import numpy as np

from .multistep import StepRow, closed_form_weight_rows
from .noise_scales import (
    CLOSED_FORM_MIN_U, NoiseFunction, power_taylor_columns, taylor_coefficients, taylor_coefficients_power,
)


def predictor_weight_rows(nodes, order: int, derivatives: str) -> list:
    """[order - 1][order] weights on (D_i, D_{i-1}, ...) of D', D'', ... at nodes[0] = lam_i (floats, or arrays of
    many steps). 'corrected': the derivatives of the interpolating polynomial (a true order-p step); 'paper':
    D' = the slope between the two newest nodes (the midpoint slope of the published update)."""
    if order < 2:
        return []
    d = closed_form_weight_rows(nodes[:order], nodes[0], order - 1)
    if derivatives == "paper" and order >= 3:
        d[0] = closed_form_weight_rows(nodes[:2], nodes[0], 1)[0] + [0.0] * (order - 2)
    return d


def weighted_rows(coefficients, rows, width: int) -> list:
    """sum_k coefficients[k] * rows[k] as ``width`` entries (0.0 where there are no rows)."""
    terms = list(zip(coefficients, rows))
    if not terms:
        return [0.0] * width
    ck, row = terms[0]
    out = [ck * r for r in row]
    for ck, row in terms[1:]:
        out = [v + ck * r for v, r in zip(out, row)]
    return out


def corrector_change(lam_t, lam_s, alpha_t, nodes, predictor, c) -> list:
    """Weights on (D_t, D_s, D_{s1}, ...) of the corrector's change of x_t: the derivatives at lam_s of the
    polynomial through lam_t and the predictor's nodes replace the predictor's, scaled by the step's
    c_{k+1} and alpha_t (shared/specs/calibration.md section 3.3). Floats or arrays of many steps."""
    terms = len(nodes)
    corr = closed_form_weight_rows([lam_t, *nodes], lam_s, terms)
    change = None
    for k in range(terms):
        # corr_k minus the predictor's (0, pred_k), with pred_k = 0 beyond the predictor's rows
        diff = [corr[k][0], *(a - b for a, b in zip(corr[k][1:], predictor[k]))] if k < len(predictor) else corr[k]
        change = [c[k] * d for d in diff] if change is None else [v + c[k] * d for v, d in zip(change, diff)]
    return [alpha_t * v for v in change]


def batched_plan_applies(noise_fn: NoiseFunction, quadrature: str, sig_list: list, lam: list) -> bool:
    """Whether ``batched_ode_rows`` plans this run (else ``plan_er_sde`` goes step by step)."""
    return (noise_fn.power == 1.0 and quadrature == "exact" and len(sig_list) >= 2
            and all(b < a for a, b in zip(sig_list, sig_list[1:])) and all(map(math.isfinite, lam[:-1])))


def batched_ode_rows(sig_list: list, form, order: int, derivatives: str, final_step: str, corrector: bool,
                     noise_fn: NoiseFunction) -> list[StepRow]:
    """The rows of ``plan_er_sde`` for a run that ``batched_plan_applies`` to; ``form``: (alpha, s, lam) per sigma
    as lists. The first order - 1 steps (lower orders) one at a time in floats, the full-order steps in arrays."""
    count = len(sig_list) - 1
    final = sig_list[-1] == 0.0
    regular = count - 1 if final else count  # steps that are not the final denoise
    width = order + 1
    A = np.zeros(regular)
    W = np.zeros((regular, width))
    pending = np.zeros((regular, width))  # the corrector's change of each step's result
    orders = [min(order, i + 1) for i in range(regular)]
    arrays = tuple(np.asarray(v, dtype=np.float64) for v in form)
    for i in range(min(order - 1, regular)):
        A[i], W[i, :orders[i]], change = _steps(orders[i], i, *form, derivatives, corrector, noise_fn, _scalar_taylor)
        if corrector:
            pending[i, :orders[i] + 1] = change
    if regular >= order:
        i = np.arange(order - 1, regular)
        A[i], step_w, change = _steps(order, i, *arrays, derivatives, corrector, noise_fn, power_taylor_columns)
        for k, v in enumerate(step_w):
            W[i, k] = v
        for k, v in enumerate(change if corrector else ()):
            pending[i, k] = v
    if corrector and regular > 1:  # fold each change into the step that leaves the corrected state
        W[1:] = W[1:] + A[1:, None] * pending[:-1]
    lengths = [max(o, orders[i - 1] + 1) if corrector and i > 0 else o for i, o in enumerate(orders)]
    A_list, W_list = A.tolist(), W.tolist()
    rows = [StepRow(sig_list[i], sig_list[i + 1], A_list[i], tuple(W_list[i][:lengths[i]]), 0.0, 0.0, False, True,
                    orders[i]) for i in range(regular)]
    if final:
        rows.append(_final_row(sig_list, form[2], order, derivatives, final_step,
                               pending[-1, :orders[-1] + 1].tolist() if corrector and regular else None))
    return rows


def _scalar_taylor(fn: NoiseFunction, lam_t: float, lam_s: float, terms: int) -> tuple:
    """``taylor_coefficients`` of one step (the closed forms directly where they apply)."""
    if terms <= 3 and math.log(lam_s / lam_t) >= CLOSED_FORM_MIN_U:
        return taylor_coefficients_power(fn.power, lam_t, lam_s, terms)[:terms]
    return taylor_coefficients(fn, lam_t, lam_s, "exact", terms)


def _steps(o: int, i, alpha, s, lam, derivatives: str, corrector: bool, noise_fn: NoiseFunction, taylor):
    """(A, W, the corrector's change or None) of the steps i (an int with lists, or an index array with arrays)
    of order o: x_t = A x_s + sum_k W[k] D_{s-k}."""
    t = i + 1
    nodes = [lam[i - j] for j in range(o)]
    A = s[t] / s[i]  # q = 1 on the ODE
    terms = o if corrector else o - 1
    c = taylor(noise_fn, lam[t], lam[i], terms) if terms else ()
    deriv = predictor_weight_rows(nodes, o, derivatives)
    W = [alpha[t] - A * alpha[i]] + [0.0] * (o - 1)
    if o >= 2:
        W = [w + alpha[t] * d for w, d in zip(W, weighted_rows(c[:o - 1], deriv, o))]
    change = corrector_change(lam[t], lam[i], alpha[t], nodes, deriv, c) if corrector else None
    return A, W, change


def _final_row(sig_list, lam, order: int, derivatives: str, final_step: str, pending) -> StepRow:
    """The last step, to sigma = 0, as ``plan_er_sde`` writes it (``final_step_weights``)."""
    i = len(sig_list) - 2
    step_order = min(order, i + 1)
    W = final_step_weights([lam[i - j] for j in range(step_order)], step_order, derivatives, final_step, pending)
    return StepRow(sig_list[i], sig_list[i + 1], A=0.0, W=W, order=step_order)


def final_step_weights(nodes, step_order: int, derivatives: str, final_step: str, pending) -> tuple:
    """Weights on (D_i, D_{i-1}, ...) of the last step, to sigma = 0: the denoised output, Taylor-extrapolated
    to lam = 0 ('extrapolate'; nodes[0] = lam_i) or moved with the corrector's change of the last state
    ('corrected', ``pending``: the denoiser's Jacobian taken as 1, exact as the last noise level goes to 0)."""
    W = [1.0] + [0.0] * (step_order - 1)
    if final_step == "extrapolate":
        deriv = predictor_weight_rows(nodes, step_order, derivatives)
        taylor = [(-nodes[0]) ** (k + 1) / math.factorial(k + 1) for k in range(len(deriv))]
        W = [w + e for w, e in zip(W, weighted_rows(taylor, deriv, step_order))]
    if final_step == "corrected" and pending is not None:
        size = max(len(W), len(pending))
        W = [a + b for a, b in zip(W + [0.0] * (size - len(W)), list(pending) + [0.0] * (size - len(pending)))]
    return tuple(W)
