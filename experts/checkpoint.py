"""Training checkpoints: everything needed to resume, plus the resolved config.

``OUTPUT/checkpoints/step-000100/`` holds ``trainable.safetensors`` (the trained parameters),
``optimizer.pt`` (optimizer state), ``scheduler.pt`` (learning-rate scheduler state), ``rng.pt``
(the data/noise generator state, one per process under accelerate) and ``config.json`` (the
resolved :class:`ExpertConfig` and the step).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from suti.errors import InputError


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = output / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / "config.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


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
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep > 0:
        for old in checkpoint_dirs(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter], optimizer, generator: torch.Generator, *, lr_scheduler=None, rank: int = 0) -> int:
    """Restore parameters, optimizer, scheduler and this process's generator from ``path``;
    returns the saved step. A checkpoint without ``scheduler.pt`` (older runs) steps the
    scheduler to the saved step instead."""
    state = load_file(str(path / "trainable.safetensors"))
    missing = sorted(set(params) - set(state))
    if missing:
        raise RuntimeError(f"{path}: checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.device, param.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
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
            lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        else:
            for _ in range(step):
                lr_scheduler.step()
    return step


def checkpoint_config(path: Path) -> dict:
    """The resolved config saved with a checkpoint."""
    return json.loads((path / "config.json").read_text())["config"]


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint was saved at."""
    return int(json.loads((path / "config.json").read_text())["step"])
