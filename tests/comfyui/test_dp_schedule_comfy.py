"""The ELBO Schedule Optimizer inside real ComfyUI, feeding SamplerCustom."""
import pytest
import torch
from graphs import check_gaussian, sampler_custom_graph


def _graph(steps=6, latents_node="FSTest_GaussianLatents", flow_shift=0.0):
    g = sampler_custom_graph({"10": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}}, ["10", 0],
                             flow_shift=flow_shift)
    g["20"] = {"class_type": latents_node, "inputs": {"batch": 16, "mu": 0.5, "s": 0.1, "seed": 0}}
    g["21"] = {"class_type": "FS_ELBOScheduleOptimizer", "inputs": {
        "model": ["2", 0], "latents": ["20", 0], "positive": ["3", 0], "steps": steps, "candidates": 100,
        "variance": "small", "decoder": "sigma", "seed": 0, "start_sigma": 0.0, "use_cache": False}}
    g["6"]["inputs"]["sigmas"] = ["21", 0]
    g["8"]["inputs"]["sigmas"] = ["21", 0]
    return g


@pytest.mark.parametrize("flow_shift", [0.0, 3.0])
def test_optimizer_feeds_sampler_custom(run_prompt, comfy, flow_shift):
    captured = run_prompt(_graph(flow_shift=flow_shift))
    sigmas = captured["sigmas"]
    assert len(sigmas) == 7 and sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()
    import comfy.model_sampling  # noqa: F401
    check_gaussian(captured["out"], float(sigmas[-2]), flow=flow_shift > 0)


def test_empty_latents_are_refused(execution_error):
    g = _graph()
    g["20"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}}
    message = execution_error(g)
    assert "ELBO Schedule Optimizer" in message and "constant" in message


def test_second_run_hits_the_cache(run_prompt, tmp_path, monkeypatch):
    """Any step count after the first run costs no model evaluation; the cache write is atomic."""
    import conftest

    import folder_paths

    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    only_optimizer = {k: v for k, v in _graph(steps=6).items() if k in ("1", "2", "3", "20", "21")}
    only_optimizer["21"]["inputs"]["use_cache"] = True
    only_optimizer["30"] = {"class_type": "FSTest_CaptureSigmas", "inputs": {"sigmas": ["21", 0], "label": "sigmas"}}
    before = conftest.MODEL_CALLS["exact"]
    first = run_prompt(only_optimizer)["sigmas"]
    assert conftest.MODEL_CALLS["exact"] - before == 100  # one batched call per candidate
    assert len(list((tmp_path / "fs_dp_schedule_cache").glob("*.safetensors"))) == 1
    assert not list((tmp_path / "fs_dp_schedule_cache").glob("*.tmp"))
    only_optimizer["21"]["inputs"]["steps"] = 9
    calls = conftest.MODEL_CALLS["exact"]
    second = run_prompt(only_optimizer)["sigmas"]
    assert conftest.MODEL_CALLS["exact"] == calls and len(second) == 10 and len(first) == 7


def test_local_error_objective_runs_through_the_node(run_prompt, tmp_path, monkeypatch):
    import conftest

    import folder_paths

    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    g = {k: v for k, v in _graph(steps=4).items() if k in ("1", "2", "3", "20", "21")}
    g["21"]["inputs"].update(candidates=12, objective="local_error", use_cache=True)
    g["30"] = {"class_type": "FSTest_CaptureSigmas", "inputs": {"sigmas": ["21", 0], "label": "sigmas"}}
    before = conftest.MODEL_CALLS["exact"]
    sigmas = run_prompt(g)["sigmas"]
    assert conftest.MODEL_CALLS["exact"] - before == 12 + 4 * 12 * 11 // 2  # G + substeps * G (G - 1) / 2
    assert len(sigmas) == 5 and sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()
    calls = conftest.MODEL_CALLS["exact"]
    assert torch.equal(run_prompt(g)["sigmas"], sigmas) and conftest.MODEL_CALLS["exact"] == calls  # cached
    g["21"]["inputs"]["objective"] = "elbo"  # another objective is another cache entry
    run_prompt(g)
    assert conftest.MODEL_CALLS["exact"] - calls == 12


def test_half_precision_latents_give_the_float32_schedule(run_prompt):
    """fp16 latents (e.g. from a VAE in half precision) are probed in float32: the same SIGMAS, strictly
    decreasing, and a finite report (in float16 they gave a repeated sigma and NaN costs)."""
    g = {k: v for k, v in _graph(steps=6).items() if k in ("1", "2", "3", "20", "21")}
    g["30"] = {"class_type": "FSTest_CaptureSigmas", "inputs": {"sigmas": ["21", 0], "label": "sigmas"}}
    full = run_prompt(g)["sigmas"]
    g["20"]["inputs"]["half"] = True
    half = run_prompt(g)["sigmas"]
    assert (half[1:] < half[:-1]).all(), half
    torch.testing.assert_close(half, full, rtol=1e-3, atol=0)


def test_start_sigma_below_the_models_range_is_explained(execution_error):
    g = _graph()
    g["21"]["inputs"]["start_sigma"] = 0.01  # SD1.5's smallest sigma is 0.0292
    message = execution_error(g)
    assert "ELBO Schedule Optimizer node: start_sigma 0.01" in message and "raise start_sigma" in message, message
