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

import dataclasses
import math
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


def derivative_weights(nodes, at: float, count: int) -> np.ndarray:
    """[count, len(nodes)] weights: row k gives the (k+1)-th derivative at ``at`` of the polynomial
    of degree len(nodes) - 1 through (nodes_j, f_j), as sum_j w[k, j] f_j. Rows beyond the degree
    are 0. Solved on scaled offsets (Taylor form), exact to float64 rounding for <= 5 nodes."""
    offsets = np.asarray(nodes, dtype=np.float64) - at
    n = len(offsets)
    weights = np.zeros((count, n))
    if n < 2 or count < 1:
        return weights
    scale = np.abs(offsets).max()
    u = offsets / scale
    taylor = np.array([[uj**k / math.factorial(k) for k in range(n)] for uj in u])  # f_j = sum_k a_k u_j^k / k!
    coeffs = np.linalg.solve(taylor, np.eye(n))  # a = coeffs @ f, a_k = d^k P / du^k at u = 0
    for k in range(1, min(count, n - 1) + 1):
        weights[k - 1] = coeffs[k] / scale**k
    return weights


def merge_correction(row: StepRow, correction) -> StepRow:
    """Fold a correction of the current state, x_i += sum_k correction[k] D_{i-k} (applied once the
    model output at x_i is known), into the step that leaves x_i: A (x + corr) + ... = A x + (W + A corr)."""
    if correction is None or row.A == 0.0 or not row.evaluate:
        return row
    width = max(len(row.W), len(correction))
    W = [0.0] * width
    for k, w in enumerate(row.W):
        W[k] += w
    for k, w in enumerate(correction):
        W[k] += row.A * w
    return dataclasses.replace(row, W=tuple(W))


def run_rows(model, x: torch.Tensor, rows: list[StepRow], extra_args=None, callback=None, disable=None,
             noise_sampler=None, constant: torch.Tensor | None = None, model_sigmas=None, call=None) -> torch.Tensor:
    """Execute a plan. ``model(x, sigma_batch, **extra_args)`` (or ``call(x, row)`` when given, for
    models with another signature) returns the denoised output. ``noise_sampler(sigma, sigma_next)``
    draws unit noise (ComfyUI's convention). ``model_sigmas``: a tensor of the rows' sigmas in the
    dtype the caller's sigmas had (what the model is called with); built from the rows otherwise.
    Tensors the model or the callback saw are never modified."""
    extra_args = {} if extra_args is None else extra_args
    depth = max((len(r.W) for r in rows), default=0)
    if model_sigmas is None:
        model_sigmas = torch.tensor([r.sigma for r in rows], dtype=torch.float64)
    model_sigmas = model_sigmas.to(x.device)
    s_in = x.new_ones([x.shape[0]])
    history: list[torch.Tensor] = []
    for i in progress(len(rows), disable):
        row = rows[i]
        if not row.evaluate:
            continue
        denoised = model(x, model_sigmas[i] * s_in, **extra_args) if call is None else call(x, row)
        history.insert(0, denoised)
        del history[depth:]
        report(callback, i, x, model_sigmas[i], denoised)
        x = apply_row(x, row, history, constant, noise_sampler)
    return x


def apply_row(x, row: StepRow, history, constant=None, noise_sampler=None):
    """A x + sum W D + C c + E z into one new tensor (first term out of place, the rest in place)."""
    terms = [(row.A, x)] if row.A != 0.0 else []
    terms += [(w, d) for w, d in zip(row.W, history) if w != 0.0]
    if row.C != 0.0:
        terms.append((row.C, constant))
    if row.draw:
        z = noise_sampler(row.sigma, row.sigma_next)
        if row.E != 0.0:
            terms.append((row.E, z))
    if not terms:
        return torch.zeros_like(x)
    (w0, t0), rest = terms[0], terms[1:]
    out = t0 * w0 if w0 != 1.0 else t0.clone()
    for w, t in rest:
        out.add_(t, alpha=w)
    return out
