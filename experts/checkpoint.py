"""Training checkpoints: everything needed to resume, plus the resolved config.

``OUTPUT/checkpoints/step-000100/`` holds ``trainable.safetensors`` (the trained parameters),
``optimizer.pt`` (optimizer state), ``rng.pt`` (the data/noise generator state) and
``config.json`` (the resolved :class:`ExpertConfig` and the step).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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


def save_checkpoint(output: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer, generator: torch.Generator, config: dict, keep: int) -> Path:
    """Write a checkpoint atomically (temporary folder, then rename) and prune old ones."""
    root = output / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().float().cpu().contiguous() for k, v in params.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"generator": generator.get_state(), "torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "config.json").write_text(json.dumps({"step": step, "config": config}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep > 0:
        for old in checkpoint_dirs(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter], optimizer, generator: torch.Generator) -> int:
    """Restore parameters, optimizer and generator from ``path``; returns the saved step."""
    state = load_file(str(path / "trainable.safetensors"))
    missing = sorted(set(params) - set(state))
    if missing:
        raise RuntimeError(f"{path}: checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.device, param.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    return checkpoint_step(path)


def checkpoint_config(path: Path) -> dict:
    """The resolved config saved with a checkpoint."""
    return json.loads((path / "config.json").read_text())["config"]


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint was saved at."""
    return int(json.loads((path / "config.json").read_text())["step"])
