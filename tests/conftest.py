import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors (exact models): extra torch threads only contend on the shared 2-core machines
    (10-100x slower when the box is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


class _Patcher:
    def __init__(self, model_sampling, latent_format=None):
        self.objects = {"model_sampling": model_sampling, "latent_format": latent_format}

    def get_model_object(self, name):
        return self.objects[name]


class ComfyLikeModel:
    """Mimics what ComfyUI passes to a sampler function: a callable whose
    ``inner_model.model_patcher.get_model_object("model_sampling")`` is the model's sampling
    object, here an instance of a class named like ComfyUI's prediction types (EPS, CONST...)."""

    def __init__(self, denoiser, prediction_class: str, latent_format: str = "SD15"):
        prediction = type(prediction_class, (), {})
        self.model_sampling = type("ModelSamplingFake", (prediction,), {})()
        self.inner_model = type("Guider", (), {})()
        self.inner_model.model_patcher = _Patcher(self.model_sampling, type(latent_format, (), {})())
        self.denoiser = denoiser

    def __call__(self, x, sigma, **extra_args):
        return self.denoiser(x, sigma, **extra_args)


@pytest.fixture
def comfy_like():
    return ComfyLikeModel
