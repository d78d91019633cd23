"""Training checkpoints: everything needed to resume, plus the resolved config.

``OUTPUT/checkpoints/step-000100/`` holds ``trainable.safetensors`` (the trained parameters),
``optimizer.pt`` (optimizer state), ``scheduler.pt`` (learning-rate scheduler state), ``rng.pt``
(the data/noise generator state, one per process under accelerate) and ``config.json`` (the
resolved :class:`ExpertConfig` and the step).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from suti.errors import InputError


#: A checkpoint folder's name: ``step-<digits>`` and nothing else (``step-old`` or a copy named
#: ``step-000099-bak`` is not a checkpoint).
TAG = re.compile(r"step-(\d+)")


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints of a run (folders named :data:`TAG` holding ``config.json``),
    oldest first by step."""
    root = output / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if TAG.fullmatch(p.name) and (p / "config.json").is_file()]
    return sorted(found, key=lambda p: int(TAG.fullmatch(p.name).group(1)))


def latest_checkpoint(output: Path) -> Path | None:
    """The most recent complete checkpoint, or ``None``."""
    found = checkpoint_dirs(output)
    return found[-1] if found else None


def find_checkpoint(output: Path, resume: str) -> Path | None:
    """The checkpoint ``--resume`` names: ``latest`` (``None`` if there is none yet), a bare name
    under ``OUTPUT/checkpoints`` (``step-000004``), or a checkpoint folder path.

    Raises:
        InputError: the name or path is not a complete checkpoint (the message lists those there).
    """
    if resume == "latest":
        return latest_checkpoint(output)
    for candidate in (output / "checkpoints" / resume, Path(resume)):
        if (candidate / "config.json").is_file():
            return candidate
    names = ", ".join(p.name for p in checkpoint_dirs(output)) or "none"
    raise InputError(f"--resume {resume}: not a checkpoint folder nor a checkpoint of {output} (checkpoints: {names}; or 'latest')")


def save_checkpoint(output: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer, generator: torch.Generator, config: dict, keep: int, *, lr_scheduler=None, rank_generators: list | None = None) -> Path:
    """Write a checkpoint atomically (temporary folder, then rename) and prune old ones.

    ``keep``: the newest checkpoints kept (``checkpoints_total_limit``; 0 keeps all).
    ``rank_generators``: every process's data-generator state under accelerate (index = rank).
    """
    root = output / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write_checkpoint(tmp, step, params, optimizer, generator, config, lr_scheduler, rank_generators)
    except BaseException:  # a full disk, an interrupt: no half-written .tmp-step-* is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from suti.storage import umask_modes

    umask_modes(tmp)  # safetensors writes 0o600
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep > 0:
        for old in checkpoint_dirs(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(tmp: Path, step: int, params: dict, optimizer, generator: torch.Generator, config: dict, lr_scheduler, rank_generators) -> None:
    """The files of one checkpoint, into the new folder ``tmp``."""
    tmp.mkdir()
    save_file({k: v.detach().float().cpu().contiguous() for k, v in params.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if rank_generators is not None:
        rng["rank_generators"] = rank_generators
    torch.save(rng, tmp / "rng.pt")
    if lr_scheduler is not None:
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "config.json").write_text(json.dumps({"step": step, "config": config}, indent=2))


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter], optimizer, generator: torch.Generator, *, lr_scheduler=None, rank: int = 0) -> int:
    """Restore parameters, optimizer, scheduler and this process's generator from ``path``;
    returns the saved step. A checkpoint without ``scheduler.pt`` (older runs) steps the
    scheduler to the saved step instead.

    Raises:
        InputError: the checkpoint was saved by a run with other trainable tensors (another
            ``--lora-rank``, ``--train-text-encoder`` or base model), naming both sides.
        ModelLoadError: a checkpoint file is incomplete or unreadable (named).
    """
    from suti.weights import check_safetensors, loading

    weights = check_safetensors(path / "trainable.safetensors")
    with loading(weights):
        state = load_file(str(weights))
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise InputError(f"{path}: checkpoint does not fit this run ({len(missing)} trainable tensors "
                         f"missing, e.g. {(missing or ['-'])[0]}; {len(unexpected)} unexpected, e.g. "
                         f"{(unexpected or ['-'])[0]}); resume with the settings it was saved with")
    with loading(weights):
        with torch.no_grad():
            for name, param in params.items():
                if state[name].shape != param.shape:
                    raise InputError(f"{weights}: {name} is {list(state[name].shape)} in the checkpoint, "
                                     f"{list(param.shape)} in this run; resume with the base model it was saved with")
                param.copy_(state[name].to(param.device, param.dtype))
    with loading(path / "optimizer.pt"):
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    with loading(path / "rng.pt"):
        rng = torch.load(path / "rng.pt", weights_only=True)
        ranks = rng.get("rank_generators")
        if ranks and rank < len(ranks):
            generator.set_state(ranks[rank])
        elif rank == 0:
            generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
    step = checkpoint_step(path)
    if lr_scheduler is not None:
        if (path / "scheduler.pt").is_file():
            with loading(path / "scheduler.pt"):
                lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        else:
            for _ in range(step):
                lr_scheduler.step()
    return step


def apply_hyperparameters(optimizer, lr_scheduler, asked: list[dict]) -> dict[str, tuple[float, float]]:
    """After ``load_checkpoint``: put back this run's optimizer hyperparameters (``asked``: each
    param group's settings before loading, ``lr``/``initial_lr`` included), so that the
    checkpoint's learning rate, betas, epsilon and weight decay do not silently win. The
    schedule's base rates follow, and each group's current rate is the new base times the
    schedule's factor at the resumed step (``LambdaLR``, as every diffusers schedule is).

    Returns:
        What changed: ``{name: (checkpoint value, new value)}`` (``learning_rate`` for the base rate).
    """
    changes: dict[str, tuple[float, float]] = {}
    for group, wanted in zip(optimizer.param_groups, asked):
        for key, value in wanted.items():
            if key in ("lr", "params") or key in OPTIMIZER_STATE_KEYS or key not in group or group[key] == value:
                continue
            if isinstance(value, (int, float)) or (isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value)):
                name = "learning_rate" if key == "initial_lr" else key
                for i, (a, b) in enumerate(zip(group[key], value) if isinstance(value, tuple) else [(group[key], value)]):
                    if a != b:
                        changes[f"{name}{'' if not isinstance(value, tuple) else f'[{i}]'}"] = (float(a), float(b))
            group[key] = value
    if lr_scheduler is not None and asked and "initial_lr" in asked[0]:
        lr_scheduler.base_lrs = [wanted["initial_lr"] for wanted in asked]
        factors = getattr(lr_scheduler, "lr_lambdas", None)
        for group, base, factor in zip(optimizer.param_groups, lr_scheduler.base_lrs, factors or [None] * len(asked)):
            group["lr"] = base * factor(lr_scheduler.last_epoch) if factor else base
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return changes


#: Param-group entries that are an optimizer's running state, not settings: Prodigy's step-size
#: estimate and step count (``prodigyopt`` keeps them in the groups); a resume keeps the checkpoint's.
OPTIMIZER_STATE_KEYS = frozenset({"d", "d_max", "d_numerator", "k"})

#: Settings a resumed run must share with its checkpoint (they decide what is trained, and the
#: optimizer state's layout).
RESUME_KEYS = ("model", "lora_rank", "train_text_encoder", "use_dora", "optimizer")


def check_resumable(path: Path, saved: dict, config: dict) -> None:
    """Raise :class:`InputError` when ``config`` trains other tensors than the checkpoint's run.

    For example resuming a full fine-tune (``lora_rank 0``) with ``--lora-rank 4``.
    """
    def say(key, value):
        if key == "lora_rank":
            return "a full fine-tune (--lora-rank 0)" if not value else f"LoRA (--lora-rank {value})"
        if key == "train_text_encoder":
            return "with the text encoder trained" if value else "with the text encoder frozen"
        if key == "use_dora":
            return "DoRA (--use-dora)" if value else "plain LoRA (no --use-dora)"
        if key == "optimizer":
            return f"--optimizer {value}"
        return f"on base {value}"

    for key in RESUME_KEYS:
        if key in saved and saved.get(key) != config.get(key):
            raise InputError(f"{path}: saved by {say(key, saved[key])}, cannot resume as "
                             f"{say(key, config.get(key))}; resume with the same settings or "
                             f"train into a new --output")


def checkpoint_config(path: Path) -> dict:
    """The resolved config saved with a checkpoint."""
    return _checkpoint_json(path)["config"]


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint was saved at."""
    return int(_checkpoint_json(path)["step"])


def _checkpoint_json(path: Path) -> dict:
    """``config.json`` of a checkpoint, checked (``InputError`` naming it when malformed)."""
    from suti.weights import read_json_file

    data = read_json_file(Path(path) / "config.json")
    if not isinstance(data.get("config"), dict) or not isinstance(data.get("step"), int):
        raise InputError(f"{Path(path) / 'config.json'}: not a checkpoint config (needs 'step' and 'config')")
    return data
