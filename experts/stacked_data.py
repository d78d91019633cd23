"""The training data of K experts trained together (:mod:`experts.batched`): every expert draws
from its own generator, exactly as :func:`experts.train.draw_training_batch` draws a lone
expert's batch, and the tensor work of a step is done once for all of them.

All the experts' cached latent distributions sit in one stacked table (instance sets expert
after expert, then the class sets; experts with the same class prompt and class images share
one class set). A step draws each expert's random numbers (indices, flips, the latent sample's
noise, the diffusion noise and timesteps) from its generator on the CPU, in the lone run's
order, then gathers, samples and noises all rows at once on the device. Rows are grouped by
expert: ``batch_size`` instance rows, then as many class rows with prior preservation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExpertData:
    """One expert's inputs: cached instance and class latents (:class:`experts.latents.
    TrainingLatents`; ``cls`` ``None`` without prior preservation), its batch-1 conditionings
    and its generator."""

    inst: object
    cls: object | None
    cond_inst: object
    cond_cls: object | None
    generator: torch.Generator


class StackedBatches:
    """Draws the K experts' rows of every step (see the module docstring).

    Args:
        experts: one :class:`ExpertData` per expert, in stack order; all with or all without
            class images.
        batch_size: instance rows per expert (and class rows with prior preservation).
        objective: the training objective (:mod:`suti.objectives`: timesteps, noising, target
            and loss weights, e.g. Min-SNR-gamma).
        vae_config: the VAE's config (``scaling_factor``, ``shift_factor``).
        offset_noise: per-channel noise standard deviation (0: none).
        prior_loss_weight: weight of each expert's class loss.
        device: where the rows go.
    """

    def __init__(self, experts: list[ExpertData], batch_size: int, objective, vae_config, offset_noise: float, prior_loss_weight: float, device: str):
        from suti.conditioning import Conditioning

        self.experts, self.b, self.objective, self.vae_config = experts, batch_size, objective, vae_config
        self.scale, self.shift = vae_config.scaling_factor, getattr(vae_config, "shift_factor", None) or 0.0
        self.offset_noise, self.prior_loss_weight, self.device = offset_noise, prior_loss_weight, device
        self.prior = experts[0].cls is not None
        if any((e.cls is not None) != self.prior for e in experts):
            raise ValueError("experts trained together all use prior preservation or none does")
        self.rows_per_expert = batch_size * (2 if self.prior else 1)
        self.cached = all(t.cached is not None for e in experts for t in (e.inst, e.cls) if t is not None)
        self._stack_tables()
        conds = []
        for e in experts:
            conds += [e.cond_inst] * batch_size + ([e.cond_cls] * batch_size if self.prior else [])
        self.cond = Conditioning.cat(conds).to(device)  # the same every step

    def _stack_tables(self) -> None:
        """One table of every distinct latent set (shared class sets counted once), with each
        expert's offsets into it."""
        tables, where = [], {}
        for t in [e.inst for e in self.experts] + [e.cls for e in self.experts if e.cls is not None]:
            if id(t) not in where:
                where[id(t)] = sum(len(x) for x in tables)
                tables.append(t)
        self.inst_at = torch.tensor([where[id(e.inst)] for e in self.experts])
        self.cls_at = torch.tensor([where[id(e.cls)] for e in self.experts]) if self.prior else None
        self.tables = tables
        if self.cached:
            self.mean = torch.cat([t.cached[0][0] for t in tables])
            self.std = torch.cat([t.cached[0][1] for t in tables])
            self.flipped = (torch.cat([t.cached[1][0] for t in tables]), torch.cat([t.cached[1][1] for t in tables])) if len(tables[0].cached) > 1 else None

    def _draws(self, e: ExpertData) -> tuple:
        """One expert's random numbers, in :func:`experts.train.draw_training_batch`'s order."""
        g, b = e.generator, self.b
        idx = e.inst.draw_indices(b, g)
        flips, crops = e.inst.draw_augmentation(b, g)
        cidx = cflips = ccrops = None
        if e.cls is not None:
            cidx = e.cls.draw_indices(b, g)
            cflips, ccrops = e.cls.draw_augmentation(b, g)
        return idx, flips, crops, cidx, cflips, ccrops

    def _noise(self, e: ExpertData, shape: tuple, dtype: torch.dtype) -> tuple:
        g = e.generator
        eps = torch.randn(shape, generator=g, dtype=dtype)
        noise = torch.randn(shape, generator=g)
        if self.offset_noise:
            noise = noise + self.offset_noise * torch.randn(shape[:2] + (1, 1), generator=g)
        timesteps = self.objective.draw_timesteps(shape[0], g)
        return eps, noise, timesteps

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(noisy, timesteps, target)`` of all K experts' rows, expert after expert: (K*rows,
        C, h, w), (K*rows,), (K*rows, C, h, w)."""
        if not self.cached:
            return self._draw_encoding()
        rows = self.rows_per_expert
        shape = (rows, *self.mean.shape[1:])
        index, flip, eps, noise, timesteps, sizes = [], [], [], [], [], []
        for k, e in enumerate(self.experts):
            idx, flips, _, cidx, cflips, _ = self._draws(e)
            sizes += [e.inst.time_ids(idx, None)] + ([e.cls.time_ids(cidx, None)] if cidx is not None else [])
            index.append(idx + self.inst_at[k])
            flip.append(flips if flips is not None else torch.zeros(0, dtype=torch.bool))
            if cidx is not None:
                index.append(cidx + self.cls_at[k])
                flip.append(cflips if cflips is not None else torch.zeros(0, dtype=torch.bool))
            drawn = self._noise(e, shape, self.mean.dtype)
            eps.append(drawn[0])
            noise.append(drawn[1])
            timesteps.append(drawn[2])
        self._set_time_ids(torch.cat(sizes))
        index = self._to(torch.cat(index), self.mean.device)
        mean, std = self.mean[index], self.std[index]
        if self.flipped is not None:
            m = self._to(torch.cat(flip), mean.device).view(-1, 1, 1, 1)
            mean, std = torch.where(m, self.flipped[0][index], mean), torch.where(m, self.flipped[1][index], std)
        eps = torch.cat(eps)
        if mean.device.type == "cpu":  # as suti.denoisers.latents_from_vae: on the CPU, then moved
            latents = ((mean + std * eps - self.shift) * self.scale).to(self.device)
        else:  # on the accelerator: no copy back to the host (no sync in the step)
            latents = (mean + std * self._to(eps, mean.device) - self.shift) * self.scale
        noise = self._to(torch.cat(noise), self.device)
        timesteps = self._to(torch.cat(timesteps), self.device)
        noisy = self.objective.add_noise(latents, noise, timesteps)
        return noisy, timesteps, self.objective.target(latents, noise, timesteps)

    @staticmethod
    def _to(t: torch.Tensor, device) -> torch.Tensor:
        """A host tensor on ``device``; to CUDA through pinned memory without blocking, so that
        the step queues its copies behind the kernels before it instead of waiting for them."""
        device = torch.device(device)
        if device.type != "cuda":
            return t.to(device)
        return t.pin_memory().to(device, non_blocking=True)

    def _draw_encoding(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random crops: each expert's batch is encoded per step (as a lone run does)."""
        from experts.train import draw_training_batch

        parts, sizes = [], []
        for e in self.experts:
            parts.append(draw_training_batch(e.inst, e.cls, self.b, e.generator, self.objective, self.vae_config, self.offset_noise, self.device))
            sizes += [e.inst.last_time_ids()] + ([e.cls.last_time_ids()] if e.cls is not None else [])
        self._set_time_ids(torch.cat(sizes))
        return tuple(torch.cat(p) for p in zip(*parts))

    def _set_time_ids(self, time_ids: torch.Tensor) -> None:
        """SDXL: the drawn rows' true sizes (K*rows, 6) into ``cond`` (each photo's original size
        and crop, :meth:`experts.latents.TrainingLatents.time_ids`, as a lone expert's rows get
        them); nothing for a model without time ids."""
        added = self.cond.added_cond_kwargs
        if added is not None and "time_ids" in added:
            old = added["time_ids"]
            added["time_ids"] = self._to(time_ids.to(old.dtype), old.device)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(total, per_expert)``: the sum over experts of each one's loss (instance mean plus
        ``prior_loss_weight`` times the class mean), and those K losses (K,), detached."""
        from suti.losses import per_sample_mse

        losses = per_sample_mse(pred, target)
        weights = self.objective.loss_weights(timesteps)
        if weights is not None:
            losses = losses * weights.to(losses.device)
        rows = losses.view(len(self.experts), self.rows_per_expert)
        each = rows[:, : self.b].mean(1)
        if self.prior:
            each = each + self.prior_loss_weight * rows[:, self.b :].mean(1)
        return each.sum(), each.detach()
