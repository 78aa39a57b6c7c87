"""Per-step overhead of the pack's samplers against ComfyUI's own, with an identity model.

    PYTHONPATH=.. /tmp/cvenv/bin/python benchmarks/overhead.py      # --help: --repeats, --brownian-repeats, --steps, --rows, --before, --out

With the model ``D(x, sigma) = x`` a step costs the sampler's own work: planning (the pack computes
every coefficient of a run once, in float64 on the host), the per-step arithmetic on the latent and
the noise draw. Every row runs a whole sampler call (setup and planning included) on a VE model
(SD1.5's discrete EPS table, karras schedule as ComfyUI computes it, float32), seed 0, no progress
bar, one torch thread; the time is divided by the step count. Rows are interleaved (each repetition
runs every row once, in a rotated order) and the median is kept, so load from other processes
slows all rows alike; ratios are taken within one run. The Brownian rows (tens of milliseconds a
step) run as a second interleaved group with fewer rounds, beside ComfyUI's euler again. The ER-SDE
entries also run with an empty plan cache swapped in for each call ("cold plan": a schedule's first run;
the other rows keep their cached plans).

Ratios: every row against ComfyUI's ``euler``; stochastic rows also against ComfyUI's
``euler_ancestral`` (which pays the same Gaussian draw per step), and Brownian-noise rows against
ComfyUI's BrownianTree samplers (``dpmpp_2m_sde``, whose default noise is a BrownianTreeNoiseSampler).

``--before DIR``: DIR is an older checkout of the pack (e.g. ``git archive <commit> | tar -x -C
/tmp/before/fs_before``); it is imported under its directory name and its rows run interleaved with
the current ones, marked "(before)".

ComfyUI comes from $COMFYUI_PATH or a temporary copy of ../shared/comfyui (benchmarks/comfy_peers.py
imports it). ``--rows A B``: only the rows whose names contain A or B (and ComfyUI euler, the scale, and
ComfyUI euler_ancestral / dpmpp_2m_sde where a stochastic / Brownian row needs them), for iterating on a
few rows; the committed results file is a full run. Writes benchmarks/results/overhead.md (through a temporary file and a rename).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from comfy_peers import ComfyModel, import_comfy, model_sampling, schedule

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "overhead.md"
SHAPES = ((4, 4, 64, 64), (1, 16, 128, 128))
COMFY_ROWS = ("euler", "euler_ancestral", "er_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde")
COMFY_STOCHASTIC = ("euler_ancestral", "er_sde")
COMFY_BROWNIAN = ("dpmpp_2m_sde", "dpmpp_3m_sde")


def pack_rows(package: str, suffix: str = "") -> dict:
    """name -> (function, options, kind) of the pack's rows: every KSampler dropdown entry (the ER-SDE ones
    also with an empty plan cache for each call: the first run of a schedule), the library's euler
    and dpmpp_2m, and the two stochastic ER-SDE presets with Brownian noise. kind: 'ode' | 'sde' | 'brownian'."""
    samplers = importlib.import_module(package + ".samplers")
    presets = importlib.import_module(package + ".samplers.presets")
    rows = {}
    for name, (fn, options) in presets.PRESET_OPTIONS.items():
        stochastic = options.get("eta", 1.0) > 0 if fn is samplers.sample_ddim_gmm else options["noise_fn"] != "ode"
        rows[name + suffix] = (samplers.SAMPLERS[name], {}, "sde" if stochastic else "ode")
    er_sde = importlib.import_module(package + ".samplers.er_sde")
    if hasattr(er_sde, "_plan_of"):  # the plan cache: also time every ER-SDE entry with an empty one
        for name, (fn, options) in presets.PRESET_OPTIONS.items():
            if fn is samplers.sample_er_sde:
                rows[name + " (cold plan)" + suffix] = (_cold(samplers.SAMPLERS[name], er_sde),
                                                        {}, rows[name + suffix][2])
    rows["euler (library)" + suffix] = (samplers.sample_euler, {}, "ode")
    rows["dpmpp_2m (library)" + suffix] = (samplers.sample_dpmpp_2m, {}, "ode")
    for name in ("er_sde_3", "er_sde_sde_3"):
        options = presets.ER_SDE_PRESETS[name]
        rows[f"fs_{name} noise=brownian" + suffix] = (samplers.sample_er_sde, {**options, "noise": "brownian"}, "brownian")
    return rows


def _cold(sampler, er_sde):
    """The sampler run with an empty plan cache swapped in for the call: the other rows keep their cached plans
    (clearing the shared cache made the next rows of every round plan cold too)."""
    def run(*args, **kwargs):
        shared = er_sde._plan_of
        er_sde._plan_of = functools.lru_cache(maxsize=shared.cache_info().maxsize)(shared.__wrapped__)
        try:
            return sampler(*args, **kwargs)
        finally:
            er_sde._plan_of = shared
    return run


def comfy_rows() -> dict:
    sampling = import_comfy().sampling
    kinds = {name: "sde" if name in COMFY_STOCHASTIC else "brownian" if name in COMFY_BROWNIAN else "ode"
             for name in COMFY_ROWS}
    return {f"ComfyUI {name}": (getattr(sampling, "sample_" + name), {}, kinds[name]) for name in COMFY_ROWS}


def measure(rows: dict, shape, steps: int, repeats: int, seed: int = 0) -> dict:
    """Median seconds per step of every row (one warm-up call each, then ``repeats`` interleaved rounds)."""
    ms = model_sampling("ve")
    model = ComfyModel(lambda x, sigma: x, ms)
    sigmas = schedule(ms, "karras", steps).to(torch.float32)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * float(sigmas[0])
    names = list(rows)

    def call(name):
        fn, options, _ = rows[name]
        return fn(model, x, sigmas.clone(), extra_args={"seed": seed}, callback=None, disable=True, **options)

    for name in names:
        call(name)
    times = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            call(name)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) / steps for name, t in times.items()}


def selected_rows(rows: dict, patterns) -> dict:
    """The rows named by ``--rows``, plus the ComfyUI rows their cells are divided by."""
    keep = {name for name in rows if any(p in name for p in patterns)}
    kinds = {rows[name][2] for name in keep if not name.startswith("ComfyUI")}
    keep |= {TARGETS[kind][0] for kind in kinds} | {"ComfyUI euler"}
    return {name: row for name, row in rows.items() if name in keep}


def load_average() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def table(rows: dict, results: dict, shapes, steps_list) -> list[str]:
    cols = [(shape, steps) for shape in shapes for steps in steps_list]
    head = " | ".join(f"{list(shape)} {steps} steps" for shape, steps in cols)
    lines = [f"| row | kind | {head} |", "|---|---|" + "---|" * len(cols)]
    for name, (_, _, kind) in rows.items():
        cells = []
        for col in cols:
            res = results[col]
            cell = f"{res[name] / res['ComfyUI euler']:.2f}"
            if kind == "sde" and not name.startswith("ComfyUI"):
                cell += f" / {res[name] / res['ComfyUI euler_ancestral']:.2f}"
            if kind == "brownian" and not name.startswith("ComfyUI"):
                cell += f" / {res[name] / res['ComfyUI dpmpp_2m_sde']:.2f}"
            cells.append(cell)
        lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    return lines


TARGETS = {"ode": ("ComfyUI euler", 1.2), "sde": ("ComfyUI euler_ancestral", 2.0), "brownian": ("ComfyUI dpmpp_2m_sde", 3.0)}


def over_target(rows: dict, results: dict) -> list[str]:
    """The pack's rows above the targets of issue 12 (deterministic <= 1.2x ComfyUI euler, stochastic <= 2x
    ComfyUI euler_ancestral, Brownian <= 3x ComfyUI dpmpp_2m_sde), per column."""
    lines = []
    for (shape, steps), res in results.items():
        misses = [f"{name} {res[name] / res[TARGETS[kind][0]]:.2f}" for name, (_, _, kind) in rows.items()
                  if not name.startswith("ComfyUI") and "(before)" not in name
                  and res[name] / res[TARGETS[kind][0]] > TARGETS[kind][1]]
        lines.append(f"- {list(shape)} {steps} steps: " + (", ".join(misses) if misses else "none"))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=31, help="interleaved rounds (median kept)")
    parser.add_argument("--brownian-repeats", type=int, default=5, help="interleaved rounds of the Brownian rows")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--rows", nargs="+", default=None, help="only rows whose names contain one of these")
    parser.add_argument("--before", type=Path, default=None, help="an older checkout of the pack to compare with")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    comfy = import_comfy()
    env = f"COMFYUI_PATH={os.environ['COMFYUI_PATH']} " if os.environ.get("COMFYUI_PATH") else ""
    command = env + shlex.join([sys.executable, "benchmarks/overhead.py", *(sys.argv[1:] if argv is None else argv)])
    rows = {**comfy_rows(), **pack_rows("comfyui_fast_samplers")}
    if args.before is not None:
        sys.path.insert(0, str(args.before.resolve().parent))
        rows.update(pack_rows(args.before.name, " (before)"))
    if args.rows is not None:
        rows = selected_rows(rows, args.rows)
    t0, load_start = time.perf_counter(), load_average()
    results = {}
    for shape in SHAPES:
        for steps in args.steps:
            print(f"{list(shape)} {steps} steps ...", flush=True)
            fast = {name: row for name, row in rows.items() if row[2] != "brownian"}
            slow = {name: row for name, row in rows.items() if row[2] == "brownian" or name == "ComfyUI euler"}
            res = measure(fast, shape, steps, args.repeats)
            brownian = measure(slow, shape, steps, args.brownian_repeats) if len(slow) > 1 else dict(res)
            scale = res["ComfyUI euler"] / brownian.pop("ComfyUI euler")  # Brownian rows on the fast group's euler
            results[(shape, steps)] = {**res, **{name: t * scale for name, t in brownian.items()}}
    runtime, load_end = time.perf_counter() - t0, load_average()
    euler_us = ", ".join(f"{list(shape)} {steps} steps {1e6 * results[(shape, steps)]['ComfyUI euler']:.0f} us"
                         for shape in SHAPES for steps in args.steps)
    lines = [
        f"# Per-step overhead with an identity model ({datetime.date.today()})", "",
        f"ComfyUI {comfy.version}, torch {torch.__version__}, 1 torch thread, CPU; load average (1/5/15 min) "
        f"{load_start} at the start, {load_end} at the end (the machine's cores are shared).", "",
        f"    {command}", "",
        f"Median of {args.repeats} interleaved rounds per row, a whole sampler call (setup and planning included) "
        "divided by the step count; VE model (SD1.5 EPS table), karras, float32, seed 0. The Brownian rows (and "
        f"ComfyUI euler once more, which scales them) run as a second interleaved group, median of "
        f"{args.brownian_repeats} rounds.", "",
        "Cells: time per step / ComfyUI euler's; stochastic rows (sde) of the pack also / ComfyUI euler_ancestral's "
        "(the same one Gaussian draw per step), Brownian rows also / ComfyUI dpmpp_2m_sde's (BrownianTreeNoiseSampler).",
        "", f"ComfyUI euler per step: {euler_us}.", "",
        *table(rows, results, SHAPES, args.steps), "",
        "Above the targets (deterministic <= 1.2x ComfyUI euler, stochastic <= 2x ComfyUI euler_ancestral, "
        "Brownian <= 3x ComfyUI dpmpp_2m_sde; current rows only):", "", *over_target(rows, results), "",
        f"Run time {runtime:.0f} s.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
