"""DPM-OT map nodes: the OT fit (with a resumable checkpoint), saving and loading map files."""
from __future__ import annotations

import logging

from ...samplers.dpm_ot import OTMap, fit_ot_map, load_ot_map, save_ot_map
from ..comfy_io import PREFIX, io
from ..dp_schedule import show_text
from ..registry import register_model_folder
from .common import CAT, FOLDER, HONEST_NOTE, OT_MAP, OT_TARGETS, pool_report

log = logging.getLogger(__name__)


def checkpoint_path(pool: OTMap, iterations: int, seed: int):
    from pathlib import Path

    import folder_paths

    from ...samplers.dp_schedule import cache_key

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

        from ...samplers.files import atomic_save_safetensors

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

        from ...samplers.files import unused_path

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
