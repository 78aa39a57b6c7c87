"""Schedule Calibrator: SIGMAS fitted to the user's own model, prompt, cfg and sampler, without data."""
from __future__ import annotations

import functools

from ..samplers.calibration import calibrate_schedule, resolve_sampler
from ..samplers.dp_schedule import cache_key
from .comfy_io import CATEGORY, io
from .dp_schedule import model_fingerprint, show_text
from .guided import conditioning_tensors, run_inside_sampling
from .ui import sigmas_ui

WHO = "Schedule Calibrator"
TEACHER_ACCURACY = {"fast": 2, "standard": 4, "high": 8}  # teacher sub-steps between neighbouring candidates


def stock_schedules(ms, steps: int, flow: bool) -> dict:
    """ComfyUI's schedulers at this step count, plus the fixed tables of the AYS / GITS (VE) or
    OptimalSteps (flow) nodes where they exist (the same sigmas those nodes output)."""
    import comfy.samplers

    stock = {}
    for name in comfy.samplers.SCHEDULER_NAMES:
        try:
            sigmas = comfy.samplers.calculate_sigmas(ms, name, steps).to("cpu")
        except Exception:  # a scheduler that does not apply to this model
            continue
        if len(sigmas) == steps + 1 and bool((sigmas[1:] < sigmas[:-1]).all()):
            stock[name] = sigmas
    for label, sigmas in _table_nodes(steps, flow).items():
        if len(sigmas) == steps + 1:
            stock[label] = sigmas.to("cpu")
    return stock


def _table_nodes(steps: int, flow: bool) -> dict:
    """{label: SIGMAS} from ComfyUI's AlignYourSteps / GITS / OptimalSteps nodes (empty where not installed)."""
    out = {}
    try:
        if flow:
            from comfy_extras.nodes_optimalsteps import OptimalStepsScheduler as oss

            if steps >= 3:
                out["OptimalSteps FLUX"] = oss.execute("FLUX", steps, 1.0).result[0]
        else:
            from comfy_extras.nodes_align_your_steps import AlignYourStepsScheduler as ays
            from comfy_extras.nodes_gits import GITSScheduler as gits

            out["AYS SD1"] = ays.execute("SD1", steps, 1.0).result[0]
            if 2 <= steps <= 20:
                out["GITS 1.20"] = gits.execute(1.2, steps, 1.0).result[0]
    except Exception:  # an older / newer ComfyUI without these nodes: compare with the schedulers only
        return {}
    return out


def sampler_callable(sampler):
    """A ComfyUI SAMPLER (KSAMPLER) as a k-diffusion-convention function with its options bound."""
    fn = getattr(sampler, "sampler_function", None)
    if fn is None:
        raise ValueError(f"{WHO}: the sampler input must come from a sampler node (KSamplerSelect, the pack's "
                         "sampler nodes...); this SAMPLER has no sampler function.")
    options = dict(getattr(sampler, "extra_options", {}) or {})
    return functools.partial(fn, **options) if options else fn


class ScheduleCalibrator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FS_ScheduleCalibrator",
            display_name="Schedule Calibrator",
            category=f"{CATEGORY}/schedules",
            description=(
                "Finds the step schedule (SIGMAS) that makes your sampler closest to your model's own accurate "
                "solution at few steps (5-10), for this model, prompt, cfg and latent size. No images needed: it "
                "solves the model accurately from a few noises (the teacher), searches the steps the sampler "
                "should take, tunes three numbers per step with them (tune steps), and reports the error next to "
                "karras, normal, beta, AYS... on fresh noises. The result is cached: the next Run with the same "
                "inputs costs nothing. Use its SIGMAS and SAMPLER outputs together in SamplerCustom(Advanced) (the "
                "SAMPLER carries the tuning for these SIGMAS). Deterministic samplers only (euler, dpmpp_2m, "
                "uni_pc, ipndm, the pack's ODE presets...)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model you will sample with (LoRAs and patches included)."),
                io.Sampler.Input("sampler", tooltip="The sampler you will use with the schedule (KSamplerSelect or "
                                                    "one of the pack's sampler nodes); must be deterministic."),
                io.Latent.Input("latent", tooltip="Only its shape is used (an Empty Latent Image of the size you "
                                                  "will generate is fine)."),
                io.Int.Input("steps", default=8, min=1, max=50,
                             tooltip="Steps of the schedule (model calls of a one-call-per-step sampler)."),
                io.Int.Input("noises", default=16, min=2, max=1024,
                             tooltip="How many noises the schedule is fitted on (and as many fresh ones to check "
                                     "it). More = generalises better, slower: 16-32 for image models.",
                             display_name="calibration noises"),
                io.Int.Input("calibration_seed", default=0, min=0, max=0xFFFFFFFF,
                             tooltip="Seed of the calibration noises (kept fixed: the same seed reuses the cache)."),
                io.Combo.Input("teacher_accuracy", options=list(TEACHER_ACCURACY), default="standard",
                               tooltip="How finely the model's own solution is computed: fast (2 sub-steps per "
                                       "candidate), standard (4), high (8). The report says if it was not enough.",
                               display_name="teacher accuracy"),
                io.Int.Input("candidates", default=40, min=8, max=200,
                             tooltip="Noise levels the search chooses from. More = finer, slower (the teacher "
                                     "takes candidates x sub-steps model calls).", display_name="schedules tried"),
                io.Conditioning.Input("positive", tooltip="Prompt to calibrate for (an empty prompt calibrates the "
                                                          "unconditional model; schedules usually transfer between "
                                                          "prompts, the report's numbers are for this one)."),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative prompt (used with cfg > 1)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="Guidance scale to calibrate under (the one you will sample with)."),
                io.Boolean.Input("tune_steps", default=True, optional=True, display_name="tune steps",
                                 tooltip="Also fit, together with the schedule, where the model is asked at each "
                                         "step and how much of the last change of its output and of its noise "
                                         "prediction is extrapolated (three numbers a step; samplers that call the "
                                         "model once per step; kept only where they lower the error on the fresh "
                                         "noises; about 3x the model calls of the rest). They travel in the SAMPLER "
                                         "output: use it with these SIGMAS."),
                io.Boolean.Input("use_cache", default=True, optional=True,
                                 tooltip="Store the result in the user folder (fs_calibration_cache): the same "
                                         "inputs again give it back without model calls."),
            ],
            hidden=[io.Hidden.unique_id],
            outputs=[io.Sigmas.Output(tooltip="The calibrated schedule for SamplerCustom(Advanced)."),
                     io.Sampler.Output(display_name="sampler", tooltip="The sampler to use with it: your input, with "
                                                                       "the final step and step tuning the "
                                                                       "calibration chose for the pack's samplers."),
                     io.String.Output(display_name="report", tooltip="Errors of the calibrated and stock schedules "
                                                                     "against the teacher, model calls, warnings.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, sampler, latent, steps, noises, calibration_seed, teacher_accuracy, candidates,
                positive, negative=None, cfg=1.0, tune_steps=True, use_cache=True) -> io.NodeOutput:
        import os

        import torch

        import comfy.model_management
        import comfy.samplers
        import comfy.utils
        import folder_paths

        from ..samplers.schedule import parametrization_of_model_sampling
        from ..samplers.step_tuning import sample_tuned

        if teacher_accuracy not in TEACHER_ACCURACY:
            raise ValueError(f"{WHO} node: teacher_accuracy must be one of {list(TEACHER_ACCURACY)}, "
                             f"got {teacher_accuracy!r}.")
        if steps < 1:
            raise ValueError(f"{WHO}: steps must be at least 1, got {steps}.")
        fn = sampler_callable(sampler)
        base_fn, base_options, _ = resolve_sampler(fn)
        samples = latent["samples"]
        shape = tuple(samples.shape[1:])
        ms = model.get_model_object("model_sampling")
        flow = parametrization_of_model_sampling(ms) == "flow"
        negative = negative if negative is not None else positive
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        bar = comfy.utils.ProgressBar(100)
        stages = {"teacher": (0, 25), "search": (25, 35), "refine": (35, 70), "tune": (70, 90)}

        def progress(stage, done, total):
            lo, hi = stages.get(stage, (90, 100))
            bar.update_absolute(int(lo + (hi - lo) * done / max(total, 1)), 100)
            show_text(f"{stage}: {done}/{total}", node_id)
            comfy.model_management.throw_exception_if_processing_interrupted()

        noise = torch.randn((noises, *shape), generator=torch.Generator().manual_seed(int(calibration_seed)),
                            dtype=torch.float32)
        stock = stock_schedules(ms, steps, flow)
        key = cache_key(*model_fingerprint(model), *conditioning_tensors(positive), *conditioning_tensors(negative),
                        cfg, shape, str(samples.dtype)) if use_cache else None
        cache_dir = os.path.join(folder_paths.get_user_directory(), "fs_calibration_cache") if use_cache else None
        result = {}

        def calibrate(k_model, x, sigmas, extra_args=None, callback=None, disable=None):
            extra = dict(extra_args or {}, denoise_mask=None)
            result["out"] = calibrate_schedule(
                k_model, noise.to(x.device, x.dtype), steps, fn, extra_args=extra, candidates=candidates,
                teacher_substeps=TEACHER_ACCURACY[teacher_accuracy], seed=int(calibration_seed), stock=stock,
                max_rows=noises, tune_steps=bool(tune_steps), progress=progress, cache_dir=cache_dir, model_key=key,
                who=WHO)
            return x

        zeros = torch.zeros((noises, *shape), dtype=samples.dtype)
        try:
            run_inside_sampling(model, positive, negative, cfg, zeros, zeros, [float(ms.sigma_max), 0.0],
                                int(calibration_seed), calibrate)
        except ValueError as err:
            message = str(err)
            raise ValueError(message if message.startswith(WHO) else f"{WHO}: {message}") from None
        sigmas, report = result["out"]
        chosen = sampler
        options = {**base_options, **report.sampler_options}
        if "step_tuning" in options:  # any sampler, run through the tuned model
            chosen = comfy.samplers.KSAMPLER(sample_tuned, extra_options={"sampler": base_fn, **options})
        elif report.sampler_options:
            chosen = comfy.samplers.KSAMPLER(base_fn, extra_options=options)
        text = report.to_text()
        show_text(text.splitlines()[2] if len(text.splitlines()) > 2 else text, node_id)
        return io.NodeOutput(sigmas, chosen, text, ui=sigmas_ui(sigmas))


NODES = [ScheduleCalibrator]
