"""Registers the pack's parameter-free presets in KSampler's sampler dropdown.

ComfyUI resolves a dropdown name via ``getattr(comfy.k_diffusion.sampling, "sample_" + name)``;
we add prefixed functions there and append the names to both name lists, in place and only
once, never touching ComfyUI's own entries."""
from __future__ import annotations


def register_ksampler_presets(presets: dict) -> list[str]:
    """presets: {name: sampler function} (``samplers.presets.SAMPLERS``); returns the names now in the dropdown."""
    import comfy.k_diffusion.sampling as k_sampling
    import comfy.samplers as samplers

    for name, fn in presets.items():
        if not name.startswith("fs_"):
            raise ValueError(f"Dropdown preset {name!r} must carry the pack prefix 'fs_'.")
        setattr(k_sampling, "sample_" + name, fn)
        for names in (samplers.KSAMPLER_NAMES, samplers.SAMPLER_NAMES):
            if name not in names:
                names.append(name)
    return list(presets)


def register_model_folder(key: str, subfolder: str, extensions: set) -> str:
    """models/<subfolder> under the folder_paths key ``key`` (idempotent; keeps user-mapped paths)."""
    import os

    import folder_paths

    path = os.path.join(folder_paths.models_dir, subfolder)
    if key in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(key, path)
    else:
        folder_paths.folder_names_and_paths[key] = ([path], set(extensions))
    os.makedirs(path, exist_ok=True)
    return path
