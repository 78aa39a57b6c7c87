"""Which options of the default ODE preset measure best on stock schedules (no calibration).

``fs_er_sde_ode_3_unic`` with each final step (denoise / extrapolate / corrected) on every model, and with
each flow form (hybrid / lambda / sigma, ``er_sde.FLOW_FORMS``) on the flow models, on every stock ComfyUI
schedule at NFE 5 / 8 / 10 / 20, as a ratio to the best ComfyUI sampler on the same schedule (the peer table of
``benchmarks/calibration.py``, cached under benchmarks/.cache, computed here where missing), and with order 2.
Then every ComfyUI sampler scored the same way, as one fixed choice across all cells, beside the preset: how
far from the per-cell best each single sampler is. Same models, noises and references as
``benchmarks/calibration.py``. Run from the repository root in the ComfyUI venv:

    .venv-comfyui/bin/python benchmarks/preset_options.py     # --models, --nfe

Writes ``benchmarks/results/preset_options.md``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import calibration as cb  # noqa: E402
from benchmarks import comfy_peers as cp  # noqa: E402
from comfyui_fast_samplers.samplers import SAMPLERS  # noqa: E402
from comfyui_fast_samplers.samplers.files import atomic_write_text  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "preset_options.md"
SCHEDULES = ("karras", "exponential", "simple", "beta", "kl_optimal", "normal")
FINALS = ("denoise", "extrapolate", "corrected")
FORMS = ("hybrid", "lambda", "sigma")


def single_sampler_ratios(same: list, best: float) -> dict:
    """Each ComfyUI sampler's error on one cell (``same``: its rows) over the cell's best (the lower length
    rule where a sampler has two)."""
    out = {}
    for r in same:
        out[r.sampler] = min(out.get(r.sampler, math.inf), r.error / best)
    return out


def measure(name: str, nfes) -> list[dict]:
    denoiser, ms, kind, dim, reference_fn = cb.build_model(name)
    model = cp.ComfyModel(denoiser, ms)
    hold = cb.holdout_noise(dim)
    reference = reference_fn(hold)
    peers = cb.cached_peer_table(name, model, ms, hold, reference, cb.NFES)
    preset = SAMPLERS[cb.DEFAULT]
    variants = {f"final_step={f}": {"final_step": f} for f in FINALS}
    variants["order=2"] = {"order": 2}
    if kind == "flow":
        variants.update({f"flow_form={f}": {"flow_form": f} for f in FORMS})
    rows = []
    for nfe in nfes:
        for schedule in SCHEDULES:
            sigmas = cp.schedule(ms, schedule, nfe)
            same = cp.same_schedule_peers(peers, nfe, schedule)
            if sigmas is None or not same:
                continue
            best = min(same, key=lambda r: r.error)
            ref = reference(sigmas)
            errors = {}
            for label, options in variants.items():
                out, _ = cp.run_sampler(preset.func, {**preset.options, **options}, model, hold, sigmas, ms)
                errors[label] = float((out - ref).flatten(1).norm(dim=1).mean())
            rows.append(dict(model=name, nfe=nfe, schedule=schedule, peer=best.sampler, peer_error=best.error,
                             errors=errors, comfy=single_sampler_ratios(same, best.error)))
    return rows


def summary(rows, labels, baseline) -> list[str]:
    lines = ["| option | geometric mean of the ratio | lower than " + baseline + " | higher |", "|---|---|---|---|"]
    for label in labels:
        ratios = [r["errors"][label] / r["peer_error"] for r in rows]
        lower = sum(r["errors"][label] < r["errors"][baseline] for r in rows)
        higher = sum(r["errors"][label] > r["errors"][baseline] for r in rows)
        lines.append(f"| {label} | {geometric_mean(ratios):.3f} | {lower} | {higher} |")
    return lines


def geometric_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan


def preset_variant() -> str:
    """The variant label that is the preset as shipped."""
    return f"final_step={SAMPLERS[cb.DEFAULT].options.get('final_step', 'denoise')}"


def single_sampler_table(rows, nfes) -> list[str]:
    """The preset and every ComfyUI sampler as one fixed choice: geometric mean of the ratio to the per-cell
    best at each NFE and over all, the cells where it is at most the best (ties included), and the worst cell.
    Samplers with cells missing at some NFE (two calls a step: heun, dpm_2 at odd counts) are scored where
    they have them, and say on how many cells."""
    ratios = {f"**{cb.DEFAULT}**": {i: r["errors"][preset_variant()] / r["peer_error"] for i, r in enumerate(rows)}}
    for i, r in enumerate(rows):
        for sampler, ratio in r["comfy"].items():
            ratios.setdefault(sampler, {})[i] = ratio
    header = " | ".join(f"NFE {n}" for n in nfes)
    lines = [f"| sampler | {header} | all | cells at or below the best | worst cell |",
             "|---|" + "---|" * len(nfes) + "---|---|---|"]
    scored = []
    for sampler, cell in ratios.items():
        per_nfe = [geometric_mean(v for i, v in cell.items() if rows[i]["nfe"] == n) for n in nfes]
        scored.append((geometric_mean(cell.values()), sampler, per_nfe, cell))
    for total, sampler, per_nfe, cell in sorted(scored):
        cells = " | ".join("" if math.isnan(v) else f"{v:.3f}" for v in per_nfe)
        at_best = sum(v <= 1.0 for v in cell.values())
        lines.append(f"| {sampler} | {cells} | {total:.3f} | {at_best} of {len(cell)} | {max(cell.values()):.2f} |")
    return lines


def write_markdown(rows, wall: float) -> str:
    preset = SAMPLERS[cb.DEFAULT]
    lines = ["# Options of the default ODE preset on stock schedules", "",
             f"Written by `benchmarks/preset_options.py` on {dt.date.today()}: ComfyUI {cp.import_comfy().version}, "
             f"torch {torch.__version__}; wall time {wall:.0f} s.", "",
             f"`{cb.DEFAULT}` ({preset.options}) uncalibrated, each option changed alone, on the stock ComfyUI "
             "schedules; every cell is the error (mean L2 distance to the reference, the hold-out noises of "
             "`benchmarks/calibration.py`) divided by the best ComfyUI sampler's on the same schedule at the "
             "same counted NFE (< 1: the pack is ahead).", ""]
    finals = [f"final_step={f}" for f in FINALS]
    nfes = sorted({r["nfe"] for r in rows})
    lines += ["## One sampler for every cell: the preset beside each ComfyUI sampler", "",
              "Each cell (model x NFE x schedule) scored against the lowest error of any ComfyUI sampler there "
              "(1.000 = the best of them all on that cell). The issue's uncalibrated target, at or below 1.0 on "
              "every cell, is one no single sampler here meets.", ""]
    lines += single_sampler_table(rows, nfes) + [""]
    lines += ["## Final step (every model)", ""] + summary(rows, finals, "final_step=denoise") + [""]
    lines += ["## Order (every model)", "",
              "Order 2 against the preset's order 3 (both with the preset's corrector and final step), per NFE:", ""]
    for n in nfes:
        lines += [f"NFE {n}:", ""] + summary([r for r in rows if r["nfe"] == n], [preset_variant(), "order=2"],
                                                  preset_variant()) + [""]
    flow_rows = [r for r in rows if "flow_form=hybrid" in r["errors"]]
    forms = [f"flow_form={f}" for f in FORMS]
    if flow_rows:
        lines += ["## Flow form (flow models)", ""] + summary(flow_rows, forms, "flow_form=lambda") + [""]
    labels = list(dict.fromkeys(k for r in rows for k in r["errors"]))
    lines += ["## Every cell", "", "| model | NFE | schedule | best ComfyUI there | its error | " +
              " | ".join(labels) + " |", "|---|---|---|---|---|" + "---|" * len(labels)]
    for r in rows:
        cells = [f"{r['errors'][k] / r['peer_error']:.2f}" if k in r["errors"] else "" for k in labels]
        lines.append(f"| {r['model']} | {r['nfe']} | {r['schedule']} | {r['peer']} | {r['peer_error']:.4g} | " +
                     " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(cb.MODELS), choices=cb.MODELS)
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 8, 10, 20])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = []
    for name in args.models:
        rows += measure(name, args.nfe)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    text = write_markdown(rows, time.perf_counter() - t0)
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
