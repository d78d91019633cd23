"""Expert generation on a real two-node Ray cluster whose nodes do not share /tmp, writing to an
S3-protocol server on 127.0.0.1 (moto); storage URIs; missing s3fs; a wheel install's configs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestration.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny", "--steps", "3", "--sample-steps", "2", "--prompts-per-cluster", "2", "--samples-per-shard", "2", "--lambda", "-1"]
BUCKET = "suti-test"
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree(marks: list[str], roots: list[int] = ()) -> None:
    """Kill -9 the processes whose command line holds one of ``marks`` (only this test's Ray
    nodes: their temp dir) or descend from ``roots``, with their children."""
    import psutil

    procs = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.pid != os.getpid() and (p.pid in roots or any(m in cmd for m in marks)):
            procs.add(p)
            try:
                procs.update(p.children(recursive=True))
            except psutil.Error:
                pass
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with bucket ``suti-test``; the AWS_* variables point at it."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _s3fs():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture(scope="module")
def ray_cluster():
    """``ray start --head`` (1 CPU) plus a second node (1 CPU) whose processes see a private,
    empty tmpfs /tmp (``unshare -m``), as a pod's local disk would be."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1): cannot give the second Ray node a private /tmp")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /tmp && test ! -e /tmp/.suti-probe"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine forbids a private mount namespace with a tmpfs /tmp (unshare -m: {probe.stderr.decode().strip()[:200]})")
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(k, None)  # the nodes get no credentials: only the driver touches the store
    head = subprocess.run([RAY, "start", "--head", "--port", str(port), "--num-cpus", "1", "--temp-dir", tmp, "--include-dashboard=false",
                           "--ray-client-server-port", str(_free_port()), "--dashboard-port", str(_free_port())], env=env, capture_output=True, text=True, timeout=120)
    if head.returncode != 0:
        _kill_tree([tmp])
        pytest.skip(f"ray start --head failed: {head.stderr[-500:]}")
    ip = socket.gethostbyname(socket.gethostname())
    address = f"{ip}:{port}"
    keep = tempfile.mkdtemp(prefix="suti-checkout-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    worker = subprocess.Popen(["unshare", "-m", "sh", "-c", f"{_private_tmp(keep)} && exec {RAY} start --address {address} --num-cpus 1 --block"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cluster = {"address": address, "env": env, "worker": worker, "tmp": tmp, "keep": keep}
    deadline = time.time() + 120
    while time.time() < deadline:
        if len(_alive_nodes(cluster)) == 2:
            break
        time.sleep(2)
    else:
        _kill_tree([tmp], [worker.pid])
        pytest.fail("the second Ray node did not join")
    yield cluster
    _kill_tree([tmp], [worker.pid])
    shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(keep)


def _private_tmp(keep: str) -> str:
    """Shell commands (run in a new mount namespace) that give the node an empty tmpfs /tmp
    without hiding the checkout and its virtualenv: a checkout under /tmp (a CI clone in
    /tmp/...) is bind-mounted aside to ``keep`` first, then back at its own path on the tmpfs."""
    root = shlex.quote(str(ROOT))
    if not str(ROOT).startswith("/tmp/"):
        return "mount -t tmpfs tmpfs /tmp"
    return f"mount --bind {root} {shlex.quote(keep)} && mount -t tmpfs tmpfs /tmp && mkdir -p {root} && mount --bind {shlex.quote(keep)} {root}"


def _alive_nodes(cluster) -> list[str]:
    code = f"import ray, json; ray.init(address={cluster['address']!r}, log_to_driver=False); print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))"
    proc = subprocess.run([sys.executable, "-c", code], env=cluster["env"], capture_output=True, text=True, timeout=60)
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else []


@pytest.fixture(scope="module")
def mined_s3(s3, tmp_path_factory):
    """A world crawl uploaded to S3, mined from S3 into S3 (``suti mine --model tiny``)."""
    root = tmp_path_factory.mktemp("cl")
    assert main(["world", "make", "--output", str(root / "crawl"), "--subjects", "6", "--noise-pages", "0.2", "--seed", "5", "--size", "32"]) == 0
    fs = _s3fs()
    fs.put(str(root / "crawl") + "/", f"{BUCKET}/crawl", recursive=True)
    assert main(["mine", "--crawl", f"s3://{BUCKET}/crawl", "--output", f"s3://{BUCKET}/mined", "--model", "tiny"]) == 0
    rows = [json.loads(line) for line in fs.cat_file(f"{BUCKET}/mined/clusters.jsonl").decode().splitlines()]
    assert len(rows) >= 3
    assert all(s["path"].startswith(f"s3://{BUCKET}/crawl/") for r in rows for s in r["sources"] if s), "sources name the crawl's objects, not a local copy"
    return {"clusters": f"s3://{BUCKET}/mined/clusters.jsonl", "crawl": f"s3://{BUCKET}/crawl", "rows": rows}


def _generate(cluster, mined, output, *extra, cwd=ROOT, wait=True, log=None):
    cmd = [sys.executable, "-m", "orchestration.cli", "generate", "--clusters", mined["clusters"], "--crawl", mined["crawl"], "--output", output, "--ray-address", cluster["address"], *FAST, *extra]
    env = {**cluster["env"], **{k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION") if k in os.environ}}
    if not wait:
        with open(log, "w") as f:
            return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _check_exactly_once(output: str, num_clusters: int) -> dict:
    """Every accepted cluster's samples are in the shards exactly once; manifest, summary and
    shards agree. Returns {shard name: sha256}."""
    import tarfile

    from generation.job import read_manifest
    from suti import storage

    manifest = read_manifest(output)
    assert len(manifest) == num_clusters
    assert all(r["status"] in ("accepted", "rejected") for r in manifest.values()), [r.get("error") for r in manifest.values()]
    keys, digests = [], {}
    for uri in storage.glob(storage.join(output, "shard-*.tar")):
        data = storage.read_bytes(uri)
        digests[uri.rsplit("/", 1)[1]] = hashlib.sha256(data).hexdigest()
        with tarfile.open(fileobj=__import__("io").BytesIO(data)) as tar:
            names = tar.getnames()
        keys += sorted({n.partition(".")[0] for n in names})
        for key in {n.partition(".")[0] for n in names}:
            assert {f"{key}.target.jpg", f"{key}.json", f"{key}.demo_0.jpg"} <= set(names)
    kept = [k for r in manifest.values() for k in r.get("kept", [])]
    assert len(keys) == len(set(keys)), "no sample written twice"
    assert sorted(keys) == sorted(kept), "every accepted sample is in the shards, nothing else"
    assert all(r["kept"] for r in manifest.values() if r["status"] == "accepted"), "never done with 0 samples"
    summary = json.loads(storage.read_text(storage.join(output, "summary.json")))
    assert summary["samples"] == len(keys) and summary["shards"] == len(digests)
    assert summary["accepted"] == sum(r["status"] == "accepted" for r in manifest.values())
    assert summary["accepted"] + summary["rejected"] + summary["failed"] == num_clusters
    return digests


def test_two_nodes_no_shared_tmp_to_s3_exactly_once_and_rerun_does_nothing(ray_cluster, mined_s3):
    output = f"s3://{BUCKET}/job1"
    proc = _generate(ray_cluster, mined_s3, output)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (ROOT / "s3:").exists()
    n = len(mined_s3["rows"])
    digests = _check_exactly_once(output, n)
    assert digests, "some samples were kept (lambda -1)"
    from generation.job import read_manifest

    nodes = {r.get("node_id") for r in read_manifest(output).values()}
    assert len(nodes) == 2, f"experts ran on both nodes, including the one with a private /tmp ({nodes})"
    again = _generate(ray_cluster, mined_s3, output)
    assert again.returncode == 0, again.stderr[-3000:]
    assert '"ran_now": 0' in again.stdout
    assert _check_exactly_once(output, n) == digests, "a rerun rewrites nothing"


@pytest.mark.slow
def test_recipe_on_s3_reaches_a_node_without_the_drivers_disk(ray_cluster, mined_s3):
    """``--recipe s3://...``: read once on the driver and shipped in the job, so the node with a
    private /tmp (and no AWS credentials of its own) trains with it."""
    fs = _s3fs()
    recipe = (ROOT / "suti" / "configs" / "recipes" / "suti-expert.yaml").read_text().replace("name: suti-expert", "name: s3-recipe")
    fs.pipe_file(f"{BUCKET}/recipes/s3-recipe.yaml", recipe.encode())
    output = f"s3://{BUCKET}/job-s3-recipe"
    proc = _generate(ray_cluster, mined_s3, output, "--recipe", f"s3://{BUCKET}/recipes/s3-recipe.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_exactly_once(output, len(mined_s3["rows"]))
    from generation.job import read_manifest

    rows = read_manifest(output).values()
    assert len({r.get("node_id") for r in rows}) == 2, "both nodes trained experts"
    assert storage_first_sample(output)["expert"]["recipe"] == "s3-recipe"


def storage_first_sample(output: str) -> dict:
    """The JSON of the first sample in the job's first shard."""
    import io
    import tarfile

    from suti import storage

    data = storage.read_bytes(storage.glob(storage.join(output, "shard-*.tar"))[0])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        return json.loads(tar.extractfile(member).read())


@pytest.mark.slow
def test_relative_output_with_an_external_cluster_loses_nothing(ray_cluster, mined_s3, tmp_path):
    proc = _generate(ray_cluster, mined_s3, "rel/out", "--max-clusters", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "rel" / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accepted"] == 2 and summary["samples"] == 4  # 2 clusters x 2 prompts, lambda -1
    _check_exactly_once(str(out), 2)


@pytest.mark.slow
def test_kill_driver_then_worker_node_then_rerun_loses_and_duplicates_nothing(ray_cluster, mined_s3, tmp_path):
    from generation.job import read_manifest

    output = f"s3://{BUCKET}/job-kill"
    n = len(mined_s3["rows"])
    driver = _generate(ray_cluster, mined_s3, output, "--max-workers", "1", wait=False, log=tmp_path / "d1.log")
    deadline = time.time() + 600
    while time.time() < deadline and not read_manifest(output) and driver.poll() is None:
        time.sleep(1)
    assert driver.poll() is None, (tmp_path / "d1.log").read_text()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert 1 <= len(read_manifest(output)) < n, "the driver was killed midway"
    # second run: kill -9 the worker node (its whole process tree) while the job runs
    driver = _generate(ray_cluster, mined_s3, output, wait=False, log=tmp_path / "d2.log")
    done_before = len(read_manifest(output))
    while time.time() < deadline and len(read_manifest(output)) == done_before and driver.poll() is None:
        time.sleep(0.5)
    assert driver.poll() is None, (tmp_path / "d2.log").read_text()[-3000:]
    _kill_tree([], [ray_cluster["worker"].pid])
    try:
        driver.wait(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
    final = _generate(ray_cluster, mined_s3, output)
    assert final.returncode == 0, final.stderr[-3000:]
    _check_exactly_once(output, n)


def _run_without_s3fs(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys; sys.modules['s3fs'] = None; from orchestration.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [
    ["generate", "--clusters", "c.jsonl", "--crawl", "crawl", "--output", "s3://bucket/job"],
    ["generate", "--clusters", "s3://bucket/c.jsonl", "--crawl", "crawl", "--output", "out"],
    ["mine", "--crawl", "crawl", "--output", "s3://bucket/mined"],
    ["mine", "--crawl", "s3://bucket/crawl", "--output", "out"],
    ["apprentice", "pack-photos", "--clusters", "c.jsonl", "--crawl", "crawl", "--output", "s3://bucket/photos"],
])
def test_s3_without_s3fs_exits_2_naming_the_extra_and_writes_no_s3_folder(tmp_path, args):
    (tmp_path / "crawl").mkdir()
    (tmp_path / "c.jsonl").write_text('{"cluster_id": "a", "keys": ["k"], "prompts": ["{S}"]}\n')
    proc = _run_without_s3fs(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "s3fs" in proc.stderr and "suti[s3]" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "out").exists()


def test_toy_scorer_with_a_real_model_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "c.jsonl").write_text('{"cluster_id": "a", "keys": ["k"], "prompts": ["{S}"]}\n')
    code = main(["generate", "--clusters", str(tmp_path / "c.jsonl"), "--crawl", str(tmp_path), "--output", str(tmp_path / "o"), "--model", "sd15-arch", "--scorer", "toy-clip"])
    assert code == 2
    assert "toy-clip" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    from generation.job import GenerateConfig

    crawl = str(tmp_path)
    import suti.scoring

    loaded = []
    monkeypatch.setattr(suti.scoring, "get_scorer", lambda name, **kw: loaded.append(name))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline, a real scorer is loaded on the driver (its missing weights: exit 2 at once)
    assert GenerateConfig(clusters="c", crawl=crawl, output="o", model="sd15-arch").resolved().scorer == "openai-clip-vit-b-32"
    assert loaded == ["openai-clip-vit-b-32"]
    assert GenerateConfig(clusters="c", crawl=crawl, output="o", model="toy").resolved().scorer == "toy-clip"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a hub id the driver cannot check offline; online the workers fetch the scorer
    assert GenerateConfig(clusters="c", crawl=crawl, output="o", model="some/hub-id").resolved().scorer == "openai-clip-vit-b-32"
    assert loaded == ["openai-clip-vit-b-32"]


def test_gpus_and_experts_in_flight_follow_the_cluster():
    from generation.job import GenerateConfig, experts_in_flight, gpus_per_expert

    cfg = GenerateConfig(clusters="c", crawl="w", output="o")
    assert gpus_per_expert(cfg, 8) == 1.0 and gpus_per_expert(cfg, 0) == 0.0
    frac = GenerateConfig(clusters="c", crawl="w", output="o", gpus_per_expert=0.25)
    assert gpus_per_expert(frac, 1) == 0.25
    # 2 GPUs, 16 CPUs -> 2 experts running (+1 queued for an autoscaler); a node more -> more
    assert experts_in_flight(cfg, 1.0, {"CPU": 16, "GPU": 2}) == 3
    assert experts_in_flight(cfg, 1.0, {"CPU": 32, "GPU": 4}) == 5
    assert experts_in_flight(frac, 0.25, {"CPU": 16, "GPU": 2}) == 9
    assert experts_in_flight(cfg, 0.0, {"CPU": 4}) == 5
    # resident actors hold their slot while they live: no queued extra one (it would never start)
    # (one expert each with --expert-batch-size 1; left to the worker, each may hold up to
    # MAX_AUTO_EXPERTS stacked experts on a GPU, and one on a CPU)
    from experts.stacked import MAX_AUTO_EXPERTS

    resident = GenerateConfig(clusters="c", crawl="w", output="o", resident_workers=True, expert_batch_size=1)
    assert experts_in_flight(resident, 1.0, {"CPU": 16, "GPU": 2}) == 2
    assert experts_in_flight(resident, 1.0, {"CPU": 16, "GPU": 0}) == 1
    auto = GenerateConfig(clusters="c", crawl="w", output="o", resident_workers=True)
    assert experts_in_flight(auto, 1.0, {"CPU": 16, "GPU": 2}) == 2 * MAX_AUTO_EXPERTS
    assert experts_in_flight(auto, 0.0, {"CPU": 3}) == 3
    capped = GenerateConfig(clusters="c", crawl="w", output="o", max_workers=2)
    assert experts_in_flight(capped, 0.0, {"CPU": 4}) == 2


def test_worker_env_passes_suti_hf_aws_and_an_absolute_pythonpath(monkeypatch, tmp_path):
    from suti.raytools import worker_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SUTI_CACHE", "/cache/suti")
    monkeypatch.setenv("HF_HOME", "/cache/hf")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("PYTHONPATH", "src")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    env = worker_env()
    assert env["SUTI_CACHE"] == "/cache/suti" and env["HF_HOME"] == "/cache/hf" and env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["PYTHONPATH"] == str(tmp_path / "src")
    assert "UNRELATED_SECRET" not in env


def test_accepted_cluster_without_samples_is_never_done():
    from generation.job import SamplesMissingError, check_samples

    with pytest.raises(SamplesMissingError, match="did not reach the driver"):
        check_samples({"cluster_id": "c1", "status": "accepted", "kept": ["c1_p00_s00"], "members": []})
    with pytest.raises(SamplesMissingError, match="no kept sample"):
        check_samples({"cluster_id": "c1", "status": "accepted", "kept": [], "members": []})
    ok = check_samples({"cluster_id": "c1", "status": "accepted", "kept": ["c1_p00_s00"], "members": [("c1_p00_s00.target.jpg", b"j"), ("c1_p00_s00.json", b"{}")]})
    assert set(ok) == {"c1_p00_s00"}
    assert check_samples({"cluster_id": "c2", "status": "rejected", "kept": [], "members": []}) == {}


def test_wheel_install_finds_presets_recipes_and_deepspeed_configs(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not (ROOT / f).is_symlink():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheels.glob("suti-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    # the dependencies come from this test's own site-packages (a plain path: its .pth files,
    # such as an editable suti, are not run)
    import yaml

    Path(site, "test-deps.pth").write_text(str(Path(yaml.__file__).resolve().parents[1]) + "\n")
    code = ("import json, suti, suti.models as m, experts.recipe as r; print(json.dumps({'file': suti.__file__, 'presets': m.list_presets(), "
            "'recipes': r.list_recipes(), 'zero2': m.config_path('deepspeed', 'zero2', '.json').is_file()}))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SUTI_CONFIG_DIR")}
    proc = subprocess.run([str(py), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["file"].startswith(str(venv)), info["file"]
    assert {"tiny", "toy", "sd15-arch"} <= set(info["presets"])
    assert {"dreambooth", "dreambooth-lora", "suti-expert"} <= set(info["recipes"])
    assert info["zero2"]


def test_pack_photos_from_s3_into_s3_exactly_once(mined_s3):
    from suti.shards import existing_shards, shard_keys

    out = f"s3://{BUCKET}/photos"
    args = ["apprentice", "pack-photos", "--clusters", mined_s3["clusters"], "--crawl", mined_s3["crawl"], "--output", out, "--samples-per-shard", "2"]
    assert main(args) == 0
    shards = existing_shards(out)
    keys = [k for s in shards for k in shard_keys(s)]
    assert sorted(keys) == sorted(f"{r['cluster_id']}_photos" for r in mined_s3["rows"])
    before = {s: _s3fs().info(s.removeprefix("s3://"))["ETag"] for s in shards}
    assert main(args) == 0
    assert {s: _s3fs().info(s.removeprefix("s3://"))["ETag"] for s in existing_shards(out)} == before, "a rerun writes nothing"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "s3-toy-clip"])
def test_mine_on_the_cluster_reads_the_s3_crawl_like_in_process_mining(ray_cluster, mined_s3, model):
    """The same clusters from the Ray embedders, with the preset or with its CLIP folder on S3
    (each node, the one with a private /tmp included, downloads it once into its own cache)."""
    env = {**ray_cluster["env"], **{k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}}
    if model != "tiny":
        from suti.world.toy_clip import WEIGHTS_DIR

        for name in ("toy_clip.json", "toy_clip.safetensors"):  # tiny's own CLIP
            _s3fs().put_file(str(WEIGHTS_DIR / name), f"{BUCKET}/models/toy-clip/{name}")
        model = f"s3://{BUCKET}/models/toy-clip"
    cmd = [sys.executable, "-m", "orchestration.cli", "mine", "--crawl", mined_s3["crawl"], "--output", f"s3://{BUCKET}/mined-ray", "--model", model, "--ray-address", ray_cluster["address"], "--overwrite"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in _s3fs().cat_file(f"{BUCKET}/mined-ray/clusters.jsonl").decode().splitlines()]
    assert [(r["cluster_id"], r["keys"]) for r in rows] == [(r["cluster_id"], r["keys"]) for r in mined_s3["rows"]]
    stats = json.loads(_s3fs().cat_file(f"{BUCKET}/mined-ray/stats.json"))
    assert stats["embedding"] == "ray" and not stats["skipped_images"]


@pytest.mark.slow
def test_batches_of_lora_experts_on_two_nodes_to_s3_exactly_once(ray_cluster, mined_s3):
    """--expert-batch-size 2 on the two-node cluster (private /tmp on one node), output and kept
    experts on S3: every sample once, batches formed, each kept expert uploaded from its node."""
    from generation.job import read_manifest
    from suti import storage

    output = f"s3://{BUCKET}/job-batches"
    proc = _generate(ray_cluster, mined_s3, output, "--resident-workers", "--lora-rank", "4", "--expert-batch-size", "2", "--keep-experts")
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = len(mined_s3["rows"])
    _check_exactly_once(output, n)
    rows = read_manifest(output)
    assert max(r["expert_batch"] for r in rows.values()) == 2, "experts trained in batches"
    for cid in rows:
        assert storage.isfile(storage.join(output, "experts", cid, "pytorch_lora_weights.safetensors")), cid


@pytest.mark.slow
def test_resident_workers_on_two_nodes_survive_a_dead_node(ray_cluster, mined_s3, tmp_path):
    """Resident actors on both nodes; the worker node is killed mid-job: its actor's cluster runs
    again on the other node, and the job finishes with every sample exactly once. (Kills the
    worker node: keep this test last.)"""
    from generation.job import read_manifest

    output = f"s3://{BUCKET}/job-resident"
    n = len(mined_s3["rows"])
    driver = _generate(ray_cluster, mined_s3, output, "--resident-workers", wait=False, log=tmp_path / "d.log")
    deadline = time.time() + 600
    while time.time() < deadline and not read_manifest(output) and driver.poll() is None:
        time.sleep(0.5)
    if ray_cluster["worker"].poll() is None:
        _kill_tree([], [ray_cluster["worker"].pid])
    try:
        code = driver.wait(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
        pytest.fail("the job hung after its worker node died: " + (tmp_path / "d.log").read_text()[-3000:])
    assert code == 0, (tmp_path / "d.log").read_text()[-3000:]
    _check_exactly_once(output, n)
