"""torch.distributed for apprentice training: the process group DeepSpeed initialises (NCCL on
GPU, gloo on CPU), a world of one when no launcher started the process, and object broadcasts
from rank 0.

Launchers (``torchrun``, ``deepspeed``; see :mod:`apprentice.train`) set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; a process run directly sets
them itself (:data:`DIST_ENV`).
"""

from __future__ import annotations

import atexit
import os
import socket

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for the rendezvous of a world of one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The variables :func:`init_distributed` sets for an unlaunched run (a world of one).
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init_distributed() -> tuple[int, int, str]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU); single process if unlaunched."""
    import deepspeed

    if "RANK" not in os.environ:  # run directly (or one-process deepspeed launch without env): a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
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


def broadcast_object(obj):
    """Rank 0's ``obj`` (any picklable object) on every rank; the process group must be initialised."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
