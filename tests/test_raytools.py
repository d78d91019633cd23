"""Issue 16, failure 8: a Ray cluster that does not start gives one line with a hint, in every
command that starts Ray."""

from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray")

from orchestration.cli import main  # noqa: E402
from suti.raytools import RayStartError, init_ray  # noqa: E402


@pytest.fixture()
def failing_ray(monkeypatch):
    calls = []

    def init(*args, **kwargs):
        calls.append(kwargs)
        raise TimeoutError("Timed out after 30 seconds waiting for the GCS to start.\n  File ...\n  more")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    return calls


def test_local_start_failure_is_one_line_with_a_hint(failing_ray):
    with pytest.raises(RayStartError) as info:
        init_ray(None, num_cpus=2)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("could not start a local Ray cluster (TimeoutError: Timed out after 30 seconds")
    assert "retry" in msg and "--ray-address" in msg
    assert failing_ray == [{"address": "local", "num_cpus": 2, "log_to_driver": False, "include_dashboard": False}]


def test_no_address_starts_a_private_cluster_unless_ray_address_is_set(failing_ray, monkeypatch):
    # a `ray start` cluster on this machine is not joined by accident (a plain ray.init() would
    # join it and refuse num_cpus); RAY_ADDRESS, as `ray job submit` sets it, is followed
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("suti.raytools.check_ray_address", lambda *args, **kwargs: None)  # no probe: ray.init's own failure
    with pytest.raises(RayStartError, match="could not start a local Ray cluster"):
        init_ray(None, num_cpus=1)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    with pytest.raises(RayStartError, match="could not join the Ray cluster at '10.0.0.5:6379'"):
        init_ray(None, num_cpus=1)
    with pytest.raises(RayStartError, match="could not start a local Ray cluster"):
        init_ray("local", num_cpus=1)  # an explicit local start wins over RAY_ADDRESS
    assert [c["address"] for c in failing_ray] == ["local", "10.0.0.5:6379", "local"]
    assert "num_cpus" not in failing_ray[1]  # a running cluster's resources are its own


def test_unreachable_address_names_it(failing_ray):
    with pytest.raises(RayStartError, match=r"--ray-address 'ray://nowhere:10001': no Ray cluster answers at nowhere:10001"):
        init_ray("ray://nowhere:10001")  # refused by the probe, before Ray's minutes of retries


def test_already_initialised_is_left_alone(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init must not be called"))
    assert init_ray("auto") is False


def test_mine_with_ray_exits_2_with_one_line(failing_ray, tmp_path, capsys):
    from suti.world import make_crawl

    make_crawl(tmp_path / "w", 3, 0.0, seed=1, shard_size=0)
    code = main(["mine", "--crawl", str(tmp_path / "w"), "--output", str(tmp_path / "m"), "--ray",
                 "--model", "toy-clip"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("suti: error: could not start a local Ray cluster") and "--ray-address" in err


def test_generate_exits_2_with_one_line(failing_ray, tmp_path, capsys, monkeypatch):
    import generation.job as generate

    with pytest.raises(RayStartError, match="--ray-address"):
        generate.init_ray(None)  # how the generation job starts Ray (with the workers' runtime_env)


def test_serving_ray_runner_raises_the_one_line_error(failing_ray):
    from serving.jobs import RayRunner
    from serving.settings import Settings

    with pytest.raises(RayStartError, match="could not start a local Ray cluster"):
        RayRunner(Settings(model="tiny", ray_address="local"))


def test_demo_stage_error_is_one_line_naming_the_stage(failing_ray, capsys, tmp_path):
    from orchestration.demo import _stage
    from suti.errors import SutiError

    with pytest.raises(SutiError) as info:
        _stage("generate", False, ["generate", "--clusters", "nothere.jsonl", "--crawl", str(tmp_path), "--output", "o"])
    assert str(info.value) == f"stage generate: {os.path.abspath('nothere.jsonl')}: no such clusters file"  # paths are made absolute


def test_an_address_nothing_listens_at_is_refused_in_seconds(tmp_path, capsys):
    """check_ray_address probes host:port and ray://host:port with one TCP connection (Ray's own
    ray.init retries such an address for minutes); `suti generate` refuses it in one line before
    job.json is written."""
    import socket
    import time

    from orchestration.cli import main
    from suti.raytools import RayStartError, check_ray_address

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        check_ray_address(f"127.0.0.1:{port}")  # something listens: accepted
        check_ray_address(f"ray://127.0.0.1:{port}")
    for address in (None, "", "local", "auto"):
        check_ray_address(address)  # Ray resolves these itself
    started = time.monotonic()
    with pytest.raises(RayStartError, match=rf"--ray-address '127.0.0.1:{port}': no Ray cluster answers at 127.0.0.1:{port}"):
        check_ray_address(f"127.0.0.1:{port}")
    with pytest.raises(RayStartError, match="not a host:port address"):
        check_ray_address("head:port")
    assert time.monotonic() - started < 10
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    (tmp_path / "clusters.jsonl").write_text("")
    code = main(["generate", "--clusters", str(tmp_path / "clusters.jsonl"), "--crawl", str(crawl), "--output", str(tmp_path / "out"),
                 "--ray-address", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not (tmp_path / "out").exists(), err
