"""PerturBench development-set hold-out benchmark: held-out cell type ∩ held-out perturbations.

`../shared/data/perturbench_devel.h5ad` (PerturBench's devel.h5ad: 5,961 cells x 500 genes,
log1p; Norman 2019 CRISPRa in K562, McFaline 2023 CRISPRi in three glioma lines). Nine kinase
perturbations occur in every cell type; by default five of them are held out in two glioma lines
(A172, U87MG), so each is seen in the other lines and each held-out line with the other four
kinases. The protocol is the Kang benchmark's (`benchmarks/_holdout.py`): atlas build, marginal
pretraining on controls + training cells, conditional training from scratch and finetuned,
prediction from each held-out line's controls, `evaluate` beside the baselines.

    python benchmarks/perturbench_holdout.py
    python benchmarks/perturbench_holdout.py --data PATH/devel.h5ad --heldout-contexts T98G \\
        --heldout-perturbations SGK1 MAPK1 --steps 2000

Effects in the glioma lines are weak (see the data README): read the numbers with that in mind.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _holdout import CONFIGS, REPO, Benchmark, run  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "perturbench_devel.h5ad"


def _data_path(argv) -> Path:
    if "--data" in argv:
        i = argv.index("--data")
        path = Path(argv[i + 1])
        del argv[i : i + 2]
        return path
    return DEFAULT_DATA


def make_bench(path: Path) -> Benchmark:
    def load():
        import anndata as ad

        if not path.is_file():
            raise SystemExit(f"{path} not found: pass --data PATH to PerturBench's devel.h5ad "
                             "(src/perturbench/data/resources/devel.h5ad in altoslabs/perturbench)")
        import scipy.sparse as sp

        from perturbdiff.expression import log1p_to_counts

        adata = ad.read_h5ad(path)
        # only the columns the benchmark uses (the file's dose is a string like "1+1")
        adata.obs = adata.obs[["perturbation", "cell_type", "dataset"]].astype(str)
        # X is log1p of counts normalised over the whole transcriptome, but only 500 genes are kept.
        # Recover the counts (as the atlas builder's --input-log1p does) and use them everywhere, so
        # that training, prediction and evaluation all normalise over the same 500 genes; the
        # log1p values as given are on another scale than the model's (the total is not the 500
        # genes' total).
        adata.X, _ = log1p_to_counts(sp.csr_matrix(adata.X))
        return adata

    return Benchmark(
        name="perturbench_holdout",
        load=load,
        perturbation_key="perturbation",
        control_label="control",
        context_key="cell_type",
        dataset_key="dataset",
        heldout_contexts=["A172", "U87MG"],
        heldout_perturbations=["SGK1", "MAP3K21", "MAP4K3", "MAPK1", "MAP2K3"],
        pretrain_config=CONFIGS / "perturbench_pretrain.yaml",
        finetune_config=CONFIGS / "perturbench_finetune.yaml",
        defaults={"set_size": 32, "steps": 1000, "pretrain_steps": 500},
    )


if __name__ == "__main__":
    argv = sys.argv[1:]
    run(make_bench(_data_path(argv)), argv, description=__doc__ + "\n--data PATH: the devel.h5ad (default: "
        f"{DEFAULT_DATA})")
