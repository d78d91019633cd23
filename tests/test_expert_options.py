"""The diffusers train_dreambooth.py options of `suti expert train` (issue 18), each by its effect,
plus chunked VAE encoding and shared class images (issues 15 and 14), on the tiny preset."""

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import draw_subject, subject_photos
from experts import load_expert, load_pipeline, resolve_config
from experts.data import class_images_folder, ensure_class_images
from experts.latents import TrainingLatents, encode_in_chunks, load_training_pixels
from experts.optim import make_optimizer
from experts.train import train_expert
from orchestration.cli import main
from suti.errors import InputError


def config(instance_dir, **overrides):
    base = dict(model="tiny", instance_dir=str(instance_dir), class_noun="star toy", steps=3, prior_preservation=False, report_to="none")
    base.update(overrides)
    return resolve_config(base.pop("recipe", "dreambooth"), base)


def train_cli(instance_dir, out, *extra):
    return main(["expert", "train", "--model", "tiny", "--instance-dir", str(instance_dir), "--class-noun", "star toy", "--output", str(out), *extra])


@pytest.fixture()
def class_dir(tmp_path):
    return subject_photos(tmp_path / "class_photos", [100, 101], size=40)


def test_acceptance_free_prompts_accumulation_cosine_class_dir_flip_recorded(instance_dir, class_dir, tmp_path, monkeypatch):
    """Issue 18, acceptance 3: every setting reaches training and expert.json; the free-text
    prompts (with {V}) reach the tokenizer; real class photos replace generated ones."""
    import suti.conditioning as conditioning

    seen = []
    real_tokenize = conditioning.tokenize
    monkeypatch.setattr(conditioning, "tokenize", lambda tok, prompts: seen.extend(prompts) or real_tokenize(tok, prompts))
    out = tmp_path / "e"
    code = train_cli(instance_dir, out, "--identifier", "zwx", "--instance-prompt", "a photo of {V} {class}", "--class-prompt", "a photo of a {class}",
                     "--gradient-accumulation-steps", "2", "--lr-scheduler", "cosine", "--lr-warmup-steps", "5", "--class-data-dir", str(class_dir),
                     "--num-class-images", "2", "--prior-preservation", "--random-flip", "--steps", "6", "--report-to", "none")
    assert code == 0
    assert seen[:2] == ["a photo of zwx star toy", "a photo of a star toy"] and set(seen) == set(seen[:2])
    info = json.loads((out / "expert.json").read_text())
    assert info["instance_prompt"] == "a photo of zwx star toy"
    cfg = info["config"]
    assert cfg["instance_prompt"] == "a photo of {V} {class}" and cfg["class_prompt"] == "a photo of a {class}"
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["lr_scheduler"] == "cosine" and cfg["lr_warmup_steps"] == 5
    assert cfg["class_data_dir"] == str(class_dir) and cfg["random_flip"] is True and cfg["prior_preservation"] is True
    assert not class_images_folder("tiny", "a photo of a star toy", 32, 0, 25, 7.5).exists(), "no class image was generated"


def test_default_instance_prompt_is_unchanged(instance_dir):
    assert config(instance_dir).instance_prompt == "a {V} {class}"
    assert config(instance_dir, recipe="suti-expert").instance_prompt == "a {V}"
    with pytest.raises(InputError, match=r"\{V\}"):
        config(instance_dir, instance_prompt="a photo of a dog")


def test_class_data_dir_is_topped_up_with_generated_images_and_validated(instance_dir, class_dir, tmp_path):
    calls = []
    train_expert(config(instance_dir, class_noun="green lamp", prior_preservation=True, class_data_dir=str(class_dir), num_class_images=3, class_sample_steps=2, steps=1), tmp_path / "a", progress=False, progress_callback=lambda *a: calls.append(a))
    assert [c[:3] for c in calls if c[0] == "class_images"] == [("class_images", 1, 1)], "2 real photos + 1 generated"
    (class_dir / "zz_bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="zz_bad.png"):
        train_expert(config(instance_dir, prior_preservation=True, class_data_dir=str(class_dir), num_class_images=2), tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


def test_gradient_accumulation_of_4_at_batch_1_equals_batch_4(instance_dir, tmp_path):
    runs = {}
    for name, batch, accum in (("batch4", 4, 1), ("accum4", 1, 4)):
        metrics = []
        out = tmp_path / name
        train_expert(config(instance_dir, batch_size=batch, gradient_accumulation_steps=accum, steps=2, lora_rank=4, checkpointing_steps=1, checkpoints_total_limit=0, prior_preservation=True, num_class_images=2, class_sample_steps=2), out, progress=False,
                     progress_callback=lambda phase, done, total, m: phase == "training" and metrics.append(m))
        step = [load_file(str(out / "checkpoints" / f"step-00000{s}" / "trainable.safetensors")) for s in (1, 2)]
        runs[name] = (metrics, step)
    (m4, (w4_1, w4_2)), (ma, (wa_1, wa_2)) = runs["batch4"], runs["accum4"]
    assert len(m4) == len(ma) == 2, "the same number of optimizer steps"
    for a, b in zip(m4, ma):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    # the second update is the same (relative to its size; Adam amplifies float rounding a little)
    d4 = torch.cat([(w4_2[k] - w4_1[k]).flatten() for k in w4_1])
    da = torch.cat([(wa_2[k] - wa_1[k]).flatten() for k in w4_1])
    assert d4.norm() > 0 and float((d4 - da).norm() / d4.norm()) < 1e-2


@pytest.mark.parametrize("name", ["cosine", "linear", "constant_with_warmup", "cosine_with_restarts", "polynomial"])
def test_lr_scheduler_rate_at_every_step_equals_the_formula(instance_dir, tmp_path, name):
    steps, warmup = 7, 3
    cfg = config(instance_dir, steps=steps, lr_scheduler=name, lr_warmup_steps=warmup, lora_rank=4, lr_num_cycles=2, lr_power=2.0)
    lrs = []
    train_expert(cfg, tmp_path / "e", progress=False, progress_callback=lambda p, d, t, m: p == "training" and lrs.append(m["lr"]))
    base = cfg.effective_learning_rate

    def factor(s):  # s: optimizer steps taken before this one
        if s < warmup:
            return s / warmup
        progress = (s - warmup) / (steps - warmup)
        return {
            "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
            "linear": (steps - s) / (steps - warmup),
            "constant_with_warmup": 1.0,
            "cosine_with_restarts": 0.5 * (1 + math.cos(math.pi * ((2 * progress) % 1.0))),
            "polynomial": (1 - 1e-7 / base) * (1 - progress) ** 2 + 1e-7 / base,
        }[name]

    assert lrs == pytest.approx([base * factor(s) for s in range(steps)], rel=1e-6, abs=1e-12)


def test_8bit_adam_needs_bitsandbytes_and_uses_it(instance_dir, tmp_path, monkeypatch):
    if "bitsandbytes" not in sys.modules:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            with pytest.raises(InputError, match="bitsandbytes"):
                train_expert(config(instance_dir, use_8bit_adam=True), tmp_path / "never", progress=False)
            assert not (tmp_path / "never").exists()

    class AdamW8bit(torch.optim.AdamW):
        made = []

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            AdamW8bit.made.append(kwargs)

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    train_expert(config(instance_dir, use_8bit_adam=True, steps=1, adam_beta1=0.8, adam_epsilon=1e-6, adam_weight_decay=0.3), tmp_path / "e", progress=False)
    assert len(AdamW8bit.made) == 1
    made = AdamW8bit.made[0]
    assert (made["betas"], made["weight_decay"], made["eps"]) == ((0.8, 0.999), 0.3, 1e-6)


def test_adam_flags_reach_the_optimizer(instance_dir):
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], config(instance_dir, adam_weight_decay=0.25, adam_beta1=0.7, adam_beta2=0.95, adam_epsilon=1e-5))
    group = opt.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["eps"]) == (0.25, (0.7, 0.95), 1e-5)


def test_max_grad_norm_clips_the_gradient(instance_dir, tmp_path, monkeypatch):
    real = torch.nn.utils.clip_grad_norm_
    after = []

    def spy(params, max_norm, *a, **k):
        params = list(params)
        total = real(params, max_norm, *a, **k)
        after.append((max_norm, float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    metrics = []
    train_expert(config(instance_dir, max_grad_norm=1e-3, steps=2), tmp_path / "e", progress=False, progress_callback=lambda p, d, t, m: p == "training" and metrics.append(m))
    assert [m for m, _ in after] == [1e-3, 1e-3]
    assert all(norm <= 1e-3 * 1.001 for _, norm in after)
    assert all(m["grad_norm"] > 1e-3 for m in metrics), "the reported norm is before clipping"


def test_checkpoints_total_limit_and_resume_by_bare_name(instance_dir, tmp_path, capsys):
    out = tmp_path / "e"
    assert train_cli(instance_dir, out, "--no-prior-preservation", "--steps", "4", "--checkpointing-steps", "1", "--checkpoints-total-limit", "2", "--report-to", "none", "--adam-weight-decay", "0.2", "--max-grad-norm", "0.5") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    cfg = json.loads((out / "expert.json").read_text())["config"]
    assert (cfg["checkpoints_total_limit"], cfg["adam_weight_decay"], cfg["max_grad_norm"]) == (2, 0.2, 0.5)
    final = load_file(str(out / "checkpoints" / "step-000004" / "trainable.safetensors"))
    # resume from the bare name of the step-3 checkpoint: the same step-4 weights, bit for bit
    (out / "expert.json").unlink()
    assert train_cli(instance_dir, out, "--no-prior-preservation", "--steps", "4", "--checkpointing-steps", "1", "--checkpoints-total-limit", "2", "--report-to", "none", "--adam-weight-decay", "0.2", "--max-grad-norm", "0.5", "--resume", "step-000003") == 0
    again = load_file(str(out / "checkpoints" / "step-000004" / "trainable.safetensors"))
    for k in final:
        assert torch.equal(final[k], again[k]), k
    capsys.readouterr()
    assert train_cli(instance_dir, out, "--no-prior-preservation", "--steps", "4", "--resume", "step-000001") == 2
    err = capsys.readouterr().err
    assert "step-000001" in err and "step-000004" in err


def test_random_flip_flips_the_drawn_images_and_random_crop_crops(tmp_path):
    vae = load_pipeline("tiny").vae
    for i in range(2):
        draw_subject(i, size=48).resize((48, 64)).save(tmp_path / f"p{i}.png")
    paths = sorted(tmp_path.glob("*.png"))
    square = load_training_pixels(paths, 32, center_crop=True)
    lat = TrainingLatents(vae, square, 32, random_flip=True)
    flips, crops = lat.draw_augmentation(64, torch.Generator().manual_seed(0))
    assert crops is None and 10 < int(flips.sum()) < 54, "about half the draws flip"
    idx = torch.tensor([0, 1, 0, 1])
    flips = torch.tensor([True, False, False, True])
    mean, _ = lat.latents(idx, flips, None)
    pixels = torch.stack([square[0].flip(-1), square[1], square[0], square[1].flip(-1)])
    expected, _ = encode_in_chunks(vae, pixels)
    torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mean[0], lat.latents(idx[:1], torch.tensor([False]), None)[0][0]), "a flipped image has other latents"

    whole = load_training_pixels(paths, 32, center_crop=False)
    assert whole[0].shape == (3, 43, 32), "shorter side at the resolution, aspect kept"
    rand = TrainingLatents(vae, whole, 32, random_flip=True, center_crop=False)
    flips, crops = rand.draw_augmentation(2, torch.Generator().manual_seed(1))
    batch = rand.pixels_for(torch.tensor([0, 1]), torch.tensor([True, False]), torch.tensor([[1.0 - 1e-6, 0.0], [0.0, 0.0]]))
    assert batch.shape == (2, 3, 32, 32)
    torch.testing.assert_close(batch[0], whole[0][:, -32:, :].flip(-1))
    torch.testing.assert_close(batch[1], whole[1][:, :32, :])


def test_training_runs_with_random_crop(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    for i in range(3):
        draw_subject(i, size=48).resize((64, 40)).save(folder / f"p{i}.png")
    info = train_expert(config(folder, center_crop=False, random_flip=True, steps=2, batch_size=2), tmp_path / "e", progress=False)
    assert info.config["center_crop"] is False


def test_chunked_vae_encoding_equals_one_call(instance_dir):
    vae = load_pipeline("tiny").vae
    pixels = torch.stack(load_training_pixels(sorted(instance_dir.glob("*.png")), 32))
    from suti.losses import encode_images

    whole = encode_images(vae, pixels)
    for size in (1, 3):
        chunked = encode_in_chunks(vae, pixels, batch_size=size)
        for a, b in zip(whole, chunked):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert config(instance_dir).vae_encode_batch_size == 8


def test_class_images_shared_across_expert_seeds_and_topped_up(instance_dir, tmp_path):
    pipe = load_pipeline("tiny")
    first = ensure_class_images(pipe, "tiny", "a bowl", 2, 32, 0, 2)
    data = [p.read_bytes() for p in first]
    more = ensure_class_images(pipe, "tiny", "a bowl", 4, 32, 0, 2)
    assert more[:2] == first and [p.read_bytes() for p in first] == data, "the first files are kept byte for byte"
    assert len(more) == 4 and all(p.is_file() for p in more) and more[2].parent == first[0].parent
    # experts with different seeds (e.g. one per cluster) share one folder of class images
    calls = {}
    for seed in (1, 2):
        calls[seed] = []
        train_expert(config(instance_dir, seed=seed, class_noun="blue bowl", prior_preservation=True, num_class_images=2, class_sample_steps=2, steps=1), tmp_path / f"s{seed}", progress=False,
                     progress_callback=lambda p, d, t, m, s=seed: p == "class_images" and calls[s].append(d))
    assert calls == {1: [1, 2], 2: []}
    folder = class_images_folder("tiny", "a blue bowl", 32, 0, 2, 7.5)
    assert sorted(p.name for p in folder.glob("class_*.png")) == ["class_0000.png", "class_0001.png"]


def test_report_to_tensorboard_logs_and_none_does_not(instance_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_expert(config(instance_dir, steps=3, report_to="tensorboard"), tmp_path / "tb", progress=False)
    runs = [p.parent for p in (tmp_path / "tb" / "logs").rglob("events.out.tfevents.*")]
    scalars = {}
    for run in runs:
        acc = EventAccumulator(str(run))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [e.step for e in acc.Scalars(tag)]
    assert scalars["loss/total"] == [1, 2, 3] and scalars["lr"] == [1, 2, 3]
    train_expert(config(instance_dir, steps=1, report_to="none"), tmp_path / "none", progress=False)
    assert not (tmp_path / "none" / "logs").exists()


def test_report_to_wandb_without_the_package_is_a_clear_error(instance_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(InputError, match="wandb"):
        train_expert(config(instance_dir, report_to="wandb"), tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_import_a_diffusers_lora_then_sample(tmp_path, capfd):
    """A LoRA written by diffusers' own save_lora_weights becomes an expert that samples; one for
    another base is one line (capfd: diffusers' logger writes to the real stderr)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load_pipeline("tiny")
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # an untrained LoRA is a no-op (B = 0): make it act
    lora_dir = tmp_path / "diffusers-out"
    StableDiffusionPipeline.save_lora_weights(str(lora_dir), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)), safe_serialization=True)

    out = tmp_path / "expert"
    assert main(["expert", "import", "--lora", str(lora_dir / "pytorch_lora_weights.safetensors"), "--identifier", "sks", "--class-noun", "dog", "--model", "tiny", "--output", str(out)]) == 0
    info = json.loads((out / "expert.json").read_text())
    assert (info["identifier"], info["class_noun"], info["kind"], info["base_model"], info["instance_prompt"], info["resolution"]) == ("sks", "dog", "lora", "tiny", "a sks dog", 32)
    expert, base = load_expert(out), load_pipeline("tiny")
    x, t, emb = torch.randn(1, 4, 4, 4), torch.tensor([10]), torch.randn(1, 77, base.text_encoder.config.hidden_size)
    with torch.no_grad():
        assert not torch.allclose(expert.unet(x, t, emb).sample, base.unet(x, t, emb).sample), "the LoRA is applied"
    samples = tmp_path / "samples"
    assert main(["expert", "sample", "--expert", str(out), "--prompt", "a {V} {class}", "--num-images", "1", "--steps", "2", "--output", str(samples)]) == 0
    assert len(list(samples.glob("*.png"))) == 1

    capfd.readouterr()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    assert main(["expert", "import", "--lora", str(bad), "--identifier", "sks", "--class-noun", "dog", "--model", "tiny", "--output", str(tmp_path / "x")]) == 2
    assert "bad.safetensors" in capfd.readouterr().err and not (tmp_path / "x").exists()
    assert main(["expert", "import", "--lora", str(lora_dir), "--identifier", "sks", "--class-noun", "dog", "--model", "toy", "--output", str(tmp_path / "y")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a diffusers LoRA for toy" in err[0], err  # not the whole size-mismatch list first


def test_import_a_diffusers_pipeline_folder_then_sample(tmp_path):
    folder = tmp_path / "db-pipeline"
    load_pipeline("tiny").save_pretrained(str(folder), safe_serialization=True)
    out = tmp_path / "expert"
    assert main(["expert", "import", "--pipeline", str(folder), "--identifier", "sks", "--class-noun", "dog", "--output", str(out)]) == 0
    info = json.loads((out / "expert.json").read_text())
    assert info["kind"] == "full" and info["resolution"] == 32 and (out / "pipeline" / "model_index.json").is_file()
    assert main(["expert", "sample", "--expert", str(out), "--prompt", "a {V} {class} on the beach", "--num-images", "1", "--steps", "2", "--output", str(tmp_path / "s")]) == 0
    assert main(["expert", "loss", "--expert", str(out)]) == 2, "no training images recorded: a clear error"


@pytest.mark.slow
def test_two_process_ddp_launch_then_resume_on_one(instance_dir, tmp_path):
    """`torchrun --nproc-per-node 2` (what `accelerate launch --multi_gpu` runs) trains one expert
    with DDP on CPU (gloo): each process draws its own data, the main process writes; the run
    then resumes on a single process."""
    import os
    import subprocess

    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    args = ["-m", "orchestration.cli", "expert", "train", "--model", "tiny", "--instance-dir", str(instance_dir), "--class-noun", "star toy", "--output", str(out),
            "--no-prior-preservation", "--lora-rank", "4", "--checkpointing-steps", "2", "--report-to", "none"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*torchrun, *args, "--steps", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, "\n".join(l for l in done.stderr.splitlines() if not l.startswith("expert"))[:3000]
    assert json.loads((out / "expert.json").read_text())["steps"] == 2
    rng = torch.load(out / "checkpoints" / "step-000002" / "rng.pt", weights_only=True)
    assert len(rng["rank_generators"]) == 2 and not torch.equal(*rng["rank_generators"]), "each process draws its own data"
    (out / "expert.json").unlink()
    done = subprocess.run([sys.executable, *args, "--steps", "3", "--resume", "latest"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, "\n".join(l for l in done.stderr.splitlines() if not l.startswith("expert"))[:3000]
    assert json.loads((out / "expert.json").read_text())["steps"] == 3
    assert (out / "checkpoints" / "step-000003").is_dir()


def test_training_encodes_in_chunks_of_vae_encode_batch_size(instance_dir, tmp_path, monkeypatch):
    import suti.losses

    sizes = []
    real = suti.losses.encode_images
    monkeypatch.setattr(suti.losses, "encode_images", lambda vae, images: sizes.append(len(images)) or real(vae, images))
    train_expert(config(instance_dir, vae_encode_batch_size=3, steps=1, random_flip=True), tmp_path / "e", progress=False)
    assert sizes == [3, 1, 3, 1], "4 instance images, then their flips, at most 3 per VAE call"


def test_report_to_wandb_offline(instance_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    train_expert(config(instance_dir, steps=2, report_to="wandb"), tmp_path / "w", progress=False)
    assert list((tmp_path / "w" / "logs" / "wandb").glob("offline-run-*")), "an offline run is written under logs/wandb"
