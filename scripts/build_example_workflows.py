"""Writes example_workflows/<name>.json (front-end format, drag and drop into ComfyUI) and
example_workflows/api/<name>.json (API format, for /prompt and headless runs) from the API
graphs defined below. The front-end format is derived from the live node definitions, so run it
inside a ComfyUI environment:

    COMFYUI_PATH=/path/to/ComfyUI python scripts/build_example_workflows.py

Each graph uses only core nodes plus the pack's, with models named the way users name them."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "example_workflows"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
POSITIVE = "a lighthouse on a cliff at sunset, oil painting"
NEGATIVE = "blurry, low quality"
COLUMNS = 4  # node columns side by side before the graph wraps: opens readable at 100 % (<= ~1500 px wide)


def _base(latent_size=512, batch=1) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": POSITIVE, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": latent_size, "height": latent_size, "batch_size": batch}},
    }


def _folder_batch(folder: str) -> dict:
    """A LATENT batch of every image in ComfyUI/input/<folder> with core nodes: Load Image Dataset from Folder
    (one IMAGE batch, all stretched to the first one's size), Upscale Image to the model's 512 px, VAE Encode."""
    return {
        "10": {"class_type": "LoadImageSetFromFolderNode", "inputs": {"folder": folder, "resize_method": "Stretch"}},
        "9": {"class_type": "ImageScale", "inputs": {"image": ["10", 0], "upscale_method": "lanczos", "width": 512,
                                                     "height": 512, "crop": "center"}},
        "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["9", 0], "vae": ["1", 2]}},
    }


def _decode_save(latent_ref, prefix) -> dict:
    return {
        "90": {"class_type": "VAEDecode", "inputs": {"samples": latent_ref, "vae": ["1", 2]}},
        "91": {"class_type": "SaveImage", "inputs": {"images": ["90", 0], "filename_prefix": prefix}},
    }


def er_sde_sampler_custom() -> dict:
    """ER-SDE Solver node in SamplerCustom, Karras schedule, 20 steps."""
    g = _base()
    g.update({
        "5": {"class_type": "FS_ERSDESolver", "inputs": {
            "order": 3, "noise_fn": "sde_5", "eta": 1.0, "p": 2.0, "a": 0.0, "s_noise": 1.0, "noise": "gaussian",
            "derivatives": "corrected", "quadrature": "exact", "flow_start": "exact", "final_step": "denoise",
            "corrector": False, "flow_form": "auto"}},
        "6": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 20, "denoise": 1.0}},
        "7": {"class_type": "FS_PlotSigmas", "inputs": {"sigmas": ["6", 0]}},
        "8": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": 42, "cfg": 7.0, "positive": ["2", 0],
            "negative": ["3", 0], "sampler": ["5", 0], "sigmas": ["7", 0], "latent_image": ["4", 0]}},
    })
    g.update(_decode_save(["8", 0], "fs_er_sde"))
    return g


def er_sde_ksampler_preset() -> dict:
    """The parameter-free preset fs_er_sde_3 picked in the stock KSampler."""
    g = _base()
    g["8"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 42, "steps": 20, "cfg": 7.0, "sampler_name": "fs_er_sde_3", "scheduler": "karras",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    g.update(_decode_save(["8", 0], "fs_er_sde_preset"))
    return g


def ddim_gmm_sampler_custom() -> dict:
    """DDIM-GMM node (eta 0.5, strict moment matching) in SamplerCustom, 10 steps."""
    g = _base()
    g.update({
        "5": {"class_type": "FS_DDIMGMM", "inputs": {
            "eta": 0.5, "eta_convention": "ddim", "components": 8, "scale": 0.9, "scale_units": "relative",
            "offsets": "ortho", "covariance": "strict", "share_across_steps": False, "offset_seed": 0,
            "skip_last_offsets": 0, "on_infeasible": "clamp"}},
        "6": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 10, "denoise": 1.0}},
        "8": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": 42, "cfg": 7.0, "positive": ["2", 0],
            "negative": ["3", 0], "sampler": ["5", 0], "sigmas": ["6", 0], "latent_image": ["4", 0]}},
    })
    g.update(_decode_save(["8", 0], "fs_ddim_gmm"))
    return g


def dbim_edges_to_handbag() -> dict:
    """Photo -> edge map -> DBIM (20 NFE, deterministic) on the DDBM edges->handbags model."""
    return {
        "1": {"class_type": "FS_BridgeModelLoader", "inputs": {
            "ckpt_name": "e2h_ema_0.9999_420000.pt", "preset": "auto", "dtype": "fp32", "save_safetensors": False,
            "custom_schedule": "vp", "beta_d": 2.0, "beta_min": 0.1, "sigma_max": 80.0, "attention_order": "auto"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "handbag.png"}},
        "3": {"class_type": "FS_BridgeEdgeMap", "inputs": {"image": ["2", 0], "low_threshold": 0.1,
                                                           "high_threshold": 0.2, "blur_sigma": 1.0, "thickness": 0}},
        "4": {"class_type": "FS_BridgeSampler", "inputs": {
            "bridge_model": ["1", 0], "condition": ["3", 0], "seed": 42, "sampler": "dbim", "eta": 0.0,
            "churn_step_ratio": 0.33, "nfe": 20, "order": 1, "grid": "uniform_t", "size": "resize_to_model",
            "class_label": 0, "clip_denoised": True, "paste_known": False}},
        "91": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "fs_dbim_handbag"}},
    }


def elbo_schedule() -> dict:
    """ELBO Schedule Optimizer on a batch of your images (a folder, VAE-encoded; measured under the positive
    prompt), feeding SamplerCustom."""
    g = _base()
    g.update(_folder_batch("my_images"))
    g.update({
        "12": {"class_type": "FS_ELBOScheduleOptimizer", "inputs": {
            "model": ["1", 0], "latents": ["11", 0], "positive": ["2", 0], "steps": 10, "candidates": 250,
            "variance": "small", "decoder": "sigma", "seed": 0, "start_sigma": 0.0, "use_cache": True,
            "objective": "elbo"}},
        "5": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "8": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": 42, "cfg": 7.0, "positive": ["2", 0],
            "negative": ["3", 0], "sampler": ["5", 0], "sigmas": ["12", 0], "latent_image": ["4", 0]}},
    })
    g.update(_decode_save(["8", 0], "fs_elbo_schedule"))
    return g


def dpm_ot_pool_fit_sample() -> dict:
    """DPM-OT: a pool from a folder of your images (16-64, VAE-encoded), the OT fit, a saved map, and sampling
    through the map plus 5 finishing steps from the junction sigma (variations of pool members, not new
    compositions)."""
    g = _base(batch=4)
    g.update(_folder_batch("my_pool"))
    g.update({
        "12": {"class_type": "FS_DPMOTTargetsFromLatents", "inputs": {
            "model": ["1", 0], "latents": ["11", 0], "sigma_junction": 1.0, "seed": 0, "keep_clean": True}},
        "13": {"class_type": "FS_DPMOTFitMap", "inputs": {
            "targets": ["12", 0], "iterations": 1500, "seed": 0, "device": "auto", "resume": True}},
        "14": {"class_type": "FS_DPMOTSaveMap", "inputs": {"ot_map": ["13", 0], "filename_prefix": "my_pool"}},
        "5": {"class_type": "FS_DPMOTSampler", "inputs": {
            "ot_map": ["13", 0], "finisher": "er_sde_3", "placement": "target", "angle_threshold": 0.7,
            "pair_weight": 0.75}},
        "6": {"class_type": "FS_DPMOTSigmas", "inputs": {
            "model": ["1", 0], "ot_map": ["13", 0], "scheduler": "karras", "steps": 5}},
        "8": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": 42, "cfg": 7.0, "positive": ["2", 0],
            "negative": ["3", 0], "sampler": ["5", 0], "sigmas": ["6", 0], "latent_image": ["4", 0]}},
    })
    g.update(_decode_save(["8", 0], "fs_dpm_ot"))
    return g


def _bridge_loader(ckpt: str) -> dict:
    return {"class_type": "FS_BridgeModelLoader", "inputs": {
        "ckpt_name": ckpt, "preset": "auto", "dtype": "fp32", "save_safetensors": False, "custom_schedule": "vp",
        "beta_d": 2.0, "beta_min": 0.1, "sigma_max": 80.0, "attention_order": "auto"}}


def _bridge_sampler(model_ref, condition_ref, **overrides) -> dict:
    inputs = {"bridge_model": model_ref, "condition": condition_ref, "seed": 42, "sampler": "dbim", "eta": 0.0,
              "churn_step_ratio": 0.33, "nfe": 20, "order": 1, "grid": "uniform_t", "size": "resize_to_model",
              "class_label": 0, "clip_denoised": True, "paste_known": False}
    inputs.update(overrides)
    return {"class_type": "FS_BridgeSampler", "inputs": inputs}


def dbim_encode_interpolate() -> dict:
    """Encode a real handbag photo to its booting noise, then morph to another seed's result."""
    return {
        "1": _bridge_loader("e2h_ema_0.9999_420000.pt"),
        "2": {"class_type": "LoadImage", "inputs": {"image": "handbag.png"}},
        "3": {"class_type": "FS_BridgeEdgeMap", "inputs": {"image": ["2", 0], "low_threshold": 0.1,
                                                           "high_threshold": 0.2, "blur_sigma": 1.0, "thickness": 0}},
        "4": {"class_type": "FS_BridgeEncode", "inputs": {
            "bridge_model": ["1", 0], "condition": ["3", 0], "target": ["2", 0], "nfe": 20, "order": 2,
            "grid": "uniform_t", "size": "resize_to_model", "class_label": 0}},
        "5": {"class_type": "FS_BridgeInterpolate", "inputs": {
            "bridge_model": ["1", 0], "condition": ["3", 0], "frames": 8, "seed_a": 0, "seed_b": 7, "nfe": 20,
            "order": 1, "grid": "uniform_t", "size": "resize_to_model", "class_label": 0, "latent_a": ["4", 0]}},
        "91": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "fs_dbim_morph"}},
    }


def dbim_inpaint_centre() -> dict:
    """ImageNet 256 centre inpainting (class-conditional I2SB-style bridge), known pixels pasted back."""
    return {
        "1": _bridge_loader("imagenet256_inpaint_ema_0.9999_400000.pt"),
        "2": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "3": {"class_type": "FS_BridgeCentreMask", "inputs": {"image": ["2", 0]}},
        "4": _bridge_sampler(["1", 0], ["2", 0], mask=["3", 0], class_label=207, paste_known=True),
        "91": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "fs_dbim_inpaint"}},
    }


def dbim_normal_to_photo() -> dict:
    """DIODE outdoor: a normal map rendered the way the model was trained, translated to a photo."""
    return {
        "1": _bridge_loader("diode_ema_0.9999_440000.pt"),
        "2": {"class_type": "LoadImage", "inputs": {"image": "normals.png"}},
        "3": {"class_type": "FS_BridgeNormalMap", "inputs": {"normal_map": ["2", 0], "flip_x": False, "flip_y": False,
                                                             "flip_z": False}},
        "4": _bridge_sampler(["1", 0], ["3", 0]),
        "91": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "fs_dbim_diode"}},
    }


def calibrated_sd15() -> dict:
    """Schedule Calibrator for SD1.5 + the pack's corrected ODE preset, 8 steps, feeding SamplerCustom."""
    g = _base()
    g.update({
        "5": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "fs_er_sde_ode_3_unic"}},
        "6": {"class_type": "FS_ScheduleCalibrator", "inputs": {
            "model": ["1", 0], "sampler": ["5", 0], "latent": ["4", 0], "steps": 8, "noises": 16,
            "calibration_seed": 0, "teacher_accuracy": "standard", "candidates": 40, "positive": ["2", 0],
            "negative": ["3", 0], "cfg": 7.0, "tune_steps": True, "use_cache": True}},
        "8": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": 42, "cfg": 7.0, "positive": ["2", 0],
            "negative": ["3", 0], "sampler": ["6", 1], "sigmas": ["6", 0], "latent_image": ["4", 0]}},
    })
    g.update(_decode_save(["8", 0], "fs_calibrated_sd15"))
    return g


def calibrated_flow() -> dict:
    """Schedule Calibrator for a flow model (SD3.5 medium, shift 3) with ComfyUI's own uni_pc, 8 steps."""
    g = _base()
    g["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {
        "ckpt_name": "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"}}
    g["4"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}}
    g.update({
        "7": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}},
        "5": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "uni_pc"}},
        "6": {"class_type": "FS_ScheduleCalibrator", "inputs": {
            "model": ["7", 0], "sampler": ["5", 0], "latent": ["4", 0], "steps": 8, "noises": 8,
            "calibration_seed": 0, "teacher_accuracy": "standard", "candidates": 40, "positive": ["2", 0],
            "negative": ["3", 0], "cfg": 4.5, "tune_steps": True, "use_cache": True}},
        "8": {"class_type": "SamplerCustom", "inputs": {
            "model": ["7", 0], "add_noise": True, "noise_seed": 42, "cfg": 4.5, "positive": ["2", 0],
            "negative": ["3", 0], "sampler": ["6", 1], "sigmas": ["6", 0], "latent_image": ["4", 0]}},
    })
    g.update(_decode_save(["8", 0], "fs_calibrated_flow"))
    return g


EXAMPLES = {
    "fs_er_sde_sampler_custom": er_sde_sampler_custom,
    "fs_er_sde_ksampler_preset": er_sde_ksampler_preset,
    "fs_ddim_gmm_sampler_custom": ddim_gmm_sampler_custom,
    "fs_calibrated_sd15": calibrated_sd15,
    "fs_calibrated_flow": calibrated_flow,
    "fs_elbo_schedule": elbo_schedule,
    "fs_dpm_ot_pool_fit_sample": dpm_ot_pool_fit_sample,
    "fs_dbim_edges_to_handbag": dbim_edges_to_handbag,
    "fs_dbim_encode_interpolate": dbim_encode_interpolate,
    "fs_dbim_inpaint_centre": dbim_inpaint_centre,
    "fs_dbim_normal_to_photo": dbim_normal_to_photo,
}


# ---- API -> front-end format ------------------------------------------------------------

def _input_defs(node_class) -> list[tuple[str, tuple]]:
    spec = node_class.INPUT_TYPES()
    return [(name, d) for section in ("required", "optional") for name, d in spec.get(section, {}).items()]


def _is_widget(type_spec) -> bool:
    return isinstance(type_spec, list) or type_spec in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def to_ui(prompt: dict, node_classes: dict) -> dict:
    ids = sorted(prompt, key=int)
    depth: dict[str, int] = {}

    def level(nid):
        if nid not in depth:
            parents = [v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)]
            depth[nid] = 1 + max((level(p) for p in parents), default=-1)
        return depth[nid]

    links, nodes_ui, rows = [], [], {}
    out_links: dict[tuple, list] = {}
    for nid in ids:
        cls = node_classes[prompt[nid]["class_type"]]
        inputs_ui, widgets, tall = [], [], 0
        for name, d in _input_defs(cls):
            type_spec, options = d[0], (d[1] if len(d) > 1 else {})
            value = prompt[nid]["inputs"].get(name)
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                src, slot = value
                link_id = len(links) + 1
                src_type = node_classes[prompt[src]["class_type"]].RETURN_TYPES[slot]
                links.append([link_id, int(src), slot, int(nid), len(inputs_ui), src_type])
                out_links.setdefault((src, slot), []).append(link_id)
                entry = {"name": name, "type": src_type, "link": link_id}
                if _is_widget(type_spec):
                    entry["widget"] = {"name": name}
                inputs_ui.append(entry)
            elif _is_widget(type_spec):
                widgets.append(value if value is not None else options.get("default"))
                tall += 100 if options.get("multiline") else 0
                # the front end adds a "control after generate" widget where the input asks for one, and to
                # every INT named seed / noise_seed that does not say otherwise
                if options.get("control_after_generate", name in ("seed", "noise_seed")):
                    widgets.append("fixed")
        col = level(nid)
        height = 80 + 26 * (len(widgets) + len(inputs_ui)) + tall
        top = rows.get(col, 0)
        rows[col] = top + height + 40
        nodes_ui.append({
            "id": int(nid), "type": prompt[nid]["class_type"], "pos": [40 + 360 * (col % COLUMNS), top],
            "band": col // COLUMNS,
            "size": [320, height], "flags": {}, "order": 0, "mode": 0,
            "inputs": inputs_ui, "outputs": [], "properties": {"Node name for S&R": prompt[nid]["class_type"]},
            "widgets_values": widgets,
        })
    for node in nodes_ui:
        cls = node_classes[node["type"]]
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        node["outputs"] = [{"name": n, "type": t, "links": out_links.get((str(node["id"]), k), []), "slot_index": k}
                           for k, (n, t) in enumerate(zip(names, cls.RETURN_TYPES))]
    band_top = 40  # bands of COLUMNS columns stacked downwards, each below the tallest column above it
    for band in range(max(n["band"] for n in nodes_ui) + 1):
        members = [n for n in nodes_ui if n["band"] == band]
        for node in members:
            node["pos"][1] += band_top
        band_top = max(n["pos"][1] + n["size"][1] for n in members) + 80
    for node in nodes_ui:
        del node["band"]
    order = sorted(nodes_ui, key=lambda n: depth[str(n["id"])])
    for k, node in enumerate(order):
        node["order"] = k
    return {"last_node_id": max(int(i) for i in ids), "last_link_id": len(links), "nodes": nodes_ui,
            "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 1.0, "offset": [80, 40]}},  # opens at 100 %, top left: text readable
            "version": 0.4}


def write_json(path: Path, data: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def main():
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    sys.path.insert(0, str(REPO / "tests" / "comfyui"))
    import asyncio

    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import utils.install_util  # noqa: F401
    import folder_paths
    import nodes
    import tempfile

    parent = Path(tempfile.mkdtemp())
    (parent / "comfyui-fast-samplers").symlink_to(REPO, target_is_directory=True)
    folder_paths.add_model_folder_path("custom_nodes", str(parent))
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    for name, build in EXAMPLES.items():
        prompt = build()
        write_json(OUT / "api" / f"{name}.json", prompt)
        write_json(OUT / f"{name}.json", to_ui(prompt, nodes.NODE_CLASS_MAPPINGS))
        print("wrote", name)


if __name__ == "__main__":
    main()
