"""The learned digits test bed (testbeds/digits.py): interface, loading errors and sample quality."""
import pytest
import torch

from comfyui_fast_samplers.samplers import sample_er_sde
from comfyui_fast_samplers.samplers.schedule import NoiseSchedule, log_lam_uniform_sigmas
from comfyui_fast_samplers.testbeds.digits import default_path, load_digits_model

STEPS, N = 100, 256  # 100 order-3 ODE steps: the statistics below agree with 200 steps to 3 decimals


@pytest.fixture(scope="module")
def models():
    return {p: load_digits_model(p) for p in ("ve", "flow")}


def ode_sigmas(parametrization):
    """Fine log-lambda-uniform ODE schedule: SD1.5's range for "ve"; sigma = 1, then 0.999 ... 0.003
    for "flow"; both end in a final denoise."""
    schedule = NoiseSchedule(parametrization)
    if parametrization == "ve":
        return log_lam_uniform_sigmas(STEPS, 0.0292, 14.615, schedule, final_zero=True)
    tail = log_lam_uniform_sigmas(STEPS - 1, 0.003, 0.999, schedule, final_zero=True)
    return torch.cat([torch.ones(1, dtype=torch.float64), tail])


def ode_samples(model, parametrization=None):
    """N samples of a fine order-3 ODE solve, the sampler told ``parametrization`` (default: the model's)."""
    sigmas = ode_sigmas(parametrization or model.parametrization)
    noise = torch.randn(N, 64, generator=torch.Generator().manual_seed(0))
    return sample_er_sde(model, noise * sigmas[0], sigmas, order=3, noise_fn="ode", disable=True,
                         parametrization=parametrization)


def stats_error(model, x):
    """Errors against the training set's statistics: (mean over pixels of |sample mean - data mean|,
    the same for the per-pixel std, |RMS pixel value - the data's| (contrast))."""
    data_rms = (model.data_mean**2 + model.data_std**2).mean().sqrt()
    return (float((x.mean(0) - model.data_mean).abs().mean()), float((x.std(0) - model.data_std).abs().mean()),
            float((x.pow(2).mean().sqrt() - data_rms).abs()))


def test_attributes(models):
    ve, flow = models["ve"], models["flow"]
    assert (ve.parametrization, flow.parametrization) == ("ve", "flow")
    assert ve.schedule.parametrization == "ve" and flow.schedule.is_flow
    assert ve.sigma_min == pytest.approx(0.0292, abs=1e-4) and ve.sigma_max == pytest.approx(14.615, abs=1e-3)
    assert (flow.sigma_min, flow.sigma_max) == (0.003, 1.0)
    for model in (ve, flow):
        assert model.data_scaling == {"scale": 0.125, "offset": -1.0}
        assert model.data_mean.shape == model.data_std.shape == (64,)


@pytest.mark.parametrize("parametrization", ["ve", "flow"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_output_follows_input(models, parametrization, dtype):
    model = models[parametrization]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        x = torch.randn(3, 1, 8, 8, dtype=dtype, device=device)
        calls = model.calls
        out = model(x, torch.full((3,), 0.5, device=device), seed=1)  # extra_args are accepted
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
        assert model.calls == calls + 1 and torch.isfinite(out).all()
    flat = torch.randn(5, 64)
    assert torch.allclose(model(flat, torch.tensor(0.5)), model(flat.reshape(5, 8, 8), 0.5).reshape(5, 64))
    with pytest.raises(ValueError, match="64 values"):
        model(torch.randn(2, 63), 0.5)


def test_flow_at_pure_noise_is_the_data_mean(models):
    """At sigma = 1 the exact flow denoiser is E[x0], whatever x: the model must be finite and close."""
    flow = models["flow"]
    out = flow(torch.randn(512, 64, generator=torch.Generator().manual_seed(1)), torch.ones(512))
    assert torch.isfinite(out).all()
    assert float((out.mean(0) - flow.data_mean).abs().mean()) < 0.04  # measured 0.014
    assert float(out.std(0).mean()) < 0.25  # measured 0.16 (data: 0.45): it hardly depends on x


def test_ode_counts_calls(models):
    model = models["ve"]
    calls = model.calls
    sigmas = log_lam_uniform_sigmas(10, model.sigma_min, model.sigma_max, model.schedule, final_zero=True)
    sample_er_sde(model, torch.randn(4, 64) * sigmas[0], sigmas, order=3, noise_fn="ode", disable=True)
    assert model.calls - calls == len(sigmas) - 1


# Bounds from measurements (N = 256). The 297 held-out real digits score (0.026, 0.022, 0.001) against
# the training statistics: that much is sampling noise. Measured: ve (0.025, 0.032, 0.017), flow
# (0.030, 0.028, 0.009); the eps net served as flow (0.088, 0.092, 0.109: blurred, low-contrast digits).
# So 0.05 / 0.05 / 0.04 passes the right models with margin and fails that mistake on every statistic.
BOUNDS = (0.05, 0.05, 0.04)


@pytest.mark.parametrize("parametrization", ["ve", "flow"])
def test_ode_samples_have_digit_statistics(models, parametrization):
    model = models[parametrization]
    x = ode_samples(model)
    errors = stats_error(model, x)
    assert all(e < bound for e, bound in zip(errors, BOUNDS)), errors
    assert float(x.abs().max()) < 2.5  # pixels lie in [-1, 1]; measured 1.9 (ve), 1.5 (flow)


def test_wrong_parametrisation_is_clearly_worse(models):
    """The eps network served as a flow model (the sampler told 'flow'): every statistic fails."""
    model = models["ve"]
    errors = stats_error(model, ode_samples(model, parametrization="flow"))
    assert all(e > 1.2 * bound for e, bound in zip(errors, BOUNDS)), errors


def test_bad_name_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="Unknown digits model"):
        load_digits_model("eps")
    with pytest.raises(ValueError, match="Cannot load"):
        load_digits_model("ve", tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ValueError, match="Cannot load"):
        load_digits_model("ve", corrupt)
    with pytest.raises(ValueError, match="parametrization"):  # the flow file asked for as "ve"
        load_digits_model("ve", default_path("flow"))
