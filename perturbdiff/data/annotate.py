"""Marker-gene cell typing, for data that arrive without cell-type labels (e.g. Kang 2018 PBMC).

The usual cluster-then-annotate workflow, with numpy only: normalise (total 1e4, log1p), PCA on
the most variable genes, k-means clusters, and each cluster gets the cell type whose markers score
highest on it (mean z-score of the type's marker genes). Scoring clusters rather than single cells
is what makes it robust: a cell's few marker UMIs are noisy, a cluster's mean is not.
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
    "Megakaryocyte": ["PPBP"],
}


def _lognorm(counts) -> np.ndarray:
    X = sp.csr_matrix(counts, dtype=np.float32) if sp.issparse(counts) else sp.csr_matrix(np.asarray(counts, np.float32))
    tot = np.asarray(X.sum(axis=1)).ravel()
    X = sp.diags(np.divide(1e4, tot, out=np.zeros_like(tot), where=tot > 0)) @ X
    X.data = np.log1p(X.data)
    return X.tocsr()


def _kmeans(Y: np.ndarray, k: int, rng, iters: int = 30) -> np.ndarray:
    centers = Y[rng.choice(len(Y), k, replace=False)]
    for _ in range(iters):
        d = (Y**2).sum(1)[:, None] - 2 * Y @ centers.T + (centers**2).sum(1)[None, :]
        labels = d.argmin(1)
        new = np.stack([Y[labels == j].mean(0) if np.any(labels == j) else centers[j] for j in range(k)])
        if np.allclose(new, centers):
            break
        centers = new
    return labels


def assign_cell_types(
    counts,
    gene_names,
    markers: dict[str, list[str]] = PBMC_MARKERS,
    *,
    n_clusters: int = 30,
    n_top_genes: int = 2000,
    n_pcs: int = 30,
    seed: int = 0,
) -> np.ndarray:
    """Assign each cell the cell type whose marker genes score highest on its cluster.

    Args:
        counts: cells x genes raw counts (dense or sparse).
        gene_names: the genes' names (marker genes are looked up here; absent ones are ignored).
        markers: cell type -> marker genes.
        n_clusters: k-means clusters in PCA space (0: score single cells instead).
        n_top_genes, n_pcs: genes (by variance of log-normalised expression) and components of the PCA.
        seed: seed of the PCA sketch and k-means.

    Returns:
        numpy array of cell-type names, one per cell.
    """
    gene_index = {str(g): i for i, g in enumerate(gene_names)}
    types = [t for t, genes in markers.items() if any(g in gene_index for g in genes)]
    if not types:
        raise ValueError(f"none of the marker genes are among the {len(gene_index)} genes")
    X = _lognorm(counts)
    n = X.shape[0]
    # per-cell marker scores: mean z-score of each type's markers
    cols = sorted({gene_index[g] for t in types for g in markers[t] if g in gene_index})
    M = X[:, cols].toarray()
    Z = (M - M.mean(0)) / np.maximum(M.std(0), 1e-6)
    pos = {c: j for j, c in enumerate(cols)}
    scores = np.stack([Z[:, [pos[gene_index[g]] for g in markers[t] if g in gene_index]].mean(1) for t in types], axis=1)
    if n_clusters and n > n_clusters:
        rng = np.random.default_rng(seed)
        mean = np.asarray(X.mean(0)).ravel()
        var = np.asarray(X.multiply(X).mean(0)).ravel() - mean**2
        top = np.argsort(-var)[: min(n_top_genes, X.shape[1])]
        D = X[:, top].toarray()
        D = np.clip((D - D.mean(0)) / np.maximum(D.std(0), 1e-6), -10, 10)
        # randomized PCA: a Gaussian sketch, two power iterations, then an exact SVD of the sketch
        k = min(n_pcs, D.shape[1] - 1, n - 1)
        Q = np.linalg.qr(D @ rng.normal(size=(D.shape[1], k + 10)))[0]
        for _ in range(2):
            Q = np.linalg.qr(D @ (D.T @ Q))[0]
        U, S, _ = np.linalg.svd(Q.T @ D, full_matrices=False)
        Y = (Q @ U[:, :k]) * S[:k]
        labels = _kmeans(Y, n_clusters, rng)
        cluster_scores = np.stack([scores[labels == j].mean(0) if np.any(labels == j) else np.full(len(types), -np.inf) for j in range(n_clusters)])
        return np.asarray(types, dtype=object)[cluster_scores.argmax(1)][labels]
    return np.asarray(types, dtype=object)[scores.argmax(1)]
