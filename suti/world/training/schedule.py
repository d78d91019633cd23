"""Training progress and learning-rate schedules shared by the world's training runs."""

from __future__ import annotations

import math
import time

from suti.errors import InvalidValueError


class Clock:
    """Training progress in [0, 1]: the larger of steps done / ``steps`` and time used /
    ``seconds`` (either may be ``None``: no such limit; both ``None``:
    :class:`~suti.errors.InvalidValueError`). Time counts from construction; move ``start``
    back to count time spent before a resume."""

    def __init__(self, steps: int | None, seconds: float | None):
        if steps is None and seconds is None:
            raise InvalidValueError("give steps or a time budget")
        self.steps, self.seconds, self.start = steps, seconds, time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since ``start``."""
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        """Progress after ``step`` steps, in [0, 1]."""
        p = 0.0
        if self.steps:
            p = max(p, step / self.steps)
        if self.seconds:
            p = max(p, self.elapsed() / self.seconds)
        return min(p, 1.0)


def step_warmup_cosine(step: int, progress: float, warmup: int) -> float:
    """Learning-rate factor: linear warmup over ``warmup`` steps, then cosine decay to 10%
    along ``progress`` (in [0, 1]). The toy text-to-image model's schedule."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def progress_warmup_cosine(progress: float, warmup: float = 0.05) -> float:
    """Learning-rate factor: linear warmup over the first ``warmup`` of ``progress`` (in
    [0, 1]), then cosine decay to 0. The toy CLIP's and the probe's schedule."""
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def set_lr(optimizer, base: float, factor: float) -> None:
    """Set every parameter group's learning rate to ``base * factor``."""
    for group in optimizer.param_groups:
        group["lr"] = base * factor


def run_pretrain_cli(argv, description: str, pretrain, *, minutes: float, steps: int,
                     extra: dict[str, tuple[object, float, str]] | None = None) -> int:
    """The ``python -m suti.world.training.<model> OUT_DIR [--minutes M] [--steps N] [--seed S]
    [--threads T] ...`` entry of a world model's training: parse, run ``pretrain(out_dir,
    seed=, minutes=, steps=, **extra)``, print its ``metrics`` as JSON. ``extra``: more flags,
    ``{"supcon_weight": (kind, default, help)}`` (flag ``--supcon-weight``)."""
    import json
    import logging

    import torch

    from suti.checks import COUNT, POSITIVE, SEED
    from suti.cli_format import ArgumentParser

    parser = ArgumentParser(description=description)
    parser.add_argument("out_dir")
    parser.add_argument("--minutes", type=POSITIVE, default=minutes, help=f"time budget ({minutes:g})")
    parser.add_argument("--steps", type=COUNT, default=steps, help=f"step budget ({steps})")
    parser.add_argument("--seed", type=SEED, default=0, help="seed (0)")
    parser.add_argument("--threads", type=COUNT, default=1, help="torch threads (1)")
    for name, (kind, default, text) in (extra or {}).items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=text)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    kwargs = {name: getattr(args, name) for name in (extra or {})}
    meta = pretrain(args.out_dir, seed=args.seed, minutes=args.minutes, steps=args.steps, **kwargs)
    print(json.dumps(meta["metrics"], indent=1))
    return 0
