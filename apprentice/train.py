"""Apprentice training with DeepSpeed on the generation job's shards.

Objective (SuTI): the apprentice denoises the expert's output ``y`` given the target prompt and
3 demonstrations of the subject, || eps - eps_theta(z_t, t, p, demos) ||^2, with text, demos and
both dropped at small rates for classifier-free guidance. The base U-Net is trainable (paper) or
frozen (``--freeze-base``: only the demonstration-attention layers train).

Launch: one process directly (``suti apprentice train``), or N with any standard launcher:
``torchrun --nproc_per_node 2 -m apprentice.train ...``, ``deepspeed --num_gpus 8 -m
apprentice.train ...`` (``suti apprentice train --nproc N`` runs torchrun for you). On CPU the
gloo backend is used; on GPU NCCL and bf16.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from apprentice.train_config import ApprenticeTrainConfig, build_arg_parser, config_from_args
from suti import storage
from suti.errors import InputError

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, str]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU); single process if unlaunched."""
    import deepspeed

    if "RANK" not in os.environ:  # run directly: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


class ApprenticeModule(torch.nn.Module):
    """What DeepSpeed wraps: U-Net + adapter; forward returns the predicted noise."""

    def __init__(self, unet, adapter):
        super().__init__()
        self.unet = unet
        self.adapter = adapter

    def forward(self, noisy, timesteps, text_emb, demo_latents, demo_emb, demo_mask):
        """noisy (B, C, h, w), text_emb (B, L, D), demo_latents (B, n, C, h, w), demo_emb (B, n, L, D), demo_mask (B,)."""
        ctx = self.adapter.encode_demos(self.unet, demo_latents, demo_emb)
        ctx.mask = demo_mask
        return self.unet(noisy, timesteps, text_emb, cross_attention_kwargs={"demo": ctx}).sample


def _ds_config(path: str, config: ApprenticeTrainConfig, device: str) -> dict:
    from suti.models import config_path

    p = config_path("deepspeed", path, ".json")
    if not p.is_file():
        raise InputError(f"{path}: no such DeepSpeed config")
    ds = json.loads(p.read_text())
    ds["train_micro_batch_size_per_gpu"] = config.batch_size
    ds.pop("train_batch_size", None)
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = device == "cuda" and torch.cuda.is_bf16_supported()
    return ds


def _optimizer(params, config: ApprenticeTrainConfig):
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=config.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)
    raise InputError(f"unknown optimizer {config.optimizer!r} (adamw or adafactor)")


def check_inputs(config: ApprenticeTrainConfig) -> None:
    """Every check that needs no model: option ranges, the shard pattern, the DeepSpeed config
    (``InputError`` naming the option, pattern or file). Run by the launching process too, so a
    bad option never reaches torchrun's workers."""
    from apprentice.data import expand_shards
    from suti.models import config_path

    config.validate()
    expand_shards(config.shards)
    if not config_path("deepspeed", config.deepspeed_config, ".json").is_file():
        raise InputError(f"{config.deepspeed_config}: no such DeepSpeed config")


def train_apprentice(config: ApprenticeTrainConfig, *, resume: str | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Train an apprentice; rank 0 writes ``OUTPUT`` as an ``ApprenticePipeline`` folder.

    Checkpoints (``OUTPUT/checkpoints/step-N``, DeepSpeed format with the resolved config as client
    state) allow ``resume="latest"``.
    """
    import deepspeed
    from diffusers import DDPMScheduler

    from apprentice.adapter import DemoAttentionAdapter
    from apprentice.data import collate, make_pipeline
    from apprentice.pipeline import ApprenticePipeline
    from suti.models import default_resolution, load_pipeline

    output = Path(config.output)
    check_inputs(config)  # fail early, before any process group or model
    rank, world, device = init_distributed()
    if rank == 0:
        if output.is_dir() and any(output.iterdir()) and not resume and not overwrite:
            raise InputError(f"{output}: output folder is not empty; pass --resume latest or --overwrite")
        if overwrite and not resume and output.exists():
            shutil.rmtree(output)
        output.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    torch.manual_seed(config.seed + rank)

    base = load_pipeline(config.model, device=device)
    resolution = config.resolution or default_resolution(config.model)
    config.resolution = resolution
    unet, vae, text_encoder = base.unet, base.vae, base.text_encoder
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.requires_grad_(not config.freeze_base)
    adapter = DemoAttentionAdapter.for_unet(unet, demo_timestep=config.demo_timestep, method=config.method)
    adapter.install(unet)
    module = ApprenticeModule(unet, adapter)
    params = [p for p in module.parameters() if p.requires_grad]
    ds_config = _ds_config(config.deepspeed_config, config, device)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, optimizer=_optimizer(params, config), config=ds_config)
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32

    ckpt_dir = output / "checkpoints"
    step = 0
    if resume:
        tag = None if resume == "latest" else Path(resume).name
        if tag and not (ckpt_dir / tag).is_dir():
            raise InputError(f"{ckpt_dir / tag}: no such checkpoint (resume with \"latest\" or a folder in {ckpt_dir})")
        if (ckpt_dir / "latest").is_file() or tag:
            from suti.weights import loading

            with loading(f"{ckpt_dir / (tag or (ckpt_dir / 'latest').read_text().strip())} (DeepSpeed checkpoint)"):
                _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
                step = int(client["step"])
            log.info("resumed from %s at step %d", ckpt_dir, step)
    ema = _Ema(module, config.ema_decay) if config.ema_decay > 0 else None
    if ema and resume and (ckpt_dir / f"ema-step-{step}.safetensors").is_file():
        ema.load(ckpt_dir / f"ema-step-{step}.safetensors")

    scheduler = DDPMScheduler.from_config(base.scheduler.config)
    data = iter(torch.utils.data.DataLoader(make_pipeline(config.shards, resolution=resolution, num_demos=config.num_demos, seed=config.seed + 1000 * step, min_delta_clip=config.min_delta_clip, self_target=config.self_target, caption_prompt=config.caption_prompt), batch_size=config.batch_size, collate_fn=collate, num_workers=0))
    writer = _writer(output / "logs") if rank == 0 else None
    gen = torch.Generator().manual_seed(config.seed * 7919 + rank + 104729 * step)
    null_emb = _encode(base, [""], device)
    bar = tqdm(total=config.steps, initial=step, desc="apprentice", unit="step", disable=not progress or rank != 0)
    started = time.perf_counter()
    while step < config.steps:
        batch = next(data)
        b, n = batch["demos"].shape[:2]
        with torch.no_grad():
            target = vae.encode(batch["target"].to(device)).latent_dist.sample(gen if device == "cpu" else None) * vae.config.scaling_factor
            demos = vae.encode(batch["demos"].flatten(0, 1).to(device)).latent_dist.mean * vae.config.scaling_factor
            demos = demos.view(b, n, *demos.shape[1:])  # (B, n, C, h, w)
            text = _encode(base, batch["prompt"], device)  # (B, L, D)
            demo_emb = _encode(base, [c for caps in batch["demo_captions"] for c in caps], device).view(b, n, *text.shape[1:])
        u = torch.rand(b, generator=gen)
        drop_both = u < config.drop_both
        drop_text = drop_both | ((u >= config.drop_both) & (u < config.drop_both + config.drop_text))
        drop_demo = drop_both | ((u >= config.drop_both + config.drop_text) & (u < config.drop_both + config.drop_text + config.drop_demos))
        text = torch.where(drop_text.view(-1, 1, 1).to(device), null_emb.expand_as(text), text)
        mask = (~drop_demo).float().to(device)
        noise = torch.randn(target.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen).to(device)
        noisy = scheduler.add_noise(target, noise, t)
        pred = engine(noisy.to(dtype), t, text.to(dtype), demos.to(dtype), demo_emb.to(dtype), mask.to(dtype))
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        engine.backward(loss)
        engine.step()
        if ema:
            ema.update(module)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if writer:
            writer.add_scalar("loss/train", loss.item(), step)
        if (config.save_steps and step % config.save_steps == 0) or step == config.steps:
            _save_checkpoint(engine, ckpt_dir, step, config, ema, rank)
    bar.close()
    elapsed = time.perf_counter() - started
    if rank == 0:
        if ema:
            ema.copy_to(module)
        pipe = ApprenticePipeline(unet, vae, text_encoder, base.tokenizer, base.scheduler, adapter)
        storage.save_pretrained_atomic(pipe, output, safe_serialization=True)
        storage.write_text(output / "training.json", json.dumps({"config": asdict(config), "steps": step, "world_size": world, "seconds": round(elapsed, 1), "final_loss": loss.item()}, indent=2))
        if writer:
            writer.close()
        log.info("apprentice written to %s (%d steps, %.1f s)", output, step, elapsed)
    torch.distributed.barrier()
    return output


def _encode(base, prompts: list[str], device: str) -> torch.Tensor:
    ids = base.tokenizer(prompts, padding="max_length", max_length=base.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return base.text_encoder(ids.to(device))[0]


def _save_checkpoint(engine, ckpt_dir: Path, step: int, config, ema, rank: int) -> None:
    engine.save_checkpoint(str(ckpt_dir), tag=f"step-{step}", client_state={"step": step, "config": asdict(config)})
    if rank == 0:
        if ema:
            ema.save(ckpt_dir / f"ema-step-{step}.safetensors")
        tags = sorted((p for p in ckpt_dir.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
        for old in tags[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
            (ckpt_dir / f"ema-{old.name}.safetensors").unlink(missing_ok=True)


class _Ema:
    """Exponential moving average of the trainable parameters."""

    def __init__(self, module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        with storage.atomic_local_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.shadow.items()}, str(tmp))

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        from suti.weights import check_safetensors, loading

        with loading(check_safetensors(path)):
            self.shadow.update(load_file(str(path)))


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
    from suti.cli import report_errors

    def run() -> int:
        train_apprentice(config_from_args(args), resume=args.resume, overwrite=args.overwrite)
        return 0

    return report_errors(run, prog="apprentice.train")


if __name__ == "__main__":
    raise SystemExit(main())
