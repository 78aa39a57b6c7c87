"""Command line: ``python -m comfyui_fast_samplers compare`` samples the built-in exact models
with every sampler of the pack and the classic ones, prints error vs NFE, writes a plot."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .samplers import (
    calibrate_schedule, fit_ot_map, junction_schedule, pool_from_clean, sample_ddim_gmm, sample_dpm_ot, sample_dpmpp_2m,
    sample_er_sde, sample_euler, sample_heun, sample_tuned,
)
from .samplers.files import free_path
from .samplers.er_sde import PRESETS as ER_SDE_PRESETS
from .samplers.schedule import flow_shift_sigmas, karras_sigmas
from .testbeds.mixtures import (
    ExactModel, default_mixture, marginal_sample, mode_weight_error, sliced_w2, solve_pf_ode,
)


@dataclass
class Entry:
    label: str
    fn: object
    options: dict = field(default_factory=dict)
    deterministic: bool = False
    evals_per_step: int = 1  # Heun: 2 (its last step 1)
    junction: dict | None = None  # DPM-OT: {kind: sigma_j}; starts from a map of a data pool, steps below sigma_j
    calibrated: str | None = None  # a dropdown name: its schedule comes from calibrate_schedule

    def steps_for(self, nfe: int) -> int:
        return nfe if self.evals_per_step == 1 else (nfe + 1) // 2


# Later methods add their samplers here.
SAMPLERS = [
    Entry("euler", sample_euler, deterministic=True),
    Entry("heun", sample_heun, deterministic=True, evals_per_step=2),
    Entry("dpmpp_2m", sample_dpmpp_2m, deterministic=True),
    Entry("fs_er_sde_ode_3", sample_er_sde, {"order": 3, "noise_fn": "ode"}, deterministic=True),
    Entry("fs_er_sde_ode_3_unic", sample_er_sde, ER_SDE_PRESETS["er_sde_ode_3_unic"], deterministic=True),
    Entry("fs_er_sde_ode_3_unic, calibrated schedule", sample_er_sde, ER_SDE_PRESETS["er_sde_ode_3_unic"],
          deterministic=True, calibrated="fs_er_sde_ode_3_unic"),
    Entry("er_sde_ode_3 (paper)", sample_er_sde, {"order": 3, "noise_fn": "ode", "derivatives": "paper"},
          deterministic=True),
    Entry("fs_er_sde_3 (sde_5)", sample_er_sde, {"order": 3, "noise_fn": "sde_5"}),
    Entry("er_sde_3 (comfy parity)", sample_er_sde, {"order": 3, "noise_fn": "sde_5", "derivatives": "paper",
                                                     "quadrature": "comfy_riemann", "flow_start": "comfy_offset"}),
    Entry("fs_er_sde_sde_3", sample_er_sde, {"order": 3, "noise_fn": "reverse_sde"}),
    Entry("er_sde_sde_1 (euler_a)", sample_er_sde, {"order": 1, "noise_fn": "reverse_sde"}),
    Entry("fs_ddim_eta (eta 0.5)", sample_ddim_gmm, {"eta": 0.5, "components": 1}),
    Entry("ddim_gmm strict (eta 0.5, 2-D: K=2)", sample_ddim_gmm,
          {"eta": 0.5, "components": 2, "scale": 0.9, "scale_units": "relative", "covariance": "strict"}),
    Entry("ddim_gmm vub (eta 0, s 0.1, K=2)", sample_ddim_gmm,
          {"eta": 0.0, "components": 2, "scale": 0.1, "covariance": "vub"}),
    Entry("fs dpm_ot (pool 500, euler)", sample_dpm_ot, {"finisher": "euler"}, junction={"ve": 1.0, "flow": 0.5}),
]
DPM_OT_POOL = 500
CALIBRATE_UP_TO = 20  # NFE; the calibrated row is left out above (its search grows with the step count)

VE_RANGE = (0.029, 14.6)  # SD1.5's sigma range
FLOW_SHIFT, FLOW_T_MIN = 3.0, 0.02


def _schedule(kind: str, steps: int) -> torch.Tensor:
    if kind == "ve":
        return karras_sigmas(steps, *VE_RANGE)
    return flow_shift_sigmas(steps - 1, FLOW_SHIFT, FLOW_T_MIN)  # steps-1 to sigma_min, then 0


def run_comparison(nfes=(5, 10, 20, 50), samples=20_000, ode_samples=2_000, seed=0, kinds=("ve", "flow")):
    """{kind: {label: {nfe: (ode_error or None, sliced_w2, mode_error)}}} plus the floors."""
    mixture = default_mixture()
    results, floors = {}, {}
    for kind in kinds:
        model = ExactModel(mixture, kind)
        gen = torch.Generator().manual_seed(seed)
        start = VE_RANGE[1] if kind == "ve" else 1.0
        x, _ = marginal_sample(mixture, samples, start, model.schedule, gen)
        data, _ = mixture.sample(samples, gen)
        fresh, _ = mixture.sample(samples, gen)
        floors[kind] = sliced_w2(data, fresh)
        sigma_min = float(_schedule(kind, 10)[-2])
        # Exact reference: the probability-flow ODE to the common sigma_min, then the final denoise.
        ode_end = solve_pf_ode(model, x[:ode_samples], start, sigma_min, rtol=1e-10)
        ode_ref = model(ode_end, torch.full((ode_samples,), sigma_min, dtype=torch.float64))
        results[kind] = {}
        for entry in SAMPLERS:
            row = {}
            start_x, options = x, entry.options
            if entry.junction is not None:
                start_x, options = _dpm_ot_start(entry, kind, model, mixture, samples, seed)
            for nfe in nfes:
                if entry.calibrated and nfe > CALIBRATE_UP_TO:
                    row[nfe] = (None, None, None)
                    continue
                steps = entry.steps_for(nfe)
                sigmas = _schedule(kind, steps) if entry.junction is None else junction_schedule(
                    lambda total: _schedule(kind, total), steps, entry.junction[kind])
                run_fn, run_options = entry.fn, options
                if entry.calibrated:
                    sigmas, report = _calibrated(entry.calibrated, kind, model, steps, start, sigma_min, seed)
                    run_options = {**options, **report.sampler_options}
                    if "step_tuning" in run_options:  # as the node's SAMPLER output runs it
                        run_fn, run_options = sample_tuned, {"sampler": entry.fn, **run_options}
                out = run_fn(model, start_x.clone(), sigmas, extra_args={"seed": seed}, disable=True, **run_options)
                ode_err = float((out[:ode_samples] - ode_ref).norm(dim=1).mean()) if entry.deterministic else None
                row[nfe] = (ode_err, sliced_w2(out, data), mode_weight_error(out, mixture))
            results[kind][entry.label] = row
    return results, floors


def _calibrated(name, kind, model, steps, start, sigma_min, seed):
    """A schedule fitted to this model and sampler on 256 calibration noises of their own (no data)."""
    noise = torch.randn(256, model.mixture.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 7))
    return calibrate_schedule(model, noise, steps, name, sigma_min=sigma_min, sigma_max=start, holdout=0)


def _dpm_ot_start(entry: Entry, kind: str, model: ExactModel, mixture, samples: int, seed: int):
    """(x = s_j * unit noise, options with a map fitted to a fresh pool of data) for a DPM-OT entry."""
    sigma_j = entry.junction[kind]
    pool = mixture.sample(DPM_OT_POOL, torch.Generator().manual_seed(seed + 2))[0]
    ot_map, _ = fit_ot_map(pool_from_clean(pool, sigma_j, "eps" if kind == "ve" else "const", seed=seed),
                           iterations=300, seed=seed)
    noise = torch.randn(samples, pool.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 3))
    s_j = float(model.schedule.s(torch.tensor(sigma_j, dtype=torch.float64)))
    return s_j * noise, {**entry.options, "ot_map": ot_map}


def format_tables(results, floors, nfes) -> str:
    lines = []
    width = max(len(e.label) for e in SAMPLERS) + 2
    for kind, rows in results.items():
        model = "VE/eps model, Karras 14.6->0.029" if kind == "ve" else f"flow model, shift {FLOW_SHIFT:g}"
        for title, idx in (("mean distance to the exact ODE solution (deterministic samplers)", 0),
                           (f"sliced W2 to the data (floor of two exact sets: {floors[kind]:.4f})", 1),
                           ("mode-weight error (total variation of mode frequencies)", 2)):
            lines.append(f"\n{model} - {title}")
            lines.append("sampler".ljust(width) + "".join(f"NFE {n:<6}" for n in nfes))
            for label, row in rows.items():
                cells = [row[n][idx] for n in nfes]
                if all(c is None for c in cells):
                    continue
                lines.append(label.ljust(width) + "".join("-".ljust(10) if c is None else f"{c:<10.4f}" for c in cells))
    return "\n".join(lines)


def entry_is_calibrated(label: str) -> bool:
    return any(e.label == label and e.calibrated for e in SAMPLERS)


def write_plot(results, nfes, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install 'comfyui-fast-samplers[plot]').")
        return None
    kinds = list(results)
    fig, axes = plt.subplots(2, len(kinds), figsize=(6 * len(kinds), 9), squeeze=False)
    for col, kind in enumerate(kinds):
        for row_idx, (idx, ylabel) in enumerate(((0, "distance to exact ODE solution"), (1, "sliced W2 to data"))):
            ax = axes[row_idx][col]
            for k, (label, row) in enumerate(results[kind].items()):
                points = [(n, row[n][idx]) for n in nfes if row[n][idx] is not None]
                if len(points) < len(nfes) and (len(points) < 2 or not entry_is_calibrated(label)):
                    continue
                ax.loglog(*zip(*points), marker="os^vD<>ph*X"[k % 11], color=plt.cm.tab20(k % 20), label=label)
            ax.set_xlabel("NFE")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{kind} model: {ylabel}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = free_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfyui_fast_samplers")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="error vs NFE of every sampler on the built-in exact models")
    cmp.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    cmp.add_argument("--samples", type=int, default=20_000)
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--plot", type=Path, default=Path("fast_samplers_compare.png"),
                     help="where to write the plot (an existing file is never overwritten)")
    args = parser.parse_args(argv)
    if args.command == "compare":
        if min(args.nfe) < 2 or args.samples < 100:
            parser.error("--nfe values must be >= 2 and --samples >= 100")
        t0 = time.perf_counter()
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
        results, floors = run_comparison(tuple(args.nfe), args.samples, min(2_000, args.samples), args.seed)
        print(format_tables(results, floors, args.nfe))
        path = write_plot(results, args.nfe, args.plot)
        if path:
            print(f"\nplot written to {path}")
        print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
