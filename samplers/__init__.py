"""Pure-torch samplers in the k-diffusion calling convention (no ComfyUI import)."""
from .schedule import NoiseSchedule, resolve_schedule
from .er_sde import sample_er_sde, NOISE_FUNCTIONS
from .classic import sample_euler, sample_heun, sample_dpmpp_2m
from .ddim_gmm import sample_ddim_gmm
from .bridge import BridgeSchedule
from .dbim import BridgeDenoiser, encode_dbim, interpolate_dbim, sample_dbim, sample_ddbm_heun

__all__ = [
    "NoiseSchedule", "resolve_schedule",
    "sample_er_sde", "NOISE_FUNCTIONS",
    "sample_euler", "sample_heun", "sample_dpmpp_2m",
    "sample_ddim_gmm",
    "BridgeSchedule", "BridgeDenoiser", "sample_dbim", "sample_ddbm_heun", "encode_dbim", "interpolate_dbim",
]
