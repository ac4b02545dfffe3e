"""Prediction: control cells + conditions -> an AnnData of predicted perturbed cells.

``PerturbDiffPipeline.from_pretrained(folder).predict(control_adata, conditions)`` is the Python
API; ``perturbdiff predict`` is the same from the command line. For every condition (perturbation,
context, batch, dose) the pipeline takes the control cells of that context from the control
AnnData, maps their genes onto the model's gene vocabulary by name, normalises them as the model
was trained, cuts them into sets of ``set_size`` cells and samples a predicted set per control set
(DDIM). ``num_populations`` independent draws per condition sample the distribution over
populations that PerturbDiff models.

Predictions are written as log1p-normalised expression, ``log1p(counts / total * target_sum)``,
in the model's gene order: the model works in that space divided by ``normalization.scale``, and
the pipeline multiplies the scale back so that the output is comparable with ordinary
log-normalised data (``uns["perturbdiff"]`` states the space).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .baselines import STATS_FILE, Anchor, load_stats
from .cli import ShowDefaults
from .conditions import clean_conditions, condition_rngs, draw_cells, feature_table, make_conditions, read_conditions
from .configuration import NULL_ID
from .diffusion import GaussianDiffusion
from .expression import (INPUT_SPACES, Normalization, decode_counts, detect_input_space, gene_columns, log1p_to_counts,
                         to_model_space)
from .features import read_table
from .files import atomic_write, read_h5ad
from .metrics import population_spread
from .modeling import PerturbDiffModel
from .objective import sample_sets

__all__ = ["PerturbDiffPipeline", "add_parser"]

# How far each predicted cell's change from its control cell is moved toward the anchor's (the training
# means' rule, `perturbdiff.baselines.Anchor`; `anchor_cells`): 0 keeps the network's (docs/benchmarks.md).
ANCHOR_WEIGHT = 0.6

# With --allow-missing-genes at least this fraction of the model's genes must be in the data:
# a prediction from mostly zero-filled inputs is not a prediction.
MIN_GENE_FRACTION = 0.5


# --------------------------------------------------------------------------- input checks
def _resolve_key(obs: pd.DataFrame, given: str | None, default: str, flag: str) -> str | None:
    """An explicitly given obs key must exist; the default is used only when present."""
    if given is not None:
        if given not in obs.columns:
            raise ValueError(f"{flag} {given!r} is not an obs column of the control data (columns: {list(obs.columns)})")
        return given
    return default if default in obs.columns else None


# --------------------------------------------------------------------------- the pipeline
class PerturbDiffPipeline:
    """Predicts perturbed cell populations from control cells with a trained PerturbDiff model.

    Args:
        model: a :class:`~perturbdiff.PerturbDiffModel` (set to eval mode and moved to ``device``).
        diffusion: the noise schedule (default: the one in the model's config).
        device: ``"auto"`` (CUDA when available, else CPU) or a torch device.
    """

    def __init__(self, model: PerturbDiffModel, diffusion: GaussianDiffusion | None = None, device="auto",
                 response_stats: dict | None = None):
        if device == "auto" or device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.diffusion = diffusion or GaussianDiffusion.from_config(self.config)
        self.source = getattr(model, "name_or_path", "") or ""
        # the training means (model space) behind the anchor; None: predictions are the network's alone
        self.anchor = (Anchor(response_stats, self.config.control_label or "control")
                       if response_stats is not None else None)
        # the training replicates' measured deviations (hidden covariates): what K populations draw
        self.populations = response_stats.get("populations") if response_stats is not None else None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device="auto") -> "PerturbDiffPipeline":
        """Load a saved model folder (``config.json`` + ``model.safetensors``)."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a PerturbDiff model folder (no config.json)")
        pipe = cls(PerturbDiffModel.from_pretrained(folder), device=device, response_stats=load_stats(folder))
        pipe.source = str(folder)
        return pipe

    @property
    def norm(self) -> Normalization:
        return self.config.norm

    # ------------------------------------------------------------------ predict
    def predict(
        self,
        control,
        conditions: pd.DataFrame | Sequence[Mapping] | str | os.PathLike | None = None,
        *,
        perturbation=None,
        context=None,
        batch=None,
        dose=None,
        perturbation_features: Mapping[str, Sequence[float]] | pd.DataFrame | None = None,
        perturbation_key: str | None = None,
        context_key: str | None = None,
        batch_key: str | None = None,
        control_label: str | None = None,
        gene_key: str | None = None,
        layer: str | None = None,
        input_space: str = "auto",
        allow_missing_genes: bool = False,
        cells_per_condition: int | None = None,
        set_size: int | None = None,
        num_populations: int = 1,
        num_steps: int = 100,
        guidance_scale: float = 0.0,
        eta: float = 0.0,
        seed: int = 0,
        batch_sets: int = 8,
        integer_counts: bool = True,
        anchor_weight: float = ANCHOR_WEIGHT,
        progress: bool = True,
    ):
        """Predict perturbed cells for each condition; returns an AnnData in the model's gene order.

        Args:
            control: AnnData of control cells (raw counts or log1p-normalised); may be a mixed
                screen, of which the cells with ``obs[perturbation_key] == control_label`` are used.
            conditions: a table (DataFrame, list of dicts or CSV/TSV path) with columns
                perturbation, context[, batch][, dose]; or pass ``perturbation`` / ``context`` /
                ``batch`` / ``dose`` (names or lists: every combination is predicted).
            perturbation_features: feature vector per perturbation name (mapping or DataFrame
                indexed by name) for models with ``perturbation_feature_dim``; a perturbation the
                model does not know is predicted from its features with the null perturbation id.
            perturbation_key, context_key, batch_key: obs columns of ``control`` (default
                "perturbation", "context", "batch" when present). Without a perturbation column
                every cell is a control; without a context column all cells serve every context.
            control_label: the control value of the perturbation column (default: the model's).
            gene_key: var column with gene names (default ``var_names``); ``layer``: use a layer.
            input_space: ``"auto"``, ``"counts"`` or ``"log1p"`` (checked against the data).
            allow_missing_genes: fill model genes absent from ``control`` with zeros (at least
                half of the model's genes must be present).
            cells_per_condition: predicted cells per condition and population (default: as many
                as control cells for the condition); a ``num_cells`` column of the table sets it per row.
            set_size: cells per set m (the last set is padded by resampling, then trimmed); default:
                the set size the model was trained with (``config.set_size``), else 256.
            num_populations: K populations per condition (``obs["population"]``). For a model trained
                with hidden covariates whose folder has the replicates' measured deviations
                (`perturbdiff.baselines.population_offsets`), population k is the sampler's k-th draw
                moved by one draw of them (the perturbation's own when it has two or more, else any;
                centred over the K), so the K populations differ about as much as the training
                replicates did; otherwise they are the sampler's K independent draws alone (whose
                spread was measured uncalibrated: docs/benchmarks.md).
            num_steps, guidance_scale, eta: DDIM sampling settings.
            seed: sampling seed; each condition's draws depend only on the seed and the
                condition, not on the other rows of the table.
            batch_sets: sets per forward pass.
            integer_counts: put each predicted cell on the count lattice of its control cell's library
                size (`perturbdiff.expression.decode_counts`: integer counts in ``layers["counts"]``,
                X their normalisation), as a sequencer would report it; False keeps the model's
                continuous values (values between zero and one count's worth, which no sequenced
                cell has).
            anchor_weight: move each predicted cell's change from its paired control cell this
                far toward the anchor's change, the mean response the training means give by
                `perturbdiff.baselines.Anchor` (`anchor_cells`; the populations keep their
                differences): 0 keeps the network's cells, 1 gives control cells + the anchor's
                response. Needs the model folder's ``response_stats.safetensors`` (written by the
                trainer); without it the network's cells are kept and ``uns`` says so.
        """
        import anndata as ad
        from tqdm.auto import tqdm

        cfg, norm = self.config, self.norm
        if set_size is None:
            set_size = cfg.set_size or 256
        for name, value in (("set_size", set_size), ("num_populations", num_populations), ("batch_sets", batch_sets)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if cells_per_condition is not None and int(cells_per_condition) < 1:
            raise ValueError(f"cells_per_condition must be >= 1, got {cells_per_condition}")
        self.diffusion.timesteps(num_steps)  # validates num_steps before any work
        if not 0.0 <= float(anchor_weight) <= 1.0:
            raise ValueError(f"anchor_weight must be in [0, 1], got {anchor_weight}")
        anchor = self.anchor if float(anchor_weight) > 0 else None

        conds = self._resolve_conditions(conditions, perturbation, context, batch, dose)
        ids, features = self._encode_conditions(conds, perturbation_features)
        decode = bool(integer_counts) and norm.target_sum is not None and norm.log1p
        pool, info = self._control_pool(
            control, perturbation_key=perturbation_key, context_key=context_key, batch_key=batch_key,
            control_label=control_label, gene_key=gene_key, layer=layer, input_space=input_space,
            allow_missing_genes=allow_missing_genes, library_sizes=decode,
        )
        members, sources = self._match_controls(conds, pool)
        if decode and pool["library"] is None:
            raise ValueError("integer_counts=True needs each control cell's library size, and the log1p input's "
                             "counts could not be recovered (it is not log1p of integer counts); pass raw counts, "
                             "or integer_counts=False (--no-integer-counts)")

        G, K = cfg.num_genes, int(num_populations)
        blocks, obs_blocks, table, own_blocks, count_blocks, spread_sd = [], [], [], [], [], []
        # the input's own space is written beside the model's when the model's space is log1p-normalised
        own_space = None
        if norm.target_sum is not None and norm.log1p:
            own_space = (("counts: integer counts at the library size of the cell's control cell" if decode else
                          "counts: expm1(X) / target_sum x the total count of the cell's control cell (expected "
                          "counts at that library size, not integers)") if info["input_space"] == "counts" else
                         "log1p: log1p(expm1(X) / target_sum x the expm1 total of the cell's control cell), the "
                         "normalisation of the input")
        ceiling = norm.max_value
        num_clipped = 0
        counts = [int(c.num_cells or cells_per_condition or len(members[i])) for i, c in enumerate(conds.itertuples())]
        # the bar counts sets, so it moves within a condition too
        bar = tqdm(total=sum(K * math.ceil(n / min(int(set_size), n)) for n in counts), desc="predicting", unit="set",
                   disable=not progress)
        for i, cond in enumerate(conds.itertuples(index=False)):
            n_cells = counts[i]
            m = min(int(set_size), n_cells)
            key = (cond.perturbation, cond.context, cond.batch, cond.dose)
            rngs = condition_rngs(seed, key)
            values, used = self._sample_condition(
                pool["X"], members[i], rngs, n_cells=n_cells, set_size=m,
                num_populations=K, batch_sets=int(batch_sets), ids={k: v[i] for k, v in ids.items()},
                features=features[i], num_steps=num_steps, eta=eta, guidance_scale=guidance_scale, bar=bar,
            )
            anchored = False
            if anchor is not None:
                effect = anchor.effect(cond.perturbation, cond.context)
                if effect is not None:
                    values = anchor_cells(values, pool["X"][used], effect, float(anchor_weight))
                    anchored = True
            offsets_from = ""
            if K > 1 and self.populations is not None:
                values, offsets_from = self._draw_populations(values, cond.perturbation, rngs[0])
            values = values.reshape(K * n_cells, G) * norm.scale  # back to log1p(counts / total * target_sum)
            if ceiling is not None:  # no cell can exceed "all its counts in one gene"
                num_clipped += int((values > ceiling).sum())
                np.minimum(values, ceiling, out=values)
            if decode:  # integer counts at each cell's control library size, normalised again
                cell_counts, values = decode_counts(values, pool["library"][used.ravel()], norm.target_sum, rngs[0],
                                                    outside=pool["outside"][used.ravel()])
                count_blocks.append(cell_counts)
            blocks.append(values)
            spread_sd.append(population_spread(values.reshape(K, n_cells, G)))
            if own_space is not None and decode and info["input_space"] == "counts":
                own_blocks.append(cell_counts)
            elif own_space is not None:  # the input's own space, at the library size of each cell's control cell
                own = np.expm1(values) * (pool["totals"][used.ravel()] / norm.target_sum)[:, None]
                own_blocks.append((np.log1p(own) if info["input_space"] == "log1p" else own).astype(np.float32))
            obs_blocks.append(pd.DataFrame({
                "perturbation": cond.perturbation, "context": cond.context, "batch": cond.batch,
                "dose": cond.dose, "population": np.repeat(np.arange(K), n_cells),
            }, index=[f"c{i}_p{k}_{j}" for k in range(K) for j in range(n_cells)]))
            table.append(dict(perturbation=cond.perturbation, context=cond.context, batch=cond.batch,
                              dose=cond.dose, num_control_cells=len(members[i]), control_source=sources[i],
                              num_cells=n_cells, set_size=m, num_sets=math.ceil(n_cells / m),
                              population_spread=spread_sd[-1][1], population_noise=spread_sd[-1][2],
                              anchored=anchored, population_offsets=offsets_from))

        bar.close()
        obs = pd.concat(obs_blocks)
        for col in ("perturbation", "context", "batch"):
            obs[col] = pd.Categorical(obs[col])
        obs["population"] = obs["population"].astype(np.int64)
        var = pd.DataFrame(index=pd.Index(cfg.gene_names or [f"gene{g}" for g in range(G)], name="gene"))
        if info["missing_genes"]:
            var["missing_in_control"] = info["missing_mask"]
        varm = {}
        if K > 1:  # per gene and condition: the sd of the K population means (columns: uns conditions order)
            varm["population_sd"] = np.stack([sd for sd, _, _ in spread_sd], axis=1).astype(np.float32)
        conditions_table = pd.DataFrame(table)
        for col in ("perturbation", "context", "batch", "control_source"):
            conditions_table[col] = pd.Categorical(conditions_table[col])
        uns = {"perturbdiff": {
            "expression": norm.describe(),
            "target_sum": float(norm.target_sum) if norm.target_sum is not None else -1.0,
            "log1p": bool(norm.log1p),
            "model_scale": float(norm.scale),
            "note": f"X = model output x {norm.scale:g} (the model works in this space / {norm.scale:g})",
            "model": self.source,
            "num_steps": int(num_steps), "guidance_scale": float(guidance_scale), "eta": float(eta),
            "seed": int(seed), "set_size": int(set_size), "num_populations": K,
            "cells_per_condition": int(cells_per_condition) if cells_per_condition else 0,
            "input_space": info["input_space"], "input_target_sum": info["input_target_sum"],
            "num_missing_genes": int(info["missing_genes"]), "num_dropped_empty_cells": int(info["dropped"]),
            "num_clipped_values": num_clipped,
            "integer_counts": decode,
            "anchor_weight": float(anchor_weight) if anchor is not None else 0.0,
            "anchor": (f"each cell's change from its control cell moved {float(anchor_weight):g} of the way to the "
                       "anchor's (perturbdiff.baselines.Anchor, pipeline.anchor_cells; conditions table: anchored)" if anchor is not None else
                       "none: the network's response" + ("" if self.anchor is not None or not float(anchor_weight)
                                                          else f" (the model folder has no {STATS_FILE})")),
            "populations": ("one population" if K == 1 else
                            "the sampler's draws, each population moved by one draw of the training replicates' "
                            "deviations over hidden " + "+".join(self.populations["hidden"]) + " (between-replicate "
                            "variance, sampling noise removed; perturbdiff.baselines.population_offsets; conditions "
                            "table: population_offsets)" if self.populations is not None else
                            "the sampler's independent draws (not calibrated; no replicate deviations in the model "
                            "folder: " + ("no condition had two or more training replicates)" if self.config.hidden_covariates
                                          else "a model trained without hidden covariates)")),
            # perturbations without training cells (held out, or outside the vocabulary)
            "unseen_perturbations": sorted({str(p) for p in conds["perturbation"]}
                                           - set(cfg.trained_perturbations if cfg.trained_perturbations is not None
                                                 else cfg.perturbation_names)),
            "conditions": conditions_table,
        }}
        X = np.concatenate(blocks).astype(np.float32, copy=False)
        layers = {}
        if own_space is not None:
            layers["input_space"] = np.concatenate(own_blocks)
            uns["perturbdiff"]["input_space_layer"] = own_space
        if decode:
            layers["counts"] = np.concatenate(count_blocks)
        return ad.AnnData(X=X, obs=obs, var=var, uns=uns, layers=layers, varm=varm)

    def _draw_populations(self, values: np.ndarray, perturbation, rng) -> tuple[np.ndarray, str]:
        """The K populations' differences made the training replicates': each population's departure
        from the mean of the K is shrunk, per gene, to what the sampling noise of its n cells explains
        (the sampler's own population spread, measured uncalibrated, goes; a sample's noise stays),
        then moved by one draw of the replicates' deviations (the perturbation's own when it has two
        or more, else all; centred over the K, so the condition's mean stays). Every cell of a
        population moves alike (a move is at most a drawn deviation: nothing is amplified); clipped
        at 0, which can take a little off a negative move of a gene near zero."""
        pops = self.populations
        names = np.asarray(pops["perturbations"], dtype=object)
        own = np.flatnonzero(names == str(perturbation))
        pick = own if len(own) >= 2 else np.arange(len(names))
        drawn = pops["offsets"][rng.choice(pick, size=len(values), replace=True)].astype(np.float64)  # [K, G]
        means = values.mean(1, dtype=np.float64)  # [K, G]
        departure = means - means.mean(0)
        observed = departure.var(0, ddof=1)
        noise = values.var(1, ddof=1, dtype=np.float64).mean(0) / values.shape[1] if values.shape[1] > 1 else observed
        keep = np.sqrt(np.clip(np.divide(noise, observed, out=np.ones_like(observed), where=observed > 0), 0, 1))
        move = drawn - drawn.mean(0) - departure * (1 - keep)  # [K, G]: what each population's mean moves by
        out = values + move[:, None, :].astype(np.float32)
        source = f"{perturbation} ({len(own)})" if len(own) >= 2 else f"all ({len(names)})"
        return np.maximum(out, 0, out=out), source

    def _sample_condition(self, pool_X, cells, rngs, *, n_cells, set_size, num_populations, batch_sets, ids,
                          features, num_steps, eta, guidance_scale, bar=None) -> tuple[np.ndarray, np.ndarray]:
        """K populations of ``n_cells`` predicted cells [K, n_cells, G] (model space) for one condition,
        and for each predicted cell the pool index of the control cell at its position [K, n_cells]
        (its paired control cell, for a ``paired_control`` model)."""
        rng, gen = rngs
        m, K, G = set_size, num_populations, pool_X.shape[1]
        n_sets = math.ceil(n_cells / m)
        idx = np.stack([draw_cells(rng, cells, n_cells, n_sets * m) for _ in range(K)]).reshape(K * n_sets, m)
        shared = None
        if self.diffusion.set_noise > 0:  # one population's sets start from one draw of the per-set noise
            shared = torch.randn((K, 1, G), generator=gen, device=gen.device).repeat_interleave(n_sets, dim=0)
        preds = []
        for start in range(0, K * n_sets, batch_sets):
            chunk = torch.from_numpy(pool_X[idx[start : start + batch_sets]])  # [b, m, G] control sets
            b = chunk.shape[0]
            pred = sample_sets(
                self.model, self.diffusion, control=chunk,
                perturbation=ids["perturbation"].expand(b), context=ids["context"].expand(b),
                batch=ids["batch"].expand(b), dose=None if ids["dose"] is None else ids["dose"].expand(b),
                perturbation_features=None if features is None else features.expand(b, -1),
                num_steps=num_steps, eta=eta, guidance_scale=guidance_scale, generator=gen,
                shared_noise=None if shared is None else shared[start : start + b],
            )  # [b, m, G]
            preds.append(pred.float().cpu())
            if bar is not None:
                bar.update(b)
        cells_used = idx.reshape(K, n_sets * m)[:, :n_cells]
        return torch.cat(preds).view(K, n_sets * m, G)[:, :n_cells].numpy(), cells_used  # padding trimmed

    # ------------------------------------------------------------------ conditions -> ids
    def _resolve_conditions(self, conditions, perturbation, context, batch, dose) -> pd.DataFrame:
        flags = any(v is not None for v in (perturbation, context, batch, dose))
        if conditions is not None and flags:
            raise ValueError("give either a conditions table or perturbation/context/batch/dose, not both")
        if conditions is None:
            return make_conditions(perturbation, context, batch, dose)
        if isinstance(conditions, (str, os.PathLike)):
            return read_conditions(conditions)
        return clean_conditions(pd.DataFrame(conditions))

    def _encode_conditions(self, conds: pd.DataFrame, features) -> tuple[dict, list]:
        cfg = self.config
        F = cfg.perturbation_feature_dim
        if features is not None and not F:
            raise ValueError("perturbation features given but the model takes none (perturbation_feature_dim = 0)")
        names = list(dict.fromkeys(conds["perturbation"]))
        feats = self._features(names, features) if F else {}
        known = set(cfg.perturbation_names)
        unknown = sorted({p for p in names if p not in known and p not in feats})
        if unknown:
            shown = ", ".join(cfg.perturbation_names[:20]) + (" ..." if len(known) > 20 else "")
            raise ValueError(
                f"unknown perturbation(s) {unknown[:10]} and no features for them "
                f"(the model knows {len(known)}: {shown})"
            )
        pert_ids = torch.tensor([int(cfg.encode("perturbation", [p])[0]) if p in known else NULL_ID
                                 for p in conds["perturbation"]], dtype=torch.long)
        hidden = set(cfg.hidden_covariates)
        ids = {
            "perturbation": pert_ids,
            "context": cfg.encode("context", conds["context"].tolist()) if "context" not in hidden else None,
            # a model trained on one batch was conditioned on it: an unset batch means that one
            "batch": cfg.encode("batch", [b if b is not None or len(cfg.batch_names) != 1 else cfg.batch_names[0]
                                          for b in conds["batch"]]) if "batch" not in hidden else None,
        }
        for name in hidden:  # never given to the model: its value only picks the control cells
            ids[name] = torch.full((len(conds),), NULL_ID, dtype=torch.long)
        doses = conds["dose"].to_numpy()
        if not cfg.use_dose and np.isfinite(doses).any():
            raise ValueError("doses given but the model was built without doses (use_dose=False)")
        # The atlas stores dose 0 for data without doses, so an unset dose is 0 for a dose model.
        ids["dose"] = [torch.tensor([0.0 if not np.isfinite(d) else float(d)]) if cfg.use_dose else None for d in doses]
        if np.isfinite(doses).any() and (doses[np.isfinite(doses)] < 0).any():
            raise ValueError("doses must be >= 0")
        feature_list = [torch.from_numpy(feats[p])[None] if p in feats else None for p in conds["perturbation"]]
        return ids, feature_list

    def _features(self, names: list, features) -> dict:
        """Feature vectors of ``names``: the model's own rows for its vocabulary, the given table for
        the others; a table that disagrees with the model's rows is an error."""
        from .features import as_table

        cfg = self.config
        stored = self.model.covariate_embedder.feature_table.detach().float().cpu().numpy()
        own = {n: stored[i] for i, n in enumerate(cfg.perturbation_names, start=1) if n != cfg.control_label}
        need = [n for n in names if n not in own]
        if need and features is None:
            raise ValueError(f"the model knows perturbations by their features and has none for {need[:10]}: give "
                             "a feature table with rows for them (--perturbation-features)")
        if features is None:
            return {n: own[n] for n in names}
        table = as_table(features, cfg.perturbation_feature_dim)
        shared = [n for n in table.index if n in own]
        diff = [n for n in shared if not np.allclose(table.loc[n].to_numpy(), own[n], rtol=1e-4, atol=1e-5)]
        if diff:
            raise ValueError(f"the perturbation features differ from the rows the model was trained with "
                             f"for {len(diff)} of {len(shared)} perturbations (e.g. {diff[:5]}): a table "
                             "from another source, version or run; use the training table")
        given = feature_table(table, cfg.perturbation_feature_dim, need) if need else {}
        return {**{n: own[n] for n in names if n in own}, **given}

    # ------------------------------------------------------------------ control cells
    def _control_pool(self, control, *, perturbation_key, context_key, batch_key, control_label, gene_key,
                      layer, input_space, allow_missing_genes, library_sizes=False) -> tuple[dict, dict]:
        """Select, gene-map and normalise the control cells: X [n, G] in the model's space."""
        cfg, norm = self.config, self.norm
        if not hasattr(control, "obs") or not hasattr(control, "var"):
            raise ValueError(f"control must be an AnnData, got {type(control).__name__}")
        obs = control.obs
        pkey = _resolve_key(obs, perturbation_key, "perturbation", "perturbation_key")
        ckey = _resolve_key(obs, context_key, "context", "context_key")
        bkey = _resolve_key(obs, batch_key, "batch", "batch_key")
        label = control_label if control_label is not None else (cfg.control_label or "control")
        if pkey is None:
            rows = np.arange(control.n_obs)
        else:
            labels = obs[pkey].astype(str).to_numpy()
            rows = np.flatnonzero(labels == label)
            if rows.size == 0:
                values = pd.unique(labels)
                raise ValueError(
                    f"no control cells: obs[{pkey!r}] has no {label!r} (values: {list(values[:10])}"
                    + (" ..." if len(values) > 10 else "") + "); set control_label / --control-label"
                )

        # Genes: the model's vocabulary, looked up by name in the control data.
        if gene_key is not None and gene_key not in control.var.columns:
            raise ValueError(f"gene_key {gene_key!r} is not a var column (columns: {list(control.var.columns)})")
        names = (control.var[gene_key] if gene_key is not None else control.var_names).astype(str)
        model_genes = cfg.gene_names or []
        if not model_genes:
            raise ValueError("the model has no gene_names: cannot map the control data's genes")
        cols = gene_columns(names, model_genes, what="the control data")
        present = cols >= 0
        n_shared, G = int(present.sum()), len(model_genes)
        if n_shared < G:
            missing = [g for g, ok in zip(model_genes, present) if not ok]
            msg = (f"{n_shared} of the model's {G} genes are in the control data ({len(names)} genes); "
                   f"{G - n_shared} missing (e.g. {missing[:5]})")
            hint = _better_gene_column(control.var, model_genes, n_shared) if gene_key is None else None
            if hint:
                msg += f"; var column {hint!r} matches more: pass gene_key={hint!r} (--gene-key {hint})"
            if not allow_missing_genes:
                raise ValueError(msg + "; pass allow_missing_genes=True (--allow-missing-genes) to fill them with zeros")
            if n_shared < MIN_GENE_FRACTION * G:
                raise ValueError(msg + f"; too few to predict from (at least {MIN_GENE_FRACTION:.0%} must match)")
            warnings.warn(msg + "; filling them with zeros", stacklevel=3)

        # Expression of the selected cells: all genes (for the totals), then the model's genes.
        if layer is not None and layer not in control.layers:
            raise ValueError(f"layer {layer!r} not in the control data (layers: {list(control.layers.keys())})")
        X = control.layers[layer] if layer is not None else control.X
        if X is None:
            raise ValueError("the control AnnData has no expression matrix (X is None)")
        X = X[rows]
        X = X.tocsr() if sp.issparse(X) else np.asarray(X)
        space = detect_input_space(X, input_space)
        # the training data's space: each cell normalised over all genes of the control data
        pool_X, totals = to_model_space(X, cols, space, norm)
        keep = totals > 0
        dropped = int((~keep).sum())
        if dropped:
            warnings.warn(f"dropping {dropped} control cells with no expression", stacklevel=3)
        if not keep.any():
            raise ValueError("every selected control cell has zero expression")
        rows, pool_X, totals = rows[keep], pool_X[keep], totals[keep]
        # with library_sizes (integer counts; the model's space is log1p of total-normalised counts):
        # each control cell's total count (for log1p input, that of its recovered counts; None when
        # they cannot be recovered) and its counts in genes the model does not predict
        library = outside = None
        if library_sizes:
            library = totals
            if space == "log1p":
                recovered, non_integral = log1p_to_counts(sp.csr_matrix(X, dtype=np.float32)[np.flatnonzero(keep)])
                library = None if non_integral else np.asarray(recovered.sum(1), dtype=np.float64).ravel()
            if library is not None:
                inside = np.expm1(pool_X.astype(np.float64) * norm.scale).sum(1) * library / norm.target_sum
                outside = np.maximum(library - inside, 0.0)
        median = float(np.median(totals))
        # log1p input normalised to one total T says so by its expm1 totals; counts have none
        constant = space == "log1p" and (totals.max() - totals.min()) <= 1e-2 * median
        input_target_sum = median if constant else -1.0
        pool = {
            "X": pool_X,
            "totals": totals,  # each control cell's total in the input's own space (counts, or expm1 of log1p)
            "library": library,  # each control cell's total count (None: not asked for, or not recoverable)
            "outside": outside,  # its counts in genes the model does not predict
            "context": obs[ckey].astype(str).to_numpy()[rows] if ckey else None,
            "batch": obs[bkey].astype(str).to_numpy()[rows] if bkey else None,
            "context_key": ckey,
        }
        info = {"input_space": space, "input_target_sum": input_target_sum, "missing_genes": G - n_shared,
                "missing_mask": ~present, "dropped": dropped}
        return pool, info

    def _match_controls(self, conds: pd.DataFrame, pool: dict) -> tuple[list[np.ndarray], list[str]]:
        """Control cells per condition: same context and batch, else same context (warned)."""
        n = pool["X"].shape[0]
        members, sources, empty, fallback = [], [], [], []
        if pool["context"] is None and conds["context"].nunique() > 1:
            warnings.warn("the control data has no context column: all control cells serve every context",
                          stacklevel=3)
        for cond in conds.itertuples(index=False):
            ctx_mask = np.ones(n, bool) if pool["context"] is None else pool["context"] == cond.context
            source = "all" if pool["context"] is None else "context"
            mask = ctx_mask
            if cond.batch is not None and pool["batch"] is not None:
                both = ctx_mask & (pool["batch"] == cond.batch)
                if both.any():
                    mask, source = both, source + "+batch"
                elif ctx_mask.any():
                    fallback.append((cond.context, cond.batch))
            if not mask.any():
                empty.append(cond.context)
            members.append(np.flatnonzero(mask))
            sources.append(source)
        if empty:
            have = sorted(pd.unique(pool["context"])) if pool["context"] is not None else []
            raise ValueError(
                f"no control cells for context(s) {sorted(set(empty))[:10]} in obs[{pool['context_key']!r}] "
                f"(contexts with control cells: {have[:20]})"
            )
        if fallback:
            warnings.warn(f"no control cells for (context, batch) {sorted(set(fallback))[:5]}: using the context's "
                          "control cells from all batches", stacklevel=3)
        return members, sources


# --------------------------------------------------------------------------- helpers
def anchor_cells(values: np.ndarray, controls: np.ndarray, effect: np.ndarray, weight: float) -> np.ndarray:
    """Each predicted cell's change from its paired control cell, moved ``weight`` of the way toward
    the anchor's change: ``(1 − w)·cell + w·(control + effect)``, plus w times its population's
    departure from the mean of the populations (so the K populations differ as the network's do),
    clipped at 0.

    Args:
        values: predicted cells [K, n, G] (model space); controls: each one's control cell [K, n, G];
        effect: the anchor's mean response [G] (model space); weight: w in [0, 1].
    """
    w = np.float32(weight)
    out = (1 - w) * values + w * (controls + effect.astype(np.float32))
    if len(values) > 1:
        pops = values.mean(1, keepdims=True, dtype=np.float64)  # [K, 1, G]
        out += (w * (pops - pops.mean(0, keepdims=True))).astype(np.float32)
    return np.maximum(out, 0, out=out)


def _better_gene_column(var: pd.DataFrame, model_genes: Sequence[str], n_shared: int) -> str | None:
    genes = set(model_genes)
    best, best_n = None, n_shared
    for col in var.columns:
        if var[col].dtype == object or isinstance(var[col].dtype, pd.CategoricalDtype):
            n = int(var[col].astype(str).isin(genes).sum())
            if n > best_n:
                best, best_n = col, n
    return best


# --------------------------------------------------------------------------- command line
def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        formatter_class=ShowDefaults,
        help="predict perturbed cells from control cells with a trained model",
        description="Predict perturbed cell populations for conditions (perturbation, context, batch, dose) "
        "from control cells; writes an AnnData of log1p-normalised predictions in the model's gene order.",
    )
    p.add_argument("model", help="model folder (config.json + model.safetensors)")
    p.add_argument("--control", required=True, help="control cells (.h5ad; counts or log1p-normalised)")
    p.add_argument("--out", required=True, help="output .h5ad")
    g = p.add_argument_group("conditions (a table, or flags whose combinations are all predicted)")
    g.add_argument("--conditions", help="CSV/TSV with columns perturbation, context[, batch][, dose][, num_cells]")
    g.add_argument("--perturbation", nargs="+")
    g.add_argument("--context", nargs="+")
    g.add_argument("--batch", nargs="+")
    g.add_argument("--dose", nargs="+", type=float)
    g.add_argument("--perturbation-features", help="CSV/TSV: perturbation name, then one column per feature")
    c = p.add_argument_group("control data")
    c.add_argument("--perturbation-key", help="obs column with perturbations (default 'perturbation' if present; "
                   "without it every cell is a control)")
    c.add_argument("--control-label", help="control value of --perturbation-key (default: the model's)")
    c.add_argument("--context-key", help="obs column with the context (default 'context' if present)")
    c.add_argument("--batch-key", help="obs column with the batch (default 'batch' if present)")
    c.add_argument("--gene-key", help="var column with gene names (default var_names)")
    c.add_argument("--layer", help="use this layer instead of X")
    c.add_argument("--input-space", choices=INPUT_SPACES, default="auto", help="what X holds (auto: detected and checked)")
    c.add_argument("--allow-missing-genes", action="store_true", help="fill model genes absent from the data with zeros")
    s = p.add_argument_group("sampling")
    s.add_argument("--cells-per-condition", type=int, help="default: the number of control cells for the condition")
    s.add_argument("--set-size", type=int, help="cells per set (default: the set size the model was trained with, else 256)")
    s.add_argument("--num-populations", type=int, default=1, help="independent populations per condition")
    s.add_argument("--steps", type=int, default=100, help="DDIM steps")
    s.add_argument("--guidance-scale", type=float, default=0.0, help="classifier-free guidance w")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic given the seed)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--batch-sets", type=int, default=8, help="sets per forward pass")
    s.add_argument("--anchor-weight", type=float, default=ANCHOR_WEIGHT,
                   help="move each predicted cell's change from its control cell this far toward the anchor's "
                   "(the training means' rule; 0: the network's alone)")
    s.add_argument("--no-integer-counts", dest="integer_counts", action="store_false",
                   help="keep the model's continuous values instead of integer counts at each cell's control "
                   "library size (layers['counts'])")
    s.add_argument("--device", default="auto")
    s.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.conditions and any(v is not None for v in (args.perturbation, args.context, args.batch, args.dose)):
        raise ValueError("give either --conditions or --perturbation/--context/--batch/--dose, not both")
    if not args.conditions and (args.perturbation is None or args.context is None):
        raise ValueError("give --conditions TABLE or both --perturbation and --context")
    conditions = read_conditions(args.conditions) if args.conditions else None
    features = read_table(args.perturbation_features) if args.perturbation_features else None
    pipe = PerturbDiffPipeline.from_pretrained(args.model, device=args.device)
    control = read_h5ad(args.control, "--control")
    pred = pipe.predict(
        control, conditions, perturbation=args.perturbation, context=args.context, batch=args.batch,
        dose=args.dose, perturbation_features=features, perturbation_key=args.perturbation_key,
        context_key=args.context_key, batch_key=args.batch_key, control_label=args.control_label,
        gene_key=args.gene_key, layer=args.layer, input_space=args.input_space,
        allow_missing_genes=args.allow_missing_genes, cells_per_condition=args.cells_per_condition,
        set_size=args.set_size, num_populations=args.num_populations, num_steps=args.steps,
        guidance_scale=args.guidance_scale, eta=args.eta, seed=args.seed, batch_sets=args.batch_sets,
        integer_counts=args.integer_counts, anchor_weight=args.anchor_weight, progress=not args.no_progress,
    )
    atomic_write(args.out, pred.write_h5ad)
    n_cond = len(pred.uns["perturbdiff"]["conditions"])
    print(f"wrote {pred.n_obs} predicted cells x {pred.n_vars} genes ({n_cond} conditions, "
          f"{args.num_populations} population(s) each) to {args.out}")
    return 0
