"""Webhooks: the server POSTs a job's events to the ``webhook_url`` given when it was started.

Which events: the terminal ones (``done``, ``failed``, ``cancelled``: the filter name
``completed``) always; with ``webhook_events_filter`` (named as Replicate's) also ``start``
(``queued``, ``started``), ``progress`` and ``output`` (``validation``: the image's URL).

The body is JSON ``{"event_id", "type", "job_id", "created_at", "timestamp", "data"}``:
``event_id`` is the event's id (the same as the SSE ``id:``; deliver at least once, so dedupe on
it), ``timestamp`` the Unix second this attempt was sent (refuse old ones: replays).
``X-Suti-Signature: sha256=<hex>`` is HMAC-SHA256 of the exact body bytes with the server's
secret (:mod:`serving.signing`); ``X-Suti-Event`` and ``X-Suti-Event-Id`` repeat the type and id.

Delivery never blocks a job: a tail thread reads new events from the job table (a persisted
cursor, so a restarted server sends what it missed, and of several servers each event goes to
one), and delivery threads POST them (``webhook_timeout`` s each). A network error, a 5xx, 408
or 429 is retried up to ``webhook_attempts`` times in all, after 1, 2, 4... x
``webhook_backoff_s`` (at most 60 s); another 4xx is not. At most ``webhook_queue`` deliveries
wait; beyond that they are dropped and logged. Every give-up is logged and counted in metrics.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field

import httpx

import suti
from serving.events import Event
from serving.signing import SIGNATURE_HEADER, sign_body

log = logging.getLogger(__name__)

FILTERS = ("start", "progress", "output", "completed")  # webhook_events_filter values
FILTER_OF = {"queued": "start", "started": "start", "progress": "progress", "validation": "output", "done": "completed", "failed": "completed", "cancelled": "completed"}
RETRY_STATUS = (408, 425, 429)
MAX_BACKOFF = 60.0


def wanted(event: Event, filters: str | None) -> bool:
    """Whether a job with ``webhook_events`` ``filters`` (comma-separated) gets ``event``."""
    kind = FILTER_OF[event.type]
    return kind == "completed" or kind in (filters or "").split(",")


def webhook_body(event: Event, now: float | None = None) -> bytes:
    """The JSON body of ``event`` (compact, UTF-8): what the signature covers."""
    payload = {"event_id": event.id, "type": event.type, "job_id": event.job_id, "created_at": event.created_at,
               "timestamp": int(time.time() if now is None else now), "data": event.data}
    return json.dumps(payload, separators=(",", ":")).encode()


@dataclass(order=True)
class Delivery:
    due: float
    order: int
    url: str = field(compare=False)
    event: Event = field(compare=False)
    attempt: int = field(default=0, compare=False)


class WebhookSender:
    """Reads events from ``store`` and POSTs them to their jobs' webhooks (see the module).

    ``render`` turns a stored event into the sent one (a validation image into a signed URL,
    given the job's ``base_url``); ``metrics`` counts ``suti_webhooks_{delivered,failed,dropped}_total``.
    """

    poll = 0.25

    def __init__(self, settings, store, secret: bytes, render, metrics=None):
        self.settings, self.store, self.secret, self.render, self.metrics = settings, store, secret, render, metrics
        self._heap: list[Delivery] = []
        self._cv = threading.Condition()
        self._order = itertools.count()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._client: httpx.Client | None = None

    def start(self) -> None:
        self._client = httpx.Client(timeout=self.settings.webhook_timeout, follow_redirects=False, headers={"User-Agent": f"suti/{suti.__version__}"})
        self._threads = [threading.Thread(target=self._tail, name="suti-webhook-tail", daemon=True)]
        self._threads += [threading.Thread(target=self._deliver_loop, name=f"suti-webhook-{i}", daemon=True) for i in range(self.settings.webhook_threads)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop the threads (waiting deliveries are logged and dropped: they are not persisted)."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        deadline = time.monotonic() + self.settings.webhook_timeout + 1  # a POST in flight may take that long
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._heap:
            log.warning("server stopping: %d webhook deliveries not sent", len(self._heap))
        if self._client is not None:
            self._client.close()

    @property
    def waiting(self) -> int:
        return len(self._heap)

    def _count(self, what: str, help: str) -> None:
        if self.metrics is not None:
            self.metrics.inc(f"suti_webhooks_{what}_total", help=help)

    def _tail(self) -> None:
        while not self._stop.is_set():
            try:
                taken = self.store.take_events()
            except Exception:  # noqa: BLE001 - the database is busy or gone: try again
                log.exception("could not read job events for webhooks")
                taken = []
            for event, job in taken:
                if wanted(event, job["webhook_events"]):
                    self.enqueue(job["webhook_url"], self.render(event, job["base_url"]))
            if not taken:
                self._stop.wait(self.poll)

    def enqueue(self, url: str, event: Event) -> bool:
        """Schedule ``event`` for ``url`` now; False (logged, counted) when the queue is full."""
        with self._cv:
            if len(self._heap) >= self.settings.webhook_queue:
                log.warning("webhook queue full (%d): dropped event %d (%s) of job %s", len(self._heap), event.id, event.type, event.job_id)
                self._count("dropped", "Webhook deliveries dropped because the queue was full.")
                return False
            heapq.heappush(self._heap, Delivery(time.monotonic(), next(self._order), url, event))
            self._cv.notify()
        return True

    def _next(self) -> Delivery | None:
        with self._cv:
            while not self._stop.is_set():
                now = time.monotonic()
                if self._heap and self._heap[0].due <= now:
                    return heapq.heappop(self._heap)
                self._cv.wait(min(self._heap[0].due - now, 1.0) if self._heap else 1.0)
        return None

    def _deliver_loop(self) -> None:
        while (d := self._next()) is not None:
            try:
                self.deliver(d)
            except Exception:  # noqa: BLE001 - never let one delivery stop the others
                log.exception("webhook delivery of event %d failed", d.event.id)

    def deliver(self, d: Delivery) -> None:
        """POST one attempt of ``d``; on a retriable failure schedule the next with backoff."""
        d.attempt += 1
        body = webhook_body(d.event)
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign_body(self.secret, body), "X-Suti-Event": d.event.type, "X-Suti-Event-Id": str(d.event.id)}
        try:
            status = self._client.post(d.url, content=body, headers=headers).status_code
            why, retry = f"HTTP {status}", status >= 500 or status in RETRY_STATUS
        except httpx.HTTPError as exc:
            status, why, retry = None, f"{type(exc).__name__}: {exc}", True
        if status is not None and 200 <= status < 300:
            self._count("delivered", "Webhook events delivered (2xx).")
            return
        if retry and d.attempt < self.settings.webhook_attempts and not self._stop.is_set():
            delay = min(self.settings.webhook_backoff_s * 2 ** (d.attempt - 1), MAX_BACKOFF)
            log.info("webhook %s, event %d (%s) of job %s: %s; retrying in %.2f s", d.url, d.event.id, d.event.type, d.event.job_id, why, delay)
            with self._cv:
                d.due = time.monotonic() + delay
                heapq.heappush(self._heap, d)
                self._cv.notify()
            return
        log.warning("webhook %s: gave up on event %d (%s) of job %s after %d attempt(s): %s", d.url, d.event.id, d.event.type, d.event.job_id, d.attempt, why)
        self._count("failed", "Webhook events given up on (attempts spent or a 4xx answer).")
