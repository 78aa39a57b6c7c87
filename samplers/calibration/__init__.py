"""Data-free schedule calibration for the user's own model and sampler (shared/specs/calibration.md)."""
from .pipeline import CalibrationReport, calibrate_schedule, resolve_sampler

__all__ = ["CalibrationReport", "calibrate_schedule", "resolve_sampler"]
