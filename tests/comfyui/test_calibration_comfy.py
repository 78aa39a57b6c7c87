"""The Schedule Calibrator inside real ComfyUI: EmptyLatentImage -> Calibrator -> SamplerCustom, with the pack's
sampler and with ComfyUI's own, the cache, and errors that name the node."""
import pytest
import torch
from graphs import check_gaussian, sampler_custom_graph


def _graph(sampler_name="fs_er_sde_ode_3_unic", steps=4, flow_shift=0.0, use_cache=False):
    g = sampler_custom_graph({"10": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler_name}}},
                             ["21", 1], steps=steps, flow_shift=flow_shift, size=32)
    g["21"] = {"class_type": "FS_ScheduleCalibrator", "inputs": {
        "model": ["2", 0], "sampler": ["10", 0], "latent": ["4", 0], "steps": steps, "noises": 8,
        "calibration_seed": 0, "teacher_accuracy": "fast", "candidates": 16, "positive": ["3", 0], "cfg": 1.0,
        "use_cache": use_cache}}
    g["6"]["inputs"]["sigmas"] = ["21", 0]
    g["8"]["inputs"]["sigmas"] = ["21", 0]
    g["9"] = {"class_type": "FSTest_CaptureSigmas", "inputs": {"sigmas": ["5", 0], "label": "stock"}}
    return g


@pytest.mark.parametrize("sampler_name,flow_shift", [("fs_er_sde_ode_3_unic", 0.0), ("uni_pc", 0.0),
                                                     ("fs_er_sde_ode_3_unic", 3.0)])
def test_calibrated_sigmas_feed_sampler_custom(run_prompt, sampler_name, flow_shift):
    captured = run_prompt(_graph(sampler_name, flow_shift=flow_shift))
    sigmas = captured["sigmas"]
    assert sigmas.dtype == torch.float32 and len(sigmas) == 5 and sigmas[-1] == 0
    assert (sigmas[1:] < sigmas[:-1]).all() and float(sigmas[0]) == pytest.approx(float(captured["stock"][0]))
    check_gaussian(captured["out"], float(sigmas[-2]), flow=flow_shift > 0)


def _exact_ode_error(captured):
    """error(label): mean distance of a captured latent (the graph's seed 7, batch 2, 32 x 32) to the exact
    answer for N(mu, s^2) data on an eps model: the probability-flow ODE from ComfyUI's start
    x_T = noise sqrt(1 + sigma_T^2) to sigma_min, then the denoise, is mu + (x_T - mu) s^2 /
    (sqrt(s^2 + sigma_min^2) sqrt(s^2 + sigma_T^2))."""
    import comfy.model_sampling
    import comfy.sample
    from graphs import MU, S, SD1_SCALE

    ms = comfy.model_sampling.ModelSamplingDiscrete()
    sigma_t, sigma_min = float(ms.sigma_max), float(ms.sigma_min)
    noise = comfy.sample.prepare_noise(torch.zeros(2, 4, 4, 4), 7).to(torch.float64)
    x_t = noise * (1 + sigma_t**2) ** 0.5
    exact = MU + (x_t - MU) * S**2 / ((S**2 + sigma_min**2) ** 0.5 * (S**2 + sigma_t**2) ** 0.5)
    return lambda label: float((captured[label].to(torch.float64) * SD1_SCALE - exact).flatten(1).norm(dim=1).mean())


def test_calibrated_euler_beats_karras_against_the_exact_ode(run_prompt, comfy):
    """Euler at 4 steps on the calibrated schedule (with its step tuning) must be much closer to the exact
    ODE (``_exact_ode_error``) than on karras (measured: about 4x without the tuning)."""
    g = _graph("euler")
    g["11"] = dict(g["6"], inputs=dict(g["6"]["inputs"], sigmas=["5", 0]))
    g["12"] = {"class_type": "FSTest_CaptureLatent", "inputs": {"samples": ["11", 0], "label": "karras"}}
    captured = run_prompt(g)
    error = _exact_ode_error(captured)
    assert error("out") < 0.5 * error("karras"), (error("out"), error("karras"))


@pytest.mark.parametrize("sampler_name,gain", [("fs_er_sde_ode_3_unic", 0.3), ("euler", 0.1)])
def test_step_tuning_travels_in_the_sampler_output(run_prompt, comfy, sampler_name, gain):
    """A sampler calibrated with and without 'tune steps' (the pack's ODE preset; ComfyUI's euler, through the
    tuned-model wrapper): the SAMPLER output carries the tuning into SamplerCustom, and with it the result is
    closer to the exact ODE (``_exact_ode_error``; measured at 3 steps 0.00019 vs 0.0029, and for euler 0.00026
    vs 0.235: on Gaussian data the denoiser is linear in x, which three numbers a step nearly fit exactly)."""
    g = _graph(sampler_name, steps=3)
    g["21"]["inputs"].update(noises=32, candidates=24)
    g["22"] = dict(g["21"], inputs=dict(g["21"]["inputs"], tune_steps=False))
    g["11"] = dict(g["6"], inputs=dict(g["6"]["inputs"], sampler=["22", 1], sigmas=["22", 0]))
    g["12"] = {"class_type": "FSTest_CaptureLatent", "inputs": {"samples": ["11", 0], "label": "untuned"}}
    g["13"] = {"class_type": "FSTest_CaptureSigmas", "inputs": {"sigmas": ["22", 0], "label": "untuned sigmas"}}
    captured = run_prompt(g)
    assert len(captured["sigmas"]) == len(captured["untuned sigmas"]) == 4  # the tuning may move the schedule
    error = _exact_ode_error(captured)
    assert error("out") < gain * error("untuned"), (error("out"), error("untuned"))


def test_discrete_model_schedule_is_on_its_table(run_prompt, comfy):
    import comfy.model_sampling  # noqa: F401

    sigmas = run_prompt(_graph("euler"))["sigmas"]
    table = comfy.model_sampling.ModelSamplingDiscrete().sigmas
    assert all(bool(torch.isclose(table, s, rtol=1e-6, atol=0).any()) for s in sigmas[:-1])


def test_second_run_hits_the_cache(run_prompt, tmp_path, monkeypatch):
    import conftest

    import folder_paths

    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    g = _graph(use_cache=True)
    first = run_prompt(g)["sigmas"]
    assert len(list((tmp_path / "fs_calibration_cache").glob("*.safetensors"))) == 1
    assert not list((tmp_path / "fs_calibration_cache").glob("*.tmp"))
    only = {k: v for k, v in g.items() if k in ("1", "2", "3", "4", "10", "21")}
    only["30"] = {"class_type": "FSTest_CaptureSigmas", "inputs": {"sigmas": ["21", 0], "label": "sigmas"}}
    calls = conftest.MODEL_CALLS["exact"]
    assert torch.equal(run_prompt(only)["sigmas"], first) and conftest.MODEL_CALLS["exact"] == calls


def test_stochastic_sampler_is_refused_with_the_node_name(execution_error):
    message = execution_error(_graph("euler_ancestral"))
    assert "Schedule Calibrator" in message and "stochastic" in message


def test_nan_model_output_is_refused(execution_error, comfy):
    g = _graph("euler")
    g["2"]["inputs"]["mu"] = float("nan")
    message = execution_error(g)
    assert "Schedule Calibrator" in message and "NaN" in message


def test_zero_steps_fail_validation(validate):
    valid, _, node_errors = validate(_graph(steps=0))
    assert not valid and "21" in node_errors


def test_noise_extrapolation_is_comfyuis_gradient_estimation(comfy):
    """On a VE model, ComfyUI's euler through the tuned-model wrapper with noise extrapolation k = 1 on every
    step but the first and the last equals ComfyUI's gradient_estimation (ge_gamma = 2: Euler on
    d + (d - d_prev)), an independent reference; k = 0.5 matches ge_gamma = 1.5. Unequal (Karras) grid."""
    from comfy.k_diffusion import sampling

    from comfyui_fast_samplers.samplers import sample_tuned
    from comfyui_fast_samplers.samplers.schedule import karras_sigmas
    from comfyui_fast_samplers.testbeds.mixtures import ExactModel, default_mixture

    model = ExactModel(default_mixture(), "ve")
    sigmas = karras_sigmas(6, 0.03, 14.6).to(torch.float64)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 14.6
    for k in (1.0, 0.5):
        expected = sampling.sample_gradient_estimation(model, x.clone(), sigmas, disable=True, ge_gamma=1 + k)
        tuned = sample_tuned(model, x.clone(), sigmas, sampler=sampling.sample_euler, disable=True,
                             step_tuning={"noise_extrapolation": [0.0] + [k] * 4 + [0.0]})
        torch.testing.assert_close(tuned, expected, rtol=1e-10, atol=1e-10)
    assert (expected - sampling.sample_euler(model, x.clone(), sigmas, disable=True)).abs().max() > 1e-2
