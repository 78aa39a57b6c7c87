"""Tier 2: the pack inside a real ComfyUI, in process, on the CPU.

Skipped unless COMFYUI_PATH points at a ComfyUI checkout (v0.3.64 or newer) whose requirements
are installed in the running Python. ComfyUI loads the pack the way it loads any custom-node
folder; test-only helper nodes (prefix FSTest_) give a weight-free SD1.5-shaped MODEL, zero
CONDITIONING, an exact Gaussian denoiser and a latent capture."""
from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
REPO = Path(__file__).resolve().parents[2]

SKIP_REASON = ("ComfyUI tier: COMFYUI_PATH is not set (scripts/test.sh sets it from ../shared/comfyui; "
               "see README 'Tests')")


def pytest_collection_modifyitems(config, items):
    """Without a ComfyUI every test of this folder is reported as skipped, never silently dropped."""
    if COMFYUI_PATH:
        return
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))

CAPTURED: dict = {}
MODEL_CALLS = {"exact": 0}  # evaluations of the exact-Gaussian test model


def _test_nodes():
    import torch

    import comfy.model_sampling
    import comfy.sd

    class WeightFreeModel:
        """An SD1.5-detected UNet with one block per level and seeded random weights (no file)."""
        _cache = {}

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"prediction": (["eps", "v"],)}}

        RETURN_TYPES = ("MODEL",)
        FUNCTION = "load"
        CATEGORY = "testing"

        def load(self, prediction):
            if prediction not in self._cache:
                from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
                import comfy.ops

                net = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4,
                                num_res_blocks=[1], channel_mult=[1],
                                num_head_channels=-1, num_heads=8, transformer_depth=[1], transformer_depth_output=[0, 0],
                                transformer_depth_middle=-1, context_dim=768, use_spatial_transformer=True,
                                use_linear_in_transformer=False, operations=comfy.ops.disable_weight_init)
                g = torch.Generator().manual_seed(0)
                sd = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in net.state_dict().items()}
                model = comfy.sd.load_diffusion_model_state_dict(sd)
                if model is None:
                    raise RuntimeError("weight-free UNet was not detected as a diffusion model")
                if prediction == "v":
                    model = _patch_sampling(model, comfy.model_sampling.V_PREDICTION, comfy.model_sampling.ModelSamplingDiscrete)
                self._cache[prediction] = model
            return (self._cache[prediction],)

    class ZeroConditioning:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "make"
        CATEGORY = "testing"

        def make(self):
            return ([[torch.zeros(1, 77, 768), {}]],)

    class ExactGaussianModel:
        """Clone of MODEL whose network returns the exact posterior mean for x0 ~ N(mu, s^2) in
        the model's own latent space (eps/v: x = x0 + sigma eps; flow: x = (1-sigma) x0 + sigma eps)."""

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",), "mu": ("FLOAT", {"default": 0.5, "min": -10, "max": 10}),
                                 "s": ("FLOAT", {"default": 0.1, "min": 0.001, "max": 10}),
                                 "flow_shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0})}}

        RETURN_TYPES = ("MODEL",)
        FUNCTION = "patch"
        CATEGORY = "testing"

        def patch(self, model, mu, s, flow_shift):
            m = model
            if flow_shift > 0:
                m = _patch_sampling(m, comfy.model_sampling.CONST, comfy.model_sampling.ModelSamplingDiscreteFlow,
                                    shift=flow_shift)
            else:
                m = m.clone()
            flow = flow_shift > 0

            def exact(apply_model, args):
                MODEL_CALLS["exact"] += 1
                x = args["input"]  # ComfyUI passes the k-diffusion sigma as "timestep" here
                sig = args["timestep"].reshape(-1, *([1] * (x.ndim - 1))).to(torch.float64)
                x64 = x.to(torch.float64)
                if flow:
                    a = 1.0 - sig
                    x0 = mu + a * s**2 * (x64 - a * mu) / (a**2 * s**2 + sig**2)
                else:
                    x0 = (s**2 * x64 + sig**2 * mu) / (s**2 + sig**2)
                # the wrapper must return the denoised x0 the way the network output would give it
                return x0.to(x.dtype)

            m.set_model_unet_function_wrapper(exact)
            return (m,)

    class CaptureLatent:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"samples": ("LATENT",), "label": ("STRING", {"default": "out"})}}

        RETURN_TYPES = ()
        FUNCTION = "capture"
        OUTPUT_NODE = True
        CATEGORY = "testing"

        def capture(self, samples, label):
            CAPTURED[label] = samples["samples"].clone()
            return {"ui": {"captured": [label]}}

    class CaptureSigmas:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"sigmas": ("SIGMAS",), "label": ("STRING", {"default": "sigmas"})}}

        RETURN_TYPES = ()
        FUNCTION = "capture"
        OUTPUT_NODE = True
        CATEGORY = "testing"

        def capture(self, sigmas, label):
            CAPTURED[label] = sigmas.clone()
            return {"ui": {"captured": [label]}}

    class GaussianLatents:
        """Clean 'VAE-space' latents whose model-space values are N(mu, s^2) (SD1 scale)."""

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"batch": ("INT", {"default": 16, "min": 1}), "mu": ("FLOAT", {"default": 0.5}),
                                 "s": ("FLOAT", {"default": 0.1}), "seed": ("INT", {"default": 0})},
                    "optional": {"half": ("BOOLEAN", {"default": False})}}

        RETURN_TYPES = ("LATENT",)
        FUNCTION = "make"
        CATEGORY = "testing"

        def make(self, batch, mu, s, seed, half=False):
            x = mu + s * torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
            return ({"samples": (x / 0.18215).to(torch.float16 if half else torch.float32)},)

    return {"FSTest_GaussianLatents": GaussianLatents, "FSTest_WeightFreeModel": WeightFreeModel, "FSTest_ZeroConditioning": ZeroConditioning,
            "FSTest_ExactGaussianModel": ExactGaussianModel, "FSTest_CaptureLatent": CaptureLatent,
            "FSTest_CaptureSigmas": CaptureSigmas}


def _patch_sampling(model, prediction, sampling, **settings):
    """A clone with another model_sampling (the pattern of comfy_extras/nodes_model_advanced.py)."""
    class PatchedSampling(sampling, prediction):
        pass

    m = model.clone()
    ms = PatchedSampling(m.model.model_config)
    if settings:
        ms.set_parameters(**settings)
    m.add_object_patch("model_sampling", ms)
    return m


class _ServerStub:
    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def send_sync(self, *args, **kwargs):
        pass

    def queue_updated(self):
        pass


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """Loads ComfyUI's nodes and the pack once per session; returns ComfyUI's `nodes` module."""
    sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import utils.install_util  # noqa: F401  (before `nodes`, which shadows `utils`)
    import folder_paths
    import nodes

    parent = tmp_path_factory.mktemp("custom_nodes")
    (parent / "comfyui-fast-samplers").symlink_to(REPO, target_is_directory=True)
    folder_paths.add_model_folder_path("custom_nodes", str(parent))
    for name in ("user", "output", "temp"):  # nothing is written into the ComfyUI checkout
        getattr(folder_paths, f"set_{name}_directory")(str(tmp_path_factory.mktemp(name)))
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    if "FS_ERSDESolver" not in nodes.NODE_CLASS_MAPPINGS:
        raise RuntimeError("the pack did not load into ComfyUI (see 'IMPORT FAILED' in the log above)")
    nodes.NODE_CLASS_MAPPINGS.update(_test_nodes())
    return nodes


@pytest.fixture(scope="session")
def validate(comfy):
    import execution

    def run(prompt: dict):
        """(valid, error, node_errors) for an API-format prompt."""
        valid, error, _outputs, node_errors = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        return valid, error, node_errors

    return run


def _execute(prompt: dict):
    """Validates (raising with ComfyUI's node errors) and executes a prompt with a fresh cache;
    returns the executor (success flag and status events)."""
    import execution

    executor = execution.PromptExecutor(_ServerStub(), cache_type=execution.CacheType.CLASSIC)
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise AssertionError(f"prompt failed validation: {error} {node_errors}")
    CAPTURED.clear()
    asyncio.run(executor.execute_async(prompt, prompt_id, {}, outputs))
    return executor


def _errors(executor) -> list:
    return [data for event, data in executor.status_messages if event == "execution_error"]


@pytest.fixture(scope="session")
def run_prompt(comfy):
    """Executes an API-format prompt that must succeed; returns CAPTURED (label -> tensor)."""

    def run(prompt: dict) -> dict:
        executor = _execute(prompt)
        if not executor.success:
            errors = _errors(executor)
            raise RuntimeError(f"prompt failed: {errors[0]['exception_message'] if errors else executor.status_messages}")
        return dict(CAPTURED)

    return run


@pytest.fixture(scope="session")
def execution_error(comfy):
    """Executes a valid prompt that must fail at run time; returns the exception message."""

    def run(prompt: dict) -> str:
        executor = _execute(prompt)
        assert not executor.success, "the prompt was expected to fail"
        return _errors(executor)[0]["exception_message"]

    return run


@pytest.fixture(scope="session")
def run_prompt_events(comfy):
    """Executes a valid prompt and returns ComfyUI's status events [(event, data), ...]."""

    def run(prompt: dict) -> list:
        return _execute(prompt).status_messages

    return run


@pytest.fixture
def hook(comfy):
    """The global progress hook main.py installs: records updates and honours interruption;
    latent2rgb previews switched on."""
    import comfy.cli_args
    import comfy.model_management
    import comfy.utils

    updates = []
    interrupt_at = {"step": None}

    def progress(value, total, preview, node_id=None):
        updates.append((value, total, preview))
        if value == interrupt_at["step"]:
            comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()

    old_method = comfy.cli_args.args.preview_method
    comfy.cli_args.args.preview_method = comfy.cli_args.LatentPreviewMethod.Latent2RGB
    comfy.utils.set_progress_bar_global_hook(progress)
    yield updates, interrupt_at
    comfy.utils.set_progress_bar_global_hook(None)
    comfy.cli_args.args.preview_method = old_method
    comfy.model_management.interrupt_current_processing(False)
