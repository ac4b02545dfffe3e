"""The PerturbDiff backbone: a set transformer over cells, in the style of DiT / MM-DiT.

A token is a cell. The noisy perturbed set and the (never noised) control set are two token
streams; every block has per-stream adaLN-Zero modulation, per-stream MLPs and *joint* attention
over the tokens of both streams, so perturbed cells see control cells. There is no positional
encoding: the output is equivariant to the order of the perturbed cells and invariant to the
order of the control cells. The network predicts the clean set x_0 and knows nothing of the noise
process (see :mod:`perturbdiff.diffusion`).

Reads top to bottom: helpers, embedders (timestep, covariates), block, final layer, model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers import initialization as init

from .configuration import NULL_ID, PerturbDiffConfig

__all__ = ["PerturbDiffModel"]


# --------------------------------------------------------------------------- helpers
def zero_init(layer: nn.Linear) -> nn.Linear:
    """Mark a layer to start at zero (adaLN-Zero); ``_init_weights`` honours the mark."""
    layer.zero_init = True
    return layer


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-set shift/scale [B, d] applied to every token of x [B, n, d]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def null_dropped(ids: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    """Covariate ids [B] with the sets marked in ``drop`` [B] (guidance's unconditional sets) set to null."""
    return ids if drop is None else torch.where(drop, torch.full_like(ids, NULL_ID), ids)


class Mlp(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# --------------------------------------------------------------------------- embedders
class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (integer) diffusion timestep, then an MLP (as in DiT)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        for layer in (self.mlp[0], self.mlp[2]):
            layer.normal_init = True  # DiT initialises the timestep MLP with N(0, 0.02)

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # [B, half]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.sinusoidal(t, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)  # [B, d]


class CovariateEmbedder(nn.Module):
    """Embeds perturbation, context, batch, dose and optional perturbation features into one vector.

    Classifier-free guidance lives here: ``drop`` [B] (True = unconditional) replaces every
    covariate of that set by its null embedding (id 0) and removes the dose and feature terms.
    With perturbation features, a perturbation is known by its features alone (its id's row is
    not used): one the model never saw is then embedded the way the seen ones were.
    """

    def __init__(self, config: PerturbDiffConfig):
        super().__init__()
        d = config.hidden_size
        self.perturbation = nn.Embedding(config.num_ids("perturbation"), d)
        self.context = nn.Embedding(config.num_ids("context"), d)
        self.batch = nn.Embedding(config.num_ids("batch"), d)
        self.dose = Mlp(1, d, d) if config.use_dose else None
        self.features = Mlp(config.perturbation_feature_dim, d, d) if config.perturbation_feature_dim else None
        # the feature rows the model was trained with, by perturbation id (the trainer fills it):
        # prediction takes a vocabulary perturbation's features from here and refuses a table
        # that disagrees with them
        self.register_buffer("feature_table", torch.zeros(config.num_ids("perturbation"), config.perturbation_feature_dim)
                             if config.perturbation_feature_dim else None)

    def forward(self, perturbation, context, batch, dose=None, features=None, drop=None) -> torch.Tensor:
        keep = None if drop is None else ~drop  # [B]
        emb = 0
        if features is not None:  # known by its features: every set gets the null row (a constant)
            perturbation = torch.full_like(perturbation, NULL_ID)
        for table, ids in ((self.perturbation, perturbation), (self.context, context), (self.batch, batch)):
            emb = emb + table(null_dropped(ids, drop))  # [B, d]
        extras = []
        if dose is not None:
            extras.append(self.dose(torch.log1p(dose.float().clamp_min(0)).unsqueeze(-1).to(emb.dtype)))
        if features is not None:
            extras.append(self.features(features.to(emb.dtype)))
        for extra in extras:  # [B, d]
            emb = emb + (extra if keep is None else extra * keep.unsqueeze(-1).to(extra.dtype))
        return emb  # [B, d]


# --------------------------------------------------------------------------- block
class StreamLayers(nn.Module):
    """The per-stream half of a joint block: adaLN modulation, qkv, output projection, MLP."""

    def __init__(self, d: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        head_dim = d // num_heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, int(d * mlp_ratio), d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(d, 6 * d)))


class JointBlock(nn.Module):
    """MM-DiT block: each stream modulated by the condition, attention joint over both streams."""

    def __init__(self, d: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.x = StreamLayers(d, num_heads, mlp_ratio, qk_norm)  # perturbed (noisy) cells
        self.c = StreamLayers(d, num_heads, mlp_ratio, qk_norm)  # control cells

    def _qkv(self, s: StreamLayers, h, shift, scale):
        B, n, d = h.shape
        qkv = s.qkv(modulate(s.norm1(h), shift, scale)).view(B, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, n, d_head]
        return s.q_norm(q), s.k_norm(k), v

    def forward(self, x, c, cond):
        # x [B, m, d]; c [B, n, d] or None; cond [B, d]
        B, m, d = x.shape
        streams = [(self.x, x)] + ([(self.c, c)] if c is not None else [])
        mods = [s.adaLN_modulation(cond).chunk(6, dim=-1) for s, _ in streams]  # 6 x [B, d] each
        qkvs = [self._qkv(s, h, mod[0], mod[1]) for (s, h), mod in zip(streams, mods)]
        q, k, v = (torch.cat(parts, dim=2) for parts in zip(*qkvs))  # [B, heads, m + n, d_head]
        attn = F.scaled_dot_product_attention(q, k, v)  # [B, heads, m + n, d_head]
        attn = attn.transpose(1, 2).reshape(B, -1, d)  # [B, m + n, d]
        outs, start = [], 0
        for (s, h), mod in zip(streams, mods):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
            a = attn[:, start : start + h.shape[1]]
            start += h.shape[1]
            h = h + gate_msa.unsqueeze(1) * s.proj(a)
            h = h + gate_mlp.unsqueeze(1) * s.mlp(modulate(s.norm2(h), shift_mlp, scale_mlp))
            outs.append(h)
        return outs[0], (outs[1] if c is not None else None)


# --------------------------------------------------------------------------- final layer
class FinalLayer(nn.Module):
    """adaLN, then Linear(d -> G) (+ gated control-set mean or paired control cell), then a non-negative activation."""

    # The gate is stored divided by this gain: Adam moves a parameter by about the learning rate
    # per step, and the gate has to travel O(1) within a short finetuning run.
    GATE_GAIN = 50.0

    def __init__(self, d: int, num_genes: int, activation: str, control_residual: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, num_genes)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(d, 2 * d)))
        self.control_gate = nn.Parameter(torch.zeros(num_genes)) if control_residual else None
        self.activation = activation

    def forward(self, x, cond, control_residual=None, perturbation_shift=None):
        """``control_residual``: the control mean [B, 1, G] or each cell's paired control cell [B, m, G];
        ``perturbation_shift``: the additive pathway's shift [B, 1, G]."""
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=-1)  # [B, d] each
        out = self.linear(modulate(self.norm(x), shift, scale))  # [B, m, G]
        if control_residual is not None and self.control_gate is not None:
            out = out + self.GATE_GAIN * self.control_gate * control_residual
        if perturbation_shift is not None:
            out = out + perturbation_shift
        if self.activation == "relu":
            # relu's value with the identity's gradient (straight-through): a gene whose output went
            # negative for every cell still gets pulled back up where the target is positive,
            # instead of dying (the loss's gradient is taken at the clamped value, so a target of 0
            # does not push a negative output anywhere and exact zeros stay possible)
            return out + (F.relu(out) - out).detach()
        if self.activation == "softplus":
            return F.softplus(out)
        return out


# --------------------------------------------------------------------------- model
class PerturbDiffPreTrainedModel(PreTrainedModel):
    config_class = PerturbDiffConfig
    base_model_prefix = "perturbdiff"
    main_input_name = "x_t"
    _no_split_modules = ["JointBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        # Per-leaf rules: transformers 5 skips containers whose own parameters are already set.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "zero_init", False):  # adaLN-Zero: blocks start as the identity
                init.zeros_(module.weight)
            elif getattr(module, "normal_init", False):
                init.normal_(module.weight, mean=0.0, std=std)
            else:
                init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) and getattr(module, "zero_init", False):
            init.zeros_(module.weight)  # the additive pathway starts at "no change"
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.RMSNorm) and module.weight is not None:
            init.ones_(module.weight)
        elif isinstance(module, FinalLayer) and module.control_gate is not None:
            # the control residual starts at one: "the perturbed cells are the control cells", the
            # network then learns the change
            init.constant_(module.control_gate, 1.0 / module.GATE_GAIN)


class PerturbDiffModel(PerturbDiffPreTrainedModel):
    """Predicts a clean perturbed cell set x_0 [B, m, G] from its noisy version.

    ``forward`` takes only (x_t, t, conditioning). Covariates are id tensors [B] (0 = null); use
    ``config.encode(covariate, names)`` to map names to ids.
    """

    def __init__(self, config: PerturbDiffConfig):
        super().__init__(config)
        d, G = config.hidden_size, config.num_genes
        in_width = 2 * G if config.self_conditioning else G
        self.x_embed = nn.Linear(in_width, d)
        self.c_embed = nn.Linear(G, d)
        # paired_control: token i of the x-stream also reads control cell i
        self.pair_embed = nn.Linear(G, d) if config.paired_control else None
        self.t_embedder = TimestepEmbedder(d)
        self.covariate_embedder = CovariateEmbedder(config)
        self.blocks = nn.ModuleList(
            [JointBlock(d, config.num_heads, config.mlp_ratio, config.qk_norm) for _ in range(config.num_layers)]
        )
        self.final_layer = FinalLayer(d, G, config.output_activation, config.control_residual)
        # the additive pathway: one shift per perturbation id (row 0, the null id, stays zero),
        # stored divided by the head's gain so that Adam moves it O(1) within a short run
        self.perturbation_shift = (nn.Embedding(config.num_ids("perturbation"), G, padding_idx=NULL_ID)
                                   if config.perturbation_shift else None)
        if self.perturbation_shift is not None:
            self.perturbation_shift.zero_init = True
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, refusing weights that do not match the config.

        transformers initialises missing weights randomly with only a warning (a config edited to
        add layers would predict from random blocks); here any missing, unexpected or mismatched
        weight is an error that names them.
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        problems = {k: sorted(map(str, v))[:5] for k, v in info.items()
                    if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise ValueError(f"{pretrained_model_name_or_path}: the saved weights do not match its config.json "
                             f"({'; '.join(f'{k}: {v}' for k, v in problems.items())}); was the config edited?")
        return (model, info) if want_info else model

    def forward(
        self,
        x_t: torch.Tensor,
        timestep: torch.Tensor,
        self_cond: torch.Tensor | None = None,
        control: torch.Tensor | None = None,
        perturbation: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        batch: torch.Tensor | None = None,
        dose: torch.Tensor | None = None,
        perturbation_features: torch.Tensor | None = None,
        drop_covariates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x_t: noisy perturbed set [B, m, G].
            timestep: integer diffusion step per set [B] (or a scalar).
            self_cond: previous x_0 estimate [B, m, G] (zeros when omitted).
            control: control set [B, m, G], never noised; ``None`` runs without the control stream.
            perturbation, context, batch: covariate ids [B]; ``None`` means null for every set.
            dose: dose per set [B] (needs ``config.use_dose``); ``None`` adds no dose term.
            perturbation_features: [B, F] feature vectors (needs ``config.perturbation_feature_dim``).
            drop_covariates: [B] bool, True replaces that set's covariates by null (guidance).
        Returns:
            x_0 prediction [B, m, G], non-negative unless ``output_activation="none"``.
        """
        B, m = self._check_inputs(x_t, self_cond, control, perturbation_features, dose)
        dev = x_t.device
        timestep = torch.as_tensor(timestep, device=dev).expand(B) if torch.as_tensor(timestep).ndim == 0 else timestep
        ids = [self._ids(name, v, B, dev) for name, v in (("perturbation", perturbation), ("context", context), ("batch", batch))]

        cond = self.t_embedder(timestep) + self.covariate_embedder(
            *ids, dose=dose, features=perturbation_features, drop=drop_covariates
        )  # [B, d]
        if self.config.self_conditioning:
            self_cond = torch.zeros_like(x_t) if self_cond is None else self_cond
            x = self.x_embed(torch.cat([x_t, self_cond], dim=-1))  # [B, m, d]
        else:
            x = self.x_embed(x_t)  # [B, m, d]
        if self.pair_embed is not None and control is not None:
            x = x + self.pair_embed(control)  # [B, m, d]: each token reads its own control cell
        c = self.c_embed(control) if control is not None else None  # [B, m, d] or None
        shift = None
        if control is not None and self.perturbation_shift is not None:
            pid = null_dropped(ids[0], drop_covariates)
            shift = FinalLayer.GATE_GAIN * self.perturbation_shift(pid).unsqueeze(1)  # [B, 1, G]
        residual = None
        if control is not None and self.config.control_residual:
            # each cell's own control cell [B, m, G] (paired_control), else the set's mean [B, 1, G]
            residual = control if self.config.paired_control else control.mean(dim=1, keepdim=True)
        for block in self.blocks:
            x, c = block(x, c, cond)  # [B, m, d], [B, n, d]
        return self.final_layer(x, cond, residual, shift)  # [B, m, G]

    # ------------------------------------------------------------------ input checks
    def _check_inputs(self, x_t, self_cond, control, features, dose):
        G = self.config.num_genes
        if x_t.ndim != 3:
            raise ValueError(f"x_t must be [sets, cells, genes], got shape {tuple(x_t.shape)}")
        B, m, g = x_t.shape
        if g != G:
            raise ValueError(f"x_t has {g} genes but the model takes {G}")
        if self_cond is not None:
            if not self.config.self_conditioning:
                raise ValueError("self_cond given but the model was built with self_conditioning=False")
            if self_cond.shape != x_t.shape:
                raise ValueError(f"self_cond shape {tuple(self_cond.shape)} != x_t shape {tuple(x_t.shape)}")
        if control is not None and control.shape != x_t.shape:
            raise ValueError(
                f"control set shape {tuple(control.shape)} must match the perturbed set {tuple(x_t.shape)} "
                "(same number of sets, cells per set and genes)"
            )
        if features is not None:
            if not self.config.perturbation_feature_dim:
                raise ValueError("perturbation_features given but config.perturbation_feature_dim is 0")
            if features.shape != (B, self.config.perturbation_feature_dim):
                raise ValueError(
                    f"perturbation_features must be [{B}, {self.config.perturbation_feature_dim}], "
                    f"got {tuple(features.shape)}"
                )
        if dose is not None:
            if not self.config.use_dose:
                raise ValueError("dose given but the model was built with use_dose=False")
            if dose.shape != (B,):
                raise ValueError(f"dose must be [{B}], got {tuple(dose.shape)}")
        return B, m

    def _ids(self, name, ids, B, device):
        if ids is None:
            return torch.full((B,), NULL_ID, dtype=torch.long, device=device)
        ids = torch.as_tensor(ids, device=device)
        if ids.shape != (B,):
            raise ValueError(f"{name} ids must be [{B}], got {tuple(ids.shape)}")
        n = self.config.num_ids(name)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise ValueError(f"{name} ids must be in [0, {n - 1}] (0 = null), got {ids.tolist()}")
        return ids.long()
