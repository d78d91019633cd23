"""Job events: what happened to a DreamBooth job, in order, as Replicate, ComfyUI and Civitai's
training API report it (a job id, a queue position, progress events, a webhook when done).

Every state change of a job appends one :class:`Event` to the ``job_events`` table, in the same
SQLite transaction that changes the row (so the events and the row never disagree, whichever
process wrote them: the server or a worker):

========== ======================================================= ============================
type       when                                                    ``data``
========== ======================================================= ============================
queued     the job is queued (again: after a crash or a restart)   ``{"reason"}`` when re-queued
started    a worker claims it                                      ``{"attempt"}``
progress   the worker reports, at most every 500 ms per job        ``{"progress", "phase", "step", "total"}``
validation the validation image is ready (asked for on ``POST``)   ``{"image"}``; served as ``url``
done       the expert is published                                 ``{}``
failed     training failed, or the worker died too often           ``{"error"}``
cancelled  ``DELETE`` while queued or running                      ``{}``
========== ======================================================= ============================

``done``, ``failed`` and ``cancelled`` are terminal. A job's webhook (``webhook_targets``) and
its events outlive the job's row until webhook delivery has read them, so a job deleted right
after it finished still sends its ``done``. Event ids (``seq``) increase across all
jobs; :func:`sse_stream` sends them as SSE ``id:`` so ``Last-Event-ID`` resumes a stream.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

EVENT_TYPES = ("queued", "started", "progress", "validation", "done", "failed", "cancelled")
TERMINAL = ("done", "failed", "cancelled")
PROGRESS_INTERVAL = 0.5  # seconds: the most progress events a job emits is one per this

SCHEMA = """
CREATE TABLE IF NOT EXISTS job_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS job_events_job ON job_events (job_id, seq);
CREATE TABLE IF NOT EXISTS serving_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS webhook_targets (job_id TEXT PRIMARY KEY, url TEXT NOT NULL, events TEXT, base_url TEXT);
"""
WEBHOOK_CURSOR = "webhook_cursor"  # serving_meta: the last event id handed to webhook delivery


@dataclass
class Event:
    """One event of one job. ``id``: its sequence number (increasing across jobs);
    ``created_at``: Unix seconds; ``data``: as the module's table says."""

    id: int
    job_id: str
    type: str
    created_at: float
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL

    @classmethod
    def from_row(cls, row: sqlite3.Row | dict) -> "Event":
        return cls(int(row["seq"]), row["job_id"], row["type"], float(row["created_at"]), json.loads(row["data"] or "{}"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sse(self) -> bytes:
        """This event as one Server-Sent Events message (``id``, ``event``, one ``data`` line of JSON)."""
        return f"id: {self.id}\nevent: {self.type}\ndata: {json.dumps(self.to_dict(), separators=(',', ':'))}\n\n".encode()


def emit(db: sqlite3.Connection, job_id: str, type: str, data: dict[str, Any] | None = None, now: float | None = None) -> None:
    """Append an event inside the caller's transaction ``db``."""
    assert type in EVENT_TYPES, type
    db.execute("INSERT INTO job_events (job_id, type, data, created_at) VALUES (?, ?, ?, ?)",
               (job_id, type, json.dumps(data or {}, separators=(",", ":")), time.time() if now is None else now))


def progress_due(db: sqlite3.Connection, job_id: str, now: float) -> bool:
    """Whether ``job_id``'s last progress event is at least :data:`PROGRESS_INTERVAL` old."""
    row = db.execute("SELECT created_at FROM job_events WHERE job_id = ? AND type = 'progress' ORDER BY seq DESC LIMIT 1", (job_id,)).fetchone()
    return row is None or now - row["created_at"] >= PROGRESS_INTERVAL


def parse_last_event_id(value: str | None) -> int:
    """The ``Last-Event-ID`` header as an event id (0 when absent or not a whole number >= 0)."""
    value = (value or "").strip()
    return int(value) if value.isdigit() and len(value) <= 18 else 0


async def sse_stream(
    read: Callable[[int], list[Event]],
    after: int,
    *,
    render: Callable[[Event], Event] = lambda e: e,
    gone: Callable[[], bool] = lambda: False,
    disconnected: Callable[[], Any] | None = None,
    poll: float = 0.25,
    keepalive: float = 15.0,
) -> AsyncIterator[bytes]:
    """The SSE body of one job's events after event id ``after``, ending after a terminal event.

    ``read(after)`` returns the next events (run in a thread: SQLite); ``render`` turns stored
    events into sent ones (a validation image into a signed URL); ``gone()`` ends the stream
    when the job was deleted; ``disconnected`` is ``Request.is_disconnected``. A comment line
    (``: keep-alive``) is sent after ``keepalive`` seconds without an event, so proxies keep
    the connection open. The first message is ``retry: 2000`` (EventSource reconnects after 2 s).
    """
    from starlette.concurrency import run_in_threadpool

    yield b"retry: 2000\n\n"
    quiet_since = time.monotonic()
    while True:
        events = await run_in_threadpool(read, after)
        for event in events:
            after = event.id
            yield render(event).sse()
            if event.terminal:
                return
        if events:
            quiet_since = time.monotonic()
        elif await run_in_threadpool(gone):
            return
        elif time.monotonic() - quiet_since >= keepalive:
            quiet_since = time.monotonic()
            yield b": keep-alive\n\n"
        if disconnected is not None and await disconnected():
            return
        await asyncio.sleep(poll)
