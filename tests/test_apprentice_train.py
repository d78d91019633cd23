"""Apprentice training at scale: launchers, lean elastic checkpoints on object storage, resume
faults, balanced data from any fsspec URI, v-prediction and dtypes (issue 15), and
log-and-skip of bad shard samples in every stage (issue 16)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from apprentice.data import make_pipeline
from suti.shards import jpeg_bytes, sample_members, write_tar_atomic
from shard_util import world_shards

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A local S3 server (moto) with bucket ``suti``; yields the environment that reaches it."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = fsspec.filesystem("s3")
    fs.mkdir("suti")
    yield env
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _upload(folder: Path, uri: str) -> None:
    from suti import storage

    storage.upload(folder, uri)


# ---------------------------------------------------------------- data


def _unequal_shards(folder: Path) -> Path:
    """Two shards of 2 and 8 samples (the issue's split that gave ranks 2 and 8)."""
    world_shards(folder, num_subjects=5, per_subject=2, samples_per_shard=8)
    sizes = sorted(len(list(__import__("tarfile").open(p).getnames())) for p in folder.glob("*.tar"))
    assert len(sizes) == 2 and sizes[0] < sizes[1]
    return folder


def test_ranks_get_equal_shares_of_unequal_shards(tmp_path):
    shards = _unequal_shards(tmp_path / "sh")
    per_rank = [[e["key"] for e in make_pipeline(str(shards / "*.tar"), resolution=32, repeat=False, rank=r, world=2)] for r in range(2)]
    assert [len(k) for k in per_rank] == [5, 5]
    assert not set(per_rank[0]) & set(per_rank[1]), "ranks read distinct samples"
    assert len(set(per_rank[0]) | set(per_rank[1])) == 10


def test_data_loader_workers_split_each_ranks_share(tmp_path):
    shards = _unequal_shards(tmp_path / "sh")
    per_rank = []
    for r in range(2):
        loader = torch.utils.data.DataLoader(make_pipeline(str(shards / "*.tar"), resolution=32, repeat=False, rank=r, world=2), batch_size=None, num_workers=2)
        per_rank.append([e["key"] for e in loader])
    assert sorted(len(k) for k in per_rank) == [5, 5]
    assert len(set(per_rank[0]) | set(per_rank[1])) == 10


def test_resampled_shards_give_each_rank_its_own_draws(tmp_path):
    shards = _unequal_shards(tmp_path / "sh")
    draws = []
    for r in (0, 1, 0):
        stream = iter(make_pipeline(str(shards / "*.tar"), resolution=32, rank=r, world=2, resampled=True, seed=3))
        draws.append([next(stream)["key"] for _ in range(12)])
    assert draws[0] == draws[2], "seeded per rank: reproducible"
    assert draws[0] != draws[1]
    assert all(len(set(d)) > 1 for d in draws)


def test_a_single_shard_url_without_braces(tmp_path):
    shards = world_shards(tmp_path / "sh", num_subjects=2, per_subject=2)
    one = sorted(shards.glob("*.tar"))[0]
    assert len(list(make_pipeline(str(one), resolution=32, repeat=False))) == 4
    assert len(list(make_pipeline(f"file://{one}", resolution=32, repeat=False))) == 4
    from suti.errors import InputError

    with pytest.raises(InputError, match="no such shard"):
        make_pipeline(str(shards / "missing.tar"), resolution=32, repeat=False)


def test_s3_shards_yield_their_samples(tmp_path, s3):
    shards = world_shards(tmp_path / "sh", num_subjects=3, per_subject=2, samples_per_shard=4)
    _upload(shards, "s3://suti/shards")
    for spec in ("s3://suti/shards/*.tar", "s3://suti/shards/shard-{000000..000001}.tar", "s3://suti/shards", "s3://suti/shards/shard-000000.tar"):
        keys = [e["key"] for e in make_pipeline(spec, resolution=32, repeat=False)]
        assert len(keys) == (4 if spec.endswith("000000.tar") else 6), spec


def test_shard_weights_mix_expert_and_photo_patterns(tmp_path):
    from PIL import Image

    a = world_shards(tmp_path / "a", num_subjects=2, per_subject=2, seed=0)
    b = tmp_path / "b"
    b.mkdir()
    img = jpeg_bytes(Image.new("RGB", (32, 32), (10, 10, 200)))
    write_tar_atomic(b / "shard-000000.tar", [m for i in range(4) for m in sample_members(f"other{i}", img, [img, img], {"prompt": "x"})])
    keys_a = {e["key"] for e in make_pipeline(str(a / "*.tar"), resolution=32, repeat=False)}
    assert not keys_a & {f"other{i}" for i in range(4)}
    stream = iter(make_pipeline([str(a / "*.tar"), str(b / "*.tar")], resolution=32, weights=[3, 1], seed=5))
    drawn = [next(stream)["key"] in keys_a for _ in range(200)]
    share = sum(drawn) / len(drawn)
    assert 0.65 < share < 0.85, share  # 3 : 1 -> 0.75
    from suti.errors import InputError

    with pytest.raises(InputError, match="one non-negative weight per --shards pattern"):
        make_pipeline([str(a / "*.tar")], resolution=32, weights=[1, 2])


def test_bad_json_is_skipped_by_every_stage_naming_shard_and_key(tmp_path, caplog):
    """Issue 16 (2): a missing or non-object .json used to crash the --min-delta-clip filter."""
    from PIL import Image

    img = jpeg_bytes(Image.new("RGB", (32, 32), (200, 10, 10)))
    members = []
    members += [m for m in sample_members("nojson", img, [img, img], {}) if not m[0].endswith(".json")]
    members += [m for m in sample_members("listjson", img, [img, img], {}) if not m[0].endswith(".json")] + [("listjson.json", b"[1, 2]")]
    members += [m for m in sample_members("badjson", img, [img, img], {}) if not m[0].endswith(".json")] + [("badjson.json", b"{not json")]
    members += sample_members("good", img, [img, img], {"prompt": "a cup", "delta_clip": 0.9})
    members += sample_members("low", img, [img, img], {"prompt": "a cup", "delta_clip": 0.0})
    write_tar_atomic(tmp_path / "shard-000000.tar", members)
    with caplog.at_level(logging.WARNING, logger="apprentice.data"):
        kept = [e["key"] for e in make_pipeline(str(tmp_path / "*.tar"), resolution=32, repeat=False, min_delta_clip=0.5)]
        assert kept == ["good"]
        plain = sorted(e["key"] for e in make_pipeline(str(tmp_path / "*.tar"), resolution=32, repeat=False))
        assert plain == ["good", "low"]
    for key in ("nojson", "listjson", "badjson"):
        lines = [r.getMessage() for r in caplog.records if repr(key) in r.getMessage()]
        assert lines and all("shard-000000.tar" in m for m in lines), key


# ---------------------------------------------------------------- loss target and dtypes


def _tiny_module():
    from apprentice import DemoAttentionAdapter
    from apprentice.train import ApprenticeModule
    from suti.models import load_pipeline

    base = load_pipeline("tiny")
    adapter = DemoAttentionAdapter.for_unet(base.unet)
    adapter.install(base.unet)
    with torch.no_grad():  # a trained-looking adapter, so demonstrations matter
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return base, ApprenticeModule(base.unet, adapter)


def _fixed_batch(b: int = 2):
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(b, 4, 16, 16, generator=gen)
    noise = torch.randn(b, 4, 16, 16, generator=gen)
    t = torch.tensor([10, 700])[:b]
    text = torch.randn(b, 77, 32, generator=gen)
    demos = torch.randn(b, 3, 4, 16, 16, generator=gen)
    demo_emb = torch.randn(b, 3, 77, 32, generator=gen)
    return latents, noise, t, text, demos, demo_emb, torch.ones(b)


@torch.no_grad()
def test_v_prediction_base_trains_on_the_velocity():
    from diffusers import DDPMScheduler

    from apprentice.train import denoising_loss

    base, module = _tiny_module()
    latents, noise, t, text, demos, demo_emb, mask = _fixed_batch()
    losses = {}
    for kind in ("epsilon", "v_prediction", "sample"):
        scheduler = DDPMScheduler.from_config(base.scheduler.config, prediction_type=kind)
        losses[kind] = denoising_loss(module, scheduler, latents, noise, t, text, demos, demo_emb, mask).item()
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pred = module(noisy, t, text, demos, demo_emb, mask)
    by_hand = {
        "epsilon": (pred - noise).pow(2).mean().item(),
        "v_prediction": (pred - (a.sqrt() * noise - (1 - a).sqrt() * latents)).pow(2).mean().item(),
        "sample": (pred - latents).pow(2).mean().item(),
    }
    for kind in losses:
        assert losses[kind] == pytest.approx(by_hand[kind], rel=1e-5), kind
    assert abs(losses["v_prediction"] - losses["epsilon"]) > 1e-3


@torch.no_grad()
def test_snr_gamma_weights_each_sample_by_min_snr_over_snr():
    """--snr-gamma: per-sample MSE times min(SNR, gamma) / SNR (Min-SNR, diffusers' --snr_gamma),
    so the low-noise sample (t=10, SNR >> gamma) counts far less than the high-noise one (t=700)."""
    from diffusers import DDPMScheduler

    from apprentice.train import denoising_loss
    from apprentice.train_config import ApprenticeTrainConfig
    from suti.errors import InvalidValueError

    base, module = _tiny_module()
    scheduler = DDPMScheduler.from_config(base.scheduler.config)
    latents, noise, t, text, demos, demo_emb, mask = _fixed_batch()
    weighted = denoising_loss(module, scheduler, latents, noise, t, text, demos, demo_emb, mask, snr_gamma=5.0).item()
    a = scheduler.alphas_cumprod[t]
    snr = a / (1 - a)
    assert snr[0] > 5 > snr[1]
    noisy = a.sqrt().view(-1, 1, 1, 1) * latents + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
    per_sample = (module(noisy, t, text, demos, demo_emb, mask) - noise).pow(2).mean(dim=(1, 2, 3))
    assert weighted == pytest.approx((per_sample * torch.clamp(snr, max=5.0) / snr).mean().item(), rel=1e-5)
    assert weighted < denoising_loss(module, scheduler, latents, noise, t, text, demos, demo_emb, mask).item()
    with pytest.raises(InvalidValueError, match=r"--snr-gamma must be a finite number in \(0, 1000\], got 0"):
        ApprenticeTrainConfig(shards="x", output="y", snr_gamma=0.0).validate()


@torch.no_grad()
def test_caption_distillation_mixes_the_base_given_the_alt_text_into_the_target():
    """--caption-distillation W: each row's target is (1-W) * the noise + W * the base model's
    prediction given the privileged caption (no demos); rows without a caption keep the noise."""
    from diffusers import DDPMScheduler

    from apprentice.train import ApprenticeTrainConfig, caption_teacher, denoising_loss, teacher_prediction
    from suti.conditioning import Conditioning

    base, module = _tiny_module()
    scheduler = DDPMScheduler.from_config(base.scheduler.config)
    latents, noise, t, text, demos, demo_emb, mask = _fixed_batch()
    caption = torch.randn(text.shape, generator=torch.Generator().manual_seed(5))
    frozen = ApprenticeTrainConfig(shards="x", output="y", freeze_base=True, caption_distillation=0.5)
    assert caption_teacher(ApprenticeTrainConfig(shards="x", output="y", freeze_base=True), base.unet) is None
    teacher = caption_teacher(frozen, base.unet)
    assert teacher is base.unet, "a frozen base is its own teacher, called without demonstrations"
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    taught = teacher_prediction(teacher, scheduler, latents, noise, t, Conditioning(caption))
    assert torch.allclose(taught, module(noisy, t, caption, demos, demo_emb, torch.zeros(2)), atol=1e-5), "the teacher is the base model"
    assert not torch.allclose(taught, module(noisy, t, caption, demos, demo_emb, mask), atol=1e-3), "the demonstrations change the student"
    pred = module(noisy, t, text, demos, demo_emb, mask)
    weight = torch.tensor([0.5, 0.0])
    loss = denoising_loss(module, scheduler, latents, noise, t, text, demos, demo_emb, mask, teacher=taught, teacher_weight=weight).item()
    rows = [(pred[0] - (0.5 * noise[0] + 0.5 * taught[0])).pow(2).mean(), (pred[1] - noise[1]).pow(2).mean()]
    assert loss == pytest.approx(float(sum(rows) / 2), rel=1e-5)
    assert loss != pytest.approx(denoising_loss(module, scheduler, latents, noise, t, text, demos, demo_emb, mask).item(), rel=1e-3)
    # a trainable base gets a frozen copy taken now, with plain attention processors
    copy = caption_teacher(ApprenticeTrainConfig(shards="x", output="y", caption_distillation=1.0), base.unet)
    assert copy is not base.unet and not any(p.requires_grad for p in copy.parameters())
    before = teacher_prediction(copy, scheduler, latents, noise, t, Conditioning(caption))
    assert torch.allclose(before, taught, atol=1e-5)
    for p in base.unet.parameters():
        p.add_(0.1)
    assert torch.equal(teacher_prediction(copy, scheduler, latents, noise, t, Conditioning(caption)), before), "training the base leaves the teacher"
    with pytest.raises(Exception, match=r"--caption-distillation must be a finite number in \[0, 1\], got 1.5"):
        ApprenticeTrainConfig(shards="x", output="y", caption_distillation=1.5).validate()


def test_copy_view_share_is_checked_and_recorded():
    from apprentice.train import ApprenticeTrainConfig
    from apprentice.train_config import build_arg_parser, config_from_args

    with pytest.raises(Exception, match=r"--copy-view must be a finite number in \[0, 1\], got -0.1"):
        ApprenticeTrainConfig(shards="x", output="y", copy_view=-0.1).validate()
    config = config_from_args(build_arg_parser().parse_args(["--shards", "x", "--output", "y", "--copy-view", "0.5"]))
    assert config.copy_view == 0.5


def test_gradient_checkpointing_gives_the_adapter_the_same_gradients():
    from diffusers import DDPMScheduler

    from apprentice.train import denoising_loss

    base, module = _tiny_module()
    module.unet.requires_grad_(False)
    module.unet.train()
    scheduler = DDPMScheduler.from_config(base.scheduler.config)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            module.unet.enable_gradient_checkpointing()
        module.zero_grad()
        denoising_loss(module, scheduler, *_fixed_batch()).backward()
        grads.append({n: p.grad.clone() for n, p in module.adapter.named_parameters() if p.grad is not None})
    assert module.unet.is_gradient_checkpointing
    assert grads[0].keys() == grads[1].keys() and any(g.abs().sum() > 0 for g in grads[1].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


def _ds_json(tmp_path: Path, **extra) -> str:
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}, "steps_per_print": 10**6, **extra}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_bf16_config_feeds_bf16_inputs_and_keeps_fp32_checkpoints(tmp_path):
    from apprentice.checkpoint import gather_trainable
    from apprentice.train import ApprenticeTrainConfig, build_engine, denoising_loss, init_distributed
    from diffusers import DDPMScheduler

    _, _, device = init_distributed()
    config = ApprenticeTrainConfig(shards="x", output=str(tmp_path / "o"), model="tiny", batch_size=2, freeze_base=True, deepspeed_config=_ds_json(tmp_path, bf16={"enabled": True}))
    base, module, engine, trainable, dtype = build_engine(config, device)
    assert dtype == torch.bfloat16 and module.unet.dtype == torch.bfloat16
    scheduler = DDPMScheduler.from_config(base.scheduler.config)
    loss = denoising_loss(engine, scheduler, *_fixed_batch(), dtype=dtype)  # fp32 batch, cast to bf16
    engine.backward(loss)
    engine.step()
    params, optim, scalars = gather_trainable(engine, trainable)
    assert all(v.dtype == torch.float32 for v in params.values()) and scalars["step"] == 1
    assert set(params) == {n for n, _ in module.named_parameters() if n.startswith("adapter.")}


# ---------------------------------------------------------------- launchers


def test_launcher_commands():
    from apprentice.cli import launch_command, train_argv
    from orchestration.cli import build_parser

    parse = build_parser().parse_args
    args = parse("apprentice train --shards a/*.tar b/*.tar --shard-weights 3 1 --output s3://b/run --steps 5 --freeze-base --resolution 64 --nproc 8 --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29400".split())
    argv = train_argv(args)
    assert argv == ["--shards", "a/*.tar", "b/*.tar", "--shard-weights", "3.0", "1.0", "--output", "s3://b/run", "--steps", "5", "--freeze-base", "--resolution", "64"]
    env = os.environ.pop("RANK", None)
    try:
        cmd = launch_command(args, argv)
        assert cmd[1:] == ["-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29400", "--nproc-per-node=8", "-m", "apprentice.train", *argv]
        assert launch_command(parse("apprentice train --shards a --output o --nproc 2".split()), [])[3] == "--standalone"
        assert launch_command(parse("apprentice train --shards a --output o".split()), []) is None
        hosts = Path(__file__)  # any existing file stands for a hostfile here
        cmd = launch_command(parse(f"apprentice train --shards a --output o --hostfile {hosts} --nnodes 2".split()), ["--steps", "3"])
        assert cmd[1:4] == ["-m", "deepspeed.launcher.runner", "--hostfile"] and cmd[-3:] == ["apprentice.train", "--steps", "3"] and "--num_nodes" in cmd
        from suti.errors import InputError

        with pytest.raises(InputError, match="--master-addr"):
            launch_command(parse("apprentice train --shards a --output o --nnodes 2".split()), [])
    finally:
        if env is not None:
            os.environ["RANK"] = env


#: What an in-process run (init_distributed) leaves in os.environ; a launched job must not inherit it.
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    return dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)


@pytest.mark.slow
def test_deepspeed_launcher_passes_local_rank_and_it_runs(tmp_path):
    import base64

    shards = world_shards(tmp_path / "sh", num_subjects=2, per_subject=2)
    world_info = base64.urlsafe_b64encode(json.dumps({"localhost": [0]}).encode()).decode()
    cmd = [sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={world_info}", "--node_rank=0", "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "--module", "apprentice.train",
           "--shards", str(shards / "*.tar"), "--model", "tiny", "--output", str(tmp_path / "app"), "--steps", "2", "--batch-size", "2", "--freeze-base"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "--local_rank=0" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "app" / "training.json").read_text())["steps"] == 2


# ---------------------------------------------------------------- multi-node, S3, elastic resume


def _adapter_bytes(freeze_base: bool = True) -> int:
    from apprentice import DemoAttentionAdapter
    from suti.models import load_pipeline

    unet = load_pipeline("tiny").unet
    return sum(p.numel() * 4 for p in DemoAttentionAdapter.for_unet(unet).parameters())


@pytest.mark.slow
def test_two_nodes_on_s3_resume_on_both_then_on_one_process(tmp_path, s3):
    from apprentice.checkpoint import gather_trainable, read_state, read_tensors, scatter_trainable
    from apprentice.train import ApprenticeTrainConfig, build_engine, init_distributed
    from suti import storage

    adapter = _adapter_bytes()  # also builds the tiny preset once, before two processes would race to
    shards = world_shards(tmp_path / "sh", num_subjects=2, per_subject=2)
    out = "s3://suti/two-nodes"
    common = ["--shards", str(shards / "*.tar"), "--model", "tiny", "--output", out, "--batch-size", "2", "--freeze-base", "--save-steps", "2"]

    def nodes(steps: int, *extra: str) -> list[str]:
        port = str(_free_port())
        procs = []
        for r in range(2):
            private = tmp_path / f"node{r}"  # each node's own disk: its working folder and TMPDIR
            private.mkdir(exist_ok=True)
            cmd = [sys.executable, "-m", "orchestration.cli", "apprentice", "train", *common, "--steps", str(steps), *extra, "--nnodes", "2", "--node-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", port]
            procs.append(subprocess.Popen(cmd, cwd=private, env=_env(**s3, TMPDIR=str(private)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = [p.communicate(timeout=900)[0] for p in procs]
        for p, log in zip(procs, logs):
            assert p.returncode == 0, log[-4000:]
        return logs

    nodes(4)
    assert storage.listdir(f"{out}/checkpoints") == ["latest", "step-2", "step-4"]
    assert not any(p for r in range(2) for p in (tmp_path / f"node{r}").glob("**/*.safetensors")), "nothing checkpoints to a node's own disk"
    logs = nodes(6, "--resume", "latest")
    for log in logs:  # each node's process continues at the same step
        assert "at step 4 (world size then 2, now 2)" in log, log[-3000:]
    # kill both, resume with one process
    one = subprocess.run([sys.executable, "-m", "orchestration.cli", "apprentice", "train", *common, "--steps", "8", "--resume", "latest"], cwd=tmp_path, env=_env(**s3), capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-4000:]
    assert "at step 6 (world size then 2, now 1)" in one.stderr
    info = json.loads(storage.read_text(f"{out}/training.json"))
    assert info["steps"] == 8 and info["steps_this_run"] == 2 and info["world_size"] == 1 and info["resolution"] == 32
    # lean: the checkpoint holds the adapter and its Adam state, not the frozen U-Net
    tag = f"{out}/checkpoints/step-8"
    state = read_state(tag)
    size = sum(f["bytes"] for f in state["files"].values())
    assert size <= 1.5 * (adapter + 2 * adapter), (size, adapter)
    # the weights and Adam moments of a 2-process checkpoint load whole into 1 process
    tag6 = f"{out}/checkpoints/step-6"
    st6 = read_state(tag6)
    weights, optim = read_tensors(tag6, st6, "trainable.safetensors"), read_tensors(tag6, st6, "optimizer.safetensors")
    _, _, device = init_distributed()
    config = ApprenticeTrainConfig(shards="x", output="o", model="tiny", batch_size=2, freeze_base=True)
    _, _, engine, trainable, _ = build_engine(config, device)
    scatter_trainable(engine, trainable, weights, optim, st6["scalars"])
    params, moments, scalars = gather_trainable(engine, trainable)
    assert scalars["step"] == 6
    assert all(torch.equal(params[k], weights[k]) for k in weights) and all(torch.equal(moments[k], optim[k]) for k in optim)


# ---------------------------------------------------------------- resume faults (one process, in-process CLI)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step frozen-base run with checkpoints step-2 and step-4, plus its CLI arguments."""
    from orchestration.cli import main

    root = tmp_path_factory.mktemp("faults")
    shards = world_shards(root / "sh", num_subjects=2, per_subject=2)
    args = ["apprentice", "train", "--shards", str(shards / "*.tar"), "--model", "tiny", "--batch-size", "2", "--freeze-base", "--save-steps", "2", "--resolution", "32", "--gradient-checkpointing", "--num-workers", "1"]
    assert main([*args, "--output", str(root / "run"), "--steps", "4"]) == 0
    return root / "run", args


@pytest.fixture
def run(trained, tmp_path):
    import shutil

    folder, args = trained
    shutil.copytree(folder, tmp_path / "run")
    return tmp_path / "run", [*args, "--output", str(tmp_path / "run")]


def _sizes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def test_missing_latest_resumes_from_the_newest_intact_checkpoint(run, caplog):
    from orchestration.cli import main

    folder, args = run
    (folder / "checkpoints" / "latest").unlink()
    with caplog.at_level(logging.INFO):
        assert main([*args, "--steps", "6", "--resume", "latest"]) == 0
    assert "checkpoints/latest is missing" in caplog.text
    assert "step-4 at step 4" in caplog.text
    info = json.loads((folder / "training.json").read_text())
    assert info["steps"] == 6 and info["steps_this_run"] == 2
    assert info["resolution"] == 32 and info["config"]["gradient_checkpointing"] is True and info["config"]["num_workers"] == 1


def test_learning_rate_changes_compare_the_rates_as_they_act():
    from apprentice.checkpoint import learning_rate_changes

    trains = {"learning_rate": 1e-3, "base_learning_rate": None, "freeze_base": False}
    assert learning_rate_changes(trains, {**trains, "base_learning_rate": 1e-3}) == []  # unset is --learning-rate
    assert learning_rate_changes({**trains, "base_learning_rate": 3e-5}, trains) == ["base_learning_rate (checkpoint 3e-05, now unset (= 0.001))"]
    frozen = {**trains, "freeze_base": True}
    assert learning_rate_changes({**frozen, "base_learning_rate": 3e-5}, frozen) == []  # a frozen base has no rate
    assert learning_rate_changes(frozen, {**frozen, "learning_rate": 5e-4}) == ["learning_rate (checkpoint 0.001, now 0.0005)"]


def test_resuming_with_other_learning_rates_warns_and_names_both_values(run, caplog):
    from orchestration.cli import main

    folder, args = run
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--steps", "5", "--resume", "latest", "--learning-rate", "0.0005"]) == 0
    warning = next(r.getMessage() for r in caplog.records if "other learning rates" in r.getMessage())
    assert "step-4" in warning and "learning_rate (checkpoint 0.0001, now 0.0005)" in warning, warning
    assert "base_learning_rate" not in warning  # the base is frozen in this run: its rate does not act
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the same rates: no warning
        assert main([*args, "--steps", "6", "--resume", "latest", "--learning-rate", "0.0005"]) == 0
    assert "other learning rates" not in caplog.text


@pytest.mark.parametrize("damage", ["empty", "truncated", "no-state"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(run, caplog, damage):
    from orchestration.cli import main

    folder, args = run
    bad = folder / "checkpoints" / "step-4" / ("state.json" if damage == "no-state" else "optimizer.safetensors")
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:100])
    else:
        bad.unlink()
    with caplog.at_level(logging.INFO):
        assert main([*args, "--steps", "6", "--resume", "latest"]) == 0
    warning = next(r.getMessage() for r in caplog.records if "not intact" in r.getMessage())
    assert "step-4" in warning and bad.name in warning
    assert "step-2 at step 2" in caplog.text
    assert json.loads((folder / "training.json").read_text())["steps_this_run"] == 4


def test_no_intact_checkpoint_is_an_error_and_nothing_is_overwritten(run, capsys):
    from orchestration.cli import main

    folder, args = run
    for tag in ("step-2", "step-4"):
        (folder / "checkpoints" / tag / "trainable.safetensors").write_bytes(b"")
    (folder / "checkpoints" / "latest").unlink()
    before = _sizes(folder)
    assert main([*args, "--steps", "6", "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "step-2" in err and "step-4" in err and "Traceback" not in err
    assert _sizes(folder) == before


def test_resuming_a_finished_run_says_so_and_exits_0(run, capsys):
    from orchestration.cli import main

    folder, args = run
    before = _sizes(folder)
    assert main([*args, "--steps", "4", "--resume", "latest"]) == 0
    assert "already finished at step 4" in capsys.readouterr().err
    assert _sizes(folder) == before


def test_resuming_with_another_trainable_set_exits_2_naming_the_keys(run, capsys):
    from orchestration.cli import main

    folder, args = run
    unfrozen = [a for a in args if a != "--freeze-base"]
    assert main([*unfrozen, "--steps", "6", "--resume", "latest", "--optimizer", "adafactor"]) == 2
    err = capsys.readouterr().err
    assert "freeze_base (checkpoint True, now False)" in err and "optimizer (checkpoint 'adamw', now 'adafactor')" in err and "Traceback" not in err


def test_base_learning_rate_gives_the_unet_its_own_group():
    from apprentice import DemoAttentionAdapter
    from apprentice.train import ApprenticeModule, ApprenticeTrainConfig, param_groups
    from suti.models import load_pipeline

    unet = load_pipeline("tiny").unet
    module = ApprenticeModule(unet, DemoAttentionAdapter.for_unet(unet))
    config = ApprenticeTrainConfig(shards="x", output="y", learning_rate=1e-3, base_learning_rate=3e-5)
    config.validate()
    adapter_group, base_group = param_groups(module, config)
    assert (adapter_group["lr"], base_group["lr"]) == (1e-3, 3e-5)
    assert {id(p) for p in adapter_group["params"]} == {id(p) for p in module.adapter.parameters()}
    assert {id(p) for p in base_group["params"]} == {id(p) for p in unet.parameters()}
    (one,) = param_groups(module, ApprenticeTrainConfig(shards="x", output="y", learning_rate=1e-3))  # no --base-learning-rate: one group, as before
    assert one["lr"] == 1e-3 and len(one["params"]) == len(adapter_group["params"]) + len(base_group["params"])
    unet.requires_grad_(False)  # --freeze-base: one group, the adapter's
    assert [g["lr"] for g in param_groups(module, ApprenticeTrainConfig(shards="x", output="y", learning_rate=1e-3, freeze_base=True))] == [1e-3]
    with pytest.raises(Exception, match="--base-learning-rate must be unset with --freeze-base"):
        ApprenticeTrainConfig(shards="x", output="y", freeze_base=True, base_learning_rate=1e-5).validate()


def test_one_step_moves_the_unet_by_its_own_rate_and_checkpoints_both_groups(tmp_path):
    """Adam's first step moves each weight by at most its group's learning rate (about exactly,
    where the gradient is not tiny): the U-Net by --base-learning-rate, the adapter by
    --learning-rate; the checkpoint holds both groups' optimizer state (DeepSpeed links the second
    group's only when asked again, :func:`apprentice.checkpoint._relink_optimizer_state`) and resumes."""
    from safetensors.torch import load_file

    from apprentice.train import ApprenticeTrainConfig, train_apprentice
    from suti.models import load_pipeline

    shards = world_shards(tmp_path / "sh", num_subjects=2, per_subject=2)
    config = ApprenticeTrainConfig(shards=str(shards / "*.tar"), output=str(tmp_path / "app"), model="tiny", steps=1, batch_size=2, learning_rate=1e-3,
                                   base_learning_rate=3e-5, resolution=32, save_steps=1, deepspeed_config="configs/deepspeed/zero2.json")
    out = train_apprentice(config, progress=False)
    saved = load_file(str(out / "checkpoints" / "step-1" / "trainable.safetensors"))
    optim = load_file(str(out / "checkpoints" / "step-1" / "optimizer.safetensors"))
    base = load_pipeline("tiny").unet.state_dict()
    unet_moves = max(float((saved[f"unet.{k}"] - v).abs().max()) for k, v in base.items() if f"unet.{k}" in saved)
    assert 2.5e-5 < unet_moves < 3.5e-5, unet_moves
    to_out = [k for k in saved if k.startswith("adapter.") and k.endswith("to_out.weight")]
    assert 0.9e-3 < max(float(saved[k].abs().max()) for k in to_out) < 1.1e-3  # from 0
    assert float(optim["exp_avg_sq/unet.conv_in.weight"].abs().sum()) > 0 and f"exp_avg/{to_out[0]}" in optim
    config.steps = 2
    train_apprentice(config, resume="latest", progress=False)
    assert json.loads((out / "training.json").read_text())["steps"] == 2


def test_the_process_group_init_distributed_initialises_is_destroyed_at_exit():
    """init_distributed's own group is released when the process ends (NCCL otherwise warns that
    destroy_process_group() was never called and resources leak)."""
    code = ("import atexit, torch\n"
            "from apprentice.train import init_distributed\n"
            "init_distributed()\n"
            "assert torch.distributed.is_initialized()\n"
            "atexit._run_exitfuncs()\n"
            "print('initialised after exit:', torch.distributed.is_initialized())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "initialised after exit: False" in proc.stdout
