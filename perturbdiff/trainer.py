"""The trainer shared by pretraining and finetuning: Accelerate, optionally DeepSpeed ZeRO 1/2/3.

This is the one place that knows about processes: process group (gloo on CPU), per-rank seeds,
rank-0 logging, batch arithmetic, checkpoints. The model, the diffusion and the training step come
from the library and run on one device.

Layout of ``output_dir``::

    checkpoints/step-00000100/   resume state (Accelerate/DeepSpeed model + optimizer, EMA,
                                 per-rank trainer state: step, RNG, loader position)
    exports/step-00000100/       interval exports (``save_pretrained`` folders)
    model/                       the final export (EMA weights), loads with from_pretrained
    metrics.jsonl                one line per logged step (train loss, lr, cells/s, val loss)
    logs/                        TensorBoard (or W&B) tracker files
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from .configuration import PerturbDiffConfig
from .data.loader import densify
from .diffusion import GaussianDiffusion
from .modeling import PerturbDiffModel
from .training import Objective, training_step

__all__ = ["TrainConfig", "Trainer", "load_train_config", "EMA"]

CHECKPOINT_PREFIX = "step-"


# =========================================================================== config
@dataclass
class ModelSection:
    preset: str = "small"
    overrides: dict = field(default_factory=dict)  # any PerturbDiffConfig field, e.g. num_layers
    base: str | None = None  # a pretrained export to start from (finetuning)
    new_genes: str = "add"  # screen genes the base lacks: "add" (new rows) or "drop"


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
    val_fraction: float = 0.05  # groups held out for the validation loss when no split is given
    val_batches: int = 4  # micro-batches per process per validation
    # .h5ad inputs in `atlas` are built into OUTPUT/atlases/<name>.zarr first, with these
    # `build_atlas` arguments (perturbation_key, control_label, context_key, batch_key, dose_key, ...)
    columns: dict = field(default_factory=dict)
    # conditional objective: also train on control groups as targets (perturbation = the control
    # label, control set drawn from the same pool): the model sees every context's unperturbed
    # population, including contexts whose perturbed cells are held out
    include_control_sets: bool = False
    # batches travel as normalised CSR and are made dense on the training device ("auto": on a GPU,
    # where it cuts the loader's work and the host-to-device bytes; on CPU dense batches are as fast)
    sparse_batches: bool | str = "auto"


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclass
class TrainSection:
    objective: str = "marginal"  # "marginal" (pretraining) or "conditional" (finetuning)
    cond_drop_prob: float = 0.5
    control_drop_prob: float = 0.0
    self_cond_prob: float = 0.5
    mmd_weight: float = 1.0
    mse_weight: float = 1.0
    gene_scale_augment: float = 0.0  # see Objective: per-gene factors shared by a set and its controls
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


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "runs/pretrain"
    deepspeed: str | None = None  # a ds_configs/*.json file
    resume: bool = False
    push_to_hub: str | None = None  # a hub repo id; pushed after the final export

    def to_dict(self) -> dict:
        return asdict(self)

    def objective(self) -> Objective:
        t = self.train
        if t.objective not in ("marginal", "conditional"):
            raise ValueError(f"train.objective must be 'marginal' or 'conditional', got {t.objective!r}")
        return Objective(
            use_control=t.objective == "conditional",
            cond_drop_prob=t.cond_drop_prob,
            control_drop_prob=t.control_drop_prob,
            self_cond_prob=t.self_cond_prob,
            mmd_weight=t.mmd_weight,
            mse_weight=t.mse_weight,
            gene_scale_augment=t.gene_scale_augment,
        )


def _from_dict(cls, data: dict, where: str = ""):
    """Build a (nested) dataclass from a dict; unknown keys raise instead of being ignored."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {[where + k for k in unknown]}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name) if name in known else None
        if is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = _from_dict(type(default), value, f"{where}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _set_path(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


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


def _split_override(text: str):
    import yaml

    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.sub=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


# =========================================================================== EMA
class EMA:
    """Exponential moving average of the parameters, kept in float32 on every rank.

    Holding full tensors on every rank costs one model copy of memory per process but makes the
    export a local operation, even under ZeRO-3 (where the update gathers each partitioned
    parameter for the moment of the update).
    """

    def __init__(self, named_params, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in named_params}

    @torch.no_grad()
    def update(self, named_params) -> None:
        for n, p in named_params:
            s = self.shadow[n]
            s.lerp_(p.detach().to(s.device, torch.float32), 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.contiguous().cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for n, t in state.items():
            self.shadow[n].copy_(t)


# =========================================================================== helpers
def _lr_at(step: int, o: OptimSection, max_steps: int) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, max_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete resume checkpoints, oldest first (temporary folders of interrupted saves excluded)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "COMPLETE").exists()]
    return sorted(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


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


# =========================================================================== trainer
class Trainer:
    """Runs a training job from a :class:`TrainConfig`.

    Args:
        cfg: the run's configuration.
        model_config: the model to build (its vocabularies must match the data); when ``None`` it is
            made from ``cfg.model`` and the data's vocabularies.
        model: an already-built model (finetuning passes the adapted base model).
        model_card: extra lines for the export's README (finetuning records its base and screen).
        model_factory: ``f(data_vocabulary) -> model``, called once the data's vocabularies are known
            (finetuning adapts its base model to the screen's genes and covariates here).
    """

    def __init__(self, cfg: TrainConfig, model_config: PerturbDiffConfig | None = None,
                 model: PerturbDiffModel | None = None, model_card: dict | None = None, model_factory=None):
        from accelerate import Accelerator
        from accelerate.utils import (
            DeepSpeedPlugin,
            DistributedDataParallelKwargs,
            InitProcessGroupKwargs,
            ProjectConfiguration,
        )

        self.cfg = cfg
        self.objective = cfg.objective()
        self.output_dir = Path(cfg.output_dir)
        t, o, d = cfg.train, cfg.optim, cfg.data

        mixed = t.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() else "no"
        if mixed not in ("no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision must be auto, no, bf16 or fp16, got {mixed!r}")

        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        ds_plugin = None
        if cfg.deepspeed:
            ds_conf = resolve_deepspeed_config(cfg.deepspeed, micro_batch=d.batch_size, grad_accum=o.grad_accum,
                                               world_size=world_size, grad_clip=o.grad_clip, bf16=mixed == "bf16")
            ds_plugin = DeepSpeedPlugin(hf_ds_config=ds_conf)
        # Without a GPU, several processes talk over gloo (Accelerate would pick nccl/ccl otherwise).
        distributed_cpu = not torch.cuda.is_available() and world_size > 1
        kwargs = [InitProcessGroupKwargs(backend="gloo")] if distributed_cpu else []
        # Some parameters take no part in a step by design (the control stream under the marginal
        # objective, dose/feature projections when the data has none), so DDP must look for them.
        kwargs.append(DistributedDataParallelKwargs(find_unused_parameters=True))
        tracker = None if t.tracker in (None, "none") else t.tracker
        if tracker == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                print("tensorboard is not installed: logging to metrics.jsonl only")
                tracker = None
        self.accelerator = Accelerator(
            # Without a GPU, cpu=True selects MULTI_CPU (gloo) for DDP; DeepSpeed ignores its plugin
            # under cpu=True and runs over gloo through the process-group kwargs instead.
            cpu=not torch.cuda.is_available() and ds_plugin is None,
            mixed_precision=mixed,
            gradient_accumulation_steps=o.grad_accum,
            deepspeed_plugin=ds_plugin,
            kwargs_handlers=kwargs,
            log_with=tracker,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        acc = self.accelerator
        self.rank, self.world_size = acc.process_index, acc.num_processes
        self.is_deepspeed = ds_plugin is not None
        self.zero_stage = ds_plugin.zero_stage if ds_plugin is not None else 0

        # Per-rank randomness for noise/timesteps/dropout; identical model init on every rank.
        torch.manual_seed(t.seed)
        self.generator = torch.Generator().manual_seed(t.seed * 1_000_003 + self.rank)
        # Decisions every rank must share (whether a step runs a self-conditioning pass).
        self.shared_generator = torch.Generator().manual_seed(t.seed * 1_000_003 - 1)

        atlases = self._open_atlases()
        data_vocab = self._data_vocabulary(atlases)
        if model is None and model_factory is not None:
            model = model_factory(data_vocab)
        if model is None:
            if model_config is None:
                model_config = PerturbDiffConfig.from_preset(cfg.model.preset, **{**data_vocab, **cfg.model.overrides})
            model = PerturbDiffModel(model_config)
        self.train_data, self.val_data = self._build_loaders(atlases, model.config, data_vocab)
        self.model_config = model.config
        self.model_card = model_card or {}
        self.diffusion = GaussianDiffusion.from_config(self.model_config)
        self.ema = EMA(model.named_parameters(), t.ema_decay) if t.ema_decay > 0 else None

        # No weight decay on biases, norms and embedding tables (as in GPT-style training).
        decay, no_decay = [], []
        for module in model.modules():
            for p in module.parameters(recurse=False):
                (no_decay if p.ndim < 2 or isinstance(module, torch.nn.Embedding) else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=tuple(o.betas),
        )
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.step = 0
        self.cells_seen = 0

        self.cells_per_step = d.batch_size * d.set_size * o.grad_accum * self.world_size
        assert self.cells_per_step == d.batch_size * d.set_size * o.grad_accum * acc.num_processes
        if self.is_deepspeed:
            ds_cfg = acc.state.deepspeed_plugin.deepspeed_config
            assert ds_cfg["train_batch_size"] * d.set_size == self.cells_per_step, "DeepSpeed batch arithmetic"

    # ------------------------------------------------------------------ data
    def _open_atlases(self) -> list:
        """The run's atlases; ``.h5ad`` inputs are built into ``OUTPUT/atlases`` first (once)."""
        from .data import Atlas, build_atlas, ensure_default_atlas

        d = self.cfg.data
        paths = []
        with self.accelerator.main_process_first():  # one process builds, the others then open
            for p in [Path(p) for p in d.atlas] or [ensure_default_atlas()]:
                if not p.exists():
                    raise FileNotFoundError(f"atlas {p} does not exist (build one with `perturbdiff atlas build`)")
                if p.suffix == ".h5ad":
                    built = self.output_dir / "atlases" / f"{p.stem}.zarr"
                    if not _complete_atlas(built):
                        self._print(f"building atlas {built} from {p}")
                        build_atlas(p, built, overwrite=True, progress=self.accelerator.is_main_process, **d.columns)
                    p = built
                paths.append(p)
        return [Atlas(p) for p in paths]

    def _data_vocabulary(self, atlases) -> dict:
        """Genes (union of highly variable genes) and covariate names of the atlases."""
        from .data import atlas_vocabularies, gene_vocabulary

        vocab = atlas_vocabularies(atlases)
        return {
            "gene_names": gene_vocabulary(atlases),
            # the marginal stage has no perturbation label: finetuning adds the vocabulary
            "perturbation_names": [] if self.cfg.train.objective == "marginal" else vocab["perturbation"],
            "context_names": vocab["context"],
            "batch_names": vocab["batch"],
        }

    def _build_loaders(self, atlases, config: PerturbDiffConfig, data_vocab: dict):
        """Training and validation loaders for this rank, in the model's vocabularies."""
        from .data import CellSetDataset, SplitSpec

        d, t = self.cfg.data, self.cfg.train
        paths = [a.path for a in atlases]
        data_genes = set(data_vocab["gene_names"]) | {g for a in atlases for g in a.gene_names}
        shared = sum(g in data_genes for g in config.gene_names or [])
        if config.gene_names is None or shared < 0.5 * config.num_genes:
            raise ValueError(
                f"the atlas genes do not match the model: {shared} of the model's {config.num_genes} genes are in "
                f"{', '.join(map(str, paths))}; finetune with gene mapping (finetune/run.py) or build a matching atlas"
            )
        mode = "marginal" if t.objective == "marginal" else "conditional"
        spec = None
        if d.split_file:
            spec = SplitSpec.load(d.split_file)
        elif d.heldout_contexts or d.heldout_perturbations:
            spec = SplitSpec.held_out(d.heldout_contexts, d.heldout_perturbations, split="test")
        spec = _with_validation_groups(spec, atlases, d.val_fraction, seed=t.seed)

        common = dict(set_size=d.set_size, batch_size=d.batch_size, weights=d.weights, normalization=config.norm,
                      gene_names=config.gene_names, perturbation_names=config.perturbation_names,
                      context_names=config.context_names, batch_names=config.batch_names,
                      mode=mode, held_out=spec, rank=self.rank, world_size=self.world_size,
                      sparse=self._sparse_batches(d.sparse_batches))
        train = CellSetDataset(atlases, split="train", seed=t.seed, drop_last=True, return_set_ids=True,
                               include_control_sets=d.include_control_sets, **common)
        if len(train) == 0:
            raise ValueError(
                f"the training split has {train.num_sets} sets: too few for {d.batch_size} sets per batch on "
                f"{self.world_size} process(es); lower data.batch_size or data.set_size"
            )
        val = None
        if spec is not None and t.val_every:
            try:
                val = CellSetDataset(atlases, split="val", seed=t.seed + 1, drop_last=False, **common)
            except ValueError as err:  # no validation groups in this data
                self._print(f"no validation loss: {err}")
        self._print(f"data: {', '.join(map(str, paths))}: {train.num_sets} training sets per epoch "
                    f"({len(train)} batches per process)" + (f", {val.num_sets} validation sets" if val else ""))
        return train.loader(num_workers=d.num_workers), val

    def _sparse_batches(self, value) -> bool:
        if value == "auto":
            return self.accelerator.device.type == "cuda"
        if not isinstance(value, bool):
            raise ValueError(f"data.sparse_batches must be true, false or 'auto', got {value!r}")
        return value

    def _to_device(self, batch: dict) -> dict:
        return densify(batch, self.accelerator.device, non_blocking=True)  # sparse sets become dense there

    def _batches(self):
        """Endless micro-batches from the loader, advancing epochs (the loader tracks its position)."""
        while True:
            produced = False
            for batch in self.train_data:
                produced = True
                yield batch
            if not produced:
                raise ValueError("the training data yields no batches: too few cells or groups for this batch size")
            self.train_data.set_epoch(self.train_data.state_dict()["epoch"] + 1)

    # ------------------------------------------------------------------ parameters
    def _gathered(self):
        """Full parameters of the unwrapped model (gathered under ZeRO-3)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.zero_stage == 3:
            import deepspeed

            return unwrapped, deepspeed.zero.GatheredParameters(list(unwrapped.parameters()), modifier_rank=None)
        return unwrapped, contextlib.nullcontext()

    def _update_ema(self):
        if self.ema is None:
            return
        unwrapped, ctx = self._gathered()
        with ctx:
            self.ema.update(unwrapped.named_parameters())

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Path:
        acc, t, o = self.accelerator, self.cfg.train, self.cfg.optim
        if self.cfg.resume:
            self.resume()
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            _atomic_json(self.output_dir / "train_config.json", self.cfg.to_dict())
        if acc.log_with:
            hparams = _flat_nested(self.cfg.to_dict(), keep=())
            acc.init_trackers("perturbdiff", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                     for k, v in hparams.items()})
        self._print(
            f"PerturbDiff {t.objective} training: {self.model_config.num_genes} genes, "
            f"{sum(p.numel() for p in acc.unwrap_model(self.model).parameters()) / 1e6:.2f}M parameters, "
            f"{self.world_size} process(es){', DeepSpeed ZeRO-' + str(self.zero_stage) if self.is_deepspeed else ''}\n"
            f"batch: {self.cfg.data.batch_size} sets x {self.cfg.data.set_size} cells x {o.grad_accum} accumulation "
            f"x {self.world_size} processes = {self.cells_per_step} cells per optimizer step"
        )
        sets_file = None
        if t.record_sets:
            (self.output_dir / "sets").mkdir(parents=True, exist_ok=True)
            acc.wait_for_everyone()
            sets_file = open(self.output_dir / "sets" / f"rank{self.rank}.jsonl", "a")

        from tqdm.auto import tqdm

        bar = tqdm(total=t.max_steps, initial=self.step, disable=not acc.is_main_process, desc="training",
                   dynamic_ncols=True)
        batches = self._batches()
        start, window_t, window_cells = time.time(), time.time(), 0
        running = {"loss": 0.0, "mmd": 0.0, "mse": 0.0}
        postfix: dict = {}
        first_step = self.step
        while self.step < t.max_steps:
            if t.stop_after_steps and self.step - first_step >= t.stop_after_steps:
                bar.close()
                self.save_checkpoint()
                self._print(f"stopped after {t.stop_after_steps} steps at step {self.step}; continue with --resume")
                acc.end_training()
                return self.output_dir / "checkpoints"
            lr = _lr_at(self.step, o, t.max_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches)
            if sets_file is not None:
                sets_file.write(json.dumps({"step": self.step, "sets": _set_ids(batch)}) + "\n")
            batch = self._to_device(batch)
            with acc.accumulate(self.model):
                out = training_step(self.model, self.diffusion, batch, self.objective,
                                    generator=self.generator, shared_generator=self.shared_generator)
                acc.backward(out["loss"])
                if acc.sync_gradients and not self.is_deepspeed and o.grad_clip > 0:
                    acc.clip_grad_norm_(self.model.parameters(), o.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for k in running:
                running[k] += out[k].detach().float().item() / o.grad_accum
            if not acc.sync_gradients:
                continue

            # ---- one optimizer step done
            self._update_ema()
            self.step += 1
            self.cells_seen += self.cells_per_step
            window_cells += self.cells_per_step
            logs = {k: v for k, v in running.items()}
            running = {k: 0.0 for k in running}
            reduced = acc.reduce(torch.tensor([logs["loss"], logs["mmd"], logs["mse"]], device=acc.device), "mean")
            logs = {"loss": reduced[0].item(), "mmd": reduced[1].item(), "mse": reduced[2].item(), "lr": lr}
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.max_steps or self.step == 1:
                now = time.time()
                logs["cells_per_s"] = window_cells / max(now - window_t, 1e-9)
                window_t, window_cells = now, 0
            if t.val_every and (self.step % t.val_every == 0 or self.step == t.max_steps):
                logs["val_loss"] = self.validate()
            postfix.update({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "lr", "cells_per_s", "val_loss")})
            bar.set_postfix(postfix)
            self._log(logs)
            if t.save_every and self.step % t.save_every == 0 and self.step < t.max_steps:
                self.save_checkpoint()
            if t.export_every and self.step % t.export_every == 0 and self.step < t.max_steps:
                self.export(self.output_dir / "exports" / f"{CHECKPOINT_PREFIX}{self.step:08d}")
        bar.close()
        if sets_file is not None:
            sets_file.close()
        if t.save_every:
            self.save_checkpoint()
        export_dir = self.export(self.output_dir / "model")
        elapsed = time.time() - start
        self._print(
            f"done: {self.step} steps in {elapsed:.1f} s, {self.cells_seen:,} cells seen "
            f"({self.cells_seen / max(elapsed, 1e-9):,.0f} cells/s); export: {export_dir}"
        )
        if self.cfg.push_to_hub and acc.is_main_process:
            self.push_to_hub(export_dir)
        acc.end_training()
        return export_dir

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean training loss on held-out groups, with a fixed generator (same draws every time)."""
        if self.val_data is None:
            return None
        model = self.model
        was_training = model.training
        model.eval()
        gen = torch.Generator().manual_seed(12345 + self.rank)
        shared = torch.Generator().manual_seed(12345)
        self.val_data.set_epoch(0)
        total, n = 0.0, 0
        for i, batch in enumerate(self.val_data):
            if i >= self.cfg.data.val_batches:
                break
            out = training_step(model, self.diffusion, self._to_device(batch), self.objective,
                                generator=gen, shared_generator=shared)
            total += out["loss"].item()
            n += 1
        model.train(was_training)
        stats = self.accelerator.reduce(torch.tensor([total, n], dtype=torch.float64, device=self.accelerator.device), "sum")
        return float(stats[0] / stats[1]) if stats[1] > 0 else None

    # ------------------------------------------------------------------ logging
    def _print(self, text: str) -> None:
        if self.accelerator.is_main_process:
            print(text, flush=True)

    def _log(self, logs: dict) -> None:
        logs = {k: v for k, v in logs.items() if v is not None}
        if self.accelerator.log_with:
            self.accelerator.log({f"train/{k}" if k != "val_loss" else "val/loss": v for k, v in logs.items()}, step=self.step)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **logs}) + "\n")
        self.last_logs = logs

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write a resume state atomically: into a temporary folder, renamed when every rank is done."""
        from safetensors.torch import save_file

        acc = self.accelerator
        root = self.output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.step:08d}"
        tmp = root / f".tmp-{CHECKPOINT_PREFIX}{self.step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if self.ema is not None and acc.is_main_process:
            save_file(self.ema.state_dict(), str(tmp / "ema.safetensors"))
        _atomic_json(tmp / f"trainer_state_rank{self.rank}.json", {
            "step": self.step,
            "cells_seen": self.cells_seen,
            "world_size": self.world_size,
            "generator": self.generator.get_state().tolist(),
            "shared_generator": self.shared_generator.get_state().tolist(),
            "data": self.train_data.state_dict(),
        })
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "COMPLETE").write_text(str(self.step))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in list_checkpoints(self.output_dir)[: -max(1, self.cfg.train.keep_last)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def resume(self) -> bool:
        """Restore the latest complete checkpoint; False when there is none (the run starts fresh)."""
        from safetensors.torch import load_file

        ckpts = list_checkpoints(self.output_dir)
        if not ckpts:
            self._print(f"--resume: no checkpoint in {self.output_dir / 'checkpoints'}, starting from step 0")
            return False
        ckpt = ckpts[-1]
        state_file = ckpt / f"trainer_state_rank{self.rank}.json"
        if not state_file.exists():
            raise ValueError(f"checkpoint {ckpt} has no state for rank {self.rank}: was it written with another number of processes?")
        state = json.loads(state_file.read_text())
        if state["world_size"] != self.world_size:
            raise ValueError(f"checkpoint {ckpt} was written by {state['world_size']} processes, this run has {self.world_size}")
        self.accelerator.load_state(str(ckpt))
        if self.ema is not None:
            self.ema.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
        self.step, self.cells_seen = state["step"], state["cells_seen"]
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.shared_generator.set_state(torch.tensor(state["shared_generator"], dtype=torch.uint8))
        self.train_data.load_state_dict(state["data"])
        self._print(f"resumed from {ckpt} at step {self.step}")
        return True

    # ------------------------------------------------------------------ export
    def export(self, path: str | os.PathLike) -> Path:
        """``save_pretrained`` folder with the EMA weights (or the live ones), vocabularies and a card."""
        acc = self.accelerator
        path = Path(path)
        if self.ema is not None:
            state = self.ema.state_dict()
        else:
            state = acc.get_state_dict(self.model)  # a collective under ZeRO-3: every rank calls it
        if acc.is_main_process:
            model = PerturbDiffModel(self.model_config)
            model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
            tmp = path.with_name(f".tmp-{path.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            c = self.model_config
            _atomic_json(tmp / "vocabularies.json", {
                "genes": c.gene_names, "perturbations": c.perturbation_names,
                "contexts": c.context_names, "batches": c.batch_names, "normalization": c.normalization,
            })
            (tmp / "README.md").write_text(self.model_card_text())
            shutil.rmtree(path, ignore_errors=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        acc.wait_for_everyone()
        return path

    def model_card_text(self) -> str:
        c, cfg = self.model_config, self.cfg
        logs = getattr(self, "last_logs", {})
        atlases = cfg.data.atlas or ["built-in synthetic atlas"]
        lines = [
            "---", "library_name: perturbdiff", "tags: [single-cell, perturbation, diffusion, perturbdiff]", "---",
            "# PerturbDiff model", "",
            "A set-level functional diffusion model over cells "
            "(PerturbDiff, Yuan et al. 2026). Load with `import perturbdiff; AutoModel.from_pretrained(folder)`.", "",
            "## Training", "",
            f"- objective: {cfg.train.objective} ({'control stream on' if self.objective.use_control else 'no control stream, no perturbation label'}; "
            f"covariate dropout {cfg.train.cond_drop_prob})",
            f"- data: {', '.join(map(str, atlases))}" + (f" (weights {cfg.data.weights})" if cfg.data.weights else ""),
            f"- steps: {self.step}; cells seen: {self.cells_seen:,}; "
            f"{cfg.data.batch_size} sets x {cfg.data.set_size} cells x {cfg.optim.grad_accum} accumulation x {self.world_size} processes per step",
            f"- optimiser: AdamW lr {cfg.optim.lr}, warmup {cfg.optim.warmup_steps}, cosine; EMA decay {cfg.train.ema_decay} "
            f"({'exported' if self.ema is not None else 'off: live weights exported'})",
            f"- size: hidden {c.hidden_size}, {c.num_layers} layers, {c.num_heads} heads; {c.num_genes} genes; "
            f"{len(c.perturbation_names)} perturbations, {len(c.context_names)} contexts, {len(c.batch_names)} batches",
            f"- expression space: log1p(counts / total x {c.norm.target_sum}) / {c.norm.scale}",
        ]
        for k, v in self.model_card.items():
            lines.append(f"- {k}: {v}")
        lines += ["", "## Figures at the end of training", ""]
        lines += [f"- {k}: {v:.5g}" for k, v in logs.items() if isinstance(v, float)] or ["- (none logged)"]
        return "\n".join(lines) + "\n"

    def push_to_hub(self, export_dir: Path) -> None:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(self.cfg.push_to_hub, exist_ok=True)
        api.upload_folder(folder_path=str(export_dir), repo_id=self.cfg.push_to_hub)
        print(f"pushed {export_dir} to the hub as {self.cfg.push_to_hub}")


def _complete_atlas(path: Path) -> bool:
    from .data import Atlas, AtlasError

    if not path.exists():
        return False
    try:
        Atlas(path)
        return True
    except AtlasError:
        return False


def _with_validation_groups(spec, atlases, fraction: float, seed: int):
    """Add a ``val`` split of about ``fraction`` of the training (context, perturbation) pairs.

    Used when the split given has no validation groups (or no split is given); controls are never
    held out (they are every split's control pool). Returns ``spec`` unchanged for fraction 0.
    """
    import numpy as np

    from .data import SplitSpec

    if fraction <= 0:
        return spec
    pairs = []
    for atlas in atlases:
        g = atlas.groups
        for ds, ctx, pert, ctl in zip(g["dataset"], g["context"], g["perturbation"], g["is_control"]):
            if ctl:
                continue
            splits = spec.assign(ds, ctx, pert, False) if spec is not None else frozenset(["train"])
            if "val" in splits:
                return spec  # the split already has validation groups
            if splits == frozenset(["train"]):
                pairs.append((f"{ds}.{ctx}", str(pert)))
    pairs = sorted(set(pairs))
    if not pairs:
        return spec
    rng = np.random.default_rng(seed)
    k = max(1, round(fraction * len(pairs)))
    if k >= len(pairs):
        return spec
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=k, replace=False)]
    fewshot = {key: dict(parts) for key, parts in (spec.fewshot if spec is not None else {}).items()}
    for key, pert in chosen:
        fewshot.setdefault(key, {})
        fewshot[key]["val"] = frozenset(fewshot[key].get("val", frozenset()) | {pert})
    return SplitSpec(training=spec.training if spec else None, zeroshot=dict(spec.zeroshot) if spec else {}, fewshot=fewshot)


def _set_ids(batch: dict) -> list:
    ids = batch.get("set_id", batch.get("group"))
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


# =========================================================================== command line
def build_arg_parser(description: str, default_config: str | os.PathLike):
    import argparse

    p = argparse.ArgumentParser(
        description=description,
        epilog="Any config key can be overridden as key.sub=value (YAML value), e.g. optim.lr=1e-3 train.ema_decay=0",
    )
    p.add_argument("--config", default=str(default_config), help="YAML config (default: %(default)s)")
    p.add_argument("--atlas", nargs="+", help="atlas store(s) (default: the built-in synthetic atlas)")
    p.add_argument("--atlas-weights", nargs="+", type=float, help="mixing weight per atlas")
    p.add_argument("--output-dir", help="where checkpoints, logs and the export go")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--deepspeed", help="DeepSpeed JSON (ds_configs/zero1.json, zero2.json, zero3.json, zero3_offload.json)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--seed", type=int)
    p.add_argument("--preset", help="model size preset (debug, small, base, large)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="publish the final export to the hub")
    g = p.add_argument_group("finetuning and .h5ad inputs")
    g.add_argument("--base", help="a pretrained export (from_pretrained folder) to start from")
    g.add_argument("--screen", nargs="+", help="the screen: atlas(es) or .h5ad file(s) (same as --atlas)")
    g.add_argument("--new-genes", choices=["add", "drop"], help="screen genes the base lacks: add rows or drop them")
    g.add_argument("--perturbation-key", help="obs column of the perturbation (.h5ad inputs)")
    g.add_argument("--control-label", help="perturbation label of control cells (.h5ad inputs)")
    g.add_argument("--context-key", help="obs column of the context: cell type / line (.h5ad inputs)")
    g.add_argument("--batch-key", help="obs column of the batch (.h5ad inputs)")
    g.add_argument("--dose-key", help="obs column of the dose (.h5ad inputs)")
    g.add_argument("--input-log1p", action="store_true", default=None, help="X holds log1p-normalised values")
    g.add_argument("--heldout-contexts", nargs="+", help="held-out contexts (test = these x held-out perturbations)")
    g.add_argument("--heldout-perturbations", nargs="+", help="held-out perturbations")
    g.add_argument("--split-file", help="a split file (STATE TOML or JSON)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def config_from_args(args) -> TrainConfig:
    if args.atlas and args.screen:
        raise ValueError("give the data with --atlas or --screen, not both")
    flags = {
        "data.atlas": args.atlas or args.screen, "data.weights": args.atlas_weights, "output_dir": args.output_dir,
        "train.max_steps": args.max_steps, "deepspeed": args.deepspeed, "train.seed": args.seed,
        "model.preset": args.preset, "push_to_hub": args.push_to_hub, "resume": args.resume or None,
        "model.base": args.base, "model.new_genes": args.new_genes, "data.split_file": args.split_file,
        "data.heldout_contexts": args.heldout_contexts, "data.heldout_perturbations": args.heldout_perturbations,
    }
    extra = {k: v for k, v in flags.items() if v is not None}
    columns = {k: getattr(args, k) for k in ("perturbation_key", "control_label", "context_key", "batch_key",
                                             "dose_key", "input_log1p") if getattr(args, k) is not None}
    cfg = load_train_config(args.config, args.overrides)
    flat = _flat_nested(cfg.to_dict())
    if columns:
        flat["data.columns"] = {**cfg.data.columns, **columns}
    return load_train_config(None, {**flat, **extra})


def _flat_nested(d: dict, prefix: str = "", keep: tuple = ("overrides", "columns")) -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; the dict-valued fields named in ``keep`` stay whole."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in keep:
            out.update(_flat_nested(v, f"{prefix}{k}.", keep))
        else:
            out[f"{prefix}{k}"] = v
    return out


# config fields a finetuning run may change on its base model (behaviour, not shapes or weights)
FINETUNE_OVERRIDES = {"context_conditioning", "paired_control"}


def base_model_factory(cfg: TrainConfig):
    """``f(data_vocabulary) -> model``: the base export adapted to the data's genes and covariates.

    Base names keep their ids and learned rows; the data's new perturbations, contexts and batches
    are appended; genes the base lacks are appended (``model.new_genes: add``) or left out (``drop``).
    """
    from .adapt import adapt_model, extend_vocabulary

    base_dir = Path(cfg.model.base)
    if not (base_dir / "config.json").exists():
        raise FileNotFoundError(f"base model {base_dir} has no config.json (expected a save_pretrained folder)")
    if cfg.model.new_genes not in ("add", "drop"):
        raise ValueError(f"model.new_genes must be 'add' or 'drop', got {cfg.model.new_genes!r}")
    fixed = sorted(set(cfg.model.overrides) - FINETUNE_OVERRIDES)
    if fixed:
        raise ValueError(f"model.overrides {fixed} cannot change a base model (its sizes and weights are kept); "
                         f"finetuning can override {sorted(FINETUNE_OVERRIDES)}")

    def factory(vocab: dict) -> PerturbDiffModel:
        base = PerturbDiffModel.from_pretrained(base_dir)
        bc = base.config
        genes = extend_vocabulary(bc.gene_names, vocab["gene_names"]) if cfg.model.new_genes == "add" else bc.gene_names
        model, report = adapt_model(
            base, gene_names=genes,
            perturbation_names=extend_vocabulary(bc.perturbation_names, vocab["perturbation_names"]),
            context_names=extend_vocabulary(bc.context_names, vocab["context_names"]),
            batch_names=extend_vocabulary(bc.batch_names, vocab["batch_names"]),
            overrides=cfg.model.overrides, seed=cfg.train.seed,
        )
        in_data = set(vocab["gene_names"])
        print(f"base model {base_dir}: genes {report['genes']['shared']} kept, {report['genes']['new']} added "
              f"({sum(g in in_data for g in bc.gene_names)} of the base's {bc.num_genes} genes are among the "
              f"screen's {len(in_data)}); perturbations {report['perturbation']}, contexts {report['context']}, "
              f"batches {report['batch']}", flush=True)
        return model

    return factory


def main(argv: list[str] | None = None, *, description: str = "PerturbDiff training",
         default_config: str | os.PathLike) -> Path:
    """Entry point shared by ``pretrain/run.py``: parse, build the trainer, fit, export."""
    args = build_arg_parser(description, default_config).parse_args(argv)
    cfg = config_from_args(args)
    factory, card = None, {}
    if cfg.model.base:
        factory, card = base_model_factory(cfg), {"base model": cfg.model.base, "screen": ", ".join(map(str, cfg.data.atlas))}
    trainer = Trainer(cfg, model_factory=factory, model_card=card)
    try:
        return trainer.fit()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
