"""DPM-OT nodes: target pools, the OT fit, map files, the sampler and its SIGMAS helper."""
from __future__ import annotations

import logging

from ..samplers.dpm_ot import (
    FINISHERS, PLACEMENTS, OTMap, check_junction, fit_ot_map, invert_to_junction, junction_prefix, junction_schedule,
    load_ot_map, pool_from_clean, sample_dpm_ot, save_ot_map,
)
from ..samplers.schedule import NoiseSchedule, parametrization_of_model_sampling, prediction_type
from .comfy_io import CATEGORY, PREFIX, io, mark_advanced
from .dp_schedule import show_text
from .guided import conditioning_tensors, run_inside_sampling
from .registry import register_model_folder
from .ui import sigmas_ui

FOLDER = "fs_ot_maps"  # folder_paths key; on disk: models/fs_ot_maps
OT_TARGETS = io.Custom(f"{PREFIX}_OT_TARGETS")
OT_MAP = io.Custom(f"{PREFIX}_OT_MAP")
CAT = f"{CATEGORY}/dpm_ot"
log = logging.getLogger(__name__)

JUNCTION_TOOLTIP = ("Junction noise level sigma_j where the pool latents sit and the finishing steps start. Small "
                    "(eps models ~0.02-0.2, flow ~0.02-0.1) = near copies of the pool; larger (eps 1-5, flow "
                    "0.3-0.7) = img2img-like variations of pool members.")
HONEST_NOTE = ("DPM-OT is an OT-balanced lookup into a pool of latents: every image starts from one pool member "
               "at the junction sigma, so there is no mode mixing, but there is no novelty beyond the pool and the "
               "finishing steps either (a deterministic finisher gives at most N distinct images). Not a general "
               "text-to-image accelerator: the prompt only acts in the finishing steps.")


def model_identity(model, who: str):
    """(prediction type, latent format class name, NoiseSchedule, model_sampling) of a ComfyUI MODEL."""
    ms = model.get_model_object("model_sampling")
    try:
        schedule = NoiseSchedule(parametrization_of_model_sampling(ms))
    except ValueError as err:
        raise ValueError(f"{who}: {err}") from None
    return prediction_type(ms), type(model.get_model_object("latent_format")).__name__, schedule, ms


def check_junction_for_model(sigma_junction, schedule, ms, who):
    sigma_junction = check_junction(sigma_junction, schedule, who)
    low, high = float(ms.sigma_min), float(ms.sigma_max)
    if not low <= sigma_junction <= high * 1.0001:
        raise ValueError(f"{who}: the junction sigma {sigma_junction:.4g} is outside the model's range "
                         f"[{low:.4g}, {high:.4g}].")
    return sigma_junction


def data_latents(model, latents: dict, who: str):
    import torch

    samples = latents.get("samples") if isinstance(latents, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim < 3 or samples.shape[0] == 0:
        raise ValueError(f"{who}: needs a non-empty LATENT batch (e.g. VAE Encode of your images).")
    return model.model.process_latent_in(samples.clone().float())


def conditioning_tag(conditioning) -> str:
    """'unconditional' when empty, else a short hash of the conditioning tensors (stored in the map)."""
    from ..samplers.dp_schedule import cache_key

    tensors = conditioning_tensors(conditioning)
    return f"prompt:{cache_key(*tensors)[:16]}" if tensors else "unconditional"


def pool_report(pool: OTMap) -> str:
    return (f"{pool.n_targets} targets of shape {pool.latent_shape} at sigma_j {pool.sigma_junction:.4g} "
            f"({pool.model_sampling}, {pool.latent_format}, {pool.info.get('provenance', '?')})")


# ---- target pools ---------------------------------------------------------------------------------

class TargetsFromLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}_DPMOTTargetsFromLatents",
            display_name="DPM-OT Targets (from latents)",
            category=CAT,
            description="Makes a DPM-OT target pool from clean latents (VAE Encode your images): each latent is "
                        "noised once to the junction sigma with its own fixed seed. No model calls.",
            inputs=[
                io.Model.Input("model", tooltip="The model you will sample with (its type and latent format are "
                                                "stored with the pool)."),
                io.Latent.Input("latents", tooltip="Clean latents of the images the pool should hold (VAE Encode "
                                                   "a batch)."),
                io.Float.Input("sigma_junction", default=1.0, min=0.001, max=1000.0, step=0.001,
                               tooltip=JUNCTION_TOOLTIP, display_name="junction sigma"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF,
                             tooltip="Target i is noised with seed + i (the same pool every run)."),
                io.Boolean.Input("keep_clean", default=True,
                                 tooltip="Keep the clean latents too (needed by the 'renoise' placement; doubles "
                                         "the map file).", display_name="keep the clean latents too"),
            ],
            outputs=[OT_TARGETS.Output(display_name="targets", tooltip="Connect to DPM-OT Fit Map.")],
        )

    @classmethod
    def execute(cls, model, latents, sigma_junction, seed, keep_clean) -> io.NodeOutput:
        who = "DPM-OT Targets (from latents) node"
        prediction, latent_format, schedule, ms = model_identity(model, who)
        sigma_junction = check_junction_for_model(sigma_junction, schedule, ms, who)
        data = data_latents(model, latents, who)
        if data.shape[0] < 2:
            raise ValueError(f"{who}: needs a pool of at least 2 targets (16-64 work well), got a LATENT batch of "
                             f"{data.shape[0]}. Encode a folder of images as one batch: Load Image Dataset from "
                             f"Folder -> Upscale Image -> VAE Encode (docs/batches.md).")
        try:
            pool = pool_from_clean(data, sigma_junction, prediction, latent_format, seed, keep_clean, who=who)
        except ValueError as err:
            raise ValueError(str(err)) from None
        return io.NodeOutput(pool)


class TargetsSelfGenerate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}_DPMOTTargetsSelfGenerate",
            display_name="DPM-OT Targets (self-generate)",
            category=CAT,
            description="Makes a target pool from the model itself (the paper's intent): runs the sampler over the "
                        "part of the schedule above the junction sigma and keeps the noisy state there. Costs "
                        "count x (steps above the junction) model calls; pays off only if you draw many more than "
                        "count images.",
            inputs=[
                io.Model.Input("model", tooltip="The model the pool is made with and for."),
                io.Conditioning.Input("positive", tooltip="Prompt of the images the pool should hold."),
                io.Conditioning.Input("negative", tooltip="Negative prompt (used when cfg is not 1)."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Classifier-free guidance scale for making the targets."),
                io.Sampler.Input("sampler", tooltip="Any sampler (KSamplerSelect, or a node of this pack)."),
                io.Sigmas.Input("sigmas", tooltip="A full schedule (e.g. BasicScheduler); only the steps above the "
                                                  "junction are run."),
                io.Latent.Input("latent", tooltip="An empty latent of the image size (its batch size is ignored)."),
                io.Float.Input("sigma_junction", default=1.0, min=0.001, max=1000.0, step=0.001,
                               tooltip=JUNCTION_TOOLTIP, display_name="junction sigma"),
                io.Int.Input("count", default=64, min=1, max=100000, tooltip="Number of targets N.",
                             display_name="targets"),
                io.Int.Input("batch_size", default=8, min=1, max=4096, tooltip="Targets made per sampler run.",
                             display_name="batch size"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF,
                             tooltip="Batch b uses seed + b (ComfyUI's noise for that seed)."),
            ],
            hidden=[io.Hidden.unique_id],
            outputs=[OT_TARGETS.Output(display_name="targets", tooltip="Connect to DPM-OT Fit Map.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, sampler, sigmas, latent, sigma_junction, count, batch_size,
                seed) -> io.NodeOutput:
        import torch

        import comfy.model_management
        import comfy.sample
        import comfy.utils

        who = "DPM-OT Targets (self-generate) node"
        prediction, latent_format, schedule, ms = model_identity(model, who)
        sigma_junction = check_junction_for_model(sigma_junction, schedule, ms, who)
        try:
            prefix = junction_prefix(sigmas, sigma_junction, who)
        except ValueError as err:
            raise ValueError(str(err)) from None
        inner = getattr(sampler, "sampler_function", None)
        if inner is None:
            raise ValueError(f"{who}: the sampler {type(sampler).__name__} is not a k-diffusion sampler; use "
                             "KSamplerSelect or a sampler node of this pack.")
        shape = tuple(latent["samples"].shape[1:])
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        steps = len(prefix) - 1
        batches = -(-count // batch_size)
        bar = comfy.utils.ProgressBar(batches * steps)  # one tick per sampler step: an interrupt stops within a step
        states = []
        done = {"steps": 0}

        def keep_state(k_model, x, sigmas, extra_args=None, callback=None, disable=None):
            def step(info):
                if callback is not None:
                    callback(info)
                done["steps"] += 1
                bar.update_absolute(done["steps"], batches * steps)
                comfy.model_management.throw_exception_if_processing_interrupted()

            out = inner(k_model, x, sigmas, extra_args=extra_args, callback=step, disable=disable,
                        **sampler.extra_options)
            states.append(out.detach().float().cpu())  # the state at sigma_j, before inverse_noise_scaling
            return out

        for b, start in enumerate(range(0, count, batch_size)):
            comfy.model_management.throw_exception_if_processing_interrupted()
            size = min(batch_size, count - start)
            empty = torch.zeros((size, *shape))
            noise = comfy.sample.prepare_noise(empty, seed + b)
            done["steps"] = b * steps  # samplers that report fewer steps still end each batch in place
            run_inside_sampling(model, positive, negative, cfg, noise, empty, prefix, seed + b, keep_state)
            bar.update_absolute((b + 1) * steps, batches * steps)
            show_text(f"targets {start + size}/{count} (sigma {float(prefix[0]):.3g} -> {sigma_junction:.3g})",
                      node_id)
        targets = torch.cat(states)
        pool = OTMap(targets=targets.to(torch.float16), sigma_junction=sigma_junction, model_sampling=prediction,
                     latent_format=latent_format, target_ids=torch.arange(count, dtype=torch.int64),
                     info={"provenance": f"self_generate:{getattr(inner, '__name__', 'sampler')}:{len(prefix) - 1}",
                           "conditioning": conditioning_tag(positive), "target_seed": str(seed),
                           "cfg": f"{cfg:g}"})
        return io.NodeOutput(pool)


class TargetsInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}_DPMOTTargetsInvert",
            display_name="DPM-OT Targets (invert)",
            category=CAT,
            description="Makes a target pool by deterministic DDIM inversion of clean latents up to the junction "
                        "sigma. Targets then lie on the model's own ODE paths: an ODE finisher (euler) walks back "
                        "close to the encoded image. Costs count x steps model calls.",
            inputs=[
                io.Model.Input("model", tooltip="The model that inverts the latents (and that you will sample with)."),
                io.Conditioning.Input("positive", tooltip="Conditioning for the inversion (usually an empty prompt)."),
                io.Latent.Input("latents", tooltip="Clean latents (VAE Encode of your images)."),
                io.Float.Input("sigma_junction", default=1.0, min=0.001, max=1000.0, step=0.001,
                               tooltip=JUNCTION_TOOLTIP, display_name="junction sigma"),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Inversion steps (model calls per latent)."),
                io.Int.Input("batch_size", default=8, min=1, max=4096, tooltip="Latents inverted per model call.",
                             display_name="batch size"),
                io.Boolean.Input("keep_clean", default=True, tooltip="Keep the clean latents too.",
                                 display_name="keep the clean latents too"),
            ],
            hidden=[io.Hidden.unique_id],
            outputs=[OT_TARGETS.Output(display_name="targets", tooltip="Connect to DPM-OT Fit Map.")],
        )

    @classmethod
    def execute(cls, model, positive, latents, sigma_junction, steps, batch_size, keep_clean) -> io.NodeOutput:
        import torch

        import comfy.model_management
        import comfy.utils

        who = "DPM-OT Targets (invert) node"
        prediction, latent_format, schedule, ms = model_identity(model, who)
        sigma_junction = check_junction_for_model(sigma_junction, schedule, ms, who)
        data = data_latents(model, latents, who)
        samples = latents["samples"]
        sigma_min = float(ms.sigma_min)
        if not sigma_min < sigma_junction:
            raise ValueError(f"{who}: the junction sigma must be above the model's smallest sigma {sigma_min:.4g}.")
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        bar = comfy.utils.ProgressBar(len(data) * steps)
        out = []

        for start in range(0, len(data), batch_size):
            chunk = data[start:start + batch_size]

            def progress(i, denoised, x, total, start=start, size=len(chunk)):
                bar.update_absolute(start * steps + (i + 1) * size, len(data) * steps)
                comfy.model_management.throw_exception_if_processing_interrupted()

            def invert(k_model, x, sigmas, extra_args=None, callback=None, disable=None, chunk=chunk, progress=progress):
                extra = dict(extra_args or {}, denoise_mask=None)
                out.append(invert_to_junction(k_model, chunk.to(x.device, x.dtype), sigma_junction, steps, sigma_min,
                                              schedule, extra, progress).float().cpu())
                return x

            latent = samples[start:start + batch_size]
            run_inside_sampling(model, positive, [], 1.0, torch.zeros_like(latent), latent, [sigma_junction, 0.0], 0,
                                invert)
            show_text(f"inverted {min(start + batch_size, len(data))}/{len(data)}", node_id)
        pool = OTMap(targets=torch.cat(out).to(torch.float16), sigma_junction=sigma_junction,
                     model_sampling=prediction, latent_format=latent_format,
                     clean=data.to(torch.float16) if keep_clean else None,
                     target_ids=torch.arange(len(data), dtype=torch.int64),
                     info={"provenance": f"invert:{steps}", "conditioning": conditioning_tag(positive)})
        return io.NodeOutput(pool)


# ---- fitting and files ------------------------------------------------------------------------------

def checkpoint_path(pool: OTMap, iterations: int, seed: int):
    from pathlib import Path

    import folder_paths

    from ..samplers.dp_schedule import cache_key

    key = cache_key(pool.targets, pool.weights if pool.weights is not None else "uniform", iterations, seed, "1")
    return Path(folder_paths.get_user_directory()) / "fs_ot_fit_checkpoints" / f"{key}.safetensors"


class FitMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}_DPMOTFitMap",
            display_name="DPM-OT Fit Map",
            category=CAT,
            description="Fits the semi-discrete optimal-transport map from ComfyUI's Gaussian noise to the target "
                        "pool (every target gets an equal share of all noises). Pure matrix work, no model calls; "
                        "seconds for 1k targets on a GPU, minutes for 10k. " + HONEST_NOTE,
            inputs=[
                OT_TARGETS.Input("targets", tooltip="A pool from a DPM-OT Targets node."),
                io.Int.Input("iterations", default=1500, min=1, max=100000,
                             tooltip="Upper limit; the fit stops earlier once the cell masses are equal to within "
                                     "the measurement noise."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="Seed of the fitting noise."),
                io.Combo.Input("device", options=["auto", "cpu"], default="auto",
                               tooltip="auto: ComfyUI's GPU when there is one."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Keep a checkpoint of long fits in the user folder (fs_ot_fit_checkpoints) "
                                         "and continue from it after an interruption.",
                                 display_name="resume a stopped fit"),
            ],
            hidden=[io.Hidden.unique_id],
            outputs=[OT_MAP.Output(display_name="ot_map", tooltip="Connect to DPM-OT Sampler / Save Map."),
                     io.String.Output(display_name="report", tooltip="Cell-mass errors against their evaluation "
                                                                     "floor, empty cells, iterations, seconds.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, targets, iterations, seed, device, resume) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils
        from safetensors.torch import load_file

        from ..samplers.files import atomic_save_safetensors

        who = "DPM-OT Fit Map node"
        if not isinstance(targets, OTMap) or targets.n_targets < 2:
            got = f"{targets.n_targets}" if isinstance(targets, OTMap) else type(targets).__name__
            raise ValueError(f"{who}: needs a pool of at least 2 targets from a DPM-OT Targets node, got {got}.")
        if device not in ("auto", "cpu"):
            raise ValueError(f"{who}: device must be 'auto' or 'cpu', got {device!r}.")
        torch_device = comfy.model_management.get_torch_device() if device == "auto" else "cpu"
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        bar = comfy.utils.ProgressBar(iterations)
        path = checkpoint_path(targets, iterations, seed)
        state = None
        if resume and path.is_file():
            try:
                state = load_file(str(path))
                log.info("%s: resuming from %s", who, path)
            except Exception as err:
                log.warning("%s: ignoring the unreadable checkpoint %s (%s); starting afresh.", who, path, err)
                state = None

        def progress(t, total, last):
            bar.update_absolute(t, total)
            if last is not None and last[0] == t:
                show_text(f"iteration {t}/{total}: cell-mass error max {last[1]:.3f}, mean {last[2]:.4f}, "
                          f"empty {last[3]}", node_id)
            comfy.model_management.throw_exception_if_processing_interrupted()

        def checkpoint(snapshot):
            if resume:
                atomic_save_safetensors(snapshot, path, {"format": "fs_ot_fit_state/1"}, overwrite=True)

        ot_map, result = fit_ot_map(targets, iterations=iterations, seed=seed, device=torch_device,
                                    on_progress=progress, state=state, on_checkpoint=checkpoint)
        if path.is_file():
            path.unlink()
        report = f"{pool_report(ot_map)}\n{result.report()}"
        show_text(report, node_id)
        return io.NodeOutput(ot_map, report)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("comfyui-fast-samplers")
    except PackageNotFoundError:
        return "0"


class SaveMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_model_folder(FOLDER, FOLDER, {".safetensors"})
        return io.Schema(
            node_id=f"{PREFIX}_DPMOTSaveMap",
            display_name="DPM-OT Save Map",
            category=CAT,
            description="Saves a fitted map (targets, heights and what they were made for) to models/fs_ot_maps "
                        "as safetensors. Never overwrites: a new number is added to the name.",
            inputs=[
                OT_MAP.Input("ot_map", tooltip="A fitted map from DPM-OT Fit Map."),
                io.String.Input("filename_prefix", default="dpm_ot_map",
                                tooltip="File name start; _00001.safetensors etc. is appended."),
            ],
            outputs=[OT_MAP.Output(display_name="ot_map"),
                     io.String.Output(display_name="path", tooltip="Where the map was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, ot_map, filename_prefix) -> io.NodeOutput:
        import os
        from pathlib import Path

        import folder_paths

        from ..samplers.files import unused_path

        who = "DPM-OT Save Map node"
        register_model_folder(FOLDER, FOLDER, {".safetensors"})
        folder = Path(folder_paths.get_folder_paths(FOLDER)[0])  # the user's mapping first, else models/fs_ot_maps
        prefix = filename_prefix.strip().replace("\\", "/")
        if not prefix or prefix.startswith("/") or ".." in Path(prefix).parts:
            raise ValueError(f"{who}: filename_prefix {filename_prefix!r} must be a relative name inside "
                             "models/fs_ot_maps.")
        path = unused_path(folder / os.path.dirname(prefix), os.path.basename(prefix))
        try:
            save_ot_map(ot_map, path, package_version())
        except ValueError as err:
            raise ValueError(f"{who}: {err}") from None
        folder_paths.filename_list_cache.pop(FOLDER, None)
        return io.NodeOutput(ot_map, str(path), ui={"text": [str(path)]})


class LoadMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        register_model_folder(FOLDER, FOLDER, {".safetensors"})
        return io.Schema(
            node_id=f"{PREFIX}_DPMOTLoadMap",
            display_name="DPM-OT Load Map",
            category=CAT,
            description="Loads a map saved by DPM-OT Save Map from models/fs_ot_maps and checks it.",
            inputs=[io.Combo.Input("map_name", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="A .safetensors file in models/fs_ot_maps.")],
            outputs=[OT_MAP.Output(display_name="ot_map"),
                     io.String.Output(display_name="report", tooltip="What the map holds and how well it was fitted.")],
        )

    @classmethod
    def execute(cls, map_name) -> io.NodeOutput:
        import folder_paths

        who = "DPM-OT Load Map node"
        register_model_folder(FOLDER, FOLDER, {".safetensors"})
        path = folder_paths.get_full_path(FOLDER, map_name)
        if path is None:
            raise ValueError(f"{who}: {map_name!r} is not in models/fs_ot_maps.")
        try:
            ot_map = load_ot_map(path)
        except ValueError as err:
            raise ValueError(f"{who}: {err}") from None
        info = ot_map.info
        report = (f"{pool_report(ot_map)}\nfit: max {info.get('fit_max_rel_err', '?')}, mean "
                  f"{info.get('fit_mean_rel_err', '?')}, empty {info.get('fit_empty', '?')}, "
                  f"{info.get('fit_iters', '?')} iterations; conditioning {info.get('conditioning', '?')}")
        return io.NodeOutput(ot_map, report)


# ---- sampling -------------------------------------------------------------------------------------------

class DPMOTSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}_DPMOTSampler",
            display_name="DPM-OT Sampler",
            category=CAT,
            description="SAMPLER for SamplerCustom(Advanced): sends the seed's noise through the OT map to one pool "
                        "latent at the junction sigma, then runs the finisher on the SIGMAS (use DPM-OT Sigmas; "
                        "they must start at the junction). Use an Empty Latent of the map's size. " + HONEST_NOTE,
            inputs=mark_advanced([
                OT_MAP.Input("ot_map", tooltip="From DPM-OT Fit Map or DPM-OT Load Map."),
                io.Combo.Input("finisher", options=list(FINISHERS), default="euler",
                               tooltip="Steps after the jump. euler / heun / dpmpp_2m / er_sde_ode_3 are "
                                       "deterministic (at most N distinct images); euler_ancestral and er_sde_3 add "
                                       "fresh noise each step (outputs differ from pool members)."),
                io.Combo.Input("placement", options=list(PLACEMENTS), default="target",
                               tooltip="target: the stored noisy latent (faithful). renoise: its clean latent plus "
                                       "fresh noise at the junction (needs keep_clean). aeot_pair: AE-OT's blend of the "
                                       "two nearest cells when their angle is small, the only way to start from a "
                                       "latent that is not a pool member.", display_name="placement"),
                io.Float.Input("angle_threshold", default=0.7, min=0.0, max=3.1416, step=0.01,
                               tooltip="aeot_pair only: blend when the facet-normal angle (radians) is below this.",
                               display_name="angle threshold"),
                io.Float.Input("pair_weight", default=0.75, min=0.5, max=1.0, step=0.01,
                               tooltip="aeot_pair only: weight of the winning target in the blend (AE-OT: 0.75).",
                               display_name="pair weight"),
                io.Sampler.Input("finisher_sampler", optional=True,
                                 tooltip="Optional: any sampler (KSamplerSelect, a pack sampler node) to use as the "
                                         "finisher instead of the list above."),
            ], "placement", "angle_threshold", "pair_weight"),
            outputs=[io.Sampler.Output(tooltip="Connect to the sampler input of SamplerCustom(Advanced).")],
        )

    @classmethod
    def execute(cls, ot_map, finisher, placement, angle_threshold, pair_weight, finisher_sampler=None) -> io.NodeOutput:
        import comfy.samplers

        who = "DPM-OT Sampler node"
        if not isinstance(ot_map, OTMap) or not ot_map.is_fitted:
            raise ValueError(f"{who}: needs a fitted map (DPM-OT Fit Map or DPM-OT Load Map).")
        if finisher not in FINISHERS or placement not in PLACEMENTS:
            raise ValueError(f"{who}: finisher must be one of {list(FINISHERS)} and placement one of "
                             f"{list(PLACEMENTS)}; got {finisher!r}, {placement!r}.")
        if placement == "renoise" and ot_map.clean is None:
            raise ValueError(f"{who}: placement 'renoise' needs clean latents; this map has none (build the targets "
                             "with keep_clean on).")
        options = dict(ot_map=ot_map, finisher=finisher, placement=placement, angle_threshold=angle_threshold,
                       pair_weight=pair_weight)
        if finisher_sampler is not None:
            function = getattr(finisher_sampler, "sampler_function", None)
            if function is None:
                raise ValueError(f"{who}: the finisher_sampler {type(finisher_sampler).__name__} is not a "
                                 "k-diffusion sampler; use KSamplerSelect or a sampler node of this pack.")
            options.update(finisher=function, finisher_options=dict(finisher_sampler.extra_options))
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_dpm_ot, extra_options=options))


class DPMOTSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id=f"{PREFIX}_DPMOTSigmas",
            display_name="DPM-OT Sigmas",
            category=CAT,
            description="The finishing schedule for a DPM-OT map: the chosen scheduler's steps from the map's "
                        "junction sigma down to 0 (like 'denoise', anchored at the junction).",
            inputs=[
                io.Model.Input("model", tooltip="The model you sample with (gives the scheduler its sigma range)."),
                OT_MAP.Input("ot_map", tooltip="The map whose junction sigma starts the schedule."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="karras",
                               tooltip="How the finishing steps are spaced below the junction."),
                io.Int.Input("steps", default=5, min=1, max=1000,
                             tooltip="Finishing steps after the jump (the model calls of Euler-type finishers)."),
            ],
            outputs=[io.Sigmas.Output(tooltip="Connect to SamplerCustom(Advanced) with the DPM-OT Sampler.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, ot_map, scheduler, steps) -> io.NodeOutput:
        import comfy.samplers

        who = "DPM-OT Sigmas node"
        if scheduler not in comfy.samplers.SCHEDULER_NAMES:
            raise ValueError(f"{who}: unknown scheduler {scheduler!r}.")
        if not isinstance(ot_map, OTMap):
            raise ValueError(f"{who}: needs a map from DPM-OT Fit Map or DPM-OT Load Map.")
        ms = model.get_model_object("model_sampling")
        try:
            sigmas = junction_schedule(lambda n: comfy.samplers.calculate_sigmas(ms, scheduler, n), steps,
                                       ot_map.sigma_junction)
        except ValueError as err:
            raise ValueError(f"{who}: {err}") from None
        return io.NodeOutput(sigmas, ui=sigmas_ui(sigmas))


NODES = [TargetsFromLatents, TargetsSelfGenerate, TargetsInvert, FitMap, SaveMap, LoadMap, DPMOTSampler, DPMOTSigmas]
