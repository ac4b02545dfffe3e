"""``PerturbDiffConfig``: the single source of truth for a PerturbDiff model.

The config holds the network sizes, the diffusion settings the model was trained with, and
everything that says what data the model takes: the ordered gene vocabulary, the perturbation /
context / batch vocabularies and the expression normalisation. It is saved as ``config.json``
next to the weights, so ``from_pretrained(folder)`` rebuilds the model and can validate a user's
data against it.

Covariate ids: id 0 of every covariate is the reserved *null* id (classifier-free guidance and
"unknown"); the name at position i of a vocabulary has id i + 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from transformers import PretrainedConfig

from .expression import Normalization

__all__ = ["check_hidden_covariates", "PerturbDiffConfig", "MODEL_PRESETS", "COVARIATES", "NULL_ID", "encode_names"]

NULL_ID = 0
# How far above a gene's training maximum (log1p units) sampling lets it go: log 2, twice its
# largest normalised count share.
GENE_MAX_MARGIN = math.log(2.0)
COVARIATES = ("perturbation", "context", "batch")
# covariates a model can be trained without being told (`check_hidden_covariates`)
HIDEABLE = ("context", "batch")

# Named sizes. ``base`` is the paper's default (d=512, depth 8, 8 heads); ``debug`` is for tests.
MODEL_PRESETS: dict[str, dict] = {
    "debug": dict(hidden_size=64, num_layers=2, num_heads=4),
    "small": dict(hidden_size=256, num_layers=4, num_heads=4),
    "base": dict(hidden_size=512, num_layers=8, num_heads=8),
    "large": dict(hidden_size=1024, num_layers=12, num_heads=16),
}

_BETA_SCHEDULES = ("linear", "cosine")
# Removed options, with the one behaviour that stayed: a stored config that asks for another fails.
_REMOVED = {"context_conditioning": True, "control_residual_init": 1.0}
_OUTPUT_ACTIVATIONS = ("relu", "softplus", "none")


class PerturbDiffConfig(PretrainedConfig):
    """Configuration of a :class:`~perturbdiff.PerturbDiffModel`.

    Args:
        gene_names: ordered gene vocabulary (the model's input/output columns). Either this or
            ``num_genes`` must be given; when both are, they must agree.
        num_genes: number of genes G (derived from ``gene_names`` when omitted).
        perturbation_names, context_names, batch_names: covariate vocabularies; id = index + 1.
        hidden_size, num_layers, num_heads, mlp_ratio: transformer sizes (see ``MODEL_PRESETS``).
        qk_norm: RMS-normalise queries and keys per head.
        output_activation: non-negative head, ``"relu"`` (default, allows exact zeros),
            ``"softplus"`` or ``"none"``.
        use_dose: embed a per-set dose (``log1p(dose)``) into the condition.
        perturbation_feature_dim: width F of optional per-perturbation feature vectors (gene
            embeddings, drug fingerprints); 0 disables them.
        num_train_timesteps, beta_schedule: the diffusion the model was trained with.
        set_noise: the weight of the diffusion noise's per-set part, shared by a set's cells
            (`perturbdiff.diffusion`): what lets sampled populations differ as real ones do.
        self_conditioning: the input carries a self-conditioning estimate (input width 2G).
        control_residual: add a learned per-gene gate times the control set's mean expression to
            the head's output (before its activation), so the network can predict the change from
            the control population.
            The gate starts at one: "the perturbed population is the control population", and
            the head learns the change.
        paired_control: pair each generated cell with one control cell (cell i of the control set
            given to ``forward``): its token reads that cell, and the control residual adds that
            cell instead of the set's mean, so the network predicts each cell's change from its
            own control. Training pairs a perturbed set's cells with its control set's cells by
            optimal transport. A population keeps its own identity cell by cell, which is what a
            cell type never seen perturbed needs.
        perturbation_shift: an explicit additive pathway: a learned per-perturbation shift [G],
            shared by every context, added to the head's output beside the control residual (only
            when a control set is given), so the network starts from "control + the perturbation's
            average change" and learns the context-specific correction. Zero for the null
            perturbation (and under guidance's dropped covariates).
        normalization: dict of :class:`~perturbdiff.expression.Normalization` fields.
        control_label: the perturbation name that marks control cells in the training data.
        set_size: cells per set the model was trained with (the trainer records it); prediction
            uses it as its default set size, since a set model's output depends on the set size.
        gene_max: each gene's largest value in the training data, in the model's space [G] (the
            trainer records it from the training split's cells and every control cell, never a
            held-out group). Sampling keeps every x_0 estimate at or below it plus
            ``GENE_MAX_MARGIN`` (twice the gene's largest normalised count share): without that,
            a few cells ran off to "the whole cell is one gene" (docs/benchmarks.md).
        trained_perturbations: the perturbations that had training cells (the trainer records
            them; the vocabulary also holds held-out ones): prediction names the others it is
            asked for as ``unseen_perturbations``.
        hidden_covariates: covariates ("context", "batch") the model was trained without being
            told (their vocabulary is empty): each training set still came from one of them, so
            the model learnt how populations vary across them, which ``num_populations`` samples;
            prediction uses their values only to pick control cells.
    """

    model_type = "perturbdiff"

    def __init__(
        self,
        gene_names: Sequence[str] | None = None,
        num_genes: int | None = None,
        perturbation_names: Sequence[str] | None = None,
        context_names: Sequence[str] | None = None,
        batch_names: Sequence[str] | None = None,
        hidden_size: int = 512,
        num_layers: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        output_activation: str = "relu",
        use_dose: bool = True,
        perturbation_feature_dim: int = 0,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "cosine",
        set_noise: float = 0.0,
        self_conditioning: bool = True,
        control_residual: bool = True,
        paired_control: bool = False,
        perturbation_shift: bool = False,
        normalization: dict | None = None,
        control_label: str | None = "control",
        set_size: int | None = None,
        gene_max: Sequence[float] | None = None,
        trained_perturbations: Sequence[str] | None = None,
        hidden_covariates: Sequence[str] | None = None,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.gene_names = list(gene_names) if gene_names is not None else None
        if num_genes is None and self.gene_names is not None:
            num_genes = len(self.gene_names)
        self.num_genes = num_genes
        self.perturbation_names = list(perturbation_names or [])
        self.context_names = list(context_names or [])
        self.batch_names = list(batch_names or [])
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.qk_norm = qk_norm
        self.output_activation = output_activation
        self.use_dose = use_dose
        self.perturbation_feature_dim = perturbation_feature_dim
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.set_noise = float(set_noise)
        self.self_conditioning = self_conditioning
        self.control_residual = control_residual
        self.paired_control = bool(paired_control)
        self.perturbation_shift = bool(perturbation_shift)
        self.normalization = Normalization.from_dict(normalization).to_dict()
        self.control_label = control_label
        self.set_size = set_size
        self.gene_max = None if gene_max is None else [float(v) for v in gene_max]
        self.trained_perturbations = None if trained_perturbations is None else sorted(map(str, trained_perturbations))
        self.hidden_covariates = check_hidden_covariates(hidden_covariates or ())
        self.initializer_range = initializer_range
        for name, kept in _REMOVED.items():  # options measurements rejected: refuse other values
            if name in kwargs and kwargs.pop(name) != kept:
                raise ValueError(f"{name} was removed (docs/benchmarks.md has why); only {name}={kept!r} remains")
        super().__init__(**kwargs)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` on an inconsistent config (called on construction)."""
        if self.num_genes is None:
            raise ValueError("PerturbDiffConfig needs gene_names or num_genes")
        if self.gene_names is not None:
            if len(self.gene_names) != self.num_genes:
                raise ValueError(
                    f"num_genes={self.num_genes} but gene_names has {len(self.gene_names)} entries"
                )
            dup = _duplicates(self.gene_names)
            if dup:
                raise ValueError(f"gene_names has duplicates: {dup[:5]}")
        if self.num_genes <= 0:
            raise ValueError(f"num_genes must be positive, got {self.num_genes}")
        for cov in COVARIATES:
            dup = _duplicates(self.vocabulary(cov))
            if dup:
                raise ValueError(f"{cov}_names has duplicates: {dup[:5]}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not (math.isfinite(self.set_noise) and self.set_noise >= 0):
            raise ValueError(f"set_noise must be a finite number >= 0, got {self.set_noise}")
        if self.beta_schedule not in _BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {_BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.output_activation not in _OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"output_activation must be one of {_OUTPUT_ACTIVATIONS}, got {self.output_activation!r}"
            )
        if self.perturbation_feature_dim < 0:
            raise ValueError("perturbation_feature_dim must be >= 0")
        if self.gene_max is not None and (len(self.gene_max) != self.num_genes
                                          or not all(math.isfinite(v) and v >= 0 for v in self.gene_max)):
            raise ValueError(f"gene_max must be {self.num_genes} finite values >= 0 (one per gene)")

    def sample_ceiling(self) -> list[float] | None:
        """The largest value sampling lets each gene take (model space): ``gene_max`` + the margin."""
        if self.gene_max is None:
            return None
        norm = self.normalization
        if not norm.get("log1p", True):  # a linear space: twice the largest value
            return [2.0 * v for v in self.gene_max]
        margin = GENE_MAX_MARGIN / float(norm.get("scale", 1.0) or 1.0)
        return [v + margin for v in self.gene_max]

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, preset: str, **kwargs) -> "PerturbDiffConfig":
        """A config with the sizes of a named preset (``debug``, ``small``, ``base``, ``large``);
        keyword arguments override any field."""
        if preset not in MODEL_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
        return cls(**{**MODEL_PRESETS[preset], **kwargs})

    # ------------------------------------------------------------------ vocabularies
    @property
    def norm(self) -> Normalization:
        return Normalization.from_dict(self.normalization)

    def vocabulary(self, covariate: str) -> list[str]:
        if covariate not in COVARIATES:
            raise ValueError(f"unknown covariate {covariate!r}; one of {COVARIATES}")
        return getattr(self, f"{covariate}_names")

    def num_ids(self, covariate: str) -> int:
        """Embedding rows for a covariate: its vocabulary plus the null id."""
        return len(self.vocabulary(covariate)) + 1

    def encode(self, covariate: str, names: str | Iterable[str | None]) -> torch.Tensor:
        """Map names to ids (a LongTensor). ``None`` maps to the null id; unknown names raise."""
        return torch.from_numpy(encode_names(names, self.vocabulary(covariate), covariate))

    def decode(self, covariate: str, ids: Iterable[int]) -> list[str | None]:
        vocab = self.vocabulary(covariate)
        return [None if int(i) == NULL_ID else vocab[int(i) - 1] for i in ids]

    def check_genes(self, gene_names: Sequence[str]) -> None:
        """Raise ``ValueError`` unless ``gene_names`` is exactly the model's gene vocabulary, in order."""
        gene_names = list(gene_names)
        if self.gene_names is None:
            if len(gene_names) != self.num_genes:
                raise ValueError(f"data has {len(gene_names)} genes, the model takes {self.num_genes}")
            return
        if gene_names == self.gene_names:
            return
        ours = set(self.gene_names)
        shared = sum(g in ours for g in gene_names)
        missing = [g for g in self.gene_names if g not in set(gene_names)]
        raise ValueError(
            f"genes do not match the model: data has {len(gene_names)} genes, model {self.num_genes}; "
            f"{shared} shared, {len(missing)} of the model's genes missing from the data"
            + (f" (e.g. {missing[:5]})" if missing else "")
            + ("; same genes in another order: reorder the data to the model's gene_names" if not missing and shared == self.num_genes == len(gene_names) else "")
        )


def check_hidden_covariates(names) -> list[str]:
    """The hidden covariates as a sorted list; anything but "context" / "batch" is an error."""
    names = [names] if isinstance(names, str) else list(names or ())
    bad = sorted({str(n) for n in names} - set(HIDEABLE))
    if bad:
        raise ValueError(f"hidden_covariates: {bad} cannot be hidden (only {list(HIDEABLE)})")
    return sorted(set(map(str, names)))


def encode_names(names: str | Iterable[str | None], vocabulary: Sequence[str], what: str,
                 known_as: str = "the model") -> np.ndarray:
    """Ids of ``names`` in ``vocabulary`` (int64; position + 1, ``None`` -> ``NULL_ID``).

    The one name-to-id rule of the project: a name outside the vocabulary is an error that lists
    what is known, never a silent null.
    """
    if isinstance(names, str):
        names = [names]
    names = [None if n is None else str(n) for n in names]
    lookup = {str(n): i + 1 for i, n in enumerate(vocabulary)}
    unknown = sorted({n for n in names if n is not None and n not in lookup})
    if unknown:
        shown = ", ".join(map(str, vocabulary[:20])) + (" ..." if len(vocabulary) > 20 else "")
        raise ValueError(f"unknown {what} name(s) {unknown[:10]} ({known_as} knows {len(vocabulary)}: {shown})")
    return np.array([NULL_ID if n is None else lookup[n] for n in names], dtype=np.int64)


def _duplicates(names: Sequence[str]) -> list[str]:
    seen, dup = set(), []
    for n in names:
        if n in seen:
            dup.append(n)
        seen.add(n)
    return dup
