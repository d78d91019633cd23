"""The job table: DreamBooth jobs persisted in SQLite (WAL), shared by the server and its workers.

States: ``queued`` -> ``running`` -> ``done`` | ``failed``; ``queued``/``running`` -> ``cancelled``.

Every run of a job gets a fresh ``run_token``; a worker may only write progress or a final state
while the row still carries its token and is ``running``. A cancelled job, or one handed to a new
worker after its owner died, thereby fences off the old worker: its next write fails and it stops.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    phase TEXT,
    error TEXT,
    class_noun TEXT NOT NULL,
    recipe TEXT NOT NULL,
    model TEXT NOT NULL,
    steps INTEGER,
    seed INTEGER NOT NULL DEFAULT 0,
    num_images INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    run_token TEXT,
    owner TEXT,
    owner_host TEXT,
    owner_pid INTEGER,
    worker_pid INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created_at);
"""


def new_job_id() -> str:
    """A fresh job id: 32 lowercase hex digits (the only form accepted anywhere)."""
    return uuid.uuid4().hex


def valid_job_id(job_id: str) -> bool:
    return bool(JOB_ID.fullmatch(job_id or ""))


class JobStore:
    """Thread- and process-safe access to the job table (one short connection per operation)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connect().executescript(SCHEMA)  # executescript manages its own transaction

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None or getattr(self._local, "pid", None) != os.getpid():
            db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db, self._local.pid = db, os.getpid()
        return db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``: serialised across processes)."""
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        else:
            db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # --- reads -------------------------------------------------------------------------------

    def get(self, job_id: str) -> dict[str, Any] | None:
        row = self._connect().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return dict(row) if row else None

    def list(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        db = self._connect()
        if state:
            rows = db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY created_at DESC LIMIT ?", (state, limit))
        else:
            rows = db.execute("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows.fetchall()]

    def counts(self) -> dict[str, int]:
        rows = self._connect().execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        counts = {s: 0 for s in STATES}
        counts.update({r["state"]: r["n"] for r in rows})
        return counts

    # --- writes ------------------------------------------------------------------------------

    def create(self, job_id: str, *, class_noun: str, recipe: str, model: str, steps: int | None, seed: int, num_images: int) -> dict[str, Any]:
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, state, class_noun, recipe, model, steps, seed, num_images, created_at) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                (job_id, class_noun, recipe, model, steps, seed, num_images, time.time()),
            )
        return self.get(job_id)

    def claim_next(self, owner: str, host: str, pid: int) -> dict[str, Any] | None:
        """Mark the oldest queued job running for ``owner`` with a new run token; None if none."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at LIMIT 1").fetchone()
            if row is None:
                return None
            now = time.time()
            db.execute(
                "UPDATE jobs SET state = 'running', progress = 0, phase = 'starting', error = NULL, run_token = ?, attempts = attempts + 1,"
                " started_at = ?, heartbeat_at = ?, owner = ?, owner_host = ?, owner_pid = ?, worker_pid = NULL WHERE id = ?",
                (uuid.uuid4().hex, now, now, owner, host, pid, row["id"]),
            )
        return self.get(row["id"])

    def set_worker_pid(self, job_id: str, token: str, pid: int | None) -> bool:
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET worker_pid = ? WHERE id = ? AND run_token = ? AND state = 'running'", (pid, job_id, token))
        return cur.rowcount == 1

    def report(self, job_id: str, token: str, progress: float, phase: str | None = None) -> bool:
        """Progress of a running job; False when the job is no longer this worker's (stop then)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET progress = ?, phase = COALESCE(?, phase), heartbeat_at = ? WHERE id = ? AND run_token = ? AND state = 'running'",
                (max(0.0, min(1.0, progress)), phase, time.time(), job_id, token),
            )
        return cur.rowcount == 1

    def heartbeat(self, job_ids: list[str], owner: str) -> None:
        if not job_ids:
            return
        with self._tx() as db:
            db.executemany("UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND owner = ? AND state = 'running'", [(time.time(), j, owner) for j in job_ids])

    @contextlib.contextmanager
    def finishing(self, job_id: str, token: str) -> Iterator[sqlite3.Connection | None]:
        """Hold the write lock while a worker publishes its result.

        Yields the connection (for :meth:`finish`) while the run still owns the job, else None.
        """
        with self._tx() as db:
            row = db.execute("SELECT state, run_token FROM jobs WHERE id = ?", (job_id,)).fetchone()
            yield db if (row and row["state"] == "running" and row["run_token"] == token) else None

    def finish(self, job_id: str, token: str, state: str, error: str | None = None, db: sqlite3.Connection | None = None) -> bool:
        """Final state of this run (``done`` or ``failed``) if the run still owns the job."""
        assert state in ("done", "failed")
        sql = (
            "UPDATE jobs SET state = ?, error = ?, progress = CASE WHEN ? = 'done' THEN 1.0 ELSE progress END, phase = ?, finished_at = ?, worker_pid = NULL"
            " WHERE id = ? AND run_token = ? AND state = 'running'"
        )
        args = (state, error, state, state, time.time(), job_id, token)
        if db is not None:
            return db.execute(sql, args).rowcount == 1
        with self._tx() as conn:
            return conn.execute(sql, args).rowcount == 1

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a queued or running job; returns the row as it was before (None if unknown)."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["state"] in ACTIVE:
                db.execute("UPDATE jobs SET state = 'cancelled', phase = 'cancelled', finished_at = ? WHERE id = ?", (time.time(), job_id))
        return dict(row)

    def delete(self, job_id: str) -> bool:
        """Delete a finished job's row (``done``, ``failed`` or ``cancelled``); False otherwise."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM jobs WHERE id = ? AND state IN ('done', 'failed', 'cancelled')", (job_id,))
        return cur.rowcount == 1

    def finished_before(self, cutoff: float, limit: int = 100) -> list[str]:
        """Ids of finished jobs whose ``finished_at`` is older than ``cutoff`` (epoch seconds)."""
        rows = self._connect().execute(
            "SELECT id FROM jobs WHERE state IN ('done', 'failed', 'cancelled') AND finished_at < ? ORDER BY finished_at LIMIT ?", (cutoff, limit)
        ).fetchall()
        return [r["id"] for r in rows]

    def fail(self, job_id: str, token: str | None, error: str) -> bool:
        """Mark a running job ``failed`` (its worker died once too often), fenced by ``token``."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'failed', error = ?, phase = 'failed', finished_at = ?, worker_pid = NULL WHERE id = ? AND state = 'running' AND run_token IS ?",
                (error, time.time(), job_id, token),
            )
        return cur.rowcount == 1

    def requeue(self, job_id: str, token: str | None = None, reason: str = "interrupted") -> bool:
        """Put a running job back in the queue (its worker stopped without finishing)."""
        with self._tx() as db:
            if token is None:
                cur = db.execute("UPDATE jobs SET state = 'queued', phase = ?, progress = 0, run_token = NULL, worker_pid = NULL WHERE id = ? AND state = 'running'", (reason, job_id))
            else:
                cur = db.execute(
                    "UPDATE jobs SET state = 'queued', phase = ?, progress = 0, run_token = NULL, worker_pid = NULL WHERE id = ? AND state = 'running' AND run_token = ?",
                    (reason, job_id, token),
                )
        return cur.rowcount == 1

    def orphans(self, owner: str, host: str, stale_seconds: float) -> list[dict[str, Any]]:
        """Running jobs whose owner is gone: same host and its process is dead, or no heartbeat lately."""
        rows = self._connect().execute("SELECT * FROM jobs WHERE state = 'running' AND (owner IS NULL OR owner != ?)", (owner,)).fetchall()
        now = time.time()
        found = []
        for row in map(dict, rows):
            stale = now - (row["heartbeat_at"] or 0) > stale_seconds
            dead = row["owner_host"] == host and (row["owner_pid"] == os.getpid() or not pid_alive(row["owner_pid"]))
            if stale or dead:
                found.append(row)
        return found


def pid_alive(pid: int | None) -> bool:
    """Whether a process of this id exists on this machine."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
