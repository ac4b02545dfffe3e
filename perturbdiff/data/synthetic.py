"""Synthetic perturbation atlases: the quick start's default data and the tests' fixture.

Counts are negative binomial (gamma-Poisson) around a per-cell mean

    log mu = base gene abundance + context programme + batch effect
             + z * strength * gain(perturbation, context) * (effect(perturbation) + noise)

normalised to a log-normal library size. ``strength``, ``noise`` and the responder fraction behind
``z`` are drawn afresh for every (context, perturbation, batch) group and are not recorded in obs:
this is the *hidden per-replicate variation of the response* that PerturbDiff models (the same
observed condition yields a distribution over populations). Some (perturbation, context) pairs do
not respond at all, as cell-type-specific responses do in real screens.

`make_synthetic_adata` builds an AnnData in memory; `write_synthetic_h5ad` streams a large ``.h5ad``
of millions of cells by tiling per-group pools of exactly simulated cells with binomial thinning
(a cheap, realistic variation: lower sequencing depth); `make_synthetic_atlas` builds an atlas through
the ordinary builder; `ensure_default_atlas` caches the built-in default atlas.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..files import atomic_write

__all__ = [
    "CONTROL_LABEL",
    "make_synthetic_adata",
    "write_synthetic_h5ad",
    "make_synthetic_atlas",
    "default_atlas_path",
    "ensure_default_atlas",
]

CONTROL_LABEL = "control"
# Bump when the generator or its defaults change, so cached default atlases are rebuilt.
GENERATOR_VERSION = 1
# Column mapping of the synthetic AnnData, as the builder needs it.
BUILD_COLUMNS = dict(
    perturbation_key="perturbation", context_key="cell_type", batch_key="batch", dose_key="dose", control_label=CONTROL_LABEL
)


@dataclass
class _Model:
    base: np.ndarray  # [G] log abundance
    context: np.ndarray  # [C, G]
    batch: np.ndarray  # [B, G]
    effect: np.ndarray  # [P, G] sparse log fold changes
    gain: np.ndarray  # [P, C] response gain (0: no response)
    theta: np.ndarray  # [G] NB inverse dispersion
    dose: np.ndarray  # [P]
    library: float  # mean library size (total counts per cell)


def _model(rng, G, C, P, B, library) -> _Model:
    from scipy.stats import norm

    affected = rng.random((P, G)) < 0.15
    return _Model(
        # log-normal gene abundances from evenly spaced quantiles: a stable, heavy-tailed spectrum
        base=rng.permutation(norm.ppf((np.arange(G) + 0.5) / G) * 2.5),
        context=rng.normal(0.0, 0.6, (C, G)),
        batch=rng.normal(0.0, 0.15, (B, G)),
        effect=rng.normal(0.0, 1.0, (P, G)) * affected,
        gain=rng.lognormal(0.0, 0.5, (P, C)) * (rng.random((P, C)) < 0.85),
        theta=rng.uniform(2.0, 10.0, G),
        dose=rng.choice([0.1, 1.0, 10.0], P),
        library=library,
    )


def _names(prefix, n, width=None):
    width = width or len(str(max(n - 1, 0)))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def _group_sizes(rng, num_cells, C, P, B, min_control=8) -> np.ndarray:
    """Cells per (context, perturbation index 0=control, batch): uneven, controls larger, never empty controls."""
    w = rng.dirichlet(np.full(C * (P + 1) * B, 2.0)).reshape(C, P + 1, B)
    w[:, 0, :] *= 3.0  # control pools are larger, as in screens
    w /= w.sum()
    floor = np.zeros_like(w, dtype=np.int64)
    floor[:, 0, :] = min(min_control, num_cells // (4 * C * B) or 1)
    rest = num_cells - floor.sum()
    if rest < 0:
        raise ValueError(f"num_cells={num_cells} is too small for {C} contexts x {B} batches of controls")
    return floor + rng.multinomial(rest, w.ravel()).reshape(w.shape)


def _simulate(rng, model: _Model, c, p, b, n, strength, noise, responders, depth=1.0) -> sp.csr_matrix:
    """n cells of one group as a CSR count matrix (p = -1: control)."""
    logit = model.base + model.context[c] + model.batch[b]
    if p >= 0:
        shift = strength * model.gain[p, c] * (model.effect[p] + noise)
        z = rng.random(n) < responders
        logit = logit[None, :] + z[:, None] * shift[None, :]
    else:
        logit = np.broadcast_to(logit, (n, len(logit)))
    prop = np.exp(logit - logit.max(axis=1, keepdims=True))
    prop /= prop.sum(axis=1, keepdims=True)
    lib = rng.lognormal(np.log(model.library * depth), 0.35, n)
    mu = prop * lib[:, None]
    counts = rng.poisson(rng.gamma(model.theta, mu / model.theta))
    return sp.csr_matrix(counts.astype(np.float32))


def _replicate(rng, model: _Model, p, response_spread):
    """Hidden per-group draws: response strength, gene-wise deviation, responder fraction.

    ``response_spread`` 0 switches the hidden variation off: every replicate of a (context,
    perturbation) responds alike (strength 1, no deviation, the mean responder fraction 0.8).
    """
    if p < 0:
        return 0.0, 0.0, 0.0
    if response_spread == 0:
        return 1.0, 0.0, 0.8
    strength = rng.lognormal(0.0, response_spread)
    noise = rng.normal(0.0, 0.3 * response_spread, model.effect.shape[1]) * (model.effect[p] != 0)
    responders = rng.beta(8.0, 2.0)
    return strength, noise, responders


def make_synthetic_adata(
    *,
    num_cells: int = 4000,
    num_genes: int = 200,
    num_contexts: int = 3,
    num_perturbations: int = 6,
    num_batches: int = 2,
    response_spread: float = 0.5,
    library_size: float | None = None,
    seed: int = 0,
):
    """A synthetic perturbation screen as an in-memory AnnData with raw counts in X.

    ``library_size`` is the mean total count per cell (default 1.5 x num_genes, which gives a
    realistic 15-30% of non-zero entries).

    obs columns: ``perturbation`` (``"control"`` for controls), ``cell_type``, ``batch``, ``dose``;
    cells are in random order. ``uns["synthetic"]`` records the generator's parameters.
    """
    import anndata as ad

    rng = np.random.default_rng(seed)
    C, P, B, G = num_contexts, num_perturbations, num_batches, num_genes
    model = _model(rng, G, C, P, B, library_size or 1.5 * G)
    sizes = _group_sizes(rng, num_cells, C, P, B)
    perts = [CONTROL_LABEL] + _names("PERT", P)
    ctxs, bats = _names("celltype", C), _names("batch", B)
    mats, obs = [], {"perturbation": [], "cell_type": [], "batch": [], "dose": []}
    for c in range(C):
        for p in range(P + 1):
            for b in range(B):
                n = int(sizes[c, p, b])
                if n == 0:
                    continue
                rep = _replicate(rng, model, p - 1, response_spread)
                mats.append(_simulate(rng, model, c, p - 1, b, n, *rep))
                obs["perturbation"] += [perts[p]] * n
                obs["cell_type"] += [ctxs[c]] * n
                obs["batch"] += [bats[b]] * n
                obs["dose"] += [0.0 if p == 0 else float(model.dose[p - 1])] * n
    X = sp.vstack(mats, format="csr")
    order = rng.permutation(X.shape[0])
    obs_df = pd.DataFrame(obs).iloc[order].reset_index(drop=True)
    for k in ("perturbation", "cell_type", "batch"):
        obs_df[k] = pd.Categorical(obs_df[k])
    obs_df.index = _names("cell", len(obs_df))
    adata = ad.AnnData(X[order], obs=obs_df, var=pd.DataFrame(index=_names("GENE", G, 4)))
    adata.uns["synthetic"] = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "response_spread": response_spread,
        "library_size": float(model.library),
    }
    return adata


def write_synthetic_h5ad(
    path,
    *,
    num_cells: int,
    num_genes: int = 2000,
    num_contexts: int = 8,
    num_perturbations: int = 30,
    num_batches: int = 4,
    response_spread: float = 0.5,
    library_size: float | None = None,
    pool_size: int = 32,
    run_cells: int = 256,
    chunk_cells: int = 65536,
    compression: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Stream a large synthetic ``.h5ad`` (CSR counts) in bounded memory.

    Each group gets a pool of ``pool_size`` exactly simulated cells at 1.5x depth; output cells are
    pool cells binomially thinned to a random 55-95% of their counts, so that cells differ (a few
    seconds per million cells instead of simulating each). Cells
    are written in runs of ``run_cells`` cells of one group, runs in random order (as files
    concatenated from wells or samples are); ``run_cells=1`` interleaves groups cell by cell.
    """
    import anndata  # noqa: F401  (registers the encodings write_elem needs)
    import h5py
    from anndata.io import write_elem
    from tqdm.auto import tqdm

    path = Path(path)
    rng = np.random.default_rng(seed)
    C, P, B, G = num_contexts, num_perturbations, num_batches, num_genes
    model = _model(rng, G, C, P, B, library_size or 1.5 * G)
    sizes = _group_sizes(rng, num_cells, C, P, B)
    keys = [(c, p, b) for c in range(C) for p in range(P + 1) for b in range(B) if sizes[c, p, b] > 0]
    pools = []
    for c, p, b in keys:
        rep = _replicate(rng, model, p - 1, response_spread)
        pools.append(_simulate(rng, model, c, p - 1, b, pool_size, *rep, depth=1.5))
    pool = sp.vstack(pools, format="csr")  # group i's pool is rows [i * pool_size, (i + 1) * pool_size)
    del pools
    # runs of one group each, in random order
    runs = []
    for gi, (c, p, b) in enumerate(keys):
        n = int(sizes[c, p, b])
        runs += [(gi, min(run_cells, n - s)) for s in range(0, n, run_cells)]
    runs = [runs[i] for i in rng.permutation(len(runs))]
    run_group = np.repeat([r[0] for r in runs], [r[1] for r in runs])

    opts = dict(compression=compression) if compression else {}

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            X = f.create_group("X")
            X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": np.array([num_cells, G])})
            ds = {
                "data": X.create_dataset("data", shape=(0,), maxshape=(None,), dtype="float32", chunks=(1 << 18,), **opts),
                "indices": X.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1 << 18,), **opts),
            }
            indptr = X.create_dataset("indptr", shape=(num_cells + 1,), dtype="int64", chunks=(min(1 << 16, num_cells + 1),), **opts)
            indptr[0] = 0
            nnz = 0
            bar = tqdm(total=num_cells, unit="cell", unit_scale=True, disable=not progress, desc=f"write {path.name}")
            for a in range(0, num_cells, chunk_cells):
                gs = run_group[a : a + chunk_cells]
                block = pool[gs * pool_size + rng.integers(0, pool_size, len(gs))]
                keep = np.repeat(rng.uniform(0.55, 0.95, len(gs)), np.diff(block.indptr))
                # binomial thinning; counts of 1 (the majority) are a cheaper Bernoulli draw
                ones = block.data == 1
                thinned = np.empty(block.nnz, dtype=np.float32)
                thinned[ones] = rng.random(int(ones.sum())) < keep[ones]
                thinned[~ones] = rng.binomial(block.data[~ones].astype(np.int64), keep[~ones])
                block.data = thinned
                block.eliminate_zeros()
                for name, values in (("data", block.data), ("indices", block.indices)):
                    ds[name].resize((nnz + block.nnz,))
                    ds[name][nnz:] = values
                indptr[a + 1 : a + len(gs) + 1] = block.indptr[1:] + nnz
                nnz += block.nnz
                bar.update(len(gs))
            bar.close()
            perts = np.array([CONTROL_LABEL] + _names("PERT", P), dtype=object)
            ctxs = np.array(_names("celltype", C), dtype=object)
            bats = np.array(_names("batch", B), dtype=object)
            kc = np.array([k[0] for k in keys])
            kp = np.array([k[1] for k in keys])
            kb = np.array([k[2] for k in keys])
            obs = pd.DataFrame(
                {
                    "perturbation": pd.Categorical.from_codes(kp[run_group], categories=list(perts)),
                    "cell_type": pd.Categorical.from_codes(kc[run_group], categories=list(ctxs)),
                    "batch": pd.Categorical.from_codes(kb[run_group], categories=list(bats)),
                    "dose": np.where(kp[run_group] == 0, 0.0, np.concatenate([[0.0], model.dose])[kp[run_group]]),
                },
                index=[f"cell{i}" for i in range(num_cells)],
            )
            write_elem(f, "obs", obs)
            write_elem(f, "var", pd.DataFrame(index=_names("GENE", G, 4)))
            for k in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
                write_elem(f, k, {})

    return atomic_write(path, write)


def make_synthetic_atlas(
    path,
    *,
    num_cells: int = 4000,
    num_genes: int = 200,
    num_contexts: int = 3,
    num_perturbations: int = 6,
    num_batches: int = 2,
    response_spread: float = 0.5,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    **build_kwargs,
) -> Path:
    """Generate a synthetic screen and build it into an atlas with the ordinary builder.

    Defaults are small (4,000 cells x 200 genes, builds in about a second). Up to 200,000 cells are
    simulated exactly in memory; larger atlases are streamed through a temporary ``.h5ad`` written by
    `write_synthetic_h5ad`. Extra keyword arguments go to `build_atlas`.
    """
    from .builder import build_atlas

    from .remote import as_location, scratch_path

    path = as_location(path)
    kwargs = dict(BUILD_COLUMNS, dataset_name="synthetic", overwrite=overwrite, progress=progress, seed=seed)
    kwargs.update(build_kwargs)
    shape = dict(num_genes=num_genes, num_contexts=num_contexts, num_perturbations=num_perturbations, num_batches=num_batches)
    if num_cells <= 200_000:
        adata = make_synthetic_adata(num_cells=num_cells, response_spread=response_spread, seed=seed, **shape)
        return build_atlas(adata, path, **kwargs)
    h5 = scratch_path(path, f"input-{uuid.uuid4().hex[:8]}.h5ad")
    try:
        write_synthetic_h5ad(h5, num_cells=num_cells, response_spread=response_spread, seed=seed, progress=progress, **shape)
        return build_atlas(h5, path, **kwargs)
    finally:
        if h5.exists():
            h5.unlink()


def default_atlas_path() -> Path:
    """Where the built-in default atlas lives: ``$PERTURBDIFF_CACHE`` (default ``~/.cache/perturbdiff``)."""
    root = Path(os.environ.get("PERTURBDIFF_CACHE", "~/.cache/perturbdiff")).expanduser()
    return root / f"synthetic-v{GENERATOR_VERSION}.zarr"


def ensure_default_atlas() -> Path:
    """The built-in default atlas (the synthetic defaults), built on first use.

    The build writes to a temporary sibling and renames it into place, so concurrent first uses and
    interrupted builds never expose a partial atlas; a damaged or incomplete cached atlas is rebuilt.
    """
    from .store import Atlas, AtlasError

    path = default_atlas_path()
    if path.exists():
        try:
            Atlas(path)
            return path
        except AtlasError:
            pass
    return make_synthetic_atlas(path, overwrite=True)
