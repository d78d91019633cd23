"""Lean, consolidated apprentice checkpoints on any storage URI, resumable at any world size.

Layout (written by rank 0 through :mod:`suti.storage`, so ``OUTPUT`` may be ``s3://...``)::

    OUTPUT/checkpoints/step-N/trainable.safetensors   # fp32 master value of every trainable parameter
    OUTPUT/checkpoints/step-N/optimizer.safetensors   # its optimizer state, "<state key>/<parameter>"
    OUTPUT/checkpoints/step-N/ema.safetensors         # EMA shadow (only with --ema-decay)
    OUTPUT/checkpoints/step-N/state.json              # step, data position, resolved config, Adam's step, file sizes + sha256
    OUTPUT/checkpoints/latest                         # "step-N" (a hint; the newest intact tag wins)

Only what trains is stored: with ``--freeze-base`` the adapter and its optimizer state, never the
frozen U-Net. Every tensor is *whole* (not a ZeRO partition): DeepSpeed's tensor-fragment API
(``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``, and the
``safe_set_*`` counterparts) gathers and scatters each parameter's fp32 value and optimizer state
across the data-parallel ranks, so a checkpoint written by N processes loads into M processes on
any nodes, none of which needs a shared filesystem: rank 0 reads the tag from ``OUTPUT`` and
broadcasts each tensor (``apprentice.train``), so other nodes need not even reach ``OUTPUT``.

The data position is the step (``data.samples_seen`` = step x batch x world, ``data.seed``): a
resumed run draws a fresh seeded shuffle (``seed + 1000 x step``) of the shards rather than
replaying the stream, since the world size may have changed.

``state.json`` is written after the tensor files and lists their sizes and sha256, so a tag whose
``state.json`` is missing, empty or unparsable, or whose files are missing, truncated or empty, is
*not intact*: :func:`select_checkpoint` warns, naming the bad file, and falls back to the newest
intact tag.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

import torch

from suti import storage
from suti.errors import InputError

log = logging.getLogger(__name__)

FORMAT = "suti-apprentice-checkpoint/1"
TAG = re.compile(r"step-(\d+)")
#: Saved-config keys that decide which parameters train and how; resuming with any other value is refused.
TRAINABLE_KEYS = ("model", "freeze_base", "method", "optimizer", "demo_timestep", "subject_tokens", "image_encoder", "demo_position_bias", "base_lora_rank", "demo_positions")
#: Values of :data:`TRAINABLE_KEYS` that checkpoints written before those keys existed had.
LEGACY_DEFAULTS = {"subject_tokens": 0, "image_encoder": None, "demo_position_bias": False}


class CorruptCheckpointError(Exception):
    """A checkpoint tag that is not intact (the message names the bad file)."""


def tags(ckpt_uri: str) -> list[str]:
    """``step-N`` tags under ``ckpt_uri``, newest first."""
    found = [n for n in storage.listdir(ckpt_uri) if TAG.fullmatch(n)]
    return sorted(found, key=lambda n: -int(TAG.fullmatch(n).group(1)))


def read_state(tag_uri: str) -> dict:
    """``state.json`` of a tag after checking that every listed file has its recorded size.

    Raises:
        CorruptCheckpointError: naming the missing, empty, truncated or unparsable file.
    """
    state_uri = storage.join(tag_uri, "state.json")
    if not storage.isfile(state_uri):
        raise CorruptCheckpointError(f"{state_uri} is missing (an interrupted save, or not a suti checkpoint)")
    raw = storage.read_bytes(state_uri)
    if not raw:
        raise CorruptCheckpointError(f"{state_uri} is empty")
    try:
        state = json.loads(raw)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{state_uri} is not valid JSON ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{state_uri} is not a {FORMAT} state")
    fs, _ = storage.filesystem(tag_uri)
    for name, info in state["files"].items():
        uri = storage.join(tag_uri, name)
        _, path = storage.filesystem(uri)
        size = fs.size(path) if fs.exists(path) else None
        if size is None:
            raise CorruptCheckpointError(f"{uri} is missing")
        if size != info["bytes"]:
            raise CorruptCheckpointError(f"{uri} is {'empty' if size == 0 else 'truncated'}: {size} bytes, expected {info['bytes']}")
    return state


def read_tensors(tag_uri: str, state: dict, name: str) -> dict[str, torch.Tensor]:
    """One tensor file of a tag, checked against its recorded sha256.

    Raises:
        CorruptCheckpointError: the content differs from what was saved.
    """
    from safetensors.torch import load

    uri = storage.join(tag_uri, name)
    data = storage.read_bytes(uri)
    if hashlib.sha256(data).hexdigest() != state["files"][name]["sha256"]:
        raise CorruptCheckpointError(f"{uri}: content does not match its recorded sha256")
    try:
        return load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CorruptCheckpointError(f"{uri}: not a complete safetensors file ({exc})") from None


def select_checkpoint(ckpt_uri: str, resume: str) -> tuple[str, dict] | None:
    """The tag to resume from and its state, or ``None`` when ``ckpt_uri`` holds no checkpoint.

    ``resume="latest"`` takes the newest intact tag; a missing ``latest`` file or a bad tag
    (see :func:`read_state`) gives a warning naming it. Another value names one tag (or its path).

    Raises:
        InputError: checkpoints exist but none is intact (so a restart at step 0 would overwrite
            them), or the named tag does not exist or is not intact.
    """
    if resume != "latest":
        tag = resume.rstrip("/").rsplit("/", 1)[-1]
        try:
            return tag, read_state(storage.join(ckpt_uri, tag))
        except CorruptCheckpointError as exc:
            raise InputError(f"--resume {resume}: {exc}") from None
    found = tags(ckpt_uri)
    if not found:
        return None
    latest_uri = storage.join(ckpt_uri, "latest")
    hint = storage.read_text(latest_uri).strip() if storage.isfile(latest_uri) else None
    if hint is None:
        log.warning("%s is missing; resuming from the newest intact checkpoint instead", latest_uri)
    bad = []
    for tag in found:
        try:
            state = read_state(storage.join(ckpt_uri, tag))
        except CorruptCheckpointError as exc:
            log.warning("checkpoint %s is not intact, skipping it: %s", tag, exc)
            bad.append(f"{tag} ({exc})")
            continue
        if hint is not None and hint != tag:
            log.warning("%s names %s, but the newest intact checkpoint is %s; resuming from %s", latest_uri, hint, tag, tag)
        return tag, state
    raise InputError(f"{ckpt_uri}: no intact checkpoint to resume from ({'; '.join(bad)}); refusing to restart at step 0 over them: remove them or pass --overwrite")


def config_differences(saved: dict, current: dict) -> list[str]:
    """``"key (checkpoint A, now B)"`` for each of :data:`TRAINABLE_KEYS` that differs."""
    saved, current = {**LEGACY_DEFAULTS, **saved}, {**LEGACY_DEFAULTS, **current}
    return [f"{k} (checkpoint {saved.get(k)!r}, now {current.get(k)!r})" for k in TRAINABLE_KEYS if saved.get(k) != current.get(k)]


def learning_rate_changes(saved: dict, current: dict) -> list[str]:
    """The learning rates a resumed run changes, as they act (a resume may change them; the new
    values apply from the resumed step): ``learning_rate``, and when the U-Net trains its rate,
    ``base_learning_rate`` (unset: ``learning_rate``). ``"key (checkpoint A, now B)"`` each."""
    def effective(config: dict, key: str):
        value = config.get(key)
        return config.get("learning_rate") if value is None else value

    def shown(config: dict, key: str) -> str:
        value = config.get(key)
        return f"unset (= {config.get('learning_rate')!r})" if value is None else repr(value)

    keys = ["learning_rate"] + ([] if current.get("freeze_base") else ["base_learning_rate"])
    return [f"{k} (checkpoint {shown(saved, k)}, now {shown(current, k)})" for k in keys if effective(saved, k) != effective(current, k)]


# ------------------------------------------------------------------ gather / scatter (collective)


def _inner_optimizer(engine):
    """The torch optimizer under DeepSpeed's wrapper (ZeRO, BF16) or the optimizer itself."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _fragmented(param) -> bool:
    return hasattr(param, "_hp_mapping") or hasattr(param, "ds_id")


def _state_keys(engine) -> tuple[list[str], dict[str, float]]:
    """Tensor state keys (same on every rank) and scalar state (e.g. Adam's ``step``)."""
    keys, scalars = set(), {}
    for st in _inner_optimizer(engine).state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                keys.add(k)
            elif isinstance(v, (int, float)) or torch.is_tensor(v):
                scalars.setdefault(k, float(v))
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, sorted(keys))
        keys = set().union(*map(set, gathered))
    return sorted(keys), scalars


def gather_trainable(engine, named_params: list[tuple[str, torch.nn.Parameter]]) -> tuple[dict, dict, dict]:
    """Whole fp32 values and optimizer state of the trainable parameters (call on every rank).

    Returns:
        ``(params, optimizer, scalars)``: name -> tensor (CPU, fp32); ``"<key>/<name>"`` ->
        tensor; scalar state such as Adam's ``step``.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _relink_optimizer_state(engine)
    keys, scalars = _state_keys(engine)
    inner = _inner_optimizer(engine)
    params, optim = {}, {}
    for name, p in named_params:
        if _fragmented(p):
            params[name] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
            for k in keys:
                optim[f"{k}/{name}"] = safe_get_full_optimizer_state(p, k).detach().float().cpu().clone()
        else:
            params[name] = p.detach().float().cpu().clone()
            st = inner.state.get(p, {})
            for k in keys:
                if k not in st:
                    raise RuntimeError(f"optimizer state {k!r} of {name} not found (fp16 without ZeRO is not supported)")
                optim[f"{k}/{name}"] = st[k].detach().float().cpu().clone()
    return params, optim, scalars


def _relink_optimizer_state(engine) -> None:
    """Point every parameter's ZeRO-1/2 fragment at the optimizer state as it is now.

    DeepSpeed links the fragments once, right after the first parameter group's first step
    (``DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state``, deepspeed 0.19), when the
    later groups have no state yet; with several groups (``--base-learning-rate``) their
    fragments would stay empty and ``safe_get_full_optimizer_state`` would fail."""
    zero = engine.optimizer
    if getattr(zero, "_hp_optimizer_states_linked", False):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _materialise_optimizer_state(engine) -> None:
    """Create the inner optimizer's lazily built state with one zero-gradient, zero-lr step."""
    inner = _inner_optimizer(engine)
    lrs, made = [], []
    for g in inner.param_groups:
        lrs.append(g["lr"])
        g["lr"] = 0.0
        for p in g["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
                made.append(p)
    inner.step()
    for g, lr in zip(inner.param_groups, lrs):
        g["lr"] = lr
    for p in made:
        p.grad = None
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO 1/2 and BF16: point each parameter's fragment at the new state
        link()


@torch.no_grad()
def scatter_trainable(engine, named_params: list[tuple[str, torch.nn.Parameter]], params: dict, optim: dict, scalars: dict) -> None:
    """Load whole values and optimizer state into this rank's parameters and partitions.

    Raises:
        InputError: the checkpoint's trainable parameters are not this run's.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    names = {n for n, _ in named_params}
    if names != set(params):
        missing, extra = sorted(names - set(params)), sorted(set(params) - names)
        raise InputError(f"the checkpoint trains other parameters than this run ({len(missing)} missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})")
    _materialise_optimizer_state(engine)
    inner = _inner_optimizer(engine)
    keys = sorted({k.split("/", 1)[0] for k in optim})
    for name, p in named_params:
        value = params[name]
        p.data.copy_(value.to(p.device, p.dtype))
        if _fragmented(p):
            safe_set_full_fp32_param(p, value.to(p.device))
            for k in keys:
                safe_set_full_optimizer_state(p, optim[f"{k}/{name}"].to(p.device), k)
        else:
            st = inner.state[p]
            for k in keys:
                st[k].copy_(optim[f"{k}/{name}"].to(st[k].device, st[k].dtype))
    for st in inner.state.values():
        for k, v in scalars.items():
            if k in st:
                if torch.is_tensor(st[k]):
                    st[k].fill_(v)
                else:
                    st[k] = type(st[k])(v)


# ------------------------------------------------------------------ write (rank 0)


def write_checkpoint(ckpt_uri: str, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, keep: int) -> str:
    """Write tag ``step-N`` (tensor files, then ``state.json``, then ``latest``); keep the newest ``keep``.

    ``tensors`` maps a file name (``trainable.safetensors`` ...) to its tensors; ``state`` gets
    ``format``, ``step`` and ``files`` added. Returns the tag's URI.
    """
    from safetensors.torch import save

    tag = f"step-{step}"
    tag_uri = storage.join(ckpt_uri, tag)
    files = {}
    for name, content in tensors.items():
        data = save({k: v.contiguous() for k, v in content.items()})
        storage.write_bytes(storage.join(tag_uri, name), data)
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    storage.write_text(storage.join(tag_uri, "state.json"), json.dumps(dict(state, format=FORMAT, step=step, files=files), indent=2))
    storage.write_text(storage.join(ckpt_uri, "latest"), tag)
    for old in tags(ckpt_uri)[max(1, keep):]:
        fs, path = storage.filesystem(storage.join(ckpt_uri, old))
        fs.rm(path, recursive=True)
    return tag_uri
