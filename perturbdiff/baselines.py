"""The simple baselines every prediction is scored beside (all in log1p space).

With c the held-out context, p the perturbation, ctrl_c the control cells of c and means taken
over training cells: ``control_mean`` is ctrl_c itself; ``perturbation_mean`` shifts ctrl_c to the
pooled mean of p's cells in other contexts; ``additive_shift`` adds the average over other
contexts c' of (mean of p in c' − mean of controls in c'); ``context_mean`` shifts ctrl_c to the
mean of all perturbed cells of c. For perturbations the training data never saw:
``additive_combination`` (a combination ``A+B``) adds the effects of its parts, each in c where it
was trained there, else its additive-shift effect; ``nearest_neighbour`` (with perturbation
features) adds the effect of the training perturbation whose features are closest (cosine), in c
where it was trained there, else over its contexts. ``anchor`` (`Anchor`) is the one rule that
reduces to whichever of these fits the condition's kind: the additive shift for a context seen only
with controls, the context mean plus the perturbation's deviation shrunk by how well its
deviations agree across contexts, the additive combination for ``A+B``; prediction moves each
predicted cell's change from its control cell toward it (`perturbdiff.pipeline.anchor_cells`). Shifted cells are clipped at 0.
A baseline that cannot be formed for a condition falls back to ctrl_c (and says so).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["BASELINES", "TRAIN_BASELINES", "FEATURE_BASELINES", "train_stats", "additive_effect", "Anchor", "baseline_cells",
           "STATS_FILE", "save_stats", "load_stats", "population_offsets"]

BASELINES = ("control_mean", "perturbation_mean", "additive_shift", "context_mean", "anchor", "additive_combination",
             "nearest_neighbour")
TRAIN_BASELINES = BASELINES[1:]  # need the training cells
FEATURE_BASELINES = ("nearest_neighbour",)  # need perturbation features


# The training means a model folder carries for its anchor (`Anchor`), in the model's space.
STATS_FILE = "response_stats.safetensors"


def save_stats(folder, stats: dict) -> None:
    """Write `train_stats`' sums and counts to ``folder/STATS_FILE`` (safetensors; the pairs in its
    metadata), with `population_offsets`' result when ``stats["populations"]`` holds one."""
    import json
    from pathlib import Path

    from safetensors.numpy import save_file

    keys = sorted(stats["sums"])
    G = len(next(iter(stats["sums"].values()))) if keys else 0
    tensors = {"means": np.stack([stats["sums"][k] / max(stats["counts"][k], 1) for k in keys]).astype(np.float32)
               if keys else np.zeros((0, G), np.float32),
               "counts": np.asarray([stats["counts"][k] for k in keys], dtype=np.int64)}
    metadata = {"pairs": json.dumps([list(k) for k in keys])}
    pops = stats.get("populations")
    if pops is not None:
        tensors["population_offsets"] = np.ascontiguousarray(pops["offsets"], dtype=np.float32)
        tensors["population_between"] = np.ascontiguousarray(pops["between"], dtype=np.float32)
        metadata["population_perturbations"] = json.dumps(list(pops["perturbations"]))
        metadata["population_hidden"] = json.dumps(list(pops["hidden"]))
    save_file(tensors, str(Path(folder) / STATS_FILE), metadata=metadata)


def load_stats(folder) -> dict | None:
    """`save_stats`' file as `train_stats`' format (plus ``populations`` when saved), or None when
    the folder has none."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    path = Path(folder) / STATS_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        pairs = [tuple(k) for k in json.loads(meta["pairs"])]
        means, counts = f.get_tensor("means").astype(np.float64), f.get_tensor("counts")
        pops = None
        if "population_offsets" in f.keys():
            pops = {"offsets": f.get_tensor("population_offsets"), "between": f.get_tensor("population_between"),
                    "perturbations": json.loads(meta["population_perturbations"]),
                    "hidden": json.loads(meta.get("population_hidden", "[]"))}
    if len(pairs) != len(means) or len(pairs) != len(counts) or not np.isfinite(means).all():
        raise ValueError(f"{path}: damaged ({len(pairs)} pairs, {len(means)} mean rows, {len(counts)} counts)")
    out = {"sums": {k: means[i] * counts[i] for i, k in enumerate(pairs)},
           "counts": {k: int(counts[i]) for i, k in enumerate(pairs)}}
    if pops is not None:
        if (len(pops["offsets"]) != len(pops["perturbations"]) or not np.isfinite(pops["offsets"]).all()
                or pops["offsets"].shape[1:] != means.shape[1:]):
            raise ValueError(f"{path}: damaged population offsets ({pops['offsets'].shape} for "
                             f"{len(pops['perturbations'])} perturbations)")
        out["populations"] = pops
    return out


# A group of fewer cells is not used as a replicate: its sampling noise would be guessed, not known.
MIN_REPLICATE_CELLS = 20


def population_offsets(replicates: dict, hidden, max_offsets: int = 512, seed: int = 0) -> dict | None:
    """What the hidden factors do to a response, measured on the training replicates: draws for
    the K populations of a prediction (`perturbdiff.pipeline.PerturbDiffPipeline.predict`).

    A replicate is one perturbed group; its response r is its mean minus the mean of the controls of
    its (dataset, context, batch); replicates that differ only in the ``hidden`` covariates are one
    condition. Each replicate's deviation d from its condition's mean response is an observed draw
    of the hidden effect plus sampling noise (known from the groups' variances and sizes). Per gene,
    the between-replicate variance tau^2 = max(0, sum(d^2 - noise)) / sum(1 - 1/R) (R: the
    condition's replicates), kept only where sum(d^2) / sum(noise) passes what sampling noise alone
    reaches (1 + 3 sqrt(2 / df), df = sum(R - 1); about 0.2 % of genes by chance), else 0, so that noise alone gives (nearly) no
    spread; the offsets are the deviations rescaled per gene so that their mean square is tau^2.

    Args:
        replicates: per group, keyed (dataset, perturbation, context, dose, batch, is_control):
            (sum [G], sum of squares [G], cells) (`perturbdiff.data.CellSetDataset.summary` with
            ``replicates=True``).
        hidden: the hidden covariates ("context", "batch").
        max_offsets: at most this many offsets are kept (a random subset).

    Groups of fewer than `MIN_REPLICATE_CELLS` cells are left out.

    Returns:
        None without any condition of two or more replicates; else ``offsets`` [N, G] float32,
        ``perturbations`` (each offset's perturbation), ``between`` (tau^2 [G]), ``hidden``.
    """
    stats, controls = {}, {}
    for (ds, q, c, dose, b, is_control), (total, sq, n) in replicates.items():
        if n < MIN_REPLICATE_CELLS:  # too few cells to know a group's sampling noise
            continue
        mean = np.asarray(total, np.float64) / n
        entry = (mean, np.maximum(np.asarray(sq, np.float64) / n - mean**2, 0) * n / (n - 1) / n)  # mean, its variance
        if is_control:
            controls[(ds, c, b)] = entry
        else:
            stats[(ds, q, c, dose, b)] = entry
    conditions: dict = {}
    for (ds, q, c, dose, b), (mean, var) in stats.items():
        ctrl = controls.get((ds, c, b))
        if ctrl is None:
            continue
        visible = (ds, q, "*" if "context" in hidden else c, dose, "*" if "batch" in hidden else b)
        conditions.setdefault(visible, []).append((mean - ctrl[0], var + ctrl[1]))
    devs, noise, weight, names = [], [], [], []
    for (_, q, _, _, _), reps in sorted(conditions.items(), key=lambda kv: tuple(map(str, kv[0]))):
        R = len(reps)
        if R < 2:
            continue
        r = np.stack([x for x, _ in reps])
        v = np.stack([x for _, x in reps])
        devs.append(r - r.mean(0))
        noise.append(v * (1 - 2 / R) + v.sum(0) / R**2)  # the sampling variance of each deviation
        weight += [1 - 1 / R] * R
        names += [q] * R
    if not devs:
        return None
    d, nv = np.concatenate(devs), np.concatenate(noise)
    df = sum(weight)  # sum over conditions of R - 1
    signal = (d**2).sum(0) > (1 + 3 * np.sqrt(2 / df)) * nv.sum(0)
    between = np.where(signal, np.maximum((d**2 - nv).sum(0), 0) / df, 0.0)
    observed = (d**2).mean(0)
    scale = np.sqrt(np.divide(between, observed, out=np.zeros_like(between), where=observed > 0))
    offsets = d * scale
    if len(offsets) > max_offsets:
        keep = np.sort(np.random.default_rng(seed).choice(len(offsets), max_offsets, replace=False))
        offsets, names = offsets[keep], [names[i] for i in keep]
    return {"offsets": offsets.astype(np.float32), "perturbations": [str(x) for x in names],
            "between": between.astype(np.float32), "hidden": list(hidden)}


def train_stats(X, pert: np.ndarray, ctx: np.ndarray) -> dict:
    """Per (perturbation, context) sums and counts of train cells, by one sparse product."""
    keys = pd.MultiIndex.from_arrays([pert, ctx])
    codes, uniques = pd.factorize(keys)
    onehot = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(uniques), len(codes)))
    Xs = X if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    sums = onehot @ Xs
    sums = np.asarray(sums.toarray() if sp.issparse(sums) else sums, dtype=np.float64)
    counts = np.bincount(codes, minlength=len(uniques))
    return {"sums": {tuple(k): sums[i] for i, k in enumerate(uniques)},
            "counts": {tuple(k): int(counts[i]) for i, k in enumerate(uniques)}}


def additive_effect(train: dict, perturbation, control_label, exclude_context=None) -> np.ndarray | None:
    """The additive shift's effect of ``perturbation``: over the contexts c (except ``exclude_context``)
    where it and the controls both have training cells, the mean of (mean of its cells in c − mean of
    the controls of c); ``None`` where there is no such context.

    ``train`` is `train_stats`' format: sums [G] and counts keyed by (perturbation, context).
    """
    sums, counts = train["sums"], train["counts"]
    effects = [sums[k] / counts[k] - sums[(control_label, k[1])] / counts[(control_label, k[1])]
               for k in sums if k[0] == perturbation and k[1] != exclude_context and (control_label, k[1]) in sums]
    return np.mean(effects, axis=0) if effects else None


class Anchor:
    """The mean response of a (perturbation, context) that the training means support, by one rule.

    With e(q, c) = mean of q's cells in c − mean of the controls of c over the trained pairs, the
    context effect a(c) = the mean of e(·, c) over the perturbations trained in c (ā, their mean
    over contexts, for a context trained only with controls), and the deviation
    d(q, c) = e(q, c) − a(c):

    - a perturbation trained in c: e(q, c) (what it measured there);
    - else a(c) + λ · mean over its contexts of d(q, ·) (0 for a perturbation never trained), where
      λ = nρ / (1 + (n−1)ρ) for its n contexts and ρ is the share of the deviations' size that
      repeats across contexts (the mean inner product of a perturbation's deviations in two
      contexts over their mean squared norm, over every perturbation trained in two or more
      contexts, clipped to [0, 1]; 1 when no perturbation has two contexts);
    - a combination ``A+B`` that was never trained as such: the sum of its parts' anchors.

    So it is the additive shift where a context is seen only with controls (one perturbation:
    glioblastoma patients, Kang cell types), close to the context mean where a perturbation's
    effect does not repeat across contexts (weak knockdowns in glioma lines), and the additive
    combination for doubles. Works on `train_stats`' sums and counts, in any linear space.
    """

    def __init__(self, train: dict, control_label: str):
        from .features import parts

        self._parts = parts
        sums, counts = train["sums"], train["counts"]
        means = {k: np.asarray(sums[k], np.float64) / counts[k] for k in sums if counts[k] > 0}
        self.effects = {k: v - means[(control_label, k[1])] for k, v in means.items()
                        if k[0] != control_label and (control_label, k[1]) in means}
        by_context: dict = {}
        for (q, c), e in self.effects.items():
            by_context.setdefault(c, []).append(e)
        self.context_effect = {c: np.mean(es, axis=0) for c, es in by_context.items()}
        self.mean_context_effect = np.mean(list(self.context_effect.values()), axis=0) if by_context else None
        self.deviations: dict = {}
        for (q, c), e in self.effects.items():
            self.deviations.setdefault(q, {})[c] = e - self.context_effect[c]
        cross = norms = 0.0
        for devs in self.deviations.values():
            if len(devs) < 2:
                continue
            D, n = np.stack(list(devs.values())), len(devs)
            sq = float((D * D).sum())
            total = D.sum(0)
            cross += (float(total @ total) - sq) / 2  # the sum over pairs of contexts of <d_i, d_j>
            norms += (n - 1) * sq / 2  # the sum over pairs of (|d_i|² + |d_j|²) / 2
        self.rho = None if norms <= 0 else float(np.clip(cross / norms, 0.0, 1.0))

    def effect(self, perturbation, context) -> np.ndarray | None:
        """The anchor's mean response [G] of ``perturbation`` in ``context``; None without any trained effect."""
        if self.mean_context_effect is None:
            return None
        trained = perturbation in self.deviations
        return sum(self._single(q, context) for q in ([perturbation] if trained else self._parts(perturbation)))

    def shrinkage(self, n: int) -> float:
        """λ for a perturbation's mean deviation over ``n`` contexts (Spearman–Brown of ρ)."""
        rho = 1.0 if self.rho is None else self.rho
        return n * rho / (1 + (n - 1) * rho) if rho > 0 else 0.0

    def _single(self, q, c) -> np.ndarray:
        if (q, c) in self.effects:
            return self.effects[(q, c)]
        base = self.context_effect.get(c, self.mean_context_effect)
        devs = [d for cc, d in self.deviations.get(q, {}).items() if cc != c]
        return base + self.shrinkage(len(devs)) * np.mean(devs, axis=0) if devs else base


def _effect_in(train: dict, perturbation, context, control_label) -> np.ndarray | None:
    """A training perturbation's effect in ``context`` where it was trained there, else over its contexts."""
    sums, counts = train["sums"], train["counts"]
    key, ctrl = (perturbation, context), (control_label, context)
    if key in sums and ctrl in sums:
        return sums[key] / counts[key] - sums[ctrl] / counts[ctrl]
    return additive_effect(train, perturbation, control_label)


def _nearest(perturbation, features: dict, trained: set) -> str | None:
    """The trained perturbation (other than itself) whose features are closest by cosine similarity."""
    if perturbation not in features:
        return None
    names = sorted(n for n in trained if n in features and n != perturbation)
    if not names:
        return None
    M = np.stack([features[n] for n in names]).astype(np.float64)
    v = np.asarray(features[perturbation], dtype=np.float64)
    sim = M @ v / (np.linalg.norm(M, axis=1) * np.linalg.norm(v) + 1e-12)
    return names[int(np.argmax(sim))]


def baseline_cells(name: str, conditions, controls: dict, train: dict | None, control_label: str,
                   features: dict | None = None) -> tuple[dict, dict]:
    """A baseline's predicted cells per condition, and whether it fell back to the controls.

    Args:
        name: one of `BASELINES`.
        conditions: (perturbation, context) pairs to predict.
        controls: context -> its control cells [n, G] (log1p).
        train: `train_stats` of the training cells (needed by every baseline but ``control_mean``).
        control_label: the perturbation name of control cells.
        features: perturbation name -> feature vector (``nearest_neighbour``).
    """
    from .features import parts

    if name in FEATURE_BASELINES and not features:
        raise ValueError(f"baseline {name} needs perturbation features")
    trained = {k[0] for k in train["sums"] if k[0] != control_label} if train else set()
    cells, fallback = {}, {}
    tr = train
    anchor = Anchor(train, control_label) if name == "anchor" else None
    for p, c in conditions:
        ctrl = controls[c]
        ctrl_mean = ctrl.mean(0, dtype=np.float64)
        shift = None
        if name == "perturbation_mean":
            keys = [k for k in tr["sums"] if k[0] == p and k[1] != c]
            if keys:
                mu = sum(tr["sums"][k] for k in keys) / sum(tr["counts"][k] for k in keys)
                shift = mu - ctrl_mean
        elif name == "additive_shift":
            shift = additive_effect(tr, p, control_label, exclude_context=c)
        elif name == "context_mean":
            keys = [k for k in tr["sums"] if k[1] == c and k[0] != control_label]
            if keys:
                nu = sum(tr["sums"][k] for k in keys) / sum(tr["counts"][k] for k in keys)
                shift = nu - ctrl_mean
        elif name == "anchor":
            shift = anchor.effect(p, c)
        elif name == "additive_combination":
            singles = parts(p)
            effects = [_effect_in(tr, q, c, control_label) for q in singles if q in trained]
            if len(singles) > 1 and len(effects) == len(singles) and all(e is not None for e in effects):
                shift = np.sum(effects, axis=0)
        elif name == "nearest_neighbour":
            neighbour = _nearest(p, features, trained)
            if neighbour is not None:
                shift = _effect_in(tr, neighbour, c, control_label)
        elif name != "control_mean":
            raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")
        fallback[(p, c)] = name != "control_mean" and shift is None
        cells[(p, c)] = ctrl if shift is None else np.clip(ctrl + shift.astype(np.float32), 0, None)
    return cells, fallback
