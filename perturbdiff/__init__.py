"""PerturbDiff: functional diffusion over sets of cells for single-cell perturbation modelling."""

import os as _os

import torch as _torch
from transformers import AutoConfig, AutoModel

if not _torch.cuda.is_available():  # DeepSpeed (imported by transformers on loading) then warns on every load
    _os.environ.setdefault("DS_ACCELERATOR", "cpu")

from .configuration import COVARIATES, MODEL_PRESETS, NULL_ID, PerturbDiffConfig
from .diffusion import GaussianDiffusion, apply_guidance
from .losses import energy_distance, set_loss
from .modeling import PerturbDiffModel
from .expression import Normalization, normalize_counts
from .objective import CONDITIONAL, MARGINAL, Objective, sample_sets, training_step

__version__ = "0.1.0"

# After ``import perturbdiff``, AutoConfig/AutoModel.from_pretrained(folder) need no remote code.
AutoConfig.register(PerturbDiffConfig.model_type, PerturbDiffConfig, exist_ok=True)
AutoModel.register(PerturbDiffConfig, PerturbDiffModel, exist_ok=True)

# Heavier user-facing layers load on first use: ``perturbdiff.PerturbDiffPipeline`` etc.
_LAZY = {
    "PerturbDiffPipeline": ".pipeline",
    "evaluate": ".evaluation",
    "adapt_model": ".adapt",
    "Trainer": ".train",
    "TrainConfig": ".train",
    "load_train_config": ".train",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PerturbDiffPipeline",
    "TrainConfig",
    "Trainer",
    "adapt_model",
    "evaluate",
    "load_train_config",
    "COVARIATES",
    "CONDITIONAL",
    "GaussianDiffusion",
    "MARGINAL",
    "MODEL_PRESETS",
    "NULL_ID",
    "Normalization",
    "Objective",
    "PerturbDiffConfig",
    "PerturbDiffModel",
    "apply_guidance",
    "energy_distance",
    "normalize_counts",
    "sample_sets",
    "set_loss",
    "training_step",
]
