"""One DreamBooth job run, in its own process (``python -m serving.worker``) or a Ray task.

The worker reads its job row, trains the expert into ``DATA_DIR/experts/<id>.partial`` and
publishes it as ``DATA_DIR/experts/<id>`` in the same transaction that marks the job ``done``.
Progress goes into the job row (fenced by the run token): when the write fails because the job
was cancelled or handed to another worker, the worker stops at once.

Progress comes from ``train_expert``'s ``progress_callback`` (:class:`ProgressReporter`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

from serving.store import JobStore, valid_job_id

from suti.cli_format import ArgumentParser

log = logging.getLogger("serving.worker")


class JobAborted(Exception):
    """The job was cancelled or re-assigned while this worker ran it."""


class ProgressReporter:
    """``progress_callback`` of ``train_expert`` that writes the job's progress into its row (at
    most every ``interval`` s, and always at the end of a phase).

    Phases map to fractions: ``class_images`` (prior-preservation images) fill
    ``[0, class_share)`` and ``training`` fills ``[class_share, 0.98]``. Raises
    :class:`JobAborted` when the row no longer belongs to this run (cancelled or re-assigned),
    which stops training at once.
    """

    def __init__(self, store: JobStore, job_id: str, token: str, class_share: float = 0.0, interval: float = 0.5):
        self.store, self.job_id, self.token = store, job_id, token
        self.class_share, self.interval = class_share, interval
        self._last = 0.0
        self._logged = -1

    def send(self, progress: float, phase: str, step: int | None = None, total: int | None = None) -> None:
        """Write ``progress``, ``phase`` and its ``step`` of ``total`` now."""
        if not self.store.report(self.job_id, self.token, progress, phase, step, total):
            raise JobAborted(f"job {self.job_id} was cancelled or re-assigned")

    def __call__(self, phase: str, done: int, total: int, metrics: dict) -> None:
        now = time.monotonic()
        if now - self._last < self.interval and done < total:
            return
        self._last = now
        frac = done / total if total else 0.0
        if phase == "class_images":
            progress = self.class_share * frac
        else:
            progress = self.class_share + (0.98 - self.class_share) * frac
        self.send(progress, phase, done, total)
        decile = int(progress * 10)
        if decile != self._logged:
            self._logged = decile
            log.info("%s %s/%s %s", phase, done, total, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


def _die_with_parent(parent_pid: int | None) -> None:
    """Linux: receive SIGTERM when the server that started us dies (even by SIGKILL)."""
    if not parent_pid or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)


def run_job(db_path: str, data_dir: str, job_id: str, token: str, *, threads: int | None = None) -> str:
    """Train the expert of one job run; returns the final state written (or ``"aborted"``)."""
    if not valid_job_id(job_id):
        raise ValueError(f"bad job id {job_id!r}")
    store = JobStore(db_path)
    job = store.get(job_id)
    if job is None or job["state"] != "running" or job["run_token"] != token:
        log.info("job %s is no longer ours; nothing to do", job_id)
        return "aborted"
    data = Path(data_dir)
    uploads = data / "uploads" / job_id
    final = data / "experts" / job_id
    partial = data / "experts" / f"{job_id}.partial"
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        reporter = ProgressReporter(store, job_id, token)
        reporter.send(0.0, "loading")
        from experts import train as experts_train
        from experts.recipe import resolve_config

        overrides = dict(model=job["model"], instance_dir=str(uploads), class_noun=job["class_noun"], steps=job["steps"], seed=job["seed"])
        config = resolve_config(job["recipe"], overrides)
        if job.get("validation_prompt"):  # asked for on POST: one validation image, after the last step
            config.validation_prompt, config.validation_steps = job["validation_prompt"], config.steps
        reporter.class_share = 0.2 if config.prior_preservation else 0.0
        if partial.exists():
            shutil.rmtree(partial)
        partial.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        experts_train.train_expert(config, partial, overwrite=True, progress=False, progress_callback=reporter)
        reporter.send(0.99, "saving")
        with store.finishing(job_id, token) as db:
            if db is None:
                raise JobAborted(f"job {job_id} was cancelled or re-assigned")
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            images = sorted((final / "validation").glob("step-*.png")) if job.get("validation_prompt") else []
            if images:
                store.validation_image(db, job_id, images[-1].relative_to(data).as_posix())
            store.finish(job_id, token, "done", db=db)
        log.info("job %s done in %.1f s", job_id, time.perf_counter() - started)
        return "done"
    except JobAborted as exc:
        log.info("%s; stopping", exc)
        shutil.rmtree(partial, ignore_errors=True)
        return "aborted"
    except Exception as exc:  # noqa: BLE001 - any failure becomes the job's error
        from suti.errors import SutiError

        message = str(exc) if isinstance(exc, SutiError) else f"{type(exc).__name__}: {exc}"
        message = message.replace(str(uploads), "the uploaded photos").replace(str(data), "DATA_DIR")  # no server paths
        log.error("job %s failed: %s\n%s", job_id, message, traceback.format_exc())
        shutil.rmtree(partial, ignore_errors=True)
        store.finish(job_id, token, "failed", error=message[:2000])
        return "failed"
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="run one DreamBooth job of the serving job table")
    parser.add_argument("--db", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))  # cancel: stop now, the server cleans up
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    state = run_job(args.db, args.data_dir, args.job, args.token, threads=args.threads)
    return 0 if state in ("done", "aborted") else 1


if __name__ == "__main__":
    sys.exit(main())
