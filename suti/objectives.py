"""Training objectives of the denoisers: what a training step draws (timesteps) and how it noises
the clean latents, what the denoiser regresses, and the per-sample loss weights. One class per
kind of noise schedule, chosen by the pipeline's scheduler (:func:`training_objective`):

- :class:`DiffusionObjective`: DDPM-type schedules (SD 1.x/2.x, SDXL; Ho et al. 2020). Integer
  timesteps uniform in ``[0, num_train_timesteps)``, ``x_t = scheduler.add_noise(x, eps, t)``,
  target by the scheduler's ``prediction_type`` (epsilon, v, sample;
  :func:`suti.losses.denoising_target`), optional Min-SNR-gamma weights.
- :class:`FlowMatchingObjective`: rectified flow (FLUX.1, SD3; Esser et al. 2024, section 3), as
  diffusers' ``train_dreambooth_lora_flux.py`` trains it: ``u`` from the weighting scheme's
  density (``compute_density_for_timestep_sampling``), timestep ``scheduler.timesteps[u * N]``, its
  sigma ``s`` from the scheduler's training schedule, ``x_t = (1 - s) x + s eps``, target
  ``eps - x`` and weights ``compute_loss_weighting_for_sd3`` (``none``: no weights).

Both draw only from the ``generator`` they are given, so a run is a function of its seed. Shapes:
latents and noise ``(B, C, h, w)``, timesteps ``(B,)``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from suti.errors import InputError

if TYPE_CHECKING:  # torch is imported where it is used: the command line's parsers import this module
    import torch

#: diffusers' weighting schemes of flow-matching training (``--weighting_scheme``).
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")


class DiffusionObjective:
    """DDPM-type training (epsilon, v or sample prediction) on a copy of ``scheduler``'s config.

    Args:
        scheduler: the pipeline's scheduler (its config is read; a ``DDPMScheduler`` is built).
        snr_gamma: Min-SNR-gamma weights (Hang et al. 2023); ``None``: unweighted.
    """

    kind = "diffusion"

    def __init__(self, scheduler, *, snr_gamma: float | None = None):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler.config)
        self.snr_gamma = snr_gamma
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)

    def timesteps_at(self, index: torch.Tensor) -> torch.Tensor:
        """The timesteps of schedule indices ``index`` (B,) in ``[0, num_train_timesteps)``."""
        return index.long()

    def draw_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` timesteps (long, on the CPU), uniform over the schedule."""
        import torch

        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t`` from clean ``latents`` and ``noise`` at ``timesteps``."""
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The regression target of the scheduler's ``prediction_type``."""
        from suti.losses import denoising_target

        return denoising_target(self.scheduler, latents, noise, timesteps)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights (B,), or ``None`` (unweighted)."""
        if not self.snr_gamma:
            return None
        from suti.losses import snr_weights

        return snr_weights(self.scheduler, timesteps, self.snr_gamma)


class FlowMatchingObjective:
    """Flow-matching training on a copy of a ``FlowMatchEulerDiscreteScheduler``'s training
    schedule (its ``timesteps`` and ``sigmas`` before any ``set_timesteps``).

    Args:
        scheduler: the pipeline's flow-matching scheduler (copied from its config).
        weighting_scheme: one of :data:`WEIGHTING_SCHEMES` (diffusers' ``--weighting_scheme``).
        logit_mean, logit_std: the ``logit_normal`` density's parameters.
        mode_scale: the ``mode`` density's scale.

    Raises:
        InputError: an unknown weighting scheme.
    """

    kind = "flow_matching"

    def __init__(self, scheduler, *, weighting_scheme: str = "none", logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise InputError(f"--weighting-scheme {weighting_scheme!r}: choose one of {', '.join(WEIGHTING_SCHEMES)}")
        self.scheduler = copy.deepcopy(type(scheduler).from_config(scheduler.config))
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self._timesteps = self.scheduler.timesteps.float().cpu()
        self._sigmas = self.scheduler.sigmas.float().cpu()

    def timesteps_at(self, index: torch.Tensor) -> torch.Tensor:
        """The schedule's timesteps (float, in ``(0, num_train_timesteps]``) at ``index`` (B,)."""
        return self._timesteps[index.long().to(self._timesteps.device)].cpu()

    def draw_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` timesteps (float, on the CPU) from the weighting scheme's density."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(weighting_scheme=self.weighting_scheme, batch_size=n, logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std, mode_scale=self.mode_scale, generator=generator)
        index = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.timesteps_at(index)

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The sigma (B,) of each timestep, looked up in the training schedule on the timesteps'
        own device (no copy to the host in a training step)."""
        if self._timesteps.device != timesteps.device:  # the schedule follows the steps' device once
            self._timesteps, self._sigmas = self._timesteps.to(timesteps.device), self._sigmas.to(timesteps.device)
        index = (self._timesteps[None, :] - timesteps.float()[:, None]).abs().argmin(dim=1)
        return self._sigmas[index]

    def _sigma_like(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.sigmas(timesteps).to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - sigma) x + sigma eps``."""
        sigma = self._sigma_like(timesteps, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity ``eps - x``."""
        return noise - latents

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """``compute_loss_weighting_for_sd3`` per sample (B,), or ``None`` for uniform schemes."""
        if self.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.weighting_scheme, self.sigmas(timesteps)).float()


def is_flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` is a flow-matching one (diffusers' ``FlowMatch*`` schedulers)."""
    return type(scheduler).__name__.startswith("FlowMatch")


def training_objective(scheduler, *, snr_gamma: float | None = None, weighting_scheme: str = "none", logit_mean: float = 0.0,
                       logit_std: float = 1.0, mode_scale: float = 1.29):
    """The objective that trains a pipeline whose sampling scheduler is ``scheduler``.

    Raises:
        InputError: ``snr_gamma`` with a flow-matching scheduler (diffusers' flux script has no
            Min-SNR weighting; use ``weighting_scheme``), or a non-default weighting scheme with a
            DDPM-type one.
    """
    flow = is_flow_matching(scheduler)
    training_objective_options(flow, snr_gamma=snr_gamma, weighting_scheme=weighting_scheme)
    if flow:
        return FlowMatchingObjective(scheduler, weighting_scheme=weighting_scheme, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
    return DiffusionObjective(scheduler, snr_gamma=snr_gamma)


def training_objective_options(flow_matching: bool, *, snr_gamma: float | None, weighting_scheme: str) -> None:
    """Refuse the other kind's loss options (see :func:`training_objective`).

    Raises:
        InputError: naming the flag and the kind of model it applies to.
    """
    if flow_matching and snr_gamma:
        raise InputError(f"--snr-gamma {snr_gamma:g} applies to epsilon/v-prediction models; a flow-matching model (FLUX) weights its loss with --weighting-scheme")
    if not flow_matching and weighting_scheme != "none":
        raise InputError(f"--weighting-scheme {weighting_scheme} applies to flow-matching models (FLUX); this model is an epsilon/v-prediction one (use --snr-gamma)")
