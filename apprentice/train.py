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
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from apprentice.train_config import ApprenticeTrainConfig, apply_local_rank, build_arg_parser, config_from_args  # noqa: F401 (re-exported)
from apprentice.checkpoint import CorruptCheckpointError, config_differences, learning_rate_changes, gather_trainable, read_tensors, scatter_trainable, select_checkpoint, write_checkpoint
from suti import storage
from suti.errors import InputError

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The variables :func:`init_distributed` sets for an unlaunched run (a world of one).
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init_distributed() -> tuple[int, int, str]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU); single process if unlaunched."""
    import deepspeed

    if "RANK" not in os.environ:  # run directly (or one-process deepspeed launch without env): a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
        atexit.register(_destroy_process_group)  # the group it initialised (unlaunched or launched) lives as long as the process: DeepSpeed keeps references to it
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def _destroy_process_group() -> None:
    """At exit: release the default process group (registered by :func:`init_distributed` when it
    initialised one; NCCL warns of leaked resources otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class ApprenticeModule(torch.nn.Module):
    """What DeepSpeed wraps: U-Net + adapter; forward returns the predicted noise."""

    def __init__(self, unet, adapter):
        super().__init__()
        self.unet = unet
        self.adapter = adapter

    def forward(self, noisy, timesteps, text_emb, demo_latents, demo_emb, demo_mask, text_added=None, demo_added=None, image_embeds=None):
        """noisy (B, C, h, w), text_emb (B, L, D), demo_latents (B, n, C, h, w), demo_emb (B, n, L, D),
        demo_mask (B,); SDXL: ``text_added`` = {text_embeds (B, P), time_ids (B, 6)} and
        ``demo_added`` the same for the B * n demonstrations (:mod:`suti.conditioning`);
        ``image_embeds`` (B, n, D): the demos' image embeddings for the subject channel (or ``None``)."""
        ctx = self.adapter.encode_demos(self.unet, demo_latents, demo_emb, added_cond_kwargs=demo_added, image_embeds=image_embeds)
        ctx.mask = demo_mask
        extra = {} if text_added is None else {"added_cond_kwargs": text_added}
        return self.unet(noisy, timesteps, text_emb, cross_attention_kwargs={"demo": ctx}, **extra).sample


def _ds_config(path: str, config: ApprenticeTrainConfig, device: str) -> dict:
    from suti import storage
    from suti.models import config_path

    if storage.is_remote(path):  # every rank reads it: object storage, not one node's disk
        if not storage.isfile(path):
            raise InputError(f"--deepspeed-config {path}: no such DeepSpeed config")
        text = storage.read_text(path)
    else:
        p = config_path("deepspeed", storage.resolve(path) if "://" in path else path, ".json")
        if not p.is_file():
            raise InputError(f"{path}: no such DeepSpeed config")
        text = p.read_text()
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--deepspeed-config {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(ds, dict):
        raise InputError(f"--deepspeed-config {path}: a DeepSpeed config is a JSON object")
    ds["train_micro_batch_size_per_gpu"] = config.batch_size
    ds.pop("train_batch_size", None)
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = device == "cuda" and torch.cuda.is_bf16_supported()
    fp16 = ds.get("fp16")
    if fp16 is not None and fp16.get("enabled") == "auto":
        fp16["enabled"] = device == "cuda" and not bf16["enabled"]
    if fp16 and fp16.get("enabled") and int(ds.get("zero_optimization", {}).get("stage", 0)) == 0:
        raise InputError(f"{path}: fp16 needs ZeRO stage 1 or 2 (its checkpoints are gathered per parameter)")
    return ds


def module_dtype(engine) -> torch.dtype:
    """The dtype DeepSpeed gave the wrapped module (fp32, or bf16/fp16 by the config); inputs are cast to it."""
    return next(engine.module.parameters()).dtype


def denoising_loss(model, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, text_emb: torch.Tensor, demo_latents: torch.Tensor, demo_emb: torch.Tensor, demo_mask: torch.Tensor, dtype: torch.dtype = torch.float32, text_added: dict | None = None, demo_added: dict | None = None, image_embeds: torch.Tensor | None = None, snr_gamma: float | None = None, teacher: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The apprentice's training loss on one batch (a scalar, fp32).

    Args:
        model: :class:`ApprenticeModule` or the DeepSpeed engine wrapping it.
        scheduler: the base model's noise scheduler; its ``config.prediction_type`` picks the
            target (``suti.losses.denoising_target``: noise, ``get_velocity``, or the latents).
        latents: (B, C, h, w) scaled clean latents; noise: the same shape; timesteps: (B,).
        text_emb: (B, L, D); demo_latents: (B, n, C, h, w); demo_emb: (B, n, L, D); demo_mask: (B,).
        dtype: the module's dtype; every input is cast to it (fp16/bf16 DeepSpeed configs).
        text_added, demo_added: SDXL's added conditioning of the targets and the demonstrations
            (see :class:`ApprenticeModule`); ``None`` for SD 1.x/2.x.
        image_embeds: (B, n, D) image embeddings of the demos, for the subject channel (or ``None``).
        snr_gamma: Min-SNR-gamma weights per sample (``suti.losses.snr_weights``, as the experts'
            ``snr_gamma`` and diffusers' training scripts); ``None``: the plain mean squared error.
        teacher, teacher_weight: ``--caption-distillation``: (B, C, h, w) predictions of a teacher
            (:func:`teacher_prediction`) and (B,) weights ``w`` in [0, 1]; each row's target becomes
            ``(1 - w) * target + w * teacher``. ``None``: the true target only.
    """
    from suti.losses import denoising_target, per_sample_mse, snr_weights

    noisy = scheduler.add_noise(latents, noise, timesteps)
    cast = lambda d: None if d is None else {k: v.to(dtype) for k, v in d.items()}  # noqa: E731
    pred = model(noisy.to(dtype), timesteps, text_emb.to(dtype), demo_latents.to(dtype), demo_emb.to(dtype), demo_mask.to(dtype), cast(text_added), cast(demo_added), None if image_embeds is None else image_embeds.to(dtype))
    target = denoising_target(scheduler, latents, noise, timesteps)
    if teacher is not None:
        w = teacher_weight.to(target.device, target.dtype).view(-1, *([1] * (target.dim() - 1)))
        target = target + w * (teacher.to(target.device, target.dtype) - target)
    if snr_gamma is None:
        return torch.nn.functional.mse_loss(pred.float(), target.float())
    return (per_sample_mse(pred, target) * snr_weights(scheduler, timesteps, snr_gamma).to(pred.device)).mean()


def caption_teacher(config: ApprenticeTrainConfig, unet):
    """The frozen U-Net of ``--caption-distillation`` (``None`` when it is off).

    Learning from privileged information (Vapnik & Vashist 2009; the distillation form of Lopez-Paz
    et al. 2016): a reconstruction example's prompt names only the class, but its target photo
    has an alt text that describes the subject. The base model given that alt text predicts what
    the caption adds (whatever it names: in the world, colour and pattern, not parts or
    proportions; and the scene), and since the demonstrations are
    photos of the same subject, that prediction is a low-variance target for what the
    demonstrations should add. With ``--freeze-base`` the teacher is the training U-Net itself,
    called without demonstrations (exactly the base model); otherwise a frozen copy taken before
    training or resuming (one more U-Net in memory: 3.4 GB for SD 1.5 in fp32).
    """
    if not config.caption_distillation:
        return None
    if config.freeze_base:
        return unet
    import copy

    from diffusers.models.attention_processor import AttnProcessor2_0

    teacher = copy.deepcopy(unet).requires_grad_(False).eval()
    teacher.set_attn_processor(AttnProcessor2_0())  # the copy's demonstration processors are never used
    return teacher


def teacher_prediction(teacher, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
    """The teacher's prediction (B, C, h, w), fp32, in the scheduler's ``prediction_type``, on the
    same noisy latents as the student; ``cond``: the privileged captions'
    :class:`suti.conditioning.Conditioning` (B rows). No demonstrations, no gradient."""
    dtype = next(teacher.parameters()).dtype
    noisy = scheduler.add_noise(latents, noise, timesteps).to(dtype)
    extra = {} if cond.added_cond_kwargs is None else {"added_cond_kwargs": {k: v.to(dtype) for k, v in cond.added_cond_kwargs.items()}}
    with torch.no_grad():
        return teacher(noisy, timesteps, cond.encoder_hidden_states.to(dtype), **extra).sample.float()


def param_groups(module, config: ApprenticeTrainConfig) -> list[dict]:
    """The optimizer's parameter groups: the adapter's trainable weights at ``--learning-rate``
    and, when the base trains (no ``--freeze-base``) and ``--base-learning-rate`` is set, the
    U-Net's at that rate; without it one group holds both at ``--learning-rate``. Empty groups are
    left out."""
    adapter = [p for p in module.adapter.parameters() if p.requires_grad]
    base = [p for p in module.unet.parameters() if p.requires_grad]
    if config.base_learning_rate is None:  # one group, as before the option
        return [{"params": base + adapter, "lr": config.learning_rate}]  # the module's order
    return [g for g in ({"params": adapter, "lr": config.learning_rate}, {"params": base, "lr": config.base_learning_rate}) if g["params"]]


def _optimizer(params, config: ApprenticeTrainConfig):
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=config.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)
    raise InputError(f"unknown optimizer {config.optimizer!r} (adamw or adafactor)")


def build_engine(config: ApprenticeTrainConfig, device: str, scorer=None):
    """Base pipeline, :class:`ApprenticeModule`, DeepSpeed engine, trainable ``(name, param)`` list, module dtype.

    ``scorer``: the built ``config.image_encoder`` scorer, whose embedding size sizes the subject
    channel (``None``: for_unet builds one to measure it)."""
    import deepspeed

    from apprentice.adapter import DemoAttentionAdapter, image_embedding_size
    from suti.models import load_pipeline

    base = load_pipeline(config.model, device=device)
    unet = base.unet
    base.vae.requires_grad_(False)
    base.text_encoder.requires_grad_(False)
    if getattr(base, "text_encoder_2", None) is not None:  # SDXL
        base.text_encoder_2.requires_grad_(False)
    unet.requires_grad_(not config.freeze_base)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    embed_dim = None if scorer is None else image_embedding_size(scorer)  # measured on the training loop's scorer: built once
    adapter = DemoAttentionAdapter.for_unet(unet, demo_timestep=config.demo_timestep, method=config.method,
                                            subject_tokens=config.subject_tokens, image_encoder=config.image_encoder, image_embed_dim=embed_dim,
                                            position_bias=config.demo_position_bias)
    adapter.install(unet)
    module = ApprenticeModule(unet, adapter)
    groups = param_groups(module, config)
    params = [p for g in groups for p in g["params"]]
    ds_config = _ds_config(config.deepspeed_config, config, device)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, optimizer=_optimizer(groups, config), config=ds_config)
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    return base, module, engine, trainable, module_dtype(engine)


def _prepare_output(config: ApprenticeTrainConfig, resume: str | None, overwrite: bool) -> dict:
    """Rank 0: check or clear the output, pick the checkpoint to resume from; a dict for every rank."""
    output = config.output
    ckpt_uri = storage.join(output, "checkpoints")
    entries = storage.listdir(output)
    if entries and not resume and not overwrite:
        raise InputError(f"{output}: output folder is not empty; pass --resume latest or --overwrite")
    if overwrite and not resume and entries:
        fs, path = storage.filesystem(output)
        fs.rm(path, recursive=True)
    storage.makedirs(output)
    if not resume:
        return {}
    chosen = select_checkpoint(ckpt_uri, resume)
    if chosen is None:
        log.info("%s holds no checkpoint; starting at step 0", ckpt_uri)
        return {}
    tag, state = chosen
    diff = config_differences(state["config"], asdict(config))
    if diff:
        raise InputError(f"{storage.join(ckpt_uri, tag)} was trained with other settings: {', '.join(diff)}; resume with the same settings, or pass --overwrite to start again")
    changed = learning_rate_changes(state["config"], asdict(config))
    if changed:  # allowed (a schedule by hand), but never silent: a forgotten --base-learning-rate trains the U-Net at --learning-rate
        log.warning("%s: resuming with other learning rates: %s; the new values apply from step %d on", storage.join(ckpt_uri, tag), ", ".join(changed), int(state["step"]) + 1)
    finished = int(state["step"]) >= config.steps and storage.isfile(storage.join(output, "model_index.json"))
    return {"tag": tag, "state": state, "finished": finished}


def _read_and_share(tag_uri: str, state: dict, rank: int, world: int, device: str, names: list[str], *, want_ema: bool):
    """Rank 0 reads a checkpoint's tensors and broadcasts them, so no other node needs to see the output.

    Returns ``(weights, optimizer, ema or None)`` on every rank (CPU fp32 tensors).

    Raises:
        InputError: a file fails its sha256 or safetensors check, or the checkpoint trains other
            parameters than this run.
    """
    files: dict = {}
    meta: dict = {}
    if rank == 0:
        try:
            files["weights"] = read_tensors(tag_uri, state, "trainable.safetensors")
            files["optim"] = read_tensors(tag_uri, state, "optimizer.safetensors")
            if want_ema and "ema.safetensors" in state["files"]:
                files["ema"] = read_tensors(tag_uri, state, "ema.safetensors")
            if set(files["weights"]) != set(names):
                missing, extra = sorted(set(names) - set(files["weights"])), sorted(set(files["weights"]) - set(names))
                raise InputError(f"{tag_uri} trains other parameters than this run ({len(missing)} missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})")
            meta = {part: {k: list(t.shape) for k, t in d.items()} for part, d in files.items()}
        except (CorruptCheckpointError, InputError) as exc:
            meta = {"error": f"cannot resume: {exc}"}
    if world > 1:
        meta = _broadcast(meta)
    if "error" in meta:
        raise InputError(meta["error"])
    if world > 1:
        for part, shapes in meta.items():
            received = {}
            for key, shape in shapes.items():  # one tensor at a time: peak memory of one tensor on the device
                t = files[part][key].to(device) if rank == 0 else torch.empty(shape, dtype=torch.float32, device=device)
                torch.distributed.broadcast(t, src=0)
                received[key] = t.cpu()
            files[part] = received
    return files["weights"], files["optim"], files.get("ema")


def _broadcast(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def check_inputs(config: ApprenticeTrainConfig) -> None:
    """Every check that needs no model: option ranges, the shard patterns, the DeepSpeed config
    (``InputError`` naming the option, pattern or file). Run by the launching process too, so a
    bad option never reaches torchrun's workers."""
    from apprentice.data import expand_shards
    from suti.models import check_model, config_path

    config.validate()
    check_model(config.model)
    expand_shards(config.shards)
    if not config_path("deepspeed", config.deepspeed_config, ".json").is_file():
        raise InputError(f"{config.deepspeed_config}: no such DeepSpeed config")


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
    from diffusers import DDPMScheduler

    from apprentice.data import collate, make_pipeline
    from apprentice.pipeline import ApprenticePipeline
    from suti.models import default_resolution

    config.output = output = storage.resolve(config.output)
    config.resolution = config.resolution or default_resolution(config.model)
    config.image_encoder = image_encoder_for(config)
    check_inputs(config)  # fail early (bad options, shard patterns), before any process group or model
    rank, world, device = init_distributed()
    decision: dict = {}
    if rank == 0:
        try:
            decision = _prepare_output(config, resume, overwrite)
        except InputError as exc:
            decision = {"error": str(exc)}
    decision = _broadcast(decision)
    if "error" in decision:
        raise InputError(decision["error"])
    if decision.get("finished"):
        msg = f"{output}: this run already finished at step {decision['state']['step']} (--steps {config.steps}); nothing to do (raise --steps to train on)"
        log.warning(msg)
        if rank == 0:
            print(f"suti: {msg}", file=sys.stderr)
        return storage.local_path(output) or output
    torch.manual_seed(config.seed + rank)

    from apprentice.adapter import UNET_FEATURES

    scorer = None  # embeds the demos for the subject channel (none when it reads the U-Net's features)
    if config.subject_tokens and config.image_encoder != UNET_FEATURES:
        from suti.scoring import get_scorer

        scorer = get_scorer(config.image_encoder)
    base, module, engine, trainable, dtype = build_engine(config, device, scorer)
    unet, vae, text_encoder, adapter = base.unet, base.vae, base.text_encoder, module.adapter
    teacher = caption_teacher(config, unet)  # before resuming: the base model's weights
    resolution = config.resolution

    ckpt_uri = storage.join(output, "checkpoints")
    step = 0
    ema_state = None
    if decision.get("tag"):
        tag_uri = storage.join(ckpt_uri, decision["tag"])
        state = decision["state"]
        weights, optim, ema_state = _read_and_share(tag_uri, state, rank, world, device, [n for n, _ in trainable], want_ema=config.ema_decay > 0)
        scatter_trainable(engine, trainable, weights, optim, state.get("scalars", {}))
        step = int(state["step"])
        log.info("resumed from %s at step %d (world size then %d, now %d)", tag_uri, step, state.get("world_size", 0), world)
    ema = _Ema(module, config.ema_decay) if config.ema_decay > 0 else None  # after resuming: starts from the resumed weights
    if ema and ema_state:
        ema.shadow.update(ema_state)

    scheduler = DDPMScheduler.from_config(base.scheduler.config)
    data_seed = config.seed + 1000 * step
    dataset = make_pipeline(config.shards, resolution=resolution, num_demos=config.num_demos, seed=data_seed, num_workers=config.num_workers, min_delta_clip=config.min_delta_clip, self_target=config.self_target, caption_prompt=config.caption_prompt, demo_caption=config.demo_caption, copy_view=config.copy_view, weights=config.shard_weights, resampled=config.resampled_shards)
    data = iter(torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, collate_fn=collate, num_workers=config.num_workers))
    log_dir = storage.local_path(storage.join(output, "logs")) or Path(tempfile.mkdtemp(prefix="suti-logs-")) / "logs"
    writer = _writer(log_dir) if rank == 0 else None
    gen = torch.Generator().manual_seed(config.seed * 7919 + rank + 104729 * step)
    null_cond = _encode(base, [""], device, resolution)
    bar = tqdm(total=config.steps, initial=step, desc="apprentice", unit="step", disable=not progress or rank != 0)
    started = time.perf_counter()
    start_step, loss = step, None
    while step < config.steps:
        batch = next(data)
        b, n = batch["demos"].shape[:2]
        with torch.no_grad():
            target = vae.encode(batch["target"].to(device)).latent_dist.sample(gen if device == "cpu" else None) * vae.config.scaling_factor
            demos = vae.encode(batch["demos"].flatten(0, 1).to(device)).latent_dist.mean * vae.config.scaling_factor
            demos = demos.view(b, n, *demos.shape[1:])  # (B, n, C, h, w)
            text_cond = _encode(base, batch["prompt"], device, resolution)  # (B, L, D) (+ SDXL pooled, time ids)
            demo_cond = _encode(base, [c for caps in batch["demo_captions"] for c in caps], device, resolution)  # B * n
            demo_emb = demo_cond.encoder_hidden_states.view(b, n, *demo_cond.encoder_hidden_states.shape[1:])
            image_embeds = None if scorer is None else embed_demos(scorer, batch["demos"]).to(device)  # (B, n, D)
        u = torch.rand(b, generator=gen)
        drop_both = u < config.drop_both
        drop_text = drop_both | ((u >= config.drop_both) & (u < config.drop_both + config.drop_text))
        drop_demo = drop_both | ((u >= config.drop_both + config.drop_text) & (u < config.drop_both + config.drop_text + config.drop_demos))
        text_cond = text_cond.where(drop_text, null_cond)  # dropped text: the empty prompt's conditioning
        mask = (~drop_demo).float().to(device)
        noise = torch.randn(target.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen).to(device)
        teacher_pred = teacher_weight = None
        has_caption = [bool(p) for p in batch["teacher_prompt"]]
        if teacher is not None and any(has_caption):
            captions = [p if p else q for p, q in zip(batch["teacher_prompt"], batch["prompt"])]  # rows without one: weight 0
            teacher_pred = teacher_prediction(teacher, scheduler, target, noise, t, _encode(base, captions, device, resolution))
            teacher_weight = torch.tensor(has_caption, dtype=torch.float32) * config.caption_distillation
        loss = denoising_loss(engine, scheduler, target, noise, t, text_cond.encoder_hidden_states, demos, demo_emb, mask, dtype, text_cond.added_cond_kwargs, demo_cond.added_cond_kwargs, image_embeds, config.snr_gamma, teacher_pred, teacher_weight)
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
            _save_checkpoint(engine, trainable, ckpt_uri, step, config, ema, rank, world, data_seed)
    bar.close()
    elapsed = time.perf_counter() - started
    if rank == 0:
        if ema:
            ema.copy_to(module)
        pipe = ApprenticePipeline(unet, vae, text_encoder, base.tokenizer, base.scheduler, adapter,
                                  text_encoder_2=getattr(base, "text_encoder_2", None), tokenizer_2=getattr(base, "tokenizer_2", None))
        _save_pipeline(pipe, output)
        info = {"config": asdict(config), "resolution": resolution, "prediction_type": scheduler.config.prediction_type, "steps": step, "steps_this_run": step - start_step, "world_size": world, "seconds": round(elapsed, 1), "final_loss": None if loss is None else loss.item()}
        storage.write_text(storage.join(output, "training.json"), json.dumps(info, indent=2))
        if writer:
            writer.close()
            if storage.local_path(output) is None:
                storage.upload(log_dir, storage.join(output, "logs"))
        log.info("apprentice written to %s (%d steps, %.1f s)", output, step, elapsed)
    torch.distributed.barrier()
    return storage.local_path(output) or output


def image_encoder_for(config: ApprenticeTrainConfig) -> str | None:
    """The scorer that embeds the demos for the subject channel: ``--image-encoder``, else the
    model's scorer (:func:`suti.scoring.model_scorer`: a preset's ``scorer``, ``toy-clip`` for the
    world presets), or ``"unet-features"`` (:data:`apprentice.adapter.UNET_FEATURES`: a resampler
    over the demos' own U-Net features); ``None`` without a channel (so it never decides a resume)."""
    if not config.subject_tokens:
        return None
    from suti.scoring import model_scorer

    return config.image_encoder or model_scorer(config.model)


def embed_demos(scorer, demos: torch.Tensor) -> torch.Tensor:
    """(B, n, 3, R, R) demos in [-1, 1] -> (B, n, D) unit-norm image embeddings (``scorer``'s, no grad)."""
    from suti.images import to_pil

    b, n = demos.shape[:2]
    with torch.no_grad():
        emb = scorer.embed_images([to_pil(x) for x in demos.flatten(0, 1)])  # (B * n, D)
    return emb.view(b, n, -1)


def _save_pipeline(pipe, output: str) -> None:
    """``save_pretrained`` into ``output`` (through a local folder and an upload for object stores)."""
    local = storage.local_path(output)
    if local is not None:
        storage.save_pretrained_atomic(pipe, local, safe_serialization=True)
        return
    with tempfile.TemporaryDirectory(prefix="suti-apprentice-") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        storage.upload(tmp, output)


def _encode(base, prompts: list[str], device: str, resolution: int):
    """Frozen text conditioning of ``prompts`` (:class:`suti.conditioning.Conditioning`, on ``device``)."""
    from suti.conditioning import encode_prompt

    with torch.no_grad():
        return encode_prompt(base, prompts, resolution=resolution).to(device)


def _save_checkpoint(engine, trainable, ckpt_uri: str, step: int, config, ema, rank: int, world: int, data_seed: int) -> None:
    """Gather the trainable state on every rank; rank 0 writes it (see :mod:`apprentice.checkpoint`)."""
    params, optim, scalars = gather_trainable(engine, trainable)
    if rank == 0:
        tensors = {"trainable.safetensors": params, "optimizer.safetensors": optim}
        if ema:
            tensors["ema.safetensors"] = ema.shadow
        data = {"seed": data_seed, "samples_seen": step * config.batch_size * world}
        write_checkpoint(ckpt_uri, step, tensors, {"config": asdict(config), "world_size": world, "scalars": scalars, "data": data}, config.keep_checkpoints)
    torch.distributed.barrier()


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
