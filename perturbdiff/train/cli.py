"""The command line of ``pretrain/run.py`` and ``finetune/run.py``: flags -> `TrainConfig` -> `Trainer`."""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

from ..data.remote import RemoteStoreError, location_name
from .config import TrainConfig, flatten, load_train_config

__all__ = ["build_arg_parser", "config_from_args", "main"]

_COLUMN_FLAGS = ("perturbation_key", "control_label", "context_key", "batch_key", "dose_key", "input_log1p")


def build_arg_parser(description: str, default_config: str | os.PathLike, *, finetune: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config key can be overridden as key.sub=value (YAML value), e.g. optim.lr=1e-3 train.ema_decay=0",
    )
    p.add_argument("--config", default=str(default_config), help="YAML config (default: %(default)s)")
    p.add_argument("--atlas", nargs="+", help="atlas store(s): paths or s3://, gs://, az:// URIs (default: the built-in synthetic atlas)")
    p.add_argument("--atlas-weights", nargs="+", type=float, help="mixing weight per atlas")
    p.add_argument("--output-dir", help="where checkpoints, logs and the export go")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--deepspeed", help="DeepSpeed JSON (ds_configs/zero1.json, zero2.json, zero3.json, zero3_offload.json)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its latest intact checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output-dir (refused otherwise)")
    p.add_argument("--seed", type=int)
    p.add_argument("--preset", help="model size preset (debug, small, base, large)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="publish the final export to the hub")
    g = p.add_argument_group(".h5ad inputs (built into OUTPUT/atlases first)")
    g.add_argument("--perturbation-key", help="obs column of the perturbation")
    g.add_argument("--control-label", help="perturbation label of control cells")
    g.add_argument("--context-key", help="obs column of the context: cell type / line")
    g.add_argument("--batch-key", help="obs column of the batch")
    g.add_argument("--dose-key", help="obs column of the dose")
    g.add_argument("--input-log1p", action="store_true", default=None, help="X holds log1p-normalised values")
    g = p.add_argument_group("split (held-out cells are never trained on)")
    g.add_argument("--heldout-contexts", nargs="+", help="held-out contexts (test = these x held-out perturbations)")
    g.add_argument("--heldout-perturbations", nargs="+", help="held-out perturbations")
    g.add_argument("--split-file", help="a split file (STATE TOML or JSON)")
    if finetune:
        g = p.add_argument_group("finetuning")
        g.add_argument("--base", help="a pretrained export (from_pretrained folder) to start from")
        g.add_argument("--screen", nargs="+", help="the screen: atlas(es) or .h5ad file(s) (same as --atlas)")
        g.add_argument("--new-genes", choices=["add", "drop"], help="screen genes the base lacks: add rows or drop them")
        g.add_argument("--perturbation-features", help="a perturbation feature table (perturbdiff features): the model "
                       "knows perturbations by their features and can predict ones it never saw")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def config_from_args(args) -> TrainConfig:
    """The run's config: the YAML file, then its ``key=value`` overrides, then the flags."""
    get = lambda name: getattr(args, name, None)  # noqa: E731  (finetuning flags are absent in pretraining)
    if args.atlas and get("screen"):
        raise ValueError("give the data with --atlas or --screen, not both")
    flags = {
        "data.atlas": args.atlas or get("screen"), "data.weights": args.atlas_weights, "output_dir": args.output_dir,
        "train.max_steps": args.max_steps, "deepspeed": args.deepspeed, "train.seed": args.seed,
        "model.preset": args.preset, "push_to_hub": args.push_to_hub, "resume": args.resume or None, "overwrite": args.overwrite or None,
        "model.base": get("base"), "model.new_genes": get("new_genes"), "data.split_file": get("split_file"),
        "data.perturbation_features": get("perturbation_features"),
        "data.heldout_contexts": get("heldout_contexts"), "data.heldout_perturbations": get("heldout_perturbations"),
    }
    extra = {k: v for k, v in flags.items() if v is not None}
    columns = {k: get(k) for k in _COLUMN_FLAGS if get(k) is not None}
    cfg = load_train_config(args.config, args.overrides)
    flat = flatten(cfg.to_dict())
    if columns:
        flat["data.columns"] = {**cfg.data.columns, **columns}
    return load_train_config(None, {**flat, **extra})


def main(argv: list[str] | None = None, *, description: str = "PerturbDiff training",
         default_config: str | os.PathLike, finetune: bool = False) -> Path:
    """Entry point of ``pretrain/run.py`` and ``finetune/run.py``: parse, build the trainer, fit, export."""
    parser = build_arg_parser(description, default_config, finetune=finetune)
    args = parser.parse_intermixed_args(argv)  # key=value overrides may stand between the flags
    try:
        return _train(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, RemoteStoreError) as err:
        # bad input and diverged runs end with one line naming the problem, and a non-zero exit
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        parser.exit(2, f"{parser.prog}: error: {err.strerror}\n")


def _train(args) -> Path:
    import torch

    from .loop import Trainer

    cfg = config_from_args(args)
    factory, card = None, {}
    if cfg.model.base:
        from functools import partial

        from ..adapt import adapt_pretrained

        def factory(vocab: dict):
            return adapt_pretrained(cfg.model.base, **vocab, new_genes=cfg.model.new_genes,
                                    overrides=cfg.model.overrides, min_shared_genes=cfg.model.min_shared_genes,
                                    seed=cfg.train.seed, log=partial(print, flush=True))

        card = {"base model": cfg.model.base, "screen": ", ".join(location_name(a) for a in cfg.data.atlas)}
    try:
        return Trainer(cfg, model_factory=factory, model_card=card).fit()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
