"""Marker-gene cell typing, for data that arrive without cell-type labels (e.g. Kang 2018 PBMC).

Each cell gets a score per cell type (the mean z-score of the type's marker genes in log-normalised
expression), the scores are averaged over the cell's nearest neighbours in PCA space, and the cell
takes the type with the highest smoothed score. Single cells carry only a few marker UMIs, so their
own scores are noisy; averaging over neighbours (cells of the same kind) removes that noise while
keeping rare populations (megakaryocytes, dendritic cells) that coarse clusters would swallow.
numpy only: randomized PCA on the most variable genes, exact neighbours in blocks.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["PBMC_MARKERS", "assign_cell_types"]

# Canonical PBMC markers (as in the Seurat / scanpy PBMC tutorials).
PBMC_MARKERS: dict[str, list[str]] = {
    "CD14 Mono": ["CD14", "LYZ"],
    "CD16 Mono": ["FCGR3A", "MS4A7"],
    "T": ["CD3D", "IL7R"],
    "B": ["MS4A1", "CD79A"],
    "NK": ["GNLY", "NKG7"],
    "DC": ["FCER1A", "CST3"],
    "Megakaryocyte": ["PPBP", "PF4"],
}


def _lognorm(counts) -> sp.csr_matrix:
    X = sp.csr_matrix(counts, dtype=np.float32) if sp.issparse(counts) else sp.csr_matrix(np.asarray(counts, np.float32))
    tot = np.asarray(X.sum(axis=1)).ravel()
    X = sp.diags(np.divide(1e4, tot, out=np.zeros_like(tot), where=tot > 0)) @ X
    X.data = np.log1p(X.data)
    return X.tocsr()


def _pca(X: sp.csr_matrix, n_top_genes: int, n_pcs: int, rng) -> np.ndarray:
    mean = np.asarray(X.mean(0)).ravel()
    var = np.asarray(X.multiply(X).mean(0)).ravel() - mean**2
    top = np.argsort(-var)[: min(n_top_genes, X.shape[1])]
    D = X[:, top].toarray()
    D = np.clip((D - D.mean(0)) / np.maximum(D.std(0), 1e-6), -10, 10)
    # randomized PCA: a Gaussian sketch, two power iterations, then an exact SVD of the sketch
    k = min(n_pcs, D.shape[1] - 1, D.shape[0] - 1)
    Q = np.linalg.qr(D @ rng.normal(size=(D.shape[1], k + 10)))[0]
    for _ in range(2):
        Q = np.linalg.qr(D @ (D.T @ Q))[0]
    U, S, _ = np.linalg.svd(Q.T @ D, full_matrices=False)
    return (Q @ U[:, :k]) * S[:k]


def _smooth(scores: np.ndarray, Y: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Average each cell's scores over its k nearest neighbours (itself included)."""
    sq = (Y**2).sum(1)
    out = np.empty_like(scores)
    for a in range(0, len(Y), block):
        d = sq[a : a + block, None] - 2 * Y[a : a + block] @ Y.T + sq[None, :]
        nn = np.argpartition(d, min(k, len(Y) - 1), axis=1)[:, :k]
        out[a : a + block] = scores[nn].mean(1)
    return out


def assign_cell_types(
    counts,
    gene_names,
    markers: dict[str, list[str]] = PBMC_MARKERS,
    *,
    n_neighbors: int = 15,
    n_top_genes: int = 2000,
    n_pcs: int = 30,
    seed: int = 0,
) -> np.ndarray:
    """Assign each cell the cell type whose marker genes score highest around it.

    Args:
        counts: cells x genes raw counts (dense or sparse).
        gene_names: the genes' names (marker genes are looked up here; absent ones are ignored).
        markers: cell type -> marker genes.
        n_neighbors: neighbours (in PCA space) the scores are averaged over; 0 scores single cells.
        n_top_genes, n_pcs: genes (by variance of log-normalised expression) and components of the PCA.
        seed: seed of the PCA sketch.

    Returns:
        numpy array of cell-type names, one per cell.
    """
    gene_index = {str(g): i for i, g in enumerate(gene_names)}
    types = [t for t, genes in markers.items() if any(g in gene_index for g in genes)]
    if not types:
        raise ValueError(f"none of the marker genes are among the {len(gene_index)} genes")
    X = _lognorm(counts)
    cols = sorted({gene_index[g] for t in types for g in markers[t] if g in gene_index})
    M = X[:, cols].toarray()
    Z = (M - M.mean(0)) / np.maximum(M.std(0), 1e-6)
    pos = {c: j for j, c in enumerate(cols)}
    scores = np.stack([Z[:, [pos[gene_index[g]] for g in markers[t] if g in gene_index]].mean(1) for t in types], axis=1)
    if n_neighbors > 1 and X.shape[0] > n_neighbors:
        scores = _smooth(scores, _pca(X, n_top_genes, n_pcs, np.random.default_rng(seed)), n_neighbors)
    return np.asarray(types, dtype=object)[scores.argmax(1)]
