"""The apprentice: zero-init equals the base, demo layers learn, 1-8 demos, DeepSpeed, resume."""

import json
import random
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apprentice import ApprenticePipeline, DemoAttentionAdapter
from apprentice.data import collate, make_pipeline
from apprentice.evaluate import apprentice_loss
from apprentice.train import ApprenticeTrainConfig, train_apprentice
from shard_util import world_shards
from orchestration.cli import main
from suti.models import load_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _demos(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), (40 * i, 200 - 20 * i, 90)) for i in range(n)]


def test_zero_initialised_apprentice_equals_the_base_model():
    base = load_pipeline("tiny")
    ref = base("a red cup", height=32, width=32, num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    app = ApprenticePipeline.from_base(load_pipeline("tiny"))
    app.set_progress_bar_config(disable=True)
    with_demos = app("a red cup", demo_images=_demos(3), num_inference_steps=4, guidance_scale=5.0, demo_guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(with_demos, ref)
    assert base.unet.state_dict().keys() == app.unet.state_dict().keys(), "the U-Net is not forked"


@pytest.mark.parametrize("n", [1, 3, 8])
def test_any_number_of_demos_from_1_to_8(n):
    app = ApprenticePipeline.from_base(load_pipeline("tiny"))
    ctx = app.encode_demonstrations(_demos(n), [f"photo {i}" for i in range(n)])
    assert ctx.num_demos == n
    k, v = next(iter(ctx.kv.values()))
    assert k.shape[0] == 1 and k.shape[2] % n == 0


def test_nine_demos_are_refused():
    app = ApprenticePipeline.from_base(load_pipeline("tiny"))
    with pytest.raises(ValueError, match="1 to 8"):
        app.encode_demonstrations(_demos(9))


def test_demo_layers_get_gradients_and_change_the_output():
    base = load_pipeline("tiny")
    adapter = DemoAttentionAdapter.for_unet(base.unet)
    adapter.install(base.unet)
    base.unet.requires_grad_(False)
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    demo_lat = torch.randn(2, 3, 4, 16, 16, generator=gen)
    demo_emb = torch.randn(2, 3, 77, 32, generator=gen)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([10, 500])
    emb = torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        plain = base.unet(x, t, emb, cross_attention_kwargs={"demo": None}).sample
        first = base.unet(x, t, emb, cross_attention_kwargs={"demo": adapter.encode_demos(base.unet, demo_lat, demo_emb)}).sample
    assert torch.equal(plain, first)
    for _ in range(3):
        out = base.unet(x, t, emb, cross_attention_kwargs={"demo": adapter.encode_demos(base.unet, demo_lat, demo_emb)}).sample
        loss = (out - torch.randn_like(out)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in adapter.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
        opt.step()
    with torch.no_grad():
        after = base.unet(x, t, emb, cross_attention_kwargs={"demo": adapter.encode_demos(base.unet, demo_lat, demo_emb)}).sample
    assert not torch.allclose(after, plain)


def test_reference_attention_baseline_runs_training_free():
    app = ApprenticePipeline.from_base(load_pipeline("tiny"), method="reference")
    app.set_progress_bar_config(disable=True)
    img = app("a cup", demo_images=_demos(2), num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (32, 32)


def test_shard_pipeline_reads_examples(tmp_path):
    shards = world_shards(tmp_path / "sh", num_subjects=3, per_subject=2)
    examples = list(make_pipeline(str(shards / "*.tar"), resolution=32, num_demos=3, repeat=False))
    assert len(examples) == 6
    batch = collate(examples[:2])
    assert batch["target"].shape == (2, 3, 32, 32) and batch["demos"].shape == (2, 3, 3, 32, 32)
    assert len(batch["demo_captions"][0]) == 3


def test_self_target_reconstructs_a_held_out_cluster_photo(tmp_path):
    import numpy as np

    shards = world_shards(tmp_path / "sh", num_subjects=2, per_subject=3, num_demos=4)
    plain = list(make_pipeline(str(shards / "*.tar"), resolution=32, num_demos=3, repeat=False))
    selfs = list(make_pipeline(str(shards / "*.tar"), resolution=32, num_demos=3, repeat=False, self_target=1.0))
    assert len(selfs) == len(plain) == 6
    for e in selfs:
        # the target is one of the 4 cluster photos and none of the 3 demonstrations
        dists = [float((e["target"] - d).abs().mean()) for d in e["demos"]]
        assert min(dists) > 1e-3, "the held-out photo must not also be a demonstration"
    by_key = {e["key"]: e for e in plain}
    assert all(not torch.equal(e["target"], by_key[e["key"]]["target"]) for e in selfs), "self targets replace the expert's sample"
    with pytest.raises(ValueError, match="self_target"):
        list(make_pipeline(str(shards / "*.tar"), resolution=32, repeat=False, self_target=1.5))


def test_teacher_prompt_is_the_alt_text_of_a_class_only_reconstruction():
    """--caption-distillation's privileged caption: the held-out photo's alt text when the prompt
    names only the class; none for expert targets, for a prompt that already is the alt text, or
    for an alt text that does not describe the subject (no class noun)."""
    from apprentice.data import ToExample

    alts = ["a red dotted star toy on the beach", "a red dotted star toy in the snow", "image", "untitled"]
    img = Image.new("RGB", (32, 32), (200, 30, 30))

    def sample(alt_texts, target=True):
        s = {"__key__": "k", "json": {"prompt": "a star toy in the jungle", "class_noun": "star toy", "demo_captions": alt_texts}}
        s.update({f"demo_{i}.png": img for i in range(len(alt_texts))})
        if target:
            s["target.jpg"] = img
        return s

    class_only = ToExample(32, 1, seed=0, caption_prompt=0.0)
    seen = set()
    for _ in range(40):
        e = class_only(sample(alts, target=False))
        assert e["prompt"] == "a star toy"
        assert e["teacher_prompt"] in alts[:2] or e["teacher_prompt"] == ""
        seen.add(e["teacher_prompt"])
    assert seen == {alts[0], alts[1], ""}, "descriptive alt texts teach; 'image' and 'untitled' do not"
    always_alt = ToExample(32, 1, seed=0, caption_prompt=1.0)
    assert all(always_alt(sample(alts[:2], target=False))["teacher_prompt"] == "" for _ in range(10)), "the prompt already is the alt text"
    expert = ToExample(32, 1, seed=0, self_target=0.0, caption_prompt=0.0)
    assert expert(sample(alts[:2]))["teacher_prompt"] == "", "an expert's sample has no alt text"
    assert collate([e, e])["teacher_prompt"] == [e["teacher_prompt"]] * 2


def test_copy_view_puts_a_view_of_the_target_among_the_demos_of_reconstructions_only():
    """--copy-view: with P = 1 exactly one demonstration of each reconstruction example is a view
    of the target photo (each photo its own colour, with a white band on the left: the view keeps
    the colour, and mirrors or crops the band), captioned as the target when demos keep their alt
    texts; with P = 0 none is, and an expert example's target (not a photo) never is."""
    from apprentice.data import ToExample

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]

    def photo(c):
        img = Image.new("RGB", (40, 40), c)
        img.paste((255, 255, 255), (0, 0, 8, 40))
        return img

    def sample(expert=False):
        s = {"__key__": "k", "json": {"prompt": "a star toy in the jungle", "class_noun": "star toy", "demo_captions": [f"alt {i}" for i in range(5)]}}
        s.update({f"demo_{i}.png": photo(c) for i, c in enumerate(colours)})
        if expert:
            s["target.jpg"] = photo((120, 120, 120))
        return s

    def colour(x):  # the body colour: the median over the image (the band is a fifth of it)
        return x.flatten(1).median(dim=1).values

    def views(e):
        return [i for i, d in enumerate(e["demos"]) if torch.allclose(colour(d), colour(e["target"]), atol=0.05)]

    def alt_of(e):
        return f"alt {next(i for i, c in enumerate(colours) if torch.allclose(colour(e['target']), torch.tensor(c) / 127.5 - 1, atol=0.05))}"

    with_view, without = ToExample(32, 3, seed=0, copy_view=1.0), ToExample(32, 3, seed=0, copy_view=0.0)
    positions, exact = set(), 0
    for _ in range(30):
        e = with_view(sample())
        (i,) = views(e)
        positions.add(i)
        exact += bool(torch.allclose(e["demos"][i], e["target"], atol=2 / 255))
        assert e["demo_captions"][i] == alt_of(e), "the view carries the target's alt text"
        assert views(without(sample())) == []
    assert positions == {0, 1, 2}, "the view takes a random demonstration slot"
    assert exact < 10, "most views are mirrored or cropped, not the target's pixels"
    class_only = ToExample(32, 3, seed=0, copy_view=1.0, demo_caption=0.0)(sample())
    assert class_only["demo_captions"] == ["a star toy"] * 3
    expert = ToExample(32, 3, seed=0, self_target=0.0, copy_view=1.0)
    assert all(views(expert(sample(expert=True))) == [] for _ in range(10))
    with pytest.raises(Exception, match="copy_view"):
        ToExample(32, 3, seed=0, copy_view=1.5)


def test_augmented_view_mirrors_and_crops_but_keeps_the_size():
    from apprentice.data import augmented_view

    img = Image.new("RGB", (32, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 8, 32))  # a white band on the left
    views = [augmented_view(img, random.Random(s)) for s in range(40)]
    assert all(v.size == (32, 32) for v in views)
    left = [np.asarray(v)[:, :4].mean() > 127 for v in views]
    assert 5 < sum(left) < 35, "about half the views are mirrored (the band moves right)"
    widths = {int((np.asarray(v)[16, :, 0] > 127).sum()) for v in views}
    assert len(widths) > 3, "the crop's scale varies, so the band's width does"
    assert np.array_equal(np.asarray(augmented_view(img, random.Random(3))), np.asarray(views[3])), "seeded"


def test_demo_guidance_1_uses_two_branches_and_the_same_formula():
    app = ApprenticePipeline.from_base(load_pipeline("tiny"))
    app.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for p in app.adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    calls = []
    hook = app.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    ctx = app.encode_demonstrations(_demos(3))
    calls.clear()
    kw = dict(demo_context=ctx, num_inference_steps=3, guidance_scale=4.0, output_type="pt")
    two = app("a cup", demo_guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **kw).images
    assert set(calls) == {2}
    calls.clear()
    three = app("a cup", demo_guidance_scale=1.0 + 1e-7, generator=torch.Generator().manual_seed(0), **kw).images
    assert set(calls) == {3}
    hook.remove()
    torch.testing.assert_close(two, three, atol=2e-4, rtol=0)


def test_bad_shard_sample_is_logged_and_skipped(tmp_path, caplog):
    from suti.shards import ShardPacker, sample_members

    packer = ShardPacker(tmp_path, 4)
    packer.add("bad_p00_s00", sample_members("bad_p00_s00", b"not a jpeg", [b"nope"], {"prompt": "x"}))
    packer.flush()
    world_shards(tmp_path, num_subjects=1, per_subject=2)
    examples = list(make_pipeline(str(tmp_path / "*.tar"), resolution=32, repeat=False))
    assert len(examples) == 2
    assert "skipping a bad training sample" in caplog.text


def _train(shards, out, steps, **kw):
    config = ApprenticeTrainConfig(shards=str(shards / "*.tar"), output=str(out), model="tiny", steps=steps, batch_size=4, learning_rate=2e-3, save_steps=kw.pop("save_steps", steps), deepspeed_config="configs/deepspeed/zero2.json", **kw)
    return train_apprentice(config, progress=False, **({"resume": "latest"} if kw.get("resume") else {}))


def _eval_loss(folder_or_pipe, shards):
    from apprentice.sample import load_apprentice

    pipe = load_apprentice(str(folder_or_pipe)) if isinstance(folder_or_pipe, Path) else folder_or_pipe
    ex = list(make_pipeline(str(shards / "*.tar"), resolution=32, num_demos=3, repeat=False))[:4]
    from suti.images import to_pil

    targets = [to_pil(e["target"]) for e in ex]
    demos = [[to_pil(d) for d in e["demos"]] for e in ex]
    return apprentice_loss(pipe, targets, [e["prompt"] for e in ex], demos, [e["demo_captions"] for e in ex], seed=0)


@pytest.mark.slow
def test_deepspeed_one_process_lowers_the_loss_and_resumes(tmp_path):
    shards = world_shards(tmp_path / "sh", num_subjects=2, per_subject=2)
    before = _eval_loss(ApprenticePipeline.from_base(load_pipeline("tiny")), shards)
    out = _train(shards, tmp_path / "app", 16, save_steps=8)
    after = _eval_loss(out, shards)
    assert after < before
    assert (out / "checkpoints" / "step-16").is_dir() and (out / "checkpoints" / "latest").is_file()
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 16 and info["config"]["model"] == "tiny"
    loaded = ApprenticePipeline.from_pretrained(str(out))
    assert isinstance(loaded.adapter, DemoAttentionAdapter)
    # resume: continue the same run to 20 steps from its latest checkpoint
    config = ApprenticeTrainConfig(shards=str(shards / "*.tar"), output=str(out), model="tiny", steps=20, batch_size=4, learning_rate=2e-3, save_steps=8)
    train_apprentice(config, resume="latest", progress=False)
    assert json.loads((out / "training.json").read_text())["steps"] == 20
    assert (out / "checkpoints" / "step-20").is_dir()


@pytest.mark.slow
def test_deepspeed_two_processes_with_torchrun(tmp_path):
    shards = world_shards(tmp_path / "sh", num_subjects=2, per_subject=2)
    before = _eval_loss(ApprenticePipeline.from_base(load_pipeline("tiny")), shards)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "apprentice.train", "--shards", str(shards / "*.tar"), "--model", "tiny", "--output", str(tmp_path / "app2"), "--steps", "12", "--batch-size", "2", "--learning-rate", "2e-3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "app2" / "training.json").read_text())
    assert info["world_size"] == 2
    assert _eval_loss(tmp_path / "app2", shards) < before


def test_cli_sample_with_a_bad_demo_names_it(tmp_path, capsys):
    app = ApprenticePipeline.from_base(load_pipeline("tiny"))
    app.save_pretrained(tmp_path / "app")
    good = tmp_path / "good.png"
    _demos(1)[0].save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_text("this is text")
    code = main(["apprentice", "sample", "--apprentice", str(tmp_path / "app"), "--demos", str(good), str(bad), "--prompt", "a cup", "--num-images", "1", "--output", str(tmp_path / "out")])
    assert code == 2 and "bad.jpg" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    code = main(["apprentice", "sample", "--apprentice", str(tmp_path / "app"), "--demos", str(good), str(good), "--prompt", "a cup", "--num-images", "2", "--output", str(tmp_path / "out"), "--steps", "2"])
    assert code == 0 and len(list((tmp_path / "out").glob("*.png"))) == 2
