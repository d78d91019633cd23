"""The ``toy`` model: a small latent text-to-image Stable Diffusion pretrained on the world.

Same classes as Stable Diffusion 1.x, so everything that runs on SD (DreamBooth experts, the
apprentice, serving) runs on it unchanged: an :class:`~diffusers.AutoencoderKL` (32 px RGB ->
16x16x4 latents), a :class:`~diffusers.UNet2DConditionModel` with cross-attention, a
:class:`~transformers.CLIPTextModel` over the real CLIP BPE tokenizer (:mod:`suti.tokenizer`)
and a :class:`~diffusers.DDIMScheduler` with SD's ``scaled_linear`` betas.

Pretraining (:func:`pretrain_t2i`, ~25 min on a 2-core CPU) streams fresh scenes of the
*train* subjects of :data:`PRETRAIN_WORLD` (``make_world(240, seed=0)``: 182 train subjects;
its held-out split contains the held-out subjects of the default ``make_world(24, seed=0)``,
and none of them shares class + colour + pattern with a train subject), with edits (colour
change, accessory, style) and caption variants (full DreamBench caption, without the context,
class noun only, ...) plus 10% empty captions for classifier-free guidance:

1. the VAE as an autoencoder (MSE + L1 + 1e-6 KL); then ``scaling_factor`` = 1 / latent std;
2. the U-Net and the text encoder jointly from scratch (DDPM epsilon loss with min-SNR-5
   weighting, AdamW, warmup + cosine decay, EMA weights are what is saved).

:func:`continue_t2i` (``suti world pretrain --what t2i --continue-from shipped``) trains an
existing toy model further: the VAE encoder - the latent space - stays, the decoder is
fine-tuned, then the U-Net and text encoder see the train subjects of a bigger seed-0 world
(``make_world(2000, 0)``: 1486 subjects; it extends :data:`PRETRAIN_WORLD`, so the held-out
subjects stay held out). The shipped weights (version 3) are the version-2 model (3500 steps
from scratch) continued this way for 45 minutes (5495 more steps, 8995 in all).

:func:`build_toy_pipeline` is the ``builder`` of ``configs/models/toy.yaml``: it assembles the
shipped fp16 weights (``suti/world/weights/toy``) into a float32 pipeline folder, or pretrains
from scratch when they are missing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from suti import storage
from suti.errors import InputError, InvalidValueError, MissingInputError, OutputExistsError

log = logging.getLogger(__name__)

RESOLUTION = 32
#: (num_subjects, seed) of the world whose *train* subjects the toy model sees.
PRETRAIN_WORLD = (240, 0)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "toy"
SUMMARY_FILE = "toy_training.json"
#: Bump together with ``weights_version`` in configs/models/toy.yaml when the weights change.
WEIGHTS_VERSION = 3

VAE_CONFIG: dict[str, Any] = dict(
    sample_size=RESOLUTION, in_channels=3, out_channels=3, latent_channels=4,
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
)
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=RESOLUTION // 2, in_channels=4, out_channels=4,
    block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=(1, 2, 4),  # diffusers' legacy name: the number of heads (32-dim heads)
)
TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_attention_heads=4,
    num_hidden_layers=3, max_position_embeddings=77, projection_dim=64, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)

def _ddpm():
    """The training noise scheduler (DDPM with the betas of :data:`SCHEDULER_CONFIG`)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    return DDPMScheduler.from_config(DDIMScheduler(**SCHEDULER_CONFIG).config)


CFG_DROP = 0.1  # empty captions, for classifier-free guidance


def pretrain_world():
    """The world whose train subjects are shown in pretraining (held-out ones never)."""
    from suti.world.spec import make_world

    return make_world(*PRETRAIN_WORLD)


# --------------------------------------------------------------------------------------------
# data


def compose_caption(subject, meta: dict, *, color: bool = True, pattern: bool = True,
                    context: bool = True) -> str:
    """A caption of a scene (``meta`` from :func:`~suti.world.render.sample_scene`) with some
    parts left out; with everything it equals :func:`suti.world.render.caption`."""
    from suti.world.spec import ACCESSORIES, CONTEXTS, PATTERNS, STYLES

    words = []
    if color:
        words.append(meta["color"])
    if pattern and subject.pattern != "plain":
        words.append(PATTERNS[subject.pattern])
    words.append(subject.class_noun)
    noun = " ".join(words)
    out = [STYLES[meta["style"]]] if meta.get("style") else []
    out.append(f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}")
    if meta.get("accessory"):
        out.append(ACCESSORIES[meta["accessory"]])
    if context:
        out.append(CONTEXTS[meta["context"]].phrase)
    return " ".join(out)


def random_caption(subject, meta: dict, rng: np.random.Generator) -> str:
    """Training caption: empty (10%); else colour and pattern are each kept or dropped (both
    kept 65%, pattern dropped 10%, colour dropped 5%, both dropped 20%) and the context phrase
    kept 85% of the time. About half the captions are the full DreamBench caption; "a cup",
    "a cup on the beach", "a red cup" (the prompts of DreamBooth's class prior and of
    "a [V] cup") are in distribution."""
    if rng.random() < CFG_DROP:
        return ""
    u = rng.random()
    if u < 0.65:
        color = pattern = True
    elif u < 0.75:
        color, pattern = True, False
    elif u < 0.8:
        color, pattern = False, True
    else:
        color = pattern = False
    return compose_caption(subject, meta, color=color, pattern=pattern,
                           context=rng.random() >= 0.15)


class SceneStream:
    """Endless batches of freshly rendered scenes: ``(pixels (B, 3, 32, 32) in [-1, 1],
    captions, metas)``. A quarter are rendered at 64 px and downsampled the way DreamBooth
    instance photos are (:func:`suti.images.fit_square`, bicubic)."""

    def __init__(self, subjects, seed: int, *, edit_prob: float = 0.35, hires: float = 0.25,
                 captions: str = "random"):
        self.subjects = list(subjects)
        self.rng = np.random.default_rng([seed, 0x707])
        self.edit_prob, self.hires, self.captions = edit_prob, hires, captions

    def batch(self, n: int):
        import torch
        from PIL import Image

        from suti.world.render import sample_scene

        imgs, texts, metas = [], [], []
        for _ in range(n):
            subject = self.subjects[int(self.rng.integers(len(self.subjects)))]
            hires = self.rng.random() < self.hires
            img, text, meta = sample_scene(subject, self.rng, size=2 * RESOLUTION if hires else RESOLUTION,
                                           edit_prob=self.edit_prob)
            if hires:
                img = img.resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC)
            if self.captions == "random":
                text = random_caption(subject, meta, self.rng)
            imgs.append(np.asarray(img, np.float32))
            texts.append(text)
            metas.append(meta)
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0
        return x, texts, metas


def heldout_scenes(n: int, seed: int = 0, edit_prob: float = 0.3):
    """``n`` scenes of held-out subjects (never seen in pretraining), with full captions:
    ``(pixels (n, 3, 32, 32) in [-1, 1], captions, metas)``. For evaluation."""
    world = pretrain_world()
    return SceneStream(world.heldout_subjects, seed + 1_000_003, edit_prob=edit_prob,
                       hires=0.0, captions="full").batch(n)


# --------------------------------------------------------------------------------------------
# models


def new_models(seed: int = 0):
    """Freshly initialised ``(vae, unet, text_encoder)`` of the toy architecture."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    # Start with a near-deterministic posterior (std ~0.05 instead of 1): with a 1e-6 KL weight
    # the log-variance would take hundreds of steps to get there, and until then the sampling
    # noise drowns the latents (measured: +1.7 dB PSNR after 200 steps).
    n = vae.quant_conv.out_channels // 2
    with torch.no_grad():
        vae.quant_conv.weight[n:].zero_()
        vae.quant_conv.bias[n:].fill_(-6.0)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    return vae, unet, text_encoder


def num_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


class _Tokens:
    """Caption -> token ids, cached (captions repeat a lot)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, captions: list[str]):
        import torch

        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
            self.cache.update(zip(missing, ids))
        return torch.stack([self.cache[c] for c in captions])


class _Clock:
    """Training progress in [0, 1]: the larger of steps done / steps and time used / budget."""

    def __init__(self, steps: int | None, seconds: float | None):
        if steps is None and seconds is None:
            raise InvalidValueError("give steps or a time budget")
        self.steps, self.seconds, self.start = steps, seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        p = 0.0
        if self.steps:
            p = max(p, step / self.steps)
        if self.seconds:
            p = max(p, self.elapsed() / self.seconds)
        return min(p, 1.0)


def _lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 10% along ``progress``."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _set_lr(optimizer, base: float, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base * factor


def train_vae(stream: SceneStream, *, steps: int | None = 1200, seconds: float | None = None,
              batch_size: int = 16, lr: float = 2e-3, kl_weight: float = 1e-6, seed: int = 0,
              progress: bool = True, vae=None):
    """Train the autoencoder on world scenes; returns ``(vae, stats)``."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    if vae is None:
        vae = new_models(seed)[0]
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    clock = _Clock(steps, seconds)
    bar = tqdm(total=100, desc="toy vae", unit="%", disable=not progress)
    step, shown, ema_rec = 0, 0, None
    while clock.progress(step) < 1.0:
        _set_lr(opt, lr, _lr_factor(step, clock.progress(step), 100))
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


def _caption_gap(unet, text_encoder, tokens, latents, captions, *, seed: int = 0, draws: int = 2):
    """Denoising MSE with the right captions and with captions rolled by one (same noise and
    timesteps): ``(right, shuffled)``."""
    import torch

    sched = _ddpm()
    gen = torch.Generator().manual_seed(seed)
    was = unet.training, text_encoder.training
    unet.eval()
    text_encoder.eval()
    out = []
    with torch.no_grad():
        embs = [text_encoder(tokens(c))[0] for c in (captions, captions[1:] + captions[:1])]
        noise = [torch.randn(latents.shape, generator=gen) for _ in range(draws)]
        ts = [torch.randint(0, 1000, (len(latents),), generator=gen) for _ in range(draws)]
        for emb in embs:
            losses = [(unet(sched.add_noise(latents, n, t), t, emb).sample - n).pow(2).mean()
                      for n, t in zip(noise, ts)]
            out.append(float(torch.stack(losses).mean()))
    unet.train(was[0])
    text_encoder.train(was[1])
    return out[0], out[1]


def train_unet(vae, scaling_factor: float, stream: SceneStream, *, steps: int | None = 3000,
               seconds: float | None = None, batch_size: int = 32, lr: float = 2e-3,
               seed: int = 0, ema_decay: float = 0.999, min_snr: float = 5.0,
               eval_every: int = 250, progress: bool = True, unet=None, text_encoder=None,
               tokenizer=None, checkpoint: str | Path | None = None):
    """Train the U-Net and the text encoder jointly on (frozen-VAE latents, captions).

    ``checkpoint``: a file that gets the whole training state (weights, EMA, optimizer, step,
    random streams, history) every ``eval_every`` steps, written atomically; when it exists at
    the start, training resumes from it (the time already spent counts against ``seconds``).

    Returns ``(unet, text_encoder, stats)`` with the EMA weights loaded (unless the raw weights
    are better on held-out scenes).
    """
    import torch
    from tqdm import tqdm

    from suti.tokenizer import load_clip_tokenizer

    if unet is None or text_encoder is None:
        _, unet, text_encoder = new_models(seed)
    tokens = _Tokens(tokenizer or load_clip_tokenizer())
    vae.eval().requires_grad_(False)
    unet.train()
    text_encoder.train()
    named = [(f"unet.{n}", p) for n, p in unet.named_parameters()]
    named += [(f"text.{n}", p) for n, p in text_encoder.named_parameters()]
    params = [p for _, p in named]
    no_decay = [p for n, p in named if p.ndim < 2 or "embedding" in n]
    decay = [p for n, p in named if not (p.ndim < 2 or "embedding" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params]
    sched = _ddpm()
    acp = sched.alphas_cumprod
    snr = acp / (1 - acp)
    weight = torch.clamp(snr, max=min_snr) / snr if min_snr else torch.ones_like(snr)
    gen = torch.Generator().manual_seed(seed + 1)
    ex, ecaps, _ = heldout_scenes(32, seed)
    with torch.no_grad():
        elat = vae.encode(ex).latent_dist.mean * scaling_factor
    clock = _Clock(steps, seconds)
    history, step, shown, run_loss = [], 0, 0, None
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        from suti.weights import loading

        with loading(f"{ckpt} (a resumable checkpoint; delete it to start over)"):
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            unet.load_state_dict(state["unet"])
            text_encoder.load_state_dict(state["text_encoder"])
            opt.load_state_dict(state["optimizer"])
            with torch.no_grad():
                for e, v in zip(ema, state["ema"]):
                    e.copy_(v)
        gen.set_state(state["generator"])
        stream.rng.bit_generator.state = state["stream_rng"]
        step, run_loss, history = state["step"], state["run_loss"], state["history"]
        clock.start -= state["seconds"]
        log.info("toy unet: resumed from %s at step %d", ckpt, step)
    bar = tqdm(total=100, desc="toy unet+text", unit="%", disable=not progress)
    while clock.progress(step) < 1.0:
        _set_lr(opt, lr, _lr_factor(step, clock.progress(step), 200))
        x, caps, _ = stream.batch(batch_size)
        with torch.no_grad():
            lat = vae.encode(x).latent_dist.sample(gen) * scaling_factor
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=gen)
        emb = text_encoder(tokens(caps))[0]
        pred = unet(sched.add_noise(lat, noise, t), t, emb).sample
        mse = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (weight[t] * mse).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        run_loss = mse.mean().item() if run_loss is None else 0.98 * run_loss + 0.02 * mse.mean().item()
        if eval_every and step % eval_every == 0:
            right, shuffled = _caption_gap(unet, text_encoder, tokens, elat, ecaps, seed=seed)
            history.append({"step": step, "seconds": round(clock.elapsed(), 1),
                            "train_mse": round(run_loss, 5), "heldout_mse": round(right, 5),
                            "heldout_mse_shuffled": round(shuffled, 5)})
            log.info("toy unet step %d: train %.4f, held-out %.4f (shuffled captions %.4f)",
                     step, run_loss, right, shuffled)
            if ckpt is not None:
                tmp = ckpt.with_name(ckpt.name + ".tmp")
                torch.save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                            "optimizer": opt.state_dict(), "ema": ema, "generator": gen.get_state(),
                            "stream_rng": stream.rng.bit_generator.state, "step": step,
                            "run_loss": run_loss, "history": history,
                            "seconds": clock.elapsed()}, tmp)
                os.replace(tmp, ckpt)
        now = int(100 * clock.progress(step))
        bar.update(now - shown)
        shown = now
        bar.set_postfix(step=step, mse=f"{run_loss:.4f}")
    bar.close()
    raw = _caption_gap(unet, text_encoder, tokens, elat, ecaps, seed=seed + 7, draws=4)
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    averaged = _caption_gap(unet, text_encoder, tokens, elat, ecaps, seed=seed + 7, draws=4)
    use_ema = averaged[0] <= raw[0]
    if not use_ema:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
    final = averaged if use_ema else raw
    stats = {"unet_steps": step, "unet_seconds": round(clock.elapsed(), 1),
             "batch_size": batch_size, "lr": lr, "train_mse": round(run_loss, 5),
             "weights": "ema" if use_ema else "raw",
             "heldout_mse_raw": round(raw[0], 5), "heldout_mse_ema": round(averaged[0], 5),
             "heldout_mse": round(final[0], 5), "heldout_mse_shuffled": round(final[1], 5),
             "caption_ratio": round(final[0] / final[1], 4), "history": history}
    unet.eval()
    text_encoder.eval()
    return unet, text_encoder, stats


def make_pipeline(vae, unet, text_encoder, tokenizer=None, scheduler=None):
    """A ``StableDiffusionPipeline`` of toy components (DDIM, no safety checker)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from suti.tokenizer import load_clip_tokenizer

    return StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=text_encoder,
        tokenizer=tokenizer or load_clip_tokenizer(),
        scheduler=scheduler or DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _vae_stage(vae_file: Path, vae, stream: SceneStream, train):
    """The VAE stage of a resumable run: load ``vae_file`` (weights, stats and the scene
    stream's position) when an interrupted run left it, else ``train()`` -> ``(vae, stats)``
    and save it there atomically. Returns ``(vae, stats)``."""
    import torch

    if vae_file.exists():
        from suti.weights import loading

        with loading(f"{vae_file} (a resumable checkpoint; delete it to start over)"):
            state = torch.load(vae_file, map_location="cpu", weights_only=False)
            vae.load_state_dict(state["vae"])
            stream.rng.bit_generator.state = state["stream_rng"]
        log.info("toy vae: resumed from %s", vae_file)
        return vae, state["stats"]
    vae, stats = train()
    tmp = vae_file.with_suffix(".tmp")
    torch.save({"vae": vae.state_dict(), "stats": stats,
                "stream_rng": stream.rng.bit_generator.state}, tmp)
    os.replace(tmp, vae_file)
    return vae, stats


def _start_run(out_dir: str | Path, *, minutes: float | None, steps: int | None,
               threads: int | None) -> tuple[Path, Path]:
    """Checks and set-up shared by :func:`pretrain_t2i` and :func:`continue_t2i`: returns
    ``(out, partial)``, the output folder (new or empty, else :class:`OutputExistsError`) and
    ``<out>.partial/``, where an interrupted run keeps its state until the pipeline is written."""
    import torch

    if minutes is None and steps is None:
        raise InvalidValueError("give minutes, steps or both")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(f"{out}: output folder is not empty")
    if threads:
        torch.set_num_threads(int(threads))
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    return out, partial


def _train_unet_and_write(out: Path, partial: Path, started: float, *, vae, scale: float,
                          stream: SceneStream, unet, text_encoder, train: dict, header: dict,
                          vae_stats: dict, continued_from: dict | None = None) -> dict:
    """The last stage of :func:`pretrain_t2i` and :func:`continue_t2i`: train the U-Net and
    text encoder (:func:`train_unet` with ``train``, checkpointed in ``partial``), write the
    pipeline and ``toy_training.json`` to ``out``, remove ``partial``; returns the summary
    (``header`` - seed, minutes, steps, world - then sizes, ``vae_stats`` and the U-Net's
    stats; with ``continued_from``, the earlier run's summary and the total U-Net steps)."""
    import torch

    unet, text_encoder, ustats = train_unet(vae, scale, stream, unet=unet,
                                            text_encoder=text_encoder,
                                            checkpoint=partial / "unet.pt", **train)
    pipe = make_pipeline(vae, unet, text_encoder)
    storage.save_pretrained_atomic(pipe, out, safe_serialization=True)
    summary = {
        "weights_version": WEIGHTS_VERSION, **header,
        "threads": torch.get_num_threads(),
        "params": {"vae": num_params(vae), "unet": num_params(unet),
                   "text_encoder": num_params(text_encoder)},
        "scaling_factor": scale, **vae_stats, **ustats,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    if continued_from is not None:
        earlier_steps = continued_from.get("total_unet_steps", continued_from.get("unet_steps", 0))
        summary["total_unet_steps"] = int(earlier_steps) + ustats["unet_steps"]
        summary["continued_from"] = {k: v for k, v in continued_from.items() if k != "history"}
    storage.write_text(out / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(partial, ignore_errors=True)
    log.info("toy model %s %s in %.1f min: held-out MSE %.4f, shuffled captions %.4f "
             "(ratio %.3f)", "continued into" if continued_from is not None else "written to",
             out, summary["total_seconds"] / 60, ustats["heldout_mse"],
             ustats["heldout_mse_shuffled"], ustats["caption_ratio"])
    return summary


def pretrain_t2i(out_dir: str | Path, *, seed: int = 0, minutes: float | None = 25.0,
                 steps: int | None = None, vae_steps: int | None = None, batch_size: int = 32,
                 lr: float = 2e-3, threads: int | None = None, progress: bool = True) -> dict:
    """Pretrain the toy text-to-image model and write a diffusers pipeline folder to ``out_dir``.

    Args:
        out_dir: new or empty folder; gets ``model_index.json``, ``unet/``, ``vae/``,
            ``text_encoder/``, ``tokenizer/``, ``scheduler/`` (safetensors) and
            ``toy_training.json`` (the run's settings, losses and timings).
        seed: all randomness (initialisation, scenes, noise).
        minutes: wall-clock budget of the whole run (the VAE gets 15% of it, at most
            ``vae_steps``); ``None``: no time limit (then ``steps`` is required).
        steps: U-Net/text-encoder steps (``None``: as many as ``minutes`` allow). With both, the
            run stops at whichever comes first; the learning-rate schedule follows the same
            progress, so a time-limited run still ends with a fully decayed rate.
        vae_steps: autoencoder steps (default 1500, or fewer if ``minutes`` runs out).
        batch_size: U-Net batch (the VAE uses half of it).
        lr: peak learning rate of the U-Net and text encoder.
        threads: ``torch.set_num_threads`` for the run (``None``: leave as is).
        progress: show progress bars.

    An interrupted run continues where it stopped when called again with the same ``out_dir``:
    the state lives in ``<out_dir>.partial/`` until the pipeline is written.

    Returns:
        the summary that is also written to ``toy_training.json``.
    """
    out, partial = _start_run(out_dir, minutes=minutes, steps=steps, threads=threads)
    started = time.perf_counter()
    world = pretrain_world()
    stream = SceneStream(world.train_subjects, seed)
    vae, unet, text_encoder = new_models(seed)
    total = None if minutes is None else 60.0 * minutes
    vae, vstats = _vae_stage(partial / "vae.pt", vae, stream, lambda: train_vae(
        stream, steps=vae_steps or 1500, seconds=None if total is None else 0.15 * total,
        batch_size=max(8, batch_size // 2), seed=seed, progress=progress, vae=vae))
    scale = latent_scaling_factor(vae, stream, seed=seed)
    vae.register_to_config(scaling_factor=scale)
    log.info("toy vae: %d steps, %.1f s, reconstruction PSNR %.1f dB, scaling factor %.4f",
             vstats["vae_steps"], vstats["vae_seconds"], vstats["vae_psnr_db"], scale)
    left = None if total is None else max(60.0, total - (time.perf_counter() - started))
    world_info = {"num_subjects": PRETRAIN_WORLD[0], "seed": PRETRAIN_WORLD[1],
                  "split": "train", "subjects": len(world.train_subjects)}
    return _train_unet_and_write(
        out, partial, started, vae=vae, scale=scale, stream=stream, unet=unet,
        text_encoder=text_encoder, vae_stats=vstats,
        train={"steps": steps, "seconds": left, "batch_size": batch_size, "lr": lr,
               "seed": seed, "progress": progress},
        header={"seed": seed, "minutes": minutes, "steps": steps, "world": world_info})


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
    clock = _Clock(steps, seconds)
    bar = tqdm(total=100, desc="toy vae decoder", unit="%", disable=not progress)
    step, shown = 0, 0
    while clock.progress(step) < 1.0:
        _set_lr(opt, lr, _lr_factor(step, clock.progress(step), 50))
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


def continue_t2i(out_dir: str | Path, *, init: str | Path | None = None, seed: int = 1,
                 minutes: float | None = 45.0, steps: int | None = None,
                 decoder_minutes: float = 5.0, subjects: int = 2000, batch_size: int = 32,
                 lr: float = 1e-3, threads: int | None = None, progress: bool = True) -> dict:
    """Continue pretraining a toy model (by default the shipped one) and write the result.

    The VAE encoder is kept (so the latent space does not move), its decoder is fine-tuned for
    ``decoder_minutes`` (:func:`finetune_decoder`), then the U-Net and the text encoder train
    on (by default) the train subjects of ``make_world(subjects, 0)`` - a bigger seed-0 world
    extends :data:`PRETRAIN_WORLD`, so its held-out subjects stay held out - with a fresh
    warmup + cosine schedule peaking at ``lr``. Resumable like :func:`pretrain_t2i`
    (``<out_dir>.partial/``); ``toy_training.json`` keeps the earlier run's summary under
    ``"continued_from"``.

    Args:
        out_dir: new or empty folder for the pipeline.
        init: a toy pipeline folder, or the shipped weights (default).
        seed: scenes and noise of this run (use another seed than the earlier run's).
        minutes: U-Net budget (``None``: ``steps`` only).
        steps: U-Net/text-encoder steps.
        decoder_minutes: decoder fine-tuning budget (0: skip).
        subjects: size of the seed-0 world whose train subjects are shown.
        batch_size, lr, threads, progress: as for :func:`pretrain_t2i`.
    """
    import torch

    from suti.world.spec import make_world

    if subjects < PRETRAIN_WORLD[0]:
        raise InputError(f"subjects must be >= {PRETRAIN_WORLD[0]} (the pretraining world)")
    init = Path(init) if init is not None else WEIGHTS_DIR
    if not (init / "model_index.json").is_file():
        raise MissingInputError(f"{init}: not a toy pipeline folder (no model_index.json)")
    out, partial = _start_run(out_dir, minutes=minutes, steps=steps, threads=threads)
    earlier = json.loads((init / SUMMARY_FILE).read_text()) if (init / SUMMARY_FILE).is_file() else {}
    started = time.perf_counter()
    vae, unet, text_encoder, _ = _load_components(init, torch.float32)
    world = make_world(subjects, PRETRAIN_WORLD[1])
    stream = SceneStream(world.train_subjects, seed)
    vae, dstats = _vae_stage(partial / "vae.pt", vae, stream, lambda: finetune_decoder(
        vae, stream, seconds=60.0 * decoder_minutes, seed=seed, progress=progress)
        if decoder_minutes > 0 else (vae, {}))
    vae.eval().requires_grad_(False)
    world_info = {"num_subjects": subjects, "seed": PRETRAIN_WORLD[1], "split": "train",
                  "subjects": len(world.train_subjects)}
    return _train_unet_and_write(
        out, partial, started, vae=vae, scale=float(vae.config.scaling_factor), stream=stream,
        unet=unet, text_encoder=text_encoder, vae_stats=dstats, continued_from=earlier,
        train={"steps": steps, "seconds": None if minutes is None else 60.0 * minutes,
               "batch_size": batch_size, "lr": lr, "seed": seed, "progress": progress},
        header={"seed": seed, "minutes": minutes, "steps": steps, "world": world_info})


# --------------------------------------------------------------------------------------------
# shipped weights and the preset builder


def _load_components(folder: Path, dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from suti.weights import check_weight_folder, loading

    check_weight_folder(folder)
    with loading(folder):
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype)
        scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    return vae, unet, text_encoder, scheduler


def ship_weights(pipeline_dir: str | Path, dest: str | Path = WEIGHTS_DIR) -> Path:
    """Write the compact copy of a pretrained toy pipeline that the repository ships:
    fp16 safetensors and configs, no tokenizer (rebuilt offline by :mod:`suti.tokenizer`)."""
    import torch

    src, dest = Path(pipeline_dir), Path(dest)
    vae, unet, text_encoder, scheduler = _load_components(src, torch.float16)
    dest.mkdir(parents=True, exist_ok=True)
    for name, part in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder),
                       ("scheduler", scheduler)):
        if (dest / name).exists():
            shutil.rmtree(dest / name)
        part.save_pretrained(dest / name)
    shutil.copy(src / "model_index.json", dest / "model_index.json")
    if (src / SUMMARY_FILE).is_file():
        shutil.copy(src / SUMMARY_FILE, dest / SUMMARY_FILE)
    return dest


def assemble_shipped(out_dir: str | Path, weights: str | Path = WEIGHTS_DIR) -> Path:
    """Turn the shipped fp16 weights into a float32 pipeline folder at ``out_dir``."""
    import torch

    weights, out = Path(weights), Path(out_dir)
    vae, unet, text_encoder, scheduler = _load_components(weights, torch.float32)
    make_pipeline(vae, unet, text_encoder, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    if (weights / SUMMARY_FILE).is_file():
        shutil.copy(weights / SUMMARY_FILE, out / SUMMARY_FILE)
    return out


def build_toy_pipeline(preset: dict, out_dir: str | Path) -> Path:
    """Builder of the ``toy`` preset: the shipped weights if present, else pretrain (~25 min)."""
    if (WEIGHTS_DIR / "model_index.json").is_file():
        summary = WEIGHTS_DIR / SUMMARY_FILE
        shipped = json.loads(summary.read_text()).get("weights_version") if summary.is_file() else None
        wanted = preset.get("weights_version")
        if wanted is not None and shipped is not None and int(wanted) != int(shipped):
            log.warning("toy preset asks for weights version %s, the shipped ones are version %s",
                        wanted, shipped)
        log.info("toy model: assembling the shipped weights from %s", WEIGHTS_DIR)
        return assemble_shipped(out_dir)
    minutes = float(preset.get("pretrain_minutes", 25))
    log.warning("toy model: no shipped weights in %s; pretraining from scratch, this takes "
                "~%.0f minutes on a 2-core CPU (once; the result is cached)", WEIGHTS_DIR, minutes)
    pretrain_t2i(out_dir, seed=int(preset.get("seed", 0)), minutes=minutes)
    return Path(out_dir)
