"""Training throughput of the real entry script (``pretrain/run.py``): cells/s per optimizer step.

    python benchmarks/train_throughput.py                   # debug + small, 1 and 2 processes, DDP and ZeRO-2 (CPU)
    python benchmarks/train_throughput.py --presets base --gpu   # on a GPU machine: base in bf16, with MFU

Each configuration is a separate launch on a synthetic atlas (``--genes`` genes); the figure is the
median of the per-step cells/s the trainer logs, after ``--skip`` warm-up steps. Launch overhead
(imports, DeepSpeed init) is excluded. Model FLOPs utilisation (GPU only) counts 6 x parameters x
tokens per step (forward + backward; tokens = perturbed + control cells) plus the attention matmuls,
against ``--peak-tflops`` (default: H100 SXM dense bf16, 989).
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(atlas, out, preset, processes, deepspeed, args, env) -> dict:
    if processes == 1:
        cmd = [sys.executable, str(ROOT / "pretrain" / "run.py")]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(ROOT / "pretrain" / "run.py")]
    cmd += ["--config", str(ROOT / "pretrain" / "configs" / "default.yaml"), "--atlas", str(atlas),
            "--output-dir", str(out), "--overwrite", "--preset", preset, "--max-steps", str(args.steps),
            f"data.set_size={args.set_size}", f"data.batch_size={args.sets}", "train.log_every=1",
            "train.val_every=0", "train.save_every=0", "train.tracker=none", "data.val_fraction=0"]
    if deepspeed:
        cmd += ["--deepspeed", str(ROOT / "ds_configs" / f"{deepspeed}.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["cells_per_s"] for r in rows if r["step"] > args.skip and "cells_per_s" in r]
    return {"cells_per_s": round(statistics.median(speeds), 1), "steps_measured": len(speeds)}


def mfu(preset, genes, set_size, cells_per_s, peak_tflops) -> float:
    import perturbdiff as pdiff

    cfg = pdiff.PerturbDiffConfig.from_preset(preset, num_genes=genes)
    params = sum(p.numel() for p in pdiff.PerturbDiffModel(cfg).parameters())
    tokens_per_cell = 2  # a perturbed token and its control token
    attn = 4 * cfg.num_layers * cfg.hidden_size * (2 * set_size)  # QK^T and AV per token, forward
    flops_per_cell = tokens_per_cell * (6 * params + 3 * attn)
    return cells_per_s * flops_per_cell / (peak_tflops * 1e12)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["debug", "small"])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--cells", type=int, default=20000, help="cells in the synthetic atlas")
    p.add_argument("--set-size", type=int, default=64)
    p.add_argument("--sets", type=int, default=8, help="sets per micro-batch per process")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the median")
    p.add_argument("--gpu", action="store_true", help="one process on the GPU in bf16 (with MFU)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--timeout", type=int, default=900)
    args = p.parse_args()

    from perturbdiff.data import make_synthetic_atlas

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        atlas = make_synthetic_atlas(Path(tmp) / "bench.zarr", num_cells=args.cells, num_genes=args.genes)
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        if args.gpu:
            setups = [(1, None)]
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
            setups = [(1, None), (2, None), (2, "zero2")]
        for preset in args.presets:
            for processes, ds in setups:
                out = Path(tmp) / f"{preset}-{processes}-{ds}"
                r = run(atlas, out, preset, processes, ds, args, env)
                row = {"preset": preset, "processes": processes, "backend": ds or ("ddp" if processes > 1 else "single"),
                       "device": "cuda-bf16" if args.gpu else "cpu-fp32", **r}
                if args.gpu and "cells_per_s" in r:
                    row["mfu"] = round(mfu(preset, args.genes, args.set_size, r["cells_per_s"], args.peak_tflops), 4)
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    base = {(r["preset"]): r.get("cells_per_s") for r in results if r["processes"] == 1}
    for r in results:
        if r.get("cells_per_s") and base.get(r["preset"]):
            r["speedup_vs_1_process"] = round(r["cells_per_s"] / base[r["preset"]], 2)
    print(json.dumps({"benchmark": "train_throughput", "genes": args.genes, "set_size": args.set_size,
                      "sets_per_process": args.sets, "results": results}, indent=2))


if __name__ == "__main__":
    main()
