"""Progress bar, latent previews and interruption reach every sampler through its callback."""
import pytest
from graphs import sampler_custom_graph

SAMPLER_NODES = {
    "er_sde": {"class_type": "FS_ERSDESolver", "inputs": {
        "order": 3, "noise_fn": "sde_5", "eta": 1.0, "p": 2.0, "a": 0.0, "s_noise": 1.0, "noise": "gaussian",
        "derivatives": "corrected", "quadrature": "exact", "flow_start": "exact", "final_step": "denoise"}},
    "ddim_gmm": {"class_type": "FS_DDIMGMM", "inputs": {
        "eta": 0.5, "eta_convention": "ddim", "components": 8, "scale": 0.9, "scale_units": "relative",
        "offsets": "ortho", "covariance": "strict", "share_across_steps": False, "offset_seed": 0,
        "skip_last_offsets": 0, "on_infeasible": "clamp"}},
}


@pytest.mark.parametrize("name", list(SAMPLER_NODES))
def test_progress_and_previews_every_step(run_prompt, hook, name):
    updates, _ = hook
    run_prompt(sampler_custom_graph({"10": SAMPLER_NODES[name]}, ["10", 0], steps=6))
    sampling = [u for u in updates if u[1] == 6]
    assert [u[0] for u in sampling] == [1, 2, 3, 4, 5, 6]
    assert all(u[2] is not None for u in sampling), "no latent preview was produced"


@pytest.mark.parametrize("name", list(SAMPLER_NODES))
def test_interrupt_stops_sampling(run_prompt_events, hook, name):
    updates, interrupt_at = hook
    interrupt_at["step"] = 3
    events = run_prompt_events(sampler_custom_graph({"10": SAMPLER_NODES[name]}, ["10", 0], steps=8))
    assert any(event == "execution_interrupted" for event, _ in events), [e for e, _ in events]
    assert max(u[0] for u in updates if u[1] == 8) == 3


def test_interrupting_the_schedule_probe_writes_no_cache(run_prompt_events, hook, tmp_path, monkeypatch):
    import folder_paths

    updates, interrupt_at = hook
    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    interrupt_at["step"] = 5
    prompt = {
        "1": {"class_type": "FSTest_WeightFreeModel", "inputs": {"prediction": "eps"}},
        "3": {"class_type": "FSTest_ZeroConditioning", "inputs": {}},
        "20": {"class_type": "FSTest_GaussianLatents", "inputs": {"batch": 4, "mu": 0.5, "s": 0.1, "seed": 0}},
        "21": {"class_type": "FS_ELBOScheduleOptimizer", "inputs": {
            "model": ["1", 0], "latents": ["20", 0], "positive": ["3", 0], "steps": 5, "candidates": 50,
            "variance": "small", "decoder": "sigma", "seed": 0, "start_sigma": 0.0, "use_cache": True}},
    }
    events = run_prompt_events(prompt)
    assert any(event == "execution_interrupted" for event, _ in events)
    assert max(u[0] for u in updates if u[1] == 50) == 5
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.tmp"))
