"""The Gaussian diffusion over cell sets: noise schedule, noising, samplers and guidance.

No network lives here. Functional diffusion on the kernel mean embedding of a population reduces
(paper, Lemma B.13 / Prop. B.14) to ordinary DDPM noise on every cell of a set with one timestep
per set: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. The model predicts x_0; samplers convert
that to eps where they need it.

*Set noise* (``set_noise`` s > 0): eps = (e + s u) / sqrt(1 + s^2), with e one draw per cell and
gene and u one draw per set and gene, shared by the set's cells (the "offset noise" of image
diffusion, with the set as the image). With independent noise only, a set's mean carries
noise of size 1/sqrt(m) and a sampler barely varies it, so K sampled populations come out alike
however much real populations differ (docs/benchmarks.md); the shared part gives each sampled
set its own random start in its mean, which the model learns to turn into a population-level
deviation where the training data have them.

Timesteps are integers in [0, T-1]; t = T-1 is (almost) pure noise, and stepping "to t = -1"
means reaching the clean sample (abar = 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["make_betas", "GaussianDiffusion", "apply_guidance"]


def make_betas(schedule: str, num_timesteps: int) -> np.ndarray:
    """beta_1..beta_T (float64) for a ``"linear"`` (Ho et al.) or ``"cosine"`` (Nichol & Dhariwal)
    schedule."""
    if schedule == "linear":
        scale = 1000.0 / num_timesteps  # keeps the schedule's shape when T is not 1000
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if schedule == "cosine":
        s = 0.008
        f = lambda t: math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(num_timesteps)], dtype=np.float64)
    raise ValueError(f"unknown beta schedule {schedule!r}; use 'linear' or 'cosine'")


def apply_guidance(x0_cond: torch.Tensor, x0_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance in x_0 space.

    The paper combines noise predictions, eps = (1 + w) eps_cond - w eps_uncond. At fixed (x_t, t)
    eps is affine in x_0 with the same x_t term in both, so this equals
    x_0 = (1 + w) x0_cond - w x0_uncond; ``w = 0`` is the conditional prediction.
    """
    if scale == 0:
        return x0_cond
    return (1 + scale) * x0_cond - scale * x0_uncond


class GaussianDiffusion:
    """DDPM/DDIM diffusion with an x_0-parameterised model.

    Args:
        num_train_timesteps: T, the number of training steps (1000 in the paper).
        beta_schedule: ``"cosine"`` or ``"linear"``.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "cosine", set_noise: float = 0.0):
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if not (np.isfinite(set_noise) and set_noise >= 0):
            raise ValueError(f"set_noise must be a finite number >= 0, got {set_noise}")
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.set_noise = float(set_noise)
        self.betas = make_betas(beta_schedule, num_train_timesteps)
        self.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - self.betas))  # float64 [T]

    @classmethod
    def from_config(cls, config) -> "GaussianDiffusion":
        """The diffusion a :class:`~perturbdiff.PerturbDiffConfig` was trained with."""
        return cls(config.num_train_timesteps, config.beta_schedule, getattr(config, "set_noise", 0.0))

    def noise(self, shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32,
              shared: torch.Tensor | None = None) -> torch.Tensor:
        """Standard-normal noise for sets [B, m, G], with the shared per-set part of ``set_noise``
        (drawn per set, or ``shared`` [B, 1, G] when given: sets given the same rows are one
        population's sets)."""
        gen_device = generator.device if generator is not None else device
        eps = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
        if self.set_noise > 0 and len(shape) == 3:
            if shared is None:
                shared = torch.randn((shape[0], 1, shape[2]), generator=generator, device=gen_device, dtype=torch.float32)
            eps = (eps + self.set_noise * shared.to(eps)) / math.sqrt(1.0 + self.set_noise**2)
        return eps.to(device, dtype)

    # ------------------------------------------------------------------ schedule lookups
    def _abar(self, t, like: torch.Tensor) -> torch.Tensor:
        """abar_t broadcast to ``like`` ([B] timesteps -> [B, 1, 1]); t = -1 gives 1."""
        t = torch.as_tensor(t, device="cpu").long()
        ab = torch.where(t >= 0, self.alphas_cumprod[t.clamp_min(0)], torch.ones((), dtype=torch.float64))
        ab = ab.to(device=like.device, dtype=torch.float32)
        return ab.reshape(ab.shape + (1,) * (like.ndim - ab.ndim))

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """One uniform training timestep per set: LongTensor [n]."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=gen_device)
        return t.to(device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): every cell of set b gets noise level t[b]. x0, noise [B, m, G]; t [B]."""
        ab = self._abar(t, x0)
        return (ab.sqrt() * x0.float() + (1 - ab).sqrt() * noise.float()).to(x0.dtype)

    def eps_from_x0(self, x_t: torch.Tensor, t, x0: torch.Tensor) -> torch.Tensor:
        ab = self._abar(t, x_t)
        return (x_t.float() - ab.sqrt() * x0.float()) / (1 - ab).sqrt()

    def x0_from_eps(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        ab = self._abar(t, x_t)
        return (x_t.float() - (1 - ab).sqrt() * eps.float()) / ab.sqrt()

    def timesteps(self, num_steps: int) -> list[int]:
        """K respaced timesteps, descending, from T-1 (pure noise) to 0."""
        T = self.num_train_timesteps
        if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be an integer in [1, {T}], got {num_steps!r}")
        ts = np.linspace(T - 1, 0, num_steps).round().astype(int)
        return [int(t) for t in ts]

    # ------------------------------------------------------------------ one reverse step
    def ddim_step(self, x_t, t: int, t_prev: int, x0, eta: float = 0.0, noise=None) -> torch.Tensor:
        """x_{t_prev} from x_t and an x_0 estimate (Song et al. 2021); eta=0 is deterministic."""
        ab_t, ab_prev = self._abar(t, x_t), self._abar(t_prev, x_t)
        eps = self.eps_from_x0(x_t, t, x0)
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).clamp_min(0).sqrt()
        out = ab_prev.sqrt() * x0.float() + (1 - ab_prev - sigma**2).clamp_min(0).sqrt() * eps
        if eta > 0 and t_prev >= 0:  # the last step (to t = -1) has sigma = 0
            if noise is None:
                raise ValueError("ddim_step with eta > 0 needs noise")
            out = out + sigma * noise.float()
        return out.to(x_t.dtype)

    def ddpm_step(self, x_t, t: int, t_prev: int, x0, noise=None) -> torch.Tensor:
        """Ancestral step from the posterior q(x_{t_prev} | x_t, x_0) of the (respaced) chain."""
        ab_t, ab_prev = self._abar(t, x_t), self._abar(t_prev, x_t)
        alpha = ab_t / ab_prev  # the respaced chain's alpha for this step
        beta = 1 - alpha
        mean = (ab_prev.sqrt() * beta / (1 - ab_t)) * x0.float() + (alpha.sqrt() * (1 - ab_prev) / (1 - ab_t)) * x_t.float()
        var = beta * (1 - ab_prev) / (1 - ab_t)
        if t_prev >= 0:
            if noise is None:
                raise ValueError("ddpm_step needs noise before the last step")
            mean = mean + var.sqrt() * noise.float()
        return mean.to(x_t.dtype)

    # ------------------------------------------------------------------ the sampling loop
    @torch.no_grad()
    def sample(
        self,
        denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, bool], torch.Tensor],
        shape: tuple[int, ...],
        *,
        num_steps: int = 100,
        sampler: str = "ddim",
        eta: float = 0.0,
        guidance_scale: float = 0.0,
        self_conditioning: bool = True,
        clamp: bool = True,
        clamp_max: torch.Tensor | None = None,
        shared_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        progress: bool = False,
    ) -> torch.Tensor:
        """Generate sets from Gaussian noise at t = T-1 in ``num_steps`` respaced steps.

        Args:
            denoise: ``denoise(x_t, t, self_cond, guided)`` returning ``(x0_cond, x0_uncond)`` when
                ``guided`` is True (``x0_uncond`` may be None) and the conditional x_0 otherwise.
                It hides the network and its conditioning from this module.
            shape: [B, m, G].
            sampler: ``"ddim"`` (eta settable, 0 = deterministic) or ``"ddpm"`` (ancestral).
            guidance_scale: w of classifier-free guidance (0 = conditional only).
            self_conditioning: feed each step's x_0 estimate to the next step.
            clamp: clamp x_0 estimates (and the result) to be non-negative.
            clamp_max: [G] largest value per gene of x_0 estimates (and the result), as DDPM clips
                its estimates to the data range (the model's ``sample_ceiling``); None: no bound.
            shared_noise: [B, 1, G], the per-set part of the starting noise (``set_noise`` > 0):
                sets given the same rows start as one population (the pipeline's populations of
                more cells than one set); later steps' fresh noise (eta > 0) is drawn per set.
        Returns:
            the generated clean sets [B, m, G].
        """
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        if not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}")
        if not (np.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta}")

        def randn():
            return self.noise(shape, generator, device, dtype)

        if clamp_max is not None:
            clamp_max = torch.as_tensor(clamp_max, device=device, dtype=dtype)
        x = self.noise(shape, generator, device, dtype, shared=shared_noise)
        x0_prev = torch.zeros(shape, device=device, dtype=dtype) if self_conditioning else None
        ts = self.timesteps(num_steps)
        steps = range(len(ts))
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="sampling", leave=False)
        for i in steps:
            t, t_prev = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
            tt = torch.full((shape[0],), t, dtype=torch.long, device=device)
            if guidance_scale != 0:
                x0_cond, x0_uncond = denoise(x, tt, x0_prev, True)
                x0 = apply_guidance(x0_cond, x0_uncond, guidance_scale)
            else:
                x0 = denoise(x, tt, x0_prev, False)
            if clamp:
                x0 = x0.clamp_min(0)
            if clamp_max is not None:
                x0 = torch.minimum(x0, clamp_max)
            if self_conditioning:
                x0_prev = x0.to(dtype)
            needs_noise = t_prev >= 0 and (sampler == "ddpm" or eta > 0)
            noise = randn() if needs_noise else None
            if sampler == "ddim":
                x = self.ddim_step(x, t, t_prev, x0, eta=eta, noise=noise)
            else:
                x = self.ddpm_step(x, t, t_prev, x0, noise=noise)
        x = x.clamp_min(0) if clamp else x
        return x if clamp_max is None else torch.minimum(x, clamp_max)
