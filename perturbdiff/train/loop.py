"""The training loop shared by pretraining and finetuning: Accelerate, optionally DeepSpeed ZeRO 1/2/3.

This is the one place that knows about processes: process group (gloo on CPU), per-rank seeds,
rank-0 output, batch arithmetic. The model, the diffusion and the training step come from the
library and run on one device; what is kept on disk is `checkpoint`'s business.

The module is a little over 500 lines: one `Trainer` whose set-up, loop, guards (non-finite steps)
and validation share the accelerator's state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..configuration import PerturbDiffConfig, check_hidden_covariates
from ..diffusion import GaussianDiffusion
from ..files import atomic_json
from ..modeling import PerturbDiffModel
from ..objective import training_step
from . import checkpoint
from .checkpoint import EMA
from .config import TrainConfig, flatten, lr_at, resolve_deepspeed_config

__all__ = ["Trainer"]


class Trainer:
    """Runs a training job from a :class:`TrainConfig`.

    Args:
        cfg: the run's configuration.
        model_card: extra lines for the export's README (finetuning records its base and screen).
        model_factory: ``f(data_vocabulary) -> model``, called once the data's vocabularies are known
            (finetuning adapts its base model there, `perturbdiff.adapt.adapt_pretrained`); without
            it the model is built from ``cfg.model`` (preset + overrides) and the data's vocabularies.
    """

    def __init__(self, cfg: TrainConfig, model_card: dict | None = None, model_factory=None):
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
        train, optim, data = cfg.train, cfg.optim, cfg.data

        mixed = train.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() else "no"
        if mixed not in ("no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision must be auto, no, bf16 or fp16, got {mixed!r}")

        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        ds_plugin = None
        if cfg.deepspeed:
            ds_conf = resolve_deepspeed_config(cfg.deepspeed, micro_batch=data.batch_size, grad_accum=optim.grad_accum,
                                               world_size=world_size, grad_clip=optim.grad_clip, bf16=mixed == "bf16")
            if not torch.cuda.is_available() and world_size < 2:
                raise ValueError(f"--deepspeed {cfg.deepspeed} on a CPU needs several processes (DeepSpeed runs over a "
                                 "gloo process group here): launch with accelerate launch --multi_gpu --num_processes 2")
            ds_plugin = DeepSpeedPlugin(hf_ds_config=ds_conf)
        # Without a GPU, several processes talk over gloo (Accelerate would pick nccl/ccl otherwise).
        distributed_cpu = not torch.cuda.is_available() and world_size > 1
        kwargs = [InitProcessGroupKwargs(backend="gloo")] if distributed_cpu else []
        # Some parameters take no part in a step by design (the control stream under the marginal
        # objective, dose/feature projections when the data has none), so DDP must look for them.
        kwargs.append(DistributedDataParallelKwargs(find_unused_parameters=True))
        tracker = None if train.tracker in (None, "none") else train.tracker
        if tracker == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                print("tensorboard is not installed: logging to metrics.jsonl only")
                tracker = None
        self.mixed = mixed
        self.accelerator = Accelerator(
            # Without a GPU, cpu=True selects MULTI_CPU (gloo) for DDP; DeepSpeed ignores its plugin
            # under cpu=True and runs over gloo through the process-group kwargs instead.
            cpu=not torch.cuda.is_available() and ds_plugin is None,
            mixed_precision=mixed,
            gradient_accumulation_steps=optim.grad_accum,
            deepspeed_plugin=ds_plugin,
            kwargs_handlers=kwargs,
            log_with=tracker,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        accelerator = self.accelerator
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        checkpoint.claim_output_dir(accelerator, self.output_dir, cfg)
        self.is_deepspeed = ds_plugin is not None
        self.zero_stage = ds_plugin.zero_stage if ds_plugin is not None else 0

        # Per-rank randomness for noise/timesteps/dropout; identical model init on every rank.
        torch.manual_seed(train.seed)
        self.generator = torch.Generator().manual_seed(train.seed * 1_000_003 + self.rank)
        # Decisions every rank must share (whether a step runs a self-conditioning pass).
        self.shared_generator = torch.Generator().manual_seed(train.seed * 1_000_003 - 1)

        atlases = self._open_atlases()
        data_vocab = self._data_vocabulary(atlases)
        self.datasets = sorted({str(ds) for a in atlases for ds in a.groups["dataset"].unique()})
        if model_factory is not None:
            model = model_factory(data_vocab)
        else:
            model = PerturbDiffModel(PerturbDiffConfig.from_preset(cfg.model.preset, **{**data_vocab, **cfg.model.overrides}))
        self.feature_matrix = self._feature_matrix(model.config)
        if self.feature_matrix is not None:  # the rows travel with the weights (prediction checks tables against them)
            model.covariate_embedder.feature_table.copy_(torch.from_numpy(self.feature_matrix))
        self.train_data, self.val_data = self._build_loaders(atlases, model.config, data_vocab)
        # what prediction needs to know of the training data travels in the export's config.json
        model.config.set_size = data.set_size
        if self.cfg.train.objective == "conditional":
            model.config.trained_perturbations = self.train_data.dataset.split_perturbations()
        labels = sorted({a.control_label for a in atlases if a.control_label})
        if len(labels) == 1:
            model.config.control_label = labels[0]
        conditional = self.cfg.train.objective == "conditional"
        hidden = check_hidden_covariates(self.cfg.data.hidden_covariates)
        summary = self.train_data.dataset.summary(replicates=conditional and bool(hidden))  # one read of the split's cells
        model.config.gene_max = [float(v) for v in summary["gene_max"]]  # sampling keeps each gene in its range
        # the training means travel with every export (prediction's anchor, perturbdiff.baselines.Anchor),
        # and with hidden covariates the measured spread of the replicates' responses (K populations)
        self.response_stats = None
        if conditional:
            self.response_stats = {"sums": summary["sums"], "counts": summary["counts"]}
            if hidden:
                from ..baselines import population_offsets

                pops = population_offsets(summary["replicates"], hidden)
                if pops is None:
                    self._print(f"populations: no condition has two or more training replicates over hidden "
                                f"{'+'.join(hidden)}: K populations will be the sampler's own draws (not calibrated)")
                else:
                    self.response_stats["populations"] = pops
                    self._print(f"populations: {len(pops['offsets'])} replicate deviations of the responses over "
                                f"hidden {'+'.join(hidden)}; between-replicate variance {float(pops['between'].mean()):.4g} "
                                "per gene (sampling noise removed)")
        self._print(f"gene ranges: the largest value of each gene over {summary['cells']:,} training and control cells "
                    "(sampling keeps x_0 estimates below them plus a margin)")
        self.model_config = model.config
        self.model_card = model_card or {}
        self.last_logs: dict = {}
        self.diffusion = GaussianDiffusion.from_config(self.model_config)
        self.ema = EMA(model.named_parameters(), train.ema_decay) if train.ema_decay > 0 else None

        # No weight decay on biases, norms and embedding tables (as in GPT-style training).
        decay, no_decay = [], []
        for module in model.modules():
            for p in module.parameters(recurse=False):
                (no_decay if p.ndim < 2 or isinstance(module, torch.nn.Embedding) else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=optim.lr, betas=tuple(optim.betas),
        )
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.step = 0
        self.cells_seen = 0

        self.cells_per_step = data.batch_size * data.set_size * optim.grad_accum * self.world_size
        if self.is_deepspeed:
            ds_cfg = accelerator.state.deepspeed_plugin.deepspeed_config
            assert ds_cfg["train_batch_size"] * data.set_size == self.cells_per_step, "DeepSpeed batch arithmetic"

    # ------------------------------------------------------------------ data
    def _open_atlases(self) -> list:
        """The run's atlases; ``.h5ad`` inputs are built into ``OUTPUT/atlases`` first (once)."""
        from ..data import Atlas, ensure_atlas, ensure_default_atlas

        paths = []
        with self.accelerator.main_process_first():  # one process builds, the others then open
            for p in list(self.cfg.data.atlas) or [ensure_default_atlas()]:
                paths.append(ensure_atlas(p, self.output_dir / "atlases", progress=self.accelerator.is_main_process,
                                          changed="error" if self.cfg.resume else "rebuild",
                                          log=self._print, **self.cfg.data.columns))
        return [Atlas(p) for p in paths]

    def _data_vocabulary(self, atlases) -> dict:
        """The model's genes (``data.genes``) and the covariate names of the atlases."""
        from ..data import atlas_vocabularies, gene_vocabulary

        vocab = atlas_vocabularies(atlases)
        hidden = check_hidden_covariates(self.cfg.data.hidden_covariates)
        if hidden:
            self._print(f"hidden covariates: {', '.join(hidden)} (never given to the model; it learns how populations "
                        "vary across them)")
        choice = self.cfg.data.genes
        if choice == "hvg":
            genes, how = gene_vocabulary(atlases), "the highly variable genes flagged at build (data.genes: hvg)"
        elif choice == "all":
            genes, how = gene_vocabulary(atlases, all_genes=True), "every gene of the data (data.genes: all)"
        elif isinstance(choice, int):
            genes, how = gene_vocabulary(atlases, n_top_genes=choice), f"each atlas's {choice} most variable genes"
        else:
            genes, how = gene_vocabulary(atlases, genes=choice), f"the gene list {choice}"
        self._print(f"genes: {len(genes):,} of the data's {len({g for a in atlases for g in a.gene_names}):,}, {how}")
        out = {
            "gene_names": genes,
            # the marginal stage has no perturbation label: finetuning adds the vocabulary
            "perturbation_names": [] if self.cfg.train.objective == "marginal" else vocab["perturbation"],
            "context_names": [] if "context" in hidden else vocab["context"],
            "batch_names": [] if "batch" in hidden else vocab["batch"],
            "hidden_covariates": hidden,
        }
        self.feature_table = None
        if self.cfg.data.perturbation_features:
            out["perturbation_feature_dim"] = self._read_features(atlases, vocab["perturbation"]).shape[1]
        return out

    def _read_features(self, atlases, names) -> "pd.DataFrame":
        """``data.perturbation_features``: the rows of the data's perturbations (controls left out)."""
        from ..features import compose, read_table

        path = self.cfg.data.perturbation_features
        if self.cfg.train.objective != "conditional":
            raise ValueError("data.perturbation_features needs train.objective: conditional (marginal sets have "
                             "no perturbation)")
        controls = {str(p) for a in atlases for p in a.groups.loc[a.groups["is_control"], "perturbation"]}
        table = compose([n for n in names if n not in controls], read_table(path), what=f"data.perturbation_features {path}")
        self.feature_table = table
        self._print(f"perturbation features: {table.shape[1]} per perturbation for {len(table)} perturbation(s), "
                    f"from {path}")
        return table

    def _build_loaders(self, atlases, config: PerturbDiffConfig, data_vocab: dict):
        """Training and validation loaders for this rank, in the model's vocabularies."""
        from ..data import CellSetDataset, SplitSpec, with_validation_groups
        from ..data.splits import check_held_out_names, split_counts

        data, train = self.cfg.data, self.cfg.train
        paths = [a.path for a in atlases]
        data_genes = set(data_vocab["gene_names"]) | {g for a in atlases for g in a.gene_names}
        shared = sum(g in data_genes for g in config.gene_names or [])
        if config.gene_names is None or shared < self.cfg.model.min_shared_genes * config.num_genes:
            raise ValueError(
                f"the atlas genes do not match the model: {shared} of the model's {config.num_genes} genes are in "
                f"{', '.join(map(str, paths))}; finetune with gene mapping (finetune/run.py) or build a matching atlas"
            )
        conditional = train.objective == "conditional"
        spec = None
        if data.split_file:
            spec = SplitSpec.load(data.split_file)
        elif data.heldout_contexts or data.heldout_perturbations:
            check_held_out_names(data.heldout_contexts, data.heldout_perturbations, atlases)
            spec = SplitSpec.held_out(data.heldout_contexts, data.heldout_perturbations, split="test")
        spec = with_validation_groups(spec, atlases, data.val_fraction, seed=train.seed)
        counts = split_counts(spec, atlases, data.set_size)
        self._print(f"split (perturbed groups / cells / sets of {data.set_size}): " + ", ".join(
            f"{s} {counts[s]['groups']} / {counts[s]['cells']:,} / {counts[s]['sets']}" for s in ("train", "val", "test"))
            + f"; {counts['control_cells']:,} control cells")
        if data.val_fraction > 0 and counts["val"]["groups"] == 0:
            self._print(f"data.val_fraction={data.val_fraction}: no validation loss: no training (context, perturbation) "
                        "pair could be held out (a pair is held out only while its context and its perturbation keep "
                        "another trained pair, so that no response is taken away from training)")

        common = dict(set_size=data.set_size, batch_size=data.batch_size, weights=data.weights, normalization=config.norm,
                      gene_names=config.gene_names, perturbation_names=config.perturbation_names,
                      context_names=config.context_names, batch_names=config.batch_names,
                      hidden_covariates=config.hidden_covariates, mode="conditional" if conditional else "marginal", held_out=spec, rank=self.rank,
                      world_size=self.world_size, sparse=self._sparse_batches(data.sparse_batches),
                      pair_controls=conditional and config.paired_control,
                      perturbation_features=self.feature_matrix)
        train_set = CellSetDataset(atlases, split="train", seed=train.seed, drop_last=True, return_set_ids=True, **common)
        if len(train_set) == 0:
            raise ValueError(
                f"the training split has {train_set.num_sets} sets: too few for {data.batch_size} sets per batch on "
                f"{self.world_size} process(es); lower data.batch_size or data.set_size"
            )
        val_set = None
        if spec is not None and train.val_every:
            try:
                val_set = CellSetDataset(atlases, split="val", seed=train.seed + 1, drop_last=False, **common)
            except ValueError as err:  # no validation groups in this data
                self._print(f"no validation loss: {err}")
        self._print(f"data: {', '.join(map(str, paths))}: {train_set.num_sets} training sets per epoch "
                    f"({len(train_set)} batches per process)" + (f", {val_set.num_sets} validation sets" if val_set else ""))
        return train_set.loader(num_workers=data.num_workers), val_set

    def _feature_matrix(self, config: PerturbDiffConfig):
        """The feature table as [perturbation ids, F] in the model's vocabulary (zeros: null, controls)."""
        if self.feature_table is None:
            if config.perturbation_feature_dim:  # a feature model trained on ids would predict from untrained features
                raise ValueError(f"the model takes {config.perturbation_feature_dim} perturbation features "
                                 "(model.overrides or its base model) but no table was given: pass "
                                 "--perturbation-features / data.perturbation_features")
            return None
        if config.perturbation_feature_dim != self.feature_table.shape[1]:
            raise ValueError(f"the model takes {config.perturbation_feature_dim} perturbation features, "
                             f"data.perturbation_features has {self.feature_table.shape[1]}")
        matrix = np.zeros((config.num_ids("perturbation"), self.feature_table.shape[1]), dtype=np.float32)
        for i, name in enumerate(config.perturbation_names, start=1):
            if name in self.feature_table.index:
                matrix[i] = self.feature_table.loc[name].to_numpy()
        return matrix

    def _sparse_batches(self, value) -> bool:
        return self.accelerator.device.type == "cuda" if value == "auto" else bool(value)

    def _to_device(self, batch: dict) -> dict:
        from ..data import densify

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
        accelerator, train, optim = self.accelerator, self.cfg.train, self.cfg.optim
        if self.cfg.resume:
            self.resume()
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_json(self.output_dir / "train_config.json", self.cfg.to_dict())
        if accelerator.log_with:
            hparams = flatten(self.cfg.to_dict(), keep=())
            accelerator.init_trackers("perturbdiff", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                     for k, v in hparams.items()})
        self._print(
            f"PerturbDiff {train.objective} training: {self.model_config.num_genes} genes, "
            f"{sum(p.numel() for p in accelerator.unwrap_model(self.model).parameters()) / 1e6:.2f}M parameters, "
            f"{self.world_size} process(es){', DeepSpeed ZeRO-' + str(self.zero_stage) if self.is_deepspeed else ''}\n"
            f"batch: {self.cfg.data.batch_size} sets x {self.cfg.data.set_size} cells x {optim.grad_accum} accumulation "
            f"x {self.world_size} processes = {self.cells_per_step} cells per optimizer step"
        )
        sets_file = None
        if train.record_sets:
            (self.output_dir / "sets").mkdir(parents=True, exist_ok=True)
            accelerator.wait_for_everyone()
            sets_file = open(self.output_dir / "sets" / f"rank{self.rank}.jsonl", "a")

        from tqdm.auto import tqdm

        # a bar on a terminal; in a log file (a job's stderr) one line per logged step instead
        interactive = sys.stderr.isatty()
        bar = tqdm(total=train.max_steps, initial=self.step, disable=not (accelerator.is_main_process and interactive),
                   desc="training", dynamic_ncols=True)
        batches = self._batches()
        start, window_start, window_cells = time.time(), time.time(), 0
        running = {"loss": 0.0, "mmd": 0.0, "mse": 0.0}
        postfix: dict = {}
        first_step, skipped = self.step, 0
        while self.step < train.max_steps:
            if train.stop_after_steps and self.step - first_step >= train.stop_after_steps:
                bar.close()
                self.save_checkpoint()
                self._print(f"stopped after {train.stop_after_steps} steps at step {self.step}; continue with --resume")
                accelerator.end_training()
                return self.output_dir / "checkpoints"
            lr = lr_at(self.step, optim, train.max_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches)
            if sets_file is not None:
                sets_file.write(json.dumps({"step": self.step, "sets": batch["set_id"].tolist()}) + "\n")
            batch = self._to_device(batch)
            with accelerator.accumulate(self.model):
                out = training_step(self.model, self.diffusion, batch, self.objective,
                                    generator=self.generator, shared_generator=self.shared_generator)
                if self.is_deepspeed:  # DeepSpeed steps inside backward: check every micro-batch before it
                    self._check_deepspeed_loss(out["loss"])
                accelerator.backward(out["loss"])
                finite = True
                if accelerator.sync_gradients:
                    finite = self._finite_step(out["loss"], optim.grad_clip, self.mixed == "fp16")
                # under fp16 the gradient scaler must see every step: it skips a non-finite update itself
                if finite or self.mixed == "fp16":
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            if not finite:  # the step is skipped: no update, no EMA, the step count stays
                skipped += 1
                running = {k: 0.0 for k in running}
                self._print(f"step {self.step + 1}: non-finite loss or gradient, update skipped "
                            f"({skipped} in a row; train.max_skipped_steps={train.max_skipped_steps})")
                if skipped > train.max_skipped_steps:
                    bar.close()
                    raise self._diverged(f"non-finite loss or gradient at step {self.step + 1} for {skipped} steps in a "
                                         "row (data with inf/NaN, a learning rate too high, or a damaged state)")
                continue
            for k in running:
                running[k] += out[k].detach().float().item() / optim.grad_accum
            if not accelerator.sync_gradients:
                continue
            skipped = 0

            # ---- one optimizer step done
            self._update_ema()
            self.step += 1
            self.cells_seen += self.cells_per_step
            window_cells += self.cells_per_step
            reduced = accelerator.reduce(torch.tensor([running["loss"], running["mmd"], running["mse"]], device=accelerator.device), "mean")
            running = {k: 0.0 for k in running}
            logs = {"loss": reduced[0].item(), "mmd": reduced[1].item(), "mse": reduced[2].item(), "lr": lr}
            bar.update(1)
            if self.step % train.log_every == 0 or self.step == train.max_steps or self.step == 1:
                now = time.time()
                logs["cells_per_s"] = window_cells / max(now - window_start, 1e-9)
                window_start, window_cells = now, 0
            if train.val_every and (self.step % train.val_every == 0 or self.step == train.max_steps):
                logs["val_loss"] = self.validate()
            postfix.update({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "lr", "cells_per_s", "val_loss")})
            bar.set_postfix(postfix)
            if not interactive and "cells_per_s" in logs:
                self._print(f"step {self.step}/{train.max_steps}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in logs.items() if k in ("loss", "lr", "cells_per_s", "val_loss") and v is not None))
            self._log(logs)
            if train.save_every and self.step % train.save_every == 0 and self.step < train.max_steps:
                self.save_checkpoint()
            if train.export_every and self.step % train.export_every == 0 and self.step < train.max_steps:
                self.export(self.output_dir / "exports" / checkpoint.checkpoint_name(self.step))
        bar.close()
        if sets_file is not None:
            sets_file.close()
        if train.save_every:
            self.save_checkpoint()
        export_dir = self.export(self.output_dir / "model")
        elapsed = time.time() - start
        self._print(
            f"done: {self.step} steps in {elapsed:.1f} s, {self.cells_seen:,} cells seen "
            f"({self.cells_seen / max(elapsed, 1e-9):,.0f} cells/s); export: {export_dir}"
        )
        if self.cfg.push_to_hub and accelerator.is_main_process:
            checkpoint.push_to_hub(export_dir, self.cfg.push_to_hub)
        accelerator.end_training()
        return export_dir

    def _on_every_rank(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank (every rank takes the same branch after it)."""
        flag = self.accelerator.reduce(torch.tensor([0.0 if ok else 1.0], device=self.accelerator.device), "sum")
        return float(flag[0]) == 0.0

    def _diverged(self, detail: str) -> FloatingPointError:
        last = checkpoint.list_checkpoints(self.output_dir)
        return FloatingPointError(f"training diverged: {detail}; no export was written"
                                  + (f"; the last good checkpoint is {last[-1]}" if last else ""))

    def _check_deepspeed_loss(self, loss: torch.Tensor) -> None:
        if not self._on_every_rank(bool(torch.isfinite(loss.detach()).all())):
            raise self._diverged(f"non-finite loss at step {self.step + 1} (DeepSpeed applies an update inside "
                                 "backward, so the run stops before it)")

    def _finite_step(self, loss: torch.Tensor, grad_clip: float, fp16: bool) -> bool:
        """Clip the gradients and say whether the loss and the gradient norm are finite on every rank.

        Under fp16 the gradient scaler skips overflowing steps itself (and must see every step to
        lower its scale), so there only a non-finite loss counts. Under DeepSpeed (which clips inside
        its step) the loss was checked before backward.
        """
        accelerator = self.accelerator
        ok = bool(torch.isfinite(loss.detach()).all())
        if fp16:
            if grad_clip > 0:
                accelerator.clip_grad_norm_(self.model.parameters(), grad_clip)
        elif not self.is_deepspeed:
            norm = accelerator.clip_grad_norm_(self.model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
            ok = ok and bool(torch.isfinite(torch.as_tensor(norm)).all())
        return self._on_every_rank(ok)

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

    # ------------------------------------------------------------------ output
    def _print(self, text: str) -> None:
        if self.accelerator.is_main_process:
            print(text, flush=True)

    def _log(self, logs: dict) -> None:
        logs = {k: v for k, v in logs.items() if v is not None}
        if self.accelerator.log_with:
            self.accelerator.log({f"train/{k}" if k != "val_loss" else "val/loss": v for k, v in logs.items()}, step=self.step)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            row = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in logs.items()}
            with open(self.output_dir / "metrics.jsonl", "a") as f:  # JSON Lines: no bare NaN
                f.write(json.dumps({"step": self.step, **row}, allow_nan=False) + "\n")
        self.last_logs = logs

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write a resume state (every rank calls it); weights that are not finite are refused."""
        unwrapped, gathered = self._gathered()  # ZeRO-3: the full parameters, not empty partitions
        with gathered:
            checkpoint.check_finite(unwrapped.state_dict(), f"the model at step {self.step}")
        return checkpoint.save_resume_state(self.accelerator, self.output_dir, self.step, ema=self.ema, keep_last=self.cfg.train.keep_last,
                                            rank_state={
                                                "step": self.step,
                                                "cells_seen": self.cells_seen,
                                                "world_size": self.world_size,
                                                "generator": self.generator.get_state().tolist(),
                                                "shared_generator": self.shared_generator.get_state().tolist(),
                                                "data": self.train_data.state_dict(),
                                            })

    def resume(self) -> bool:
        """Restore the newest intact checkpoint; False when there is none (the run starts fresh).

        Each checkpoint's manifest (sizes and checksums of every file, written by this run) is
        verified before anything in it is loaded; a damaged or tampered one is skipped, saying why.
        """
        from safetensors.torch import load_file

        ckpt = checkpoint.newest_intact_checkpoint(self.accelerator, self.output_dir, log=self._print)
        if ckpt is None:
            self._print(f"--resume: no intact checkpoint in {self.output_dir / 'checkpoints'}, starting from step 0")
            if self.accelerator.is_main_process:
                checkpoint.truncate_metrics(self.output_dir / "metrics.jsonl", 0)
            return False
        state = checkpoint.load_trainer_state(ckpt, self.rank, self.world_size)
        self.accelerator.load_state(str(ckpt))
        if self.ema is not None:
            self.ema.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
        self.step, self.cells_seen = state["step"], state["cells_seen"]
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.shared_generator.set_state(torch.tensor(state["shared_generator"], dtype=torch.uint8))
        self.train_data.load_state_dict(state["data"])
        if self.accelerator.is_main_process:  # the steps after the checkpoint will be logged again
            checkpoint.truncate_metrics(self.output_dir / "metrics.jsonl", self.step)
        self._print(f"resumed from {ckpt} at step {self.step}")
        return True

    def export(self, path: str | os.PathLike) -> Path:
        """``save_pretrained`` folder with the EMA weights (or the live ones) and a model card."""
        accelerator = self.accelerator
        path = Path(path)
        if self.ema is not None:
            unwrapped = accelerator.unwrap_model(self.model)
            saved = unwrapped.state_dict().keys()  # persistent buffers too (the EMA holds parameters only)
            state = {**self.ema.state_dict(),
                     **{n: b.detach().cpu() for n, b in unwrapped.named_buffers() if n in saved}}
        else:
            state = accelerator.get_state_dict(self.model)  # a collective under ZeRO-3: every rank calls it
        if accelerator.is_main_process:
            card = checkpoint.model_card(self.model_config, self.cfg, step=self.step, cells_seen=self.cells_seen,
                                         world_size=self.world_size, ema_on=self.ema is not None,
                                         logs=self.last_logs, extra=self.model_card, datasets=self.datasets)
            checkpoint.write_export(path, self.model_config, state, card, self.response_stats)
        accelerator.wait_for_everyone()
        return path
