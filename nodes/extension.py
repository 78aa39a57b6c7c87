"""The pack's ComfyExtension: node list and one-time dropdown registration."""
from __future__ import annotations

from .comfy_io import ComfyExtension, io
from .registry import register_ksampler_presets


def _method_modules():
    from . import calibration, dbim, ddim_gmm, dp_schedule, dpm_ot, er_sde, ui

    return [er_sde, ddim_gmm, calibration, dp_schedule, dpm_ot, dbim, ui]


def all_nodes() -> list:
    return [node for module in _method_modules() for node in module.NODES]


def all_presets() -> dict:
    from ..samplers.presets import SAMPLERS

    return SAMPLERS


class FastSamplersExtension(ComfyExtension):
    async def on_load(self) -> None:  # called by newer ComfyUI; registration is idempotent
        register_ksampler_presets(all_presets())

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_ksampler_presets(all_presets())
        return all_nodes()
