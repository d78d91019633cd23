"""benchmarks/gpu_suite.sh runs every row on the CPU (--dry-run); benchmarks/memory.py's pieces."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SUITE_ROWS = [
    "expert full ({m}, 32 px, 2 steps, prior preservation",
    "expert lora ({m}, 32 px, 2 steps, prior preservation",
    "apprentice time per image vs base ({m}, 3 guidance branches",
    "apprentice time per image vs base ({m}, 2 guidance branches",
    "time to first image, apprentice vs expert full ({m})",
    "time to first image, apprentice vs expert lora ({m})",
    "apprentice training ({m}, 32 px, frozen base, 3 demos",
    "experts per GPU-hour, full ({m}",
    "experts per GPU-hour, lora ({m}",
    "generation throughput, LoRA rank 4 ({m}, 2 steps",
    "stacked experts K=1, LoRA rank 4 ({m}, 2 steps",
    "stacked experts K=2, LoRA rank 4 ({m}, 2 steps",
]


@pytest.mark.slow
def test_gpu_suite_dry_run_prints_every_row(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "SUTI_SUITE_TIMEOUT": "600"}
    rows_but_flux = "experts,apprentice,training,resident,throughput"  # row 9 (flux) has its own dry-run test below
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run", "--rows", rows_but_flux, "--json", str(tmp_path / "rows.json")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    for name in SUITE_ROWS:  # the sd15-arch rows at dry-run sizes (--sdxl runs the same rows on another run: below)
        name = name.format(m="tiny")
        assert any(line.startswith(f"ROW {name}") for line in rows), f"missing row {name!r}:\n" + "\n".join(rows)
    import json

    data = {r["row"].split(" (")[0]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert data["experts per GPU-hour, lora"]["experts_per_hour"] > 0
    assert data["apprentice training"]["images_per_s"] > 0 and data["apprentice training"]["tflop_per_image"] > 0
    throughput = data["generation throughput, LoRA rank 4"]
    assert throughput["resident_per_hour"] > 0 and throughput["per_task_per_hour"] > 0
    assert throughput["identical_samples"] == "2/2"  # the resident worker's samples are the per-task experts', byte for byte
    assert throughput["resident_max_delta_clip_diff"] == 0.0  # and so are their scores (the measure a GPU run is read by)
    assert throughput["batched_4_per_hour"] > 0 and throughput["batched_max_delta_clip_diff"] < 0.01  # a batch's samples: the same up to rounding
    stacked = data["stacked experts K=2, LoRA rank 4"]
    assert stacked["experts_per_hour"] > 0 and stacked["aten_ops_per_step"] > 0 and stacked["expert_steps_per_second"] > 0
    assert set(stacked["seconds_per_expert"]) == {"data", "forward", "backward", "optimizer", "sampling", "scoring", "setup"}
    assert (tmp_path / "traces" / "stacked_step_k2.json").is_file()  # the profiled step, beside the rows


@pytest.mark.parametrize("dry_run", [True, False])
def test_gpu_suite_sdxl_runs_every_asked_row_again_on_the_sdxl_base(monkeypatch, tmp_path, dry_run):
    """--sdxl: after the sd15-arch run, every asked row runs again on sdxl-arch at 1024 px with
    --sdxl-expert-steps and batch 1 (tiny-sdxl at dry-run sizes under --dry-run), in the order asked."""
    suite = _benchmark("gpu_suite")
    calls = []
    monkeypatch.setattr(suite, "guarded", lambda name, fn, run, *rest, **kw: calls.append((name.split(" (")[0], run.preset, run.resolution, run.expert_steps, run.train_batch)) or {})
    monkeypatch.setattr(suite, "model_folder", lambda model, work: f"folder of {model}")
    monkeypatch.setattr(suite, "_photos", lambda folder, resolution: [])
    monkeypatch.setattr(suite, "ROWS", [])
    monkeypatch.setattr(suite.torch.cuda, "is_available", lambda: True)
    argv = ["--sdxl", "--rows", "resident,throughput", "--sdxl-expert-steps", "7"] + (["--dry-run"] if dry_run else [])
    assert suite.main(argv) == 0
    base, sdxl = ("tiny", 32, 2, 2), ("tiny-sdxl", 32, 2, 2)
    if not dry_run:
        base, sdxl = ("sd15-arch", 512, 500, 4), ("sdxl-arch", 1024, 7, 1)
    rows = ["generation throughput", "stacked experts"]
    assert calls == [(row, *base) for row in rows] + [(row, *sdxl) for row in rows]


def _benchmark(name: str):
    """A script of benchmarks/ imported as a module."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_gpu_suite_a_failing_row_is_an_error_row_and_the_next_rows_still_run(tmp_path, monkeypatch):
    """One row's exception (a GPU run has one try) becomes ``error`` in its row; the rows after it
    still run, the JSON is written after every row, and the exit status says a row failed."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when run as a script: its helpers sit beside it
    suite = _benchmark("gpu_suite")
    ran = []

    def broken(*args):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(suite, "ROWS", [])
    monkeypatch.setattr(suite, "expert_rows", broken)
    monkeypatch.setattr(suite, "apprentice_training_row", lambda run, work: (ran.append("training"), suite.row("training stand-in", images_per_s=1.0)))
    out = tmp_path / "rows.json"
    assert suite.main(["--dry-run", "--rows", "experts,training", "--json", str(out)]) == 1
    import json

    rows = json.loads(out.read_text())
    assert rows[0]["row"] == "experts (tiny)" and rows[0]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert ran == ["training"] and rows[-1]["row"] == "training stand-in"
    with pytest.raises(SystemExit) as exc:
        suite.main(["--dry-run", "--rows", "experts,bogus"])
    assert exc.value.code == 2


def test_memory_analytic_rows_and_shared_kv_at_a_small_size():
    memory = _benchmark("memory")
    rows = memory.analytic(resolution=64)
    full, lora, apprentice, sampling = rows[0], rows[1], rows[2], rows[3]
    assert full["case"].startswith("expert training, full") and lora["case"].startswith("expert training, LoRA")
    assert full["adamw_gib"] == pytest.approx(2 * full["grads_gib"]) and lora["grads_gib"] < full["grads_gib"] / 100
    assert full["weights_gib"] == pytest.approx(3.97, abs=0.01)  # U-Net 859.5M + VAE + CLIP text encoder, fp32
    assert apprentice["case"].startswith("apprentice training, frozen base") and 0 < apprentice["grads_gib"] < 0.2
    assert sampling["case"].startswith("apprentice sampling, 3 demos")
    # sd15-arch at 64 px (8x8 latents), 3 demos: 1/64 of the 512-px cache (264 MiB fp32)
    assert sampling["demo_kv_shared_gib"] * 1024 == pytest.approx(264.0 / 64, rel=0.05)
    assert sampling["demo_kv_repeated_per_branch_gib"] == pytest.approx(3 * sampling["demo_kv_shared_gib"])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_chunked_vae_encoding_lowers_the_measured_peak():
    memory = _benchmark("memory")
    torch.manual_seed(0)
    chunked, one = memory.measured_vae(size=64, n=4, chunk=1)
    assert chunked["case"].endswith("chunks of 1") and one["case"].endswith("one call")
    assert chunked["peak_mib"] < 0.7 * one["peak_mib"], (one, chunked)


def test_memory_analytic_sdxl_arch_rows():
    memory = _benchmark("memory")
    rows = memory.analytic(resolution=64, model="sdxl-arch")
    full, lora = rows[0], rows[1]
    # U-Net 2567.5M + VAE 83.7M + CLIP ViT-L 123.1M + OpenCLIP bigG text 694.7M parameters, fp32
    assert full["weights_gib"] == pytest.approx((2_567_463_684 + 83_653_863 + 123_060_480 + 694_659_840) * 4 / 2**30, rel=1e-3)
    assert full["grads_gib"] == pytest.approx(2_567_463_684 * 4 / 2**30, rel=1e-6)
    assert 0 < lora["grads_gib"] < full["grads_gib"] / 100


def _peer_script(name: str):
    """diffusers' examples/dreambooth/``name``: $SUTI_PEER_SCRIPTS/name, else from a local diffusers
    git mirror, else None."""
    if os.environ.get("SUTI_PEER_SCRIPTS"):
        return Path(os.environ["SUTI_PEER_SCRIPTS"]) / name
    mirror = Path("/work/.mirror/huggingface+diffusers/repo")
    if not mirror.is_dir():
        return None
    proc = subprocess.run(["git", "-C", str(mirror), "show", f"HEAD:examples/dreambooth/{name}"], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


@pytest.mark.parametrize("model", ["tiny", "tiny-flux"])
def test_lora_parity_gives_both_trainers_the_same_settings(tmp_path, model):
    """benchmarks/lora_parity.py, SD1 and FLUX: the suti command line resolves to the settings the
    peer is given (effective rate, warmup 0, the peer's weight decay, its resize filter, no prior
    preservation, batch 1, rank = alpha = 4; FLUX: guidance 3.5, T5 length); where diffusers'
    script is at hand, its own parser reads the peer command with the same values; and the
    paired summary's arithmetic."""
    from experts.cli import _OVERRIDES
    from experts.recipe import resolve_config
    from orchestration.cli import build_parser

    parity = _benchmark("lora_parity")
    family = "flux" if model == "tiny-flux" else "sd"
    decay, interpolation = (1e-4, "bilinear") if family == "flux" else (1e-2, "lanczos")
    args = argparse.Namespace(steps=7, learning_rate=2e-3, rank=4, resolution=32, max_sequence_length=77, family=family)
    cmd = parity.suti_command(model, tmp_path / "photos", tmp_path / "out", 3, args)
    ns = build_parser().parse_args(cmd[3:])
    config = resolve_config(ns.recipe, {**{k: getattr(ns, k) for k in _OVERRIDES}, "model": ns.model, "instance_dir": ns.instance_dir, "class_noun": ns.class_noun})
    assert config.effective_learning_rate == pytest.approx(2e-3) and config.lr_warmup_steps == 0 and config.lr_scheduler == "constant"
    assert (config.adam_weight_decay, config.adam_beta1, config.adam_beta2, config.adam_epsilon, config.max_grad_norm) == (decay, 0.9, 0.999, 1e-8, 1.0)
    assert (config.image_interpolation_mode, config.center_crop, config.random_flip) == (interpolation, True, False)
    assert not config.prior_preservation and not config.train_text_encoder and config.batch_size == 1 and config.gradient_accumulation_steps == 1
    assert (config.lora_rank, config.lora_alpha, config.lora_dropout, config.steps, config.seed, config.mixed_precision) == (4, 4, 0, 7, 3, "no")
    if family == "flux":
        assert (config.guidance_scale, config.max_sequence_length, config.weighting_scheme) == (3.5, 77, "none")
    assert config.instance_prompt.replace("{V}", ns.identifier).replace("{class}", ns.class_noun) == parity.instance_prompt() == "a photo of sks dog"
    assert parity.paired_summary([0.1, -0.3, 0.2]) == pytest.approx({"mean_difference": 0.0, "standard_error": 0.2645751 / 3 ** 0.5,
                                                                      "suti_lower": 1, "seeds": 3, "within_2se": True})
    script = _peer_script(parity.FAMILIES[family]["script"])
    if script is None:
        return  # no diffusers checkout here: the suti side is checked
    source = script.read_text() if isinstance(script, Path) else script
    (tmp_path / "peer.py").write_text(source)
    peer = parity.peer_command(tmp_path / "peer.py", "FOLDER", tmp_path / "photos", tmp_path / "p", 3, args)
    namespace: dict = {"__name__": "peer"}
    exec(compile(source, "peer.py", "exec"), namespace)  # definitions only: main() runs under __main__
    pa = namespace["parse_args"](peer[2:])
    assert (pa.learning_rate, pa.lr_warmup_steps, pa.lr_scheduler, pa.adam_weight_decay, pa.adam_beta1, pa.adam_beta2, pa.adam_epsilon, pa.max_grad_norm) == \
        (2e-3, 0, "constant", decay, 0.9, 0.999, 1e-8, 1.0)
    assert (pa.center_crop, pa.with_prior_preservation, pa.train_text_encoder, pa.train_batch_size, pa.gradient_accumulation_steps) == (True, False, False, 1, 1)
    assert (pa.rank, pa.lora_dropout, pa.max_train_steps, pa.seed, pa.mixed_precision, pa.instance_prompt, pa.resolution) == \
        (4, 0, 7, 3, "no", "a photo of sks dog", 32)
    if family == "flux":  # the SD script has no --lora_alpha (alpha = rank in its code), no flip and a fixed AdamW
        assert (pa.lora_alpha, pa.random_flip, pa.guidance_scale, pa.max_sequence_length, pa.weighting_scheme, pa.optimizer) == (4, False, 3.5, 77, "none", "AdamW")
    else:
        assert pa.image_interpolation_mode == "lanczos" and "lora_alpha=args.rank" in source.replace(" ", "")


def test_lora_parity_refuses_bad_input_before_any_work(tmp_path, capsys):
    """One line, exit 2, before a pipeline loads or a folder is made: a family with no peer here
    (SDXL), a model that is not a preset, a peer script of the other family (its options are
    read from its text), a photos folder that is missing or holds no image."""
    parity = _benchmark("lora_parity")
    sd_flags = [a for a in parity.peer_command(Path("s"), "F", Path("p"), Path("o"), 0, argparse.Namespace(
        steps=1, learning_rate=1e-3, rank=4, resolution=32, max_sequence_length=77, family="sd")) if a.startswith("--")]
    (tmp_path / "peer_sd.py").write_text("\n".join(f'parser.add_argument("{flag}")' for flag in sd_flags))
    (tmp_path / "empty").mkdir()
    work = tmp_path / "work"
    cases = [(["--model", "tiny-sdxl"], "no peer here"), (["--model", str(tmp_path)], "not a suti preset"),
             (["--model", "tiny-flux"], "takes no --lora_alpha"), (["--photos", str(tmp_path / "none")], "no such folder"),
             (["--photos", str(tmp_path / "empty")], "no image files")]
    for extra, words in cases:
        with pytest.raises(SystemExit) as e:
            parity.parse_args(["--peer-script", str(tmp_path / "peer_sd.py"), "--work-dir", str(work), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and words in err[-1], (extra, err)
    assert parity.parse_args(["--peer-script", str(tmp_path / "peer_sd.py")]).family == "sd"  # the SD script fits tiny
    assert not work.exists()


@pytest.mark.slow  # ~10 s: FLUX.1-dev's transformer and T5-XXL built on meta
def test_memory_analytic_flux_arch_rows(monkeypatch):
    """flux-arch at 64 px (16 image tokens): exact weights, LoRA and adapter sizes, the demos'
    cache by its formula, and checkpointing below the activations without it."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    flux = _benchmark("memory_flux")
    expert, apprentice, sampling = flux.analytic_flux(resolution=64, text_tokens=16)
    transformer, lora = flux.build_transformer("flux-arch", "meta", 4)
    base = sum(p.numel() for p in transformer.parameters() if not p.requires_grad)
    assert base == pytest.approx(11.9e9, rel=0.01)  # FLUX.1-dev's transformer
    vae = flux.frozen_parts("flux-arch")["vae"]
    gib = 2**30
    assert expert["weights_gib"] == pytest.approx((base + vae) * 2 / gib, rel=1e-9)  # bf16
    assert expert["grads_gib"] == pytest.approx(sum(p.numel() for p in lora) * 4 / gib, rel=1e-9)  # fp32 LoRA
    assert all(p.dtype == torch.float32 for p in lora) and expert["adamw_gib"] == pytest.approx(2 * expert["grads_gib"])
    assert 0 < expert["activations_gib"] < expert["activations_without_checkpointing_gib"] / 5
    dim, blocks = 3072, 19 + 38
    assert apprentice["grads_gib"] == pytest.approx(blocks * (4 * dim * dim + dim) * 4 / gib, rel=1e-9)  # q, k, v, out (+ out bias), fp32
    assert apprentice["other_gib"] == pytest.approx(3 * 16 * blocks * dim * 2 / gib, rel=1e-9)  # the demos' block inputs, bf16
    assert sampling["demo_kv_shared_gib"] == pytest.approx(2 * apprentice["other_gib"])  # keys and values
    assert apprentice["activations_gib"] > sampling["demo_kv_shared_gib"]  # training keeps the keys/values with gradients
    low = flux.analytic_flux(resolution=64, text_tokens=16, adapter_rank=16)[1]
    assert low["grads_gib"] == pytest.approx(blocks * (8 * 16 * dim + dim) * 4 / gib, rel=1e-9)


def test_gpu_suite_flux_rows_dry_run(tmp_path, monkeypatch):
    """Row 9 (``--rows flux``) on the CPU with tiny-flux: the analytic rows, then one measured
    training step of the LoRA expert and of the apprentice (the code path a GPU run takes)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    suite = _benchmark("gpu_suite")
    monkeypatch.setattr(suite, "ROWS", [])
    threads = torch.get_num_threads()
    assert suite.main(["--dry-run", "--rows", "flux", "--json", str(tmp_path / "rows.json")]) == 0
    assert torch.get_num_threads() == threads  # the CPU rows' one thread is given back
    import json

    rows = {r["row"].split(" (")[0]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert set(rows) == {"flux memory, analytic: flux expert training, LoRA rank 4, gradient checkpointing",
                         "flux memory, analytic: flux apprentice training, 3 demos, adapter full, gradient checkpointing",
                         "flux memory, analytic: flux apprentice sampling, 3 demos, 1 image, bf16",
                         "flux expert training step, LoRA rank 4, gradient checkpointing",
                         "flux apprentice training step, 3 demos, adapter full, gradient checkpointing"}, list(rows)
    assert all("tiny-flux, 32 px" in r["row"] for r in rows.values())
    expert, apprentice = rows["flux expert training step, LoRA rank 4, gradient checkpointing"], rows["flux apprentice training step, 3 demos, adapter full, gradient checkpointing"]
    assert expert["seconds_per_step"] > 0 and expert["steps_timed"] == 1
    assert apprentice["seconds_per_step"] > 0 and apprentice["demo_pass_s"] > 0 and apprentice["adapter_params_m"] > 0
    assert rows["flux memory, analytic: flux apprentice sampling, 3 demos, 1 image, bf16"]["demo_kv_shared_gib"] > 0
    with pytest.raises(SystemExit) as exc:
        suite.main(["--rows", "flux", "--flux-resolution", "1000"])
    assert exc.value.code == 2


def test_flux_demo_branch_trains_through_checkpointing_and_is_the_base_at_scale_0(monkeypatch):
    """The stand-in branch the FLUX apprentice rows measure: every block's demo features are
    captured, the adapter's q/k/v/out get gradients through per-block gradient checkpointing
    (keys/values made outside the blocks), and a zero gate gives the base transformer's output."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    flux = _benchmark("memory_flux")
    torch.manual_seed(0)
    transformer, _ = flux.build_transformer("tiny-flux", "cpu", 0, dtype=torch.float32)
    branches, ctx = flux.install_branches(transformer, 0, "cpu")
    transformer.enable_gradient_checkpointing()
    latent, tokens = 4, 4

    def fp32(kw):
        return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
    ctx.update(mode="capture", features={}, image_tokens=tokens)
    with torch.no_grad():
        transformer(**fp32(flux._inputs(transformer, 3, latent, 8, "cpu")))
    assert len(ctx["features"]) == 4 and all(f.shape == (1, 3 * tokens, 32) for f in ctx["features"].values())  # 2 + 2 blocks, 3 demos
    ctx["mode"] = "branch"
    ctx["kv"] = flux.demo_kv(transformer, branches, ctx, flux._demo_rotary(transformer, 3, latent, "cpu"))
    x = fp32(flux._inputs(transformer, 1, latent, 8, "cpu"))
    transformer(**x)[0].pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in branches.parameters())
    ctx["scale"] = 0.0
    with torch.no_grad():
        gated = transformer(**x)[0]
        transformer.set_attn_processor({name: proc.base for name, proc in transformer.attn_processors.items()})
        torch.testing.assert_close(gated, transformer(**x)[0])


def test_the_k_sweep_runs_every_k_on_the_same_clusters_in_interleaved_rounds():
    """benchmarks/expert_sweep.py: after one warm-up batch per K (on the first clusters, not
    timed), each round runs the round's clusters once per K in batches of K (so a shared
    machine's drift falls on every K alike); every K trains the same experts, the rates come
    from each K's own time, and steady_batches x largest K clusters are enough."""
    sweep = _benchmark("expert_sweep")

    class Worker:
        def __init__(self):
            self.calls = []

        def run_batch(self, group, demos, timings=None, on_step=None):
            self.calls.append([r["cluster_id"] for r in group])
            for phase in ("forward", "backward"):
                timings[phase] = timings.get(phase, 0.0) + 0.001 * len(group)
            return [{} for _ in group]

    rows = [{"cluster_id": f"c{i}"} for i in range(8)]
    worker = Worker()
    out = sweep.sweep(worker, rows, {r["cluster_id"]: [] for r in rows}, [1, 2, 4], steps=3, steady_batches=2, profile=False)
    warm, steady = worker.calls[:3], worker.calls[3:]
    assert warm == [["c0"], ["c0", "c1"], ["c0", "c1", "c2", "c3"]]
    round_0 = [["c0"], ["c1"], ["c2"], ["c3"], ["c0", "c1"], ["c2", "c3"], ["c0", "c1", "c2", "c3"]]
    assert steady[:7] == round_0 and steady[7:] == [[c.replace(c[1:], str(int(c[1:]) + 4)) for c in g] for g in round_0]
    assert {k: (row["experts"], row["batches"]) for k, row in out.items()} == {1: (8, 8), 2: (8, 4), 4: (8, 2)}
    assert out[1]["ratio_to_k1"] == 1.0 and out[4]["seconds_per_expert"]["forward"] == pytest.approx(0.001)
    assert sweep.clusters_needed([1, 2, 4], 2) == 8
    # the profiler records one training step, however few the batch has (never sampling after it)
    assert [sweep.profiler_schedule(n) for n in (1, 2, 3, 60)] == [None, {"wait": 0, "warmup": 1, "active": 1, "repeat": 1},
                                                                  {"wait": 1, "warmup": 1, "active": 1, "repeat": 1}, {"wait": 1, "warmup": 1, "active": 1, "repeat": 1}]
    with pytest.raises(SystemExit, match="needs 8 clusters"):
        sweep.sweep(worker, rows[:7], {}, [1, 2, 4], steps=3, steady_batches=2, profile=False)


@pytest.mark.parametrize("argv, message", [
    (["--expert-batch-size", "1,x", "--lora-rank", "4"], "--expert-batch-size: must be whole numbers separated by commas, got '1,x'"),
    (["--expert-batch-size", "0,2", "--lora-rank", "4"], "--expert-batch-size: each K must be at least 1, and each K once, got '0,2'"),
    (["--expert-batch-size", "1,2"], "the K sweep trains LoRA experts: give --lora-rank"),
    (["--clusters", "0"], "--clusters: must be a whole number from 1"),
    (["--threads", "-1"], "--threads: must be a whole number from 1"),
    (["--model", "no-such-model"], "no-such-model"),
    (["--expert-batch-size", "1,2", "--lora-rank", "4", "--in-process"], "--in-process takes one --expert-batch-size"),
])
def test_generation_throughput_refuses_bad_flags_in_one_line_before_any_work(argv, message):
    proc = subprocess.run([sys.executable, "benchmarks/generation_throughput.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr, proc.stderr
