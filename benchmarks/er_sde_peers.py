"""ER-SDE-Solvers vs peer implementations from PyPI (k-diffusion, diffusers) at equal NFE.

Run from the repository root (about 1 minute on 2 CPU cores; one torch thread by default):

    pip install -e ".[bench]" && pip install --no-deps "k-diffusion>=0.1"
    python benchmarks/er_sde_peers.py

Writes ``benchmarks/results/er_sde_peers.md`` (``--out`` to change; the file is replaced).

What is compared, all on the built-in exact model of ``testbeds/mixtures.py`` (the 2-D
three-mode mixture ``default_mixture()``, whose denoiser is closed-form), from the same start
noise at sigma_max, on the Karras schedule (rho 7) over SD1.5's sigma range, at NFE 5/10/20/50:

* ours: ``sample_er_sde`` order 3 with noise_fn ode / sde_5 / reverse_sde, each with
  ``derivatives="corrected"`` (default) and ``"paper"``, and ``sample_dpmpp_2m``;
* k-diffusion (``k_diffusion.sampling``): sample_euler, sample_heun, sample_dpmpp_2m,
  sample_dpmpp_2m_sde, sample_dpmpp_3m_sde (eta 1, seeded Brownian-tree noise). They take
  our VE denoiser ``ExactModel(mixture, "ve")`` as is;
* diffusers schedulers on SD1.5's DDPM betas (scaled_linear 0.00085..0.012, 1000 steps,
  ``use_karras_sigmas=True``, otherwise their defaults): DPMSolverMultistep (dpmsolver++
  order 2 and 3, sde-dpmsolver++ order 2), EulerDiscrete, UniPCMultistep (bh2, order 2 and 3).
  They drive an epsilon predictor in their VP convention, built from ``ExactModel(mixture,
  "vp")`` and ``NoiseSchedule("vp")``; the model is evaluated at the sigma the scheduler steps
  with (a real discrete-time UNet would see the rounded timestep instead).

Metrics per (sampler, NFE): mean distance to the exact probability-flow ODE solution (same
start noise; deterministic samplers), sliced W2 to exact data samples, Bures-W2 of the first
two moments, mode-weight error; the same metrics on exact sample sets give their noise floor. Plus
the solver overhead per step with a trivial model on a [1, 4, 64, 64] float32 latent on CPU.

k-diffusion is loaded without running its package ``__init__`` (which imports torchvision,
clip, wandb, ...): ``k_diffusion/sampling.py`` is executed from the installed file, with its
``utils`` import served by a stub holding ``append_dims`` when the real ``utils`` (torchvision,
PIL) cannot be imported. ``pip install k-diffusion`` with dependencies would replace a CPU
torch with a CUDA build; install it with ``--no-deps``. A peer that is not importable is skipped
and the results file says so.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from comfyui_fast_samplers.samplers import sample_dpmpp_2m, sample_er_sde
from comfyui_fast_samplers.samplers.er_sde import make_noise_function, plan_er_sde
from comfyui_fast_samplers.samplers.files import atomic_write_text
from comfyui_fast_samplers.samplers.schedule import NoiseSchedule, karras_sigmas
from comfyui_fast_samplers.testbeds.mixtures import (
    ExactModel, default_mixture, gaussian_w2, marginal_sample, mode_weight_error, sliced_w2, solve_pf_ode,
)

# SD1.5's sigma range: the first and last nonzero sigma of diffusers' Karras schedule on the
# scaled_linear 0.00085..0.012 betas (float32 values as diffusers stores them), so that every
# sampler here steps on the same sigmas and ends at the same sigma_min.
SIGMA_MAX = 14.614646911621094
SIGMA_MIN = 0.02916753478348255
DDPM_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   use_karras_sigmas=True)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "er_sde_peers.md"
FLOOR_SETS = 5  # exact sample sets drawn to show the metrics' noise floor


# ---- peers -------------------------------------------------------------------------------

def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_k_diffusion_sampling():
    """(k_diffusion.sampling as a module, note) or (None, why not), without the package __init__."""
    try:
        spec = importlib.util.find_spec("k_diffusion")
    except (ImportError, ValueError) as err:
        return None, f"k_diffusion not found ({err})"
    if spec is None or not spec.submodule_search_locations:
        return None, "k-diffusion is not installed (pip install --no-deps 'k-diffusion>=0.1')"
    root = Path(list(spec.submodule_search_locations)[0])
    name = "_fs_bench_k_diffusion"  # a private package name: never shadows a real k_diffusion import
    package = types.ModuleType(name)
    package.__path__ = [str(root)]
    package.__package__ = name
    saved = {k: sys.modules.get(k) for k in (name, f"{name}.utils", f"{name}.sampling")}
    sys.modules[name] = package
    note = "k_diffusion/sampling.py loaded from the installed file"
    try:
        try:
            utils = _exec_module(f"{name}.utils", root / "utils.py")
        except ImportError as err:  # torchvision / PIL missing: sampling.py only needs append_dims
            utils = types.ModuleType(f"{name}.utils")
            utils.append_dims = _append_dims
            sys.modules[f"{name}.utils"] = utils
            note += f"; its utils import stubbed (append_dims only) because {err}"
        package.utils = utils
        sampling = _exec_module(f"{name}.sampling", root / "sampling.py")
    except Exception as err:  # noqa: BLE001 - any failure means: skip this peer
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
        return None, f"k_diffusion.sampling is not importable: {type(err).__name__}: {err}"
    return sampling, note


def _exec_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _append_dims(x, target_dims):
    """k_diffusion.utils.append_dims: append singleton dims to x until it has target_dims."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def load_diffusers():
    """(dict of scheduler classes, note) or (None, why not)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler
    except Exception as err:  # noqa: BLE001
        return None, f"diffusers is not importable: {type(err).__name__}: {err}"
    return {"dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler, "unipc": UniPCMultistepScheduler}, \
        "diffusers schedulers"


# ---- samplers as uniform callables: run(model_ve, x_ve, nfe, seed) -> x0 ----------------------

@dataclass
class Entry:
    label: str
    source: str  # ours | k-diffusion | diffusers
    run: Callable
    deterministic: bool


def _ours(options):
    def run(model, x, nfe, seed):
        return sample_er_sde(model, x, karras_sigmas(nfe, SIGMA_MIN, SIGMA_MAX), extra_args={"seed": seed},
                             disable=True, **options)
    return run


def _ours_dpmpp_2m(model, x, nfe, seed):
    return sample_dpmpp_2m(model, x, karras_sigmas(nfe, SIGMA_MIN, SIGMA_MAX), extra_args={"seed": seed}, disable=True)


def _kd(kd, name, sde=False, heun=False):
    fn = getattr(kd, name)

    def run(model, x, nfe, seed):
        steps = (nfe + 1) // 2 if heun else nfe  # Heun: 2 evaluations a step, 1 on the last
        sigmas = karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX)
        kwargs = {}
        if sde:  # what k-diffusion builds when noise_sampler is None, with a seed
            kwargs["noise_sampler"] = kd.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seed)
        return fn(model, x, sigmas, disable=True, **kwargs)
    return run


class VPEpsilonModel:
    """diffusers' view of the exact model: eps(x_vp, sigma) with x_vp = alpha x0 + s eps in the
    DDPM (VP) scaling, from ExactModel(mixture, 'vp') and NoiseSchedule('vp')."""

    def __init__(self, mixture):
        self.x0_model = ExactModel(mixture, "vp")
        self.schedule = self.x0_model.schedule

    @property
    def calls(self):
        return self.x0_model.calls

    def __call__(self, x_vp, sigma: float):
        sig = torch.full((x_vp.shape[0],), float(sigma), dtype=torch.float64)
        x0 = self.x0_model(x_vp, sig)
        alpha, s = float(self.schedule.alpha(sig[0])), float(self.schedule.s(sig[0]))
        return (x_vp - alpha * x0) / s


def _diffusers(cls, config, ve_latents=False, stochastic=False):
    def run(model, x, nfe, seed):
        eps_model = VPEpsilonModel(model.mixture)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler = cls(**DDPM_CONFIG, **config)
        scheduler.set_timesteps(nfe)
        sigmas = scheduler.sigmas.to(torch.float64)
        if not (math.isclose(float(sigmas[0]), SIGMA_MAX, rel_tol=1e-6)
                and math.isclose(float(sigmas[-2]), SIGMA_MIN, rel_tol=1e-6)):
            raise RuntimeError(f"diffusers' Karras range {float(sigmas[0])}..{float(sigmas[-2])} is not SD1.5's")
        # Euler works on VE latents (init_noise_sigma = sigma_max); the multistep solvers on VP ones.
        latents = x.clone() if ve_latents else x * float(eps_model.schedule.alpha(sigmas[0]))
        generator = torch.Generator().manual_seed(seed) if stochastic else None
        for i, t in enumerate(scheduler.timesteps):
            eps = eps_model(scheduler.scale_model_input(latents, t), sigmas[i])
            step_kwargs = {"generator": generator} if stochastic else {}
            latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
        model.calls += eps_model.calls
        return latents.to(x.dtype)
    return run


def build_entries(kd, df):
    entries = [
        Entry("fs_er_sde_ode_3 (corrected)", "ours", _ours({"order": 3, "noise_fn": "ode"}), True),
        Entry("er_sde_ode_3 (paper)", "ours", _ours({"order": 3, "noise_fn": "ode", "derivatives": "paper"}), True),
        Entry("dpmpp_2m", "ours", _ours_dpmpp_2m, True),
    ]
    if kd is not None:
        entries += [
            Entry("sample_euler", "k-diffusion", _kd(kd, "sample_euler"), True),
            Entry("sample_heun", "k-diffusion", _kd(kd, "sample_heun", heun=True), True),  # NFE 2n-1 for n steps
            Entry("sample_dpmpp_2m", "k-diffusion", _kd(kd, "sample_dpmpp_2m"), True),
        ]
    if df is not None:
        entries += [
            Entry("DPMSolverMultistep dpmsolver++ 2", "diffusers", _diffusers(df["dpm"], {"solver_order": 2}), True),
            Entry("DPMSolverMultistep dpmsolver++ 3", "diffusers", _diffusers(df["dpm"], {"solver_order": 3}), True),
            Entry("UniPCMultistep bh2 2", "diffusers", _diffusers(df["unipc"], {"solver_order": 2}), True),
            Entry("UniPCMultistep bh2 3", "diffusers", _diffusers(df["unipc"], {"solver_order": 3}), True),
            Entry("EulerDiscrete", "diffusers", _diffusers(df["euler"], {}, ve_latents=True), True),
        ]
    entries += [
        Entry("fs_er_sde_3 sde_5 (corrected)", "ours", _ours({"order": 3, "noise_fn": "sde_5"}), False),
        Entry("er_sde_3 sde_5 (paper)", "ours", _ours({"order": 3, "noise_fn": "sde_5", "derivatives": "paper"}), False),
        Entry("fs_er_sde_sde_3 reverse_sde (corrected)", "ours", _ours({"order": 3, "noise_fn": "reverse_sde"}), False),
        Entry("er_sde_sde_3 reverse_sde (paper)", "ours",
              _ours({"order": 3, "noise_fn": "reverse_sde", "derivatives": "paper"}), False),
    ]
    if kd is not None:
        entries += [
            Entry("sample_dpmpp_2m_sde", "k-diffusion", _kd(kd, "sample_dpmpp_2m_sde", sde=True), False),
            Entry("sample_dpmpp_3m_sde", "k-diffusion", _kd(kd, "sample_dpmpp_3m_sde", sde=True), False),
        ]
    if df is not None:
        entries += [
            Entry("DPMSolverMultistep sde-dpmsolver++ 2", "diffusers",
                  _diffusers(df["dpm"], {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"}, stochastic=True),
                  False),
        ]
    return entries


# ---- the accuracy benchmark ------------------------------------------------------------------

def run_accuracy(entries, nfes, samples, ode_samples, seed):
    mixture = default_mixture()
    model = ExactModel(mixture, "ve")
    gen = torch.Generator().manual_seed(seed)
    x, _ = marginal_sample(mixture, samples, SIGMA_MAX, model.schedule, gen)
    data, _ = mixture.sample(samples, gen)
    floors = {"sliced_w2": [], "gaussian_w2": [], "mode": []}
    for _ in range(FLOOR_SETS):  # the metrics' own noise: exact sample sets in place of a sampler's output
        fresh, _ = mixture.sample(samples, gen)
        floors["sliced_w2"].append(sliced_w2(fresh, data))
        floors["gaussian_w2"].append(gaussian_w2(fresh, mixture.mean, mixture.covariance))
        floors["mode"].append(mode_weight_error(fresh, mixture))
    t0 = time.perf_counter()
    ode_end = solve_pf_ode(model, x[:ode_samples], SIGMA_MAX, SIGMA_MIN, rtol=1e-10)
    ode_ref = model(ode_end, torch.full((ode_samples,), SIGMA_MIN, dtype=torch.float64))
    ode_time = time.perf_counter() - t0
    results, outputs = {}, {}
    for entry in entries:
        row = {}
        for nfe in nfes:
            model.calls = 0
            t0 = time.perf_counter()
            out = entry.run(model, x.clone(), nfe, seed)
            elapsed = time.perf_counter() - t0
            ok = bool(torch.isfinite(out).all())
            row[nfe] = {
                "nfe": model.calls,
                "ode": float((out[:ode_samples] - ode_ref).norm(dim=1).mean()) if entry.deterministic and ok else None,
                "sliced_w2": sliced_w2(out, data) if ok else math.nan,
                "gaussian_w2": gaussian_w2(out, mixture.mean, mixture.covariance) if ok else math.nan,
                "mode": mode_weight_error(out, mixture) if ok else math.nan,
                "seconds": elapsed,
            }
            if entry.deterministic:
                outputs[(entry.label, nfe)] = out[:ode_samples]
        results[entry.label] = row
        print(f"  {entry.source:11s} {entry.label:42s} "
              + " ".join(f"{row[n]['sliced_w2']:.4f}" for n in nfes), flush=True)
    return results, floors, outputs, ode_time


# ---- solver overhead -------------------------------------------------------------------------------

def _trivial_model(x, sigma, **kwargs):
    return 0.5 * x


def run_overhead(kd, steps=20, repeats=7, seed=0):
    """(rows of (label, min s, median s) per run of `steps` steps, steps) on a [1, 4, 64, 64] float32
    CPU latent with a trivial model. Rounds are interleaved (every candidate once per round) so that
    load from other processes hits all of them alike; the minimum is the least disturbed run."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 64, 64, generator=gen) * SIGMA_MAX
    sigmas = karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX).to(torch.float32)
    sig_min, sig_max = float(sigmas[-2]), float(sigmas[0])
    cands = {
        "model calls alone (0.5 x), for reference": lambda: [_trivial_model(x, s) for s in sigmas[:-1]],
        "ours sample_er_sde order 3 sde_5 (gaussian noise)":
            lambda: sample_er_sde(_trivial_model, x, sigmas, extra_args={"seed": seed}, disable=True, order=3,
                                  noise_fn="sde_5"),
        "  of which plan_er_sde (all coefficients, sde_5 by quadrature)":
            lambda: plan_er_sde(sigmas.to(torch.float64), NoiseSchedule("ve"), make_noise_function("sde_5"), 3),
        "ours sample_er_sde order 3 reverse_sde (gaussian noise)":
            lambda: sample_er_sde(_trivial_model, x, sigmas, extra_args={"seed": seed}, disable=True, order=3,
                                  noise_fn="reverse_sde"),
        "ours sample_er_sde order 3 ode":
            lambda: sample_er_sde(_trivial_model, x, sigmas, disable=True, order=3, noise_fn="ode"),
        "ours sample_er_sde order 3 sde_5, noise='brownian'":
            lambda: sample_er_sde(_trivial_model, x, sigmas, extra_args={"seed": seed}, disable=True, order=3,
                                  noise_fn="sde_5", noise="brownian"),
        "ours sample_dpmpp_2m": lambda: sample_dpmpp_2m(_trivial_model, x, sigmas, disable=True),
    }
    if kd is not None:
        def gaussian_3m():
            g = torch.Generator().manual_seed(seed)
            return kd.sample_dpmpp_3m_sde(_trivial_model, x, sigmas, disable=True,
                                          noise_sampler=lambda s, t: torch.randn(x.shape, generator=g))
        cands.update({
            "k-diffusion sample_dpmpp_3m_sde (gaussian noise sampler)": gaussian_3m,
            "k-diffusion sample_dpmpp_3m_sde eta=0 (deterministic)":
                lambda: kd.sample_dpmpp_3m_sde(_trivial_model, x, sigmas, disable=True, eta=0.0),
            "k-diffusion sample_dpmpp_3m_sde (default: Brownian tree)":
                lambda: kd.sample_dpmpp_3m_sde(_trivial_model, x, sigmas, disable=True,
                                               noise_sampler=kd.BrownianTreeNoiseSampler(x, sig_min, sig_max, seed=seed)),
            "k-diffusion sample_dpmpp_2m": lambda: kd.sample_dpmpp_2m(_trivial_model, x, sigmas, disable=True),
        })
    times = {label: [] for label in cands}
    for fn in cands.values():  # warm-up
        fn()
    for _ in range(repeats):
        for label, fn in cands.items():
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    rows = [(label, min(ts), statistics.median(ts)) for label, ts in times.items()]
    return rows, steps


# ---- report ------------------------------------------------------------------------------------------

def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    return f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.2e}"


def _floor_text(values):
    return f"mean {_fmt(statistics.mean(values))}, range {_fmt(min(values))} to {_fmt(max(values))} over {len(values)} exact sets"


def _table(entries, results, nfes, key):
    rows = [e for e in entries if any(results[e.label][n][key] is not None for n in nfes)]
    best = {}
    for n in nfes:
        vals = [results[e.label][n][key] for e in rows if results[e.label][n][key] is not None]
        vals = [v for v in vals if math.isfinite(v)]
        best[n] = min(vals) if vals else None
    lines = ["| source | sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|" + "---|" * len(nfes)]
    for e in rows:
        cells = []
        for n in nfes:
            v = results[e.label][n][key]
            cell = _fmt(v)
            if results[e.label][n]["nfe"] != n:
                cell += f" ({results[e.label][n]['nfe']})"
            if v is not None and v == best[n]:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {e.source} | {e.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PARITY_PAIRS = (
    ("dpmpp_2m", "sample_dpmpp_2m", "ours dpmpp_2m vs k-diffusion sample_dpmpp_2m"),
    ("sample_euler", "EulerDiscrete", "k-diffusion sample_euler vs diffusers EulerDiscrete"),
    ("sample_dpmpp_2m", "DPMSolverMultistep dpmsolver++ 2", "k-diffusion sample_dpmpp_2m vs diffusers dpmsolver++ 2"),
)


def parity(outputs, nfes):
    """{description: [max distance between the two outputs at each NFE]} for pairs that ran."""
    found = {}
    for a, b, what in PARITY_PAIRS:
        if all((a, n) in outputs and (b, n) in outputs for n in nfes):
            found[what] = [float((outputs[(a, n)] - outputs[(b, n)]).norm(dim=1).max()) for n in nfes]
    return found


OURS_ODE, OURS_ODE_PAPER = "fs_er_sde_ode_3 (corrected)", "er_sde_ode_3 (paper)"
OURS_SDE5, OURS_RSDE = "fs_er_sde_3 sde_5 (corrected)", "fs_er_sde_sde_3 reverse_sde (corrected)"


def observations_from(entries, results, floors, nfes, overhead, parities):
    """Plain sentences, each computed from this run's numbers (they stay true when the file is regenerated)."""
    obs = []
    val = lambda label, n, key: results[label][n][key]  # noqa: E731
    nfe_list = "/".join(map(str, nfes))
    det_peers = [e for e in entries if e.deterministic and e.source != "ours"]
    if det_peers:
        parts = []
        for n in nfes:
            ranked = sorted((e for e in entries if e.deterministic), key=lambda e: val(e.label, n, "ode"))
            rank = [e.label for e in ranked].index(OURS_ODE) + 1
            bp = min(det_peers, key=lambda e: val(e.label, n, "ode"))
            r = val(bp.label, n, "ode") / val(OURS_ODE, n, "ode")
            parts.append(f"NFE {n}: ours {_fmt(val(OURS_ODE, n, 'ode'))} (#{rank} of {len(ranked)}) vs "
                         f"{bp.source} {bp.label} {_fmt(val(bp.label, n, 'ode'))}, "
                         + (f"ours {r:.2g}x closer" if r >= 1 else f"the peer {1 / r:.2g}x closer"))
        obs.append("Deterministic, distance to the exact ODE solution, our order-3 ER-SDE ODE solver against the best "
                   "peer at each NFE: " + "; ".join(parts) + ".")
    ratios = [val(OURS_ODE_PAPER, n, "ode") / val(OURS_ODE, n, "ode") for n in nfes]
    obs.append("The paper's derivative estimate (the one ComfyUI's er_sde uses) is " + ", ".join(f"{r:.2g}x" for r in ratios)
               + f" farther from the exact ODE solution than our corrected one at NFE {nfe_list}.")
    sw_hi = max(floors["sliced_w2"])
    kd3 = "sample_dpmpp_3m_sde"
    if kd3 in results:
        parts = []
        for n in nfes:
            ours, peer = val(OURS_RSDE, n, "sliced_w2"), val(kd3, n, "sliced_w2")
            note = " (both within the exact-set range)" if max(ours, peer) <= sw_hi else ""
            parts.append(f"NFE {n}: {_fmt(ours)} vs {_fmt(peer)}{note}")
        obs.append("Same SDE (the full reverse-time SDE, eta 1), both 3rd-order multistep: sliced W2 of our reverse_sde "
                   "order 3 vs k-diffusion sample_dpmpp_3m_sde: " + "; ".join(parts) + ".")
    sto_peers = [e for e in entries if not e.deterministic and e.source != "ours"]
    if sto_peers:
        parts = []
        for n in nfes:
            bp = min(sto_peers, key=lambda e: val(e.label, n, "sliced_w2"))
            ours, peer = val(OURS_SDE5, n, "sliced_w2"), val(bp.label, n, "sliced_w2")
            note = " (both within the exact-set range: indistinguishable here)" if max(ours, peer) <= sw_hi else ""
            parts.append(f"NFE {n}: {_fmt(ours)} vs {_fmt(peer)} ({bp.source} {bp.label}){note}")
        obs.append("Stochastic, our default (sde_5, order 3) against the best stochastic peer, sliced W2: "
                   + "; ".join(parts) + f". Exact sample sets score {_floor_text(floors['sliced_w2'])}, so differences "
                   "inside that range are noise of the metric, not of the sampler.")
    if parities:
        worst = {what: max(d) for what, d in parities.items()}
        obs.append("Harness cross-checks (one method, two implementations, same start): "
                   + "; ".join(f"{what}: max distance {_fmt(d)}" for what, d in worst.items())
                   + " (float64 vs float64 agree to rounding; diffusers computes in float32).")
    if overhead:
        rows = {label: lo for label, lo, _ in overhead[0]}
        steps = overhead[1]
        per = lambda label: rows[label] * 1e3 / steps  # noqa: E731
        ours, ours_b = "ours sample_er_sde order 3 sde_5 (gaussian noise)", "ours sample_er_sde order 3 sde_5, noise='brownian'"
        kd_g, kd_b = ("k-diffusion sample_dpmpp_3m_sde (gaussian noise sampler)",
                      "k-diffusion sample_dpmpp_3m_sde (default: Brownian tree)")
        if kd_g in rows:
            obs.append(f"Solver overhead per step on a 64x64 SD latent (CPU, model excluded): ours {per(ours):.2f} ms "
                       f"(coefficients included) vs k-diffusion dpmpp_3m_sde {per(kd_g):.2f} ms, both with Gaussian "
                       f"noise. With Brownian-tree noise: ours {per(ours_b):.1f} ms vs k-diffusion's {per(kd_b):.1f} ms "
                       f"({rows[ours_b] / rows[kd_b]:.2g}x): ours keeps the tree in float64 with tolerance 1e-12, "
                       "k-diffusion in the latent's dtype with torchsde's default 1e-6.")
    return obs


NOTES = [
    "UniPC's corrector reuses the next step's model evaluation, so UniPC of order p converges at order p + 1 at no "
    "extra NFE; at large NFE it can overtake any 3rd-order multistep solver (ours, DPM-Solver++ 3M).",
    "k-diffusion's dpmpp_2m_sde / dpmpp_3m_sde and diffusers' sde-dpmsolver++ at eta 1 discretise the full reverse-time "
    "SDE, our `reverse_sde` noise function; `sde_5` (our default) injects less noise.",
    "Distribution metrics of the deterministic samplers come from the one start-noise set shared by all; each "
    "stochastic sampler runs one noise seed, so its distribution metrics carry about the spread of the exact-set range.",
]


def low_nfe_note(results, nfes):
    """Whether 3rd-order multistep peers lose to their 2nd-order versions at the smallest NFE (a computed note)."""
    n = min(nfes)
    pairs = [("DPMSolverMultistep dpmsolver++ 3", "DPMSolverMultistep dpmsolver++ 2", "ode"),
             ("UniPCMultistep bh2 3", "UniPCMultistep bh2 2", "ode"),
             ("sample_dpmpp_3m_sde", "sample_dpmpp_2m_sde", "sliced_w2")]
    worse = [(a, results[a][n][k] / results[b][n][k]) for a, b, k in pairs if a in results and b in results]
    worse = [(a, r) for a, r in worse if r > 1.2]
    if not worse:
        return None
    ours = results[OURS_ODE][n]["ode"] / results["dpmpp_2m"][n]["ode"]
    return (f"At NFE {n} the 3rd-order peers are worse than their own 2nd-order versions ("
            + ", ".join(f"{a} {r:.2g}x" for a, r in worse)
            + f"); our order-3 ODE solver is {ours:.2g}x the error of our dpmpp_2m there.")


def write_report(path, args, entries, results, floors, outputs, overhead, notes, runtime, ode_time, observations,
                 parities, caught):
    nfes = args.nfe
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    det = [e for e in entries if e.deterministic]
    command = " ".join(["python benchmarks/er_sde_peers.py"] + sys.argv[1:])
    lines = [
        "# ER-SDE-Solvers vs k-diffusion and diffusers at equal NFE",
        "",
        f"Generated by `{command}` on {now}, in {runtime:.0f} s ({os.cpu_count()} CPU cores, "
        f"{torch.get_num_threads()} torch thread(s)).",
        "",
        f"Versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"k-diffusion {_version('k-diffusion')}, diffusers {_version('diffusers')}, "
        f"comfyui-fast-samplers {_version('comfyui-fast-samplers')}, scipy {_version('scipy')}, "
        f"torchsde {_version('torchsde')}.",
        "",
        "Peers: " + "; ".join(notes) + ".",
        "",
        "Set-up: the exact denoiser of the 2-D three-mode mixture `default_mixture()` (`testbeds/mixtures.py`); "
        f"{args.samples} samples from one start-noise set x ~ p(x; sigma_max), the same for every sampler; Karras "
        f"schedule (rho 7) {SIGMA_MAX:.4f} -> {SIGMA_MIN:.5f} (SD1.5's range: what diffusers builds from the "
        "scaled_linear betas with `use_karras_sigmas=True`), then a final step to sigma 0. Seed "
        f"{args.seed} for all noise (our per-step Gaussian stream, k-diffusion's Brownian tree, diffusers' generator: "
        "same seed, different noise). diffusers steps in float32 (it casts the sample); everything else runs in "
        "float64. A number in parentheses after a value is the count of model evaluations when it differs from the "
        "column's NFE (Heun). Bold: the best value in the column.",
        "",
    ]
    if observations:
        lines += ["## What the numbers show", ""] + [f"- {o}" for o in observations] + [""]
    extra = low_nfe_note(results, nfes)
    lines += ["Notes:", ""] + [f"- {n}" for n in NOTES + ([extra] if extra else [])] + [""]
    lines += [
        "## Deterministic samplers: mean distance to the exact ODE solution",
        "",
        "Reference: the probability-flow ODE solved with DOP853 (rtol 1e-10) from sigma_max to sigma_min, then the "
        f"exact denoise; first {args.ode_samples} samples ({ode_time:.1f} s).",
        "",
        _table(det, results, nfes, "ode"),
        "",
    ]
    if parities:
        lines += ["Harness cross-checks, max distance between two implementations' outputs (same start):", "",
                  "| pair | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
        lines += [f"| {what} | " + " | ".join(_fmt(d) for d in diffs) + " |" for what, diffs in parities.items()]
        lines.append("")
    lines += [
        "## Distribution error, all samplers",
        "",
        f"Sliced W2 (64 directions) to {args.samples} exact data samples. Exact sample sets in place of a sampler's "
        f"output: {_floor_text(floors['sliced_w2'])}.",
        "",
        _table(entries, results, nfes, "sliced_w2"),
        "",
        "Bures-W2 between the samples' mean and covariance and the mixture's. Exact sample sets: "
        f"{_floor_text(floors['gaussian_w2'])}.",
        "",
        _table(entries, results, nfes, "gaussian_w2"),
        "",
        "Mode-weight error (total variation between the mode frequencies and the weights 0.3/0.5/0.2). Exact sample "
        f"sets: {_floor_text(floors['mode'])}.",
        "",
        _table(entries, results, nfes, "mode"),
        "",
    ]
    if overhead:
        rows, steps = overhead
        lines += [
            "## Solver overhead (model excluded)",
            "",
            f"Trivial model `0.5 * x`, [1, 4, 64, 64] float32 latent on CPU, {steps} Karras steps, "
            f"{torch.get_num_threads()} torch thread(s); {args.repeats} interleaved rounds after a warm-up (every "
            "candidate once per round, so load from other processes hits all alike). Per step = fastest run / "
            f"{steps}; the median shows the spread on a shared machine.",
            "",
            "| what | ms per run (min) | ms per run (median) | ms per step (min) |",
            "|---|---|---|---|",
        ]
        lines += [f"| {label} | {lo * 1e3:.2f} | {med * 1e3:.2f} | {lo * 1e3 / steps:.3f} |" for label, lo, med in rows]
        lines.append("")
    if caught:
        lines += ["## Warnings raised during the accuracy runs", ""] + [f"- `{w}`" for w in caught] + [""]
    atomic_write_text(path, "\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--ode-samples", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared machines)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds of the overhead table")
    parser.add_argument("--no-timing", action="store_true", help="skip the solver-overhead table")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results file (replaced)")
    args = parser.parse_args(argv)
    if min(args.nfe) < 3 or args.samples < 100:
        parser.error("--nfe values must be >= 3 and --samples >= 100")
    args.ode_samples = min(args.ode_samples, args.samples)
    torch.set_num_threads(max(1, args.threads))
    t_start = time.perf_counter()

    kd, kd_note = load_k_diffusion_sampling()
    df, df_note = load_diffusers()
    notes = [f"k-diffusion {_version('k-diffusion')}: {kd_note}" if kd is not None else f"k-diffusion SKIPPED: {kd_note}",
             f"diffusers {_version('diffusers')}: {df_note}" if df is not None else f"diffusers SKIPPED: {df_note}"]
    for n in notes:
        print(n)
    entries = build_entries(kd, df)
    print(f"accuracy: {len(entries)} samplers x NFE {args.nfe}, {args.samples} samples; sliced W2 per NFE:")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        results, floors, outputs, ode_time = run_accuracy(entries, args.nfe, args.samples, args.ode_samples, args.seed)
    caught = sorted({f"{w.category.__name__} at {'/'.join(Path(w.filename).parts[-3:])}:{w.lineno}: "
                     f"{str(w.message)[:160]}" for w in records})
    caught = [c for c in caught if "Should have ta>=t0" not in c] + (
        ["UserWarning (torchsde, from k-diffusion's Brownian tree): 'Should have ta>=t0 ...' - the tree's ends are "
         "stored in float32, the float64 sigma_min query falls 1e-9 below them; harmless"]
        if any("Should have ta>=t0" in c for c in caught) else [])
    for c in caught:
        print(f"  warning: {c}")
    overhead = None
    if not args.no_timing:
        print("solver overhead ...", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            overhead = run_overhead(kd, repeats=args.repeats, seed=args.seed)
        for label, lo, med in overhead[0]:
            print(f"  {label:62s} {lo * 1e3:8.2f} ms/run (median {med * 1e3:.2f})")
    runtime = time.perf_counter() - t_start
    parities = parity(outputs, args.nfe)
    obs = observations_from(entries, results, floors, args.nfe, overhead, parities)
    write_report(args.out, args, entries, results, floors, outputs, overhead, notes, runtime, ode_time, obs,
                 parities, caught)
    print(f"wrote {args.out} in {runtime:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
