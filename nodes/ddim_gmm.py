"""DDIM-GMM as a SAMPLER node (its KSampler dropdown presets are in samplers/presets.py)."""
from __future__ import annotations

from ..samplers.ddim_gmm import (
    COVARIANCES, ETA_CONVENTIONS, OFFSETS, ON_INFEASIBLE, SCALE_UNITS, plan_ddim_gmm, sample_ddim_gmm,
)
from .comfy_io import CATEGORY, io


class DDIMGMMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FS_DDIMGMM",
            display_name="DDIM-GMM Sampler",
            category=f"{CATEGORY}/ddim_gmm",
            description=(
                "DDIM whose random step is a mixture of K Gaussians with the same mean and covariance as DDIM's "
                "(Gabbur). components = 1 is a true eta-DDIM. With covariance 'strict' the image statistics match "
                "DDIM exactly; the paper's gains at eta = 0 come from 'vub', which adds a small random jump each step."
            ),
            inputs=[
                io.Float.Input("eta", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Randomness of each step: 0 = deterministic DDIM path (plus GMM jumps with "
                                       "'vub'), 1 = fully ancestral (DDPM-like, softer, more varied)."),
                io.Combo.Input("eta_convention", options=list(ETA_CONVENTIONS), default="ddim",
                               tooltip="ddim: eta as in DDIM / Euler ancestral. rfim: the paper's rectified-flow "
                                       "convention (eta = 1 re-draws all the noise each step)."),
                io.Int.Input("components", default=8, min=1, max=1024,
                             tooltip="Number of mixture components K. 1 = plain Gaussian DDIM; the paper uses 8."),
                io.Float.Input("scale", default=1.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Size of the offsets between components. Larger = bigger random jumps "
                                       "between variations; 0 turns the mixture off."),
                io.Combo.Input("scale_units", options=list(SCALE_UNITS), default="vp",
                               tooltip="vp: the paper's units (absolute, about 1 for SD latents). relative: a "
                                       "fraction (0-1) of the largest scale that keeps DDIM's statistics exact."),
                io.Combo.Input("offsets", options=list(OFFSETS), default="ortho",
                               tooltip="How offset directions are drawn: ortho (orthogonal, the paper's best) or "
                                       "rand (random Gaussian directions)."),
                io.Combo.Input("covariance", options=list(COVARIANCES), default="auto",
                               tooltip="strict: exact moment matching (image statistics identical to DDIM). diag: "
                                       "the paper's ORTHO rule. vub: the paper's ORTHO-VUB (adds extra variance; the "
                                       "source of its eta = 0 gains). auto: strict when eta > 0, vub at eta = 0."),
                io.Boolean.Input("share_across_steps", default=False,
                                 tooltip="Use one set of offset directions for every step (the paper's VUB*)."),
                io.Int.Input("offset_seed", default=0, min=0, max=0xFFFFFFFF,
                             tooltip="Seed of the offset directions (the noise itself follows the sampler node's seed)."),
                io.Int.Input("skip_last_offsets", default=0, min=0, max=1000,
                             tooltip="Use plain DDIM on this many of the last steps, so no jump survives into the "
                                     "final image."),
                io.Combo.Input("on_infeasible", options=list(ON_INFEASIBLE), default="clamp",
                               tooltip="strict only: when the offsets are too large to match DDIM exactly, shrink "
                                       "them (clamp, with a warning) or stop with an error.",
                               display_name="when a step is infeasible"),
            ],
            outputs=[io.Sampler.Output(tooltip="Connect to the sampler input of SamplerCustom(Advanced).")],
        )

    @classmethod
    def execute(cls, eta, eta_convention, components, scale, scale_units, offsets, covariance, share_across_steps,
                offset_seed, skip_last_offsets, on_infeasible) -> io.NodeOutput:
        import comfy.samplers
        import torch

        from ..samplers.schedule import NoiseSchedule

        options = dict(eta=eta, eta_convention=eta_convention, components=components, scale=scale,
                       scale_units=scale_units, offsets=offsets, covariance=covariance,
                       share_across_steps=share_across_steps, offset_seed=offset_seed,
                       skip_last_offsets=skip_last_offsets, on_infeasible=on_infeasible)
        try:  # check the choices now (ComfyUI 0.3.64 does not check V3 combo values)
            plan_ddim_gmm(torch.tensor([1.0, 0.0]), NoiseSchedule("ve"), components + 1, **{
                k: v for k, v in options.items() if k not in ("share_across_steps", "offset_seed")})
        except ValueError as err:
            raise ValueError(f"DDIM-GMM Sampler node: {err}") from None
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_ddim_gmm, extra_options=options))


NODES = [DDIMGMMSampler]
