"""ER-SDE Solver as a SAMPLER node (its KSampler dropdown presets are in samplers/presets.py)."""
from __future__ import annotations

from ..samplers.er_sde import (
    DERIVATIVES, FINAL_STEPS, FLOW_FORMS, FLOW_STARTS, NOISE_FUNCTIONS, NOISE_KINDS, QUADRATURES, check_options,
    sample_er_sde,
)
from .comfy_io import CATEGORY, io, mark_advanced

class ERSDESolverSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FS_ERSDESolver",
            display_name="ER-SDE Solver",
            category=f"{CATEGORY}/er_sde",
            description=(
                "Extended reverse-time SDE solver (Cui et al.) with exact coefficients and a true 3rd order. "
                "Works for epsilon, v-prediction and flow models. Plug into SamplerCustom or SamplerCustomAdvanced; "
                "the random noise it adds follows the seed of that node."
            ),
            inputs=mark_advanced([
                io.Int.Input("order", default=3, min=1, max=3,
                             tooltip="Solver order. 3 is the most accurate per step; 1 is plain DDIM/Euler "
                                     "(or Euler ancestral with reverse_sde).", display_name="solver order"),
                io.Combo.Input("noise_fn", options=list(NOISE_FUNCTIONS), default="sde_5",
                               tooltip="How much fresh noise each step adds. ode: none (sharp, deterministic); "
                                       "sde_5: noise mostly at the start, almost none at the end (the paper's "
                                       "default); reverse_sde: full ancestral noise (softer, more varied); "
                                       "sde_1..sde_4: the paper's other curves; power: lam^power with the power set below.",
                               display_name="noise curve"),
                io.Float.Input("eta", default=1.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Strength of the chosen noise curve: 0 turns any curve into the "
                                       "deterministic ODE, 1 is the curve as published, above 1 adds more noise.",
                               display_name="noise amount (eta)"),
                io.Float.Input("p", default=2.0, min=1.0, max=100.0, step=0.01,
                               tooltip="The power of the 'power' curve (phi = lam^power). 1 = ODE, 2 = reverse SDE; "
                                       "ComfyUI's 'Reverse-time SDE' with eta e is power = 1 + e. Used only by 'power'.",
                               display_name="power curve exponent"),
                io.Float.Input("a", default=0.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Parameter of the sde_1 curve; above 1 it adds much more noise at high "
                                       "noise levels. Used only by 'sde_1' (must not be 1).",
                               display_name="sde_1 curve parameter"),
                io.Float.Input("s_noise", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Multiplier on the added noise. Below 1 keeps more of the current image "
                                       "each step (crisper, can look over-smoothed); 1 is the exact SDE.",
                               display_name="noise scale"),
                io.Combo.Input("noise", options=list(NOISE_KINDS), default="gaussian",
                               tooltip="gaussian: fresh random noise each step (seeded like newer ComfyUI's samplers: seed + 1 on the CPU). "
                                       "brownian: one noise path per seed, so changing the step count changes the "
                                       "image less.", display_name="noise type"),
                io.Combo.Input("derivatives", options=list(DERIVATIVES), default="corrected",
                               tooltip="corrected: a true 3rd-order solver (more accurate at the same steps). "
                                       "paper: the published update, which is only 2nd order; for comparisons.",
                               display_name="derivatives"),
                io.Combo.Input("quadrature", options=list(QUADRATURES), default="exact",
                               tooltip="exact: closed-form / Gauss-Legendre step coefficients. comfy_riemann: "
                                       "ComfyUI's 200-point sums, to reproduce ComfyUI's er_sde.",
                               display_name="step coefficients"),
                io.Combo.Input("flow_start", options=list(FLOW_STARTS), default="exact",
                               tooltip="Flow models (SD3, Flux...) start from pure noise at sigma 1. exact: the "
                                       "exact first step; comfy_offset: start just below 1 like ComfyUI's er_sde.",
                               display_name="flow models: first step"),
                io.Combo.Input("final_step", options=list(FINAL_STEPS), default="denoise",
                               tooltip="denoise: the last step returns the model's clean prediction (standard). "
                                       "extrapolate: extrapolates it to noise level 0 (helps when the schedule ends "
                                       "high). corrected (with the corrector): adds the corrector's last change. "
                                       "The Schedule Calibrator picks the best for its schedule.",
                               display_name="last step"),
                io.Boolean.Input("corrector", default=False, optional=True,
                                 tooltip="Deterministic (ode / eta 0) only: re-use each model evaluation to correct "
                                         "the step that led to it. One order more accurate at the same number of model "
                                         "calls (the fs_er_sde_ode_3_unic preset).",
                                 display_name="corrector (deterministic only)"),
                io.Combo.Input("flow_form", options=["auto", *FLOW_FORMS], default="auto", optional=True,
                               tooltip="Flow models, deterministic only: the variable the model's prediction is "
                                       "interpolated in. lambda = sigma/(1-sigma) (loses the first evaluation, at "
                                       "sigma 1, for the next steps), sigma (keeps it, as ComfyUI's samplers do), "
                                       "hybrid (sigma while the first evaluation is in use, then lambda; best on "
                                       "most schedules measured). auto: hybrid for the ODE, lambda for the SDE.",
                               display_name="flow models: interpolation"),
            ], "p", "a", "derivatives", "quadrature", "flow_start", "flow_form"),
            outputs=[io.Sampler.Output(tooltip="Connect to the sampler input of SamplerCustom(Advanced).")],
        )

    @classmethod
    def execute(cls, order, noise_fn, eta, p, a, s_noise, noise, derivatives, quadrature, flow_start, final_step,
                corrector=False, flow_form="auto") -> io.NodeOutput:
        import comfy.samplers

        # The input ids p and a stay (saved workflows load); the sampler calls them power and sde_1_a.
        options = dict(order=order, noise_fn=noise_fn, eta=eta, power=p, sde_1_a=a, s_noise=s_noise, noise=noise,
                       derivatives=derivatives, quadrature=quadrature, flow_start=flow_start, final_step=final_step,
                       corrector=corrector, flow_form=None if flow_form == "auto" else flow_form)
        try:
            check_options(**options)
        except ValueError as err:  # ComfyUI 0.3.64 does not check V3 combo values itself
            raise ValueError(f"ER-SDE Solver node: {err}") from None
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_er_sde, extra_options=options))


NODES = [ERSDESolverSampler]
