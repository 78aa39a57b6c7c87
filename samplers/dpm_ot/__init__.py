"""DPM-OT (Li et al., ICCV 2023, arXiv 2307.11308): an optimal-transport lookup into a pool of latents
at a junction noise level sigma_j, then a few ordinary reverse steps ("finisher").

What the method is (spec dpm_ot.md section 0): a semi-discrete OT map T_h(eps) = y_argmax_i(<eps, y_i> + h_i)
sends ComfyUI's Gaussian unit noise to one of N stored latents y_i (already at sigma_j) with equal mass 1/N.
The start of the finishing run therefore has the law of a uniformly random pick from the pool: it can
never mix modes, and with a deterministic finisher there are at most N distinct outputs.

Differences from the release, on purpose: Gaussian source (what ComfyUI draws, not uniform [0,1]),
centred targets, an exact low-rank factor of the score covariance, decaying Adam steps with Polyak
averaging, fp32 scores, a stopping rule at the Monte-Carlo evaluation floor.
"""
from .fit import STOP_FACTOR, FitResult, cell_masses, evaluation_floor, fit_heights, fit_ot_map, mass_errors
from .map import (
    COST, FORMAT, REQUIRED_METADATA, SIGMA_TOLERANCE, SOURCE, VERSION, OTMap, check_clean_latents, check_junction,
    load_ot_map, map_metadata, save_ot_map,
)
from .sampling import (
    FINISHERS, PLACEMENT_SEED_OFFSET, PLACEMENTS, assign_targets, check_map_matches, junction_schedule,
    model_latent_format, place, sample_dpm_ot, unit_noise,
)
from .scoring import TILE_ELEMENTS, exact_fp32_matmul, score_factor, tiled_argmax, tiled_top2
from .targets import invert_to_junction, junction_prefix, pool_from_clean

__all__ = [
    "FORMAT", "VERSION", "SOURCE", "COST", "REQUIRED_METADATA", "SIGMA_TOLERANCE", "OTMap", "check_junction",
    "check_clean_latents", "map_metadata", "save_ot_map", "load_ot_map",
    "pool_from_clean", "junction_prefix", "invert_to_junction",
    "TILE_ELEMENTS", "exact_fp32_matmul", "tiled_argmax", "tiled_top2", "score_factor",
    "STOP_FACTOR", "FitResult", "cell_masses", "mass_errors", "evaluation_floor", "fit_heights", "fit_ot_map",
    "PLACEMENTS", "FINISHERS", "PLACEMENT_SEED_OFFSET", "model_latent_format", "check_map_matches", "unit_noise",
    "assign_targets", "place", "sample_dpm_ot", "junction_schedule",
]
