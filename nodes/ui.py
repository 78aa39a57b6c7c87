"""Small helper nodes for looking at what the pack's nodes produce."""
from __future__ import annotations

from .comfy_io import CATEGORY, io, ui
from .sigma_plot import render


def sigmas_ui(sigmas) -> dict:
    """What a node of the pack returns as ui for a SIGMAS output: the values ("fs_sigmas", for scripts and
    the API) and the plot as an ordinary image preview (ComfyUI's temp folder), which every front end shows
    below the node's widgets."""
    import numpy as np
    import torch

    values = [float(s) for s in sigmas.detach().cpu().flatten()]
    pixels = torch.from_numpy(np.asarray(render(values), dtype=np.float32) / 255.0)[None]
    return {"fs_sigmas": values, **ui.PreviewImage(pixels).as_dict()}


class PlotSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FS_PlotSigmas",
            display_name="Plot Sigmas",
            category=f"{CATEGORY}/schedules",
            description="Shows a SIGMAS schedule on the node as log(sigma) per step, with a Karras schedule of "
                        "the same length and ends for comparison (an image preview: it appears after a Run). "
                        "Passes the sigmas through unchanged.",
            inputs=[io.Sigmas.Input("sigmas", tooltip="Any schedule: from a scheduler node, SplitSigmas, or the "
                                                      "pack's optimizers.")],
            outputs=[io.Sigmas.Output(tooltip="The same sigmas, unchanged.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, sigmas) -> io.NodeOutput:
        if sigmas.ndim != 1 or sigmas.numel() == 0:
            raise ValueError(f"Plot Sigmas: expected a non-empty 1-D SIGMAS tensor, got shape {tuple(sigmas.shape)}.")
        return io.NodeOutput(sigmas, ui=sigmas_ui(sigmas))


NODES = [PlotSigmas]
