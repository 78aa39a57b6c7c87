"""Pure-torch samplers in the k-diffusion calling convention (no ComfyUI import)."""
from .schedule import NoiseSchedule, resolve_schedule
from .er_sde import sample_er_sde, NOISE_FUNCTIONS
from .classic import sample_euler, sample_heun, sample_dpmpp_2m
from .ddim_gmm import sample_ddim_gmm
from .bridges.schedule import BridgeSchedule
from .bridges.denoiser import BridgeDenoiser
from .bridges.dbim import encode_dbim, interpolate_dbim, sample_dbim
from .bridges.ddbm import sample_ddbm_heun
from .dp_schedule import optimize_schedule
from .presets import SAMPLERS
from .calibration import CalibrationReport, calibrate_schedule
from .step_tuning import StepTuning, sample_tuned
from .dpm_ot import OTMap, fit_ot_map, junction_schedule, load_ot_map, pool_from_clean, sample_dpm_ot, save_ot_map

__all__ = [
    "NoiseSchedule", "resolve_schedule",
    "sample_er_sde", "NOISE_FUNCTIONS",
    "sample_euler", "sample_heun", "sample_dpmpp_2m",
    "sample_ddim_gmm",
    "BridgeSchedule", "BridgeDenoiser", "sample_dbim", "sample_ddbm_heun", "encode_dbim", "interpolate_dbim",
    "optimize_schedule",
    "SAMPLERS", "calibrate_schedule", "CalibrationReport", "StepTuning", "sample_tuned",
    "OTMap", "pool_from_clean", "fit_ot_map", "save_ot_map", "load_ot_map", "sample_dpm_ot", "junction_schedule",
]
