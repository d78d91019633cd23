"""Pretraining of the toy text-to-image model (:mod:`suti.world.toy_t2i`, the architecture).

Pretraining (:func:`pretrain_t2i`, ~25 min on a 2-core CPU) streams fresh scenes
(:class:`~suti.world.training.scenes.SceneStream`) of the *train* subjects of
:data:`~suti.world.toy_t2i.PRETRAIN_WORLD` (``make_world(240, seed=0)``: 182 train subjects; its
held-out split contains the held-out subjects of the default ``make_world(24, seed=0)``, and none
of them shares class + colour + pattern with a train subject), with edits (colour change,
accessory, style) and caption variants (full DreamBench caption, without the context, class noun
only, ...) plus 10% empty captions for classifier-free guidance:

1. the VAE as an autoencoder (MSE + L1 + 1e-6 KL); then ``scaling_factor`` = 1 / latent std;
2. the U-Net and the text encoder jointly from scratch (DDPM epsilon loss with min-SNR-5
   weighting, AdamW, warmup + cosine decay, EMA weights are what is saved).

:func:`continue_t2i` (``suti world pretrain --what t2i --continue-from shipped``) trains an
existing toy model further: the VAE encoder - the latent space - stays, the decoder is
fine-tuned, then the U-Net and text encoder see the train subjects of a bigger seed-0 world
(``make_world(2000, 0)``: 1486 subjects; it extends ``PRETRAIN_WORLD``, so the held-out
subjects stay held out). The shipped weights (version 3) are the version-2 model (3500 steps
from scratch) continued this way for 45 minutes (5495 more steps, 8995 in all).

Both runs are resumable (``<out_dir>.partial/``) and write a diffusers pipeline folder plus
``toy_training.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from suti import storage
from suti.errors import InputError, InvalidValueError, MissingInputError, OutputExistsError
from suti.world.spec import make_world
from suti.world.toy_t2i import (
    PRETRAIN_WORLD,
    SCHEDULER_CONFIG,
    SUMMARY_FILE,
    WEIGHTS_DIR,
    WEIGHTS_VERSION,
    load_components,
    make_pipeline,
    new_models,
    num_params,
    pretrain_world,
)
from suti.world.training.scenes import SceneStream, heldout_scenes
from suti.world.training.schedule import Clock, set_lr, step_warmup_cosine
from suti.world.training.t2i_vae import finetune_decoder, latent_scaling_factor, train_vae

log = logging.getLogger(__name__)


def _ddpm():
    """The training noise scheduler (DDPM with the betas of :data:`SCHEDULER_CONFIG`)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    return DDPMScheduler.from_config(DDIMScheduler(**SCHEDULER_CONFIG).config)


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


def _joint_optimizer(unet, text_encoder, lr: float):
    """``(params, AdamW)`` over the U-Net and text encoder: weight decay 0.01, none on biases,
    norms and embeddings."""
    import torch

    named = [(f"unet.{n}", p) for n, p in unet.named_parameters()]
    named += [(f"text.{n}", p) for n, p in text_encoder.named_parameters()]
    params = [p for _, p in named]
    no_decay = [p for n, p in named if p.ndim < 2 or "embedding" in n]
    decay = [p for n, p in named if not (p.ndim < 2 or "embedding" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))
    return params, opt


def _snr_weights(sched, min_snr: float):
    """Per-timestep loss weights ``(1000,)``: min-SNR-``min_snr`` (all ones when 0)."""
    import torch

    acp = sched.alphas_cumprod
    snr = acp / (1 - acp)
    return torch.clamp(snr, max=min_snr) / snr if min_snr else torch.ones_like(snr)


def _resume_unet(ckpt: Path, unet, text_encoder, opt, ema, gen, stream: SceneStream,
                 clock: Clock) -> tuple[int, float | None, list]:
    """Load a :func:`train_unet` checkpoint into the models, optimizer, EMA, noise generator,
    scene stream and clock; returns ``(step, running loss, history)``."""
    import torch

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
    clock.start -= state["seconds"]
    log.info("toy unet: resumed from %s at step %d", ckpt, state["step"])
    return state["step"], state["run_loss"], state["history"]


def _save_unet(ckpt: Path, unet, text_encoder, opt, ema, gen, stream: SceneStream, *,
               step: int, run_loss: float, history: list, seconds: float) -> None:
    """Write the whole :func:`train_unet` state to ``ckpt`` atomically."""
    import torch

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    torch.save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                "optimizer": opt.state_dict(), "ema": ema, "generator": gen.get_state(),
                "stream_rng": stream.rng.bit_generator.state, "step": step,
                "run_loss": run_loss, "history": history, "seconds": seconds}, tmp)
    os.replace(tmp, ckpt)


def _unet_step(vae, scaling_factor: float, x, caps, *, unet, text_encoder, tokens, sched,
               weight, gen, opt, params):
    """One optimizer step of the denoising loss on pixels ``x`` (B, 3, 32, 32) with captions
    ``caps``; returns the per-sample MSE ``(B,)``."""
    import torch

    with torch.no_grad():
        lat = vae.encode(x).latent_dist.sample(gen) * scaling_factor
    noise = torch.randn(lat.shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(x),), generator=gen)
    emb = text_encoder(tokens(caps))[0]
    pred = unet(sched.add_noise(lat, noise, t), t, emb).sample
    mse = (pred - noise).pow(2).mean(dim=(1, 2, 3))
    loss = (weight[t] * mse).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return mse


def _keep_better(unet, text_encoder, tokens, latents, captions, params, ema, *, seed: int):
    """Load the EMA weights into ``params`` unless the raw ones denoise the held-out
    ``latents`` better; returns ``(use_ema, raw (right, shuffled), ema (right, shuffled))``."""
    import torch

    raw = _caption_gap(unet, text_encoder, tokens, latents, captions, seed=seed, draws=4)
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    averaged = _caption_gap(unet, text_encoder, tokens, latents, captions, seed=seed, draws=4)
    use_ema = averaged[0] <= raw[0]
    if not use_ema:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
    return use_ema, raw, averaged


def train_unet(vae, scaling_factor: float, stream: SceneStream, *, steps: int | None = 3000,
               seconds: float | None = None, batch_size: int = 32, lr: float = 2e-3,
               seed: int = 0, ema_decay: float = 0.999, min_snr: float = 5.0,
               eval_every: int = 250, progress: bool = True, unet=None, text_encoder=None,
               tokenizer=None, checkpoint: str | Path | None = None):
    """Train the U-Net and the text encoder jointly on (frozen-VAE latents, captions).

    DDPM epsilon loss with min-SNR-``min_snr`` weighting, AdamW at peak ``lr`` (warmup over 200
    steps, cosine decay along :class:`Clock` progress: ``steps`` and/or ``seconds``), EMA
    weights (``ema_decay``); every ``eval_every`` steps the held-out denoising MSE with right
    and shuffled captions goes to the history. ``unet``/``text_encoder``: models to continue
    (default: fresh ones from ``seed``).

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
    params, opt = _joint_optimizer(unet, text_encoder, lr)
    ema = [p.detach().clone() for p in params]
    sched = _ddpm()
    weight = _snr_weights(sched, min_snr)
    gen = torch.Generator().manual_seed(seed + 1)
    ex, ecaps, _ = heldout_scenes(32, seed)
    with torch.no_grad():
        elat = vae.encode(ex).latent_dist.mean * scaling_factor
    clock = Clock(steps, seconds)
    history, step, shown, run_loss = [], 0, 0, None
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        step, run_loss, history = _resume_unet(ckpt, unet, text_encoder, opt, ema, gen, stream,
                                               clock)
    bar = tqdm(total=100, desc="toy unet+text", unit="%", disable=not progress)
    while clock.progress(step) < 1.0:
        set_lr(opt, lr, step_warmup_cosine(step, clock.progress(step), 200))
        x, caps, _ = stream.batch(batch_size)
        mse = _unet_step(vae, scaling_factor, x, caps, unet=unet, text_encoder=text_encoder,
                         tokens=tokens, sched=sched, weight=weight, gen=gen, opt=opt,
                         params=params)
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
                _save_unet(ckpt, unet, text_encoder, opt, ema, gen, stream, step=step,
                           run_loss=run_loss, history=history, seconds=clock.elapsed())
        now = int(100 * clock.progress(step))
        bar.update(now - shown)
        shown = now
        bar.set_postfix(step=step, mse=f"{run_loss:.4f}")
    bar.close()
    use_ema, raw, averaged = _keep_better(unet, text_encoder, tokens, elat, ecaps, params, ema,
                                          seed=seed + 7)
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

    Raises:
        OutputExistsError: ``out_dir`` exists and is not empty.
        InvalidValueError: neither ``minutes`` nor ``steps``.
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

    Raises:
        InputError: ``subjects`` below the pretraining world's 240.
        MissingInputError: ``init`` is not a toy pipeline folder.
        OutputExistsError: ``out_dir`` exists and is not empty.
        InvalidValueError: neither ``minutes`` nor ``steps``.
    """
    import torch

    if subjects < PRETRAIN_WORLD[0]:
        raise InputError(f"subjects must be >= {PRETRAIN_WORLD[0]} (the pretraining world)")
    init = Path(init) if init is not None else WEIGHTS_DIR
    if not (init / "model_index.json").is_file():
        raise MissingInputError(f"{init}: not a toy pipeline folder (no model_index.json)")
    out, partial = _start_run(out_dir, minutes=minutes, steps=steps, threads=threads)
    earlier = json.loads((init / SUMMARY_FILE).read_text()) if (init / SUMMARY_FILE).is_file() else {}
    started = time.perf_counter()
    vae, unet, text_encoder, _ = load_components(init, torch.float32)
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


