"""DBIM vs DDBM Heun: distribution error vs NFE on the exact bridge model and on the tiny learned
bridge model (tests/assets), CPU time per NFE. Writes benchmarks/results/dbim.md and dbim_grid.png.

    python benchmarks/dbim.py            # ~5-10 min on 2 CPU cores
    python benchmarks/dbim.py --train-toy tests/assets/toy_bridge_vp16.safetensors   # re-train the asset (~5 min)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from comfyui_fast_samplers.samplers.bridges.adm_unet import ADM_CONFIGS, ADMUNet, build_adm_unet
from comfyui_fast_samplers.samplers.bridges.schedule import SCHEDULE_PRESETS, dbim_steps_for_nfe, heun_nfe, heun_steps_for_nfe
from comfyui_fast_samplers.testbeds.bridges import (
    TOY_PALETTE, ExactBridgeModel, default_joint_mixture, fill_colours, toy_pairs, train_toy_bridge,
)
from comfyui_fast_samplers.samplers.common import seeded_noise_sampler
from comfyui_fast_samplers.samplers.bridges.dbim import (
    BRIDGE_PRESETS, METADATA_KEY, BridgeDenoiser, detect_preset, load_bridge_checkpoint, sample_dbim, sample_ddbm_heun,
)
from comfyui_fast_samplers.testbeds.mixtures import exact_w2

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TOY = ROOT / "tests" / "assets" / "toy_bridge_vp16.safetensors"
NFES = (5, 10, 20, 50)
DBIM_VARIANTS = {"DBIM eta 0": dict(eta=0.0), "DBIM eta 0.5": dict(eta=0.5), "DBIM eta 1": dict(eta=1.0),
                 "DBIM order 2": dict(order=2), "DBIM order 3": dict(order=3)}


def run_sampler(denoiser, x_T, schedule, name, nfe, seed=0, noise_sampler=None):
    """(output, actual NFE, seconds)."""
    start = time.perf_counter()
    if name == "DDBM Heun":
        steps = heun_steps_for_nfe(nfe, 0.33)
        out = sample_ddbm_heun(denoiser, x_T, schedule, steps, seed=seed, noise_sampler=noise_sampler, disable=True)
        used = heun_nfe(steps, 0.33)
    else:
        out = sample_dbim(denoiser, x_T, schedule, dbim_steps_for_nfe(nfe), seed=seed, noise_sampler=noise_sampler,
                          disable=True, **DBIM_VARIANTS[name])
        used = nfe
    return out, used, time.perf_counter() - start


def exact_section(n: int) -> list[str]:
    joint = default_joint_mixture()
    lines = []
    for kind, spacing in (("vp", "uniform_t"),):
        model = ExactBridgeModel(joint, SCHEDULE_PRESETS[kind])
        x_T = torch.tensor([0.05, 0.0], dtype=torch.float64)
        ref = model.sample_marginal(x_T, model.schedule.t_min, n, torch.Generator().manual_seed(1))
        floor = exact_w2(ref, model.sample_marginal(x_T, model.schedule.t_min, n, torch.Generator().manual_seed(2)))
        X = x_T.expand(n, 2).clone()
        lines += [f"### Exact bridge model ({kind.upper()}, x_T = (0.05, 0), {n} samples)", "",
                  f"W2 (exact, POT) to exact samples of q(x_t_min | x_T); two exact sets differ by **{floor:.3f}** "
                  "(the noise floor). DDBM Heun uses churn 0.33 and steps = round((NFE + 1) / 3); its actual NFE is "
                  "in brackets where it differs.", "",
                  "| sampler | " + " | ".join(f"NFE {k}" for k in NFES) + " |", "|---|" + "---|" * len(NFES)]
        for name in [*DBIM_VARIANTS, "DDBM Heun"]:
            cells = []
            for nfe in NFES:
                out, used, _ = run_sampler(model, X, model.schedule, name, nfe, noise_sampler=seeded_noise_sampler(X, 0))
                cells.append(f"{exact_w2(out, ref):.3f}" + ("" if used == nfe else f" [{used}]"))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
        lines.append("")
    return lines


def toy_metrics(out, x0, mask):
    colours = fill_colours(out, mask)
    nearest = ((colours[:, None] - TOY_PALETTE[None]) ** 2).sum(-1)
    return {"mse": float(((out - x0) ** 2).mean()),
            "bg": float((((out - x0) ** 2) * (1 - mask)).sum() / (3 * (1 - mask).sum())),
            "snap": float(nearest.min(1).values.sqrt().mean()),
            "w2": exact_w2(colours.double(), fill_colours(x0, mask).double())}


def toy_section(n: int, grid_path: Path) -> list[str]:
    sd, meta = load_bridge_checkpoint(TOY)
    preset = detect_preset(sd, meta)
    net = build_adm_unet(preset.adm, sd, dtype=torch.float32)
    den = BridgeDenoiser(net, preset.schedule)
    x0, x_T, mask = toy_pairs(n, torch.Generator().manual_seed(999))
    x_T64 = x_T.double()
    lines = [f"### Tiny learned model (`tests/assets/{TOY.name}`, {n} held-out pairs)", "",
             "Edge map -> filled shape; the fill colour is one of four (the random part). Columns: pixel MSE to the "
             "held-out target | background MSE (quality) | distance of each fill colour to the nearest palette colour "
             "(quality) | W2 between generated and true fill colours (distribution). Reference: DDBM Heun at 119 NFE.",
             "", "| sampler | NFE | pixel MSE | background MSE | colour off-palette | colour W2 |",
             "|---|---|---|---|---|---|"]
    grid = {"condition": x_T[:8], "target": x0[:8]}
    runs = [("DDBM Heun", 119)] + [(name, nfe) for nfe in NFES for name in [*DBIM_VARIANTS, "DDBM Heun"]]
    for name, nfe in runs:
        with torch.no_grad():
            out, used, _ = run_sampler(den, x_T64, preset.schedule, name, nfe)
        out = out.float().clamp(-1, 1)
        m = toy_metrics(out, x0, mask)
        lines.append(f"| {name} | {used} | {m['mse']:.4f} | {m['bg']:.5f} | {m['snap']:.3f} | {m['w2']:.3f} |")
        print(lines[-1], flush=True)
        if (name, nfe) in (("DDBM Heun", 119), ("DDBM Heun", 20), ("DBIM eta 0", 5), ("DBIM eta 0", 10),
                           ("DBIM eta 0", 20), ("DBIM order 3", 10)):
            grid[f"{name}, NFE {used}"] = out[:8]
    _save_grid(grid, grid_path)
    return lines + [""]


def _save_grid(rows: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 8, figsize=(8 * 0.9, len(rows) * 0.95))
    for r, (label, images) in enumerate(rows.items()):
        for c in range(8):
            ax = axes[r, c]
            ax.imshow(((images[c].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _best_seconds(fn, repeats=3):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def timing_section() -> list[str]:
    """CPU seconds per NFE (best of a few repeats: the machines are shared) of the toy UNet and the
    full-size edges->handbags UNet (random weights), and the sampler's own cost per step."""
    sd, meta = load_bridge_checkpoint(TOY)
    toy = detect_preset(sd, meta)
    toy_den = BridgeDenoiser(build_adm_unet(toy.adm, sd, dtype=torch.float32), toy.schedule)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        e2h_den = BridgeDenoiser(ADMUNet(ADM_CONFIGS["e2h"]).eval(), SCHEDULE_PRESETS["vp"])
    lines = ["### CPU time per NFE", "", f"fp32 weights, float64 sampler state, torch threads = "
             f"{torch.get_num_threads()}, shared 2-core machine (best of 3 runs; 1 for e2h).", "",
             "| network | resolution | batch | s / NFE |", "|---|---|---|---|"]
    for label, den, size, batches, repeats in (("toy UNet (355k parameters)", toy_den, 16, (1, 64), 3),
                                               ("e2h UNet (295M parameters, random weights)", e2h_den, 64, (1, 4), 1)):
        for batch in batches:
            x = torch.rand(batch, 3, size, size, dtype=torch.float64) * 2 - 1
            t = torch.full((batch,), 0.5, dtype=torch.float64)
            with torch.no_grad():
                secs = _best_seconds(lambda: den(x, t, x), repeats)
            lines.append(f"| {label} | {size}x{size} | {batch} | {secs:.3f} |")
            print(lines[-1], flush=True)
    x = torch.rand(16, 3, 64, 64, dtype=torch.float64)
    free = lambda x_t, t, x_T: x_t  # noqa: E731  (a zero-cost denoiser: what the sampler itself costs)
    sched = SCHEDULE_PRESETS["vp"]
    per_step = {name: _best_seconds(fn) / steps for name, fn, steps in (
        ("DBIM eta 0.5", lambda: sample_dbim(free, x, sched, 49, eta=0.5, disable=True), 50),
        ("DBIM order 3", lambda: sample_dbim(free, x, sched, 49, order=3, disable=True), 50),
        ("DDBM Heun", lambda: sample_ddbm_heun(free, x, sched, 17, disable=True), heun_nfe(17, 0.33)))}
    lines += ["", "Sampler overhead (zero-cost denoiser, [16, 3, 64, 64] float64; DBIM eta > 0 draws its noise from "
              "per-image CPU generators): " + ", ".join(f"{k} {v * 1e3:.1f} ms per NFE" for k, v in per_step.items())
              + ".", ""]
    print(lines[-2], flush=True)
    return lines


def write_toy_asset(path: Path, steps: int = 1500):
    """Train the toy bridge (CPU, deterministic) and store its EMA weights as float16 with the preset."""
    from safetensors.torch import save_file

    net = train_toy_bridge(steps)
    training = (f"comfyui_fast_samplers.testbeds.bridges.train_toy_bridge(steps={steps}, batch=32, lr=1e-3, "
                f"seed=0) on the CPU (torch {torch.__version__}), EMA weights stored as float16")
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={METADATA_KEY: BRIDGE_PRESETS["toy_shapes16"].to_json(), "training": training})


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exact-samples", type=int, default=2000)
    parser.add_argument("--toy-samples", type=int, default=64)
    parser.add_argument("--train-toy", type=Path, default=None, help="re-train the toy model into this file and exit")
    args = parser.parse_args()
    if args.train_toy is not None:
        write_toy_asset(args.train_toy)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the exact model is many tiny ops
    lines = ["# DBIM bridge samplers: measured", "", "Produced by `python benchmarks/dbim.py` on the CPU (torch "
             f"{torch.__version__}).", ""]
    lines += exact_section(args.exact_samples)
    torch.set_num_threads(2)
    lines += toy_section(args.toy_samples, RESULTS / "dbim_grid.png")
    lines += ["![DBIM vs DDBM Heun on held-out pairs](dbim_grid.png)", ""]
    lines += timing_section()
    (RESULTS / "dbim.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'dbim.md'}")


if __name__ == "__main__":
    main()
