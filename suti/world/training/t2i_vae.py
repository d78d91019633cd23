"""The autoencoder stages of the toy text-to-image model's training
(:mod:`suti.world.training.t2i`): train the VAE from scratch, measure its latent scale, or
fine-tune only its decoder (the latent space stays).

Pixels are ``(B, 3, 32, 32)`` in [-1, 1] from a :class:`~suti.world.training.scenes.SceneStream`;
latents ``(B, 4, 16, 16)``. PSNR is in dB over that [-1, 1] range.
"""

from __future__ import annotations

import logging
import math

from suti.world.toy_t2i import new_models
from suti.world.training.scenes import SceneStream
from suti.world.training.schedule import Clock, set_lr, step_warmup_cosine

log = logging.getLogger(__name__)


def train_vae(stream: SceneStream, *, steps: int | None = 1200, seconds: float | None = None,
              batch_size: int = 16, lr: float = 2e-3, kl_weight: float = 1e-6, seed: int = 0,
              progress: bool = True, vae=None):
    """Train the autoencoder on world scenes; returns ``(vae, stats)``.

    Loss: MSE + 0.5 L1 between pixels and the reconstruction of a posterior sample, plus
    ``kl_weight`` x KL; AdamW at peak ``lr`` (warmup over 100 steps, cosine decay to 10% along
    the :class:`~suti.world.training.schedule.Clock` of ``steps`` and/or ``seconds``; both
    ``None``: :class:`~suti.errors.InvalidValueError`). ``vae``: an autoencoder to continue
    (default: a fresh one from ``seed``). ``stats``: ``vae_steps``, ``vae_seconds``, ``vae_mse``
    and ``vae_psnr_db`` (deterministic reconstructions of 256 fresh scenes).
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    if vae is None:
        vae = new_models(seed)[0]
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    clock = Clock(steps, seconds)
    bar = tqdm(total=100, desc="toy vae", unit="%", disable=not progress)
    step, shown, ema_rec = 0, 0, None
    while clock.progress(step) < 1.0:
        set_lr(opt, lr, step_warmup_cosine(step, clock.progress(step), 100))
        x, _, _ = stream.batch(batch_size)
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample(gen)).sample
        mse = F.mse_loss(rec, x)
        loss = mse + 0.5 * F.l1_loss(rec, x) + kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        ema_rec = mse.item() if ema_rec is None else 0.95 * ema_rec + 0.05 * mse.item()
        if step % 250 == 0:
            log.info("toy vae step %d (%.0f s): reconstruction MSE %.4f", step, clock.elapsed(), ema_rec)
        now = int(100 * clock.progress(step))
        bar.update(now - shown)
        shown = now
        bar.set_postfix(step=step, mse=f"{ema_rec:.4f}")
    bar.close()
    vae.eval()
    x, _, _ = stream.batch(256)
    with torch.no_grad():
        rec = vae(x, sample_posterior=False).sample.clamp(-1, 1)
        mse = F.mse_loss(rec, x).item()
    stats = {"vae_steps": step, "vae_seconds": round(clock.elapsed(), 1), "vae_mse": mse,
             "vae_psnr_db": round(10 * math.log10(4.0 / mse), 2)}  # pixel range [-1, 1]
    return vae, stats


def latent_scaling_factor(vae, stream: SceneStream, n: int = 512, seed: int = 0) -> float:
    """1 / std of the VAE's (sampled) latents on ``n`` scenes: latents then have ~unit std."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lat = torch.cat([vae.encode(stream.batch(64)[0]).latent_dist.sample(gen)
                         for _ in range(max(1, n // 64))])
    return float(1.0 / lat.std())


def finetune_decoder(vae, stream: SceneStream, *, steps: int | None = None,
                     seconds: float | None = 300.0, batch_size: int = 32, lr: float = 1e-3,
                     seed: int = 0, progress: bool = True):
    """Fine-tune the VAE *decoder* (and ``post_quant_conv``) with the encoder frozen.

    The latent space - what the U-Net was trained on - stays exactly the same, so this can run
    on a VAE whose U-Net is already trained. Loss: MSE + 0.5 L1 on posterior samples, as in
    :func:`train_vae`. Returns ``(vae, stats)`` with the reconstruction MSE/PSNR before and after
    on the same 256 scenes.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    x_eval, _, _ = stream.batch(256)

    def evaluate() -> float:
        vae.eval()
        with torch.no_grad():
            rec = vae(x_eval, sample_posterior=False).sample.clamp(-1, 1)
        return F.mse_loss(rec, x_eval).item()

    before = evaluate()
    vae.requires_grad_(False)
    trainable = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed + 2)
    clock = Clock(steps, seconds)
    bar = tqdm(total=100, desc="toy vae decoder", unit="%", disable=not progress)
    step, shown = 0, 0
    while clock.progress(step) < 1.0:
        set_lr(opt, lr, step_warmup_cosine(step, clock.progress(step), 50))
        x, _, _ = stream.batch(batch_size)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(gen)  # (B, 4, 16, 16)
        rec = vae.decode(z).sample  # (B, 3, 32, 32)
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        now = int(100 * clock.progress(step))
        bar.update(now - shown)
        shown = now
    bar.close()
    vae.requires_grad_(False)
    after = evaluate()
    stats = {"decoder_steps": step, "decoder_seconds": round(clock.elapsed(), 1),
             "decoder_psnr_db_before": round(10 * math.log10(4.0 / before), 2),
             "decoder_psnr_db_after": round(10 * math.log10(4.0 / after), 2)}
    log.info("toy vae decoder: %d steps, PSNR %.2f -> %.2f dB", step,
             stats["decoder_psnr_db_before"], stats["decoder_psnr_db_after"])
    return vae, stats
