"""Apprentice training with DeepSpeed on the generation job's shards.

Objective (SuTI): the apprentice denoises the expert's output ``y`` given the target prompt and
3 demonstrations of the subject, || target - f_theta(z_t, t, p, demos) ||^2, where the target
follows the base scheduler's ``prediction_type`` (the noise for ``epsilon``, the velocity
``scheduler.get_velocity`` for ``v_prediction``, the clean latents for ``sample``), with text,
demos and both dropped at small rates for classifier-free guidance. The base U-Net is trainable
(paper) or frozen (``--freeze-base``: only the demonstration-attention layers train). With
``--subject-tokens N`` the adapter also gets a global subject channel (IP-Adapter-style, see
:mod:`apprentice.adapter`): each batch's demos are embedded by ``--image-encoder`` (no grad) and
its projection, keys/values and gates train with the adapter (with ``--image-encoder
unet-features`` a resampler reads the demos' own U-Net features instead, and trains too). With ``--caption-distillation W``
a reconstruction example prompted with the class only also learns from its target photo's alt
text: the frozen base given that caption is a teacher (:func:`caption_teacher`).

Launch: one process directly (``suti apprentice train``), or N with any standard launcher:
``torchrun --nproc_per_node 2 -m apprentice.train ...``, ``torchrun --nnodes 2 --node-rank R
--master-addr HOST --master-port P --nproc-per-node 8 -m apprentice.train ...``, ``deepspeed
--hostfile H --module apprentice.train ...`` (which passes ``--local_rank``). ``suti apprentice
train --nproc/--nnodes/--node-rank/--master-addr/--hostfile`` runs these for you. On CPU the gloo
backend is used; on GPU NCCL and the DeepSpeed config's bf16/fp16.

Checkpoints (:mod:`apprentice.checkpoint`): only what trains, consolidated, on the output URI (may
be ``s3://``), resumable by any number of processes on any nodes with ``--resume latest``.

The parts, by concern: :mod:`apprentice.distributed` (the process group),
:mod:`apprentice.engine` (the model, DeepSpeed config, optimizer and engine),
:mod:`apprentice.objective` (the loss, guidance dropout, caption distillation),
:mod:`apprentice.train_data` (the loader, each batch encoded), :mod:`apprentice.train_state`
(output, resume, checkpoints, EMA) and :mod:`apprentice.train_config` (options). This module is
the entry point and the training loop; it re-exports their public names.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from apprentice.distributed import DIST_ENV, init_distributed
from apprentice.engine import ApprenticeModule, build_engine, load_deepspeed_config, merge_base_lora, module_dtype, param_groups
from apprentice.objective import caption_teacher, denoising_loss, distillation_targets, guidance_dropout, teacher_prediction
from apprentice.train_config import ApprenticeTrainConfig, apply_local_rank, build_arg_parser, config_from_args
from apprentice.train_data import demo_scorer, embed_demos, encode_batch, encode_text, image_encoder_for, training_batches
from apprentice.train_state import Ema, agree_on_output, resume_state, save_checkpoint
from suti import storage
from suti.errors import InputError

log = logging.getLogger(__name__)

#: This module's names and those it re-exports (importable from here, as before the split).
__all__ = ["ApprenticeModule", "ApprenticeTrainConfig", "DIST_ENV", "apply_local_rank", "build_arg_parser", "build_engine", "caption_teacher", "check_inputs",
           "config_from_args", "denoising_loss", "embed_demos", "image_encoder_for", "init_distributed", "main", "module_dtype", "param_groups",
           "teacher_prediction", "train_apprentice"]

_ds_config = load_deepspeed_config  # the name tests and older callers import


def check_inputs(config: ApprenticeTrainConfig) -> None:
    """Every check that needs no model: option ranges (each numeric option by its kind, as the
    command line parses it), the shard patterns (each weighted pattern on its own), the DeepSpeed
    config (``InputError`` naming the option, pattern or file). Run by the launching process too,
    so a bad option never reaches torchrun's workers, and before the output is claimed, so a
    refused run writes nothing (not even ``logs/``) and the next run does not find the output
    "not empty"."""
    from apprentice.data import expand_shards
    from suti.models import check_model

    config.validate()
    check_model(config.model)
    expand_shards(config.shards)
    if config.shard_weights is not None:  # each weighted pattern is read as a stream of its own
        patterns = [config.shards] if isinstance(config.shards, str) else list(config.shards)
        for pattern, weight in zip(patterns, config.shard_weights):
            if weight > 0:
                expand_shards(pattern)
    load_deepspeed_config(config.deepspeed_config, config, "cpu")  # exists, is a JSON object, its precision fits


def warn_about_schedule(config: ApprenticeTrainConfig) -> None:
    """Log one warning when the DeepSpeed config's learning-rate schedule warms up for at least
    ``--steps`` steps: the run ends before the rate reaches ``--learning-rate``."""
    ds = load_deepspeed_config(config.deepspeed_config, config, "cpu")
    scheduler = ds.get("scheduler") if isinstance(ds.get("scheduler"), dict) else {}
    params = scheduler.get("params") if isinstance(scheduler.get("params"), dict) else {}
    warmup = params.get("warmup_num_steps")
    if isinstance(warmup, (int, float)) and not isinstance(warmup, bool) and warmup >= config.steps:
        log.warning("the DeepSpeed config's %s scheduler warms up for %s steps, not fewer than --steps %d: the learning rate never reaches "
                    "its set value in this run (shorten warmup_num_steps or raise --steps)", scheduler.get("type", "learning-rate"), warmup, config.steps)


def train_apprentice(config: ApprenticeTrainConfig, *, resume: str | None = None, overwrite: bool = False, progress: bool = True) -> Path | str:
    """Train an apprentice; rank 0 writes ``OUTPUT`` (a path or URI) as an ``ApprenticePipeline`` folder.

    Every ``save_steps`` (and at the end) a checkpoint holding only the trainable parameters,
    their optimizer state, the step, the data position and the resolved config goes to
    ``OUTPUT/checkpoints/step-N`` (:mod:`apprentice.checkpoint`). ``resume="latest"`` continues
    from the newest intact one, at any world size.

    Returns:
        The output: a :class:`Path` when local, else the URI.

    Raises:
        InputError: bad shards or DeepSpeed config, a non-empty output without resume/overwrite,
            checkpoints of which none is intact, or a checkpoint trained with other settings
            (:data:`apprentice.checkpoint.TRAINABLE_KEYS`).
    """
    owned = "RANK" not in os.environ  # not launched: this call sets up a world of one
    try:
        return _train_apprentice(config, resume=resume, overwrite=overwrite, progress=progress)
    finally:
        if owned:  # leave no RANK/MASTER_PORT to the caller's later subprocesses (the process
            for key in DIST_ENV:  # group stays: DeepSpeed keeps references to its groups)
                os.environ.pop(key, None)


def _train_apprentice(config: ApprenticeTrainConfig, *, resume: str | None, overwrite: bool, progress: bool) -> Path | str:
    from suti.denoisers import denoiser_module
    from suti.models import default_resolution
    from suti.objectives import training_objective

    config.output = output = storage.resolve(config.output)
    config.resolution = config.resolution or default_resolution(config.model)
    config.image_encoder = image_encoder_for(config)
    check_inputs(config)  # fail early (bad options, shard patterns), before any process group or model
    rank, world, device = init_distributed()
    if rank == 0:
        warn_about_schedule(config)
    decision = agree_on_output(config, resume, overwrite, rank)
    if decision.get("finished"):
        msg = f"{output}: this run already finished at step {decision['state']['step']} (--steps {config.steps}); nothing to do (raise --steps to train on)"
        log.warning(msg)
        if rank == 0:
            print(f"suti: {msg}", file=sys.stderr)
        return storage.local_path(output) or output
    torch.manual_seed(config.seed + rank)

    scorer = demo_scorer(config)
    base, module, engine, trainable, dtype = build_engine(config, device, scorer)
    teacher = caption_teacher(config, denoiser_module(base))  # before resuming: the base model's weights
    step, ema = resume_state(decision, config, engine, module, trainable, rank, world, device)
    objective = training_objective(base.scheduler, snr_gamma=config.snr_gamma)  # epsilon/v (DDPM) or flow matching (FLUX)
    data_seed = config.seed + 1000 * step
    data = training_batches(config, data_seed)
    try:  # shards that yield no sample fail here, before logs/ is written; the folder this run made goes too
        data = itertools.chain([next(data)], data)
    except InputError:
        local = storage.local_path(output)
        if rank == 0 and local is not None and local.is_dir() and not any(local.iterdir()):
            local.rmdir()
        raise
    log_dir = storage.local_path(storage.join(output, "logs")) or Path(tempfile.mkdtemp(prefix="suti-logs-")) / "logs"
    writer = _writer(log_dir) if rank == 0 else None
    gen = torch.Generator().manual_seed((config.seed * 7919 + rank + 104729 * step) % 2**64)  # any --seed (up to 2**63 - 1): torch takes 64 bits
    run = _Run(config, rank, world, device, base, module, engine, trainable, dtype, scorer, teacher, ema, objective, gen, encode_text(base, [""], device, config.resolution))

    start_step = step
    step, loss, elapsed = _train_steps(run, data, step, data_seed, writer, progress)
    if rank == 0:
        _write_outputs(run, step, step - start_step, elapsed, loss)
        _close_logs(writer, log_dir, output)
        log.info("apprentice written to %s (%d steps, %.1f s)", output, step, elapsed)
    torch.distributed.barrier()
    return storage.local_path(output) or output


@dataclass
class _Run:
    """What the training loop works with, on every rank."""

    config: ApprenticeTrainConfig
    rank: int
    world: int
    device: str
    base: Any  # the base pipeline: its frozen VAE and text encoders encode the batches
    module: ApprenticeModule
    engine: Any  # the DeepSpeed engine wrapping module
    trainable: list  # (name, parameter) of what trains
    dtype: torch.dtype  # the module's dtype (the DeepSpeed config's precision)
    scorer: Any  # embeds the demos for the subject channel (or None)
    teacher: Any  # the --caption-distillation teacher U-Net (or None)
    ema: Ema | None
    objective: Any  # the base's training objective (suti.objectives)
    gen: torch.Generator  # this rank's generator of dropout, noise and timesteps
    null_cond: Any  # the empty prompt's Conditioning (dropped text)


def _train_steps(run: _Run, data, step: int, data_seed: int, writer, progress: bool) -> tuple[int, torch.Tensor | None, float]:
    """Steps from ``step`` to ``--steps``: each logged (progress bar, TensorBoard), a checkpoint
    every ``--save-steps`` and at the end. Returns the last step, the last loss (``None``
    without a step) and the seconds the steps took."""
    config = run.config
    ckpt_uri = storage.join(config.output, "checkpoints")
    bar = tqdm(total=config.steps, initial=step, desc="apprentice", unit="step", disable=not progress or run.rank != 0)
    started = time.perf_counter()
    loss = None
    while step < config.steps:
        loss = _training_step(run, next(data))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if writer:
            writer.add_scalar("loss/train", loss.item(), step)
        if (config.save_steps and step % config.save_steps == 0) or step == config.steps:
            save_checkpoint(run.engine, run.trainable, ckpt_uri, step, config, run.ema, run.rank, run.world, data_seed)
    bar.close()
    return step, loss, time.perf_counter() - started


def _training_step(run: _Run, batch: dict) -> torch.Tensor:
    """One DeepSpeed step on a collated batch: encoded, conditioning dropped for guidance, noised
    at random timesteps, the loss backpropagated, the optimizer and the EMA stepped. Returns
    the loss (a scalar)."""
    config, device = run.config, run.device
    b = batch["demos"].shape[0]
    x = encode_batch(run.base, batch, device, config.resolution, run.gen, run.scorer)
    text_cond, mask = guidance_dropout(config, b, x.text_cond, run.null_cond, run.gen, device)
    noise = torch.randn(x.target.shape, generator=run.gen).to(device)
    t = run.objective.draw_timesteps(b, run.gen).to(device)
    teacher_pred, teacher_weight = distillation_targets(run.teacher, run.objective, x.target, noise, t, batch["teacher_prompt"], batch["prompt"], config.caption_distillation,
                                                        lambda prompts: encode_text(run.base, prompts, device, config.resolution))
    loss = denoising_loss(run.engine, run.objective, x.target, noise, t, text_cond.encoder_hidden_states, x.demos, x.demo_emb, mask, run.dtype, text_cond.added_cond_kwargs, x.demo_cond.added_cond_kwargs, x.image_embeds, config.snr_gamma, teacher_pred, teacher_weight)
    run.engine.backward(loss)
    run.engine.step()
    if run.ema:
        run.ema.update(run.module)
    return loss


def _write_outputs(run: _Run, step: int, steps_this_run: int, elapsed: float, loss: torch.Tensor | None) -> None:
    """Rank 0: the trained ``ApprenticePipeline`` (EMA weights with ``--ema-decay``) and
    ``training.json`` into the output."""
    from apprentice.pipeline import ApprenticePipeline

    config, base, output = run.config, run.base, run.config.output
    if run.ema:
        run.ema.copy_to(run.module)
    merge_base_lora(run.module)  # --base-lora-rank: the saved base is plain
    if hasattr(base, "transformer"):  # FLUX (apprentice.flux_pipeline)
        from apprentice.flux_pipeline import FluxApprenticePipeline

        pipe = FluxApprenticePipeline(base.scheduler, base.vae, base.text_encoder, base.tokenizer, base.text_encoder_2, base.tokenizer_2, base.transformer, run.module.adapter)
    else:
        pipe = ApprenticePipeline(base.unet, base.vae, base.text_encoder, base.tokenizer, base.scheduler, run.module.adapter,
                                  text_encoder_2=getattr(base, "text_encoder_2", None), tokenizer_2=getattr(base, "tokenizer_2", None))
    _save_pipeline(pipe, output)
    info = {"config": asdict(config), "resolution": config.resolution, "prediction_type": getattr(run.objective.scheduler.config, "prediction_type", None) or run.objective.kind, "steps": step, "steps_this_run": steps_this_run, "world_size": run.world, "seconds": round(elapsed, 1), "final_loss": None if loss is None else loss.item()}
    storage.write_text(storage.join(output, "training.json"), json.dumps(info, indent=2))


def _close_logs(writer, log_dir: Path, output: str) -> None:
    """Rank 0: close the TensorBoard writer; upload its logs to an object-store output."""
    if writer:
        writer.close()
        if storage.local_path(output) is None:
            storage.upload(log_dir, storage.join(output, "logs"))


def _save_pipeline(pipe, output: str) -> None:
    """``save_pretrained`` into ``output`` (through a local folder and an upload for object stores)."""
    local = storage.local_path(output)
    if local is not None:
        storage.save_pretrained_atomic(pipe, local, safe_serialization=True)
        return
    with tempfile.TemporaryDirectory(prefix="suti-apprentice-") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        storage.upload(tmp, output)


def _writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m apprentice.train`` (for torchrun / deepspeed launchers)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_arg_parser().parse_args(argv)
    apply_local_rank(args)
    from suti.cli_format import report_errors

    def run() -> int:
        train_apprentice(config_from_args(args), resume=args.resume, overwrite=args.overwrite)
        return 0

    return report_errors(run, prog="apprentice.train")


if __name__ == "__main__":
    raise SystemExit(main())
