"""The shared multistep core of the pack's samplers.

Every linear multistep sampler here (Euler, DPM-Solver++(2M), ER-SDE orders 1-3 with or without
the corrector, DBIM) takes steps of one shape,

    x_{i+1} = A_i x_i + sum_k W_{i,k} D_{i-k} + C_i c + E_i z_i,

where D_{i-k} are the last model outputs (newest first), c an optional constant tensor (DBIM's
condition x_T) and z_i fresh noise. A method is a *planner*: a function of the whole schedule that
returns one ``StepRow`` of float64 host scalars per step, computed once before the loop. ``run_rows``
is the one executor: per step one model call and one fused linear combination, no host-device sync.

``derivative_weights`` is the one place divided differences are computed: the weights of the
derivatives, at a point, of the polynomial interpolating a few nodes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .common import progress, report


@dataclass(frozen=True)
class StepRow:
    """One step: ``x <- A x + sum_k W[k] D_{i-k} + C c + E z``, the model evaluated at ``sigma``
    first (unless ``evaluate`` is False: a zero-length step that leaves x and the history alone)."""

    sigma: float
    sigma_next: float
    A: float = 0.0
    W: tuple = ()  # weights of the newest model outputs, newest first
    C: float = 0.0  # weight of the constant tensor
    E: float = 0.0  # noise std
    draw: bool = False  # draw noise (also where E = 0, to keep a seeded stream aligned with ComfyUI's)
    evaluate: bool = True
    order: int = 1


def derivative_weight_rows(nodes, at: float, count: int) -> list[list[float]]:
    """``derivative_weights`` as host lists (what the planners use: no numpy per row). Two to four nodes
    (every step of the pack's planners): ``closed_form_weight_rows``; more nodes: Fornberg's recursion."""
    nodes = [float(v) for v in nodes]
    n = len(nodes)
    top = min(count, n - 1)
    if 2 <= n <= 4 and top >= 1:
        return closed_form_weight_rows(nodes, at, count)
    # Fornberg (1988), built node by node: cols[j][m] is the weight of f_j in the m-th derivative at ``at``
    cols = [[1.0] + [0.0] * top]
    prod_prev, offset = 1.0, nodes[0] - at
    for i in range(1, n):
        node = nodes[i]
        prod, offset_prev, offset = 1.0, offset, node - at
        orders = range(min(i, top), 0, -1)
        for j in range(i):
            gap = node - nodes[j]
            prod *= gap
            col = cols[j]
            if j == i - 1:  # the new node's weights, from the previous node's before they are updated
                new = [0.0] * (top + 1)
                for m in orders:
                    new[m] = prod_prev * (m * col[m - 1] - offset_prev * col[m]) / prod
                new[0] = -prod_prev * offset_prev * col[0] / prod
            for m in orders:
                col[m] = (offset * col[m] - m * col[m - 1]) / gap
            col[0] = offset * col[0] / gap
        cols.append(new)
        prod_prev = prod
    return [[col[k] for col in cols] if k <= top else [0.0] * n for k in range(1, count + 1)]


def closed_form_weight_rows(nodes, at, count: int) -> list:
    """The derivatives of the Lagrange basis of two to four nodes in closed form,
    l_j^(k)(at) = k! e_{n-1-k}(at - x_m, m != j) / prod_{m != j} (x_j - x_m) with e the elementary symmetric
    polynomials: ``count`` rows of len(nodes) weights (0.0 beyond the degree). Plain arithmetic, so the nodes
    and ``at`` may be floats or numpy arrays (one step per entry: the batched ODE planner)."""
    n = len(nodes)
    if n == 2:
        slope = 1.0 / (nodes[0] - nodes[1])
        return [[slope, -slope]] + [[0.0, 0.0] for _ in range(count - 1)]
    if n == 3:
        x0, x1, x2 = nodes
        o0, o1, o2 = at - x0, at - x1, at - x2
        d0, d1, d2 = (x0 - x1) * (x0 - x2), (x1 - x0) * (x1 - x2), (x2 - x0) * (x2 - x1)
        rows = [[(o1 + o2) / d0, (o0 + o2) / d1, (o0 + o1) / d2]]
        if count >= 2:
            rows.append([2.0 / d0, 2.0 / d1, 2.0 / d2])
        return rows + [[0.0, 0.0, 0.0] for _ in range(count - 2)]
    x0, x1, x2, x3 = nodes
    o0, o1, o2, o3 = at - x0, at - x1, at - x2, at - x3
    d0 = (x0 - x1) * (x0 - x2) * (x0 - x3)
    d1 = (x1 - x0) * (x1 - x2) * (x1 - x3)
    d2 = (x2 - x0) * (x2 - x1) * (x2 - x3)
    d3 = (x3 - x0) * (x3 - x1) * (x3 - x2)
    rows = [[(o1 * o2 + o1 * o3 + o2 * o3) / d0, (o0 * o2 + o0 * o3 + o2 * o3) / d1,
             (o0 * o1 + o0 * o3 + o1 * o3) / d2, (o0 * o1 + o0 * o2 + o1 * o2) / d3]]
    if count >= 2:
        rows.append([2.0 * (o1 + o2 + o3) / d0, 2.0 * (o0 + o2 + o3) / d1, 2.0 * (o0 + o1 + o3) / d2,
                     2.0 * (o0 + o1 + o2) / d3])
    if count >= 3:
        rows.append([6.0 / d0, 6.0 / d1, 6.0 / d2, 6.0 / d3])
    return rows + [[0.0, 0.0, 0.0, 0.0] for _ in range(count - 3)]


def derivative_weights(nodes, at: float, count: int) -> np.ndarray:
    """[count, len(nodes)] weights: row k gives the (k+1)-th derivative at ``at`` of the polynomial
    of degree len(nodes) - 1 through (nodes_j, f_j), as sum_j w[k, j] f_j. Rows beyond the degree
    are 0. Closed forms up to 4 nodes, Fornberg's recursion beyond (no linear solve)."""
    n = len(nodes)
    if n < 2 or count < 1:
        return np.zeros((max(count, 0), n))
    return np.array(derivative_weight_rows(nodes, at, count))


def merge_correction(row: StepRow, correction) -> StepRow:
    """Fold a correction of the current state, x_i += sum_k correction[k] D_{i-k} (applied once the
    model output at x_i is known), into the step that leaves x_i: A (x + corr) + ... = A x + (W + A corr)."""
    if correction is None or row.A == 0.0 or not row.evaluate:
        return row
    return StepRow(row.sigma, row.sigma_next, row.A, merged_weights(row.A, row.W, correction), row.C, row.E, row.draw,
                   row.evaluate, row.order)


def merged_weights(A: float, W, correction) -> tuple:
    """The W of ``merge_correction``: W + A correction, as long as the longer of the two."""
    merged = [0.0] * max(len(W), len(correction))
    for k, w in enumerate(W):
        merged[k] += w
    for k, w in enumerate(correction):
        merged[k] += A * w
    return tuple(merged)


def run_rows(model, x: torch.Tensor, rows: list[StepRow], extra_args=None, callback=None, disable=None,
             noise_sampler=None, constant: torch.Tensor | None = None, model_sigmas=None, call=None) -> torch.Tensor:
    """Execute a plan. ``model(x, sigma_batch, **extra_args)`` (or ``call(x, row)`` when given, for
    models with another signature) returns the denoised output. ``noise_sampler(sigma, sigma_next)``
    draws unit noise (ComfyUI's convention). ``model_sigmas``: a tensor of the rows' sigmas in the
    dtype the caller's sigmas had (what the model is called with); built from the rows otherwise.
    Tensors the model or the callback saw are never modified."""
    extra_args = {} if extra_args is None else extra_args
    depth = max((len(r.W) for r in rows), default=0)
    weights = [history_weights(r) for r in rows]  # the nonzero W of every row, once
    if model_sigmas is None:
        model_sigmas = torch.tensor([r.sigma for r in rows], dtype=torch.float64)
    model_sigmas = model_sigmas.to(x.device)
    # every step's sigma batch before the loop: row i = model_sigmas[i] * x.new_ones(batch), in x's dtype
    sigma_batches = model_sigmas.to(x.dtype)[:, None].expand(-1, x.shape[0]).contiguous() if call is None else None
    history: list[torch.Tensor] = []
    for i in progress(len(rows), disable):
        row = rows[i]
        if not row.evaluate:
            continue
        denoised = model(x, sigma_batches[i], **extra_args) if call is None else call(x, row)
        history.insert(0, denoised)
        del history[depth:]
        if callback is not None:
            report(callback, i, x, model_sigmas[i], denoised)
        x = apply_row(x, row, history, constant, noise_sampler, weights[i])
    return x


def history_weights(row: StepRow) -> tuple:
    """((k, W[k]) for the nonzero weights of a row): what ``apply_row`` adds from the history."""
    return tuple((k, w) for k, w in enumerate(row.W) if w != 0.0)


def apply_row(x, row: StepRow, history, constant=None, noise_sampler=None, weights=None):
    """A x + sum W D + C c + E z into one new tensor (the first nonzero term out of place, the rest added
    in place, in this order). ``weights``: ``history_weights(row)`` when precomputed."""
    terms = history_weights(row) if weights is None else weights
    A = row.A
    if A != 0.0:
        out = x * A if A != 1.0 else x.clone()
    elif terms:
        k, w = terms[0]
        out = history[k] * w if w != 1.0 else history[k].clone()
        terms = terms[1:]
    else:
        out = None
    for k, w in terms:
        out.add_(history[k], alpha=w)
    if row.C != 0.0:
        out = _accumulate(out, constant, row.C)
    if row.draw:
        z = noise_sampler(row.sigma, row.sigma_next)
        if row.E != 0.0:
            out = _accumulate(out, z, row.E)
    return torch.zeros_like(x) if out is None else out


def _accumulate(out, term, weight):
    if out is None:
        return term * weight if weight != 1.0 else term.clone()
    return out.add_(term, alpha=weight)
