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

from serving import events
from serving.events import Event

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
# columns added since the first schema: a job table of an older server gains them at start
ADDED_COLUMNS = {
    "step": "INTEGER",  # the current phase's step / total (training steps or class images)
    "total": "INTEGER",
    "webhook_url": "TEXT",
    "webhook_events": "TEXT",  # comma-separated webhook_events_filter
    "validation_prompt": "TEXT",
    "base_url": "TEXT",  # where the client reached the server: absolute URLs in webhooks
}


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
        db = self._connect()
        db.executescript(SCHEMA + events.SCHEMA)  # executescript manages its own transaction
        have = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
        for name, kind in ADDED_COLUMNS.items():
            if name not in have:
                try:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
                except sqlite3.OperationalError as exc:  # another process added it meanwhile
                    if "duplicate column" not in str(exc):
                        raise

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

    def queue_position(self, row: dict[str, Any]) -> int | None:
        """0 while ``row``'s job runs, 1 for the next queued job, 2 after it...; None once finished."""
        if row["state"] == "running":
            return 0
        if row["state"] != "queued":
            return None
        ahead = self._connect().execute("SELECT COUNT(*) AS n FROM jobs WHERE state = 'queued' AND (created_at < ? OR (created_at = ? AND id < ?))",
                                        (row["created_at"], row["created_at"], row["id"])).fetchone()["n"]
        return ahead + 1

    def events(self, job_id: str, after: int = 0, limit: int = 500) -> list[Event]:
        """``job_id``'s events with an id above ``after``, oldest first (at most ``limit``)."""
        rows = self._connect().execute("SELECT * FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?", (job_id, after, limit)).fetchall()
        return [Event.from_row(r) for r in rows]

    def take_events(self, limit: int = 200) -> list[tuple[Event, dict[str, Any]]]:
        """The next events for webhooks, after the persisted cursor, with their job's webhook
        (``webhook_url``, ``webhook_events``, ``base_url``), and advance the cursor past them: of
        several servers on one job table, each event goes to exactly one. Then forget what only
        webhook delivery still kept: the webhooks of jobs whose terminal event was read, and
        the events of deleted jobs."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO serving_meta (name, value) VALUES (?, 0)", (events.WEBHOOK_CURSOR,))
            after = db.execute("SELECT value FROM serving_meta WHERE name = ?", (events.WEBHOOK_CURSOR,)).fetchone()["value"]
            rows = db.execute(
                "SELECT e.*, w.url AS webhook_url, w.events AS webhook_events, w.base_url, j.id IS NULL AS orphan FROM job_events e"
                " LEFT JOIN webhook_targets w ON w.job_id = e.job_id LEFT JOIN jobs j ON j.id = e.job_id WHERE e.seq > ? ORDER BY e.seq LIMIT ?",
                (after, limit),
            ).fetchall()
            if rows:
                db.execute("UPDATE serving_meta SET value = ? WHERE name = ?", (rows[-1]["seq"], events.WEBHOOK_CURSOR))
                db.executemany("DELETE FROM webhook_targets WHERE job_id = ?", [(r["job_id"],) for r in rows if r["type"] in events.TERMINAL])
                db.executemany("DELETE FROM job_events WHERE job_id = ? AND seq <= ?", [(r["job_id"], r["seq"]) for r in rows if r["orphan"]])
        return [(Event.from_row(r), {k: r[k] for k in ("webhook_url", "webhook_events", "base_url")}) for r in rows if r["webhook_url"]]

    # --- writes ------------------------------------------------------------------------------

    def create(self, job_id: str, *, class_noun: str, recipe: str, model: str, steps: int | None, seed: int, num_images: int,
               webhook_url: str | None = None, webhook_events: list[str] | tuple[str, ...] = (), validation_prompt: str | None = None,
               base_url: str | None = None) -> dict[str, Any]:
        """Queue a job (and its ``queued`` event); ``webhook_events`` is its ``webhook_events_filter``."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, state, class_noun, recipe, model, steps, seed, num_images, created_at, webhook_url, webhook_events, validation_prompt, base_url)"
                " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, class_noun, recipe, model, steps, seed, num_images, now, webhook_url, ",".join(webhook_events) or None, validation_prompt, base_url),
            )
            if webhook_url:
                db.execute("INSERT OR REPLACE INTO webhook_targets (job_id, url, events, base_url) VALUES (?, ?, ?, ?)",
                           (job_id, webhook_url, ",".join(webhook_events) or None, base_url))
            events.emit(db, job_id, "queued", {}, now)
        return self.get(job_id)

    def claim_next(self, owner: str, host: str, pid: int) -> dict[str, Any] | None:
        """Mark the oldest queued job running for ``owner`` with a new run token; None if none."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at LIMIT 1").fetchone()
            if row is None:
                return None
            now = time.time()
            db.execute(
                "UPDATE jobs SET state = 'running', progress = 0, phase = 'starting', step = NULL, total = NULL, error = NULL, run_token = ?,"
                " attempts = attempts + 1, started_at = ?, heartbeat_at = ?, owner = ?, owner_host = ?, owner_pid = ?, worker_pid = NULL WHERE id = ?",
                (uuid.uuid4().hex, now, now, owner, host, pid, row["id"]),
            )
            attempts = db.execute("SELECT attempts FROM jobs WHERE id = ?", (row["id"],)).fetchone()["attempts"]
            events.emit(db, row["id"], "started", {"attempt": attempts}, now)
        return self.get(row["id"])

    def set_worker_pid(self, job_id: str, token: str, pid: int | None) -> bool:
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET worker_pid = ? WHERE id = ? AND run_token = ? AND state = 'running'", (pid, job_id, token))
        return cur.rowcount == 1

    def report(self, job_id: str, token: str, progress: float, phase: str | None = None, step: int | None = None, total: int | None = None) -> bool:
        """Progress of a running job (fraction in [0, 1]; ``step`` of ``total`` in ``phase``; None
        keeps the last phase's, e.g. while saving), and a ``progress`` event when the job's last one is at least
        :data:`serving.events.PROGRESS_INTERVAL` old. False when the job is no longer this
        worker's (stop then)."""
        progress, now = max(0.0, min(1.0, progress)), time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET progress = ?, phase = COALESCE(?, phase), step = COALESCE(?, step), total = COALESCE(?, total), heartbeat_at = ? WHERE id = ? AND run_token = ? AND state = 'running'",
                (progress, phase, step, total, now, job_id, token),
            )
            if cur.rowcount == 1 and events.progress_due(db, job_id, now):  # the event says what the row now holds (a kept step too)
                row = db.execute("SELECT phase, step, total FROM jobs WHERE id = ?", (job_id,)).fetchone()
                events.emit(db, job_id, "progress", {"progress": round(progress, 4), "phase": row["phase"], "step": row["step"], "total": row["total"]}, now)
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
        now = time.time()
        args = (state, error, state, state, now, job_id, token)
        if db is not None:
            return self._finished(db, db.execute(sql, args).rowcount == 1, job_id, state, error, now)
        with self._tx() as conn:
            return self._finished(conn, conn.execute(sql, args).rowcount == 1, job_id, state, error, now)

    @staticmethod
    def _finished(db: sqlite3.Connection, changed: bool, job_id: str, state: str, error: str | None, now: float) -> bool:
        if changed:
            events.emit(db, job_id, state, {"error": error} if error else {}, now)
        return changed

    def validation_image(self, db: sqlite3.Connection, job_id: str, image: str) -> None:
        """The ``validation`` event of ``image`` (relative to the data folder), inside :meth:`finishing`."""
        events.emit(db, job_id, "validation", {"image": image})

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a queued or running job; returns the row as it was before (None if unknown)."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["state"] in ACTIVE:
                now = time.time()
                db.execute("UPDATE jobs SET state = 'cancelled', phase = 'cancelled', finished_at = ? WHERE id = ?", (now, job_id))
                events.emit(db, job_id, "cancelled", {}, now)
        return dict(row)

    def delete(self, job_id: str) -> bool:
        """Delete a finished job's row (``done``, ``failed`` or ``cancelled``) and its events;
        False otherwise. Events webhook delivery has not read yet stay until it has (:meth:`take_events`)."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM jobs WHERE id = ? AND state IN ('done', 'failed', 'cancelled')", (job_id,))
            if cur.rowcount == 1:
                cursor = db.execute("SELECT value FROM serving_meta WHERE name = ?", (events.WEBHOOK_CURSOR,)).fetchone()
                db.execute("DELETE FROM job_events WHERE job_id = ? AND seq <= ?", (job_id, cursor["value"] if cursor else 2**62))
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
            return self._finished(db, cur.rowcount == 1, job_id, "failed", error, time.time())

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
            if cur.rowcount == 1:
                events.emit(db, job_id, "queued", {"reason": reason})
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
