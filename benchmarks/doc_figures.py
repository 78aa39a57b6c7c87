"""Pictures for docs/: DDIM-GMM distribution error vs NFE, and ELBO-optimal schedules vs stock ones.

    python benchmarks/doc_figures.py     # writes docs/ddim_gmm.png and docs/dp_schedule.png (~1 min, CPU)"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from comfyui_fast_samplers.samplers.ddim_gmm import sample_ddim_gmm  # noqa: E402
from comfyui_fast_samplers.samplers.dp_schedule import optimize_schedule  # noqa: E402
from comfyui_fast_samplers.samplers.schedule import discrete_vp_sigmas, karras_sigmas  # noqa: E402
from comfyui_fast_samplers.testbeds.mixtures import ExactModel, random_mixture, sliced_w2  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
MIX = random_mixture(16, 4, seed=0, spread=0.5, std=0.05)  # the specs' 4-mode toy in d = 16


def ddim_gmm_figure(samples=10_000):
    model = ExactModel(MIX, "ve")
    data, _ = MIX.sample(samples, torch.Generator().manual_seed(0))
    x = 14.6 * torch.randn(samples, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    variants = {"DDIM": {"components": 1}, "GMM strict": {"covariance": "strict", "scale": 0.9, "scale_units": "relative"},
                "GMM vub s=0.2": {"covariance": "vub", "scale": 0.2}, "GMM vub s=1": {"covariance": "vub", "scale": 1.0}}
    nfes = (5, 10, 20)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, eta in zip(axes, (0.0, 0.5, 1.0)):
        for name, opts in variants.items():
            errs = [sliced_w2(sample_ddim_gmm(model, x, karras_sigmas(n, 0.029, 14.6), extra_args={"seed": 0}, eta=eta,
                                              disable=True, **opts), data) for n in nfes]
            ax.plot(nfes, errs, marker="o", label=name)
        ax.set_title(f"eta = {eta}")
        ax.set_xlabel("NFE")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("sliced W2 to the data")
    axes[0].legend(fontsize=8)
    fig.suptitle("DDIM vs DDIM-GMM on the exact 4-mode model (d = 16)")
    fig.tight_layout()
    fig.savefig(DOCS / "ddim_gmm.png", dpi=100)
    plt.close(fig)


def dp_schedule_figure(steps=10):
    model = ExactModel(MIX, "ve")
    data, _ = MIX.sample(64, torch.Generator().manual_seed(1))
    grid = discrete_vp_sigmas()[::4]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for variance in ("small", "large"):
        sigmas, _ = optimize_schedule(model, data, steps, grid, variance=variance, seed=0)
        ax.semilogy(range(steps), sigmas[:-1], marker="o", label=f"ELBO-DP ({variance} variance)")
    ax.semilogy(range(steps), karras_sigmas(steps, float(grid[0]), float(grid[-1]))[:-1], marker="s", label="karras")
    ax.semilogy(range(steps), torch.linspace(float(grid[-1]), float(grid[0]), steps), marker="^", label="uniform")
    ax.set_xlabel("step")
    ax.set_ylabel("sigma")
    ax.set_title(f"{steps}-step schedules for the exact 4-mode model (SD1.5 sigma table)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "dp_schedule.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    ddim_gmm_figure()
    dp_schedule_figure()
    print("wrote", DOCS / "ddim_gmm.png", DOCS / "dp_schedule.png")
