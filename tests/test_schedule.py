import math

import pytest
import torch

from comfyui_fast_samplers.samplers.schedule import (
    NoiseSchedule, flow_shift_sigmas, karras_sigmas, log_lam_uniform_sigmas,
    parametrization_of_model_sampling, resolve_schedule,
)

SIGMAS = torch.tensor([0.0, 0.03, 0.5, 1.0, 7.0, 80.0], dtype=torch.float64)
FLOW_SIGMAS = torch.tensor([0.0, 0.03, 0.5, 0.9, 0.999], dtype=torch.float64)


@pytest.mark.parametrize("kind", ["ve", "vp", "flow"])
def test_lam_is_s_over_alpha_and_inverts(kind):
    sch = NoiseSchedule(kind)
    sig = FLOW_SIGMAS[1:] if kind == "flow" else SIGMAS[1:]
    tab = sch.coefficients(sig)
    torch.testing.assert_close(tab.lam, tab.s / tab.alpha, rtol=1e-14, atol=0)
    torch.testing.assert_close(sch.sigma_from_lam(tab.lam), sig, rtol=1e-13, atol=0)
    # The sign: the half-log-SNR is log(alpha / s), so 2 * half_log_snr = log SNR and log_lam is its negative.
    torch.testing.assert_close(sch.half_log_snr(sig), 0.5 * torch.log(tab.alpha**2 / tab.s**2), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(tab.log_lam, -sch.half_log_snr(sig), rtol=0, atol=0)
    # x = alpha x0 + s eps must have unit-variance noise geometry: vp has alpha^2 + s^2 = 1.
    if kind == "vp":
        torch.testing.assert_close(tab.alpha**2 + tab.s**2, torch.ones_like(sig), rtol=1e-14, atol=0)


def test_flow_endpoints():
    sch = NoiseSchedule("flow")
    tab = sch.coefficients(torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert tab.alpha.tolist() == [0.0, 1.0] and tab.s.tolist() == [1.0, 0.0]
    assert tab.log_lam[0] == math.inf and tab.log_lam[1] == -math.inf


def test_unknown_parametrization():
    with pytest.raises(ValueError, match="Unknown parametrization"):
        NoiseSchedule("edm")


@pytest.mark.parametrize("name,expected", [("EPS", "ve"), ("V_PREDICTION", "ve"), ("EDM", "ve"), ("CONST", "flow")])
def test_model_type_from_comfy_model_sampling(comfy_like, name, expected):
    model = comfy_like(lambda x, s: x, name)
    assert parametrization_of_model_sampling(model.model_sampling) == expected
    assert resolve_schedule(model).parametrization == expected
    # An explicit option wins over the model's own type.
    assert resolve_schedule(model, "vp").parametrization == "vp"


def test_unsupported_model_type_is_named(comfy_like):
    with pytest.raises(ValueError, match="Unsupported model type"):
        resolve_schedule(comfy_like(lambda x, s: x, "STABLE_AUDIO_THING"))


def test_comfy_reads_by_duck_typing(comfy_like):
    """comfy_compat's reads on a ComfyUI-shaped model, and their defaults on a plain callable."""
    from comfyui_fast_samplers.samplers import comfy_compat as cc

    model = comfy_like(lambda x, s: x, "CONST", latent_format="Flux")
    assert cc.model_latent_format(model) == "Flux" and cc.prediction_type(model.model_sampling) == "const"
    assert cc.flow_start_offset_sigma(model) is None and cc.noise_scale_of(model) == 1.0
    model.model_sampling.percent_to_sigma = lambda percent: 1.0 - percent / 2  # distinct from the input
    model.model_sampling.noise_scale = 0.5
    assert cc.flow_start_offset_sigma(model) == 1.0 - cc.FLOW_START_PERCENT / 2 and cc.noise_scale_of(model) == 0.5
    model.noise, model.latent_image = torch.ones(1), torch.zeros(1)
    assert cc.run_noise_and_latent(model) == (model.noise, model.latent_image)
    plain = lambda x, s: x  # noqa: E731
    assert (cc.comfy_model_sampling(plain), cc.model_latent_format(plain), cc.flow_start_offset_sigma(plain),
            cc.noise_scale_of(plain), cc.run_noise_and_latent(plain)) == (None, None, None, 1.0, (None, None))


def test_reference_schedules():
    k = karras_sigmas(10, 0.029, 14.6)
    assert len(k) == 11 and k[-1] == 0 and math.isclose(k[0], 14.6) and math.isclose(k[-2], 0.029)
    assert (k[1:] < k[:-1]).all()
    f = flow_shift_sigmas(8, shift=3.0)
    assert f[0] == 1.0 and f[-1] == 0.0 and (f[1:] < f[:-1]).all()
    sch = NoiseSchedule("flow")
    u = log_lam_uniform_sigmas(6, 0.1, 0.9, sch)
    steps = torch.diff(sch.log_lam(u))
    torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-9, atol=0)
