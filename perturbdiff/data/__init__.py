"""PerturbDiff's data layer: grouped Zarr atlases, their builder, and the streaming cell-set loader.

    build_atlas(inputs, output, ...)        .h5ad / AnnData / Tahoe-layout parquet -> atlas (Zarr)
    Atlas(path)                             open an atlas (group index, genes, contiguous row reads)
    CellSetDataset(atlases, ...)            batches of cell sets for training (IterableDataset)
    CellSetLoader(dataset, num_workers=..)  DataLoader wrapper with an exact resumable position
    gene_vocabulary / atlas_vocabularies    shared gene and covariate vocabularies
    SplitSpec                               held-out context x perturbation splits (STATE TOML)
    make_synthetic_atlas / ensure_default_atlas   the synthetic quick-start data

Names are imported lazily so that ``import perturbdiff.data`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_atlas": "builder",
    "ensure_atlas": "builder",
    "highly_variable_genes": "builder",
    "Atlas": "store",
    "AtlasWriter": "store",
    "AtlasError": "store",
    "AtlasIncompleteError": "store",
    "AtlasCorruptError": "store",
    "open_atlas": "store",
    "FORMAT_VERSION": "store",
    "GROUP_KEYS": "store",
    "CellSetDataset": "loader",
    "CellSetLoader": "loader",
    "SparseSets": "sparse",
    "densify": "sparse",
    "gene_vocabulary": "vocab",
    "gene_presence": "vocab",
    "atlas_vocabularies": "vocab",
    "read_gene_list": "vocab",
    "SplitSpec": "splits",
    "with_validation_groups": "splits",
    "split_for_evaluation": "splits",
    "pair_control_sets": "pairing",
    "make_synthetic_adata": "synthetic",
    "make_synthetic_atlas": "synthetic",
    "write_synthetic_h5ad": "synthetic",
    "default_atlas_path": "synthetic",
    "ensure_default_atlas": "synthetic",
    "assign_cell_types": "annotate",
    "PBMC_MARKERS": "annotate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
