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


DDIM_GMM_PRESETS = ["fs_ddim_eta", "fs_ddim_gmm", "fs_ddim_gmm_strict"]


def test_every_ddim_gmm_preset_is_tested():
    from comfyui_fast_samplers.samplers.ddim_gmm import sample_ddim_gmm
    from comfyui_fast_samplers.samplers.presets import PRESET_OPTIONS

    assert sorted(n for n, (fn, _) in PRESET_OPTIONS.items() if fn is sample_ddim_gmm) == sorted(DDIM_GMM_PRESETS)


@pytest.mark.parametrize("preset", DDIM_GMM_PRESETS)
@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_ksampler_with_a_preset(run_prompt, preset, kind):
    """Each dropdown entry through the stock KSampler on the weight-free model (eps, and the same
    model patched to flow, shift 3, on 'simple'): its output statistics equal the Gaussian
    DDIM(eta) kernel's (the node with components = 1, same eta, seed and sigmas, through
    SamplerCustom), and at eta < 1 the exact answer (at eta = 1 and 10 steps any first-order DDIM
    kernel loses about 30% of the spread, so only the comparison is asserted there)."""
    from comfyui_fast_samplers.samplers.presets import PRESET_OPTIONS

    eta = PRESET_OPTIONS[preset][1]["eta"]
    prompt = ksampler_graph(preset)
    if kind == "flow":
        prompt["2"]["inputs"]["flow_shift"] = 3.0
        prompt["5"]["inputs"]["scheduler"] = "simple"
    scheduler = prompt["5"]["inputs"]["scheduler"]
    prompt["8"] = {"class_type": "BasicScheduler", "inputs": {"model": ["2", 0], "scheduler": scheduler,
                                                              "steps": prompt["5"]["inputs"]["steps"], "denoise": 1.0}}
    prompt["9"] = {"class_type": "FSTest_CaptureSigmas", "inputs": {"sigmas": ["8", 0], "label": "sigmas"}}
    captured = run_prompt(prompt)
    out, sigma_min = captured["out"].double(), float(captured["sigmas"][-2])
    gaussian_node = dict(GMM_NODE, inputs=dict(GMM_NODE["inputs"], eta=eta, components=1))
    ddim = run_prompt(sampler_custom_graph({"10": gaussian_node}, ["10", 0], steps=10, seed=1,
                                           flow_shift=3.0 if kind == "flow" else 0.0))["out"].double()
    assert abs(float(out.mean()) / float(ddim.mean()) - 1) < 0.01
    assert abs(float(out.std()) / float(ddim.std()) - 1) < 0.1, (float(out.std()), float(ddim.std()))
    if eta < 1:  # eps: the exact ancestral-DDIM spread; flow keeps the ODE's bound
        expected = ancestral_std(captured["sigmas"], eta) if kind == "eps" and eta > 0 else None
        check_gaussian(out, sigma_min, flow=kind == "flow", expected_std=expected)


def test_bad_choice_is_named(execution_error):
    bad = dict(GMM_NODE, inputs=dict(GMM_NODE["inputs"], covariance="full"))
    message = execution_error(sampler_custom_graph({"10": bad}, ["10", 0]))
    assert "DDIM-GMM Sampler node" in message and "full" in message
