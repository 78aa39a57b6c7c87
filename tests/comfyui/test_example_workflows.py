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
    """With the user's model and image names the graph fails only on those missing files."""
    valid, error, node_errors = validate(json.loads(api.read_text()))
    problems = [e for n in node_errors.values() for e in n["errors"]]
    assert all(e["type"] in ("value_not_in_list", "custom_validation_failed")
               and any(k in e["details"] for k in ("ckpt_name", "image")) for e in problems), problems
