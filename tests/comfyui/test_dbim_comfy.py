"""Tier 2: the bridge nodes inside a real ComfyUI (in process, CPU), with the tiny toy bridge model."""
import shutil
from pathlib import Path

import pytest
import torch

ASSET = Path(__file__).resolve().parents[1] / "assets" / "toy_bridge_vp16.safetensors"
IMAGES: dict = {}


@pytest.fixture(scope="module")
def bridge_env(comfy, tmp_path_factory):
    """A models folder holding the toy model, an input folder with a toy edge map and target, and an
    IMAGE capture node."""
    import folder_paths
    from PIL import Image

    from comfyui_fast_samplers.testbeds.bridges import toy_pairs

    models = tmp_path_factory.mktemp("bridge_models")
    shutil.copy(ASSET, models / "toy.safetensors")
    folder_paths.add_model_folder_path("fs_bridge_models", str(models))
    inputs = tmp_path_factory.mktemp("input")
    old_dirs = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    folder_paths.set_input_directory(str(inputs))
    folder_paths.set_output_directory(str(tmp_path_factory.mktemp("output")))
    x0, x_T, _ = toy_pairs(1, torch.Generator().manual_seed(3))
    for name, x in (("edges.png", x_T), ("target.png", x0)):
        pixels = (((x[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1) * 255).round().byte().numpy()
        Image.fromarray(pixels).save(inputs / name)

    class CaptureImage:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"images": ("IMAGE",), "label": ("STRING", {"default": "out"})}}

        RETURN_TYPES = ()
        FUNCTION = "capture"
        OUTPUT_NODE = True
        CATEGORY = "testing"

        def capture(self, images, label):
            IMAGES[label] = images.clone()
            return {}

    comfy.NODE_CLASS_MAPPINGS["FSTest_CaptureImage"] = CaptureImage
    yield
    folder_paths.set_input_directory(old_dirs[0])
    folder_paths.set_output_directory(old_dirs[1])


LOADER = {"class_type": "FS_BridgeModelLoader", "inputs": {
    "ckpt_name": "toy.safetensors", "preset": "auto", "dtype": "fp32", "save_safetensors": False,
    "custom_schedule": "vp", "beta_d": 2.0, "beta_min": 0.1, "sigma_max": 80.0, "attention_order": "auto"}}
COMMON = {"nfe": 10, "order": 1, "grid": "uniform_t", "size": "resize_to_model", "class_label": 0}


def _sampler(**overrides):
    inputs = {"bridge_model": ["2", 0], "condition": ["1", 0], "seed": 5, "sampler": "dbim", "eta": 0.0,
              "churn_step_ratio": 0.33, "clip_denoised": True, "paste_known": False, **COMMON}
    inputs.update(overrides)
    return {"class_type": "FS_BridgeSampler", "inputs": inputs}


def test_load_sample_save(bridge_env, run_prompt):
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}, "2": LOADER, "3": _sampler(),
              "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "fs_bridge_test"}},
              "5": {"class_type": "FSTest_CaptureImage", "inputs": {"images": ["3", 0], "label": "a"}}}
    run_prompt(prompt)
    first = IMAGES["a"]
    assert first.shape == (1, 16, 16, 3) and 0 <= float(first.min()) and float(first.max()) <= 1
    run_prompt(prompt)
    assert torch.equal(IMAGES["a"], first)  # same seed, same bits
    for options in (dict(sampler="dbim_high_order", order=3), dict(sampler="ddbm_heun", nfe=20),
                    dict(eta=0.5, seed=6)):
        run_prompt({**prompt, "3": _sampler(**options)})
        assert IMAGES["a"].shape == first.shape


def test_encode_then_interpolate_gives_all_frames(bridge_env, run_prompt):
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}},
              "2": LOADER,
              "5": {"class_type": "LoadImage", "inputs": {"image": "target.png"}},
              "6": {"class_type": "FS_BridgeEncode", "inputs": {"bridge_model": ["2", 0], "condition": ["1", 0],
                                                                "target": ["5", 0], **COMMON}},
              "7": {"class_type": "FS_BridgeInterpolate", "inputs": {
                  "bridge_model": ["2", 0], "condition": ["1", 0], "frames": 5, "seed_a": 0, "seed_b": 1,
                  "latent_a": ["6", 0], **COMMON}},
              "8": {"class_type": "FSTest_CaptureImage", "inputs": {"images": ["7", 0], "label": "frames"}},
              "9": {"class_type": "FS_BridgeSampler", "inputs": {**_sampler()["inputs"], "latent": ["6", 0]}},
              "10": {"class_type": "FSTest_CaptureImage", "inputs": {"images": ["9", 0], "label": "rec"}}}
    run_prompt(prompt)
    assert IMAGES["frames"].shape == (5, 16, 16, 3)
    assert torch.equal(IMAGES["frames"][0], IMAGES["rec"][0])  # frame 0 decodes latent_a


def test_wrong_inputs_give_clear_errors(bridge_env, execution_error):
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}, "2": LOADER,
              "3": _sampler(sampler="dbim_high_order", order=1),
              "5": {"class_type": "FSTest_CaptureImage", "inputs": {"images": ["3", 0], "label": "a"}}}
    assert "order 2 or 3" in execution_error(prompt)
    prompt["3"] = _sampler(mask=["10", 0])
    prompt["10"] = {"class_type": "FS_BridgeCentreMask", "inputs": {"image": ["1", 0]}}
    assert "only for inpainting models" in execution_error(prompt)


def test_bridge_sampler_progress_previews_and_interrupt(bridge_env, run_prompt, run_prompt_events, hook):
    """The Bridge Sampler drives ComfyUI's progress bar each step and stops when interrupted."""
    updates, interrupt_at = hook
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}, "2": LOADER, "3": _sampler(),
              "5": {"class_type": "FSTest_CaptureImage", "inputs": {"images": ["3", 0], "label": "a"}}}
    run_prompt(prompt)
    steps = [u for u in updates if u[1] == updates[-1][1]]
    assert [u[0] for u in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 5
    updates.clear()
    interrupt_at["step"] = 2
    events = run_prompt_events({**prompt, "3": _sampler(seed=9)})
    assert any(event == "execution_interrupted" for event, _ in events)
    assert max(u[0] for u in updates) == 2


def test_loader_reads_a_pt_copy_and_explains_unreadable_files(bridge_env, run_prompt, execution_error):
    """A .pt copy of the toy model loads with preset custom (torch.load weights_only=True) and gives the
    safetensors model's image; a truncated file and a pickle of Python objects give the loader's own
    message naming the file, never a hint to load with weights_only=False."""
    import folder_paths

    from comfyui_fast_samplers.samplers.bridges.dbim import load_bridge_checkpoint

    models = Path(folder_paths.get_folder_paths("fs_bridge_models")[-1])
    state_dict, _ = load_bridge_checkpoint(ASSET)
    torch.save(state_dict, models / "toy_copy.pt")
    (models / "toy_cut.safetensors").write_bytes(ASSET.read_bytes()[:4000])
    torch.save({"weight": torch.ones(2), "extra": _Pickled()}, models / "objects.pt")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}, "2": LOADER, "3": _sampler(),
              "5": {"class_type": "FSTest_CaptureImage", "inputs": {"images": ["3", 0], "label": "a"}}}
    run_prompt(prompt)
    reference = IMAGES["a"]
    copy = {**LOADER, "inputs": {**LOADER["inputs"], "ckpt_name": "toy_copy.pt", "preset": "custom"}}
    run_prompt({**prompt, "2": copy})
    assert torch.equal(IMAGES["a"], reference)
    for name, words in (("toy_cut.safetensors", "truncated"), ("objects.pt", "only reads plain tensors")):
        broken = {**LOADER, "inputs": {**LOADER["inputs"], "ckpt_name": name}}
        message = execution_error({**prompt, "2": broken})
        assert f"Bridge Model Loader: {name}" in message and words in message, message
        assert "weights_only" not in message, message


class _Pickled:  # any class: weights_only loading refuses it
    pass


def test_nan_image_and_oversized_blur_give_the_nodes_message(bridge_env, comfy, execution_error, run_prompt):
    class NaNImage:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"image": ("IMAGE",)}}

        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "poison"
        CATEGORY = "testing"

        def poison(self, image):
            image = image.clone()
            image[0, 3, 5, 1] = float("nan")
            return (image,)

    comfy.NODE_CLASS_MAPPINGS["FSTest_NaNImage"] = NaNImage
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}, "2": LOADER,
              "4": {"class_type": "FSTest_NaNImage", "inputs": {"image": ["1", 0]}},
              "3": _sampler(condition=["4", 0]),
              "5": {"class_type": "FSTest_CaptureImage", "inputs": {"images": ["3", 0], "label": "a"}}}
    message = execution_error(prompt)
    assert "Bridge Sampler node: the condition image contains NaN" in message, message
    edges = {"1": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}},
             "6": {"class_type": "FS_BridgeEdgeMap", "inputs": {"image": ["1", 0], "low_threshold": 0.1,
                                                                "high_threshold": 0.2, "blur_sigma": 6.0,
                                                                "thickness": 0}},
             "7": {"class_type": "FSTest_CaptureImage", "inputs": {"images": ["6", 0], "label": "edges"}}}
    message = execution_error(edges)
    assert "Bridge Edge Map: blur_sigma 6.0" in message and "16x16 image" in message, message
    edges["6"]["inputs"]["blur_sigma"] = 5.0  # a 31x31 blur still fits a 16-pixel side
    run_prompt(edges)
    assert IMAGES["edges"].shape == (1, 16, 16, 3)
