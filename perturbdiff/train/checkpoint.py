"""What a run keeps: resume states (with retention), the EMA of the weights, exports and their card.

Two kinds of checkpoint, as in diffusers / torchtitan:

- a **resume state** ``OUTPUT/checkpoints/step-N/``: Accelerate's (or DeepSpeed's) model and
  optimizer state, ``ema.safetensors``, and one ``trainer_state_rank{r}.json`` per rank (step,
  RNG states, loader position). Written into a temporary folder and renamed when every rank is
  done; ``COMPLETE`` marks it whole; the newest ``keep_last`` are kept.
- an **export** ``OUTPUT/model/`` (and ``OUTPUT/exports/step-N/``): ``save_pretrained`` with
  ``config.json`` + ``model.safetensors`` (EMA weights when the EMA is on), the training means of a
  conditional model (``response_stats.safetensors``, for prediction's anchor) and a ``README.md``
  model card. It loads with ``from_pretrained`` and needs no code from the folder.

Layout of a run's ``output_dir`` (one run per folder: `claim_output_dir`)::

    train_config.json            the run's config (a resume must agree with it)
    checkpoints/step-00000100/   resume states (+ MANIFEST.json, COMPLETE); .damaged-step-N set aside
    exports/step-00000100/       interval exports (``save_pretrained`` folders)
    model/                       the final export (EMA weights), loads with from_pretrained
    metrics.jsonl                one line per logged step (train loss, lr, cells/s, val loss)
    logs/                        TensorBoard (or W&B) tracker files
    atlases/                     .h5ad inputs built into atlases
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch

from ..baselines import save_stats
from ..configuration import PerturbDiffConfig
from ..data.remote import location_name
from ..files import atomic_json
from ..modeling import PerturbDiffModel

__all__ = ["EMA", "CHECKPOINT_PREFIX", "list_checkpoints", "save_resume_state", "load_trainer_state",
           "newest_intact_checkpoint", "verify_manifest", "claim_output_dir", "check_finite", "truncate_metrics",
           "write_export", "model_card", "push_to_hub"]

MANIFEST = "MANIFEST.json"
# What a run writes into its output directory (an earlier run's files are never mixed with a new run's).
RUN_FILES = ("train_config.json", "metrics.jsonl", "checkpoints", "exports", "model", "logs", "sets", "atlases")

CHECKPOINT_PREFIX = "step-"


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


# =========================================================================== resume states
def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete resume checkpoints, oldest first (temporary folders of interrupted saves excluded)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "COMPLETE").exists()]
    return sorted(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_resume_state(accelerator, output_dir: Path, step: int, *, ema: EMA | None, rank_state: dict,
                      keep_last: int) -> Path:
    """Write a resume state atomically (a collective: every rank calls it) and prune old ones.

    Every file is listed with its size and CRC32C in ``MANIFEST.json`` before ``COMPLETE`` is
    written; `newest_intact_checkpoint` verifies it before anything is loaded. A full disk is an
    error that says so, and the partial folder is removed.
    """
    from safetensors.torch import save_file

    root = output_dir / "checkpoints"
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if ema is not None and accelerator.is_main_process:
            save_file(ema.state_dict(), str(tmp / "ema.safetensors"))
        atomic_json(tmp / f"trainer_state_rank{accelerator.process_index}.json", rank_state)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_json(tmp / MANIFEST, {"step": step, "files": _file_table(tmp)})
            (tmp / "COMPLETE").write_text(str(step))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in list_checkpoints(output_dir)[: -max(1, keep_last)]:
                shutil.rmtree(old, ignore_errors=True)
    except Exception as err:  # torch.save (RuntimeError) and safetensors (SafetensorError) hide ENOSPC
        free = shutil.disk_usage(root).free if root.exists() else 0  # measured before the partial folder goes
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if _full_disk(err, free):
            raise OSError(errno.ENOSPC, f"no space left on the device writing checkpoint {final} "
                                        f"({free >> 20} MiB free; the partial checkpoint was "
                                        "removed, earlier checkpoints are intact); free space and --resume") from err
        raise
    accelerator.wait_for_everyone()
    return final


def _full_disk(err: BaseException, free: int) -> bool:
    """Whether a failed write ran out of space: ENOSPC somewhere in the chain, or a write failure
    (torch / safetensors wording) with almost no space left."""
    chain, e = [], err
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(getattr(e, "errno", None) == errno.ENOSPC for e in chain):
        return True
    text = " ".join(str(e).lower() for e in chain)
    wrote = any(w in text for w in ("no space", "write failed", "unexpected pos", "failed to write", "i/o error"))
    return wrote and free < (64 << 20)


def _crc32c(path: Path) -> str:
    import google_crc32c

    digest = google_crc32c.Checksum()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest().decode()


def _state_files(folder: Path) -> list[str]:
    """The files of a checkpoint that its manifest lists (all but the manifest and the marker)."""
    return [str(p.relative_to(folder)) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST, "COMPLETE")]


def _file_table(folder: Path) -> dict:
    return {name: {"size": (folder / name).stat().st_size, "crc32c": _crc32c(folder / name)}
            for name in _state_files(folder)}


def verify_manifest(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be trusted (None when every file matches its manifest, and no file is extra)."""
    path = ckpt / MANIFEST
    if not path.is_file():
        return "it has no MANIFEST.json"
    try:
        listed = json.loads(path.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"its MANIFEST.json is unreadable ({err})"
    present = set(_state_files(ckpt))
    extra, missing = sorted(present - set(listed)), sorted(set(listed) - present)
    if extra or missing:
        return f"files differ from its manifest (extra {extra[:3]}, missing {missing[:3]})"
    for name, entry in listed.items():
        f = ckpt / name
        if f.stat().st_size != entry["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {entry['size']}"
        if _crc32c(f) != entry["crc32c"]:
            return f"{name} does not match its checksum (damaged or changed after it was written)"
    return None


def newest_intact_checkpoint(accelerator, output_dir: Path, log=print) -> Path | None:
    """The newest complete checkpoint whose manifest verifies (a collective: every rank calls it).

    The main process verifies and every rank gets its answer, so all load the same checkpoint. The
    newer ones that fail are renamed aside (``checkpoints/.damaged-step-N``, kept for inspection, no
    longer counted), so pruning after the resume cannot delete the fresh checkpoints in their favour.
    """
    from accelerate.utils import broadcast_object_list

    chosen = [None, None]  # (path, error): the main process never raises before the collective
    if accelerator.is_main_process:
        try:
            for ckpt in reversed(list_checkpoints(output_dir)):
                try:
                    problem = verify_manifest(ckpt)
                except (OSError, ValueError, TypeError, KeyError) as err:  # an unreadable file is damage too
                    problem = f"it cannot be verified ({err})"
                if problem is None:
                    chosen[0] = str(ckpt)
                    break
                aside = ckpt.with_name(f".damaged-{ckpt.name}")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(ckpt, aside)
                log(f"--resume: skipping checkpoint {ckpt}: {problem} (moved aside to {aside.name})")
        except Exception as err:
            chosen[1] = f"--resume: cannot check the checkpoints in {output_dir}: {err}"
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    if chosen[1] is not None:
        raise ValueError(chosen[1])
    return Path(chosen[0]) if chosen[0] is not None else None


def load_trainer_state(ckpt: Path, rank: int, world_size: int) -> dict:
    """This rank's trainer state of a checkpoint, checked against the run's number of processes."""
    state_file = ckpt / f"trainer_state_rank{rank}.json"
    if not state_file.exists():
        raise ValueError(f"checkpoint {ckpt} has no state for rank {rank}: was it written with another number of processes?")
    state = json.loads(state_file.read_text())
    if state["world_size"] != world_size:
        raise ValueError(f"checkpoint {ckpt} was written by {state['world_size']} processes, this run has {world_size}")
    return state


# =========================================================================== guards
def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise ``FloatingPointError`` naming the first parameters that hold NaN or inf."""
    bad = [name for name, t in state.items() if t.is_floating_point() and t.numel() and not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(f"not writing {what}: {len(bad)} parameter(s) hold NaN or inf (e.g. {bad[:3]})")


def claim_output_dir(accelerator, output_dir: Path, cfg) -> None:
    """Refuse to mix a new run with an earlier one in ``output_dir`` (a collective: every rank calls it).

    A directory holding a run is used only with ``resume`` (the same run: its saved config must
    agree, up to `RESUMABLE_CHANGES`) or ``overwrite`` (the earlier run's files are removed first).
    The main process decides (and deletes); every rank raises the same error or goes on together.
    """
    from accelerate.utils import broadcast_object_list

    verdict = [None]
    if accelerator.is_main_process:
        try:
            verdict = [_output_dir_verdict(output_dir, cfg)]
        except Exception as err:  # never raise before the collective: the other ranks would wait in it
            verdict = [("error", f"cannot use output directory {output_dir}: {err}")]
    if accelerator.num_processes > 1:
        broadcast_object_list(verdict)
    accelerator.wait_for_everyone()
    if verdict[0] is not None:
        kind, message = verdict[0]
        raise FileExistsError(message) if kind == "exists" else ValueError(message)


def _output_dir_verdict(output_dir: Path, cfg):
    """The main process's decision on ``output_dir``: None (go on) or (kind, message)."""
    from .config import config_differences

    present = [name for name in RUN_FILES if (output_dir / name).exists()] if output_dir.is_dir() else []
    holds_run = any(name in present for name in ("train_config.json", "metrics.jsonl", "checkpoints", "model"))
    saved = output_dir / "train_config.json"
    if holds_run and cfg.overwrite:
        for name in present:
            target = output_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    elif holds_run and not cfg.resume:
        return ("exists", f"output directory {output_dir} holds an earlier run ({', '.join(present)}): pass --resume "
                          "to continue it, --overwrite to replace it, or choose another --output-dir")
    elif cfg.resume and saved.is_file():
        diff = config_differences(json.loads(saved.read_text()), cfg)
        if diff:
            return ("differs", f"--resume: this run's config differs from the run in {output_dir}: {'; '.join(diff[:8])}"
                               + (f" (+{len(diff) - 8} more)" if len(diff) > 8 else "")
                               + "; resume with the same settings, or start a new run with --overwrite / another "
                               "--output-dir")
    return None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the logged rows after ``step`` (a resumed run logs them again: no duplicate steps)."""
    if not path.is_file():
        return
    def kept(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill: dropped
            return False

    rows = [line for line in path.read_text().splitlines() if line.strip() and kept(line)]
    from ..files import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text("".join(r + "\n" for r in rows)))


# =========================================================================== exports
def write_export(path: Path, config: PerturbDiffConfig, state: dict[str, torch.Tensor], card: str,
                 response_stats: dict | None = None) -> Path:
    """A ``save_pretrained`` folder from a full state dict, written to a temporary sibling and renamed;
    with ``response_stats`` (the training means, `perturbdiff.baselines.save_stats`) beside the weights.

    Weights that are not finite are refused: a NaN model is never exported (nor pushed).
    """
    check_finite(state, f"the export {path}")
    model = PerturbDiffModel(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "README.md").write_text(card)
    if response_stats is not None:
        save_stats(tmp, response_stats)
    for f in tmp.iterdir():  # an export is meant to be shared: readable by others
        f.chmod(0o644)
    tmp.chmod(0o755)
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)
    return path


def model_card(config: PerturbDiffConfig, cfg, *, step: int, cells_seen: int, world_size: int, ema_on: bool,
               logs: dict, extra: dict, datasets: list | None = None) -> str:
    """The export's README: what the model is, what it was trained on and how, its split, its last figures."""
    atlases = [location_name(a) for a in cfg.data.atlas] or ["the built-in synthetic atlas"]  # no paths of this machine
    conditional = cfg.train.objective == "conditional"
    d = cfg.data
    if d.split_file:
        split = f"the split file {Path(d.split_file).name}"
    elif d.heldout_contexts or d.heldout_perturbations:
        split = (f"held out (never trained on): contexts {list(d.heldout_contexts)} x perturbations "
                 f"{list(d.heldout_perturbations)}")
    else:
        split = "none: every group was trained on"
    lines = [
        "---", "library_name: perturbdiff", "license: other  # the licence of the training data applies; set it before publishing",
        "tags: [single-cell, perturbation, diffusion, perturbdiff]", "---",
        "# PerturbDiff model", "",
        "A set-level functional diffusion model over cells (PerturbDiff, Yuan et al. 2026).", "",
        "```python",
        "import perturbdiff",
        "from perturbdiff import PerturbDiffPipeline",
        'pipe = PerturbDiffPipeline.from_pretrained("this_folder")',
        'pred = pipe.predict(controls, perturbation="...", context="...", context_key="cell_type")  # an AnnData',
        "```", "",
        "## Training", "",
        f"- objective: {cfg.train.objective} ({'control stream on' if conditional else 'no control stream, no perturbation label'}; "
        f"covariate dropout {cfg.train.cond_drop_prob})",
        f"- data: {', '.join(map(str, atlases))}" + (f" (datasets: {', '.join(datasets)})" if datasets else "")
        + (f" (weights {d.weights})" if d.weights else ""),
        f"- split: {split}; validation: {d.val_fraction:.0%} of the training (context, perturbation) pairs",
        f"- steps: {step}; cells seen: {cells_seen:,}; "
        f"{d.batch_size} sets x {d.set_size} cells x {cfg.optim.grad_accum} accumulation x {world_size} processes per step",
        f"- optimiser: AdamW lr {cfg.optim.lr}, warmup {cfg.optim.warmup_steps}, cosine; EMA decay {cfg.train.ema_decay} "
        f"({'exported' if ema_on else 'off: live weights exported'})",
        f"- size: hidden {config.hidden_size}, {config.num_layers} layers, {config.num_heads} heads; {config.num_genes} genes; "
        f"{len(config.perturbation_names)} perturbations, {len(config.context_names)} contexts, {len(config.batch_names)} batches",
        f"- expression space: log1p(counts / total x {config.norm.target_sum}) / {config.norm.scale}; control label "
        f"{config.control_label!r}",
    ]
    if d.perturbation_features:  # prediction needs the same table (and takes rows for unseen perturbations)
        lines.append(f"- perturbation features: {config.perturbation_feature_dim} per perturbation from "
                     f"{Path(d.perturbation_features).name} (give it to predict: --perturbation-features)")
    if config.perturbation_shift:
        lines.append("- additive pathway: a learned shift per perturbation, shared by every context")
    # the base model by its last two path parts (runs/pretrain/model -> pretrain/model), not this machine's path
    lines += [f"- {k}: {'/'.join(Path(v).parts[-2:]) if k == 'base model' else v}" for k, v in extra.items()]
    lines += ["", "## Figures at the end of training (training and validation loss)", ""]
    lines += [f"- {k}: {v:.5g}" for k, v in logs.items() if isinstance(v, float)] or ["- (none logged)"]
    return "\n".join(lines) + "\n"


def push_to_hub(export_dir: Path, repo_id: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(export_dir), repo_id=repo_id)
    print(f"pushed {export_dir} to the hub as {repo_id}")
