"""Experiment trackers of expert training (diffusers' ``--report_to``), through accelerate.

``tensorboard`` (the default) writes event files under ``EXPERT/logs/suti-expert/``; ``wandb``
logs to Weights & Biases (``WANDB_MODE=offline`` writes the run under ``EXPERT/logs/wandb``
without an account); ``none`` logs nothing.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from suti.errors import InputError

log = logging.getLogger(__name__)

PROJECT = "suti-expert"


def check_tracker(report_to: str) -> str | None:
    """The accelerate ``log_with`` name for ``report_to``, or ``None`` for no tracker.

    Raises:
        InputError: ``wandb`` without the wandb package.
    """
    if report_to == "none":
        return None
    if report_to == "wandb":
        if importlib.util.find_spec("wandb") is None:
            raise InputError("--report-to wandb needs the wandb package (pip install wandb; WANDB_MODE=offline logs without an account); it is not installed")
        return "wandb"
    if importlib.util.find_spec("tensorboard") is None:  # a declared dependency; do not fail training on it
        log.warning("tensorboard is not installed; no training logs")
        return None
    return "tensorboard"


def start_trackers(accelerator, report_to: str, output: Path, config: dict) -> None:
    """``accelerator.init_trackers`` with the run's config as hyperparameters (scalars only)."""
    if not accelerator.log_with:
        return
    hparams = {k: v for k, v in config.items() if isinstance(v, (bool, int, float, str))}
    init_kwargs = {"wandb": {"dir": str(output / "logs"), "name": output.name}} if report_to == "wandb" else {}
    if report_to == "wandb":
        (output / "logs").mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(PROJECT, config=hparams, init_kwargs=init_kwargs)


def log_image(accelerator, name: str, image, step: int) -> None:
    """Log one PIL image to every tracker."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: np.asarray(image)[None]}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: [image]}, step)
