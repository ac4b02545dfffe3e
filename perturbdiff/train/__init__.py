"""Training: the run config, the Accelerate/DeepSpeed loop, checkpoints and exports, the entry command.

    config.py       TrainConfig (YAML + key=value overrides, validated)
    loop.py         Trainer: processes, seeds, data, the loop, validation, rank-0 output
    checkpoint.py   resume states and retention, EMA, exports and their model card, hub push
    cli.py          the command line of pretrain/run.py and finetune/run.py
"""

from .config import TrainConfig, load_train_config
from .loop import Trainer

__all__ = ["TrainConfig", "Trainer", "load_train_config"]
