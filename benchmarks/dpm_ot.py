"""DPM-OT: fit cost vs N and d, and sample statistics on the exact 8-mode model (spec E3).

    python benchmarks/dpm_ot.py            # writes benchmarks/results/dpm_ot.md (~5 min, 2 CPU cores)
    python benchmarks/dpm_ot.py --quick    # fewer samples and sizes

Sampling part: d = 16, 8 separated modes (weights 0.3 ... 0.05, std 0.5), pool of 1000 exact data
points; off-mode rate = fraction outside every mode's 99.9% ball (the analogue of mode mixture),
mode-weight error = TV of mode frequencies, NN ratio = median distance to the nearest pool point over
the same for fresh data (< 1: outputs hug the pool). Baselines start from sigma 80 (VE, Karras) or
sigma 1 (flow, shift-3 schedule); DPM-OT finishes on the same scheduler's tail from the junction."""
from __future__ import annotations

import argparse
import datetime
import resource
import time
from pathlib import Path

import torch

from comfyui_fast_samplers.samplers.classic import sample_dpmpp_2m, sample_euler
from comfyui_fast_samplers.samplers.ddim_gmm import sample_ddim_gmm
from comfyui_fast_samplers.samplers.dpm_ot import (
    fit_heights, fit_ot_map, junction_schedule, pool_from_clean, sample_dpm_ot, score_factor,
)
from comfyui_fast_samplers.samplers.er_sde import PRESETS, sample_er_sde
from comfyui_fast_samplers.samplers.schedule import flow_shift_sigmas, karras_sigmas
from comfyui_fast_samplers.testbeds.mixtures import (
    ExactModel, chi2_rms_radius, mode_weight_error, off_mode_rate, pool_distance_ratio, separated_mixture,
)

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = {
    "euler": (sample_euler, {}),
    "euler_ancestral": (sample_er_sde, {"order": 1, "noise_fn": "reverse_sde"}),
    "dpmpp_2m": (sample_dpmpp_2m, {}),
    "fs_er_sde_ode_3": (sample_er_sde, PRESETS["er_sde_ode_3"]),
    "fs_er_sde_3": (sample_er_sde, PRESETS["er_sde_3"]),
    "fs_ddim_gmm (eta 0, vub)": (sample_ddim_gmm, {"eta": 0.0, "components": 8, "covariance": "vub"}),
}
DPM_OT_VARIANTS = {
    "DPM-OT euler": {"finisher": "euler"},
    "DPM-OT euler, random pick": {"finisher": "euler", "random_pick": True},
    "DPM-OT euler_ancestral": {"finisher": "euler_ancestral"},
    "DPM-OT euler, renoise": {"finisher": "euler", "placement": "renoise"},
    "DPM-OT euler, aeot_pair": {"finisher": "euler", "placement": "aeot_pair"},
}


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fit_costs(sizes, iterations):
    rows = []
    for n, d in sizes:
        g = torch.Generator().manual_seed(n + d)
        centres = torch.randn(16, d, generator=g)
        targets = (centres[torch.randint(0, 16, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g))
        targets = (targets * torch.empty(n, 1).uniform_(0.6, 1.4, generator=g)).half()
        t0 = time.perf_counter()
        factor = score_factor(targets)
        t_factor = time.perf_counter() - t0
        t0 = time.perf_counter()
        fit = fit_heights(targets, iterations=iterations, eval_every=10**9, stop_at_floor=False)
        per_iter = (time.perf_counter() - t0 - 0.0) / iterations
        resident = (targets.numel() * 2 + factor.numel() * 4) / 2**20
        rows.append((n, d, factor.shape[1], t_factor, per_iter, fit.samples_total // iterations, resident,
                     max_rss_mb()))
    return rows


def full_fits(cases):
    rows = []
    for n, d in cases:
        g = torch.Generator().manual_seed(7 * n + d)
        targets = (torch.randn(n, d, generator=g) * torch.empty(n, 1).uniform_(0.6, 1.4, generator=g)).half()
        fit = fit_heights(targets, iterations=1500, seed=0)
        rows.append((n, d, fit))
    return rows


def ve_setup():
    mixture = separated_mixture()
    return mixture, ExactModel(mixture, "ve"), "eps", (lambda n, top: karras_sigmas(n, 0.002, top)), 80.0


def flow_setup():
    mixture = separated_mixture()
    return mixture, ExactModel(mixture, "flow"), "const", (lambda n, top: flow_shift_sigmas(n, 3.0)), 1.0


def sample_table(setup, junctions, nfes, samples, fit_iterations):
    mixture, model, prediction, schedule_of, sigma_max = setup()
    radius = chi2_rms_radius(mixture.dim)
    pool_clean = mixture.sample(1000, torch.Generator().manual_seed(0))[0].float()
    fresh = mixture.sample(samples, torch.Generator().manual_seed(5))[0].float()
    noise = torch.randn(samples, mixture.dim, generator=torch.Generator().manual_seed(7))

    def metrics(x):
        return (off_mode_rate(x, mixture, radius), mode_weight_error(x, mixture),
                pool_distance_ratio(x, pool_clean, fresh))

    rows = []
    for name, (fn, options) in BASELINES.items():
        cells = []
        for nfe in nfes:
            sigmas = schedule_of(nfe, sigma_max)
            cells.append(metrics(fn(model, sigma_max * noise, sigmas, extra_args={"seed": 3}, disable=True,
                                    **options)))
        rows.append((f"{name} from sigma {sigma_max:g}", cells))
    fits = []
    for sigma_j in junctions:
        ot_map, fit = fit_ot_map(pool_from_clean(pool_clean, sigma_j, prediction, seed=0), iterations=fit_iterations,
                                 seed=0)
        fits.append((sigma_j, fit))
        for name, variant in DPM_OT_VARIANTS.items():
            variant = dict(variant)
            random_pick = variant.pop("random_pick", False)
            cells = []
            for nfe in nfes:
                sigmas = junction_schedule(lambda n: schedule_of(n, sigma_max), nfe, sigma_j)
                if random_pick:
                    pick = torch.randint(0, ot_map.n_targets, (samples,), generator=torch.Generator().manual_seed(8))
                    x = sample_euler(model, ot_map.targets[pick].float(), sigmas, disable=True)
                else:
                    x = sample_dpm_ot(model, sigma_j * noise, sigmas, extra_args={"seed": 3}, ot_map=ot_map,
                                      disable=True, **variant)  # x = s_j * eps: an empty latent noised to sigma_j
                cells.append(metrics(x))
            rows.append((f"{name}, sigma_j {sigma_j:g}", cells))
    return rows, fits


def write(args, fit_rows, full_rows, tables, seconds):
    lines = [f"# DPM-OT benchmark ({datetime.date.today()})", "",
             f"Command: `python benchmarks/dpm_ot.py{' --quick' if args.quick else ''}`; {seconds:.0f} s on "
             f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}.", ""]
    lines += ["## Fit cost (CPU)", "",
              "Seconds per iteration at the default noises per iteration M = max(10 N, 4096); the factor is the "
              "float64 Gram eigen-factor (N <= d/2) or the centred targets. Resident = targets fp16 + factor fp32 "
              "(tiles add at most 64 MB); max RSS is the process peak so far.", "",
              "| N | d | rank r | factor s | s / iteration | M | resident MB | max RSS MB |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {d} | {r} | {tf:.2f} | {ti:.3f} | {m} | {res:.1f} | {rss:.0f} |"
              for n, d, r, tf, ti, m, res, rss in fit_rows]
    gpu = ("not measured: no GPU on this machine (spec target: N = 10k, d = 16384 in a few minutes on one H100)"
           if not torch.cuda.is_available() else "see the GPU rows")
    lines += ["", f"GPU: {gpu}.", "", "Full fits (default settings, stop at the evaluation floor):", "",
              "| N | d | report |", "|---|---|---|"]
    lines += [f"| {n} | {d} | {fit.report()} |" for n, d, fit in full_rows]
    for title, (rows, fits), nfes in tables:
        lines += ["", f"## {title}", "", "Fits: " + "; ".join(f"sigma_j {s:g}: {f.report()}" for s, f in fits), "",
                  "Each cell: off-mode rate / mode-weight error / NN ratio (fresh data: NN ratio 1).", "",
                  "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                  "|---|" + "---|" * len(nfes)]
        lines += [f"| {name} | " + " | ".join(f"{a:.4f} / {b:.3f} / {c:.2f}" for a, b, c in cells) + " |"
                  for name, cells in rows]
    lines += ["", "## Reading", "",
              "- DPM-OT removes mode mixture at every NFE: each start is a pool member, already inside a mode. The "
              "mode-weight error is the pool's own sampling error (1000 points), not a solver error.",
              "- The OT pick and a uniformly random pick from the same pool give the same statistics (within "
              "Monte-Carlo noise): the map balances, it does not select content.",
              "- Small junctions replay the pool: NN ratio well below 1 means near copies. Larger junctions trade "
              "back novelty (NN ratio towards 1) while keeping off-mode rates near 0 down to a few steps; at the "
              "largest junction and 3 steps the finisher itself starts to mix modes again.",
              "- euler_ancestral / renoise add fresh noise, so outputs differ more from pool members; aeot_pair "
              "starts from blends of two neighbouring cells when their normals are close (fraction depends on the "
              "angle threshold), the only placement that leaves the pool (NN ratio 0.53 instead of 0.38 at the "
              "smallest VE junction).",
              "- Baselines from sigma_max need 10 or more steps to bring the off-mode rate near the pool's on VE; on the "
              "flow model (shift 3) they are already at 0.2-0.4% at 5 steps, so DPM-OT's gain there is at 3 steps.",
              "- dpmpp_2m on the VE Karras range 0.002-80 at 3 and 5 steps leaves almost every sample off-mode "
              "(overshoot with extreme step ratios; our dpmpp_2m equals k-diffusion's), unrelated to DPM-OT."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dpm_ot.md").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    t0 = time.perf_counter()
    nfes = [3, 5, 10]
    samples = 1000 if args.quick else 4000
    sizes = [(256, 64), (256, 4096)] if args.quick else [(256, 64), (256, 4096), (1024, 64), (1024, 4096),
                                                          (1024, 16384)]
    fit_rows = fit_costs(sizes, 5 if args.quick else 20)
    full_rows = full_fits([(256, 4096)] if args.quick else [(256, 4096), (1024, 64)])
    tables = [("Exact 8-mode model, VE (eps), Karras", sample_table(ve_setup, [0.17, 1.0, 3.0], nfes, samples, 600),
               nfes),
              ("Exact 8-mode model, flow (CONST), shift 3",
               sample_table(flow_setup, [0.15, 0.5, 0.75], nfes, samples, 600), nfes)]
    write(args, fit_rows, full_rows, tables, time.perf_counter() - t0)
    print((RESULTS / "dpm_ot.md").read_text())


if __name__ == "__main__":
    main()
