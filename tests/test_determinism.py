"""Determinism on the CPU (README "Seeds and noise"): the same seed gives bit-identical outputs for every
sampler of the dropdown and every seeded library function, another seed gives another output, and the
per-step noise never repeats the initial noise ComfyUI draws from the same seed."""
import pytest
import torch

from comfyui_fast_samplers.samplers import SAMPLERS
from comfyui_fast_samplers.samplers.bridges.schedule import SCHEDULE_PRESETS
from comfyui_fast_samplers.testbeds.bridges import ExactBridgeModel, default_joint_mixture
from comfyui_fast_samplers.samplers.common import seeded_noise_sampler, step_noise_seed
from comfyui_fast_samplers.samplers.bridges.dbim import sample_dbim, sample_ddbm_heun
from comfyui_fast_samplers.samplers.dp_schedule import optimize_schedule
from comfyui_fast_samplers.samplers.dpm_ot import fit_ot_map, junction_schedule, pool_from_clean, sample_dpm_ot
from comfyui_fast_samplers.samplers.er_sde import sample_er_sde
from comfyui_fast_samplers.samplers.schedule import discrete_vp_sigmas, karras_sigmas
from comfyui_fast_samplers.testbeds.mixtures import ExactModel, random_mixture

SHAPE = (2, 4, 4, 4)  # 64 dimensions: room for DDIM-GMM's 8 orthogonal offsets
DETERMINISTIC = {"fs_er_sde_ode_3", "fs_er_sde_ode_3_unic"}  # ODE samplers: no seed dependence at all


def comfy_initial_noise(shape, seed):
    """ComfyUI's ``prepare_noise``: one CPU generator seeded with the sampler node's seed."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_first_step_noise_is_not_the_initial_noise_and_is_reproducible():
    x = torch.zeros(SHAPE)
    first = seeded_noise_sampler(x, 42)(14.6, 10.0)
    assert not torch.equal(first, comfy_initial_noise(SHAPE, 42))
    assert torch.equal(first, seeded_noise_sampler(x, 42)(14.6, 10.0))
    # newer ComfyUI's default_noise_sampler: seed + 1 on the CPU, the seed itself on other devices
    assert torch.equal(first, comfy_initial_noise(SHAPE, 43))
    assert step_noise_seed(42, "cpu") == 43 and step_noise_seed(42, "cuda") == 42


@pytest.fixture(scope="module")
def exact_model():
    return ExactModel(random_mixture(64, 3, seed=0, spread=0.5, std=0.2), "ve")


def _run_preset(name, model, seed):
    sigmas = karras_sigmas(6, 0.03, 14.6)
    x = 14.6 * comfy_initial_noise(SHAPE, seed).double()
    return SAMPLERS[name](model, x, sigmas, extra_args={"seed": seed}, disable=True)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_dropdown_sampler_refuses_an_empty_batch(name, exact_model):
    """The shared input check (common.check_inputs) names the empty batch for every sampler."""
    with pytest.raises(ValueError, match="latent batch is empty"):
        SAMPLERS[name](exact_model, torch.zeros(0, *SHAPE[1:], dtype=torch.float64), karras_sigmas(6, 0.03, 14.6),
                       extra_args={"seed": 0}, disable=True)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_dropdown_sampler_is_deterministic_per_seed(name, exact_model):
    """Same seed: bit-identical; another seed with the same start latent: another output (stochastic
    samplers) or the same one (ODE samplers)."""
    a = _run_preset(name, exact_model, 3)
    assert torch.equal(a, _run_preset(name, exact_model, 3))
    sigmas = karras_sigmas(6, 0.03, 14.6)
    x = 14.6 * comfy_initial_noise(SHAPE, 3).double()
    other = SAMPLERS[name](exact_model, x, sigmas, extra_args={"seed": 4}, disable=True)
    if name in DETERMINISTIC:
        assert torch.equal(a, other)
    else:
        assert (a - other).abs().max() > 1e-3, name


def _bridge(seed, sampler):
    model = ExactBridgeModel(default_joint_mixture(), SCHEDULE_PRESETS["vp"])
    x_T = torch.tensor([[0.3, 0.0], [-0.2, 0.0], [0.05, 0.0]], dtype=torch.float64)
    if sampler == "dbim":
        return sample_dbim(model, x_T, model.schedule, 6, eta=0.5, seed=seed, disable=True)
    return sample_ddbm_heun(model, x_T, model.schedule, 4, seed=seed, disable=True)


def _brownian(seed, model):
    x = 14.6 * comfy_initial_noise(SHAPE, 0).double()
    return sample_er_sde(model, x, karras_sigmas(6, 0.03, 14.6), extra_args={"seed": seed}, noise="brownian",
                         disable=True)


def _ot_pool(seed):
    clean = comfy_initial_noise((8, 4, 4, 4), 0)
    return pool_from_clean(clean, 1.0, "eps", seed=seed).targets


def _dpm_ot(seed, model):
    clean = comfy_initial_noise((8, 4, 4, 4), 0)
    ot_map, _ = fit_ot_map(pool_from_clean(clean, 1.0, "eps", seed=0), iterations=20, seed=0)
    sigmas = junction_schedule(lambda n: karras_sigmas(n, 0.03, 14.6), 3, 1.0)
    x = 14.6 * comfy_initial_noise(SHAPE, 0)
    return sample_dpm_ot(model, x, sigmas, extra_args={"seed": seed}, ot_map=ot_map, finisher="euler_ancestral",
                         placement="renoise", disable=True)


def _elbo_probe(seed, _model):
    mix = random_mixture(16, 2, seed=0, spread=0.5, std=0.05)
    data, _ = mix.sample(8, torch.Generator().manual_seed(1))
    return optimize_schedule(ExactModel(mix, "ve"), data, 4, discrete_vp_sigmas()[::50], seed=seed)[1]


LIBRARY = {
    "sample_dbim eta 0.5": lambda seed, model: _bridge(seed, "dbim"),
    "sample_ddbm_heun": lambda seed, model: _bridge(seed, "heun"),
    "sample_er_sde brownian": _brownian,
    "pool_from_clean": lambda seed, model: _ot_pool(seed),
    "sample_dpm_ot renoise": _dpm_ot,
    "optimize_schedule probe": _elbo_probe,
}


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_every_seeded_library_function_is_deterministic_per_seed(name, exact_model):
    run = LIBRARY[name]
    a = run(5, exact_model)
    assert torch.equal(a, run(5, exact_model))
    assert (a.double() - run(6, exact_model).double()).abs().max() > 1e-4, name
