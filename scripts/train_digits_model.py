"""Train the digits test-bed models (testbeds/digits_eps.safetensors, testbeds/digits_flow.safetensors).

    pip install -e ".[bench]" && python scripts/train_digits_model.py

scikit-learn's bundled ``load_digits`` (1797 8x8 images, no download) scaled to x0 = pixels / 8 - 1;
a fixed split keeps HOLD_OUT images for memorisation checks. Both networks (``DigitsNet``, fixed seeds)
train with Adam, a cosine learning rate and an EMA of the weights, which is what is stored (fp16
unless --fp32: the denoised outputs move by < 4e-3 RMS). "ve": eps prediction, x = x0 + sigma eps,
log sigma uniform on SD1.5's range, eps-MSE weighted by 1 + sigma^2 / sigma_data^2. "flow": velocity
v = eps - x0, x = (1 - t) x0 + t eps, t half uniform on [0, 1] (covers t = 1 and ComfyUI's shift-3
minimum 0.003), half logit-normal. About 3.5 min per network on 2 idle cores; on a busy machine
--threads 1 is much faster than 2.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from comfyui_fast_samplers.samplers.files import atomic_save_safetensors
from comfyui_fast_samplers.samplers.schedule import discrete_vp_sigmas
from comfyui_fast_samplers.testbeds.digits import FORMAT, DigitsModel, DigitsNet, default_path

SCALING = {"scale": 0.125, "offset": -1.0}  # x0 = scale * pixels + offset, pixels 0..16
SPLIT_SEED, HOLD_OUT = 0, 297


def sigma_range_of(parametrization: str) -> tuple[float, float]:
    """(sigma_min, sigma_max): SD1.5's discrete table for "ve"; for "flow" ComfyUI's shift-3 minimum
    and pure noise (training covers all of t in [0, 1])."""
    if parametrization == "ve":
        table = discrete_vp_sigmas()
        return float(table[0]), float(table[-1])
    return 0.003, 1.0


def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """(training images [1500, 64], held-out images [297, 64]) in model units, float32."""
    from sklearn.datasets import load_digits

    pixels = torch.as_tensor(load_digits().data, dtype=torch.float32)
    x0 = SCALING["scale"] * pixels + SCALING["offset"]
    perm = torch.randperm(len(x0), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return x0[perm[HOLD_OUT:]], x0[perm[:HOLD_OUT]]


def noisy_batch(x0: torch.Tensor, parametrization: str, sigma_range, sigma_data: float, generator) -> tuple:
    """(x_t, sigma, regression target, loss weight) for a batch of clean images.

    The eps loss is weighted by 1 + sigma^2 / sigma_data^2 (EDM's weighting of the x0 error): an eps
    error costs sigma times more in x0 at high noise, and plain eps-MSE leaves x0 badly off there."""
    n = len(x0)
    noise = torch.randn(x0.shape, generator=generator)
    if parametrization == "ve":
        lo, hi = math.log(sigma_range[0]), math.log(sigma_range[1])
        sigma = torch.exp(lo + (hi - lo) * torch.rand(n, generator=generator))
        return x0 + sigma[:, None] * noise, sigma, noise, 1 + sigma[:, None] ** 2 / sigma_data**2
    uniform = torch.rand(n, generator=generator)
    logit_normal = torch.sigmoid(torch.randn(n, generator=generator))
    t = torch.where(torch.rand(n, generator=generator) < 0.5, uniform, logit_normal)
    return (1 - t[:, None]) * x0 + t[:, None] * noise, t, noise - x0, 1.0


def evaluate(model: DigitsModel, x0: torch.Tensor, sigma_range, repeats: int = 8) -> float:
    """Mean training loss of the model over ``repeats`` fixed noise draws of every image."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        losses = [(w * (model.predict(x, s) - target) ** 2).mean()
                  for x, s, target, w in (noisy_batch(x0, model.parametrization, sigma_range, model.sigma_data, g)
                                          for _ in range(repeats))]
    return float(torch.stack(losses).mean())


def train(parametrization: str, train_x0: torch.Tensor, held_out: torch.Tensor, args) -> tuple[DigitsModel, dict]:
    torch.manual_seed(args.seed)
    sigma_range = sigma_range_of(parametrization)
    sigma_data = float(train_x0.std())
    net = DigitsNet(args.width, args.depth, args.frequencies)
    ema = copy.deepcopy(net).requires_grad_(False)
    model = DigitsModel(net, parametrization, *sigma_range, sigma_data, SCALING, train_x0.mean(0), train_x0.std(0))
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.iterations, eta_min=args.lr * 0.01)
    g = torch.Generator().manual_seed(args.seed)
    start, running = time.perf_counter(), 0.0
    for it in range(1, args.iterations + 1):
        idx = torch.randint(len(train_x0), (args.batch,), generator=g)
        x, sigma, target, weight = noisy_batch(train_x0[idx], parametrization, sigma_range, sigma_data, g)
        loss = (weight * (model.predict(x, sigma) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - args.ema)
        running = 0.99 * running + 0.01 * loss.item() if it > 1 else loss.item()
        if it % 2000 == 0 or it == args.iterations:
            print(f"  {parametrization} it {it:6d}  loss (running) {running:.4f}  {time.perf_counter() - start:6.1f} s")
    model.net = ema.eval()
    seconds = time.perf_counter() - start
    info = {"seed": args.seed, "iterations": args.iterations, "batch": args.batch, "lr": args.lr,
            "lr_schedule": "cosine to lr/100", "optimizer": "Adam", "ema": args.ema,
            "noise_distribution": "log-uniform sigma" if parametrization == "ve"
            else "t: 50% uniform[0, 1], 50% logit-normal(0, 1)",
            "loss": "MSE of eps, weighted by 1 + sigma^2 / sigma_data^2" if parametrization == "ve"
            else "MSE of v = eps - x0",
            "split": {"seed": SPLIT_SEED, "held_out": HOLD_OUT, "train": len(train_x0)},
            "final_loss_train": evaluate(model, train_x0, sigma_range),
            "final_loss_held_out": evaluate(model, held_out, sigma_range),
            "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "storage": "float32" if args.fp32 else "float16"}
    print(f"  {parametrization}: EMA loss train {info['final_loss_train']:.4f}, "
          f"held-out {info['final_loss_held_out']:.4f} ({seconds:.0f} s)")
    return model, info


def save(model: DigitsModel, info: dict, args) -> Path:
    dtype = torch.float32 if args.fp32 else torch.float16
    tensors = {f"net.{k}": v.to(dtype) for k, v in model.net.state_dict().items()}
    tensors.update({"data.mean": model.data_mean, "data.std": model.data_std})
    metadata = {"format": FORMAT, "parametrization": model.parametrization,
                "prediction": "eps" if model.parametrization == "ve" else "velocity",
                "sigma_min": repr(model.sigma_min), "sigma_max": repr(model.sigma_max),
                "sigma_data": repr(model.sigma_data), "data_scaling": json.dumps(SCALING),
                "network": json.dumps({"width": args.width, "depth": args.depth, "frequencies": args.frequencies}),
                "training": json.dumps(info)}
    path = Path(args.out_dir) / default_path(model.parametrization).name if args.out_dir \
        else default_path(model.parametrization)
    return atomic_save_safetensors(tensors, path, metadata, overwrite=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ve", "flow"], choices=["ve", "flow"])
    parser.add_argument("--iterations", type=int, default=24000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--frequencies", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fp32", action="store_true", help="store float32 weights (default float16)")
    parser.add_argument("--out-dir", default=None, help="default: the package's testbeds/ folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_x0, held_out = digits_data()
    for parametrization in args.models:
        model, info = train(parametrization, train_x0, held_out, args)
        print(f"  wrote {save(model, info, args)}")


if __name__ == "__main__":
    main()
