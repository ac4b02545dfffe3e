"""Model throughput: training-step and DDIM-sampling cells/s per size preset. Prints JSON.

    python benchmarks/model_throughput.py                       # debug, small, base on CPU (+ GPU if present)
    python benchmarks/model_throughput.py --presets debug --genes 500 --set-size 64

A training step is one forward + backward of ``training_step`` (self-conditioning pass off, so
every step costs the same) and an optimizer step; a cell is one cell of the perturbed set (its
control cell rides along). Sampling is DDIM (eta = 0) with the control stream; cells/s is quoted
for the full ``--sample-steps`` trajectory, measured over ``--measure-sample-steps`` steps.
On CUDA the model runs in bf16 autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time

import torch

import perturbdiff as pdiff


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(preset: str, device: torch.device, args) -> dict:
    torch.manual_seed(0)
    config = pdiff.PerturbDiffConfig.from_preset(preset, num_genes=args.genes, perturbation_names=["p"])
    model = pdiff.PerturbDiffModel(config).to(device)
    diff = pdiff.GaussianDiffusion.from_config(config)
    B, m, G = args.sets, args.set_size, args.genes
    batch = {
        "x0": torch.rand(B, m, G, device=device),
        "control": torch.rand(B, m, G, device=device),
        "perturbation": torch.ones(B, dtype=torch.long, device=device),
    }
    objective = pdiff.Objective(self_cond_prob=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def train_step():
        with amp:
            loss = pdiff.training_step(model, diff, batch, objective)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        train_step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        train_step()
    _sync(device)
    train_s = (time.perf_counter() - t0) / args.train_steps

    with amp:
        pdiff.sample_sets(model, diff, control=batch["control"], perturbation=batch["perturbation"], num_steps=1)
        _sync(device)
        t0 = time.perf_counter()
        pdiff.sample_sets(model, diff, control=batch["control"], perturbation=batch["perturbation"],
                       num_steps=args.measure_sample_steps)
        _sync(device)
    per_step = (time.perf_counter() - t0) / args.measure_sample_steps
    return {
        "preset": preset,
        "device": str(device),
        "dtype": "bf16-autocast" if device.type == "cuda" else "fp32",
        "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "sets": B,
        "set_size": m,
        "genes": G,
        "train_step_s": round(train_s, 4),
        "train_cells_per_s": round(B * m / train_s, 1),
        "sample_steps": args.sample_steps,
        "sample_cells_per_s": round(B * m / (per_step * args.sample_steps), 1),
        "sample_step_s": round(per_step, 4),
        "peak_gpu_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["debug", "small", "base"])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--set-size", type=int, default=256)
    p.add_argument("--sets", type=int, default=8, help="sets per micro-batch (paper: 8)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--sample-steps", type=int, default=100, help="DDIM steps the cells/s figure is quoted for")
    p.add_argument("--measure-sample-steps", type=int, default=3)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = p.parse_args()
    devices = [torch.device("cpu")]
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices = [torch.device("cuda")] if args.device == "cuda" else devices + [torch.device("cuda")]
    results = [bench(preset, dev, args) for dev in devices for preset in args.presets]
    print(json.dumps({
        "benchmark": "model_throughput",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
