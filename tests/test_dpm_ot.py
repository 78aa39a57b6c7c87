"""DPM-OT: the semi-discrete OT fit, the map file, and the sampler (spec dpm_ot.md section 10)."""
import math

import numpy as np
import pytest
import torch

from comfyui_fast_samplers.samplers.classic import sample_euler
from comfyui_fast_samplers.samplers.dpm_ot import (
    FINISHERS, REQUIRED_METADATA, OTMap, assign_targets, cell_masses, fit_heights, fit_ot_map, invert_to_junction,
    junction_prefix, junction_schedule, load_ot_map, mass_errors, place, pool_from_clean, sample_dpm_ot, save_ot_map,
    score_factor, tiled_argmax, tiled_top2,
)
from comfyui_fast_samplers.samplers.schedule import NoiseSchedule, karras_sigmas
from comfyui_fast_samplers.testbeds.mixtures import (
    ExactModel, chi2_rms_radius, mode_weight_error, off_mode_rate, pool_distance_ratio, random_mixture,
    separated_mixture,
)

UNIFORM_32 = torch.full((32,), 1 / 32, dtype=torch.float64)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _uneven_targets(n, d, seed=0):
    """Clustered targets whose norms differ (real latents differ in contrast): h = 0 is unbalanced."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, d, generator=g)
    y = centres[torch.randint(0, 8, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    return y * torch.empty(n, 1).uniform_(0.5, 1.5, generator=g)


def _fitted_map(n=32, shape=(4, 8, 8), sigma=1.0, prediction="eps", seed=0, iterations=300):
    clean = _randn(n, *shape, seed=seed)
    pool = pool_from_clean(clean, sigma, prediction, latent_format="SD15", seed=seed)
    return fit_ot_map(pool, iterations=iterations, seed=seed)


# ---- fitting core ------------------------------------------------------------------------------------

def test_one_dimension_matches_the_exact_quantile_cells():
    """Source N(0,1), 16 sorted targets: the exact cells are the intervals between normal quantiles."""
    n = 16
    y = torch.sort(2 * _randn(n, seed=0)).values[:, None]
    fit = fit_heights(y, iterations=3000, samples_per_iter=100 * n, eval_samples=1_000_000, eval_every=1000,
                      seed=0, stop_at_floor=False)
    assert fit.averaged and fit.max_rel_err <= 0.05 and fit.empty == 0
    yc, h = (y - y.mean())[:, 0].double(), fit.heights.double()
    boundaries = (h[:-1] - h[1:]) / (yc[1:] - yc[:-1])
    exact = torch.distributions.Normal(0.0, 1.0).icdf(torch.arange(1, n, dtype=torch.float64) / n)
    assert float((boundaries - exact).abs().max()) <= 0.01


def test_equal_cell_masses_d16_n256():
    targets = _uneven_targets(256, 16, seed=1)
    assert mass_errors(cell_masses(targets - targets.mean(0), torch.zeros(256), 100_000),
                       torch.full((256,), 1 / 256, dtype=torch.float64))[0] > 1.0  # unbalanced at h = 0
    fit = fit_heights(targets, iterations=1500, samples_per_iter=2560, eval_samples=400_000, seed=0)
    masses = cell_masses(targets - targets.mean(0), fit.heights, 400_000, seed=99)  # fresh noises
    worst, mean, empty = mass_errors(masses, torch.full((256,), 1 / 256, dtype=torch.float64))
    assert empty == 0 and mean <= 0.030 and worst <= 0.15
    assert 0.01 < fit.floor_mean < 0.03


def test_weighted_targets_get_their_masses():
    targets = _uneven_targets(32, 8, seed=3)
    weights = torch.linspace(1.0, 3.0, 32)
    fit = fit_heights(targets, weights, iterations=1500, samples_per_iter=4096, seed=0, stop_at_floor=False)
    nu = weights.double() / weights.double().sum()
    worst, mean, empty = mass_errors(cell_masses(targets - targets.mean(0), fit.heights, 400_000, seed=5), nu)
    assert empty == 0 and mean <= 0.03 and worst <= 0.1


def test_agrees_with_pot_semidiscrete_solver():
    ot = pytest.importorskip("ot")
    import numpy as np

    y = 1.5 * _randn(32, 2, seed=3, dtype=torch.float64)
    np.random.seed(0)
    g = torch.as_tensor(np.asarray(ot.semidiscrete.solve_semidiscrete(y.numpy(), sampler_source="normal",
                                                                       max_iter=20000, batch_size=64)))
    pot_heights = ((g - (y**2).sum(1)) / 2).float()  # argmin |x-y|^2 - g  ==  argmax <x,y> + (g - |y|^2)/2
    ours = fit_heights(y.float(), iterations=3000, samples_per_iter=4096, seed=0, stop_at_floor=False).heights
    x = _randn(1_000_000, 2, seed=11)
    for factor, heights in ((y.float() - y.float().mean(0), ours), (y.float(), pot_heights)):
        masses = torch.bincount(tiled_argmax(x, factor, heights), minlength=32).double() / len(x)
        assert mass_errors(masses, UNIFORM_32)[1] <= 0.03
    ours_index = tiled_argmax(x[:100_000], y.float() - y.float().mean(0), ours)
    assert (ours_index == tiled_argmax(x[:100_000], y.float(), pot_heights)).double().mean() >= 0.95


def test_fitted_map_agrees_with_the_exact_discrete_transport_of_a_sample():
    """The fitted heights make argmax <x, y_i> + h_i the optimal transport from N(0, I) to the uniform
    targets: on 4 x 1024 fresh noises the exact balanced assignment (scipy's linear_sum_assignment, 16 noises
    per target, cost -<x, y>) puts 86.4% of the noises in the fitted map's cell (the rest is the sample's own
    boundary noise: 16 points per cell). Wrong heights agree less: x 0.9 / x 1.1 82% / 84%, x 0.8 75%,
    h = 0 31%, permuted 22%. (Any heights give a cyclically monotone map; only the masses, i.e. the heights,
    make it the optimal one.)"""
    from scipy.optimize import linear_sum_assignment

    n, per_cell = 64, 16
    targets = _uneven_targets(n, 16, seed=4)
    heights = fit_heights(targets, iterations=200, seed=0).heights.double()
    y = (targets - targets.mean(0)).double()
    agree = 0.0
    for seed in range(5, 9):
        x = _randn(n * per_cell, 16, seed=seed).double()
        rows, cols = linear_sum_assignment(np.repeat(-(x @ y.T).numpy(), per_cell, axis=1))
        agree += float((tiled_argmax(x[rows], y, heights) == torch.as_tensor(cols // per_cell)).double().mean()) / 4
    assert agree >= 0.85, agree


def test_invariances_centring_height_shift_and_projection():
    targets = _uneven_targets(64, 512, seed=7)
    heights = torch.linspace(-1, 1, 64)
    x = _randn(20_000, 512, seed=8).double()
    y, h = targets.double(), heights.double()
    full = tiled_argmax(x, y, h)
    assert torch.equal(full, tiled_argmax(x, y - y.mean(0), h))  # common term <x, ybar> per x
    assert torch.equal(full, tiled_argmax(x, y, h + 3.7))
    # eigen-factor C (N x r) with C C^T = Yc Yc^T; z = U^T x with U = Yc^T C / |c|^2 reproduces Yc x exactly
    factor = score_factor(targets).double()
    assert factor.shape == (64, 63)  # centring removes one dimension
    yc = y - y.mean(0)
    u = yc.T @ factor / (factor**2).sum(0)
    torch.testing.assert_close(factor @ (u.T @ x.T), yc @ x.T, rtol=1e-5, atol=1e-4)
    assert torch.equal(full, tiled_argmax((u.T @ x.T).T, factor, h))
    # same law: cell masses under z ~ N(0, I_r) match full-dimensional noises
    m_full = torch.bincount(full, minlength=64).double() / len(x)
    m_proj = cell_masses(factor.float(), heights, 200_000, seed=9)
    assert float((m_full - m_proj).abs().max()) < 3 * 3.5 * math.sqrt(1 / 64 / 20_000)


def test_tiled_argmax_equals_single_shot_bit_for_bit():
    targets, x = _randn(300, 64, seed=10), _randn(5000, 64, seed=11)
    heights = _randn(300, seed=12)
    centre = targets.mean(0)
    single = ((x @ (targets - centre).T) + heights).argmax(dim=1)
    for tile in (64, 1000, 12345, 1 << 30):
        assert torch.equal(tiled_argmax(x, targets, heights, centre, tile_elements=tile), single)
    top2 = tiled_top2(x, targets, heights, centre, tile_elements=1000)
    assert torch.equal(top2, ((x @ (targets - centre).T) + heights).topk(2, dim=1).indices)


def test_fp32_scores_agree_with_float64():
    targets = _uneven_targets(256, 1024, seed=13)
    heights = fit_heights(targets, iterations=100, seed=0).heights
    x = _randn(20_000, 1024, seed=14)
    exact = tiled_argmax(x.double(), targets.double(), heights.double(), targets.double().mean(0))
    fp32 = tiled_argmax(x, targets, heights, targets.mean(0))
    assert (exact != fp32).double().mean() <= 1e-4
    fp16_inputs = tiled_argmax(x, targets.half(), heights, targets.half().float().mean(0))
    assert (exact != fp16_inputs).double().mean() <= 5e-3


def test_fit_resumes_exactly_from_a_checkpoint():
    targets = _uneven_targets(64, 16, seed=15)
    whole = fit_heights(targets, iterations=120, eval_every=40, seed=3, stop_at_floor=False)
    states = []

    def interrupt(t, total, last):
        if t == 70:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_heights(targets, iterations=120, eval_every=40, seed=3, stop_at_floor=False, on_progress=interrupt,
                    on_checkpoint=states.append)
    assert int(states[-1]["iteration"]) == 70
    resumed = fit_heights(targets, iterations=120, eval_every=40, seed=3, stop_at_floor=False, state=states[-1])
    assert torch.equal(resumed.heights, whole.heights) and resumed.samples_total == whole.samples_total


def test_fit_refuses_empty_pool_and_bad_latents():
    with pytest.raises(ValueError, match="empty"):
        fit_heights(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="constant"):
        pool_from_clean(torch.zeros(4, 4, 8, 8), 1.0, "eps")
    with pytest.raises(ValueError, match="NaN"):
        pool_from_clean(torch.full((4, 4, 8, 8), float("nan")), 1.0, "eps")
    with pytest.raises(ValueError, match="below 1"):
        pool_from_clean(_randn(4, 4, 8, 8), 1.0, "const")


# ---- targets -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, alpha", [("eps", 1.0), ("v_prediction", 1.0), ("const", 0.7)])
def test_encoded_targets_follow_the_forward_process(prediction, alpha):
    clean = _randn(3, 4, 8, 8, seed=16)
    sigma = 0.3 if prediction == "const" else 2.0
    pool = pool_from_clean(clean, sigma, prediction, seed=5)
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(5 + i)) for i in range(3)])
    torch.testing.assert_close(pool.targets.float(), (alpha * clean + sigma * noise).half().float())
    assert torch.equal(pool_from_clean(clean, sigma, prediction, seed=5).targets, pool.targets)


def test_inversion_walks_back_with_an_ode_finisher():
    mixture = random_mixture(16, 3, seed=1)
    model = ExactModel(mixture, "ve")
    clean = mixture.sample(8, torch.Generator().manual_seed(2))[0]
    errors = []
    for steps in (10, 40):
        y = invert_to_junction(model, clean, 2.0, steps, 0.002, NoiseSchedule("ve"))
        sigmas = torch.exp(torch.linspace(math.log(2.0), math.log(0.002), steps + 1, dtype=torch.float64))
        errors.append(float((sample_euler(model, y, sigmas, disable=True) - clean).norm() / clean.norm()))
    assert errors[1] < 0.5 * errors[0] and errors[1] < 0.02


def test_junction_prefix_and_sigmas_helper():
    sig = karras_sigmas(20, 0.03, 14.6)
    prefix = junction_prefix(sig, 1.0)
    assert float(prefix[-1]) == 1.0 and bool((prefix[:-1] > 1.0).all()) and float(prefix[0]) == pytest.approx(14.6)
    with pytest.raises(ValueError, match="not above the junction"):
        junction_prefix(sig, 20.0)
    tail = junction_schedule(lambda n: karras_sigmas(n, 0.03, 14.6), 6, 1.0)
    assert len(tail) == 7 and float(tail[0]) == 1.0 and float(tail[-1]) == 0.0
    assert bool((tail[1:] < tail[:-1]).all())
    with pytest.raises(ValueError, match="above the model's largest"):
        junction_schedule(lambda n: karras_sigmas(n, 0.03, 14.6), 6, 30.0)


# ---- sampler -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("finisher, nfe", [("euler", 6), ("heun", 11), ("er_sde_3", 6), ("euler_ancestral", 6)])
def test_model_calls_equal_the_finishers_nfe(finisher, nfe):
    ot_map, _ = _fitted_map(iterations=50)
    model = ExactModel(random_mixture(256, 4, seed=3), "ve")
    sigmas = junction_schedule(lambda n: karras_sigmas(n, 0.03, 14.6), 6, 1.0)
    x = sample_dpm_ot(model, _randn(2, 4, 8, 8, seed=1), sigmas, extra_args={"seed": 1}, ot_map=ot_map,
                      finisher=finisher, disable=True)
    assert model.calls == nfe and x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()


def test_same_seed_same_target_and_index_law_matches_the_fit():
    ot_map, fit = _fitted_map(n=32, iterations=600)
    noise = _randn(20_000, 4, 8, 8, seed=21)
    index = assign_targets(ot_map, noise)
    assert torch.equal(index, assign_targets(ot_map, noise.clone()))
    factor = score_factor(ot_map.targets.reshape(32, -1))
    expected = cell_masses(factor, ot_map.heights, 400_000, seed=3)
    counts = torch.bincount(index, minlength=32).double()
    chi2 = float(((counts - 20_000 * expected) ** 2 / (20_000 * expected)).sum())
    assert chi2 < 52.19  # chi-square 99% quantile, 31 degrees of freedom
    model = ExactModel(random_mixture(256, 4, seed=3), "ve")
    sigmas = junction_schedule(lambda n: karras_sigmas(n, 0.03, 14.6), 4, 1.0)
    a = sample_dpm_ot(model, noise[:4], sigmas, ot_map=ot_map, disable=True)
    b = sample_dpm_ot(model, noise[:4], sigmas, ot_map=ot_map, disable=True)
    assert torch.equal(a, b)


def test_reads_comfyui_noise_and_checks_the_junction(comfy_like):
    ot_map, _ = _fitted_map(iterations=50)
    starts = []

    def record(model, x, sigmas, **kwargs):
        starts.append(x)
        return x

    noise = _randn(2, 4, 8, 8, seed=2)
    model = comfy_like(ExactModel(random_mixture(256, 4, seed=3), "ve"), "EPS")
    model.noise, model.latent_image = noise, torch.zeros_like(noise)
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    sample_dpm_ot(model, noise * 1.0 + 5.0, sigmas, ot_map=ot_map, finisher=record)  # x is ignored: noise is kept
    torch.testing.assert_close(starts[0], ot_map.targets[assign_targets(ot_map, noise)].float())
    with pytest.raises(ValueError, match="junction is 1"):
        sample_dpm_ot(model, noise, torch.tensor([2.0, 0.5, 0.0]), ot_map=ot_map, finisher=record)


def test_refuses_maps_of_another_shape_model_type_or_latent_format(comfy_like):
    ot_map, _ = _fitted_map(iterations=20)
    sigmas = torch.tensor([1.0, 0.0])
    exact = ExactModel(random_mixture(256, 4, seed=3), "ve")
    with pytest.raises(ValueError, match=r"shape \(4, 16, 16\).*\(4, 8, 8\)"):
        sample_dpm_ot(exact, _randn(1, 4, 16, 16), sigmas, ot_map=ot_map)
    with pytest.raises(ValueError, match="'const' model but the map was made for 'eps'"):
        sample_dpm_ot(comfy_like(exact, "CONST"), _randn(1, 4, 8, 8), sigmas, ot_map=ot_map)
    with pytest.raises(ValueError, match="latent format is SDXL but the map's is SD15"):
        sample_dpm_ot(comfy_like(exact, "EPS", "SDXL"), _randn(1, 4, 8, 8), sigmas, ot_map=ot_map)
    with pytest.raises(ValueError, match="fitted OT map"):
        sample_dpm_ot(exact, _randn(1, 4, 8, 8), sigmas, ot_map=pool_from_clean(_randn(4, 4, 8, 8), 1.0, "eps"))
    with pytest.raises(ValueError, match="unknown finisher"):
        sample_dpm_ot(exact, _randn(1, 4, 8, 8), sigmas, ot_map=ot_map, finisher="nope")


def test_placements():
    ot_map, _ = _fitted_map(n=32, iterations=100)
    schedule = NoiseSchedule("ve")
    noise = _randn(64, 4, 8, 8, seed=30)
    index = assign_targets(ot_map, noise)
    start, chosen = place(ot_map, noise, schedule, "target")
    assert torch.equal(chosen, index) and torch.equal(start, ot_map.targets[index].float())
    renoised, _ = place(ot_map, noise, schedule, "renoise", seed=1)
    residual = renoised - ot_map.clean[index].float()
    assert abs(float(residual.std()) - 1.0) < 0.05 and not torch.equal(renoised, start)
    same, _ = place(ot_map, noise, schedule, "aeot_pair", angle_threshold=0.0)
    assert torch.equal(same, start)
    mixed, _ = place(ot_map, noise, schedule, "aeot_pair", angle_threshold=math.pi, pair_weight=0.75, seed=2)
    pair = tiled_top2(noise.reshape(64, -1), ot_map.targets.reshape(32, -1).float(), ot_map.heights,
                      ot_map.targets.reshape(32, -1).float().mean(0))
    flat = ot_map.targets.reshape(32, -1).float()
    extra = mixed.reshape(64, -1) - (0.75 * flat[pair[:, 0]] + 0.25 * flat[pair[:, 1]])
    assert abs(float(extra.std()) - math.sqrt(2 * 0.75 * 0.25)) < 0.03  # restores the noise level at sigma_j
    no_clean = OTMap(**{**ot_map.__dict__, "clean": None})
    with pytest.raises(ValueError, match="keep_clean"):
        place(no_clean, noise, schedule, "renoise")


def test_flow_maps_sample_flow_models():
    ot_map, _ = _fitted_map(prediction="const", sigma=0.4, iterations=50)
    assert ot_map.parametrization == "flow"
    model = ExactModel(random_mixture(256, 4, seed=3), "flow")
    sigmas = torch.tensor([0.4, 0.25, 0.1, 0.0])
    x = sample_dpm_ot(model, 0.4 * _randn(3, 4, 8, 8), sigmas, ot_map=ot_map, finisher="dpmpp_2m", disable=True)
    assert model.calls == 3 and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="'ve' model"):
        sample_dpm_ot(ExactModel(random_mixture(256, 4), "ve"), _randn(1, 4, 8, 8), sigmas, ot_map=ot_map)


def test_removes_mode_mixture_on_the_exact_model_and_reports_memorisation():
    """Spec E3: d = 16, 8 separated modes, pool of 1000 data points."""
    mixture = separated_mixture()
    model = ExactModel(mixture, "ve")
    pool_clean = mixture.sample(1000, torch.Generator().manual_seed(0))[0].float()
    fresh = mixture.sample(4000, torch.Generator().manual_seed(5))[0].float()
    radius = chi2_rms_radius(16)
    noise = _randn(4000, 16, seed=7)
    euler = sample_euler(model, 80 * noise, karras_sigmas(5, 0.002, 80.0), disable=True)
    assert off_mode_rate(euler, mixture, radius) >= 0.2
    ot_map, _ = fit_ot_map(pool_from_clean(pool_clean, 1.0, "eps"), iterations=300, seed=0)
    sigmas = karras_sigmas(5, 0.002, 1.0)
    ours = sample_dpm_ot(model, noise, sigmas, ot_map=ot_map, disable=True)
    ours_rate = off_mode_rate(ours, mixture, radius)
    assert ours_rate <= 0.005 and mode_weight_error(ours, mixture) < 0.06
    random_pick = ot_map.targets[torch.randint(0, 1000, (4000,), generator=torch.Generator().manual_seed(8))]
    random_rate = off_mode_rate(sample_euler(model, random_pick.float(), sigmas, disable=True), mixture, radius)
    assert abs(ours_rate - random_rate) < 0.01
    assert 0.6 < pool_distance_ratio(ours, pool_clean, fresh) < 1.0
    replay_map, _ = fit_ot_map(pool_from_clean(pool_clean, 0.17, "eps"), iterations=300, seed=0)
    replay = sample_dpm_ot(model, 0.17 * noise, karras_sigmas(5, 0.002, 0.17), ot_map=replay_map, disable=True)
    assert pool_distance_ratio(replay, pool_clean, fresh) < 0.5  # near copies of the pool


# ---- file format ------------------------------------------------------------------------------------------

def test_save_load_round_trip_is_bit_exact(tmp_path):
    ot_map, fit = _fitted_map(iterations=30)
    path = save_ot_map(ot_map, tmp_path / "map.safetensors", extension_version="9.9")
    loaded = load_ot_map(path)
    for name in ("targets", "heights", "clean", "target_ids"):
        assert torch.equal(getattr(loaded, name), getattr(ot_map, name)), name
    assert loaded.sigma_junction == ot_map.sigma_junction and loaded.latent_shape == (4, 8, 8)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert set(REQUIRED_METADATA) <= set(meta) and meta["fit_iters"] == str(fit.iterations)
    assert meta["provenance"] == "encode" and meta["extension_version"] == "9.9"
    with pytest.raises(FileExistsError):
        save_ot_map(ot_map, path)
    assert torch.equal(load_ot_map(path).heights, ot_map.heights)


def test_bad_map_files_raise_clear_errors(tmp_path):
    from safetensors.torch import save_file

    ot_map, _ = _fitted_map(iterations=10)
    good = save_ot_map(ot_map, tmp_path / "good.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="damaged or not a map"):
        load_ot_map(broken)
    with pytest.raises(ValueError, match="not found"):
        load_ot_map(tmp_path / "missing.safetensors")
    tensors = {"targets": ot_map.targets, "heights": ot_map.heights}
    from comfyui_fast_samplers.samplers.dpm_ot import map_metadata

    for change, message in (({"source": "uniform_unit"}, "refit"), ({"format": "lora"}, "not a DPM-OT map"),
                            ({"latent_shape": "4,8,9"}, "disagree"), ({"version": "7"}, "not supported")):
        path = tmp_path / f"{message[:4]}.safetensors"
        save_file(tensors, str(path), metadata={**map_metadata(ot_map, "0"), **change})
        with pytest.raises(ValueError, match=message):
            load_ot_map(path)
    with pytest.raises(ValueError, match="no fitted heights"):
        save_ot_map(pool_from_clean(_randn(4, 4, 8, 8), 1.0, "eps"), tmp_path / "pool.safetensors")


def test_finisher_table_covers_the_pack_samplers():
    assert {"euler", "euler_ancestral", "heun", "dpmpp_2m", "er_sde_3", "er_sde_ode_3"} <= set(FINISHERS)


def test_fit_doubles_its_samples_after_three_evaluations_without_progress_up_to_8x():
    """The stall rule of the fit: a new best resets the count; the third evaluation in a row
    without progress doubles the fitting samples, never beyond 8x the base."""
    from comfyui_fast_samplers.samplers.dpm_ot.fit import HeightFit

    fit = HeightFit(torch.randn(4, 2), torch.full((4,), 0.25), "cpu", seed=0, base_samples=100, eval_samples=10,
                    average_from=0, kappa=0.02, tile_elements=1 << 16)
    seen = []
    for error in [1.0, 1.1, 1.2, 0.9, 1.0, 1.0, 1.0] + [2.0] * 12:
        fit.note_progress(error)
        seen.append(fit.samples)
    assert seen[:7] == [100, 100, 100, 100, 100, 100, 200]  # 0.9 reset the count; three stalls after it
    assert seen[9] == 400 and seen[12] == 800 and max(seen) == 800
