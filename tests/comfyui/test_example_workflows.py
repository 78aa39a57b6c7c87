"""Every API-format example workflow validates and executes on the weight-free model."""
import json
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
API_FILES = sorted((EXAMPLES / "api").glob("*.json"))


TOY_BRIDGE = Path(__file__).resolve().parents[1] / "assets" / "toy_bridge_vp16.safetensors"


@pytest.fixture(scope="module")
def toy_bridge_model(comfy, tmp_path_factory):
    """The tiny trained bridge model under the fs_bridge_models folder key."""
    import shutil

    import folder_paths

    folder = tmp_path_factory.mktemp("fs_bridge_models")
    shutil.copy(TOY_BRIDGE, folder / "toy.safetensors")
    folder_paths.add_model_folder_path("fs_bridge_models", str(folder))
    return "toy.safetensors"


@pytest.fixture(scope="module", autouse=True)
def ot_map_folder(comfy, tmp_path_factory):
    """Maps saved by the DPM-OT example land in a temp folder, not in the ComfyUI checkout."""
    import folder_paths

    folder = tmp_path_factory.mktemp("fs_ot_maps")
    previous = folder_paths.folder_names_and_paths.get("fs_ot_maps")
    folder_paths.folder_names_and_paths["fs_ot_maps"] = ([str(folder)], {".safetensors"})
    yield folder
    if previous is not None:
        folder_paths.folder_names_and_paths["fs_ot_maps"] = previous


def weight_free(prompt: dict, bridge_model: str) -> dict:
    """Swap the checkpoint for the weight-free model, text encoders for zero conditioning, decode +
    save for a latent capture (no weights, no VAE), a bridge checkpoint for the toy bridge model (a
    translation model: inpainting masks are dropped) and a loaded image for a blank one."""
    out = {}
    for nid, node in prompt.items():
        cls = node["class_type"]
        if cls == "FS_BridgeModelLoader":
            out[nid] = json.loads(json.dumps(node))
            out[nid]["inputs"].update(ckpt_name=bridge_model)
        elif cls == "VAEEncode":  # clean data latents without a VAE
            out[nid] = {"class_type": "FSTest_GaussianLatents", "inputs": {"batch": 8, "mu": 0.5, "s": 0.1, "seed": 0}}
        elif cls == "LoadImage":
            out[nid] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xFFFFFF}}
        elif cls == "SaveImage" and prompt[node["inputs"]["images"][0]]["class_type"] != "VAEDecode":
            out[nid] = {"class_type": "PreviewImage", "inputs": {"images": node["inputs"]["images"]}}
        elif cls == "CheckpointLoaderSimple":
            out[nid] = {"class_type": "FSTest_WeightFreeModel", "inputs": {"prediction": "eps"}}
        elif cls == "CLIPTextEncode":
            out[nid] = {"class_type": "FSTest_ZeroConditioning", "inputs": {}}
        elif cls == "VAEDecode":
            continue
        elif cls == "SaveImage":
            decoded = prompt[node["inputs"]["images"][0]]
            out[nid] = {"class_type": "FSTest_CaptureLatent",
                        "inputs": {"samples": decoded["inputs"]["samples"], "label": nid}}
        else:
            out[nid] = json.loads(json.dumps(node))
            if cls.startswith("FS_Bridge"):
                out[nid]["inputs"].pop("mask", None)
        if cls in ("EmptyLatentImage", "EmptySD3LatentImage"):  # the weight-free UNet takes 4 channels
            out[nid] = {"class_type": "EmptyLatentImage", "inputs": dict(out[nid]["inputs"], width=64, height=64)}
        if cls == "FS_ScheduleCalibrator":
            out[nid]["inputs"].update(noises=2, candidates=8, steps=3, teacher_accuracy="fast", use_cache=False)
        for key in ("steps",):
            if key in out[nid]["inputs"] and isinstance(out[nid]["inputs"][key], int):
                out[nid]["inputs"][key] = min(out[nid]["inputs"][key], 6)
    return out


def test_every_example_has_both_formats():
    assert API_FILES, "no example workflows"
    for api in API_FILES:
        ui = json.loads((EXAMPLES / api.name).read_text())
        prompt = json.loads(api.read_text())
        assert sorted(n["id"] for n in ui["nodes"]) == sorted(int(i) for i in prompt)
        assert {n["type"] for n in ui["nodes"]} == {n["class_type"] for n in prompt.values()}


@pytest.mark.parametrize("api", API_FILES, ids=[p.stem for p in API_FILES])
def test_example_executes_on_the_weight_free_model(run_prompt, toy_bridge_model, api):
    prompt = weight_free(json.loads(api.read_text()), toy_bridge_model)
    captured = run_prompt(prompt)  # raises if any node fails
    for latent in captured.values():
        assert torch.isfinite(latent).all()


@pytest.mark.parametrize("api", API_FILES, ids=[p.stem for p in API_FILES])
def test_example_validates_unmodified(validate, api):
    """With the user's model, image and image-folder names the graph fails only on those missing files."""
    valid, error, node_errors = validate(json.loads(api.read_text()))
    problems = [e for n in node_errors.values() for e in n["errors"]]
    assert all(e["type"] in ("value_not_in_list", "custom_validation_failed")
               and any(k in e["details"] for k in ("ckpt_name", "image", "folder")) for e in problems), problems


def test_pool_and_data_examples_load_a_folder_as_one_batch():
    """DPM-OT and the ELBO optimizer need a batch of images: their examples encode a whole input folder, and
    the ELBO probe is measured under the positive prompt (not the negative one)."""
    for name in ("fs_dpm_ot_pool_fit_sample", "fs_elbo_schedule"):
        prompt = json.loads((EXAMPLES / "api" / f"{name}.json").read_text())
        kinds = {n["class_type"] for n in prompt.values()}
        assert "LoadImageSetFromFolderNode" in kinds and "LoadImage" not in kinds, name
    elbo = json.loads((EXAMPLES / "api" / "fs_elbo_schedule.json").read_text())
    optimizer = next(n for n in elbo.values() if n["class_type"] == "FS_ELBOScheduleOptimizer")
    sampler = next(n for n in elbo.values() if n["class_type"] == "SamplerCustom")
    assert optimizer["inputs"]["positive"] == sampler["inputs"]["positive"]


def test_examples_open_readable():
    """Laid out at most ~1600 px wide, so they open at 100 % with their text readable."""
    for path in sorted(EXAMPLES.glob("*.json")):
        nodes = json.loads(path.read_text())["nodes"]
        assert max(n["pos"][0] + n["size"][0] for n in nodes) - min(n["pos"][0] for n in nodes) <= 1600, path.name


def test_a_pool_of_one_latent_is_refused_with_its_count(execution_error):
    prompt = {
        "1": {"class_type": "FSTest_WeightFreeModel", "inputs": {"prediction": "eps"}},
        "2": {"class_type": "FSTest_GaussianLatents", "inputs": {"batch": 1, "mu": 0.5, "s": 0.1, "seed": 0}},
        "3": {"class_type": "FS_DPMOTTargetsFromLatents", "inputs": {
            "model": ["1", 0], "latents": ["2", 0], "sigma_junction": 1.0, "seed": 0, "keep_clean": True}},
        "4": {"class_type": "FS_DPMOTFitMap", "inputs": {"targets": ["3", 0], "iterations": 10, "seed": 0,
                                                         "device": "cpu", "resume": False}},
        "5": {"class_type": "FS_DPMOTSaveMap", "inputs": {"ot_map": ["4", 0], "filename_prefix": "tests/one"}},
    }
    message = execution_error(prompt)
    assert "at least 2 targets" in message and "got a LATENT batch of 1" in message, message
