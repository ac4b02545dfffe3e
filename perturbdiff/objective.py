"""The objective: one training step and the set sampler, as plain functions of (model, diffusion, batch).

The distributed trainer, finetuning and prediction all call these; nothing here knows about
processes, devices beyond the tensors' own, or data files. Paired models (``paired_control``) get
their control sets already paired cell by cell with the perturbed sets (the loader does it,
`perturbdiff.data.pairing`).

A *batch* is a dict of tensors (the loader's format):
    x0            float [B, m, G]   the true perturbed sets (normalised expression)
    control       float [B, m, G]   matched control sets (optional)
    perturbation, context, batch    long [B] covariate ids, 0 = null (optional)
    dose          float [B]         (optional)
    perturbation_features  float [B, F]  (optional)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from .diffusion import GaussianDiffusion
from .losses import set_loss

__all__ = ["Objective", "ObjectiveSettings", "MARGINAL", "CONDITIONAL", "training_step", "sample_sets"]

_COND_KEYS = ("perturbation", "context", "batch", "dose", "perturbation_features")


@dataclass
class ObjectiveSettings:
    """The tunable part of the objective (the trainer's ``train`` section has these fields too).

    Args:
        cond_drop_prob: probability per set of replacing all covariates by null (guidance training).
        self_cond_prob: probability per step of a no-grad self-conditioning pass.
        mmd_weight, mse_weight: weights of the energy-distance and MSE terms.
    """

    cond_drop_prob: float = 0.5
    self_cond_prob: float = 0.5
    mmd_weight: float = 1.0
    mse_weight: float = 1.0

    def check_objective(self) -> None:
        """Raise ``ValueError`` naming the field (as ``train.<field>``) on a bad value."""
        for name in ("cond_drop_prob", "self_cond_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"train.{name} must be a number in [0, 1], got {value!r}")
        for name in ("mmd_weight", "mse_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"train.{name} must be a number >= 0, got {value!r}")

    def settings(self) -> dict:
        """The `ObjectiveSettings` fields of this object, by name."""
        return {f.name: getattr(self, f.name) for f in fields(ObjectiveSettings)}


@dataclass
class Objective(ObjectiveSettings):
    """What a training step optimises: the settings, and whether the control stream is fed.

    Args:
        use_control: feed the control stream (False for marginal pretraining: it is dropped always).
    """

    use_control: bool = True

    def __post_init__(self):
        self.check_objective()

    def to_dict(self) -> dict:
        return asdict(self)


# The paper's two stages: marginal pretraining (no perturbation label, no control stream) and
# conditional finetuning (control stream on, covariates dropped with p = 0.5).
MARGINAL = Objective(use_control=False)
CONDITIONAL = Objective(use_control=True)


def _config(model):
    """The PerturbDiffConfig of a model, also when wrapped (DDP, DeepSpeed engine: ``.module``)."""
    while hasattr(model, "module"):  # DDP and the DeepSpeed engine (whose own .config is a dict)
        model = model.module
    return model.config


def _uniform(n: int, generator, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gen_device).to(device)


def training_step(
    model,
    diffusion: GaussianDiffusion,
    batch: dict,
    objective: Objective = CONDITIONAL,
    generator: torch.Generator | None = None,
    shared_generator: torch.Generator | None = None,
) -> dict:
    """Noise the sets, predict x_0 and return the loss terms (``loss`` has a graph; call backward).

    Draws one timestep per set, per-set covariate dropout, and a self-conditioning pass with
    probability ``objective.self_cond_prob``. All randomness comes from ``generator`` when given, so a step is reproducible from its state. The self-conditioning coin
    changes how many forward passes a step makes, which all processes of a sharded model (ZeRO-3)
    must agree on: a trainer passes a ``shared_generator`` seeded alike on every rank for it.
    """
    x0 = batch["x0"]
    B, device = x0.shape[0], x0.device
    t = diffusion.sample_timesteps(B, generator, device)
    control = batch.get("control")
    noise = diffusion.noise(x0.shape, generator, device, x0.dtype)
    x_t = diffusion.add_noise(x0, noise, t)

    cond = {k: batch[k] for k in _COND_KEYS if batch.get(k) is not None}
    if objective.use_control:
        if control is None:
            raise ValueError("the conditional objective needs a 'control' set in the batch")
        cond["control"] = control
    if objective.cond_drop_prob > 0:
        cond["drop_covariates"] = _uniform(B, generator, device) < objective.cond_drop_prob

    self_cond = None
    coin = float(_uniform(1, shared_generator if shared_generator is not None else generator, device))
    use_self_cond = _config(model).self_conditioning and coin < objective.self_cond_prob
    if use_self_cond:
        with torch.no_grad():
            self_cond = model(x_t, t, **cond).detach()
    pred = model(x_t, t, self_cond=self_cond, **cond)
    out = set_loss(pred, x0, mmd_weight=objective.mmd_weight, mse_weight=objective.mse_weight)
    out["t_mean"] = t.float().mean()
    return out


@torch.no_grad()
def sample_sets(
    model,
    diffusion: GaussianDiffusion | None = None,
    *,
    control: torch.Tensor | None = None,
    perturbation: torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    batch: torch.Tensor | None = None,
    dose: torch.Tensor | None = None,
    perturbation_features: torch.Tensor | None = None,
    num_sets: int | None = None,
    num_cells: int | None = None,
    num_steps: int = 100,
    sampler: str = "ddim",
    eta: float = 0.0,
    guidance_scale: float = 0.0,
    generator: torch.Generator | None = None,
    shared_noise: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Generate predicted perturbed sets [B, m, G] given control sets and covariate ids.

    With ``control`` given, B and m come from it (one generated set per control set); without it,
    pass ``num_sets`` and ``num_cells``. The unconditional pass of guidance drops the covariates
    and keeps the control stream (the control population is the input, not a label).
    ``shared_noise`` [B, 1, G]: the starting noise's per-set part (`GaussianDiffusion.sample`).
    """
    model_was_training = model.training
    model.eval()
    diffusion = diffusion or GaussianDiffusion.from_config(model.config)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if control is not None:
        if control.ndim != 3:
            raise ValueError(f"control must be [sets, cells, genes], got {tuple(control.shape)}")
        if num_sets not in (None, control.shape[0]) or num_cells not in (None, control.shape[1]):
            raise ValueError(
                f"num_sets/num_cells ({num_sets}, {num_cells}) disagree with the control sets {tuple(control.shape[:2])}"
            )
        num_sets, num_cells = control.shape[:2]
        control = control.to(device, dtype)
    elif num_sets is None or num_cells is None:
        raise ValueError("sample_sets needs control sets or both num_sets and num_cells")
    shape = (num_sets, num_cells, model.config.num_genes)
    cond = {
        k: (v.to(device) if v is not None else None)
        for k, v in dict(perturbation=perturbation, context=context, batch=batch, dose=dose,
                         perturbation_features=perturbation_features).items()
    }
    cond = {k: v for k, v in cond.items() if v is not None}

    def denoise(x_t, t, self_cond, guided):
        if not guided:
            return model(x_t, t, self_cond=self_cond, control=control, **cond)
        # One forward over [conditional; unconditional] halves of a doubled batch.
        two = lambda v: None if v is None else torch.cat([v, v])  # noqa: E731
        drop = torch.cat([torch.zeros(num_sets, dtype=torch.bool), torch.ones(num_sets, dtype=torch.bool)]).to(device)
        out = model(two(x_t), two(t), self_cond=two(self_cond), control=two(control),
                    drop_covariates=drop, **{k: two(v) for k, v in cond.items()})
        return out[:num_sets], out[num_sets:]

    try:
        ceiling = model.config.sample_ceiling()  # each gene's training range (+ a margin), when recorded
        return diffusion.sample(
            denoise, shape, num_steps=num_steps, sampler=sampler, eta=eta, guidance_scale=guidance_scale,
            self_conditioning=model.config.self_conditioning, generator=generator, device=device, dtype=dtype,
            progress=progress, clamp_max=None if ceiling is None else torch.tensor(ceiling), shared_noise=shared_noise,
        )
    finally:
        model.train(model_was_training)
