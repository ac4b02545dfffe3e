"""Train / val / test splits of an atlas's groups, as in the paper: the test set is
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

A JSON file with the same keys is accepted too. Control groups are never held out by a perturbation
list (they are every split's control pool); they follow their context's zeroshot rule and, in the
loader's conditional mode, serve as controls for every split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SplitSpec", "SPLITS"]

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
        """The splits a group belongs to (empty: excluded). Exact "dataset.context" keys win over "context"."""
        keys = (f"{dataset}.{context}", context)
        for k in keys:
            if k in self.zeroshot:
                return frozenset([self.zeroshot[k]])
        if self.training is None:
            default = "train"
        else:
            default = self.training.get(dataset)
        if not is_control:
            for k in keys:
                if k in self.fewshot:
                    hit = frozenset(s for s, perts in self.fewshot[k].items() if perturbation in perts)
                    if hit:
                        return hit
                    break
        return frozenset([default]) if default else frozenset()


def as_split_spec(value) -> SplitSpec | None:
    """Accept a `SplitSpec`, a dict in the file layout, a path to a split file, or None."""
    if value is None or isinstance(value, SplitSpec):
        return value
    if isinstance(value, dict):
        return SplitSpec.from_dict(value)
    return SplitSpec.load(value)
