"""Running pack code where a sampler would run, through ComfyUI's CFGGuider (model loading, patches,
conditioning and cfg exactly as in any sampling node)."""
from __future__ import annotations


def conditioning_tensors(conditioning) -> list:
    """Every tensor of a CONDITIONING (for cache keys and provenance hashes)."""
    import torch

    return [c[0] for c in conditioning] + [v for c in conditioning for v in c[1].values()
                                           if isinstance(v, torch.Tensor)]


def run_inside_sampling(model, positive, negative, cfg, noise, latent, sigmas, seed, function):
    """Run ``function(k_model, x, sigmas, extra_args, callback, disable)`` as the sampler of a guided run."""
    import torch

    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    guider.sample(noise, latent, comfy.samplers.KSAMPLER(function), torch.as_tensor(sigmas, dtype=torch.float32),
                  seed=seed, disable_pbar=True)
