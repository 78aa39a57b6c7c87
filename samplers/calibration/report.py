"""The calibrator's report and its on-disk cache (safetensors, written atomically by ``files``)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..step_tuning import TUNING_SETS

VERSION = "3"  # 2: sampler_options may hold step_tuning; 3: with noise extrapolations, fitted with the schedule


@dataclass
class CalibrationReport:
    steps: int
    sampler: str
    sigmas: list
    calibration_error: float
    holdout_error: float | None
    stock: dict = field(default_factory=dict)  # name -> (calibration error, hold-out error)
    teacher_error: float | None = None  # estimated error of the teacher's final output
    model_calls: dict = field(default_factory=dict)  # stage -> batched calls (one per N noises)
    sampler_options: dict = field(default_factory=dict)  # options the calibration chose (pack samplers)
    seconds: float = 0.0
    warnings: list = field(default_factory=list)
    cached: bool = False

    def best_stock(self, key: int = 1):
        rows = {k: v for k, v in self.stock.items() if v[key] is not None}
        return min(rows.items(), key=lambda kv: kv[1][key]) if rows else None

    def to_text(self) -> str:
        held = self.holdout_error is not None
        col = 1 if held else 0
        lines = [f"Calibrated schedule for {self.sampler}, {self.steps} steps"
                 + (" (from the cache: no model calls)" if self.cached else ""),
                 "sigmas: " + ", ".join(f"{s:.4g}" for s in self.sigmas),
                 f"error vs the model's own fine solve (mean per-sample L2, {'hold-out' if held else 'calibration'} "
                 f"noises): calibrated {[self.calibration_error, self.holdout_error][col]:.4g}"]
        for name, errors in sorted(self.stock.items(), key=lambda kv: (kv[1][col] is None, kv[1][col] or 0.0)):
            if errors[col] is not None:
                lines.append(f"  {name}: {errors[col]:.4g}")
        if held:
            lines.append(f"calibration-batch error {self.calibration_error:.4g} (hold-out / calibration "
                         f"{self.holdout_error / max(self.calibration_error, 1e-30):.2f})")
        if self.teacher_error is not None:
            lines.append(f"teacher error (estimate): {self.teacher_error:.3g}")
        plain = {k: v for k, v in self.sampler_options.items() if k != "step_tuning"}
        if plain:
            lines.append("sampler options chosen: " + ", ".join(f"{k}={v}" for k, v in plain.items()))
        tuning = self.sampler_options.get("step_tuning")
        if tuning:
            sets = [(name.replace("_", " ") + "s", tuning.get(name)) for name in TUNING_SETS]
            lines.append("step tuning (in the SAMPLER output; for this schedule only): " + "; ".join(
                f"{label} " + ", ".join(f"{v:+.3f}" for v in values) for label, values in sets if values))
        calls = ", ".join(f"{k} {v}" for k, v in self.model_calls.items())
        lines.append(f"model calls (batched): {sum(self.model_calls.values())} ({calls}); {self.seconds:.1f} s")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def load_cached(folder, key: str):
    """(sigmas, report) stored under ``key``, or None (missing or unreadable: the calibration runs again)."""
    from safetensors import safe_open

    path = Path(folder) / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            sigmas, meta = f.get_tensor("sigmas"), f.metadata()
        fields = json.loads(meta["report"])
    except Exception:  # damaged: left in place, recomputed
        return None
    report = CalibrationReport(**{**fields, "cached": True, "model_calls": {}, "seconds": 0.0})
    return sigmas, report


def save_cached(folder, key: str, sigmas: torch.Tensor, report: CalibrationReport) -> None:
    from ..files import atomic_save_safetensors

    atomic_save_safetensors({"sigmas": sigmas}, Path(folder) / f"{key}.safetensors", overwrite=True,
                            metadata={"format": "fs_calibration/" + VERSION, "report": json.dumps(asdict(report))})
