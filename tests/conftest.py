"""Shared fixtures: an isolated suti cache and small instance-image folders made on the fly."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SHARED = Path(__file__).resolve().parents[2] / "shared" / "dreambench"


@pytest.fixture(scope="session", autouse=True)
def suti_cache(tmp_path_factory):
    """Every test session builds presets and class images into its own cache folder."""
    path = tmp_path_factory.mktemp("suti-cache")
    old = os.environ.get("SUTI_CACHE")
    os.environ["SUTI_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SUTI_CACHE", None)
    else:
        os.environ["SUTI_CACHE"] = old


@pytest.fixture(autouse=True)
def no_leaked_distributed_state():
    """A test that initialises torch.distributed in-process (``init_distributed``) must not leave
    RANK/MASTER_PORT to later tests and the subprocesses they launch (the process group itself
    stays: DeepSpeed keeps references to its groups, and later in-process runs reuse it)."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    before = {k: os.environ.get(k) for k in keys}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def exit_code(argv: list[str]) -> int:
    """The exit status of ``suti ARGV``: ``main``'s return value, or the code of the
    ``SystemExit`` that argparse raises for a value refused while parsing (exit 2: a numeric flag
    whose kind, :mod:`suti.checks`, refuses it)."""
    from orchestration.cli import main

    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def draw_subject(seed: int, size: int = 48) -> Image.Image:
    """A red-and-yellow striped star on a random pastel background, in a random pose."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(150, 255, 3)))
    draw = ImageDraw.Draw(img)
    cx, cy = rng.integers(size // 3, 2 * size // 3, 2)
    r = size * rng.uniform(0.25, 0.35)
    angle = rng.uniform(0, 2 * np.pi)
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = angle + k * np.pi / 5
        pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
    draw.polygon(pts, fill=(220, 30, 30), outline=(250, 220, 0))
    draw.line([(cx - r / 2, cy), (cx + r / 2, cy)], fill=(250, 220, 0), width=2)
    return img


def subject_photos(folder: Path, seeds, size: int = 48) -> Path:
    """``folder`` (made) holding ``c{i}.png``: :func:`draw_subject` of each seed at ``size`` px."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds):
        draw_subject(seed, size=size).save(folder / f"c{i}.png")
    return folder


@pytest.fixture()
def instance_dir(tmp_path) -> Path:
    """Four photos of one subject (48 px PNG, larger than the tiny model's 32 px)."""
    folder = tmp_path / "instance"
    folder.mkdir()
    for i in range(4):
        draw_subject(i).save(folder / f"photo_{i}.png")
    return folder


@pytest.fixture()
def dreambench() -> Path:
    """The shared DreamBench photos (skipped where the checkout has no ../shared)."""
    if not SHARED.is_dir():
        pytest.skip("../shared/dreambench is not beside this checkout")
    return SHARED


@pytest.fixture()
def one_thread():
    """Run the test with one torch thread (small models: threads only add overhead)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3_server(monkeypatch):
    """A local S3-protocol server (moto) on 127.0.0.1, configured through the standard AWS_* variables."""
    moto_server = pytest.importorskip("moto.server")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"suti-test-{uuid.uuid4().hex[:8]}"  # moto's backend is shared by every server in this process
    fs.mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
