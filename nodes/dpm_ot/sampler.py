"""DPM-OT sampling nodes: the SAMPLER through a map and the finishing SIGMAS below its junction."""
from __future__ import annotations

from ...samplers.dpm_ot import FINISHERS, PLACEMENTS, OTMap, junction_schedule, sample_dpm_ot
from ..comfy_io import PREFIX, io, mark_advanced
from ..ui import sigmas_ui
from .common import CAT, HONEST_NOTE, OT_MAP


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
