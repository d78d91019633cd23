"""The DreamBooth job pool: a dispatcher thread that claims queued jobs from SQLite and runs each
in a worker process (``python -m serving.worker``, the default) or a Ray task (``--ray-address``).

* Submit: the API writes a ``queued`` row and wakes the dispatcher.
* Run: the dispatcher claims the oldest queued job (new run token), starts a worker and heart-beats
  the row while it runs; the worker writes progress and the final state itself.
* Cancel: the row becomes ``cancelled`` and the worker is terminated at once (process group
  SIGTERM then SIGKILL, or ``ray.cancel(force=True)``); its partial output is removed. A worker
  on another server notices at its next progress write (the run token fences it off).
* Restart: a ``running`` row whose owner is gone (same host and its process is dead, or no
  heartbeat for ``job_stale_seconds``) goes back to ``queued`` and runs again from the start;
  queued rows simply run. Local workers die with their server (``PR_SET_PDEATHSIG``), and on a
  clean shutdown the server stops its workers and re-queues their jobs.
* Crash: a worker that dies without writing a final state (kill -9, out of memory, a lost Ray
  task) gets its job re-queued the same way, up to ``max_job_attempts`` runs in all; then the
  job fails with a one-line reason (the worker's log stays in the server's log folder).
* Disk: uploaded photos are deleted ``upload_retention_s`` after their job finished, finished jobs
  (row, events, expert, photos, log) ``job_retention_s`` after, images answered as URLs once
  their URLs expired (:meth:`JobManager.sweep`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from serving.settings import Settings
from serving.store import JobStore, valid_job_id

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


class LocalRun:
    """One job run in a child process (its own session, so the whole group can be stopped)."""

    def __init__(self, settings: Settings, job: dict):
        self.job_id, self.token = job["id"], job["run_token"]
        settings.logs_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = settings.logs_dir / f"{self.job_id}.log"
        cmd = [
            sys.executable, "-m", "serving.worker",
            "--db", str(settings.jobs_db), "--data-dir", str(settings.data_dir),
            "--job", self.job_id, "--token", self.token, "--parent-pid", str(os.getpid()),
        ]
        if settings.torch_threads:
            cmd += ["--threads", str(settings.torch_threads)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.log_path, "ab") as out:
            out.write(f"--- attempt {job['attempts']} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def terminate(self, grace: float = 5.0) -> None:
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def failure(self) -> str:
        """Why the worker ended, in words for the user (no log lines, no paths)."""
        code = self.proc.poll()
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (out of memory, or stopped by an operator)" if -code == signal.SIGKILL else ""
            return f"the training worker was killed by {name}{hint}"
        return f"the training worker exited with code {code} without a result"

    def log_tail(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1][-300:] if lines else ""


def _ray_run_job(db_path: str, data_dir: str, job_id: str, token: str, threads: int | None) -> str:
    from serving.worker import run_job

    return run_job(db_path, data_dir, job_id, token, threads=threads)


class RayRun:
    """One job run as a Ray task."""

    pid = None

    def __init__(self, runner: "RayRunner", settings: Settings, job: dict):
        self.job_id, self.token = job["id"], job["run_token"]
        self._ray = runner.ray
        self.ref = runner.remote.remote(str(settings.jobs_db), str(settings.data_dir), self.job_id, self.token, settings.torch_threads)
        self._error: str | None = None
        self._code: int | None = None

    def poll(self) -> int | None:
        if self._code is not None:
            return self._code
        ready, _ = self._ray.wait([self.ref], timeout=0)
        if not ready:
            return None
        try:
            self._ray.get(self.ref)
            self._code = 0
        except Exception as exc:  # noqa: BLE001
            self._error, self._code = f"{type(exc).__name__}: {exc}"[:500], 1
        return self._code

    def terminate(self, grace: float = 5.0) -> None:
        try:
            self._ray.cancel(self.ref, force=True)
        except Exception:  # noqa: BLE001 - already finished
            pass

    def failure(self) -> str:
        """Why the task ended, in words for the user (the exception type, not its text)."""
        kind = (self._error or "").split(":", 1)[0]
        return f"the Ray training task was lost ({kind or 'no result'})"

    def log_tail(self) -> str:
        return self._error or ""


class RayRunner:
    def __init__(self, settings: Settings):
        import ray

        from suti.raytools import init_ray

        runtime_env = {"env_vars": {k: os.environ[k] for k in ("SUTI_CACHE", "SUTI_CONFIG_DIR") if k in os.environ}}
        # "local"/"": a private single-node cluster; False when already inside Ray (a Serve replica)
        self.connected_here = init_ray(settings.ray_address, runtime_env=runtime_env)
        self.ray = ray
        self.remote = ray.remote(_ray_run_job).options(num_cpus=1, num_gpus=settings.ray_job_gpus, max_retries=0)

    def start(self, settings: Settings, job: dict) -> RayRun:
        return RayRun(self, settings, job)

    def close(self) -> None:
        if self.connected_here and self.ray.is_initialized():
            self.ray.shutdown()


class LocalRunner:
    def start(self, settings: Settings, job: dict) -> LocalRun:
        return LocalRun(settings, job)

    def close(self) -> None:
        pass


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def remove_job_files(settings: Settings, job_id: str) -> int:
    """Delete everything a job left on disk (expert, partial expert, uploaded photos, log);
    returns the bytes freed."""
    if not valid_job_id(job_id):
        raise ValueError(f"bad job id {job_id!r}")
    freed = 0
    for path in (settings.experts_dir / job_id, settings.experts_dir / f"{job_id}.partial", settings.uploads_dir / job_id, settings.logs_dir / f"{job_id}.log"):
        if not path.exists():
            continue
        freed += _tree_bytes(path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return freed


class JobManager:
    """Claims, runs, watches and cancels DreamBooth jobs for one server process."""

    tick = 0.5
    sweep_interval = 2.0  # seconds between retention sweeps
    orphan_upload_seconds = 3600.0  # an upload folder without a job row is removed after this

    def __init__(self, settings: Settings, store: JobStore):
        self.settings = settings
        self.store = store
        self.owner = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.runner: LocalRunner | RayRunner | None = None  # made by the dispatcher thread (see _loop)
        self.backend = "ray" if settings.ray_address else "local"
        self._runs: dict[str, LocalRun | RayRun] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._swept = 0.0

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._recover()
        self._thread = threading.Thread(target=self._loop, name="suti-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop dispatching; stop this server's workers and put their jobs back in the queue."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=60)  # the thread releases its runs on the way out
        self._release_all()

    def _release_all(self) -> None:
        with self._lock:
            runs, self._runs = dict(self._runs), {}
        for job_id, run in runs.items():
            run.terminate(grace=2.0)
            if self.store.requeue(job_id, run.token, reason="server stopped"):
                log.info("job %s re-queued (server stopping)", job_id)
            self._remove_partial(job_id)
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.close()

    def wake(self) -> None:
        self._wake.set()

    # --- API ---------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> dict | None:
        """Cancel a job: mark it cancelled and stop its worker now. Returns the row before."""
        before = self.store.cancel(job_id)
        if before is None or before["state"] not in ("queued", "running"):
            return before
        with self._lock:
            run = self._runs.pop(job_id, None)
        if run is not None:
            run.terminate()
            log.info("job %s cancelled; worker stopped", job_id)
            self._remove_partial(job_id)
        return before

    def running_pids(self) -> dict[str, int | None]:
        with self._lock:
            return {j: r.pid for j, r in self._runs.items()}

    # --- dispatcher --------------------------------------------------------------------------

    def _make_runner(self) -> LocalRunner | RayRunner:
        # A local Ray cluster started here dies with the thread that started it (Ray sets
        # PR_SET_PDEATHSIG on its daemons), so it is started by the long-lived dispatcher thread.
        return RayRunner(self.settings) if self.settings.ray_address else LocalRunner()

    def _loop(self) -> None:
        try:
            self._dispatch()
        finally:
            self._release_all()

    def _dispatch(self) -> None:
        while not self._stop.is_set():
            if self.runner is None:
                try:
                    self.runner = self._make_runner()
                except Exception as exc:  # noqa: BLE001 - e.g. the Ray cluster is not reachable yet
                    from suti.errors import SutiError

                    if isinstance(exc, SutiError):  # a RayStartError: one line, no traceback
                        log.error("could not start the %s job runner (%s); retrying in 10 s", self.backend, exc)
                    else:
                        log.exception("could not start the %s job runner; retrying in 10 s", self.backend)
                    self._stop.wait(10)
                    continue
            try:
                self._step()
            except Exception:  # noqa: BLE001 - keep dispatching
                log.exception("job dispatcher step failed")
            self._wake.wait(self.tick)
            self._wake.clear()

    def _recover(self) -> None:
        for row in self.store.orphans(self.owner, self.host, self.settings.job_stale_seconds):
            self._retry_or_fail(row, row["run_token"], "its server stopped while it ran")

    def _retry_or_fail(self, row: dict, token: str | None, reason: str) -> None:
        """A run ended without a final state: queue the job again, or fail it once it has had
        ``max_job_attempts`` runs."""
        job_id, attempts, limit = row["id"], row["attempts"], self.settings.max_job_attempts
        if attempts < limit:
            if self.store.requeue(job_id, token, reason=f"retrying ({reason})"):
                log.warning("job %s: %s (run %d of %d); re-queued", job_id, reason, attempts, limit)
        elif self.store.fail(job_id, token, f"training stopped unexpectedly {attempts} times; last time {reason}"):
            log.warning("job %s: %s (run %d of %d); failed", job_id, reason, attempts, limit)

    def _step(self) -> None:
        self._recover()
        if time.monotonic() - self._swept >= self.sweep_interval:
            self._swept = time.monotonic()
            self.sweep()
        with self._lock:
            runs = dict(self._runs)
        for job_id, run in runs.items():
            row = self.store.get(job_id)
            still_ours = row is not None and row["state"] == "running" and row["run_token"] == run.token
            code = run.poll()
            if code is None and still_ours:
                continue
            if code is None:  # cancelled or re-assigned elsewhere: stop the worker
                run.terminate()
                self._remove_partial(job_id)
            elif still_ours:  # the worker died without writing a final state
                log.warning("job %s: worker ended with code %s; last log line: %s", job_id, code, run.log_tail())
                self._retry_or_fail(row, run.token, run.failure())
                self._remove_partial(job_id)
            with self._lock:
                if self._runs.get(job_id) is run:
                    del self._runs[job_id]
        with self._lock:
            self.store.heartbeat(list(self._runs), self.owner)
            while len(self._runs) < self.settings.job_workers and not self._stop.is_set():
                job = self.store.claim_next(self.owner, self.host, os.getpid())
                if job is None:
                    break
                try:
                    run = self.runner.start(self.settings, job)
                except Exception as exc:  # noqa: BLE001
                    self.store.finish(job["id"], job["run_token"], "failed", error=f"could not start a worker: {exc}")
                    continue
                self._runs[job["id"]] = run
                self.store.set_worker_pid(job["id"], job["run_token"], run.pid)
                log.info("job %s started (attempt %d, %s worker %s)", job["id"], job["attempts"], self.backend, run.pid)

    def sweep(self, now: float | None = None) -> None:
        """Apply the retention settings: delete uploaded photos of jobs finished more than
        ``upload_retention_s`` ago (and upload folders without a job after an hour), and finished
        jobs (row, expert, photos, log) more than ``job_retention_s`` ago."""
        now = time.time() if now is None else now
        settings = self.settings
        try:
            names = os.listdir(settings.uploads_dir)
        except FileNotFoundError:
            names = []
        for name in names:
            path = settings.uploads_dir / name
            job_id = name[1:-4] if name.startswith(".") and name.endswith(".tmp") else name
            if not valid_job_id(job_id):
                continue
            row = None if job_id != name else self.store.get(job_id)
            if row is None:
                try:
                    old = now - path.stat().st_mtime > self.orphan_upload_seconds
                except OSError:
                    continue
                if not old:
                    continue
            elif row["state"] not in ("done", "failed", "cancelled") or (row["finished_at"] or now) > now - settings.upload_retention_s:
                continue
            shutil.rmtree(path, ignore_errors=True)
            log.info("job %s: uploaded photos deleted", job_id)
        from serving.signing import sweep_results

        sweep_results(settings.results_dir, now)  # images answered as URLs, once expired
        if settings.job_retention_s is not None:
            for job_id in self.store.finished_before(now - settings.job_retention_s):
                if self.store.delete(job_id):
                    from serving.generation import forget_expert

                    forget_expert(settings.experts_dir / job_id)
                    freed = remove_job_files(settings, job_id)
                    log.info("job %s: deleted after the retention time (%d bytes freed)", job_id, freed)

    def _remove_partial(self, job_id: str) -> None:
        if valid_job_id(job_id):
            shutil.rmtree(self.settings.experts_dir / f"{job_id}.partial", ignore_errors=True)
