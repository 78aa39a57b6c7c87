"""OT cell scores <x, y_i - ybar> + h_i: exact fp32, tiled argmax / top-2, and the low-rank score factor."""
from __future__ import annotations

from contextlib import contextmanager

import torch

TILE_ELEMENTS = 1 << 24  # scores per tile (64 MB fp32); no dense matrix beyond a tile


@contextmanager
def exact_fp32_matmul():
    """fp32 scores without TF32 rounding (argmax flips ~0.1% with TF32; spec 6.6); restores the setting."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _tiles(rows: int, cols: int, tile_elements: int):
    row_tile = max(1, min(rows, tile_elements // max(cols, 1)))
    col_tile = max(1, min(cols, tile_elements // max(row_tile, 1)))
    return row_tile, col_tile


def _scores(x, factor, heights, centre, start, stop):
    rows = factor[start:stop].to(x.dtype)
    if centre is not None:
        rows = rows - centre
    return x @ rows.T + heights[start:stop]


def tiled_argmax(x: torch.Tensor, factor: torch.Tensor, heights: torch.Tensor, centre: torch.Tensor | None = None,
                 tile_elements: int = TILE_ELEMENTS) -> torch.Tensor:
    """argmax_i (<x, f_i - centre> + h_i) for each row of x, with a running max over target chunks and
    row chunks (no dense matrix beyond a tile). Ties go to the lowest index, as ``torch.argmax``."""
    rows, n = x.shape[0], factor.shape[0]
    row_tile, col_tile = _tiles(rows, n, tile_elements)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    for r0 in range(0, rows, row_tile):
        xr = x[r0:r0 + row_tile]
        best = idx = None
        for c0 in range(0, n, col_tile):
            value, arg = _scores(xr, factor, heights, centre, c0, c0 + col_tile).max(dim=1)
            if best is None:
                best, idx = value, arg
            else:
                better = value > best
                best, idx = torch.where(better, value, best), torch.where(better, arg + c0, idx)
        out[r0:r0 + row_tile] = idx
    return out


def tiled_top2(x: torch.Tensor, factor: torch.Tensor, heights: torch.Tensor, centre: torch.Tensor | None = None,
               tile_elements: int = TILE_ELEMENTS) -> torch.Tensor:
    """Indices (rows, 2) of the best and second-best cells (AE-OT's pair of neighbouring cells)."""
    rows, n = x.shape[0], factor.shape[0]
    if n < 2:
        raise ValueError("DPM-OT aeot_pair placement needs at least 2 targets.")
    row_tile, col_tile = _tiles(rows, n, tile_elements)
    out = torch.empty(rows, 2, dtype=torch.int64, device=x.device)
    for r0 in range(0, rows, row_tile):
        xr = x[r0:r0 + row_tile]
        best_v = best_i = None
        for c0 in range(0, n, col_tile):
            scores = _scores(xr, factor, heights, centre, c0, c0 + col_tile)
            v, i = scores.topk(min(2, scores.shape[1]), dim=1)
            i = i + c0
            if best_v is not None:
                v, j = torch.cat([best_v, v], 1).topk(2, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_v, best_i = v, i
        out[r0:r0 + row_tile] = best_i
    return out


def score_factor(targets: torch.Tensor, rank_tolerance: float = 1e-7) -> torch.Tensor:
    """A factor C (N x r, fp32) with C C^T = Yc Yc^T for the centred targets Yc: for Gaussian noise the
    scores Yc x and C z (z ~ N(0, I_r)) have the same joint law. Exact eigen-factor of the float64 Gram
    matrix when N <= d/2 (fitting cost then independent of d); Yc itself otherwise."""
    n, d = targets.shape[0], targets[0].numel()
    flat = targets.reshape(n, d)
    centre = flat.to(torch.float64).mean(0)
    if 2 * n > d:
        return (flat.to(torch.float64) - centre).to(torch.float32)
    gram = torch.zeros(n, n, dtype=torch.float64, device=flat.device)
    for c0 in range(0, d, 4096):
        block = flat[:, c0:c0 + 4096].to(torch.float64) - centre[c0:c0 + 4096]
        gram += block @ block.T
    values, vectors = torch.linalg.eigh(gram)
    keep = values > rank_tolerance * values[-1].clamp_min(torch.finfo(torch.float64).tiny)
    return (vectors[:, keep] * values[keep].sqrt()).to(torch.float32)
