"""Finetune PerturbDiff on a perturbation screen (the conditional stage).

    accelerate launch finetune/run.py --base runs/pretrain/model --screen screen.h5ad \
        --perturbation-key drug --control-label DMSO --context-key cell_line --batch-key plate \
        --heldout-contexts A549 --heldout-perturbations drugX drugY

The base model's genes and covariates keep their learned rows; the screen's new names get new ones.
Without --base it trains from scratch. See --help and finetune/configs/.
"""

from pathlib import Path

from perturbdiff.train.cli import main

if __name__ == "__main__":
    main(description=__doc__, default_config=Path(__file__).parent / "configs" / "default.yaml", finetune=True)
