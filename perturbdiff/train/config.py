"""The run configuration: typed sections, YAML + ``key.sub=value`` overrides, validation.

A run is a YAML file (``pretrain/configs/*.yaml``, ``finetune/configs/*.yaml``) plus overrides
given on the command line. Every key is a field of a section below; an unknown key, a value of the
wrong type or out of range is an error that names the key, raised before any work starts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from ..configuration import check_hidden_covariates
from ..objective import Objective, ObjectiveSettings

__all__ = ["TrainConfig", "ModelSection", "DataSection", "OptimSection", "TrainSection", "load_train_config",
           "flatten", "config_differences", "lr_at", "resolve_deepspeed_config"]


@dataclass
class ModelSection:
    preset: str = "small"
    overrides: dict = field(default_factory=dict)  # any PerturbDiffConfig field, e.g. num_layers
    base: str | None = None  # a pretrained export to start from (finetuning)
    new_genes: str = "add"  # screen genes the base lacks: "add" (new rows) or "drop"
    min_shared_genes: float = 0.5  # finetuning: the share of the base's genes the screen must have


@dataclass
class DataSection:
    atlas: list = field(default_factory=list)  # atlas paths; empty = the built-in synthetic atlas
    weights: list | None = None  # mixing weights per atlas
    set_size: int = 64  # cells per set (m)
    batch_size: int = 8  # sets per micro-batch per process
    num_workers: int = 0
    heldout_contexts: list = field(default_factory=list)
    heldout_perturbations: list = field(default_factory=list)
    split_file: str | None = None
    # a perturbation feature table (`perturbdiff features`; conditional training): the model then
    # knows a perturbation by its features, so it can predict one it never saw
    perturbation_features: str | None = None
    # covariates the model is never told ("batch", "context"): sets are still drawn within one
    # batch / context and paired with its controls, so the model learns how populations vary across
    # them (replicates, donors, patients), and `--num-populations K` draws K of them
    hidden_covariates: list = field(default_factory=list)
    val_fraction: float = 0.05  # training (context, perturbation) pairs held out for the validation loss
    val_batches: int = 4  # micro-batches per process per validation
    # .h5ad inputs in `atlas` are built into OUTPUT/atlases/<name>.zarr first, with these
    # `build_atlas` arguments (perturbation_key, control_label, context_key, batch_key, dose_key, ...)
    columns: dict = field(default_factory=dict)
    # the model's genes: "hvg" (the highly variable genes flagged at build, union over atlases; the
    # paper's pretraining vocabulary), "all" (every gene of the atlases: finetuning's default, since a
    # response can lie outside the HVGs), a number N (each atlas's N most variable genes) or a gene list file
    genes: str | int = "hvg"
    # batches travel as normalised CSR and are made dense on the training device ("auto": on a GPU,
    # where it cuts the loader's work and the host-to-device bytes; on CPU dense batches are as fast)
    sparse_batches: bool | str = "auto"


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclass
class TrainSection(ObjectiveSettings):
    """The loop's settings; the objective's own (cond_drop_prob, ...) come from `ObjectiveSettings`."""

    objective: str = "marginal"  # "marginal" (pretraining) or "conditional" (finetuning)
    max_steps: int = 200
    ema_decay: float = 0.999  # 0 disables the EMA (the export then uses the live weights)
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on GPU, fp32 (no) on CPU
    log_every: int = 10
    val_every: int = 100
    save_every: int = 100
    keep_last: int = 2
    export_every: int = 0
    tracker: str | None = "tensorboard"  # tensorboard | wandb | none
    stop_after_steps: int = 0  # >0: leave after this many steps of this invocation, with a checkpoint
    #                             (jobs under a cluster time limit; continue with --resume)
    record_sets: bool = False  # write the ids of every set each rank trained on (for tests)
    # consecutive optimizer steps with a non-finite loss or gradient that are skipped before the run
    # stops with an error (the last good checkpoint stays; no export is written)
    max_skipped_steps: int = 3


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "runs/pretrain"
    deepspeed: str | None = None  # a ds_configs/*.json file
    resume: bool = False
    overwrite: bool = False  # replace an earlier run in output_dir (otherwise a used output_dir is refused)
    push_to_hub: str | None = None  # a hub repo id; pushed after the final export

    def __post_init__(self):
        self.validate()

    def to_dict(self) -> dict:
        return asdict(self)

    def objective(self) -> Objective:
        return Objective(use_control=self.train.objective == "conditional", **self.train.settings())

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key of the first value out of range."""
        d, o, t = self.data, self.optim, self.train
        if t.objective not in ("marginal", "conditional"):
            raise ValueError(f"train.objective must be 'marginal' or 'conditional', got {t.objective!r}")
        t.check_objective()
        try:
            check_hidden_covariates(d.hidden_covariates)
        except ValueError as err:
            raise ValueError(f"data.{err}") from None
        for key, value, low in (("data.set_size", d.set_size, 1), ("data.batch_size", d.batch_size, 1),
                                ("data.num_workers", d.num_workers, 0), ("data.val_batches", d.val_batches, 0),
                                ("optim.grad_accum", o.grad_accum, 1), ("optim.warmup_steps", o.warmup_steps, 0),
                                ("train.max_steps", t.max_steps, 1), ("train.log_every", t.log_every, 1),
                                ("train.val_every", t.val_every, 0), ("train.save_every", t.save_every, 0),
                                ("train.keep_last", t.keep_last, 1), ("train.export_every", t.export_every, 0),
                                ("train.stop_after_steps", t.stop_after_steps, 0),
                                ("train.max_skipped_steps", t.max_skipped_steps, 0)):
            if value < low:
                raise ValueError(f"{key} must be >= {low}, got {value}")
        for key, value in (("optim.lr", o.lr), ("optim.grad_clip", o.grad_clip), ("optim.weight_decay", o.weight_decay)):
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"{key} must be a finite number >= 0, got {value}")
        if not o.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {o.lr}")
        if not 0 <= self.model.min_shared_genes <= 1:
            raise ValueError(f"model.min_shared_genes must be in [0, 1], got {self.model.min_shared_genes}")
        if not 0 <= d.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
        if not 0 <= t.ema_decay < 1:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
        if not 0 <= o.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        if self.model.new_genes not in ("add", "drop"):
            raise ValueError(f"model.new_genes must be 'add' or 'drop', got {self.model.new_genes!r}")
        if isinstance(d.genes, bool) or (isinstance(d.genes, int) and d.genes < 1):
            raise ValueError(f"data.genes must be 'hvg', 'all', a number >= 1 or a gene list file, got {d.genes!r}")
        if d.sparse_batches not in (True, False, "auto"):
            raise ValueError(f"data.sparse_batches must be true, false or 'auto', got {d.sparse_batches!r}")
        if d.weights is not None and len(d.weights) != len(d.atlas):
            raise ValueError(f"data.weights has {len(d.weights)} values for {len(d.atlas)} atlases")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in output_dir, --overwrite replaces it: give one of them")


# =========================================================================== reading
# Keys that may differ when a run is resumed: where it is, how long it runs (a longer run stretches the
# cosine schedule from the step it resumes at) and how it reports.
RESUMABLE_CHANGES = ("resume", "overwrite", "output_dir", "push_to_hub", "train.max_steps", "train.stop_after_steps",
                     "train.log_every", "train.val_every", "train.save_every", "train.keep_last", "train.export_every",
                     "train.tracker", "train.record_sets", "train.max_skipped_steps", "data.num_workers", "data.val_batches")


def config_differences(saved: dict, cfg: "TrainConfig") -> list[str]:
    """The keys (``a.b=saved -> now``) in which ``cfg`` differs from a run's saved ``train_config.json``."""
    old, new = flatten(saved, keep=()), flatten(cfg.to_dict(), keep=())
    out = []
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_CHANGES or any(key.startswith(k + ".") for k in RESUMABLE_CHANGES):
            continue
        if key not in old and not any(k.startswith(key + ".") for k in old):
            continue  # a setting newer than the saved run: it ran with what is now the default
        a, b = old.get(key), new.get(key)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            out.append(f"{key}={a!r} -> {b!r}")
    return out


# keys that take one of several types, and keys whose default is None (unset) with the type they take
_EITHER = {"data.sparse_batches": (bool, str), "data.genes": (int, str)}
_OPTIONAL = {"data.weights": (list, tuple), "data.split_file": str, "data.perturbation_features": str, "model.base": str, "deepspeed": str,
             "push_to_hub": str, "train.tracker": str}


def _check_type(key: str, value, default):
    """``value`` must have the type of the field's ``default`` (ints are accepted for floats)."""
    if key in _EITHER:
        if not isinstance(value, _EITHER[key]):
            raise ValueError(f"config key {key} must be one of {[t.__name__ for t in _EITHER[key]]}, got {value!r}")
        return value
    if value is None:
        if key in _OPTIONAL:
            return value
        raise ValueError(f"config key {key} needs a value (like {default!r})")
    if key in _OPTIONAL:
        if not isinstance(value, _OPTIONAL[key]):
            kind = "list" if _OPTIONAL[key] == (list, tuple) else "str"
            raise ValueError(f"config key {key} must be a {kind}, got {value!r}")
        return list(value) if isinstance(value, tuple) else value
    if default is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        kind = type(default).__name__ if not isinstance(default, (list, tuple)) else "list"
        raise ValueError(f"config key {key} must be a {kind} (like {default!r}), got {value!r}")
    return value


def _from_dict(cls, data: dict, where: str = ""):
    """Build a (nested) dataclass from a dict; unknown keys and wrong types raise, naming the key."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {where.rstrip('.') or '(top)'} must be a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {[where + k for k in unknown]}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        f = known[name]
        default = f.default if f.default is not MISSING else f.default_factory()
        if is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value, f"{where}{name}.")
        else:
            kwargs[name] = _check_type(where + name, value, default)
    return cls(**kwargs)


def _set_path(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _split_override(text: str):
    import yaml

    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.sub=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def load_train_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file plus ``key.sub=value`` overrides (YAML-parsed values)."""
    import yaml

    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides or []]
    for key, value in items:
        _set_path(data, key, value)
    return _from_dict(TrainConfig, data)


def flatten(d: dict, prefix: str = "", keep: tuple = ("overrides", "columns")) -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; the dict-valued fields named in ``keep`` stay whole."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in keep:
            out.update(flatten(v, f"{prefix}{k}.", keep))
        else:
            out[f"{prefix}{k}"] = v
    return out


# =========================================================================== derived settings
def lr_at(step: int, optim: OptimSection, max_steps: int) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    span = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def resolve_deepspeed_config(path: str | os.PathLike, *, micro_batch: int, grad_accum: int, world_size: int,
                             grad_clip: float, bf16: bool) -> dict:
    """Load a DeepSpeed JSON, fill its ``"auto"`` values from the run, and refuse contradictions.

    Batch sizes in DeepSpeed count *sets* (our samples): train_batch_size =
    train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist")
    ds = json.loads(path.read_text())
    expected = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
    }
    for key, value in expected.items():
        given = ds.get(key, "auto")
        if given != "auto" and int(given) != value:
            raise ValueError(
                f"DeepSpeed config {path}: {key}={given} contradicts the run's {key}={value} "
                f"(micro-batch {micro_batch} sets x accumulation {grad_accum} x {world_size} processes); "
                f"set it to \"auto\" or change data.batch_size / optim.grad_accum"
            )
        ds[key] = value
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = grad_clip
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = bf16
    if "fp16" in ds and ds["fp16"].get("enabled", "auto") == "auto":
        ds["fp16"]["enabled"] = False
    # A torch optimizer (AdamW) is passed in: DeepSpeed's fused/CPU Adam would JIT-compile ops.
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds
