"""Train / val / test splits, as in the paper: the test set is
*held-out context ∩ held-out perturbation* (each held-out perturbation is seen in other contexts,
each held-out context with other perturbations).

A split is given either as lists (`SplitSpec.held_out`) or as a file in STATE's TOML split format
(Arc Institute's ``cell-load``), which this module reads and writes::

    [datasets]                       # optional: dataset name -> path (informational here)
    kang = "kang.zarr"

    [training]                       # optional: datasets used, and their default split
    kang = "train"

    [zeroshot]                       # a whole (dataset.context) goes to a split
    "kang.B" = "test"

    [fewshot."kang.CD14 Mono"]       # listed perturbations of one (dataset.context)
    val = ["stim"]
    test = ["stim"]                  # may overlap with val

A JSON file with the same keys is accepted too. This module is the one home of split rules: the
trainer's validation groups (`with_validation_groups`) and the AnnData cut for prediction and
evaluation (`split_for_evaluation`) are here too, so training and evaluation agree. Control groups are never held out by a perturbation
list (they are every split's control pool); they follow their context's zeroshot rule and, in the
loader's conditional mode, serve as controls for every split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SplitSpec", "SPLITS", "as_split_spec", "with_validation_groups", "split_for_evaluation",
           "check_held_out_names", "split_counts"]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitSpec:
    """Which groups belong to which split.

    Attributes:
        training: dataset → default split of its groups; None means every dataset defaults to "train"
            (with a mapping, datasets not listed belong to no split unless a rule below names them).
        zeroshot: "dataset.context" (or just "context" for any dataset) → split of the whole context.
        fewshot: "dataset.context" (or "context") → {split: perturbations of that context in the split}.
    """

    training: dict[str, str] | None = None
    zeroshot: dict[str, str] = field(default_factory=dict)
    fewshot: dict[str, dict[str, frozenset]] = field(default_factory=dict)

    def __post_init__(self):
        for where, values in (("training", (self.training or {}).values()), ("zeroshot", self.zeroshot.values())):
            for v in values:
                if v not in SPLITS:
                    raise ValueError(f"split file [{where}]: unknown split {v!r} (expected one of {SPLITS})")
        for key, parts in self.fewshot.items():
            for v in parts:
                if v not in SPLITS:
                    raise ValueError(f"split file [fewshot.{key!r}]: unknown split {v!r} (expected one of {SPLITS})")

    # -- constructors ------------------------------------------------------------------------------

    @classmethod
    def held_out(cls, contexts, perturbations, *, split: str = "test", dataset: str | None = None) -> "SplitSpec":
        """The paper's split: the groups of ``contexts`` × ``perturbations`` go to ``split``, the rest to train."""
        contexts, perts = list(contexts), frozenset(perturbations)
        if not contexts or not perts:
            raise ValueError("held_out needs at least one context and one perturbation")
        prefix = f"{dataset}." if dataset else ""
        return cls(fewshot={f"{prefix}{c}": {split: perts} for c in contexts})

    @classmethod
    def from_dict(cls, d: dict) -> "SplitSpec":
        unknown = set(d) - {"datasets", "training", "zeroshot", "fewshot"}
        if unknown:
            raise ValueError(f"split file: unknown sections {sorted(unknown)} (expected datasets, training, zeroshot, fewshot)")
        fewshot = {}
        for key, parts in (d.get("fewshot") or {}).items():
            if not isinstance(parts, dict):
                raise ValueError(f"split file [fewshot.{key!r}] must map splits to perturbation lists")
            fewshot[str(key)] = {str(s): frozenset(str(p) for p in perts) for s, perts in parts.items()}
        training = d.get("training")
        return cls(
            training={str(k): str(v) for k, v in training.items()} if training else None,
            zeroshot={str(k): str(v) for k, v in (d.get("zeroshot") or {}).items()},
            fewshot=fewshot,
        )

    @classmethod
    def load(cls, path) -> "SplitSpec":
        """Read a STATE-style ``.toml`` split file (or ``.json`` with the same keys)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"split file {path} does not exist")
        if path.suffix == ".json":
            return cls.from_dict(json.loads(path.read_text()))
        import tomllib

        try:
            return cls.from_dict(tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"split file {path}: {err}") from err

    def to_toml(self) -> str:
        """The spec in STATE's TOML split format."""
        q = json.dumps  # TOML basic strings and arrays of them are JSON-compatible
        lines = []
        if self.training is not None:
            lines += ["[training]"] + [f"{q(k)} = {q(v)}" for k, v in self.training.items()] + [""]
        lines += ["[zeroshot]"] + [f"{q(k)} = {q(v)}" for k, v in self.zeroshot.items()] + [""]
        lines += ["[fewshot]"]
        for key, parts in self.fewshot.items():
            lines += [f"[fewshot.{q(key)}]"] + [f"{s} = {q(sorted(p))}" for s, p in parts.items()]
        return "\n".join(lines) + "\n"

    # -- assignment --------------------------------------------------------------------------------

    def assign(self, dataset: str, context: str, perturbation: str, is_control: bool) -> frozenset:
        """The splits a group belongs to (empty: excluded).

        A zeroshot rule for the exact "dataset.context" wins over one for "context"; fewshot rules
        of both keys add up (a group listed under either is in that split, never in train)."""
        keys = (f"{dataset}.{context}", context)
        for k in keys:
            if k in self.zeroshot:
                return frozenset([self.zeroshot[k]])
        if self.training is None:
            default = "train"
        else:
            default = self.training.get(dataset)
        if not is_control:
            # every rule naming this context counts: a validation rule added under "dataset.context"
            # must not hide the user's test rule written as "context" (the held-out cells would be
            # trained on)
            hit = frozenset(s for k in keys if k in self.fewshot
                            for s, perts in self.fewshot[k].items() if perturbation in perts)
            if hit:
                return hit
        return frozenset([default]) if default else frozenset()


def as_split_spec(value) -> SplitSpec | None:
    """Accept a `SplitSpec`, a dict in the file layout, a path to a split file, or None."""
    if value is None or isinstance(value, SplitSpec):
        return value
    if isinstance(value, dict):
        return SplitSpec.from_dict(value)
    return SplitSpec.load(value)


# --------------------------------------------------------------------------- validation groups
def with_validation_groups(spec, atlases, fraction: float, seed: int):
    """Add a ``val`` split of about ``fraction`` of the training (context, perturbation) pairs.

    Used when the split given has no validation groups (or no split is given); controls are never
    held out (they are every split's control pool). Returns ``spec`` unchanged for fraction 0.

    A pair is held out only while its context keeps another trained perturbation and its
    perturbation another trained context: validation never takes away the only response a context
    shows, nor the only context a perturbation is seen in (on a screen of one drug in five patients
    it would otherwise remove a whole patient's response from training). Where no pair qualifies
    there is no validation split, and the trainer says so.
    """
    from collections import Counter

    import numpy as np

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
    per_context = Counter(key for key, _ in pairs)  # trained pairs left per context / per perturbation
    per_perturbation = Counter(pert for _, pert in pairs)
    chosen = []
    for i in rng.permutation(len(pairs)):
        if len(chosen) == k:
            break
        key, pert = pairs[i]
        if per_context[key] > 1 and per_perturbation[pert] > 1:
            chosen.append((key, pert))
            per_context[key] -= 1
            per_perturbation[pert] -= 1
    if not chosen:
        return spec
    fewshot = {key: dict(parts) for key, parts in (spec.fewshot if spec is not None else {}).items()}
    for key, pert in chosen:
        fewshot.setdefault(key, {})
        fewshot[key]["val"] = frozenset(fewshot[key].get("val", frozenset()) | {pert})
    return SplitSpec(training=spec.training if spec else None, zeroshot=dict(spec.zeroshot) if spec else {}, fewshot=fewshot)


# --------------------------------------------------------------------------- cutting an AnnData
def split_for_evaluation(
    adata,
    held_out,
    *,
    perturbation_key: str = "perturbation",
    context_key: str = "context",
    control_label: str = "control",
    dataset: str | None = None,
    dataset_key: str | None = None,
    split: str = "test",
) -> dict:
    """Cut a screen into the AnnData that ``predict`` and ``evaluate`` take, by a training split.

    The split is the one the trainer uses (a ``SplitSpec``, a split file or its dict; e.g.
    ``SplitSpec.held_out(contexts, perturbations)``: held-out context ∩ held-out perturbation), so
    the evaluation sees exactly the cells the model was not trained on.

    Args:
        adata: the whole screen (counts or log1p; nothing is normalised here).
        held_out: the split (``SplitSpec``, path to a STATE TOML / JSON split file, or dict).
        perturbation_key, context_key, control_label: obs columns and the control value.
        dataset, dataset_key: the dataset name the split's "dataset.context" keys refer to: a fixed
            name or an obs column (keys without a dataset prefix match any dataset).
        split: the split to evaluate (``"test"`` or ``"val"``).

    Returns:
        ``{"real": held-out cells + the control cells of their contexts, "train": the cells of the
        training split (controls included), "control": the control cells of the held-out contexts}``
        (copies; same genes and obs as ``adata``). Raises ``ValueError`` when the split selects no cell.
    """
    import numpy as np
    import pandas as pd

    spec = as_split_spec(held_out)
    if spec is None:
        raise ValueError("split_for_evaluation needs a split (held_out)")
    obs = adata.obs
    for key, flag in ((perturbation_key, "perturbation_key"), (context_key, "context_key"), (dataset_key, "dataset_key")):
        if key is not None and key not in obs.columns:
            raise ValueError(f"obs has no column {key!r} ({flag}); columns: {list(obs.columns)}")
    pert = obs[perturbation_key].astype(str).to_numpy()
    ctx = obs[context_key].astype(str).to_numpy()
    ds = obs[dataset_key].astype(str).to_numpy() if dataset_key else np.full(len(obs), dataset or "")
    is_ctrl = pert == control_label
    if not is_ctrl.any():
        raise ValueError(f"no control cells: label {control_label!r} not in obs[{perturbation_key!r}]")
    keys = pd.MultiIndex.from_arrays([ds, ctx, pert, is_ctrl])
    codes, groups = pd.factorize(keys)
    assigned = [spec.assign(d, c, p, bool(k)) for d, c, p, k in groups]
    in_split = np.array([split in a for a in assigned])[codes]
    in_train = np.array(["train" in a for a in assigned])[codes]
    held = in_split & ~is_ctrl
    if not held.any():
        raise ValueError(f"the split selects no perturbed cell for {split!r}")
    contexts = np.unique(ctx[held])
    ctrl_rows = is_ctrl & np.isin(ctx, contexts)
    return {"real": adata[held | ctrl_rows].copy(), "train": adata[in_train].copy(), "control": adata[ctrl_rows].copy()}


# --------------------------------------------------------------------------- checks and counts
def check_held_out_names(contexts, perturbations, atlases) -> None:
    """Raise ``ValueError`` when a held-out context or perturbation matches nothing in the atlases.

    A misspelt name (``a172`` for ``A172``) would otherwise hold out nothing and train on
    everything, silently.
    """
    from .vocab import atlas_vocabularies

    vocab = atlas_vocabularies(atlases)
    for flag, names, known in (("--heldout-contexts / data.heldout_contexts", contexts, vocab["context"]),
                               ("--heldout-perturbations / data.heldout_perturbations", perturbations, vocab["perturbation"])):
        unknown = [str(n) for n in names or [] if str(n) not in known]
        if unknown:
            shown = ", ".join(known[:30]) + (" ..." if len(known) > 30 else "")
            raise ValueError(f"{flag}: {unknown} match nothing in the data (known, {len(known)}: {shown})")


def split_counts(spec: SplitSpec | None, atlases, set_size: int) -> dict:
    """Perturbed groups, cells and sets per split (``{"train": {...}, "val": ..., "test": ...}``) and control cells."""
    import numpy as np

    out = {s: {"groups": 0, "cells": 0, "sets": 0} for s in SPLITS}
    out["control_cells"] = 0
    for atlas in atlases:
        g = atlas.groups
        sizes = (g["stop"] - g["start"]).to_numpy()
        for ds, ctx, pert, ctl, n in zip(g["dataset"], g["context"], g["perturbation"], g["is_control"], sizes):
            if ctl:
                out["control_cells"] += int(n)
                continue
            for split in (spec.assign(ds, ctx, pert, False) if spec is not None else frozenset(["train"])):
                out[split]["groups"] += 1
                out[split]["cells"] += int(n)
                out[split]["sets"] += int(np.ceil(n / set_size))
    return out
