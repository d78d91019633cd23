"""The state of an apprentice training run on its output: claiming the output and choosing the
checkpoint to resume from (rank 0, shared with every rank), reading it back into the DeepSpeed
engine, saving checkpoints, and the EMA of the trainable weights. The checkpoint format is
:mod:`apprentice.checkpoint`'s.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch

from apprentice.checkpoint import CorruptCheckpointError, config_differences, gather_trainable, learning_rate_changes, read_tensors, scatter_trainable, select_checkpoint, write_checkpoint
from apprentice.distributed import broadcast_object
from apprentice.train_config import ApprenticeTrainConfig
from suti import storage
from suti.errors import InputError

log = logging.getLogger("apprentice.train")  # the training entry point's logger: its lines keep their name


def prepare_output(config: ApprenticeTrainConfig, resume: str | None, overwrite: bool) -> dict:
    """Rank 0: check or clear the output, pick the checkpoint to resume from; a dict for every rank:
    ``{}`` (start at step 0) or ``{"tag", "state", "finished"}`` (``finished``: the run already
    reached ``--steps`` and wrote its pipeline).

    Raises:
        InputError: a non-empty output without resume/overwrite, no intact checkpoint, or a
            checkpoint trained with other settings.
    """
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


def agree_on_output(config: ApprenticeTrainConfig, resume: str | None, overwrite: bool, rank: int) -> dict:
    """Every rank: rank 0's :func:`prepare_output` decision, broadcast.

    Raises:
        InputError: on every rank, where rank 0's :func:`prepare_output` raised it.
    """
    decision: dict = {}
    if rank == 0:
        try:
            decision = prepare_output(config, resume, overwrite)
        except InputError as exc:
            decision = {"error": str(exc)}
    decision = broadcast_object(decision)
    if "error" in decision:
        raise InputError(decision["error"])
    return decision


def resume_state(decision: dict, config: ApprenticeTrainConfig, engine, module, trainable: list, rank: int, world: int, device: str) -> tuple[int, Ema | None]:
    """Load the checkpoint ``decision`` names (if any) into ``engine`` (weights, optimizer state)
    and start the EMA (``--ema-decay``) from the resumed weights, or the checkpoint's EMA.
    Returns ``(step, ema)``: the step to continue from (0: a fresh run) and the EMA or ``None``.

    Raises:
        InputError: as :func:`read_and_share`.
    """
    step = 0
    ema_state = None
    if decision.get("tag"):
        tag_uri = storage.join(storage.join(config.output, "checkpoints"), decision["tag"])
        state = decision["state"]
        weights, optim, ema_state = read_and_share(tag_uri, state, rank, world, device, [n for n, _ in trainable], want_ema=config.ema_decay > 0)
        scatter_trainable(engine, trainable, weights, optim, state.get("scalars", {}))
        step = int(state["step"])
        log.info("resumed from %s at step %d (world size then %d, now %d)", tag_uri, step, state.get("world_size", 0), world)
    ema = Ema(module, config.ema_decay) if config.ema_decay > 0 else None  # after resuming: starts from the resumed weights
    if ema and ema_state:
        ema.shadow.update(ema_state)
    return step, ema


def read_and_share(tag_uri: str, state: dict, rank: int, world: int, device: str, names: list[str], *, want_ema: bool):
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
        meta = broadcast_object(meta)
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


def save_checkpoint(engine, trainable, ckpt_uri: str, step: int, config, ema, rank: int, world: int, data_seed: int) -> None:
    """Gather the trainable state on every rank; rank 0 writes it (see :mod:`apprentice.checkpoint`)."""
    params, optim, scalars = gather_trainable(engine, trainable)
    if rank == 0:
        tensors = {"trainable.safetensors": params, "optimizer.safetensors": optim}
        if ema:
            tensors["ema.safetensors"] = ema.shadow
        data = {"seed": data_seed, "samples_seen": step * config.batch_size * world}
        write_checkpoint(ckpt_uri, step, tensors, {"config": asdict(config), "world_size": world, "scalars": scalars, "data": data}, config.keep_checkpoints)
    torch.distributed.barrier()


class Ema:
    """Exponential moving average of the trainable parameters."""

    def __init__(self, module, decay: float):
        """Start from ``module``'s trainable parameters (fp32 copies); ``decay`` in [0, 1)."""
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module) -> None:
        """``shadow = decay * shadow + (1 - decay) * param``, after an optimizer step."""
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, module) -> None:
        """Write the averages into ``module``'s parameters (in their dtype)."""
        for n, p in module.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))
