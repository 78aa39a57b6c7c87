"""Calibrated schedules against ComfyUI's own samplers and schedulers at equal NFE.

For each test-bed model (the exact Gaussian mixtures of ``comfy_peers.TESTBED_MODELS`` and the learned
digits models of ``testbeds/digits.py``, eps and flow) behind real ComfyUI ``model_sampling`` objects:

* every deterministic ComfyUI sampler on every ComfyUI schedule (+ AYS / GITS / OptimalSteps tables),
  both length rules, matched on counted NFE (``comfy_peers.peer_table``): the best peer;
* the pack's default ODE preset uncalibrated on the stock schedules, against the best ComfyUI sampler
  on the same schedule;
* ``calibrate_schedule`` for the pack's samplers and for ComfyUI ones used as black boxes, fitted on
  calibration noises (seed 0) and scored on separate hold-out noises (seed 1), the same noises every
  peer is scored on.

Error = mean per-sample L2 distance to the reference from the same start: for the exact models the
exact probability-flow ODE to the model's sigma_min, then the denoise; for the learned models their
own 500-step solve (the corrected order-3 ER ODE on the calibrator's teacher grid), then the denoise.

Run from the repository root in the ComfyUI venv (``scripts/test.sh`` builds ``.venv-comfyui``):

    .venv-comfyui/bin/python benchmarks/calibration.py        # --help: --nfe, --noises, --models, --quick
    .venv-comfyui/bin/python benchmarks/calibration.py --every-sampler   # + ComfyUI samplers calibrated

Writes ``benchmarks/results/calibration.md`` and ``docs/calibration.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import comfy_peers as cp  # noqa: E402
from comfyui_fast_samplers.samplers import SAMPLERS, calibrate_schedule, sample_tuned  # noqa: E402
from comfyui_fast_samplers.samplers.calibration.pipeline import TEACHER, model_sigma_range  # noqa: E402
from comfyui_fast_samplers.samplers.files import atomic_write_text  # noqa: E402
from comfyui_fast_samplers.samplers.calibration.search import SigmaRange, candidate_grid, fine_grid  # noqa: E402
from comfyui_fast_samplers.testbeds.mixtures import ExactModel  # noqa: E402
from comfyui_fast_samplers.testbeds.digits import load_digits_model  # noqa: E402

DEFAULT = "fs_er_sde_ode_3_unic"  # the pack's default ODE preset
PACK_CALIBRATED = ("fs_er_sde_ode_3_unic", "fs_er_sde_ode_3")
COMFY_CALIBRATED = ("gradient_estimation", "ipndm", "uni_pc", "dpmpp_2m")
MODELS = ("ve-2d", "ve-64d", "flow-2d", "flow-256d", "digits-eps", "digits-flow")
OUT = REPO / "benchmarks" / "results" / "calibration.md"
PLOT = REPO / "docs" / "calibration.png"
PEER_CACHE = REPO / "benchmarks" / ".cache"
NFES = (5, 8, 10, 20)


def build_model(name: str):
    """(denoiser, ComfyUI model_sampling, kind, dim, reference_fn(noise))."""
    if name.startswith("digits"):
        kind = "ve" if name == "digits-eps" else "flow"
        denoiser = load_digits_model(kind)
        ms = cp.model_sampling(kind)
        return denoiser, ms, kind, 64, functools.partial(teacher_reference_fn, denoiser, ms)
    factory, kind = cp.TESTBED_MODELS[name]
    mixture = factory()
    denoiser = ExactModel(mixture, kind)
    ms = cp.model_sampling(kind)
    return denoiser, ms, kind, mixture.dim, functools.partial(cp.exact_reference_fn, denoiser, ms)


def teacher_reference_fn(denoiser, ms, noise):
    """reference(sigmas) for a learned model: its own 500-step solve from the schedule's start state."""
    model = cp.ComfyModel(denoiser, ms)
    cache = {}

    def reference(sigmas):
        key = float(sigmas[0])
        if key not in cache:
            rng = model_sigma_range(model)
            rng = SigmaRange(rng.schedule, rng.sigma_min, key, None)
            nodes = candidate_grid(rng, 126)
            grid, _ = fine_grid(rng, nodes[nodes < key], 4)
            x = cp.start_state(ms, noise.to(torch.float64), sigmas.to(torch.float64))
            cache[key] = TEACHER(model, x, grid, disable=True).to(torch.float64)
        return cache[key]

    return reference


@contextlib.contextmanager
def default_dtype(dtype):
    """ComfyUI's uni_pc makes float32 constants with torch.tensor: run float64 inputs with that default."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def sampler_entry(name: str):
    """(function for the calibrator, (function, options) for comfy_peers.run_sampler)."""
    if name in SAMPLERS:
        return SAMPLERS[name], (SAMPLERS[name], {})
    k = cp.import_comfy().samplers.sampler_object(name)
    fn = functools.partial(k.sampler_function, **k.extra_options) if k.extra_options else k.sampler_function
    return fn, (k.sampler_function, k.extra_options)


def calibrated_rows(model, ms, cal, hold, reference, nfes, names, **options) -> list[dict]:
    """Each sampler calibrated as the node does it, with its own check on as many fresh noises as ``cal``
    (seed 2: neither the calibration noises nor the benchmark's hold-out ones), then scored on ``hold``."""
    guard = torch.randn(cal.shape, dtype=cal.dtype, generator=torch.Generator().manual_seed(2))
    rows = []
    for name in names:
        fn, (run_fn, run_options) = sampler_entry(name)
        for nfe in nfes:
            t0 = time.perf_counter()
            with default_dtype(torch.float64):
                sigmas, report = calibrate_schedule(model, cal, nfe, fn, holdout=guard, **options)
            this_fn, this_options = run_fn, {**run_options, **report.sampler_options}
            if name in SAMPLERS:  # a pack preset with the options the calibration chose
                this_fn, this_options = SAMPLERS[name].func, {**SAMPLERS[name].options, **report.sampler_options}
            if "step_tuning" in report.sampler_options:  # what the node's SAMPLER output runs
                this_fn, this_options = sample_tuned, {"sampler": this_fn, **this_options}
            out, counted = cp.run_sampler(this_fn, this_options, model, hold, sigmas, ms)
            error = float((out - reference(sigmas)).flatten(1).norm(dim=1).mean())
            rows.append(dict(sampler=name, nfe=nfe, counted=counted, error=error, cal=report.calibration_error,
                             calls=sum(report.model_calls.values()), seconds=time.perf_counter() - t0,
                             sigmas=[round(float(s), 4) for s in sigmas], options=report.sampler_options))
    return rows


def same_schedule_rows(model, ms, hold, reference, nfes, peers) -> list[dict]:
    """The default preset uncalibrated on each stock schedule vs the best ComfyUI sampler on that schedule."""
    rows = []
    fn = SAMPLERS[DEFAULT]
    for nfe in nfes:
        for schedule in ("karras", "exponential", "simple", "beta", "kl_optimal", "normal"):
            sigmas = cp.schedule(ms, schedule, nfe)
            if sigmas is None:
                continue
            out, counted = cp.run_sampler(fn, {}, model, hold, sigmas, ms)
            ours = float((out - reference(sigmas)).flatten(1).norm(dim=1).mean())
            same = cp.same_schedule_peers(peers, nfe, schedule)
            if same:
                best = min(same, key=lambda r: r.error)
                rows.append(dict(nfe=nfe, schedule=schedule, ours=ours, peer=best.sampler, peer_error=best.error))
    return rows


def holdout_noise(dim: int, n_hold: int = 500) -> torch.Tensor:
    """The noises every row is scored on (seed 1; a third of them, at least 100, above 64 dimensions)."""
    count = n_hold if dim <= 64 else max(100, n_hold // 3)
    return torch.randn(count, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def cached_peer_table(name: str, model, ms, hold, reference, nfes) -> list:
    """``comfy_peers.peer_table``, stored under benchmarks/.cache/ (git-ignored). The key covers ComfyUI's
    version, the harness's source, the model, the NFEs, the hold-out noises and the reference those peers are
    scored against (its bytes at sigma_max), so a change to any of them runs the peers again."""
    import dataclasses
    import hashlib
    import json

    start = torch.tensor([float(ms.sigma_max), 0.0], dtype=torch.float64)
    digest = hashlib.sha256()
    for part in (cp.import_comfy().version, Path(cp.__file__).read_bytes(), name, repr(list(nfes)),
                 hold.numpy().tobytes(), reference(start).numpy().tobytes()):
        digest.update(part if isinstance(part, bytes) else str(part).encode())
    path = PEER_CACHE / f"peers-{name}-{digest.hexdigest()[:16]}.json"
    if path.is_file():
        return [cp.Row(**row) for row in json.loads(path.read_text())]
    peers = cp.peer_table(model, ms, hold, reference, nfes)
    atomic_write_text(path, json.dumps([dataclasses.asdict(r) for r in peers]))
    return peers


def run_model(name: str, nfes, n_cal: int, n_hold: int, quick: bool, every_sampler: bool = False) -> dict:
    denoiser, ms, kind, dim, reference_fn = build_model(name)
    model = cp.ComfyModel(denoiser, ms)
    cal = torch.randn(n_cal, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hold = holdout_noise(dim, n_hold)
    hold_n = hold.shape[0]
    reference = reference_fn(hold)
    t0 = time.perf_counter()
    peers = cached_peer_table(name, model, ms, hold, reference, nfes)
    best = {nfe: cp.best_peer(peers, nfe, full_start=True) for nfe in nfes}
    t_peers = time.perf_counter() - t0
    names = (DEFAULT,) + (() if quick else PACK_CALIBRATED[1:]) + (COMFY_CALIBRATED if every_sampler else ())
    calibrated = calibrated_rows(model, ms, cal, hold, reference, nfes, names)
    same = same_schedule_rows(model, ms, hold, reference, nfes, peers)
    return dict(name=name, kind=kind, dim=dim, hold=hold_n, best=best, calibrated=calibrated, same=same,
                seconds=time.perf_counter() - t0, peer_seconds=t_peers)


def float32_drift(shift: float = 8.0, steps: int = 20, n: int = 500) -> list[tuple]:
    """ComfyUI #16573: UniPC's b_i recurrence in the model dtype cancels at small steps (high-shift flow
    schedules). (sampler, float32 error, float64 error) on the exact 2-D flow mixture, shift 8, 'simple'."""
    factory, kind = cp.TESTBED_MODELS["flow-2d"]
    ms = cp.model_sampling(kind)
    ms.set_parameters(shift=shift)
    denoiser = ExactModel(factory(), kind)
    model = cp.ComfyModel(denoiser, ms)
    noise = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigmas = cp.schedule(ms, "simple", steps)
    reference = cp.exact_reference_fn(denoiser, ms, noise)(sigmas)
    rows = []
    for name in ("uni_pc", "uni_pc_bh2", DEFAULT):
        _, (fn, options) = sampler_entry(name)
        errors = []
        for dtype in (torch.float32, torch.float64):
            out, _ = cp.run_sampler(fn, options, model, noise.to(dtype), sigmas, ms)
            errors.append(float((out.to(torch.float64) - reference).flatten(1).norm(dim=1).mean()))
        rows.append((name, *errors))
    return rows


def write_markdown(results, args, wall, drift=()) -> str:
    lines = ["# Calibrated schedules vs ComfyUI's samplers and schedulers", "",
             f"Written by `benchmarks/calibration.py` on {dt.date.today()}: ComfyUI {cp.import_comfy().version}, "
             f"torch {torch.__version__}; wall time {wall:.0f} s.", "",
             f"    .venv-comfyui/bin/python benchmarks/calibration.py {' '.join(sys.argv[1:])}".rstrip(), "",
             f"Calibration on {args.noises} noises (seed 0) with the calibrator's own check on as many others (seed "
             "2; it chooses between the untuned, tuned and jointly moved schedule, as the node does), every score "
             "on separate hold-out noises (seed 1; 500, 166 for 256-D), the same for every row. Error = mean per-sample L2 distance to the reference "
             "from the same start (exact models: the exact probability-flow ODE to sigma_min, then the denoise; "
             "digits: the network's own 500-step solve). Best peer = the lowest error of every deterministic "
             "ComfyUI sampler on every ComfyUI schedule and the AYS / GITS / OptimalSteps tables, both length "
             "rules, at the same counted NFE, starting at sigma_max. Targets (issue): calibrated <= 0.7x the best "
             "peer at NFE 5 and <= 0.5x at NFE 10.", "",
             "## Summary: the best calibrated sampler vs the best ComfyUI pairing", "",
             "| model | NFE | best ComfyUI pairing | error | calibrated (sampler) | error | ratio |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        for nfe, peer in res["best"].items():
            rows = [r for r in res["calibrated"] if r["nfe"] == nfe]
            top = min(rows, key=lambda r: r["error"])
            lines.append(f"| {res['name']} | {nfe} | {peer.sampler} / {peer.schedule} | {peer.error:.4g} | "
                         f"{top['sampler']} | {top['error']:.4g} | {top['error'] / peer.error:.2f} |")
    lines += ["", "## The pack's default, calibrated, vs the best ComfyUI pairing", "",
              f"`{DEFAULT}` with the calibrator's schedule and the final step and step tuning it chose (the options "
              "are listed at the end).", "",
              "| model | NFE | best ComfyUI pairing | error | calibrated default | ratio | calibration error | "
              "model calls | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in (r for r in res["calibrated"] if r["sampler"] == DEFAULT):
            peer = res["best"][r["nfe"]]
            lines.append(f"| {res['name']} | {r['nfe']} | {peer.sampler} / {peer.schedule} | {peer.error:.4g} | "
                         f"{r['error']:.4g} | {r['error'] / peer.error:.2f} | {r['cal']:.4g} | {r['calls']} | "
                         f"{r['seconds']:.1f} |")
    lines += ["", "## Every calibrated sampler (hold-out error; ratio to the best ComfyUI pairing)", ""]
    names = list(dict.fromkeys(r["sampler"] for res in results for r in res["calibrated"]))
    lines += ["| model | NFE | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for res in results:
        for nfe, peer in res["best"].items():
            cells = []
            for name in names:
                row = next((r for r in res["calibrated"] if r["nfe"] == nfe and r["sampler"] == name), None)
                cells.append("" if row is None else f"{row['error']:.4g} ({row['error'] / peer.error:.2f})")
            lines.append(f"| {res['name']} | {nfe} | " + " | ".join(cells) + " |")
    lines += ["", "## Uncalibrated: the default on stock schedules vs the best ComfyUI sampler on the same schedule",
              "", "| model | NFE | schedule | best ComfyUI sampler there | its error | default | ratio |",
              "|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["same"]:
            lines.append(f"| {res['name']} | {r['nfe']} | {r['schedule']} | {r['peer']} | {r['peer_error']:.4g} | "
                         f"{r['ours']:.4g} | {r['ours'] / r['peer_error']:.2f} |")
    lines += ["", "## Calibrated schedules (the default preset)", ""]
    for res in results:
        for r in (r for r in res["calibrated"] if r["sampler"] == DEFAULT):
            lines.append(f"- {res['name']}, NFE {r['nfe']}: {r['sigmas']}" +
                         (f" ({r['options']})" if r["options"] else ""))
    if drift:
        lines += ["", "## float32 coefficients (ComfyUI #16573)", "",
                  "Exact 2-D flow mixture, shift 8, 'simple', 20 steps, the same noises run in float32 and float64 "
                  "(error vs the exact ODE). ComfyUI 0.3.64's uni_pc computes its step coefficients in the latent's "
                  "dtype (the cancellation reported with Wan 2.2 at shift 8, worst on MPS); the pack computes every "
                  "coefficient once in float64 on the host. On this CPU the float32 drift does not show end to "
                  "end: both columns agree to about 1e-4 relative.", "",
                  "| sampler | float32 | float64 |", "|---|---|---|"]
        lines += [f"| {name} | {e32:.4g} | {e64:.4g} |" for name, e32, e64 in drift]
    lines += ["", "Time per model (peers + calibrations): " +
              ", ".join(f"{res['name']} {res['seconds']:.0f} s (peers {res['peer_seconds']:.0f} s)"
                        for res in results) + "."]
    return "\n".join(lines) + "\n"


def write_plot(results, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    cols = min(3, len(results))
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.set_visible(False)
    for ax, res in zip(axes.flat, results):
        nfes = list(res["best"])
        ax.loglog(nfes, [res["best"][n].error for n in nfes], "k-o", label="best ComfyUI pairing")
        for name, style in ((DEFAULT, "r-s"), ("gradient_estimation", "b--^"), ("ipndm", "g--v")):
            pts = [(r["nfe"], r["error"]) for r in res["calibrated"] if r["sampler"] == name]
            if pts:
                ax.loglog(*zip(*pts), style, label=f"calibrated {name}")
        ax.set_title(f"{res['name']} (error vs the model's own exact / fine solve)", fontsize=8)
        ax.set_xlabel("NFE")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("mean L2 error")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    parser.add_argument("--noises", type=int, default=256, help="calibration noises")
    parser.add_argument("--holdout", type=int, default=500)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--quick", action="store_true", help="only the default preset is calibrated")
    parser.add_argument("--every-sampler", action="store_true",
                        help=f"also calibrate ComfyUI samplers as black boxes: {', '.join(COMFY_CALIBRATED)}")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = []
    for name in args.models:
        results.append(run_model(name, args.nfe, args.noises, args.holdout, args.quick, args.every_sampler))
        print(f"{name}: {results[-1]['seconds']:.0f} s (peers {results[-1]['peer_seconds']:.0f} s)", flush=True)
    drift = float32_drift()
    text = write_markdown(results, args, time.perf_counter() - t0, drift)
    atomic_write_text(args.out, text)
    write_plot(results, args.plot)
    print(text)
    return 0 if all(math.isfinite(r["error"]) for res in results for r in res["calibrated"]) else 1


if __name__ == "__main__":
    sys.exit(main())
