"""Adapt a trained model to new vocabularies: the step between a pretrained export and finetuning.

Names shared with the base keep their learned rows: covariate embeddings for perturbations,
contexts and batches seen by the base, and for shared genes the columns of the input projections
and the rows of the output projection. New names get freshly initialised rows. Everything else
(blocks, timestep and dose embedders) is copied unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .configuration import COVARIATES, PerturbDiffConfig, check_hidden_covariates
from .modeling import PerturbDiffModel

__all__ = ["extend_vocabulary", "adapt_model", "adapt_pretrained", "FINETUNE_OVERRIDES"]

# config fields a finetuning run may change on its base model (behaviour, not shapes or weights)
FINETUNE_OVERRIDES = {"paired_control", "perturbation_shift", "perturbation_feature_dim", "set_noise"}


def extend_vocabulary(base: Sequence[str], new: Sequence[str]) -> list[str]:
    """The base names in their order, then the new names not yet in it (so base ids do not move)."""
    seen = set(base)
    out = list(base)
    for n in new:
        if n not in seen:
            out.append(n)
            seen.add(n)
    return out


@torch.no_grad()
def adapt_model(
    base: PerturbDiffModel,
    *,
    gene_names: Sequence[str] | None = None,
    perturbation_names: Sequence[str] | None = None,
    context_names: Sequence[str] | None = None,
    batch_names: Sequence[str] | None = None,
    overrides: dict | None = None,
    seed: int = 0,
) -> tuple[PerturbDiffModel, dict]:
    """A new model with the given vocabularies, carrying over everything the base knows.

    Args:
        base: the trained model.
        gene_names: the new gene vocabulary (any order; ``None`` keeps the base's).
        perturbation_names, context_names, batch_names: new covariate vocabularies; ``None`` keeps the
            base's. Use :func:`extend_vocabulary` to keep every base name and id.
        overrides: config fields to change that keep the base's sizes (e.g. ``paired_control``: a
            module it adds starts freshly initialised, one it removes is dropped).
        seed: seed of the initialisation of new rows.
    Returns:
        the adapted model and a report: shared / new / dropped counts per vocabulary.
    """
    base_config = base.config
    if base_config.gene_names is None and gene_names is not None:
        raise ValueError("the base model has no gene names: its genes cannot be matched by name")
    vocab = {
        "gene_names": list(gene_names) if gene_names is not None else base_config.gene_names,
        "perturbation_names": list(perturbation_names) if perturbation_names is not None else base_config.perturbation_names,
        "context_names": list(context_names) if context_names is not None else base_config.context_names,
        "batch_names": list(batch_names) if batch_names is not None else base_config.batch_names,
    }
    cfg_dict = base_config.to_dict()
    # gene_max describes the base's training data: the trainer records the screen's
    for key in ("num_genes", "model_type", "transformers_version", "architectures", "gene_max"):
        cfg_dict.pop(key, None)
    config = PerturbDiffConfig(**{**cfg_dict, **(overrides or {}), **vocab})
    torch.manual_seed(seed)
    model = PerturbDiffModel(config)
    model.to(next(base.parameters()).dtype)

    report = {}
    old_sd, new_sd = base.state_dict(), model.state_dict()
    handled = set()

    # covariate tables: row 0 (null) and every shared name keep their embedding
    for cov in COVARIATES:
        key = f"covariate_embedder.{cov}.weight"
        old_names, new_names = base_config.vocabulary(cov), config.vocabulary(cov)
        old_pos = {n: i + 1 for i, n in enumerate(old_names)}
        pairs = [(0, 0)] + [(j + 1, old_pos[n]) for j, n in enumerate(new_names) if n in old_pos]
        dst, src = (torch.tensor(x) for x in zip(*pairs))
        new_sd[key][dst] = old_sd[key][src]
        handled.add(key)
        report[cov] = _counts(old_names, new_names)

    # genes: input columns (x_t and self-conditioning halves, control) and output rows
    old_genes = base_config.gene_names or [str(i) for i in range(base_config.num_genes)]
    old_g = {g: i for i, g in enumerate(old_genes)}
    pairs = [(j, old_g[g]) for j, g in enumerate(config.gene_names or old_genes) if g in old_g]
    if not pairs:
        raise ValueError("the new gene vocabulary shares no gene with the base model")
    dst, src = (torch.tensor(x) for x in zip(*pairs))
    G_old, G_new = base_config.num_genes, config.num_genes
    halves = 2 if base_config.self_conditioning else 1
    for h in range(halves):
        new_sd["x_embed.weight"][:, dst + h * G_new] = old_sd["x_embed.weight"][:, src + h * G_old]
    for key in ("c_embed.weight", "pair_embed.weight"):  # control-cell inputs (pair_embed: paired models)
        if key in old_sd and key in new_sd:
            new_sd[key][:, dst] = old_sd[key][:, src]
            handled.add(key)
    new_sd["final_layer.linear.weight"][dst] = old_sd["final_layer.linear.weight"][src]
    new_sd["final_layer.linear.bias"][dst] = old_sd["final_layer.linear.bias"][src]
    handled |= {"x_embed.weight", "final_layer.linear.weight", "final_layer.linear.bias"}
    if "final_layer.control_gate" in old_sd and "final_layer.control_gate" in new_sd:
        new_sd["final_layer.control_gate"][dst] = old_sd["final_layer.control_gate"][src]
        handled.add("final_layer.control_gate")
    report["genes"] = _counts(old_genes, config.gene_names or old_genes)
    key = "perturbation_shift.weight"  # [perturbation ids, genes]: shared perturbations x shared genes
    if key in old_sd and key in new_sd:
        old_pos = {n: i + 1 for i, n in enumerate(base_config.perturbation_names)}
        rows = [(j + 1, old_pos[n]) for j, n in enumerate(config.perturbation_names) if n in old_pos]
        if rows:
            rdst, rsrc = (torch.tensor(x) for x in zip(*rows))
            new_sd[key][rdst[:, None], dst[None]] = old_sd[key][rsrc[:, None], src[None]]
        handled.add(key)

    # the feature rows are the screen's: the trainer fills them from its feature table
    handled.add("covariate_embedder.feature_table")

    for key, value in old_sd.items():  # everything else has the same shape
        if key in handled or key not in new_sd:  # not in new_sd: a module the new config turns off
            continue
        if new_sd[key].shape != value.shape:
            raise ValueError(f"cannot carry over {key}: base {tuple(value.shape)}, new {tuple(new_sd[key].shape)}")
        new_sd[key] = value
    model.load_state_dict(new_sd)
    return model, report


def adapt_pretrained(base_dir, *, gene_names: Sequence[str], perturbation_names: Sequence[str],
                     context_names: Sequence[str], batch_names: Sequence[str], new_genes: str = "add",
                     overrides: dict | None = None, min_shared_genes: float = 0.5, seed: int = 0,
                     perturbation_feature_dim: int | None = None, hidden_covariates: Sequence[str] = (),
                     log=print) -> PerturbDiffModel:
    """A saved model (``from_pretrained`` folder) adapted to a screen's genes and covariates.

    Base names keep their ids and learned rows; the screen's new perturbations, contexts and
    batches are appended; genes the base lacks are appended (``new_genes="add"``) or left out
    (``"drop"``). Only `FINETUNE_OVERRIDES` may change on a base model. Fewer than
    ``min_shared_genes`` of the base's genes in the screen is an error: what the base learned would
    mostly not apply. ``hidden_covariates``: the covariates finetuning never tells the model
    (``data.hidden_covariates``), recorded in its config.
    """
    from pathlib import Path

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").exists():
        raise FileNotFoundError(f"base model {base_dir} has no config.json (expected a save_pretrained folder)")
    if new_genes not in ("add", "drop"):
        raise ValueError(f"model.new_genes must be 'add' or 'drop', got {new_genes!r}")
    if perturbation_feature_dim is not None:  # a feature table given to finetuning (data.perturbation_features)
        overrides = {**(overrides or {}), "perturbation_feature_dim": int(perturbation_feature_dim)}
    fixed = sorted(set(overrides or {}) - FINETUNE_OVERRIDES)
    if fixed:
        raise ValueError(f"model.overrides {fixed} cannot change a base model (its sizes and weights are kept); "
                         f"finetuning can override {sorted(FINETUNE_OVERRIDES)}")
    base = PerturbDiffModel.from_pretrained(base_dir)
    base_config = base.config
    in_screen = sum(g in set(gene_names) for g in base_config.gene_names)
    if in_screen < min_shared_genes * base_config.num_genes:
        raise ValueError(f"only {in_screen} of the base model's {base_config.num_genes} genes are in the screen "
                         f"({in_screen / base_config.num_genes:.0%} < model.min_shared_genes={min_shared_genes:g}): are the "
                         "gene names of the same kind (symbols vs Ensembl ids)? Lower model.min_shared_genes to go on")
    genes = extend_vocabulary(base_config.gene_names, gene_names) if new_genes == "add" else base_config.gene_names
    model, report = adapt_model(
        base, gene_names=genes,
        perturbation_names=extend_vocabulary(base_config.perturbation_names, perturbation_names),
        context_names=extend_vocabulary(base_config.context_names, context_names),
        batch_names=extend_vocabulary(base_config.batch_names, batch_names),
        overrides=overrides, seed=seed,
    )
    model.config.hidden_covariates = check_hidden_covariates(hidden_covariates)
    log(f"base model {base_dir}: genes {report['genes']['shared']} kept, {report['genes']['new']} added "
        f"({in_screen} of the base's {base_config.num_genes} genes are among "
        f"the screen's {len(set(gene_names))}); perturbations {report['perturbation']}, contexts {report['context']}, "
        f"batches {report['batch']}")
    return model


def _counts(old: Sequence[str], new: Sequence[str]) -> dict:
    old_set, new_set = set(old), set(new)
    return {"shared": len(old_set & new_set), "new": len(new_set - old_set), "dropped": len(old_set - new_set)}
