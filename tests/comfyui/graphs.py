"""API-format graphs and checks shared by the tier-2 tests (exact Gaussian data in model space)."""
import math

import torch

MU, S = 0.5, 0.1
SD1_SCALE = 0.18215  # SD1.5 latent_format.scale_factor: process_latent_out divides by it


def sampler_custom_graph(sampler_nodes: dict, sampler_ref, steps=10, flow_shift=0.0, batch=2, size=64, seed=7, prediction="eps"):
    """SamplerCustom on the exact-Gaussian model; sampler_nodes adds the SAMPLER node(s)."""
    prompt = {
        "1": {"class_type": "FSTest_WeightFreeModel", "inputs": {"prediction": prediction}},
        "2": {"class_type": "FSTest_ExactGaussianModel", "inputs": {"model": ["1", 0], "mu": MU, "s": S,
                                                                     "flow_shift": flow_shift}},
        "3": {"class_type": "FSTest_ZeroConditioning", "inputs": {}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "5": {"class_type": "BasicScheduler", "inputs": {"model": ["2", 0], "scheduler": "karras" if not flow_shift else "simple",
                                                         "steps": steps, "denoise": 1.0}},
        "6": {"class_type": "SamplerCustom", "inputs": {"model": ["2", 0], "add_noise": True, "noise_seed": seed,
                                                        "cfg": 1.0, "positive": ["3", 0], "negative": ["3", 0],
                                                        "sampler": sampler_ref, "sigmas": ["5", 0],
                                                        "latent_image": ["4", 0]}},
        "7": {"class_type": "FSTest_CaptureLatent", "inputs": {"samples": ["6", 0], "label": "out"}},
        "8": {"class_type": "FSTest_CaptureSigmas", "inputs": {"sigmas": ["5", 0], "label": "sigmas"}},
    }
    prompt.update(sampler_nodes)
    return prompt


def ancestral_std(sigmas, eta: float, s=S) -> float:
    """Exact std of first-order ancestral sampling (k-diffusion's get_ancestral_step with eta; DDIM(eta)
    in VE form) on data N(mu, s^2) started from pure noise: every step is linear in x, so the variance
    follows Var' = (A + B k)^2 Var + sigma_up^2 with A = sigma_down / sigma, B = 1 - A, k = s^2 / (s^2 +
    sigma^2); the last step returns D = k x. At eta > 0 and 10 steps this is well below the data's
    spread (first-order SDE discretisation), not a sampler defect."""
    sig = [float(v) for v in sigmas]
    var = sig[0] ** 2
    for i in range(len(sig) - 1):
        sigma, nxt = sig[i], sig[i + 1]
        k = s**2 / (s**2 + sigma**2)
        if nxt == 0:
            return k * math.sqrt(var)
        up = min(nxt, eta * math.sqrt(nxt**2 * (sigma**2 - nxt**2) / sigma**2))
        a = math.sqrt(nxt**2 - up**2) / sigma
        var = (a + (1 - a) * k) ** 2 * var + up**2
    raise ValueError("the schedule must end in 0")


def check_gaussian(latent, sigma_min, flow=False, mu=MU, s=S, expected_std=None):
    """Data N(mu, s^2) per element in model space. Every sampler ends with x = D(x, sigma_min),
    the posterior mean, whose spread is s * a s / sqrt(a^2 s^2 + sigma_min^2) (a = 1 - sigma for
    flow, 1 otherwise): the exact answer for the samples' std of an exact ODE solve; stochastic
    first-order samplers pass their own ``expected_std`` (``ancestral_std``)."""
    x = latent.to(torch.float64) * SD1_SCALE
    assert torch.isfinite(x).all()
    a = 1 - sigma_min if flow else 1.0
    if expected_std is None:
        expected_std = s * a * s / math.sqrt(a**2 * s**2 + sigma_min**2)
    assert abs(float(x.mean()) - mu) < 0.2 * expected_std + 0.005, float(x.mean())
    assert abs(float(x.std()) / expected_std - 1) < 0.15, (float(x.std()), expected_std)




def ksampler_graph(sampler_name: str, steps=10, seed=1) -> dict:
    """The stock KSampler on the exact-Gaussian model with a dropdown sampler name."""
    return {
        "1": {"class_type": "FSTest_WeightFreeModel", "inputs": {"prediction": "eps"}},
        "2": {"class_type": "FSTest_ExactGaussianModel", "inputs": {"model": ["1", 0], "mu": MU, "s": S, "flow_shift": 0.0}},
        "3": {"class_type": "FSTest_ZeroConditioning", "inputs": {}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": seed, "steps": steps, "cfg": 1.0,
                                                   "sampler_name": sampler_name, "scheduler": "karras", "positive": ["3", 0],
                                                   "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "7": {"class_type": "FSTest_CaptureLatent", "inputs": {"samples": ["5", 0], "label": "out"}},
    }
