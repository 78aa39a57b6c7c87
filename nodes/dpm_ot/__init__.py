"""DPM-OT nodes: target pools, the OT fit, map files, the sampler and its SIGMAS helper."""
from .common import (
    CAT, FOLDER, HONEST_NOTE, JUNCTION_TOOLTIP, OT_MAP, OT_TARGETS, check_junction_for_model, conditioning_tag,
    data_latents, model_identity, pool_report,
)
from .map import FitMap, LoadMap, SaveMap, checkpoint_path, package_version
from .sampler import DPMOTSampler, DPMOTSigmas
from .targets import TargetsFromLatents, TargetsInvert, TargetsSelfGenerate

NODES = [TargetsFromLatents, TargetsSelfGenerate, TargetsInvert, FitMap, SaveMap, LoadMap, DPMOTSampler, DPMOTSigmas]

__all__ = [
    "CAT", "FOLDER", "HONEST_NOTE", "JUNCTION_TOOLTIP", "OT_MAP", "OT_TARGETS", "check_junction_for_model",
    "conditioning_tag", "data_latents", "model_identity", "pool_report", "checkpoint_path", "package_version",
    "TargetsFromLatents", "TargetsSelfGenerate", "TargetsInvert", "FitMap", "SaveMap", "LoadMap", "DPMOTSampler",
    "DPMOTSigmas", "NODES",
]
