"""The DDIM-GMM node and its presets inside real ComfyUI."""
import pytest
import torch
from graphs import ancestral_std, check_gaussian, ksampler_graph, sampler_custom_graph

GMM_NODE = {"class_type": "FS_DDIMGMM", "inputs": {
    "eta": 0.5, "eta_convention": "ddim", "components": 8, "scale": 0.9, "scale_units": "relative", "offsets": "ortho",
    "covariance": "strict", "share_across_steps": False, "offset_seed": 0, "skip_last_offsets": 0,
    "on_infeasible": "clamp"}}


@pytest.mark.parametrize("prediction,flow_shift", [("eps", 0.0), ("v", 0.0), ("eps", 3.0)])
def test_sampler_custom_with_the_node(run_prompt, prediction, flow_shift):
    """Strict GMM keeps DDIM(eta)'s moments, so the spread is exact ancestral DDIM's (eps / v; the flow case
    keeps the ODE bound). Before the CPU step noise stopped repeating the initial noise, that repeat
    inflated the spread to pass the ODE's std."""
    captured = run_prompt(sampler_custom_graph({"10": GMM_NODE}, ["10", 0], flow_shift=flow_shift, prediction=prediction))
    expected = None if flow_shift > 0 else ancestral_std(captured["sigmas"], GMM_NODE["inputs"]["eta"])
    check_gaussian(captured["out"], float(captured["sigmas"][-2]), flow=flow_shift > 0, expected_std=expected)


def test_same_seed_same_bits(run_prompt):
    a = run_prompt(sampler_custom_graph({"10": GMM_NODE}, ["10", 0], seed=3))["out"]
    b = run_prompt(sampler_custom_graph({"10": GMM_NODE}, ["10", 0], seed=3))["out"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("preset", ["fs_ddim_eta", "fs_ddim_gmm"])
def test_ksampler_with_a_preset(run_prompt, preset):
    from comfyui_fast_samplers.samplers.presets import PRESET_OPTIONS
    from comfyui_fast_samplers.samplers.schedule import discrete_vp_sigmas, karras_sigmas

    table = discrete_vp_sigmas()  # the SD1.5 model's sigmas; the graph's scheduler is karras, 10 steps
    eta = PRESET_OPTIONS[preset][1]["eta"]
    expected = ancestral_std(karras_sigmas(10, float(table[0]), float(table[-1])), eta) if eta > 0 else None
    check_gaussian(run_prompt(ksampler_graph(preset))["out"], sigma_min=0.0292, expected_std=expected)


def test_strict_preset_keeps_ddim_statistics(run_prompt):
    """At eta = 1 and 10 steps any DDIM kernel loses spread (first-order SDE); strict GMM must lose
    exactly as much as the Gaussian kernel (same first and second moments), no more."""
    gmm = run_prompt(ksampler_graph("fs_ddim_gmm_strict", steps=10))["out"].double()
    gaussian_node = dict(GMM_NODE, inputs=dict(GMM_NODE["inputs"], eta=1.0, components=1))
    prompt = sampler_custom_graph({"10": gaussian_node}, ["10", 0], steps=10, seed=1)
    ddim = run_prompt(prompt)["out"].double()
    assert abs(float(gmm.mean()) / float(ddim.mean()) - 1) < 0.01
    assert abs(float(gmm.std()) / float(ddim.std()) - 1) < 0.1, (float(gmm.std()), float(ddim.std()))


def test_bad_choice_is_named(execution_error):
    bad = dict(GMM_NODE, inputs=dict(GMM_NODE["inputs"], covariance="full"))
    message = execution_error(sampler_custom_graph({"10": bad}, ["10", 0]))
    assert "DDIM-GMM Sampler node" in message and "full" in message
