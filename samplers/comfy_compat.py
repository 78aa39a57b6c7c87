"""Every read of a ComfyUI object the samplers make, by duck typing (no comfy import; None / defaults
outside ComfyUI, so the same samplers run on the built-in exact models).

Inside ComfyUI a sampler's ``model`` is the wrapped denoiser (``KSamplerX0Inpaint`` around ``CFGGuider``):
``model.inner_model.model_patcher`` is the ModelPatcher, whose ``get_model_object`` gives the model's
``model_sampling`` (prediction type, sigma range, ``percent_to_sigma``, ``noise_scale``) and
``latent_format``; the wrapper itself keeps the run's ``noise`` and ``latent_image``.
"""
from __future__ import annotations

# ComfyUI prediction classes (comfy/model_sampling.py) and how their k-diffusion sigma behaves.
_FLOW_CLASSES = {"CONST"}
_VE_CLASSES = {"EPS", "V_PREDICTION", "EDM", "X0", "IMG_TO_IMG", "COSMOS_RFLOW"}
FLOW_START_PERCENT = 1e-4  # ComfyUI samplers start flow models at percent_to_sigma(1e-4), just below sigma = 1


def comfy_model_object(model, name: str):
    """``model_patcher.get_model_object(name)`` of the ComfyUI model behind ``model``, or None outside ComfyUI."""
    try:
        patcher = model.inner_model.model_patcher
    except AttributeError:
        return None
    return patcher.get_model_object(name)


def comfy_model_sampling(model):
    """The ComfyUI model_sampling object behind a sampler's ``model`` argument, or None."""
    return comfy_model_object(model, "model_sampling")


def model_latent_format(model) -> str | None:
    """Class name of the ComfyUI model's latent format (SD15, SDXL, ...), or None outside ComfyUI."""
    latent_format = comfy_model_object(model, "latent_format")
    return None if latent_format is None else type(latent_format).__name__


def noise_scale_of(model) -> float:
    """Newer ComfyUI model_sampling objects carry a ``noise_scale``; honour it like ComfyUI (1 otherwise)."""
    model_sampling = comfy_model_sampling(model)
    return float(getattr(model_sampling, "noise_scale", 1.0)) if model_sampling is not None else 1.0


def flow_start_offset_sigma(model) -> float | None:
    """The sigma just below 1 where ComfyUI's samplers evaluate a flow model instead of sigma = 1
    (``percent_to_sigma(1e-4)``), or None where the model has no ``percent_to_sigma``."""
    model_sampling = comfy_model_sampling(model)
    if model_sampling is None or not hasattr(model_sampling, "percent_to_sigma"):
        return None
    return float(model_sampling.percent_to_sigma(FLOW_START_PERCENT))


def run_noise_and_latent(model):
    """(noise, latent_image) ComfyUI keeps on the wrapped model of a run (either None where absent)."""
    return getattr(model, "noise", None), getattr(model, "latent_image", None)


def parametrization_of_model_sampling(model_sampling) -> str:
    """'ve' or 'flow' for a ComfyUI model_sampling object, by its class names."""
    names = {cls.__name__ for cls in type(model_sampling).__mro__}
    if names & _FLOW_CLASSES:
        return "flow"
    if names & _VE_CLASSES:
        return "ve"
    raise ValueError(
        f"Unsupported model type {type(model_sampling).__name__}: fast samplers support epsilon, "
        "v-prediction, EDM, x0 and flow (CONST) models."
    )


def prediction_type(model_sampling) -> str:
    """ComfyUI's prediction class of a model_sampling object, lower-case ('eps', 'v_prediction', 'const'...)."""
    parametrization_of_model_sampling(model_sampling)  # raises on unsupported types
    known = _FLOW_CLASSES | _VE_CLASSES
    return next(cls.__name__.lower() for cls in type(model_sampling).__mro__ if cls.__name__ in known)


def parametrization_of_prediction(prediction: str) -> str:
    """'flow' for 'const', 've' for the other prediction types of ``prediction_type``."""
    names = {name.lower() for name in _FLOW_CLASSES | _VE_CLASSES}
    if prediction not in names:
        raise ValueError(f"Unknown model type {prediction!r}; expected one of {sorted(names)}.")
    return "flow" if prediction.upper() in _FLOW_CLASSES else "ve"


def model_sigma_range_and_table(model):
    """(sigma_min, sigma_max, table) of the ComfyUI model behind ``model``, or None outside ComfyUI. ``table``:
    the float64 sigma table of a discrete model (its ``timestep()`` rounds to a table index), else None."""
    import torch

    model_sampling = comfy_model_sampling(model)
    if model_sampling is None:
        return None
    table = None
    sigmas = getattr(model_sampling, "sigmas", None)
    if sigmas is not None and hasattr(model_sampling, "timestep"):
        probe = sigmas[len(sigmas) // 2:len(sigmas) // 2 + 1] * 1.0001
        if not torch.is_floating_point(model_sampling.timestep(probe)):
            table = sigmas.detach().to("cpu", torch.float64)
    return float(model_sampling.sigma_min), float(model_sampling.sigma_max), table


def start_noise_scaling(model, sigma, noise):
    """x at ``sigma`` as a ComfyUI run starts from an empty latent (``noise_scaling`` at max denoise: EPS gives
    noise * sqrt(1 + sigma^2)), or None outside ComfyUI."""
    import torch

    model_sampling = comfy_model_sampling(model)
    if model_sampling is None:
        return None
    return model_sampling.noise_scaling(sigma.to(noise.dtype), noise, torch.zeros_like(noise), True)
