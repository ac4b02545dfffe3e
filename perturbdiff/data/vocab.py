"""Vocabularies shared across atlases: genes and covariates.

Genes: a shared vocabulary is either the user's gene list or, as in the paper, the union of each
atlas's highly variable genes (``var["highly_variable"]``, flagged at build time). Each atlas is
mapped into it on read: genes the atlas does not measure are zero and are recorded as absent
(`gene_presence`).

Covariates: ids are 1-based positions in a sorted name list (`perturbdiff.configuration.encode_names`,
the one encoder: a name outside the vocabulary is an error); id 0 is the null id (classifier-free
guidance's null token, and the perturbation of marginal-mode sets). The control label is part of
the perturbation vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .store import Atlas

__all__ = ["gene_vocabulary", "atlas_vocabularies", "gene_presence", "read_gene_list"]


def _atlases(atlases) -> list[Atlas]:
    items = atlases if isinstance(atlases, (list, tuple)) else [atlases]
    return [a if isinstance(a, Atlas) else Atlas(a) for a in items]


def read_gene_list(path) -> list[str]:
    """A gene list file: one name per line (blank lines and ``#`` comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gene list {path} does not exist")
    genes = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    return [g for g in genes if g]


def gene_vocabulary(atlases, genes=None, *, n_top_genes: int | None = None, all_genes: bool = False) -> list[str]:
    """The shared gene vocabulary of one or more atlases.

    Args:
        atlases: atlas paths or `Atlas` objects.
        genes: a user gene list (list of names or a path to a one-per-line file); returned as given
            after checking it is unique and that each atlas measures at least one of its genes.
        n_top_genes: with ``genes=None``, re-select each atlas's top genes by normalised dispersion
            instead of using its stored ``highly_variable`` flags.
        all_genes: with ``genes=None``, every gene of every atlas (what finetuning on a screen uses).

    Returns:
        Gene names: the user's list, or the union of per-atlas highly variable genes in order of first
        appearance (atlas order, then each atlas's gene order).
    """
    objs = _atlases(atlases)
    if genes is not None:
        genes = read_gene_list(genes) if isinstance(genes, (str, Path)) else [str(g) for g in genes]
        if len(set(genes)) != len(genes):
            raise ValueError("the gene list has duplicate names")
        for a in objs:
            if not set(genes) & set(a.gene_names):
                raise ValueError(f"atlas {a.path} measures none of the {len(genes)} genes of the gene list")
        return genes
    out, seen = [], set()
    for a in objs:
        if all_genes:
            flags = np.ones(len(a.gene_names), dtype=bool)
        elif n_top_genes is None:
            flags = a.var["highly_variable"].to_numpy(dtype=bool)
        else:
            score = a.var["dispersion_norm"].to_numpy()
            flags = np.zeros(len(score), dtype=bool)
            flags[np.argsort(-score, kind="stable")[:n_top_genes]] = True
        for g in a.gene_names[flags]:
            if g not in seen:
                seen.add(g)
                out.append(str(g))
    return out


def gene_presence(atlas, genes) -> np.ndarray:
    """Boolean mask over ``genes``: True where the atlas measures the gene."""
    a = atlas if isinstance(atlas, Atlas) else Atlas(atlas)
    return np.isin(np.asarray(genes, dtype=object), a.gene_names)


def atlas_vocabularies(atlases) -> dict[str, list[str]]:
    """Sorted covariate name lists of one or more atlases.

    Returns a dict with keys ``"perturbation"`` (control labels included), ``"context"``, ``"batch"``
    and ``"dataset"``. A name's id is its position + 1 (0 is the null id).
    """
    out = {k: set() for k in ("perturbation", "context", "batch", "dataset")}
    for a in _atlases(atlases):
        for k in out:
            out[k].update(str(v) for v in a.groups[k].unique())
    return {k: sorted(v) for k, v in out.items()}
