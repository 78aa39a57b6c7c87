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
                "DDIM whose random step is a mixture of K Gaussians (Gabbur). components = 1 is a true eta-DDIM. "
                "covariance 'strict' keeps DDIM's step mean and covariance exactly (the safe choice, used by the "
                "fs_ddim_gmm presets); 'vub' and 'diag' are the paper's rules and add extra random jumps that, at "
                "scale ~1 in vp units, push samples between modes (measured in docs/ddim_gmm.md)."
            ),
            inputs=[
                io.Float.Input("eta", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Randomness of each step: 0 = deterministic DDIM (strict then is plain DDIM; "
                                       "vub/diag add their jumps), 1 = fully ancestral (DDPM-like)."),
                io.Combo.Input("eta_convention", options=list(ETA_CONVENTIONS), default="ddim",
                               tooltip="ddim: eta as in DDIM / Euler ancestral. rfim: the paper's rectified-flow "
                                       "convention (eta = 1 re-draws all the noise each step)."),
                io.Int.Input("components", default=8, min=1, max=1024,
                             tooltip="Number of mixture components K (capped at the latent size). 1 = plain "
                                     "Gaussian DDIM; the paper uses 8."),
                io.Float.Input("scale", default=0.9, min=0.0, max=100.0, step=0.01,
                               tooltip="Size of the offsets between components; 0 turns the mixture off. In vp units "
                                       "with vub/diag, values near 1 (the paper's) leave visible jumps in the image "
                                       "and mix modes; keep it <= 0.1 there or use relative units."),
                io.Combo.Input("scale_units", options=list(SCALE_UNITS), default="relative",
                               tooltip="relative: a fraction (0-1) of the largest offset that keeps DDIM's step "
                                       "statistics exact (follows the noise level, vanishes at eta = 0). vp: the "
                                       "paper's absolute units, the same size at every noise level."),
                io.Combo.Input("offsets", options=list(OFFSETS), default="ortho",
                               tooltip="Offset directions: orthonormal random directions, one set per run. 'rand' is "
                                       "kept for old workflows and gives the same directions."),
                io.Combo.Input("covariance", options=list(COVARIANCES), default="strict",
                               tooltip="strict: exact moment matching (the step's mean and covariance are DDIM's). "
                                       "vub: the paper's ORTHO-VUB, its eigenvalue bound taken off along the offsets "
                                       "(one direction short of variance; clipped, so at large scale or eta = 0 it "
                                       "adds variance). diag: the paper's ORTHO rule along the offsets (right "
                                       "variance per offset direction, wrong cross terms). auto: strict if eta > 0, "
                                       "else vub."),
                io.Boolean.Input("share_across_steps", default=False,
                                 tooltip="Use the same offset directions at every step (the paper's VUB*); off = a "
                                         "shifted copy per step."),
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
