"""Serving: every endpoint and error through TestClient; load, restart and browser tests against a
real uvicorn (``suti serve``) on a free loopback port. Everything runs the random ``tiny`` model
and an untrained apprentice built from it, with a few denoising and training steps."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import draw_subject
from images_util import png_bomb, truncated_jpeg
from serving import Settings, create_app
from serving.generation import Result, png_bytes
from serving.store import JobStore, new_job_id, pid_alive

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _new_page(browser):
    """A page of ``browser`` and the list its JavaScript errors are collected in."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page, errors


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def apprentice_dir(suti_cache, tmp_path_factory) -> Path:
    """An untrained apprentice on the tiny model, saved as a folder (safetensors)."""
    from apprentice import ApprenticePipeline
    from suti.models import load_pipeline

    folder = tmp_path_factory.mktemp("apprentice") / "tiny-apprentice"
    ApprenticePipeline.from_base(load_pipeline("tiny")).save_pretrained(str(folder), safe_serialization=True)
    return folder


def photo(seed: int, size: int = 48, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    draw_subject(seed, size).save(buf, format=fmt)
    return buf.getvalue()


def files(n: int, field: str = "images") -> list:
    return [(field, (f"photo_{i}.png", photo(i), "image/png")) for i in range(n)]


def settings_for(tmp_path: Path, apprentice_dir: Path, **overrides) -> Settings:
    base = dict(
        model="tiny", apprentice=str(apprentice_dir), data_dir=tmp_path / "data", torch_threads=1, preload=False,
        default_steps=2, max_concurrency=2, max_queue=4, request_timeout=60.0, job_stale_seconds=30.0,
    )
    base.update(overrides)
    return Settings(**base)


@pytest.fixture()
def client(tmp_path, apprentice_dir):
    with TestClient(create_app(settings_for(tmp_path, apprentice_dir))) as c:
        yield c


@pytest.fixture(scope="module")
def shared_client(tmp_path_factory, apprentice_dir):
    """One app for the read-only endpoint and error tests (saves model loads)."""
    with TestClient(create_app(settings_for(tmp_path_factory.mktemp("shared"), apprentice_dir))) as c:
        yield c


def runtime(client: TestClient):
    return client.app.state.runtime


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_job(client, job_id: str, states=("done", "failed", "cancelled"), timeout: float = 180.0) -> dict:
    return wait_for(lambda: (j := client.get(f"/v1/experts/{job_id}").json()) and j["status"] in states and j, timeout, 0.3, f"job {job_id} in {states}")


def decode_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return img


# --- /v1/generate ------------------------------------------------------------------------------


def test_generate_answers_one_png_and_is_reproducible(shared_client):
    r = shared_client.post("/v1/generate", files=files(3), data={"prompt": "a photo on the beach", "seed": 7, "steps": 2})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "7"
    assert decode_png(r.content).size == (32, 32)
    again = shared_client.post("/v1/generate", files=files(3), data={"prompt": "a photo on the beach", "seed": 7, "steps": 2})
    assert again.content == r.content


def test_generate_several_images_as_json_with_captions(shared_client):
    r = shared_client.post("/v1/generate", files=files(2), data={"prompt": "a toy", "num_images": 3, "captions": ["a red star", "a star"], "guidance_scale": 3.0, "demo_guidance_scale": 1.5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 3 and isinstance(body["seed"], int)
    images = [base64.b64decode(b) for b in body["images"]]
    assert all(decode_png(b).size == (32, 32) for b in images)
    assert len(set(images)) == 3, "image i uses seed + i"
    # made in one batch, image i is still the image of seed + i alone (up to float rounding)
    alone = shared_client.post("/v1/generate", files=files(2), data={"prompt": "a toy", "num_images": 1, "seed": body["seed"] + 2, "captions": ["a red star", "a star"], "guidance_scale": 3.0, "demo_guidance_scale": 1.5})
    assert alone.status_code == 200, alone.text
    diff = (np.asarray(decode_png(alone.content), dtype=int) - np.asarray(decode_png(images[2]), dtype=int))
    assert np.abs(diff).max() <= 1
    assert np.abs(np.asarray(decode_png(images[0]), dtype=int) - np.asarray(decode_png(images[2]), dtype=int)).max() > 20


def test_concurrent_requests_match_serial_ones(client):
    """Requests share the cached model but not its scheduler: concurrency does not change images."""
    def ask(prompt):
        return client.post("/v1/generate", files=files(1), data={"prompt": prompt, "seed": 3, "steps": 3}).content

    serial = [ask("a cat"), ask("a dog in the snow")]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        parallel = list(pool.map(ask, ["a cat", "a dog in the snow"]))
    assert parallel == serial


def test_each_generation_thread_tokenizes_with_its_own_tokenizer():
    """transformers' tokenizers keep padding/truncation as shared backend state: two threads
    calling one at once (a padded prompt and an unpadded token count) stripped a prompt's padding
    under load (a 500). Every request view gets its thread's own copy, made once per thread."""
    from suti.conditioning import tokenize
    from suti.models import load_pipeline
    from suti.sampling import token_count
    from serving.generation import request_copy

    pipe = load_pipeline("tiny")
    a, b = request_copy(pipe, lambda: None), request_copy(pipe, lambda: None)
    assert a.tokenizer is b.tokenizer and a.tokenizer is not pipe.tokenizer and a.unet is pipe.unet
    views, bad = [], []
    stop = time.monotonic() + 2.0

    def padded():
        view = request_copy(pipe, lambda: None)
        views.append(view)
        while time.monotonic() < stop:
            n = tokenize(view.tokenizer, ["a photo of a cup"]).shape[1]
            if n != pipe.tokenizer.model_max_length:
                bad.append(n)

    def counted():
        view = request_copy(pipe, lambda: None)
        views.append(view)
        while time.monotonic() < stop:
            token_count(view.tokenizer, "a photo of a cup " * 30)

    threads = [threading.Thread(target=padded), threading.Thread(target=counted)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert bad == []
    assert len({id(v.tokenizer) for v in views} | {id(a.tokenizer)}) == 3, "one tokenizer per thread"


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("text-file", 400, "images[0]: not a readable image"),
        ("no-images", 422, "images: Field required"),
        ("nine-images", 400, "images: give 1 to 8 images (got 9)"),
        ("bomb", 400, "images[1]: "),
        ("truncated", 400, "images[0]: corrupt or truncated"),
        ("empty-file", 400, "images[0]: the file is empty"),
        ("long-prompt", 422, "prompt: String should have at most 300 characters"),
        ("no-prompt", 422, "prompt: Field required"),
        ("empty-prompt", 400, "prompt: must not be empty"),
        ("blank-prompt", 400, "prompt: must not be empty"),
        ("nan-guidance", 422, "guidance_scale: Input should be a finite number"),
        ("inf-demo-guidance", 422, "demo_guidance_scale: Input should be a finite number"),
        ("json-body", 415, "/v1/generate takes multipart/form-data fields"),
        ("urlencoded", 422, "images: Field required (photos are uploaded as multipart/form-data)"),
        ("captions", 400, "captions: 1 captions for 2 images"),
        ("num-images", 422, "num_images: "),
        ("steps", 422, "steps: "),
        ("control-chars", 400, "prompt: contains control characters"),
    ],
)
def test_generate_refuses_bad_input_naming_the_field(shared_client, tmp_path, case, status, message):
    data = {"prompt": "a photo"}
    upload = files(2)
    if case == "text-file":
        upload = [("images", ("notes.png", b"this is not an image\n", "image/png"))]
    elif case == "no-images":
        upload = None
    elif case == "nine-images":
        upload = files(9)
    elif case == "bomb":
        upload = [upload[0], ("images", ("bomb.png", png_bomb(tmp_path / "bomb.png").read_bytes(), "image/png"))]
    elif case == "truncated":
        upload = [("images", ("cut.jpg", truncated_jpeg(tmp_path / "cut.jpg").read_bytes(), "image/jpeg"))]
    elif case == "empty-file":
        upload = [("images", ("empty.png", b"", "image/png"))]
    elif case == "long-prompt":
        data["prompt"] = "x" * 301
    elif case == "no-prompt":
        data = {}
    elif case == "empty-prompt":
        data["prompt"] = ""
    elif case == "blank-prompt":
        data["prompt"] = "   "
    elif case == "nan-guidance":
        data["guidance_scale"] = "nan"
    elif case == "inf-demo-guidance":
        data["demo_guidance_scale"] = "inf"
    elif case == "json-body":
        r = shared_client.post("/v1/generate", json={"prompt": "a photo", "images": ["aGVsbG8="]})
        assert r.status_code == status and message in r.json()["error"] and "not application/json" in r.json()["error"], r.text
        return
    elif case == "urlencoded":
        upload = None
    elif case == "captions":
        data["captions"] = ["only one"]
    elif case == "num-images":
        data["num_images"] = 5
    elif case == "steps":
        data["steps"] = 1000
    elif case == "control-chars":
        data["prompt"] = "a photo\x00"
    r = shared_client.post("/v1/generate", files=upload, data=data)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert message in r.json()["error"]
    if case == "bomb":
        assert "decompression bomb" in r.json()["error"]


def test_upload_size_limits(tmp_path, apprentice_dir):
    settings = settings_for(tmp_path, apprentice_dir, max_file_bytes=4000, max_total_bytes=20_000)
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, format="PNG")
    big = buf.getvalue()
    assert len(big) > 4000
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/generate", files=[("images", ("a.png", photo(1), "image/png")), ("images", ("big.png", big, "image/png"))], data={"prompt": "x"})
        assert r.status_code == 413 and r.json()["error"].startswith("images[1]: file larger than the limit")
        r = c.post("/v1/generate", files=[("images", (f"{i}.png", photo(i), "image/png")) for i in range(8)] + [("pad", ("pad.bin", b"0" * 1_100_000, "application/octet-stream"))], data={"prompt": "x"})
        assert r.status_code == 413 and "request body larger than the limit" in r.json()["error"]

        def chunks():  # no Content-Length: the limit applies while the body streams in
            yield b"--xyz\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n"
            for _ in range(40):
                yield b"y" * 50_000

        r = c.post("/v1/generate", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"})
        assert r.status_code == 413, r.text


def test_pixel_limit(tmp_path, apprentice_dir):
    with TestClient(create_app(settings_for(tmp_path, apprentice_dir, max_image_pixels=40 * 40))) as c:
        r = c.post("/v1/generate", files=files(1), data={"prompt": "x"})  # 48 x 48 photos
        assert r.status_code == 400 and "images[0]: 48x48 = 2304 pixels exceeds the limit of 1600" in r.json()["error"]


def huge_png(side: int = 5900) -> bytes:
    """A small file (a few KB) that decodes to ``side`` x ``side`` pixels."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def count_decodes(monkeypatch) -> list:
    import serving.app

    calls, real = [], serving.app.decode_uploads
    monkeypatch.setattr(serving.app, "decode_uploads", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    return calls


def test_oversized_requests_are_refused_from_headers_at_once(tmp_path, apprentice_dir, monkeypatch):
    """Three concurrent requests of 8 photos of 5900x5900 pixels: 413 at once, nothing decoded."""
    import psutil

    big = huge_png()
    assert len(big) < 200_000
    decodes = count_decodes(monkeypatch)
    process = psutil.Process()
    with TestClient(create_app(settings_for(tmp_path, apprentice_dir))) as c:
        before, peak, done = process.memory_info().rss, [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()

        def ask(i):
            started = time.monotonic()
            if i == 2:  # an expert job of 5 such photos
                r = c.post("/v1/experts", files=[("images", (f"{j}.png", big, "image/png")) for j in range(5)], data={"class_noun": "dog"})
            else:
                r = c.post("/v1/generate", files=[("images", (f"{j}.png", big, "image/png")) for j in range(8)], data={"prompt": "x"})
            return r, time.monotonic() - started

        try:
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                answers = list(pool.map(ask, range(3)))
        finally:
            done.set()
            sampler.join()
        for r, seconds in answers:
            assert r.status_code == 413, r.text
            assert "pixels in all exceed the limit of 64,000,000 pixels per request" in r.json()["error"]
            assert seconds < 5, seconds
        assert decodes == []
        grown = (peak[0] - before) / 2**30
        assert grown < 1.5, f"{grown:.2f} GiB"
        print(f"3 oversized requests: {max(s for _, s in answers):.2f} s, RSS +{grown * 1024:.0f} MiB")
        assert c.get("/v1/experts").json()["jobs"] == []
        assert not any((runtime(c).settings.uploads_dir).iterdir())


def test_request_pixel_limit_sums_all_photos(tmp_path, apprentice_dir, monkeypatch):
    decodes = count_decodes(monkeypatch)
    with TestClient(create_app(settings_for(tmp_path, apprentice_dir, max_request_pixels=3 * 48 * 48))) as c:
        r = c.post("/v1/generate", files=files(3), data={"prompt": "x", "steps": 1})
        assert r.status_code == 200, r.text
        r = c.post("/v1/generate", files=files(4), data={"prompt": "x"})
        assert r.status_code == 413 and r.json()["error"] == "images: 4 images of 9,216 pixels in all exceed the limit of 6,912 pixels per request; send smaller photos"
        assert decodes == [3]


# --- limits of the executor: 429 and 504 ---------------------------------------------------------


def test_full_queue_answers_429_with_retry_after(tmp_path, apprentice_dir, monkeypatch):
    settings = settings_for(tmp_path, apprentice_dir, max_concurrency=1, max_queue=1)
    decodes = count_decodes(monkeypatch)
    release = threading.Event()
    with TestClient(create_app(settings)) as c:
        service = runtime(c).generation

        def blocking_work(*args, **kwargs):
            def work(check):
                release.wait(30)
                return Result([png_bytes(Image.new("RGB", (8, 8)))], 0, 0.0)

            return work

        service.apprentice_work = blocking_work
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = [pool.submit(c.post, "/v1/generate", files=files(1), data={"prompt": "x"}) for _ in range(2)]
            wait_for(lambda: service.active == 2, 20, what="two admitted requests")
            assert service.running == 1 and service.waiting == 1
            assert decodes == [1, 1]
            r = c.post("/v1/generate", files=[("images", ("big.png", huge_png(), "image/png"))] * 8, data={"prompt": "x"})
            assert r.status_code == 429, "admission comes before the photos are even looked at"
            assert decodes == [1, 1]
            r = c.post("/v1/generate", files=files(1), data={"prompt": "x"})
            assert r.status_code == 429
            assert decodes == [1, 1], "a refused request decodes nothing"
            assert int(r.headers["retry-after"]) >= 1
            assert "queue" in r.json()["error"]
            metrics = c.get("/metrics").text
            assert "suti_generate_queue_depth 1" in metrics and "suti_generate_in_flight 1" in metrics
            release.set()
            assert [f.result().status_code for f in first] == [200, 200]
        assert service.active == 0
        assert 'route="/v1/generate",status="429"} 2' in c.get("/metrics").text


def test_timeout_answers_504_and_stops_the_work(tmp_path, apprentice_dir):
    settings = settings_for(tmp_path, apprentice_dir, request_timeout=1.0, max_concurrency=1)
    with TestClient(create_app(settings)) as c:
        c.post("/v1/generate", files=files(1), data={"prompt": "warm up", "steps": 1})  # load the model
        started = time.monotonic()
        r = c.post("/v1/generate", files=files(1), data={"prompt": "x", "steps": 100, "num_images": 4})
        assert r.status_code == 504 and "did not finish within 1 s" in r.json()["error"]
        assert time.monotonic() - started < 5
        service = runtime(c).generation
        wait_for(lambda: service.active == 0, 5, 0.05, "the abandoned generation to stop")  # not the ~20 s it would take
        assert 'suti_generate_timeouts_total 1' in c.get("/metrics").text


def test_an_unloadable_apprentice_answers_503(tmp_path, apprentice_dir):
    broken = tmp_path / "broken-apprentice"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    with TestClient(create_app(settings_for(tmp_path, broken))) as c:
        r = c.post("/v1/generate", files=files(1), data={"prompt": "x"})
        assert r.status_code == 503 and "could not be loaded" in r.json()["error"]
        assert c.get("/healthz").json()["apprentice_loaded"] is False


# --- security ------------------------------------------------------------------------------------


def test_api_key(tmp_path, apprentice_dir):
    with TestClient(create_app(settings_for(tmp_path, apprentice_dir, api_key="s3cret"))) as c:
        for method, url in (("get", "/v1/experts"), ("post", "/v1/generate"), ("post", "/v1/experts"), ("get", "/metrics"), ("delete", f"/v1/experts/{new_job_id()}")):
            r = getattr(c, method)(url)
            assert r.status_code == 401, (url, r.status_code)
            assert "API key" in r.json()["error"]
        assert c.get("/v1/experts", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/experts", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/experts", headers={"X-API-Key": "s3cret"}).status_code == 200
        r = c.post("/v1/generate", files=files(1), data={"prompt": "x"}, headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200
        assert c.get("/healthz").status_code == 200  # liveness and the page stay open
        assert c.get("/").status_code == 200


@pytest.mark.parametrize("job_id, status", [("abc", 422), ("A" * 32, 422), ("0" * 31 + "g", 422), ("..%2F..%2Fetc%2Fpasswd", 404), ("0" * 32, 404)])
def test_bad_job_ids(shared_client, job_id, status):
    for method, url, kwargs in (
        ("get", f"/v1/experts/{job_id}", {}),
        ("delete", f"/v1/experts/{job_id}", {}),
        ("post", f"/v1/experts/{job_id}/generate", {"data": {"prompt": "a {V} {class}"}}),
    ):
        r = getattr(shared_client, method)(url, **kwargs)
        assert r.status_code == status, (method, url, r.status_code)
        assert "error" in r.json()


# --- DreamBooth jobs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("two-photos", 400, "images: give 3 to 5 images (got 2)"),
        ("six-photos", 400, "images: give 3 to 5 images (got 6)"),
        ("bad-photo", 400, "images[2]: not a readable image"),
        ("recipe-path", 400, "recipe: unknown recipe '../../configs/recipes/dreambooth'"),
        ("class-noun", 400, "class_noun: use letters"),
        ("no-class-noun", 422, "class_noun: Field required"),
        ("empty-class-noun", 400, "class_noun: must not be empty"),
        ("json-body", 415, "/v1/experts takes multipart/form-data fields"),
        ("steps", 422, "steps: "),
    ],
)
def test_expert_job_refuses_bad_input(shared_client, case, status, message):
    data = {"class_noun": "star"}
    upload = files(3)
    if case == "two-photos":
        upload = files(2)
    elif case == "six-photos":
        upload = files(6)
    elif case == "bad-photo":
        upload = files(2) + [("images", ("x.png", b"GIF89a-not-really", "image/png"))]
    elif case == "recipe-path":
        data["recipe"] = "../../configs/recipes/dreambooth"
    elif case == "class-noun":
        data["class_noun"] = "../star"
    elif case == "no-class-noun":
        data = {}
    elif case == "empty-class-noun":
        data["class_noun"] = ""
    elif case == "steps":
        data["steps"] = 0
    before = len(shared_client.get("/v1/experts").json()["jobs"])
    if case == "json-body":
        r = shared_client.post("/v1/experts", json=data)
    else:
        r = shared_client.post("/v1/experts", files=upload, data=data)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert len(shared_client.get("/v1/experts").json()["jobs"]) == before, "a refused job leaves no row"


def test_expert_job_trains_reports_progress_and_generates(client):
    rt = runtime(client)
    r = client.post("/v1/experts", files=files(4), data={"class_noun": "star", "steps": 60})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/experts/{job_id}"
    assert len(job_id) == 32
    early = client.post(f"/v1/experts/{job_id}/generate", data={"prompt": "a {V} {class}"})
    assert early.status_code == 409 and "once its job is done" in early.json()["error"]

    seen = []

    def progressed():
        job = client.get(f"/v1/experts/{job_id}").json()
        seen.append((job["status"], job["progress"], job["phase"]))
        return job["status"] in ("done", "failed") and job

    job = wait_for(progressed, 180, 0.1, "the job to finish")
    assert job["status"] == "done", job
    assert job["progress"] == 1.0 and job["attempts"] == 1 and job["identifier"]
    assert any(s == "running" and 0 < p < 1 for s, p, _ in seen), seen
    statuses = [s for s, _, _ in seen]
    assert statuses.index("running") < statuses.index("done")

    settings = rt.settings
    wait_for(lambda: not (settings.uploads_dir / job_id).exists(), 10, 0.2, "the uploaded photos to be deleted (upload_retention_s=0)")
    assert (settings.experts_dir / job_id / "expert.json").is_file()
    assert not (settings.experts_dir / f"{job_id}.partial").exists()

    one = client.post(f"/v1/experts/{job_id}/generate", data={"prompt": "a {V} {class} on the beach", "seed": 1})
    assert one.status_code == 200 and one.headers["content-type"] == "image/png"
    assert decode_png(one.content).size == (32, 32)
    two = client.post(f"/v1/experts/{job_id}/generate", data={"prompt": "a {V} {class}", "num_images": 2})
    assert two.status_code == 200 and len(two.json()["images"]) == 2

    listed = client.get("/v1/experts").json()["jobs"]
    assert [j["id"] for j in listed] == [job_id]
    assert client.get("/v1/experts", params={"status": "done"}).json()["jobs"][0]["id"] == job_id
    assert client.get("/v1/experts", params={"status": "queued"}).json()["jobs"] == []
    assert client.get("/v1/experts", params={"status": "bogus"}).status_code == 422
    metrics = client.get("/metrics").text
    assert 'suti_jobs{state="done"} 1' in metrics
    assert 'suti_http_requests_total{method="POST",route="/v1/experts",status="202"} 1' in metrics
    r = client.delete(f"/v1/experts/{job_id}")  # a finished expert is deleted with its files
    assert r.status_code == 200 and r.json()["status"] == "deleted" and r.json()["freed_bytes"] > 0, r.text
    assert not (settings.experts_dir / job_id).exists() and not (settings.logs_dir / f"{job_id}.log").exists()
    assert client.get(f"/v1/experts/{job_id}").status_code == 404
    assert client.post(f"/v1/experts/{job_id}/generate", data={"prompt": "a {V} {class}"}).status_code == 404
    assert client.delete(f"/v1/experts/{job_id}").status_code == 404
    assert 'suti_jobs{state="done"} 0' in client.get("/metrics").text


def test_cancel_stops_the_running_worker_and_a_queued_job(tmp_path, apprentice_dir):
    settings = settings_for(tmp_path, apprentice_dir, job_workers=1)
    with TestClient(create_app(settings)) as c:
        rt = runtime(c)
        running = c.post("/v1/experts", files=files(3), data={"class_noun": "star", "steps": 2000}).json()["id"]
        queued = c.post("/v1/experts", files=files(3), data={"class_noun": "star", "steps": 5}).json()["id"]
        wait_for(lambda: (j := c.get(f"/v1/experts/{running}").json())["status"] == "running" and j["progress"] > 0, 120, 0.2, "training to start")
        pid = rt.jobs.running_pids()[running]
        assert pid_alive(pid)
        assert c.get(f"/v1/experts/{queued}").json()["status"] == "queued"

        r = c.delete(f"/v1/experts/{queued}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        r = c.delete(f"/v1/experts/{running}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert not pid_alive(pid), "the worker process was stopped"
        assert not (settings.experts_dir / f"{running}.partial").exists()
        time.sleep(1.5)  # the dispatcher must not pick the cancelled queued job
        for job_id in (running, queued):
            job = c.get(f"/v1/experts/{job_id}").json()
            assert job["status"] == "cancelled", job
        assert c.get(f"/v1/experts/{queued}").json()["attempts"] == 0
        r = c.post(f"/v1/experts/{running}/generate", data={"prompt": "a {V} {class}"})
        assert r.status_code == 409 and "cancelled" in r.json()["error"]
        r = c.delete(f"/v1/experts/{running}")  # a second DELETE removes the cancelled job
        assert r.status_code == 200 and r.json()["status"] == "deleted"
        assert c.get(f"/v1/experts/{running}").status_code == 404
        assert not (settings.uploads_dir / running).exists()


def test_shutdown_requeues_and_next_start_finishes_the_job(tmp_path, apprentice_dir):
    """A clean stop hands running jobs back to the queue; the next server re-runs them."""
    settings = settings_for(tmp_path, apprentice_dir)
    with TestClient(create_app(settings)) as c:
        job_id = c.post("/v1/experts", files=files(3), data={"class_noun": "star", "steps": 2000}).json()["id"]
        wait_for(lambda: c.get(f"/v1/experts/{job_id}").json()["progress"] > 0, 120, 0.2, "training to start")
        pid = runtime(c).jobs.running_pids()[job_id]
    assert not pid_alive(pid)
    row = JobStore(settings.jobs_db).get(job_id)
    assert row["state"] == "queued" and row["phase"] == "server stopped"
    # make the re-run short: the job's own steps are what the worker trains
    with sqlite3.connect(settings.jobs_db) as db:
        db.execute("UPDATE jobs SET steps = 5 WHERE id = ?", (job_id,))
    with TestClient(create_app(settings)) as c:
        job = wait_job(c, job_id)
        assert job["status"] == "done" and job["attempts"] == 2


def test_a_failing_job_reports_its_error(tmp_path, apprentice_dir):
    broken = tmp_path / "broken-model"  # passes the start-up check (a folder with model_index.json), fails to load
    broken.mkdir()
    (broken / "model_index.json").write_text("{")
    settings = settings_for(tmp_path, apprentice_dir, model=str(broken))
    with TestClient(create_app(settings)) as c:
        job_id = c.post("/v1/experts", files=files(3), data={"class_noun": "star", "steps": 5}).json()["id"]
        job = wait_job(c, job_id)
        assert job["status"] == "failed" and "broken-model" in job["error"], job
        assert not (settings.experts_dir / job_id).exists()
        assert c.get("/v1/experts", params={"status": "failed"}).json()["jobs"][0]["id"] == job_id


def test_queued_job_limit_answers_429_before_decoding(tmp_path, apprentice_dir, monkeypatch):
    decodes = count_decodes(monkeypatch)
    with TestClient(create_app(settings_for(tmp_path, apprentice_dir, max_queued_jobs=2))) as c:
        rt = runtime(c)
        rt.jobs.stop()  # no dispatcher: jobs stay queued
        rt.jobs = None
        ids = [c.post("/v1/experts", files=files(3), data={"class_noun": "star"}).json()["id"] for _ in range(2)]
        r = c.post("/v1/experts", files=files(3), data={"class_noun": "star"})
        assert r.status_code == 429 and "2 expert jobs are already queued or uploading (2 queued, 0 uploading; the limit is 2)" in r.json()["error"]
        assert int(r.headers["retry-after"]) >= 1
        assert decodes == [3, 3]
        assert c.delete(f"/v1/experts/{ids[0]}").json()["status"] == "cancelled"
        assert c.post("/v1/experts", files=files(3), data={"class_noun": "star"}).status_code == 202
        assert 'suti_jobs_rejected_total 1' in c.get("/metrics").text


def _finished_job(store: JobStore, settings, state: str = "done", finished_at: float | None = None) -> str:
    """A job row in ``state`` with an expert folder, uploads and a log on disk (no training)."""
    job_id = new_job_id()
    store.create(job_id, class_noun="dog", recipe="suti-expert", model="tiny", steps=5, seed=0, num_images=3)
    job = store.claim_next("someone", "host", 1)
    assert job is not None and job["id"] == job_id, "a dispatcher claimed the row first: stop rt.jobs before calling"
    if state == "done":
        assert store.finish(job_id, job["run_token"], "done")
    elif state == "failed":
        assert store.fail(job_id, job["run_token"], "broken")
    for folder in (settings.experts_dir / job_id, settings.uploads_dir / job_id):
        folder.mkdir(parents=True)
        (folder / "file.bin").write_bytes(b"0" * 1000)
    (settings.logs_dir / f"{job_id}.log").write_text("log\n")
    if finished_at is not None:
        with sqlite3.connect(settings.jobs_db) as db:
            db.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (finished_at, job_id))
    return job_id


def test_delete_a_finished_job_frees_its_disk(tmp_path, apprentice_dir):
    with TestClient(create_app(settings_for(tmp_path, apprentice_dir, upload_retention_s=3600))) as c:
        rt = runtime(c)
        rt.jobs.stop()  # no dispatcher: it would race _finished_job for the queued row
        rt.jobs = None
        settings = rt.settings
        for state in ("done", "failed"):
            job_id = _finished_job(rt.store, settings, state)
            assert c.get(f"/v1/experts/{job_id}").json()["status"] == state
            r = c.delete(f"/v1/experts/{job_id}")
            assert r.status_code == 200 and r.json() == {"id": job_id, "status": "deleted", "freed_bytes": 2004}, r.text
            for path in (settings.experts_dir / job_id, settings.uploads_dir / job_id, settings.logs_dir / f"{job_id}.log"):
                assert not path.exists(), path
            assert c.get(f"/v1/experts/{job_id}").status_code == 404
            assert c.delete(f"/v1/experts/{job_id}").status_code == 404


def test_retention_deletes_old_uploads_and_jobs(tmp_path, apprentice_dir):
    settings = settings_for(tmp_path, apprentice_dir, upload_retention_s=3600, job_retention_s=86400)
    with TestClient(create_app(settings)) as c:
        rt = runtime(c)
        rt.jobs.stop()  # sweep by hand, at a chosen time
        rt.jobs = None
        from serving.jobs import JobManager

        manager = JobManager(settings, rt.store)
        now = time.time()
        fresh = _finished_job(rt.store, settings, "done", finished_at=now - 60)
        hour_old = _finished_job(rt.store, settings, "failed", finished_at=now - 7200)
        day_old = _finished_job(rt.store, settings, "done", finished_at=now - 2 * 86400)
        queued = c.post("/v1/experts", files=files(3), data={"class_noun": "star"}).json()["id"]
        orphan = settings.uploads_dir / new_job_id()  # photos whose row was never written
        orphan.mkdir()
        os.utime(orphan, (now - 7200, now - 7200))
        manager.sweep(now)
        assert (settings.uploads_dir / fresh).is_dir() and (settings.experts_dir / fresh).is_dir()
        assert not (settings.uploads_dir / hour_old).exists() and (settings.experts_dir / hour_old).is_dir()
        assert c.get(f"/v1/experts/{hour_old}").json()["status"] == "failed"
        assert c.get(f"/v1/experts/{day_old}").status_code == 404
        assert not (settings.experts_dir / day_old).exists() and not (settings.logs_dir / f"{day_old}.log").exists()
        assert (settings.uploads_dir / queued).is_dir(), "a queued job keeps its photos"
        assert not orphan.exists()
        manager.sweep(now + 2 * 86400)
        assert [j["id"] for j in c.get("/v1/experts").json()["jobs"]] == [queued]


@pytest.mark.slow
def test_a_killed_worker_is_retried_then_fails_with_a_clean_error(tmp_path, apprentice_dir):
    settings = settings_for(tmp_path, apprentice_dir, job_workers=1, max_job_attempts=2)
    with TestClient(create_app(settings)) as c:
        rt = runtime(c)
        job_id = c.post("/v1/experts", files=files(3), data={"class_noun": "star", "steps": 2000}).json()["id"]
        for attempt in (1, 2):
            job = wait_for(lambda: (j := c.get(f"/v1/experts/{job_id}").json())["status"] == "running" and j["attempts"] == attempt and j["progress"] > 0 and j, 180, 0.2, f"run {attempt} to train")
            pid = rt.jobs.running_pids()[job_id]
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not pid_alive(pid), 10, 0.1, "the worker to die")
        job = wait_job(c, job_id, states=("failed",), timeout=30)
        assert job["attempts"] == 2
        assert job["error"] == "training stopped unexpectedly 2 times; last time the training worker was killed by SIGKILL (out of memory, or stopped by an operator)"
        assert not (settings.experts_dir / f"{job_id}.partial").exists()
        wait_for(lambda: not (settings.uploads_dir / job_id).exists(), 10, 0.2, "the photos of the failed job to be deleted")


@pytest.mark.slow
def test_jobs_run_as_ray_tasks(tmp_path, apprentice_dir):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    settings = settings_for(tmp_path, apprentice_dir, ray_address="local")
    try:
        with TestClient(create_app(settings)) as c:
            assert c.get("/healthz").json()["jobs_backend"] == "ray"
            done = c.post("/v1/experts", files=files(3), data={"class_noun": "star", "steps": 5}).json()["id"]
            assert wait_job(c, done, timeout=240)["status"] == "done"
            long = c.post("/v1/experts", files=files(3), data={"class_noun": "star", "steps": 2000}).json()["id"]
            wait_for(lambda: c.get(f"/v1/experts/{long}").json()["progress"] > 0, 120, 0.3, "the Ray task to train")
            assert c.delete(f"/v1/experts/{long}").json()["status"] == "cancelled"
            time.sleep(2)
            job = c.get(f"/v1/experts/{long}").json()
            assert job["status"] == "cancelled" and job["progress"] < 0.5
            assert c.post(f"/v1/experts/{done}/generate", data={"prompt": "a {V} {class}"}).status_code == 200
    finally:
        assert not ray.is_initialized(), "the server shuts down the Ray cluster it started"


def test_job_store_fences_stale_workers(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = new_job_id()
    store.create(job_id, class_noun="dog", recipe="suti-expert", model="tiny", steps=5, seed=0, num_images=3)
    first = store.claim_next("owner-a", "host", 1)
    assert first["id"] == job_id and first["state"] == "running" and first["attempts"] == 1
    assert store.claim_next("owner-a", "host", 1) is None
    assert store.report(job_id, first["run_token"], 0.5, "training")
    assert store.requeue(job_id, first["run_token"])
    second = store.claim_next("owner-b", "host", 2)
    assert second["attempts"] == 2 and second["run_token"] != first["run_token"]
    assert not store.report(job_id, first["run_token"], 0.9), "the old run is fenced off"
    assert not store.finish(job_id, first["run_token"], "done")
    assert store.finish(job_id, second["run_token"], "done")
    assert store.get(job_id)["state"] == "done"
    assert store.counts()["done"] == 1


def test_orphaned_running_jobs_are_found(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = new_job_id()
    store.create(job_id, class_noun="dog", recipe="suti-expert", model="tiny", steps=5, seed=0, num_images=3)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.claim_next("gone", socket.gethostname(), dead.pid)
    assert [r["id"] for r in store.orphans("me", socket.gethostname(), 3600)] == [job_id]
    assert store.orphans("gone", socket.gethostname(), 3600) == [], "an owner never orphans its own jobs"
    other = new_job_id()
    store.create(other, class_noun="dog", recipe="suti-expert", model="tiny", steps=5, seed=0, num_images=3)
    store.claim_next("elsewhere", "another-host", 1234)
    assert other not in [r["id"] for r in store.orphans("me", socket.gethostname(), 3600)], "fresh heartbeat, other host"
    assert other in [r["id"] for r in store.orphans("me", socket.gethostname(), -1)], "stale heartbeat"


def test_an_interrupted_job_is_retried_up_to_max_job_attempts(tmp_path, apprentice_dir):
    """The restart path counts runs as the crash path does: the last interruption fails the job."""
    from serving.jobs import JobManager

    settings = settings_for(tmp_path, apprentice_dir, max_job_attempts=2)
    store = JobStore(settings.jobs_db)
    job_id = new_job_id()
    store.create(job_id, class_noun="dog", recipe="suti-expert", model="tiny", steps=5, seed=0, num_images=3)
    manager = JobManager(settings, store)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for attempt in (1, 2):
        assert store.claim_next("gone", socket.gethostname(), dead.pid)["attempts"] == attempt
        manager._recover()
    row = store.get(job_id)
    assert row["state"] == "failed" and row["attempts"] == 2, row
    assert row["error"] == "training stopped unexpectedly 2 times; last time its server stopped while it ran"


# --- health, metrics, docs, page, CLI, Ray Serve -------------------------------------------------


def test_health_metrics_openapi_docs_and_page(shared_client):
    health = shared_client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["jobs_backend"] == "local"
    spec = shared_client.get("/openapi.json").json()
    for path in ("/v1/generate", "/v1/experts", "/v1/experts/{job_id}", "/v1/experts/{job_id}/generate", "/healthz", "/metrics"):
        assert path in spec["paths"], path
    form = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert "image/png" in spec["paths"]["/v1/generate"]["post"]["responses"]["200"]["content"]
    assert form["schema"]
    docs = shared_client.get("/docs")  # our own page: nothing from a CDN, so it works offline
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    assert re.findall(r'(?:src|href)="([^"]*)"', docs.text) == ["/openapi.json", "/"]
    assert "default-src 'self'" in docs.headers["content-security-policy"]
    assert shared_client.get("/redoc").status_code == 404
    page = shared_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    for element in ('id="files"', 'id="prompt"', 'id="generate"', 'id="class-noun"', 'id="train"', 'id="jobs"'):
        assert element in page.text
    shared_client.get("/healthz")
    metrics = shared_client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = metrics.text
    for name in ("suti_http_requests_total", "suti_http_request_duration_seconds_bucket", "suti_generate_queue_depth", "suti_jobs{state=\"queued\"}", "suti_apprentice_loaded"):
        assert name in text, name
    assert 'suti_http_requests_total{method="GET",route="/healthz",status="200"}' in text
    assert shared_client.get("/no/such/page").json() == {"error": "Not Found"}


def test_cli_defaults_and_errors(monkeypatch, tmp_path, capsys):
    from serving.cli import settings_from_args
    from orchestration.cli import build_parser, main

    args = build_parser().parse_args(["serve"])
    assert (args.model, args.apprentice, args.host, args.port) == ("toy", "toy", "127.0.0.1", 8000)
    monkeypatch.setenv("MY_KEY", "k")
    args = build_parser().parse_args(["serve", "--api-key-env", "MY_KEY", "--data-dir", str(tmp_path), "--max-concurrency", "3", "--max-upload-mb", "1"])
    settings = settings_from_args(args)
    assert settings.api_key == "k" and settings.max_concurrency == 3 and settings.data_dir == tmp_path and settings.max_file_bytes == 1024 * 1024
    assert main(["serve", "--api-key-env", "NOT_SET_ANYWHERE_42"]) == 2
    assert "NOT_SET_ANYWHERE_42" in capsys.readouterr().err
    assert main(["serve", "--apprentice", str(tmp_path), "--data-dir", str(tmp_path)]) == 2
    assert "not an apprentice folder" in capsys.readouterr().err
    def refused_while_parsing(argv):  # numbers are checked by their kind as the command line is parsed
        with pytest.raises(SystemExit) as exc:
            main(argv)
        return exc.value.code

    assert refused_while_parsing(["serve", "--max-concurrency", "0"]) == 2
    args = build_parser().parse_args(["serve", "--max-queued-jobs", "3", "--max-job-attempts", "5", "--upload-retention-hours", "2", "--job-retention-days", "0", "--max-request-pixels", "1000"])
    settings = settings_from_args(args)
    assert (settings.max_queued_jobs, settings.max_job_attempts, settings.upload_retention_s, settings.job_retention_s, settings.max_request_pixels) == (3, 5, 7200.0, None, 1000)
    assert settings_from_args(build_parser().parse_args(["serve"])).job_retention_s == 30 * 86400.0
    capsys.readouterr()
    assert refused_while_parsing(["serve", "--max-queued-jobs", "0"]) == 2
    assert "--max-queued-jobs: must be a whole number from 1 to 100000, got 0" in capsys.readouterr().err
    assert refused_while_parsing(["serve", "--upload-retention-hours", "-1"]) == 2
    assert "--upload-retention-hours: must be a finite number in [0, 1e+06], got -1" in capsys.readouterr().err
    monkeypatch.setenv("MY_SECRET", "s")
    args = build_parser().parse_args(["serve", "--webhook-secret-env", "MY_SECRET", "--public-url", "https://suti.example.com", "--webhook-attempts", "2", "--webhook-timeout", "3"])
    settings = settings_from_args(args)
    assert (settings.webhook_secret, settings.public_url, settings.webhook_attempts, settings.webhook_timeout) == ("s", "https://suti.example.com", 2, 3.0)
    assert main(["serve", "--webhook-secret-env", "NOT_SET_ANYWHERE_42"]) == 2
    assert "--webhook-secret-env NOT_SET_ANYWHERE_42: the environment variable is not set or empty" in capsys.readouterr().err
    assert main(["serve", "--public-url", "suti.example.com"]) == 2
    assert "--public-url must start with http:// or https://" in capsys.readouterr().err
    assert refused_while_parsing(["serve", "--webhook-attempts", "0"]) == 2
    assert refused_while_parsing(["serve", "--webhook-timeout", "0"]) == 2


def test_ray_serve_deployment_constructs(tmp_path, apprentice_dir):
    pytest.importorskip("ray.serve")
    from serving.ray_app import app_builder, build_deployment

    deployment = build_deployment(settings_for(tmp_path, apprentice_dir), num_gpus=0.5, min_replicas=1, max_replicas=3)
    assert deployment.name == "suti"
    assert deployment.ray_actor_options["num_gpus"] == 0.5
    config = deployment._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas) == (1, 3)
    assert app_builder({"model": "tiny", "apprentice": str(apprentice_dir), "preload": "false", "max_replicas": "2"}) is not None


# --- a real server: load, restart, browser ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``suti serve`` in a subprocess on a free loopback port."""

    def __init__(self, data_dir: Path, apprentice_dir: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"server-{self.port}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "orchestration.cli", "serve", "--model", "tiny", "--apprentice", str(apprentice_dir),
            "--port", str(self.port), "--data-dir", str(data_dir), "--threads", "1", "--default-steps", "2", *extra,
        ]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            wait_for(self._ready, 180, 0.5, f"the server on port {self.port}")
        except AssertionError:
            self.stop()
            raise AssertionError("server did not start:\n" + self.log.read_text()[-3000:]) from None

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError("server exited:\n" + self.log.read_text()[-3000:])
        try:
            health = httpx.get(self.url + "/healthz", timeout=2).json()
        except httpx.HTTPError:
            return False
        return health["apprentice_loaded"]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def live_server(tmp_path_factory, apprentice_dir):
    server = LiveServer(tmp_path_factory.mktemp("live") / "data", apprentice_dir, "--max-concurrency", "2", "--max-queue", "2", "--timeout", "120")
    yield server
    server.stop()


@pytest.mark.slow
def test_load_50_requests_8_at_a_time_answer_200_or_429(live_server):
    body = files(1)

    def one(i: int) -> tuple[int, str | None]:
        r = httpx.post(live_server.url + "/v1/generate", files=body, data={"prompt": f"a photo {i}", "steps": 2, "seed": i}, timeout=120)
        if r.status_code == 200:
            decode_png(r.content)
        return r.status_code, r.headers.get("retry-after")

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(50)))
    elapsed = time.monotonic() - started
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 4, codes
    assert all(ra and int(ra) >= 1 for c, ra in results if c == 429)
    metrics = httpx.get(live_server.url + "/metrics").text
    served = sum(int(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith('suti_http_requests_total{method="POST",route="/v1/generate",status="200"}'))
    assert served >= codes.count(200)
    print(f"load: {codes.count(200)} x 200, {codes.count(429)} x 429 in {elapsed:.1f} s")


def _row(db: Path, job_id: str) -> dict:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return dict(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())


@pytest.mark.slow
def test_restart_reruns_the_interrupted_job_and_runs_the_queued_one(tmp_path, apprentice_dir):
    data = tmp_path / "data"
    server = LiveServer(data, apprentice_dir, "--job-workers", "1")
    try:
        post = lambda steps: httpx.post(server.url + "/v1/experts", files=files(3), data={"class_noun": "star", "steps": steps}, timeout=60).json()["id"]
        running, queued = post(80), post(5)
        get = lambda job_id: httpx.get(f"{server.url}/v1/experts/{job_id}", timeout=10).json()
        wait_for(lambda: get(running)["progress"] > 0, 120, 0.1, "training to start")
        assert get(queued)["status"] == "queued"
        worker = _row(data / "jobs.sqlite", running)["worker_pid"]
        assert pid_alive(worker)
        server.kill()
        wait_for(lambda: not pid_alive(worker), 10, 0.1, "the worker to die with its server")
        assert _row(data / "jobs.sqlite", running)["state"] == "running"  # as the crash left it
    finally:
        server.stop()
    server = LiveServer(data, apprentice_dir, "--job-workers", "1")
    try:
        get = lambda job_id: httpx.get(f"{server.url}/v1/experts/{job_id}", timeout=10).json()
        first = wait_for(lambda: (j := get(running))["status"] in ("done", "failed") and j, 240, 0.5, "the interrupted job")
        second = wait_for(lambda: (j := get(queued))["status"] in ("done", "failed") and j, 120, 0.5, "the queued job")
        assert first["status"] == "done" and first["attempts"] == 2, first
        assert second["status"] == "done" and second["attempts"] == 1, second
        r = httpx.post(f"{server.url}/v1/experts/{running}/generate", data={"prompt": "a {V} {class}"}, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    finally:
        server.stop()


def _browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; browsers are not needed)")
    return sync_playwright


@pytest.mark.slow
def test_web_page_in_headless_chromium(live_server, tmp_path):
    sync_playwright = _browser()
    paths = []
    for i in range(3):
        path = tmp_path / f"photo_{i}.png"
        path.write_bytes(photo(i))
        paths.append(str(path))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page, errors = _new_page(browser)
            page.goto(live_server.url + "/")
            assert page.title() == "SuTI"
            page.click("#generate")  # nothing chosen yet: a message next to the button, no request
            assert "add at least one photo" in page.text_content("#generate-status")
            page.click("#train")
            assert "type the class noun" in page.text_content("#train-status")
            assert page.text_content("#generate-status") == "add at least one photo first"

            page.set_input_files("#files", paths)
            assert page.text_content("#photo-count") == "3 photos"
            page.fill("#prompt", "a photo on the beach")
            page.fill("#num-images", "2")
            page.click("#generate")
            page.wait_for_selector("#results img", timeout=60_000)
            # page.evaluate, not wait_for_function: the page's CSP forbids the eval that the latter uses
            loaded = "() => [...document.querySelectorAll('#results img')].filter(i => i.complete && i.naturalWidth === 32).length"
            wait_for(lambda: page.evaluate(loaded) == 2, 30, 0.2, "two decoded images")
            assert "generated 2 images" in page.text_content("#generate-status")

            page.fill("#class-noun", "star")
            page.fill("#train-steps", "40")
            page.click("#train")
            job = page.wait_for_selector(".job", timeout=30_000)
            shown = []  # what the job's box shows while it trains: live progress from its event stream

            def finished():
                shown.append((job.query_selector(".pct").text_content(), job.query_selector(".steps").text_content()))
                return job.get_attribute("data-status") == "done"

            wait_for(finished, 180, 0.05, "the job to be done on the page")
            assert job.query_selector(".pct").text_content() == "100%"
            assert job.query_selector(".steps").text_content() == "step 40/40"
            assert any(pct not in ("0%", "100%") and re.fullmatch(r"step ([1-9]|[1-3][0-9])/40", steps) for pct, steps in shown), shown
            events = job.get_attribute("data-events").split()
            assert events[:2] == ["queued", "started"] and events[-1] == "done" and "progress" in events, events
            job.query_selector(".expert-go").click()
            expert_image = "() => { const i = document.querySelector('.job .expert-results img'); return !!i && i.complete && i.naturalWidth === 32; }"
            wait_for(lambda: page.evaluate(expert_image), 60, 0.2, "the expert's image")
            assert "the expert generated 1 image" in job.query_selector(".job-status").text_content()
            job.query_selector(".delete").click()  # a finished expert can be deleted from the page
            wait_for(lambda: page.query_selector(".job") is None, 10, 0.1, "the job to leave the list")
            assert "deleted" in page.text_content("#train-status")

            page.goto(live_server.url + "/docs")  # the API reference needs no network
            page.wait_for_selector(".op[data-path='/v1/generate'][data-method='post']", timeout=10_000)
            assert "multipart/form-data" in page.text_content(".op[data-path='/v1/generate']")
            assert errors == []
        finally:
            browser.close()


@pytest.mark.slow
def test_web_page_loads_jobs_when_the_api_key_is_typed(tmp_path, apprentice_dir, monkeypatch):
    sync_playwright = _browser()
    monkeypatch.setenv("SUTI_TEST_KEY", "s3cret")
    server = LiveServer(tmp_path / "data", apprentice_dir, "--api-key-env", "SUTI_TEST_KEY")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page, errors = _new_page(browser)
                page.goto(server.url + "/")
                wait_for(lambda: "needs an API key" in page.text_content("#key-status"), 10, 0.1, "the key message")
                page.fill("#api-key", "wrong")
                wait_for(lambda: page.text_content("#key-status") == "wrong API key", 10, 0.1, "the wrong-key message")
                job_id = httpx.post(server.url + "/v1/experts", files=files(3), data={"class_noun": "star", "steps": 2000}, headers={"X-API-Key": "s3cret"}, timeout=30).json()["id"]
                page.fill("#api-key", "s3cret")  # no reload: the list appears
                page.wait_for_selector(f"#job-{job_id}", timeout=10_000)
                assert page.text_content("#key-status") == "key accepted"
                page.click(f"#job-{job_id} .cancel")
                wait_for(lambda: page.text_content(f"#job-{job_id} .job-status") == "cancelled", 10, 0.1, "the cancel message in the job's box")
                assert errors == []
            finally:
                browser.close()
    finally:
        server.stop()


def test_every_numeric_form_field_is_bounded_and_refuses_nan_inf_and_huge_values(shared_client):
    """The HTTP side of the numeric-flag walk (tests/test_numeric_flags.py): every numeric field
    of every form and query has both bounds in the schema (so a new unbounded field fails
    here), and each field refuses nan, inf, -1e30, 1e30 and 2**64 with a 422 naming it, before
    any handler runs (never a 500, never a success)."""
    spec = shared_client.get("/openapi.json").json()
    fields = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            content = op.get("requestBody", {}).get("content", {})
            body = (content.get("multipart/form-data") or content.get("application/x-www-form-urlencoded") or {}).get("schema", {})
            if "$ref" in body:
                body = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
            params = {p["name"]: p.get("schema", {}) for p in op.get("parameters", []) if p.get("in") == "query"}
            for name, schema in {**body.get("properties", {}), **params}.items():
                kinds = [schema] + schema.get("anyOf", [])
                numeric = [k for k in kinds if k.get("type") in ("integer", "number")]
                if numeric:
                    fields.append((method, path, name, "query" if name in params else "form", numeric[0]))
    assert {(p, n) for _, p, n, _, _ in fields} >= {("/v1/generate", "steps"), ("/v1/generate", "guidance_scale"), ("/v1/experts", "steps"),
                                                    ("/v1/experts/{job_id}/generate", "guidance_scale")}, fields
    unbounded = [f"{m.upper()} {p} {n}" for m, p, n, _, s in fields if not (("minimum" in s or "exclusiveMinimum" in s) and ("maximum" in s or "exclusiveMaximum" in s))]
    assert not unbounded, f"numeric fields without both bounds: {unbounded}"
    for method, path, name, where, _ in fields:
        url = path.replace("{job_id}", "no-such-job")
        for bad in ("nan", "inf", "-1e30", "1e30", str(2**64)):
            if where == "query":  # a POST's query (expires) comes with a form, else the answer is 415
                form = {"prompt": "a cup", "class_noun": "cup"} if method == "post" else None
                response = shared_client.request(method.upper(), url, params={name: bad}, data=form)
            else:
                response = shared_client.request(method.upper(), url, data={name: bad, "prompt": "a cup", "class_noun": "cup"})
            assert response.status_code == 422 and name in response.text, (method, path, name, bad, response.status_code, response.text[:300])
