"""Serving jobs as users script them: the queue position and step/total in a job's status, its
events as Server-Sent Events (resumable with Last-Event-ID), signed webhooks delivered to a real
local receiver (retried, bounded, never blocking the job) and image URLs that expire."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import threading
import time
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from serving import create_app
from serving.events import Event
from serving.signing import sign_body, verify_body
from serving.webhooks import wanted, webhook_body
from test_serving import apprentice_dir, decode_png, files, free_port, runtime, settings_for, wait_for, wait_job  # noqa: F401 (the fixture)

SECRET = "test-webhook-secret"


def parse_sse(text: str) -> list[tuple[int, str, dict]]:
    """``(id, event, data)`` of each message of an SSE body (comments and ``retry`` skipped)."""
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":") and ": " in line)
        if "event" in fields:
            out.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
    return out


class Receiver:
    """A webhook receiver on a loopback port: verifies each POST's ``X-Suti-Signature`` with
    ``hmac.compare_digest`` and records it; answers 500 to the first ``fail_first`` POSTs."""

    def __init__(self, secret: str, fail_first: int = 0):
        self.secret, self.fail_first = secret.encode(), fail_first
        self.posts: list[dict] = []  # every POST: {"event", "verified", "status"}
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(receiver.secret, body, hashlib.sha256).hexdigest()
                verified = hmac.compare_digest(expected, self.headers.get("X-Suti-Signature", ""))
                status = 500 if len(receiver.posts) < receiver.fail_first else (200 if verified else 401)
                receiver.posts.append({"event": json.loads(body), "verified": verified, "status": status, "type": self.headers.get("X-Suti-Event")})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def accepted(self) -> list[dict]:
        return [p["event"] for p in self.posts if p["status"] == 200]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --- units -----------------------------------------------------------------------------------


def test_webhook_body_signature_and_filters():
    event = Event(7, "a" * 32, "progress", 1.5, {"step": 3, "total": 10})
    body = webhook_body(event, now=100)
    assert json.loads(body) == {"event_id": 7, "type": "progress", "job_id": "a" * 32, "created_at": 1.5, "timestamp": 100, "data": {"step": 3, "total": 10}}
    signature = sign_body(b"k", body)
    assert signature == "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert verify_body(b"k", body, signature) and not verify_body(b"other", body, signature) and not verify_body(b"k", body + b" ", signature)
    done = Event(8, "a" * 32, "done", 2.0)
    assert wanted(done, None) and wanted(done, "progress")  # terminal events always go
    assert not wanted(event, None) and not wanted(event, "start,output") and wanted(event, "start,progress")
    assert wanted(Event(9, "a" * 32, "started", 1.0), "start") and wanted(Event(9, "a" * 32, "validation", 1.0), "output")


def test_the_secret_is_made_once_private_and_shared_by_restarts(tmp_path, apprentice_dir):
    settings = settings_for(tmp_path, apprentice_dir)
    first = create_app(settings).state.runtime.secret
    path = settings.data_dir / "webhook_secret"
    assert len(first) == 64 and path.read_text().strip().encode() == first
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert create_app(settings).state.runtime.secret == first  # a restart signs as before
    assert create_app(settings.with_(webhook_secret="chosen")).state.runtime.secret == b"chosen"


# --- status and events -------------------------------------------------------------------------


def test_queued_jobs_report_their_queue_position(tmp_path, apprentice_dir):
    with TestClient(create_app(settings_for(tmp_path, apprentice_dir))) as c:
        rt = runtime(c)
        rt.jobs.stop()  # no dispatcher: jobs stay queued
        rt.jobs = None
        first, second = (c.post("/v1/experts", files=files(3), data={"class_noun": "star"}).json() for _ in range(2))
        assert (first["queue_position"], second["queue_position"]) == (1, 2)
        assert first["events_url"] == f"/v1/experts/{first['id']}/events"
        assert c.get(f"/v1/experts/{second['id']}").json()["queue_position"] == 2
        c.delete(f"/v1/experts/{first['id']}")
        assert c.get(f"/v1/experts/{first['id']}").json()["queue_position"] is None
        job = c.get(f"/v1/experts/{second['id']}").json()
        assert job["queue_position"] == 1 and job["step"] is None and job["total"] is None
        listed = {j["id"]: j["queue_position"] for j in c.get("/v1/experts").json()["jobs"]}
        assert listed == {first["id"]: None, second["id"]: 1}
        events = parse_sse(c.get(f"/v1/experts/{first['id']}/events").text)  # ends at cancelled
        assert [e for _, e, _ in events] == ["queued", "cancelled"]


@pytest.mark.slow
def test_a_job_streams_its_events_and_sends_signed_webhooks(tmp_path, apprentice_dir):
    """Issue 34's acceptance: the events stream shows progress to done (resumable), and a
    webhook_url on a local receiver gets every event, signed so that it verifies, with a
    failed POST retried; a second job whose receiver is dead finishes all the same."""
    flaky = Receiver(SECRET, fail_first=1)
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    settings = settings_for(tmp_path, apprentice_dir, webhook_secret=SECRET, webhook_attempts=3, webhook_backoff_s=0.05, webhook_timeout=2.0, job_workers=2)
    try:
        with TestClient(create_app(settings)) as client:
            data = {"class_noun": "star", "steps": 40, "validation_prompt": "a {V} {class} in the snow",
                    "webhook_url": flaky.url, "webhook_events_filter": ["start", "progress", "output"]}
            r = client.post("/v1/experts", files=files(3), data=data)
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            lost = client.post("/v1/experts", files=files(3), data={"class_noun": "star", "steps": 3, "webhook_url": dead}).json()["id"]
            assert client.get(f"/v1/experts/{job_id}").json()["webhook_events_filter"] == ["completed", "start", "progress", "output"]
            events = _stream_to_done(client, job_id)
            assert wait_job(client, lost)["status"] == "done"  # its receiver is dead: the job finishes all the same
            wait_for(lambda: len(flaky.accepted()) >= len(events), 20, 0.1, "every event at the receiver")
            metrics = wait_for(lambda: (m := client.get("/metrics").text) and "suti_webhooks_failed_total 1\n" in m and m, 20, 0.2, "the dead receiver given up on")
            accepted = flaky.accepted()
            assert all(p["verified"] for p in flaky.posts), flaky.posts
            assert sorted(e["event_id"] for e in accepted) == [i for i, _, _ in events]  # each event once, as streamed
            assert all(e["job_id"] == job_id and abs(e["timestamp"] - time.time()) < 120 for e in accepted)
            assert flaky.posts[0]["status"] == 500 and flaky.posts[0]["event"]["event_id"] in [e["event_id"] for e in accepted]  # retried
            assert {p["type"] for p in flaky.posts} == {"queued", "started", "progress", "validation", "done"}
            url = next(e for e in accepted if e["type"] == "validation")["data"]["url"]
            assert url.startswith(f"http://testserver/v1/files/experts/{job_id}/validation/")  # absolute: where the POST came in
            assert client.get(url).status_code == 200
            assert "suti_webhooks_delivered_total" in metrics
    finally:
        flaky.close()


def _stream_to_done(client, job_id: str) -> list[tuple[int, str, dict]]:
    with client.stream("GET", f"/v1/experts/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())
    assert text.startswith("retry: 2000\n\n")
    events = parse_sse(text)
    kinds = [e for _, e, _ in events]
    assert kinds[:2] == ["queued", "started"] and kinds[-2:] == ["validation", "done"], kinds
    assert [i for i, _, _ in events] == sorted(i for i, _, _ in events)
    progress = [d for _, e, d in events if e == "progress"]
    assert any(d["data"]["phase"] == "training" and d["data"]["total"] == 40 and 0 < d["data"]["step"] <= 40 for d in progress), progress
    times = [d["created_at"] for d in progress]
    assert all(b - a >= 0.5 for a, b in zip(times, times[1:])), times  # at most one every 500 ms
    job = client.get(f"/v1/experts/{job_id}").json()
    assert job["status"] == "done" and job["queue_position"] is None and (job["step"], job["total"]) == (40, 40)

    validation = events[-2][2]["data"]
    url = urlsplit(validation["url"])
    assert url.path.startswith(f"/v1/files/experts/{job_id}/validation/step-") and validation["expires_at"] > time.time()
    image = client.get(validation["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert decode_png(image.content).size == (32, 32)
    forged = validation["url"].replace("signature=", "signature=0")[:-1]
    assert client.get(forged).status_code == 403

    middle = events[2][0]  # resume after the first progress event
    resumed = parse_sse(client.get(f"/v1/experts/{job_id}/events", headers={"Last-Event-ID": str(middle)}).text)
    assert [i for i, _, _ in resumed] == [i for i, _, _ in events[3:]]
    assert client.get(f"/v1/experts/{'0' * 32}/events").status_code == 404
    assert client.get("/v1/experts/nothex/events").status_code == 422
    return events


def test_the_stream_keeps_alive_and_ends_when_the_job_is_deleted(tmp_path):
    import asyncio

    from serving.events import sse_stream
    from serving.store import JobStore, new_job_id

    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = new_job_id()
    store.create(job_id, class_noun="cup", recipe="r", model="tiny", steps=1, seed=0, num_images=3)
    polls = []

    def gone() -> bool:
        polls.append(1)
        if len(polls) == 6:  # the job is cancelled and deleted while the stream is quiet
            store.cancel(job_id)
            store.delete(job_id)
        return store.get(job_id) is None

    async def read_all() -> bytes:
        chunks = [c async for c in sse_stream(lambda after: store.events(job_id, after) if len(polls) < 6 else [], 0, gone=gone, poll=0.01, keepalive=0.02)]
        return b"".join(chunks)

    body = asyncio.run(read_all()).decode()
    assert body.startswith("retry: 2000\n\nid: ") and "event: queued" in body
    assert ": keep-alive\n\n" in body and "cancelled" not in body  # ended by the deletion, not an event
    assert store.events(job_id) == []  # a deleted job's events go with it


@pytest.mark.parametrize("data, message", [
    ({"webhook_url": "ftp://example.com/hook"}, "webhook_url: must be an http:// or https:// URL"),
    ({"webhook_url": "javascript:alert(1)"}, "webhook_url: must be an http:// or https:// URL"),
    ({"webhook_url": "http:///hook"}, "webhook_url: no host"),
    ({"webhook_url": "http://example.com:99999/"}, "webhook_url: not a URL"),
    ({"webhook_url": "http://example.com/" + "a" * 2000}, "webhook_url"),
    ({"webhook_url": "https://example.com/hook", "webhook_events_filter": "logs"}, "webhook_events_filter"),
    ({"webhook_events_filter": "progress"}, "webhook_events_filter: given without webhook_url"),
])
def test_webhook_fields_are_checked_at_the_edge(tmp_path, apprentice_dir, data, message):
    with TestClient(create_app(settings_for(tmp_path, apprentice_dir))) as c:
        r = c.post("/v1/experts", files=files(3), data={"class_noun": "star", **data})
        assert r.status_code == 422 and message in r.json()["error"], r.text
        assert c.get("/v1/experts").json()["jobs"] == []


# --- image URLs that expire ----------------------------------------------------------------------


def test_generated_images_as_urls_that_expire(tmp_path, apprentice_dir):
    settings = settings_for(tmp_path, apprentice_dir, api_key="k")
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/generate?expires=60", files=files(2), data={"prompt": "a cup", "num_images": 2, "seed": 3, "steps": 2}, headers={"X-API-Key": "k"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"urls", "expires_at", "seed"} and len(body["urls"]) == 2 and 0 < body["expires_at"] - time.time() <= 61
        for url in body["urls"]:
            assert url.startswith("http://testserver/v1/files/results/")
            got = c.get(url)  # no API key: the signature is the credential
            assert got.status_code == 200 and decode_png(got.content).size == (32, 32)
        url = body["urls"][0]
        assert c.get(url.replace(f"expires={body['expires_at']}", f"expires={body['expires_at'] + 1}")).status_code == 403
        rt = runtime(c)
        name = urlsplit(url).path.removeprefix("/v1/files/")
        expired = rt.file_url(name, int(time.time()) - 1, None)
        assert c.get(expired).status_code == 410 and "expired" in c.get(expired).json()["error"]
        assert c.get(rt.file_url("jobs.sqlite", int(time.time()) + 60, None)).status_code == 404  # only images a URL is made for
        for bad in ("0", str(8 * 86400), "x"):
            r = c.post(f"/v1/generate?expires={bad}", files=files(1), data={"prompt": "a cup"}, headers={"X-API-Key": "k"})
            assert r.status_code == 422 and "expires" in r.json()["error"], r.text
        from serving.signing import sweep_results

        assert sweep_results(settings.results_dir, now=time.time() + 120) == 2  # swept once expired
        assert os.listdir(settings.results_dir) == []
        assert c.get(url).status_code == 404


def test_every_state_change_is_one_event_and_old_job_tables_are_upgraded(tmp_path):
    import sqlite3

    from serving.store import SCHEMA, JobStore, new_job_id

    db = tmp_path / "jobs.sqlite"
    with sqlite3.connect(db) as conn:  # a job table as the first servers made it
        conn.executescript(SCHEMA)  # the first table; the columns since are ADDED_COLUMNS
        conn.execute("INSERT INTO jobs (id, state, class_noun, recipe, model, num_images, created_at) VALUES (?, 'queued', 'cup', 'r', 'tiny', 3, 0)", ("a" * 32,))
    store = JobStore(db)
    assert store.get("a" * 32)["webhook_url"] is None and store.get("a" * 32)["step"] is None  # columns added, row kept
    job_id = new_job_id()
    store.create(job_id, class_noun="cup", recipe="r", model="tiny", steps=5, seed=0, num_images=3)
    store.cancel("a" * 32)
    run = store.claim_next("me", "host", 1)
    assert run["id"] == job_id
    assert store.report(job_id, run["run_token"], 0.1, "training", 1, 5)
    assert store.report(job_id, run["run_token"], 0.2, "training", 2, 5)  # within 500 ms: the row moves, no event
    assert (store.get(job_id)["step"], store.get(job_id)["total"]) == (2, 5)
    time.sleep(0.6)  # past PROGRESS_INTERVAL: the next report is an event
    assert store.report(job_id, run["run_token"], 0.99, "saving")  # no step of its own: the event keeps the last one
    assert store.requeue(job_id, run["run_token"], reason="retrying (killed)")
    run = store.claim_next("me", "host", 1)
    assert store.fail(job_id, run["run_token"], "boom")
    kinds = [(e.type, e.data) for e in store.events(job_id)]
    assert kinds == [("queued", {}), ("started", {"attempt": 1}), ("progress", {"progress": 0.1, "phase": "training", "step": 1, "total": 5}),
                     ("progress", {"progress": 0.99, "phase": "saving", "step": 2, "total": 5}),
                     ("queued", {"reason": "retrying (killed)"}), ("started", {"attempt": 2}), ("failed", {"error": "boom"})], kinds
    assert [e.type for e in store.events("a" * 32)] == ["cancelled"]
    assert [e.type for e in store.events(job_id, after=store.events(job_id)[4].id)] == ["started", "failed"]


def test_a_job_deleted_right_after_it_finished_still_sends_its_webhooks(tmp_path):
    from serving.store import JobStore, new_job_id

    store = JobStore(tmp_path / "jobs.sqlite")
    assert store.take_events() == []  # the webhook cursor starts (a server is delivering)
    job_id, other = new_job_id(), new_job_id()
    store.create(job_id, class_noun="cup", recipe="r", model="tiny", steps=1, seed=0, num_images=3, webhook_url="http://h/x", webhook_events=["start"], base_url="http://s/")
    store.create(other, class_noun="cup", recipe="r", model="tiny", steps=1, seed=0, num_images=3)
    run = store.claim_next("me", "host", 1)
    assert store.finish(job_id, run["run_token"], "done")
    assert store.delete(job_id)  # before webhook delivery read its events
    assert store.get(job_id) is None
    taken = store.take_events()
    assert [(e.job_id, e.type) for e, _ in taken] == [(job_id, "queued"), (job_id, "started"), (job_id, "done")]  # not the other job's (no webhook)
    assert taken[-1][1] == {"webhook_url": "http://h/x", "webhook_events": "start", "base_url": "http://s/"}
    assert store.take_events() == [] and store.events(job_id) == []  # read once, then forgotten
    with store._tx() as db:
        assert db.execute("SELECT COUNT(*) AS n FROM webhook_targets").fetchone()["n"] == 0
    assert [e.type for e in store.events(other)] == ["queued"]
