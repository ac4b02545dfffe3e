"""Streaming cell-set batches from one or more atlases, for any number of ranks and workers.

A *set* is m cells of one group (dataset, context, perturbation, dose, batch), read as one
contiguous block of the atlas (the builder shuffles cells within groups, so a contiguous window is a
random subset). In conditional mode each set comes with a matched *control set* of m cells from the
control pool of the same (dataset, context, batch).

Epoch. Each eligible group contributes ``ceil(n_cells / m)`` sets per epoch. The sets of one group
tile it from a random offset (fresh each epoch), so an epoch covers every cell of a group once; the
last window wraps around to the group's start. A group shorter than m yields one set holding all of
its cells plus ``m - n`` cells drawn again with replacement. With ``weights``, each atlas contributes
``round(num_sets * w / sum(w))`` sets instead (a random subset of its sets, or repeated passes with
fresh offsets when up-weighted).

Control fallbacks. The control set is a random contiguous window of the (dataset, context, batch)
control group (with replacement if it is shorter than m). If that pool is empty, a control group of
the same (dataset, context) in another batch is used, chosen with probability proportional to its
size; the builder guarantees every (dataset, context) with perturbed cells has controls.

The module is long (~545 lines) because it is one `IterableDataset` whose epoch plan, sharding,
resumable position and reads share state; the sparse batch format lives in `sparse`.

Sharding. The epoch's sets are shuffled with (seed, epoch); rank r takes every world_size-th set,
then cuts them into batches; DataLoader worker w of W produces batches w, w+W, ... (the DataLoader
returns them in order, so the batch sequence is identical for any number of workers). Every set's
content depends only on (seed, epoch, its identity), so a run resumed from `state_dict` yields
exactly the batches the uninterrupted run would have. With ``drop_last=False`` the epoch is padded
by repeating its first sets so that every rank gets the same number of sets (as torch's
DistributedSampler does); with ``drop_last=True`` the tail is dropped so that every batch is full and
no set repeats.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..configuration import NULL_ID, check_hidden_covariates, encode_names
from ..expression import Normalization, gene_columns, normalize_csr
from .pairing import pair_order
from .sparse import SparseSets, concat_csr, take_rows
from .splits import as_split_spec
from .store import Atlas
from .vocab import atlas_vocabularies, gene_vocabulary

__all__ = ["CellSetDataset", "CellSetLoader"]

_MODES = ("conditional", "marginal")


class _Source:
    """Per-atlas tables the loader needs (group ranges, covariate ids, gene map); no X."""

    def __init__(self, atlas: Atlas, index: int):
        self.atlas = atlas
        self.path = atlas.path
        self.index = index
        g = atlas.groups
        self.groups = g
        self.start = g["start"].to_numpy(np.int64)
        self.size = (g["stop"] - g["start"]).to_numpy(np.int64)
        self.is_control = g["is_control"].to_numpy(bool)


class CellSetDataset(IterableDataset):
    """Batches of cell sets streamed from atlases (see the module docstring for the sampling rules).

    Args:
        atlases: an atlas path (or `Atlas`) or a list of them.
        set_size: m, cells per set.
        batch_size: sets per batch.
        weights: mixing weight per atlas (None: every set once per epoch).
        normalization: how counts become model inputs (default: ``Normalization()``; per-cell totals
            are over all genes the atlas measures).
        gene_names: target gene vocabulary (default: `gene_vocabulary` of the atlases); genes an
            atlas lacks are zero and listed in ``gene_presence``.
        perturbation_names, context_names, batch_names: covariate vocabularies (default:
            `atlas_vocabularies`); id = position + 1, a name outside a vocabulary is an error.
        hidden_covariates: covariates ("context", "batch") whose id is the null id in every set
            (their vocabulary is not used): sets are still drawn within one (context, perturbation,
            dose, batch) group and paired with that group's controls, so a model learns how
            populations vary across them (replicates, donors, patients) instead of being told
            which one a set came from.
        mode: "conditional" (perturbed sets with matched control sets) or "marginal" (sets from every
            group, controls included, with no perturbation label and no control set: pretraining).
        split: which split to stream: "train", "val", "test" or "all".
        held_out: a `SplitSpec`, a split-file path (STATE TOML or JSON) or dict; None: all is train.
        pair_controls: in conditional mode, reorder each control set so that its cell i is the
            optimal-transport partner of the perturbed set's cell i (`perturbdiff.data.pairing`;
            what a ``paired_control`` model trains on).
        seed: seed of all sampling; batches are a function of (seed, epoch, rank, world_size).
        rank, world_size: this process's shard.
        drop_last: drop the epoch's tail instead of padding it (see module docstring).
        sets_per_epoch: epoch size in sets (default: the natural number of sets).
        return_set_ids: add ``"set_id"`` (int64 [B], the set's position in the epoch) to batches.
        sparse: yield ``x0`` and ``control`` as normalised CSR (a `SparseSets`: ``indptr``,
            ``indices``, ``values`` tensors and the dense ``shape``) instead of dense tensors; `densify`
            turns them dense on the training device. At ~20% non-zeros this skips the loader's
            largest cost (writing [B, m, G] float32) and moves ~2.5x fewer bytes to the GPU.
        perturbation_features: float [perturbation ids, F] (row i: the features of perturbation id
            i, `perturbdiff.features`), conditional mode only: batches then carry
            ``perturbation_features`` float32 [B, F].

    Batches are dicts of tensors: ``x0`` float32 [B, m, G] (normalised target set), ``control`` float32
    [B, m, G] (conditional mode only), ``perturbation``, ``context``, ``batch`` int64 [B] (ids, 0 =
    null), ``dose`` float32 [B], ``group`` int64 [B] (group index; atlas i's groups are offset by the
    group counts of atlases before it).
    """

    def __init__(
        self,
        atlases,
        *,
        set_size: int = 256,
        batch_size: int = 8,
        weights=None,
        normalization: Normalization | None = None,
        gene_names=None,
        perturbation_names=None,
        context_names=None,
        batch_names=None,
        hidden_covariates=(),
        mode: str = "conditional",
        split: str = "train",
        held_out=None,
        pair_controls: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        sets_per_epoch: int | None = None,
        return_set_ids: bool = False,
        sparse: bool = False,
        perturbation_features: np.ndarray | None = None,
    ):
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if split not in ("train", "val", "test", "all"):
            raise ValueError(f"split must be 'train', 'val', 'test' or 'all', got {split!r}")
        if set_size < 1 or batch_size < 1:
            raise ValueError("set_size and batch_size must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        items = atlases if isinstance(atlases, (list, tuple)) else [atlases]
        if not items:
            raise ValueError("no atlases given")
        opened = [a if isinstance(a, Atlas) else Atlas(a) for a in items]
        self.sources = [_Source(a, i) for i, a in enumerate(opened)]
        self.set_size, self.batch_size = int(set_size), int(batch_size)
        self.normalization = normalization or Normalization()
        self.mode, self.split = mode, split
        if pair_controls and mode != "conditional":
            raise ValueError("pair_controls needs mode='conditional' (marginal sets have no control set)")
        self.pair_controls = bool(pair_controls)
        if perturbation_features is not None and mode != "conditional":
            raise ValueError("perturbation_features need mode='conditional' (marginal sets have no perturbation)")
        self.perturbation_features = (None if perturbation_features is None
                                      else np.asarray(perturbation_features, dtype=np.float32))
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.drop_last = drop_last
        self.return_set_ids = return_set_ids
        self.sparse = bool(sparse)
        self.held_out = as_split_spec(held_out)

        # vocabularies
        vocab = atlas_vocabularies(opened)
        self.gene_names = list(gene_vocabulary(opened) if gene_names is None else gene_names)
        self.perturbation_names = list(vocab["perturbation"] if perturbation_names is None else perturbation_names)
        self.hidden_covariates = check_hidden_covariates(hidden_covariates)
        self.context_names = ([] if "context" in self.hidden_covariates else
                              list(vocab["context"] if context_names is None else context_names))
        self.batch_names = [] if "batch" in self.hidden_covariates else list(vocab["batch"] if batch_names is None else batch_names)
        self.num_genes = len(self.gene_names)
        feats = self.perturbation_features
        if feats is not None and (feats.ndim != 2 or len(feats) != len(self.perturbation_names) + 1):
            raise ValueError(f"perturbation_features must be [{len(self.perturbation_names) + 1} perturbation ids, F], "
                             f"got shape {feats.shape}")
        if len(set(self.gene_names)) != len(self.gene_names):
            raise ValueError("gene_names has duplicates")
        self.gene_presence = np.zeros((len(self.sources), self.num_genes), dtype=bool)
        offset = 0
        for src in self.sources:
            # atlas column -> vocabulary position (-1: outside the vocabulary)
            cols = gene_columns(src.atlas.gene_names, self.gene_names, what=f"atlas {src.path}")
            gmap = np.full(len(src.atlas.gene_names), -1, dtype=np.int64)
            gmap[cols[cols >= 0]] = np.flatnonzero(cols >= 0)
            self.gene_presence[src.index, gmap[gmap >= 0]] = True
            identity = len(gmap) == self.num_genes and np.array_equal(gmap, np.arange(self.num_genes))
            src.gene_map = None if identity else gmap
            src.group_offset = offset
            offset += len(src.groups)
            g = src.groups
            known_as = "the loader's vocabulary"
            src.ids = {key: encode_names(g[key], names, key, known_as) for key, names in
                       (("context", self.context_names), ("batch", self.batch_names))
                       if key not in self.hidden_covariates}
            for key in self.hidden_covariates:
                src.ids[key] = np.full(len(g), NULL_ID, dtype=np.int64)
            src.dose = g["dose"].to_numpy(np.float32)
            if mode == "marginal":  # no perturbation label and no dose in the marginal stage
                src.ids["perturbation"] = np.full(len(g), NULL_ID, dtype=np.int64)
                src.dose = np.zeros(len(g), dtype=np.float32)
            else:
                src.ids["perturbation"] = encode_names(g["perturbation"], self.perturbation_names, "perturbation", known_as)
        self.absent_genes = {
            str(src.path): [g for g, p in zip(self.gene_names, self.gene_presence[src.index]) if not p]
            for src in self.sources
        }

        # eligible groups, control pools, and the natural (unweighted) sets of an epoch
        m = self.set_size
        self._base = []  # per atlas: rows (group, k) of its natural sets
        for src in self.sources:
            g = src.groups
            if split == "all":
                in_split = np.ones(len(g), dtype=bool)
            elif self.held_out is None:  # no split given: everything is train
                in_split = np.full(len(g), split == "train")
            else:
                in_split = np.array(
                    [
                        split in self.held_out.assign(d, c, p, bool(ic))
                        for d, c, p, ic in zip(g["dataset"], g["context"], g["perturbation"], g["is_control"])
                    ],
                    dtype=bool,
                )
            eligible = in_split & (src.size > 0)
            if mode == "conditional":
                eligible &= ~src.is_control
            gids = np.flatnonzero(eligible)
            if mode == "conditional":
                src.controls = self._control_pools(src, gids)
            sets = -(-src.size[gids] // m)
            k = np.arange(sets.sum()) - np.repeat(np.cumsum(sets) - sets, sets)  # 0..sets-1 per group
            self._base.append(np.stack([np.repeat(gids, sets), k], axis=1).astype(np.int64))
        natural = np.array([len(b) for b in self._base], dtype=np.int64)
        self._warn_resampling()
        if natural.sum() == 0:
            raise ValueError(f"no sets to stream: split {split!r} of mode {mode!r} selects no groups")
        self.num_sets = int(sets_per_epoch) if sets_per_epoch is not None else int(natural.sum())
        if weights is None and sets_per_epoch is None:
            self._counts = natural  # every set once
        else:
            w = natural.astype(float) if weights is None else np.asarray(weights, dtype=float)
            if len(w) != len(self.sources):
                raise ValueError(f"got {len(w)} weights for {len(self.sources)} atlases")
            if np.any(w < 0) or w.sum() <= 0:
                raise ValueError("weights must be non-negative with a positive sum")
            for s, (wi, nat) in enumerate(zip(w, natural)):
                if wi > 0 and nat == 0:
                    raise ValueError(f"atlas {self.sources[s].path} has weight {wi} but no sets in split {split!r}")
            # sets per atlas in proportion to the weights, rounded by largest remainder to sum exactly
            exact = self.num_sets * w / w.sum()
            counts = np.floor(exact).astype(np.int64)
            counts[np.argsort(-(exact - counts), kind="stable")[: self.num_sets - counts.sum()]] += 1
            self._counts = counts
        self.weights = None if weights is None else [float(x) for x in weights]

        self._epoch = 0
        self._resume_from = 0
        self._position = 0
        self._plan_cache: tuple[int, np.ndarray] | None = None
        if len(self) == 0:
            warnings.warn(
                f"{self.num_sets} sets cannot fill one batch of {self.batch_size} on each of {self.world_size} ranks "
                "with drop_last=True: the loader yields nothing",
                stacklevel=2,
            )

    # -- setup helpers -----------------------------------------------------------------------------

    def _warn_resampling(self) -> None:
        """Warn when many of an epoch's set cells are drawn again because groups are smaller than m."""
        m = self.set_size
        sizes = np.concatenate([src.size[base[:, 0]] for src, base in zip(self.sources, self._base)] or [np.zeros(0)])
        short = sizes < m
        if not len(sizes):
            return
        share = float(np.sum(m - sizes[short])) / (m * len(sizes))
        if share >= 0.25:  # a quarter of the cells drawn again: the sets say little about their groups
            warnings.warn(f"{share:.0%} of the cells in the {self.split!r} sets are resampled: {int(short.sum())} of "
                          f"{len(sizes)} sets come from groups smaller than set_size={m} (smallest "
                          f"{int(sizes.min())} cells); lower data.set_size", stacklevel=3)

    def _control_pools(self, src: _Source, gids: np.ndarray) -> dict:
        g = src.groups
        ctrl = np.flatnonzero(src.is_control & (src.size > 0))
        by_batch, by_context = {}, {}
        for c in ctrl:
            key = (g["dataset"].iat[c], g["context"].iat[c])
            by_batch.setdefault(key + (g["batch"].iat[c],), []).append(c)
            by_context.setdefault(key, []).append(c)
        pools, missing = {}, []
        for i in gids:
            key = (g["dataset"].iat[i], g["context"].iat[i])
            candidates = by_batch.get(key + (g["batch"].iat[i],)) or by_context.get(key)
            if not candidates:
                missing.append(f"{key[0]}/{key[1]}")
                continue
            candidates = np.asarray(candidates, dtype=np.int64)
            sizes = src.size[candidates].astype(float)
            pools[int(i)] = (candidates, sizes / sizes.sum())
        if missing:
            raise ValueError(
                f"atlas {src.path}: no control cells for {len(set(missing))} (dataset/context): {sorted(set(missing))[:10]}; "
                "conditional mode needs controls (use mode='marginal' for unperturbed atlases)"
            )
        return pools

    # -- epoch plan --------------------------------------------------------------------------------

    def _epoch_items(self, epoch: int) -> np.ndarray:
        """All sets of an epoch, shuffled: rows (source, group, k, pass, set_id)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, epoch, 0x5E7])
        parts = []
        for s, (base, want) in enumerate(zip(self._base, self._counts)):
            nat = len(base)
            if want == 0:
                continue
            if want == nat:
                sel, passes = np.arange(nat), np.zeros(nat, np.int64)
            elif want < nat:
                sel, passes = rng.permutation(nat)[:want], np.zeros(want, np.int64)
            else:  # up-weighted: whole passes, each with fresh offsets, plus a random part of one more
                q, r = divmod(int(want), nat)
                sel = np.concatenate([np.tile(np.arange(nat), q), rng.permutation(nat)[:r]])
                passes = np.concatenate([np.repeat(np.arange(q), nat), np.full(r, q)])
            parts.append(np.column_stack([np.full(len(sel), s), base[sel], passes]))
        items = np.concatenate(parts)[rng.permutation(self.num_sets)]
        items = np.column_stack([items, np.arange(len(items))]).astype(np.int64)
        self._plan_cache = (epoch, items)
        return items

    def _per_rank(self) -> int:
        n, w, b = self.num_sets, self.world_size, self.batch_size
        return (n // (w * b)) * b if self.drop_last else -(-n // w)

    def _rank_items(self, epoch: int) -> np.ndarray:
        items = self._epoch_items(epoch)
        total = self._per_rank() * self.world_size
        if total > len(items):  # pad by repeating the epoch's first sets
            items = np.concatenate([items, np.resize(items, (total - len(items), items.shape[1]))])
        return items[:total][self.rank :: self.world_size]

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        per_rank = self._per_rank()
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    # -- epochs and resumption ---------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to stream (call before each epoch, as with DistributedSampler)."""
        if epoch != self._epoch:
            self._epoch = int(epoch)
            self._resume_from = 0
            self._position = 0

    def state_dict(self) -> dict:
        """Where this rank is: the epoch and how many of its batches were consumed."""
        return {
            "epoch": self._epoch,
            "batches_done": self._position,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "set_size": self.set_size,
            "num_sets": self.num_sets,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration continues the saved epoch after its last consumed batch."""
        for key in ("seed", "world_size", "batch_size", "set_size", "num_sets"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state.get(key)} but this loader has {getattr(self, key)}; "
                    "resuming would not reproduce the same batches"
                )
        self._epoch = int(state["epoch"])
        self._resume_from = self._position = int(state["batches_done"])

    # -- reading -----------------------------------------------------------------------------------

    def _set_plan(self, src: _Source, group: int, pos: int, rng) -> tuple[list, np.ndarray | None]:
        """Where a set's m cells are: contiguous atlas row ranges (from ``pos``, wrapping at the
        group's end) and, for a group shorter than m, the row order that pads it by resampling."""
        m, n, start = self.set_size, int(src.size[group]), int(src.start[group])
        if n >= m:
            pos %= n
            if pos + m <= n:
                return [(start + pos, start + pos + m)], None
            return [(start + pos, start + n), (start, start + pos + m - n)], None
        take = np.concatenate([np.arange(n), rng.integers(0, n, m - n)])
        rng.shuffle(take)
        return [(start, start + n)], take

    def _batch_plan(self, items: np.ndarray, epoch: int) -> list[dict]:
        """Per set of a batch: its source, group, and the x0 (and control) set plans."""
        m, conditional = self.set_size, self.mode == "conditional"
        plans = []
        for s, g, k, p, _ in items:
            src = self.sources[s]
            rng = np.random.default_rng([self.seed, epoch, s, g, k, p, 1])
            # one offset per (group, pass): the group's k-th set is the k-th window from it
            offset = np.random.default_rng([self.seed, epoch, s, g, p, 2]).integers(src.size[g])
            plan = {"source": src, "group": int(g), "x0": self._set_plan(src, g, int(offset) + int(k) * m, rng)}
            if conditional:
                candidates, probs = src.controls[int(g)]
                control_group = int(candidates[0] if len(candidates) == 1 else rng.choice(candidates, p=probs))
                pos = int(rng.integers(int(src.size[control_group])))
                plan["control"] = self._set_plan(src, control_group, pos, rng)
            plans.append(plan)
        return plans

    @staticmethod
    def _read_set(src: _Source, plan) -> tuple:
        ranges, take = plan
        parts = [src.atlas.read_rows(a, b) for a, b in ranges]
        csr = parts[0] if len(parts) == 1 else concat_csr(parts)
        return csr if take is None else take_rows(*csr, take)

    def split_perturbations(self) -> list[str]:
        """The perturbation names of this split's groups (conditional mode: the perturbed ones)."""
        names = {str(src.groups["perturbation"].iat[int(g)]) for src, base in zip(self.sources, self._base)
                 for g in np.unique(base[:, 0])}
        return sorted(names)

    def summary(self, max_cells: int = 4096, budget: int = 500_000, replicates: bool = False) -> dict:
        """What prediction needs to know of this split's cells, from one read of this split's groups
        and every control group: each group's first rows (the builder shuffles cells within groups:
        a random subset), up to ``max_cells``, and fewer in proportion to its size when the groups
        hold more than ``budget`` cells together. Groups held out of this split are never read.

        Returns:
            ``gene_max``: float32 [G], each vocabulary gene's largest normalised value (the model's
            space; 0 for a gene never seen expressed; what `PerturbDiffConfig.gene_max` records);
            ``cells``: the number of cells read; ``sums`` / ``counts``: per (perturbation, context)
            the sum of the cells' normalised expression [G] and their number
            (`perturbdiff.baselines.train_stats`' format; what `perturbdiff.baselines.Anchor` takes);
            with ``replicates``, also ``replicates``: per group, keyed (dataset, perturbation, context,
            dose, batch, is_control), the sum [G], the sum of squares [G] and the number of cells
            (what `perturbdiff.baselines.population_offsets` takes; 16 bytes per gene and group).
        """
        chosen = [(src, sorted(set(np.unique(base[:, 0]).tolist()) | set(np.flatnonzero(src.is_control & (src.size > 0)).tolist())))
                  for src, base in zip(self.sources, self._base)]
        total = sum(int(src.size[g].sum()) for src, g in chosen if g)
        share = min(1.0, budget / max(total, 1))
        maxima, read, sums, counts, reps = np.zeros(self.num_genes, dtype=np.float32), 0, {}, {}, {}
        for src, gids in chosen:
            for gid in gids:
                n = int(min(src.size[gid], max_cells, max(1, np.ceil(src.size[gid] * share))))
                start = int(src.start[gid])
                _, cols, values = self._normalise([(src.atlas.read_rows(start, start + n), src)])
                np.maximum.at(maxima, cols, values)
                key = (str(src.groups["perturbation"].iat[gid]), str(src.groups["context"].iat[gid]))
                np.add.at(sums.setdefault(key, np.zeros(self.num_genes, dtype=np.float64)), cols, values.astype(np.float64))
                counts[key] = counts.get(key, 0) + n
                read += n
                if replicates:  # a replicate: one group (controls pair by dataset, context and batch)
                    g = src.groups
                    rk = (str(g["dataset"].iat[gid]), *key, float(g["dose"].iat[gid]), str(g["batch"].iat[gid]),
                          bool(src.is_control[gid]))
                    acc = reps.setdefault(rk, [np.zeros(self.num_genes), np.zeros(self.num_genes), 0])
                    v = values.astype(np.float64)
                    np.add.at(acc[0], cols, v)
                    np.add.at(acc[1], cols, v * v)
                    acc[2] += n
        out = {"gene_max": maxima, "cells": read, "sums": sums, "counts": counts}
        if replicates:
            out["replicates"] = {k: tuple(v) for k, v in reps.items()}
        return out

    def gene_maxima(self, max_cells: int = 4096, budget: int = 500_000) -> tuple[np.ndarray, int]:
        """`summary`'s ``gene_max`` and ``cells``."""
        out = self.summary(max_cells, budget)
        return out["gene_max"], out["cells"]

    def batch_rows(self, index: int, epoch: int | None = None) -> list[dict]:
        """The atlas rows of the cells of this rank's batch ``index`` (for inspection and benchmarks).

        Returns one dict per set: ``atlas`` (path), ``group``, ``x0`` and (conditional mode)
        ``control``: int64 arrays of m atlas row numbers, in the order the batch holds the cells.
        """
        epoch = self._epoch if epoch is None else epoch
        B = self.batch_size
        items = self._rank_items(epoch)[index * B : (index + 1) * B]
        out = []
        for plan in self._batch_plan(items, epoch):
            row = {"atlas": plan["source"].path, "group": plan["group"]}
            for key in ("x0", "control"):
                if key in plan:
                    ranges, take = plan[key]
                    rows = np.concatenate([np.arange(a, b) for a, b in ranges])
                    row[key] = rows if take is None else rows[take]
            out.append(row)
        return out

    def _make_batch(self, items: np.ndarray, epoch: int) -> dict:
        m, G = self.set_size, self.num_genes
        plans = self._batch_plan(items, epoch)
        sets = [(self._read_set(p["source"], p["x0"]), p["source"]) for p in plans]
        conditional = self.mode == "conditional"
        if conditional:
            sets += [(self._read_set(p["source"], p["control"]), p["source"]) for p in plans]
        B = len(items)
        indptr, cols, values = self._normalise(sets)
        dense = None
        if not self.sparse or self.pair_controls:
            # scipy's CSR-to-dense writes row by row: faster than a flat scatter
            dense = sp.csr_matrix((values, cols, indptr), shape=(len(indptr) - 1, G)).toarray().reshape(-1, m, G)
        order = None
        if self.pair_controls:  # control cell i of each set becomes perturbed cell i's OT partner
            order = pair_order(torch.from_numpy(dense[:B]), torch.from_numpy(dense[B:]))  # [B, m]
        if self.sparse:
            split = int(indptr[B * m])
            batch = {"x0": SparseSets.from_numpy(indptr[: B * m + 1], cols[:split], values[:split], (B, m, G))}
            if conditional:
                ctrl = (indptr[B * m :] - split, cols[split:], values[split:])
                if order is not None:
                    ctrl = take_rows(*ctrl, (order + np.arange(B)[:, None] * m).ravel())
                batch["control"] = SparseSets.from_numpy(*ctrl, (B, m, G))
        else:
            batch = {"x0": torch.from_numpy(dense[:B])}
            if conditional:
                control = dense[B:]
                if order is not None:
                    control = np.take_along_axis(control, order[:, :, None], axis=1)
                batch["control"] = torch.from_numpy(np.ascontiguousarray(control))
        meta = [(p["source"], p["group"]) for p in plans]
        for key in ("perturbation", "context", "batch"):
            batch[key] = torch.tensor([src.ids[key][g] for src, g in meta], dtype=torch.int64)
        batch["dose"] = torch.tensor([src.dose[g] for src, g in meta], dtype=torch.float32)
        if self.perturbation_features is not None:
            batch["perturbation_features"] = torch.from_numpy(self.perturbation_features[batch["perturbation"].numpy()])
        batch["group"] = torch.tensor([src.group_offset + g for src, g in meta], dtype=torch.int64)
        if self.return_set_ids:
            batch["set_id"] = torch.from_numpy(items[:, 4].copy())
        return batch

    def _normalise(self, sets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The sets' rows as one normalised CSR in the gene vocabulary: indptr int64, cols int32, values float32."""
        mapped = []
        for (ip, ix, d), src in sets:
            cols = ix if src.gene_map is None else src.gene_map[ix]
            mapped.append((ip, cols, d))
        indptr, cols, data = concat_csr(mapped)
        # per-cell totals over every gene the atlas measures, before mapping to the vocabulary
        values = normalize_csr(indptr, data, self.normalization)
        if any(src.gene_map is not None for _, src in sets):
            keep = cols >= 0  # genes outside the vocabulary
            kept = np.concatenate([[0], np.cumsum(keep)])
            indptr, cols, values = kept[indptr], cols[keep], values[keep]
        return indptr, cols.astype(np.int32, copy=False), values

    # -- iteration ---------------------------------------------------------------------------------

    def __iter__(self):
        epoch, start = self._epoch, self._resume_from
        items = self._rank_items(epoch)
        n_batches = len(self)
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        B = self.batch_size
        for b in range(start + wid, n_batches, nw):
            batch = self._make_batch(items[b * B : (b + 1) * B], epoch)
            if info is None:
                self._position = b + 1
            yield batch
        if info is None:
            self._resume_from = 0

    def loader(self, *, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int | None = None, **kwargs):
        """A `CellSetLoader` over this dataset with ``num_workers`` DataLoader workers."""
        return CellSetLoader(self, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_plan_cache"] = None
        return state


class CellSetLoader:
    """A torch DataLoader over a `CellSetDataset` that keeps an exact resumable position.

    DataLoader workers hold copies of the dataset, so only the main process knows how many batches
    were consumed; this wrapper counts them, so ``state_dict()`` is exact with any ``num_workers``.

    Args:
        dataset: the `CellSetDataset`.
        num_workers, pin_memory, prefetch_factor, **kwargs: passed to ``torch.utils.data.DataLoader``.
    """

    def __init__(self, dataset: CellSetDataset, *, num_workers: int = 0, pin_memory: bool = False, prefetch_factor=None, **kwargs):
        self.dataset = dataset
        self.kwargs = dict(num_workers=num_workers, pin_memory=pin_memory, **kwargs)
        if num_workers > 0 and prefetch_factor is not None:
            self.kwargs["prefetch_factor"] = prefetch_factor
        if num_workers > 0 and any(src.atlas.remote for src in dataset.sources):
            # obstore's client does not survive fork once the parent has used it (a forked worker's
            # requests never return): workers on an object-store atlas are spawned, and re-open it
            self.kwargs.setdefault("multiprocessing_context", "spawn")

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        ds = self.dataset
        start = ds._position = ds._resume_from
        for count, batch in enumerate(DataLoader(ds, batch_size=None, **self.kwargs), 1):
            ds._position = start + count
            yield batch
        ds._resume_from = 0

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
