"""Pretrain PerturbDiff (the marginal stage): accelerate launch pretrain/run.py [--config ...]

With no arguments it trains a small model on the built-in synthetic atlas (built on first use) and
writes an exported model to runs/pretrain/model. See pretrain/configs/ for the configs.
"""

from pathlib import Path

from perturbdiff.train.cli import main

if __name__ == "__main__":
    main(description=__doc__, default_config=Path(__file__).parent / "configs" / "default.yaml")
