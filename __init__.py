"""comfyui-fast-samplers: fast diffusion samplers as ComfyUI nodes.

ComfyUI loads this folder as a custom-node pack through ``comfy_entrypoint`` (V3 API). The
math lives in ``samplers/`` and imports no ComfyUI code, so the package is also usable as a
plain library: ``from comfyui_fast_samplers.samplers import sample_er_sde``.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import FastSamplersExtension

    return FastSamplersExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
