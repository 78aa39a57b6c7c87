"""DPM-OT inside real ComfyUI: pool -> fit -> save -> load -> SamplerCustomAdvanced, on the exact model."""
import pytest
import torch
from graphs import MU, S, SD1_SCALE


@pytest.fixture
def map_folder(tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "fs_ot_maps", ([str(tmp_path)], {".safetensors"}))
    folder_paths.filename_list_cache.pop("fs_ot_maps", None)
    return tmp_path


def _model_nodes(flow_shift=0.0):
    return {
        "1": {"class_type": "FSTest_WeightFreeModel", "inputs": {"prediction": "eps"}},
        "2": {"class_type": "FSTest_ExactGaussianModel", "inputs": {"model": ["1", 0], "mu": MU, "s": S,
                                                                     "flow_shift": flow_shift}},
        "3": {"class_type": "FSTest_ZeroConditioning", "inputs": {}},
    }


def _fit_graph(sigma_junction, targets_node=None):
    g = _model_nodes()
    g["20"] = {"class_type": "FSTest_GaussianLatents", "inputs": {"batch": 16, "mu": MU, "s": S, "seed": 3}}
    g["21"] = targets_node or {"class_type": "FS_DPMOTTargetsFromLatents", "inputs": {
        "model": ["2", 0], "latents": ["20", 0], "sigma_junction": sigma_junction, "seed": 0, "keep_clean": True}}
    g["22"] = {"class_type": "FS_DPMOTFitMap", "inputs": {"targets": ["21", 0], "iterations": 200, "seed": 0,
                                                          "device": "cpu", "resume": True}}
    g["23"] = {"class_type": "FS_DPMOTSaveMap", "inputs": {"ot_map": ["22", 0], "filename_prefix": "tests/pool"}}
    return g


def _sample_graph(map_name, steps=3, seed=11, flow_shift=0.0, finisher="euler"):
    g = _model_nodes(flow_shift)
    g.update({
        "30": {"class_type": "FS_DPMOTLoadMap", "inputs": {"map_name": map_name}},
        "31": {"class_type": "FS_DPMOTSampler", "inputs": {"ot_map": ["30", 0], "finisher": finisher,
                                                           "placement": "target", "angle_threshold": 0.7,
                                                           "pair_weight": 0.75}},
        "32": {"class_type": "FS_DPMOTSigmas", "inputs": {"model": ["2", 0], "ot_map": ["30", 0],
                                                          "scheduler": "karras", "steps": steps}},
        "33": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "34": {"class_type": "BasicGuider", "inputs": {"model": ["2", 0], "conditioning": ["3", 0]}},
        "35": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
        "36": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["33", 0], "guider": ["34", 0],
                                                                 "sampler": ["31", 0], "sigmas": ["32", 0],
                                                                 "latent_image": ["35", 0]}},
        "37": {"class_type": "FSTest_CaptureLatent", "inputs": {"samples": ["36", 0], "label": "out"}},
        "38": {"class_type": "FSTest_CaptureSigmas", "inputs": {"sigmas": ["32", 0], "label": "sigmas"}},
    })
    return g


def test_pool_fit_save_load_and_sample(run_prompt, map_folder, comfy):
    import conftest
    from comfyui_fast_samplers.samplers.dpm_ot import assign_targets, load_ot_map

    import comfy.sample

    run_prompt(_fit_graph(0.05))
    saved = sorted(map_folder.glob("tests/pool_*.safetensors"))
    assert [p.name for p in saved] == ["pool_00001.safetensors"] and not list(map_folder.rglob("*.tmp"))
    ot_map = load_ot_map(saved[0])
    assert ot_map.model_sampling == "eps" and ot_map.latent_format == "SD15" and ot_map.n_targets == 16
    assert int(ot_map.info["fit_empty"]) == 0
    run_prompt(_fit_graph(0.05))  # never overwrites: a second file
    assert len(list(map_folder.glob("tests/pool_*.safetensors"))) == 2

    before = conftest.MODEL_CALLS["exact"]
    captured = run_prompt(_sample_graph("tests/pool_00001.safetensors", steps=3))
    assert conftest.MODEL_CALLS["exact"] - before == 3  # the finisher's steps; the map makes no call
    sigmas = captured["sigmas"]
    assert float(sigmas[0]) == pytest.approx(0.05) and len(sigmas) == 4 and float(sigmas[-1]) == 0.0
    out = captured["out"].to(torch.float64) * SD1_SCALE
    noise = comfy.sample.prepare_noise(torch.zeros(4, 4, 8, 8), 11)
    chosen = assign_targets(ot_map, noise)
    clean = ot_map.clean.to(torch.float64)
    distances = torch.cdist(out.reshape(4, -1), clean.reshape(16, -1))
    assert torch.equal(distances.argmin(1), chosen)  # the image is the pool member the map picked for this noise
    assert bool((distances.min(1).values < 0.5 * distances.sort(1).values[:, 1]).all())


def test_self_generated_and_inverted_pools(run_prompt, map_folder):
    import conftest

    g = _fit_graph(1.0, {"class_type": "FS_DPMOTTargetsSelfGenerate", "inputs": {
        "model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0], "cfg": 1.0, "sampler": ["40", 0],
        "sigmas": ["41", 0], "latent": ["42", 0], "sigma_junction": 1.0, "count": 6, "batch_size": 4, "seed": 0}})
    g["40"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["41"] = {"class_type": "BasicScheduler", "inputs": {"model": ["2", 0], "scheduler": "karras", "steps": 10,
                                                          "denoise": 1.0}}
    g["42"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    g["43"] = {"class_type": "FSTest_CaptureSigmas", "inputs": {"sigmas": ["41", 0], "label": "pool_sigmas"}}
    before = conftest.MODEL_CALLS["exact"]
    captured = run_prompt(g)
    from comfyui_fast_samplers.samplers.dpm_ot import load_ot_map

    made = load_ot_map(sorted(map_folder.glob("tests/pool_*.safetensors"))[-1])
    # the pool runs the schedule's steps above the junction sigma 1 and stops there: one model call per sigma > 1
    steps_above = int((captured["pool_sigmas"] > 1.0).sum())
    assert 1 < steps_above < 10  # karras 10 steps from 14.6: some, not all, steps lie above sigma 1
    assert made.info["provenance"] == f"self_generate:sample_euler:{steps_above}" and made.n_targets == 6
    assert conftest.MODEL_CALLS["exact"] - before == 2 * steps_above  # 2 batches (6 targets, batch_size 4)
    x = made.targets.to(torch.float64)  # states at sigma 1 of N(mu, s^2) data: mean mu, std sqrt(s^2 + 1)
    assert abs(float(x.mean()) - MU) < 0.1 and abs(float(x.std()) - (S**2 + 1) ** 0.5) < 0.1

    g = _fit_graph(1.0, {"class_type": "FS_DPMOTTargetsInvert", "inputs": {
        "model": ["2", 0], "positive": ["3", 0], "latents": ["20", 0], "sigma_junction": 1.0, "steps": 40,
        "batch_size": 16, "keep_clean": True}})
    before = conftest.MODEL_CALLS["exact"]
    run_prompt(g)
    assert conftest.MODEL_CALLS["exact"] - before == 40
    inverted = load_ot_map(sorted(map_folder.glob("tests/pool_*.safetensors"))[-1])
    # the exact ODE of N(mu, s^2) data scales x - mu by sqrt(s^2 + sigma^2); the inversion starts at the
    # model's sigma_min with x = x0
    import comfy.model_sampling

    sigma_min = float(comfy.model_sampling.ModelSamplingDiscrete().sigma_min)
    expected = MU + (inverted.clean.double() - MU) * ((S**2 + 1.0) / (S**2 + sigma_min**2)) ** 0.5
    assert float((inverted.targets.double() - expected).abs().max()) < 0.05 * float(expected.abs().max())


def test_mismatched_map_is_refused(run_prompt, execution_error, map_folder):
    run_prompt(_fit_graph(0.3))
    name = sorted(p.relative_to(map_folder).as_posix() for p in map_folder.rglob("*.safetensors"))[-1]
    message = execution_error(_sample_graph(name, flow_shift=3.0))
    assert "DPM-OT" in message and "'const'" in message and "'eps'" in message


def test_interrupted_fit_leaves_a_checkpoint_and_resumes(run_prompt_events, run_prompt, hook, tmp_path, monkeypatch):
    import folder_paths

    updates, interrupt_at = hook
    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    prompt = {k: v for k, v in _fit_graph(1.0).items() if k != "23"}
    prompt["22"]["inputs"].update(iterations=400)
    prompt["24"] = {"class_type": "PreviewAny", "inputs": {"source": ["22", 1]}}
    interrupt_at["step"] = 10
    events = run_prompt_events(prompt)
    assert any(event == "execution_interrupted" for event, _ in events)
    assert max(u[0] for u in updates if u[1] == 400) == 10
    checkpoints = list((tmp_path / "fs_ot_fit_checkpoints").glob("*.safetensors"))
    assert len(checkpoints) == 1 and not list(tmp_path.rglob("*.tmp"))
    interrupt_at["step"] = None
    updates.clear()
    run_prompt(prompt)
    assert min(u[0] for u in updates if u[1] == 400) == 11  # continued after the checkpoint
    assert not list((tmp_path / "fs_ot_fit_checkpoints").glob("*.safetensors"))  # removed when done


def test_self_generated_pool_stops_within_a_step_of_an_interrupt(run_prompt_events, hook, map_folder):
    """One batch of 8 targets over the 5 karras steps above sigma_j = 1: interrupted at the second sampler
    step, the node stops there (before: checked only between batches, so all 5 steps of the batch ran)."""
    import conftest

    updates, interrupt_at = hook
    g = _fit_graph(1.0, {"class_type": "FS_DPMOTTargetsSelfGenerate", "inputs": {
        "model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0], "cfg": 1.0, "sampler": ["40", 0],
        "sigmas": ["41", 0], "latent": ["42", 0], "sigma_junction": 1.0, "count": 8, "batch_size": 8, "seed": 0}})
    g["40"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["41"] = {"class_type": "BasicScheduler", "inputs": {"model": ["2", 0], "scheduler": "karras", "steps": 10,
                                                          "denoise": 1.0}}
    g["42"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    interrupt_at["step"] = 2
    before = conftest.MODEL_CALLS["exact"]
    events = run_prompt_events(g)
    assert any(event == "execution_interrupted" for event, _ in events)
    assert conftest.MODEL_CALLS["exact"] - before == 2, conftest.MODEL_CALLS["exact"] - before
    assert [u[0] for u in updates] == [1, 2] and updates[-1][1] > 2, updates
