"""ComfyUI's real samplers and schedulers on the pack's models: the peer harness.

Every deterministic KSAMPLER of ComfyUI on every schedule ComfyUI offers (its SCHEDULER_HANDLERS
and the Align-Your-Steps / GITS / OptimalSteps tables), under both length rules (SamplerCustom:
the sigmas as the scheduler returns them; KSampler: one more step and the penultimate sigma
discarded for dpm_2 / uni_pc / uni_pc_bh2), behind real ``model_sampling`` objects, matched on
the NFE counted at the model. ComfyUI is imported at run time, never copied into the pack, and
the library never imports this module.

Environment: ComfyUI's requirements, i.e. the tier-2 venv ``scripts/test.sh`` builds in
``.venv-comfyui`` (``tests/comfyui/requirements.txt`` + ComfyUI's ``requirements.txt`` without
its torch lines + ``pip install -e ".[test]"``). The CPU torch 2.13.0 of tier 1 lacks them
(tqdm, and a torchvision that loads beside it). ComfyUI comes from ``$COMFYUI_PATH`` (used in
place) or a temporary writable copy of ``../shared/comfyui``.

Run from the repository root (about 9 minutes on 2 busy CPU cores with the defaults, most of it
the exact ODE references of flow-256d: one per distinct start sigma, and ddim_uniform's start
moves with the step count):

    .venv-comfyui/bin/python benchmarks/comfy_peers.py     # --help: --nfe, --noises, --seed, --models, --out

or import it (``benchmarks.comfy_peers`` from the repository root, or by path as
``tests/comfyui/test_comfy_peers_harness.py`` does).

Writes ``benchmarks/results/comfy_peers_baseline.md``: per test-bed model and NFE the top-5
pairings, the best peer, endpoint-only samplers (dpm_fast, dpm_adaptive) and the pack's
dpmpp_2m and fs_er_sde_ode_3 from the same start x through the same model wrapper.

Not covered: ``ddim`` (= euler), the cfg_pp variants (they reduce to their base sampler when
cond == uncond and need ComfyUI's post-CFG hook), and every stochastic sampler.
"""
from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import functools
import math
import os
import platform
import shlex
import shutil
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from comfyui_fast_samplers.samplers import sample_dpmpp_2m, sample_er_sde
from comfyui_fast_samplers.samplers.er_sde import PRESETS as ER_SDE_PRESETS
from comfyui_fast_samplers.testbeds.mixtures import ExactModel, default_mixture, random_mixture, solve_pf_ode

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "comfy_peers_baseline.md"

DETERMINISTIC_SAMPLERS = ("euler", "heun", "heunpp2", "dpm_2", "lms", "dpmpp_2m", "ipndm", "ipndm_v", "deis",
                          "res_multistep", "gradient_estimation", "uni_pc", "uni_pc_bh2")
# They use only sigmas[0] and the last nonzero sigma (plus the length, for dpm_fast).
ENDPOINT_SAMPLERS = ("dpm_fast", "dpm_adaptive")
# Align Your Steps / GITS tables cover SD1.5's range (VE models); OptimalSteps' flow time (CONST).
AYS_PRESETS = ("SD1", "SDXL")
PACK_SAMPLERS = {"fs_dpmpp_2m": (sample_dpmpp_2m, {}),
                 "fs_er_sde_ode_3": (sample_er_sde, ER_SDE_PRESETS["er_sde_ode_3"])}
PACK_SCHEDULES = ("karras", "exponential", "simple")
TESTBED_MODELS = {
    "ve-2d": (default_mixture, "ve"),
    "ve-64d": (functools.partial(random_mixture, 64, 6, seed=1), "ve"),
    "flow-2d": (default_mixture, "flow"),
    "flow-256d": (functools.partial(random_mixture, 256, 6, seed=2), "flow"),
}
REFERENCE_RTOL = 1e-10


# ---- ComfyUI ---------------------------------------------------------------------------------

@functools.cache
def import_comfy(path: str | None = None) -> SimpleNamespace:
    """Makes ComfyUI importable (``path``, else ``$COMFYUI_PATH``, both used in place, else a
    temporary writable copy of ``../shared/comfyui``, removed at exit) and imports what the
    harness uses. Returns a namespace: samplers, sampling (comfy.k_diffusion.sampling),
    model_sampling, ays, gits, oss (the comfy_extras schedule-table node modules)."""
    path = path or os.environ.get("COMFYUI_PATH")
    if not path:
        tmp = tempfile.mkdtemp(prefix="comfy_peers_")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        path = shutil.copytree(REPO.parent / "shared" / "comfyui", Path(tmp) / "comfyui")
        for entry in [Path(path), *Path(path).rglob("*")]:  # CI lays shared/ out read-only
            entry.chmod(entry.stat().st_mode | stat.S_IWUSR)
    path = str(Path(path).resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import utils.install_util  # noqa: F401  (before anything that imports ComfyUI's `nodes`, which shadows `utils`)
    import comfy.k_diffusion.sampling
    import comfy.model_sampling
    import comfy.samplers
    import comfy_extras.nodes_align_your_steps
    import comfy_extras.nodes_gits
    import comfy_extras.nodes_optimalsteps
    import comfyui_version

    return SimpleNamespace(path=path, version=comfyui_version.__version__, samplers=comfy.samplers,
                           sampling=comfy.k_diffusion.sampling, model_sampling=comfy.model_sampling,
                           ays=comfy_extras.nodes_align_your_steps, gits=comfy_extras.nodes_gits,
                           oss=comfy_extras.nodes_optimalsteps)


def model_sampling(kind: str):
    """A real ComfyUI model_sampling object, built like comfy/model_base.py does: "ve" = SD1.5's
    discrete EPS table (sigma 0.0292 .. 14.615), "flow" = ModelSamplingDiscreteFlow + CONST, shift 3."""
    ms = import_comfy().model_sampling
    if kind == "ve":
        class ModelSamplingEPS(ms.ModelSamplingDiscrete, ms.EPS):
            pass
        return ModelSamplingEPS()
    if kind == "flow":
        class ModelSamplingFlow(ms.ModelSamplingDiscreteFlow, ms.CONST):
            pass
        sampling = ModelSamplingFlow()
        sampling.set_parameters(shift=3.0)
        return sampling
    raise ValueError(f"model_sampling: kind must be 've' or 'flow', not {kind!r}")


def is_flow(ms) -> bool:
    return isinstance(ms, import_comfy().model_sampling.CONST)


class _Patcher:
    """The slice of a ModelPatcher that samplers and KSampler read."""

    def __init__(self, ms):
        self.ms = ms

    def get_model_object(self, name):
        if name != "model_sampling":
            raise KeyError(f"the test-bed model patcher holds only model_sampling, not {name!r}")
        return self.ms


class ComfyModel:
    """What ComfyUI hands a sampler function as ``model`` (KSAMPLER's KSamplerX0Inpaint) for a
    ``denoiser(x, sigma) -> x0``: ``.inner_model`` stands for the guider, with ``.model_patcher``,
    ``.model_sampling`` and ``.inner_model.model_sampling`` (the BaseModel's). ``calls`` counts
    forward calls (NFE)."""

    def __init__(self, denoiser, ms):
        self.denoiser = denoiser
        self.calls = 0
        self.inner_model = SimpleNamespace(model_patcher=_Patcher(ms), model_sampling=ms,
                                           inner_model=SimpleNamespace(model_sampling=ms))

    def __call__(self, x, sigma, denoise_mask=None, model_options=None, seed=None):
        if denoise_mask is not None:
            raise ValueError("ComfyModel: inpainting masks are not modelled")
        self.calls += 1
        return self.denoiser(x, sigma)


# ---- schedules -------------------------------------------------------------------------------

def _node_min_steps(node) -> int:
    return next(i.min for i in node.define_schema().inputs if i.id == "steps")


def schedule_names(ms) -> list[str]:
    """Every stock schedule that fits the model: SCHEDULER_HANDLERS, plus AYS SD1/SDXL and GITS
    (every coefficient of its table, 0.80..1.50) on VE, OptimalSteps' presets on flow."""
    comfy = import_comfy()
    names = list(comfy.samplers.SCHEDULER_HANDLERS)
    if is_flow(ms):
        return names + [f"oss_{preset}" for preset in comfy.oss.NOISE_LEVELS]
    return ([*names, *(f"ays_{preset}" for preset in AYS_PRESETS)]
            + [f"gits_{c:.2f}" for c in sorted(comfy.gits.NOISE_LEVELS)])


def schedule(ms, name: str, steps: int) -> torch.Tensor | None:
    """One schedule as ComfyUI computes it for ``steps`` (SamplerCustom rule, denoise 1), or None
    where the scheduler node does not accept that many steps."""
    comfy = import_comfy()
    if name in comfy.samplers.SCHEDULER_HANDLERS:
        return comfy.samplers.calculate_sigmas(ms, name, steps)
    family, preset = name.split("_", 1)
    node = {"ays": comfy.ays.AlignYourStepsScheduler, "gits": comfy.gits.GITSScheduler,
            "oss": comfy.oss.OptimalStepsScheduler}[family]
    args = (float(preset),) if family == "gits" else (preset,)
    if steps < _node_min_steps(node):
        return None
    return node.execute(*args, steps, 1.0)[0]


def schedules(ms, steps: int) -> dict[str, torch.Tensor]:
    """name -> sigmas of every schedule of ``schedule_names`` that accepts ``steps``."""
    out = {name: schedule(ms, name, steps) for name in schedule_names(ms)}
    return {name: sigmas for name, sigmas in out.items() if sigmas is not None}


def ksampler_sigmas(ms, sampler_name: str, scheduler: str, steps: int) -> torch.Tensor:
    """The sigmas ComfyUI's KSampler runs ``sampler_name`` on (it adds a step and discards the
    penultimate sigma for KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS)."""
    ksampler = import_comfy().samplers.KSampler(_Patcher(ms), steps, "cpu", sampler=sampler_name, scheduler=scheduler)
    return ksampler.sigmas


def length_rules(sampler_name: str, schedule_name: str) -> tuple[str, ...]:
    """'SamplerCustom' and 'KSampler' where the two give different sigmas, 'both' where they
    agree, 'SamplerCustom' for the table schedules (scheduler nodes, not in KSampler's list)."""
    samplers = import_comfy().samplers
    if schedule_name not in samplers.SCHEDULER_HANDLERS:
        return ("SamplerCustom",)
    if sampler_name in samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        return ("SamplerCustom", "KSampler")
    return ("both",)


def rule_sigmas(ms, sampler_name: str, schedule_name: str, steps: int, rule: str) -> torch.Tensor | None:
    if rule == "KSampler":
        return ksampler_sigmas(ms, sampler_name, schedule_name, steps)
    return schedule(ms, schedule_name, steps)


# ---- running ---------------------------------------------------------------------------------

def max_denoise(ms, sigmas: torch.Tensor) -> bool:
    """ComfyUI's rule (Sampler.max_denoise): sigmas[0] >= sigma_max, isclose rel 1e-5."""
    guider = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=ms))
    return import_comfy().samplers.Sampler().max_denoise(guider, sigmas)


def start_state(ms, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The x KSAMPLER.sample starts from on an empty latent: ``noise_scaling`` at ``max_denoise``.
    EPS at max_denoise gives noise * sqrt(1 + sigma0^2), not sigma0 * noise; CONST sigma0 * noise."""
    return ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise(ms, sigmas))


def run_sampler(fn, extra_options: dict, model: ComfyModel, noise: torch.Tensor, sigmas: torch.Tensor, ms):
    """Runs a sampler function the way KSAMPLER.sample does (empty latent, no mask, seed 0, no
    progress bar) in noise's dtype, which is also torch's default dtype meanwhile (ComfyUI's
    uni_pc makes float32 constants with torch.tensor and fails on float64 input otherwise);
    returns (output, NFE counted at the model). The function gets a clone of the sigmas:
    ComfyUI's uni_pc writes into its argument."""
    sigmas = sigmas.to(noise.dtype)
    x = start_state(ms, noise, sigmas)
    before = model.calls
    default = torch.get_default_dtype()
    torch.set_default_dtype(noise.dtype)
    try:
        samples = fn(model, x, sigmas.clone(), extra_args={"seed": 0, "denoise_mask": None}, callback=None,
                     disable=True, **extra_options)
    finally:
        torch.set_default_dtype(default)
    return ms.inverse_noise_scaling(sigmas[-1], samples), model.calls - before


def exact_reference(model: ExactModel, x_start: torch.Tensor, sigma_start: float, sigma_min: float) -> torch.Tensor:
    """What every schedule converges to as steps grow: the exact probability-flow ODE from
    (x_start, sigma_start) to sigma_min (DOP853, rtol 1e-10), then the denoise D(x, sigma_min)."""
    x = solve_pf_ode(model, x_start.to(torch.float64), sigma_start, sigma_min, rtol=REFERENCE_RTOL)
    return model(x, torch.full((x.shape[0],), sigma_min, dtype=torch.float64))


def exact_reference_fn(model: ExactModel, ms, noise: torch.Tensor):
    """reference(sigmas) -> target of a run from ``noise`` on ``sigmas``: ``exact_reference`` from
    that schedule's own start state, memoised per start sigma (schedules start at slightly
    different float32 values; ddim_uniform and OptimalSteps below sigma_max)."""
    sigma_min = float(ms.sigma_min)
    noise = noise.to(torch.float64)
    cache = {}

    def reference(sigmas: torch.Tensor) -> torch.Tensor:
        sigmas = sigmas.to(torch.float64)
        key = float(sigmas[0])
        if key not in cache:
            cache[key] = exact_reference(model, start_state(ms, noise, sigmas), key, sigma_min)
        return cache[key]

    return reference


@dataclass(frozen=True)
class Row:
    """One (sampler, schedule, length rule, steps) pairing at a target NFE: ``nfe`` as counted,
    ``error`` = mean per-sample L2 distance to the reference (inf, with ``note``, where it failed);
    ``full_start``: the schedule starts at sigma_max (ddim_uniform and some OptimalSteps tables
    start lower, from less noise: a shorter problem with its own reference)."""

    sampler: str
    schedule: str
    rule: str
    steps: int
    target: int
    nfe: int = 0
    error: float = math.inf
    dtype: str = "float64"
    note: str = ""
    full_start: bool = True

    @property
    def exact_nfe(self) -> bool:
        return self.nfe == self.target


def _run_any_dtype(fn, options, model, noise, sigmas, ms):
    """run_sampler in float64, else float32: (output as float64, nfe, dtype, why float64 failed).
    Raises RuntimeError with both messages where neither works."""
    errors = []
    for dtype in (torch.float64, torch.float32):
        try:
            out, nfe = run_sampler(fn, options, model, noise.to(dtype), sigmas, ms)
        except Exception as exc:  # noqa: BLE001 - a peer's failure is a result
            errors.append(f"{str(dtype)[6:]}: {type(exc).__name__}: {exc}")
            continue
        return out.to(torch.float64), nfe, str(dtype)[6:], "; ".join(errors)
    raise RuntimeError("; ".join(errors))


def _score(fn, options, model, noise, sigmas, ms, reference, row: Row) -> Row:
    try:
        out, nfe, dtype, note = _run_any_dtype(fn, options, model, noise, sigmas, ms)
    except RuntimeError as exc:
        return replace(row, note=str(exc)[:300])
    error = float((out - reference(sigmas)).flatten(1).norm(dim=1).mean())
    if not math.isfinite(error):
        error, note = math.inf, "; ".join(filter(None, [note, "non-finite output"]))
    return replace(row, nfe=nfe, error=error, dtype=dtype, note=note)


def _table(model, ms, noise, reference, nfes, samplers: dict, schedule_list) -> list[Row]:
    """Every pairing of ``samplers`` (name -> (fn, options)) with ``schedule_list`` and its length
    rules, at each target NFE: the step counts whose counted NFE is the target (or else the
    largest below it), distinct sigmas only. NFE is counted on one-sample probes (cached per
    pairing); the chosen runs are scored on all noises."""
    probe = noise[:1].to(torch.float64)
    rows = []
    for sampler_name, (fn, options) in samplers.items():
        for schedule_name in schedule_list:
            for rule in length_rules(sampler_name, schedule_name):
                counted = {}  # steps -> (sigmas, counted NFE or the failure message)
                for target in nfes:
                    for steps in range(1, 2 * target + 3):
                        if steps not in counted:
                            sigmas = rule_sigmas(ms, sampler_name, schedule_name, steps, rule)
                            try:
                                nfe = 0 if sigmas is None else _run_any_dtype(fn, options, model, probe, sigmas, ms)[1]
                            except RuntimeError as exc:
                                nfe = str(exc)
                            counted[steps] = (sigmas, nfe)
                        if isinstance(counted[steps][1], int) and counted[steps][1] > target + 2:
                            break
                    fits = {s: v for s, v in counted.items() if v[0] is not None and isinstance(v[1], int)
                            and 0 < v[1] <= target}
                    if not fits:
                        failures = [v[1] for s, v in counted.items() if isinstance(v[1], str) and s <= target]
                        if failures:
                            rows.append(Row(sampler_name, schedule_name, rule, target, target,
                                            note=failures[-1][:300]))
                        continue
                    top = max(nfe for _, nfe in fits.values())
                    seen = []
                    for steps, (sigmas, nfe) in sorted(fits.items()):
                        if nfe == top and not any(torch.equal(sigmas, s) for s in seen):
                            seen.append(sigmas)
                            rows.append(_score(fn, options, model, noise, sigmas, ms, reference,
                                               Row(sampler_name, schedule_name, rule, steps, target,
                                                   full_start=max_denoise(ms, sigmas))))
    return sorted(rows, key=lambda r: (r.target, r.error))


def peer_table(model: ComfyModel, ms, noise: torch.Tensor, reference, nfes) -> list[Row]:
    """Every deterministic ComfyUI sampler on every fitting schedule and length rule at each NFE
    of ``nfes`` (counted; closest below where none hits it). ``reference(sigmas)`` gives the
    target of a run on ``sigmas`` (``exact_reference_fn``). Rows sorted by (target, error)."""
    comfy = import_comfy()
    samplers = {}
    for name in DETERMINISTIC_SAMPLERS:
        k = comfy.samplers.sampler_object(name)
        samplers[name] = (k.sampler_function, k.extra_options)
    return _table(model, ms, noise, reference, nfes, samplers, schedule_names(ms))


def same_schedule_peers(table: list[Row], nfe: int, schedule: str) -> list[Row]:
    """The rows that ran ``schedule`` at exactly ``nfe`` counted calls (the cell a sampler on that schedule
    is compared in)."""
    return [r for r in table if r.target == nfe and r.schedule == schedule and r.nfe == nfe]


def best_peer(table: list[Row], nfe: int, full_start: bool = False) -> Row:
    """The lowest-error pairing at target ``nfe`` (rows at fewer NFE included: they use less);
    ``full_start``: only schedules that start at sigma_max (the same problem for every row)."""
    return min((r for r in table if r.target == nfe and (r.full_start or not full_start)), key=lambda r: r.error)


def endpoint_peers(model: ComfyModel, ms, noise: torch.Tensor, reference, nfes) -> list[Row]:
    """dpm_fast at each target NFE and dpm_adaptive at its defaults (rtol 0.05, its own NFE) on
    karras sigmas: both use only the first and the last nonzero sigma (the model's range)."""
    comfy = import_comfy()
    fast, adaptive = (comfy.samplers.sampler_object(name) for name in ENDPOINT_SAMPLERS)
    rows = _table(model, ms, noise, reference, nfes, {"dpm_fast": (fast.sampler_function, fast.extra_options)},
                  ["karras"])
    row = _score(adaptive.sampler_function, adaptive.extra_options, model, noise, schedule(ms, "karras", 10), ms,
                 reference, Row("dpm_adaptive", "karras", "both", 0, 0))
    return rows + [replace(row, target=row.nfe)]


def pack_table(model: ComfyModel, ms, noise, reference, nfes, best: dict[int, tuple[Row, ...]]) -> list[Row]:
    """The pack's fs_dpmpp_2m and fs_er_sde_ode_3 on karras / exponential / simple and on the
    schedules of ``best[nfe]`` (the best peers) at each NFE, through the same runner and NFE
    search as the peers."""
    rows = _table(model, ms, noise, reference, nfes, PACK_SAMPLERS, PACK_SCHEDULES)
    for nfe in nfes:
        extra = [name for name in dict.fromkeys(r.schedule for r in best[nfe]) if name not in PACK_SCHEDULES]
        rows += _table(model, ms, noise, reference, [nfe], PACK_SAMPLERS, extra)
    return sorted(rows, key=lambda r: (r.target, r.error))


def run_model(name: str, nfes, n_noises: int, seed: int) -> dict:
    """Draws unit Gaussian noise [N, d] (seeded), builds the exact reference and runs every
    table for one test-bed model."""
    factory, kind = TESTBED_MODELS[name]
    mixture = factory()
    ms = model_sampling(kind)
    denoiser = ExactModel(mixture, kind)
    model = ComfyModel(denoiser, ms)
    noise = torch.randn(n_noises, mixture.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    reference = exact_reference_fn(denoiser, ms, noise)
    t0 = time.perf_counter()
    peers = peer_table(model, ms, noise, reference, nfes)
    best = {nfe: (best_peer(peers, nfe, full_start=True), best_peer(peers, nfe)) for nfe in nfes}
    return dict(name=name, kind=kind, dim=mixture.dim, peers=peers, best=best,
                endpoint=endpoint_peers(model, ms, noise, reference, nfes),
                pack=pack_table(model, ms, noise, reference, nfes, best), seconds=time.perf_counter() - t0,
                short_starts=[n for n in schedule_names(ms) if not max_denoise(ms, schedule(ms, n, 10))])


# ---- the baseline file -----------------------------------------------------------------------

HEADER = ["| sampler | schedule | rule | steps | NFE | error |", "|---|---|---|---|---|---|"]


def _fmt(x: float) -> str:
    return "fail" if x == math.inf else f"{x:.3g}" if x >= 1e-3 else f"{x:.2e}"


def _pairing(r: Row) -> str:
    return f"{r.sampler} / {r.schedule}{'' if r.full_start else ' †'}"


def _row_md(r: Row, best: Row | None = None) -> str:
    nfe = f"{r.nfe}" if r.exact_nfe else f"{r.nfe} (< {r.target})"
    ratio = f" | {r.error / best.error:.2f}" if best is not None else ""
    return (f"| {r.sampler} | {r.schedule}{'' if r.full_start else ' †'} | {r.rule} | {r.steps or '-'} | {nfe} "
            f"| {_fmt(r.error)}{ratio} |")


def _model_md(res: dict) -> list[str]:
    lines = ["", f"## {res['name']} ({res['kind']}, d = {res['dim']}; {res['seconds']:.0f} s)", "",
             "† starts below sigma_max: " + (", ".join(res["short_starts"]) or "none") + "."]
    for nfe, (best, _) in res["best"].items():
        at_nfe = [r for r in res["peers"] if r.target == nfe]
        per_sampler = {}
        for r in at_nfe:  # sorted by error: a sampler's first row is its best
            per_sampler.setdefault(r.sampler, r)
        exact = sum(r.exact_nfe for r in at_nfe)
        lines += ["", f"### NFE {nfe}: {exact} pairings at exactly {nfe}, {len(at_nfe) - exact} below", "",
                  "Top 5 peers:", "", *HEADER, *[_row_md(r) for r in at_nfe[:5]], "",
                  "Best pairing of each sampler:", "", *HEADER, *[_row_md(r) for r in per_sampler.values()], "",
                  f"The pack, same start x and model wrapper (ratio = error / {_fmt(best.error)}, the best peer "
                  "from sigma_max):", "", HEADER[0] + " ratio |", HEADER[1] + "---|",
                  *[_row_md(r, best) for r in res["pack"] if r.target == nfe]]
    lines += ["", "Endpoint-only samplers (karras ends; dpm_adaptive at its default rtol 0.05 / atol 0.0078; "
              "dpm_fast returns x at the last nonzero sigma, no final denoise):", "", *HEADER,
              *[_row_md(r) for r in res["endpoint"]], ""]
    trouble = [r for r in res["peers"] + res["endpoint"] + res["pack"] if r.note or r.dtype != "float64"]
    lines += ["Failures and float32 fallbacks: " + ("none." if not trouble else ""), ""]
    if trouble:
        lines += ["| sampler | schedule | rule | steps | dtype | note |", "|---|---|---|---|---|---|",
                  *[f"| {r.sampler} | {r.schedule} | {r.rule} | {r.steps} | {r.dtype} | {r.note} |"
                    for r in trouble], ""]
    return lines


def write_markdown(results: list[dict], args, wall: float, command: str) -> str:
    comfy = import_comfy()
    lines = [
        "# ComfyUI's samplers and schedulers on the exact test-bed models (baseline)",
        "",
        f"Written by `benchmarks/comfy_peers.py` on {_dt.date.today().isoformat()}: ComfyUI {comfy.version} "
        f"(imported unmodified), torch {torch.__version__}, Python {platform.python_version()}, "
        f"{torch.get_num_threads()} torch thread(s); wall time {wall:.0f} s.",
        "",
        f"    {command}",
        "",
        f"Per model: {args.noises} unit Gaussian noises (seed {args.seed}), started the way KSAMPLER starts (EPS at "
        "max_denoise: noise * sqrt(1 + sigma0^2)). Error = mean per-sample L2 distance to the exact "
        "probability-flow ODE solution from the same start x and sigma to the model's sigma_min (DOP853, rtol "
        f"{REFERENCE_RTOL:g}), then D(x, sigma_min). NFE is counted at the model; a pairing that cannot hit the "
        "target is shown at the closest NFE below it, marked `(< target)`. Peers: "
        + ", ".join(DETERMINISTIC_SAMPLERS) + " on every SCHEDULER_HANDLERS entry, plus AYS SD1/SDXL and GITS "
        "0.80-1.50 on VE (SD1.5's discrete EPS table) and OptimalSteps FLUX/Wan/Chroma on flow "
        "(ModelSamplingDiscreteFlow, shift 3). Rule `SamplerCustom` = the sigmas as the scheduler gives them, "
        "`KSampler` = one more step and the penultimate sigma dropped (dpm_2, uni_pc, uni_pc_bh2), `both` = "
        "the two agree. Every run is float64 (a failure list per model names any that needed float32). "
        "Schedules marked † start below sigma_max, from sigma0 * noise: a shorter problem, scored against "
        "its own reference, so the summary ranks the pack against the best peer that starts at sigma_max.",
        "",
        "## Summary",
        "",
        "| model | NFE | best peer from sigma_max | error | best peer, any start | error | pack's best "
        "| error | pack / best peer from sigma_max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for nfe, (best, any_start) in res["best"].items():
            pack = best_peer(res["pack"], nfe, full_start=True)
            lines.append(f"| {res['name']} | {nfe} | {_pairing(best)} / {best.rule} ({best.steps} steps) "
                         f"| {_fmt(best.error)} | {_pairing(any_start)} | {_fmt(any_start.error)} "
                         f"| {_pairing(pack)} | {_fmt(pack.error)} | {pack.error / best.error:.2f} |")
    for res in results:
        lines += _model_md(res)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 8, 10, 20])
    parser.add_argument("--noises", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=list(TESTBED_MODELS), choices=list(TESTBED_MODELS))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: tiny tensors, where more threads only contend)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import_comfy()
    env = f"COMFYUI_PATH={os.environ['COMFYUI_PATH']} " if os.environ.get("COMFYUI_PATH") else ""
    command = env + shlex.join([sys.executable, "benchmarks/comfy_peers.py", *(sys.argv[1:] if argv is None else argv)])
    t0 = time.perf_counter()
    results = []
    for name in args.models:
        results.append(run_model(name, args.nfe, args.noises, args.seed))
        print(f"{name}: {results[-1]['seconds']:.0f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(write_markdown(results, args, time.perf_counter() - t0, command))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
