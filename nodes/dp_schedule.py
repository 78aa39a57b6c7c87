"""ELBO Schedule Optimizer: SIGMAS found by exact dynamic programming for the user's model and data."""
from __future__ import annotations

from ..samplers.comfy_compat import parametrization_of_model_sampling
from ..samplers.dp_schedule import (
    DECODERS, OBJECTIVES, VARIANCES, cache_key, load_probe, probe_local_error, probe_mse, save_probe,
    schedule_from_probe, start_node,
)
from ..samplers.schedule import NoiseSchedule
from .comfy_io import CATEGORY, io, mark_advanced
from .guided import conditioning_tensors, run_inside_sampling
from .ui import sigmas_ui

COMPARE_WITH = ("karras", "normal", "simple")
CACHE_VERSION = "1"
LOCAL_ERROR_SUBSTEPS = 4  # reference sub-steps between neighbouring candidates


def model_fingerprint(model) -> list:
    """What makes two MODELs give different denoiser outputs: classes, the sigma table, samples of the
    first and last weights, applied patches (LoRA...) and function wrappers."""
    params = list(model.model.diffusion_model.parameters()) if hasattr(model.model, "diffusion_model") else []
    probes = [p.detach().flatten()[:65536] for p in params[:2] + params[-2:]]
    patches = sorted((k, len(v)) for k, v in getattr(model, "patches", {}).items())
    wrapper = model.model_options.get("model_function_wrapper")
    return [type(model.model).__name__, type(model.get_model_object("model_sampling")).__name__,
            type(model.get_model_object("latent_format")).__name__, model.get_model_object("model_sampling").sigmas,
            *probes, patches, getattr(wrapper, "__qualname__", None), getattr(wrapper, "__module__", None)]


def show_text(text: str, node_id) -> None:
    """Progress text on the node in the browser; nothing when ComfyUI runs without a server."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None and node_id is not None:
        instance.send_progress_text(text, node_id)


def cache_folder():
    import folder_paths

    from pathlib import Path

    return Path(folder_paths.get_user_directory()) / "fs_dp_schedule_cache"


def candidate_grid(model_sampling, candidates: int):
    """Ascending candidate sigmas on the model's own table (so timestep(sigma) round-trips)."""
    import torch

    table = model_sampling.sigmas.detach().cpu().to(torch.float64)
    if candidates >= len(table):
        return table
    index = torch.linspace(0, len(table) - 1, candidates).round().long().unique()
    return table[index]


class ELBOScheduleOptimizer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FS_ELBOScheduleOptimizer",
            display_name="ELBO Schedule Optimizer",
            category=f"{CATEGORY}/schedules",
            description=(
                "Finds the step schedule (SIGMAS) that maximises the model's ELBO on your own data latents "
                "(Watson et al.), by exact dynamic programming: one model evaluation per candidate noise level for "
                "the whole batch. ELBO-optimal schedules spend steps on fine detail and may take one big jump from "
                "pure noise; compare the report's numbers with karras before relying on it for few-step images."
            ),
            inputs=mark_advanced([
                io.Model.Input("model", tooltip="The model you will sample with."),
                io.Latent.Input("latents", tooltip="Clean latents of images like the ones you want (VAE Encode a "
                                                   "batch of 16-64 images). Empty latents are refused."),
                io.Conditioning.Input("positive", tooltip="Conditioning the ELBO is measured under (an empty "
                                                          "prompt measures the unconditional model)."),
                io.Int.Input("steps", default=10, min=1, max=200, tooltip="Number of sampling steps (model calls) "
                                                                          "the schedule is made for."),
                io.Int.Input("candidates", default=250, min=10, max=1000,
                             tooltip="How many of the model's noise levels are tried. More = finer schedule, "
                                     "slower probe (one model call per candidate).", display_name="noise levels tried"),
                io.Combo.Input("variance", options=list(VARIANCES), default="small",
                               tooltip="Reverse-step variance the ELBO assumes: small (posterior, DDPM/ancestral) "
                                       "or large (beta).", display_name="step variance"),
                io.Combo.Input("decoder", options=list(DECODERS), default="sigma",
                               tooltip="Last-step likelihood: sigma (width of the last noise level; ends at the "
                                       "smallest sigmas like stock schedules) or mse (tightest; tends to stop early).",
                               display_name="last-step likelihood"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF,
                             tooltip="Seed of the probe noise (the same noise is used at every candidate)."),
                io.Float.Input("start_sigma", default=0.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="First sigma of the schedule; 0 = the model's largest (full denoise). Set it "
                                       "lower for img2img-style partial schedules.",
                               display_name="start sigma (0 = full denoise)"),
                io.Combo.Input("objective", options=list(OBJECTIVES), default="elbo", optional=True,
                               tooltip="elbo: the paper's ELBO (one model call per candidate). local_error "
                                       "(experimental): the squared error of one Euler/DDIM jump against a fine "
                                       "solve, about 2 x candidates^2 model calls, so use 30-60 candidates; "
                                       "see the docs for which one gives better images.", display_name="objective"),
                io.Boolean.Input("use_cache", default=True,
                                 tooltip="Keep the probe's measurements on disk (ComfyUI user folder, "
                                         "fs_dp_schedule_cache): another step count, variance or decoder for the same "
                                         "model, latents and conditioning then needs no model calls.",
                                 display_name="keep measurements on disk"),
            ], "variance", "decoder", "objective"),
            hidden=[io.Hidden.unique_id],
            outputs=[io.Sigmas.Output(tooltip="Use like any scheduler's SIGMAS (SamplerCustom, SplitSigmas...)."),
                     io.String.Output(display_name="report", tooltip="Chosen sigmas, per-step cost and the same "
                                                                     "totals for stock schedules.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, latents, positive, steps, candidates, variance, decoder, seed, start_sigma,
                use_cache=True, objective="elbo") -> io.NodeOutput:
        import torch

        import comfy.model_management
        import comfy.samplers
        import comfy.utils

        who = "ELBO Schedule Optimizer"
        if objective not in OBJECTIVES or variance not in VARIANCES or decoder not in DECODERS:
            raise ValueError(f"{who} node: objective must be one of {OBJECTIVES}, variance one of {VARIANCES}, "
                             f"decoder one of {DECODERS}; got {objective!r}, {variance!r}, {decoder!r}.")
        ms = model.get_model_object("model_sampling")
        schedule = NoiseSchedule(parametrization_of_model_sampling(ms))
        grid = candidate_grid(ms, candidates)
        if steps > len(grid):
            raise ValueError(f"{who}: {steps} steps need at least as many candidates; raise 'candidates'.")
        start_node(grid, start_sigma, steps, f"{who} node")  # a bad start fails before the probe runs
        samples = latents["samples"]
        data = model.model.process_latent_in(samples.clone())
        bar = comfy.utils.ProgressBar(len(grid))
        result = {}

        node_id = cls.hidden.unique_id if cls.hidden is not None else None

        def progress(j, total):
            bar.update_absolute(j + 1, total)
            show_text(f"probing noise level {j + 1}/{total} (sigma {float(grid[j]):.4g})", node_id)
            comfy.model_management.throw_exception_if_processing_interrupted()

        def probe(k_model, x, sigmas, extra_args=None, callback=None, disable=None):
            extra = dict(extra_args or {}, denoise_mask=None)  # the probe noises the data itself
            if objective == "elbo":
                result["errors"] = probe_mse(k_model, data.to(x.device, x.dtype), grid, schedule, seed, progress, extra)
            else:
                result["errors"] = probe_local_error(k_model, data.to(x.device, x.dtype), grid, schedule, seed,
                                                     LOCAL_ERROR_SUBSTEPS, progress, extra)
            return x

        conditioning = conditioning_tensors(positive)
        variant = [] if objective == "elbo" else [objective, LOCAL_ERROR_SUBSTEPS]
        key = cache_key(*model_fingerprint(model), samples, *conditioning, grid, seed, CACHE_VERSION, *variant)
        errors = load_probe(cache_folder(), key, grid) if use_cache else None
        if errors is None:
            try:
                run_inside_sampling(model, positive, [], 1.0, torch.zeros_like(samples), samples,
                                    [float(grid[-1]), 0.0], seed, probe)
            except ValueError as err:
                raise ValueError(f"{who}: {err}") from None
            errors = result["errors"]
            if use_cache:
                save_probe(cache_folder(), key, grid, errors, {"candidates": len(grid), "latents": len(samples),
                                                               "seed": seed, "objective": objective})
        result = schedule_from_probe(errors, grid, steps, data[0].numel(), schedule.parametrization, variance,
                                     decoder, start_sigma, objective, f"{who} node")
        stock = {name: comfy.samplers.calculate_sigmas(ms, name, steps) for name in COMPARE_WITH}
        report = result.report(grid, stock, len(samples))
        return io.NodeOutput(result.sigmas, report, ui=sigmas_ui(result.sigmas))


NODES = [ELBOScheduleOptimizer]
