"""The fixed evaluation (issue 17, item 1): subjects, prompts, bootstrap gap closed, class-only
loss, training-free reference attention and the image/expert cache."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from orchestration.compare import bootstrap_mean, gap_closed
from orchestration.fixed_eval import FixedEvalConfig, fixed_prompts, fixed_subjects, run_fixed_eval
from suti.errors import InputError
from suti.models import load_pipeline


# ----------------------------------------------------------------- bootstrap gap closed

def test_gap_closed_is_the_ratio_of_mean_differences_with_an_interval_around_it():
    base = [0.2, 0.3, 0.1, 0.4, 0.3, 0.2]
    expert = [0.6, 0.9, 0.5, 0.8, 0.7, 0.5]
    method = [0.5, 0.4, 0.3, 0.7, 0.4, 0.5]
    g = gap_closed(method, base, expert, n_boot=4000, seed=1)
    # means: base 1.5/6, expert 4.0/6, method 2.8/6 -> (2.8 - 1.5) / (4.0 - 1.5) = 0.52
    assert g["point"] == pytest.approx(0.52)
    assert g["low"] < g["point"] < g["high"]
    assert 0.0 < g["low"] and g["high"] < 1.2
    assert g["n_valid"] == 4000


def test_gap_closed_constant_differences_give_a_zero_width_interval():
    base = [0.1, 0.5, 0.3]
    expert = [b + 0.4 for b in base]
    method = [b + 0.3 for b in base]
    g = gap_closed(method, base, expert)
    assert g["point"] == pytest.approx(0.75) and g["low"] == pytest.approx(0.75) and g["high"] == pytest.approx(0.75)
    assert gap_closed(base, base, expert)["point"] == 0.0 and gap_closed(expert, base, expert)["point"] == 1.0


def test_bootstrap_mean_interval_brackets_the_mean_and_skips_nan():
    values = [0.2, 0.4, 0.9, 0.1, 0.5, 0.3, float("nan")]
    m = bootstrap_mean(values, n_boot=4000, seed=2)
    assert m["point"] == pytest.approx(2.4 / 6)
    assert 0.1 < m["low"] < m["point"] < m["high"] < 0.9
    assert bootstrap_mean([0.3, 0.3, 0.3]) == {"point": pytest.approx(0.3), "low": pytest.approx(0.3), "high": pytest.approx(0.3)}
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean([float("nan")])


def test_gap_closed_degenerate_gap_gives_nan_not_a_division_error():
    g = gap_closed([0.5, 0.6], [0.3, 0.3], [0.3, 0.3])
    assert math.isnan(g["point"]) and math.isnan(g["low"]) and math.isnan(g["high"]) and g["n_valid"] == 0
    # a gap carried by one subject of ten: the ~1 - 0.9**10 = 65% of resamples that draw it count,
    # the others (no gap) are left out instead of dividing by zero
    g = gap_closed([0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0], [0.0] * 10, [0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0], n_boot=1000)
    assert g["point"] == 1.0 and 600 < g["n_valid"] < 700 and g["low"] == g["high"] == 1.0
    with pytest.raises(ValueError, match="equally long"):
        gap_closed([1, 2], [1, 2, 3], [1, 2])


# ----------------------------------------------------------------- subjects and prompts

def test_fixed_subjects_cover_all_classes_deterministically_and_held_out():
    world, subjects = fixed_subjects(24)
    assert Counter(s.class_name for s in subjects) == {c: 4 for c in Counter(s.class_name for s in world.subjects)}
    assert len({s.subject_id for s in subjects}) == 24
    assert all(world.splits[s.subject_id] == "heldout" for s in subjects)
    assert [s.subject_id for s in fixed_subjects(24)[1]] == [s.subject_id for s in subjects]
    assert [s.subject_id for s in fixed_subjects(7)[1]] == [s.subject_id for s in subjects[:7]]
    assert len({s.class_name for s in fixed_subjects(6)[1]}) == 6
    with pytest.raises(InputError, match="--subjects"):
        fixed_subjects(0)
    with pytest.raises(InputError, match="--subjects"):
        fixed_subjects(len(world.heldout_subjects) + 1)


def test_fixed_prompts_are_class_only_one_per_skill_in_the_probes_vocabulary():
    from suti.world import ACCESSORIES, CONTEXTS, PATTERNS, STYLES

    _, subjects = fixed_subjects(24)
    for subject in subjects:
        prompts = fixed_prompts(subject)
        assert [p["skill"] for p in prompts] == ["recontextualization", "accessorization", "attribute", "stylization"]
        assert prompts == fixed_prompts(subject)
        ctx, acc, col, sty = (p["expect"] for p in prompts)
        assert ctx["context"] in CONTEXTS and acc["accessory"] in ACCESSORIES and sty["style"] in STYLES
        assert col["color"] not in (subject.body_color, subject.pattern_color)
        for p in prompts:
            text = p["template"].replace("{S}", subject.class_noun)
            assert p["template"].count("{S}") == 1
            assert subject.body_color not in text.split() or p["skill"] == "recontextualization"  # "red brick wall"
            assert not any(w and w in text.split() for w in PATTERNS.values())


# ----------------------------------------------------------------- class-only loss

def test_class_only_loss_prompts_targets_and_demos_with_the_class_noun_only(monkeypatch):
    import apprentice.evaluate as ev

    seen = {}

    def fake_loss(pipe, targets, prompts, demos, demo_captions=None, *, seed=0, draws=4):
        seen.setdefault("calls", []).append((prompts, demos, demo_captions))
        return 1.0 if demos is not None else 2.0

    monkeypatch.setattr(ev, "apprentice_loss", fake_loss)
    pipe = type("Pipe", (), {"resolution": 32})()
    _, subjects = fixed_subjects(6)
    assert ev.heldout_demo_loss(pipe, subjects=subjects, prompt_mode="class", num_targets=2) == (1.0, 2.0)
    (prompts, demos, captions), (prompts2, no_demos, _) = seen["calls"]
    nouns = [f"a {s.class_noun}" for s in subjects for _ in range(2)]
    assert prompts == nouns and prompts2 == nouns and no_demos is None
    assert captions == [[n] * 3 for n in nouns] and all(len(d) == 3 for d in demos)
    seen.clear()
    ev.heldout_demo_loss(pipe, subjects=subjects, prompt_mode="caption", num_targets=2)
    prompts, _, captions = seen["calls"][0]
    assert captions is None and all(s.body_color in p for s, p in zip([s for s in subjects for _ in range(2)], prompts))
    with pytest.raises(ValueError, match="prompt_mode"):
        ev.heldout_demo_loss(pipe, subjects=subjects, prompt_mode="full")


# ----------------------------------------------------------------- reference attention

def test_reference_attention_without_references_is_exactly_the_base_unet():
    from apprentice.reference import ReferenceContext, reference_attention

    unet = load_pipeline("tiny").unet
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=gen)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor(500)
    before = dict(unet.attn_processors)
    with torch.no_grad():
        ref_out = unet(x, t, emb).sample
        with reference_attention(unet):
            for ctx in (None, ReferenceContext(mode="off"), ReferenceContext(mode="read")):
                assert torch.equal(unet(x, t, emb, cross_attention_kwargs={"reference": ctx}).sample, ref_out)
            # with references the output changes (the test can fail)
            ctx = ReferenceContext(mode="write")
            unet(torch.randn(3, unet.config.in_channels, 16, 16, generator=gen), t, emb[:1].expand(3, -1, -1), cross_attention_kwargs={"reference": ctx})
            assert len(ctx.bank) > 0 and all(v.shape[0] == 3 for v in ctx.bank.values())
            ctx.mode = "read"
            assert not torch.allclose(unet(x, t, emb, cross_attention_kwargs={"reference": ctx}).sample, ref_out)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}
    assert torch.equal(unet(x, t, emb).sample, ref_out)


def test_reference_generate_with_no_references_is_the_base_pipeline():
    from apprentice.reference import reference_generate

    pipe = load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    a = pipe("a red cup", height=32, width=32, num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(3)).images[0]
    b = reference_generate(pipe, "a red cup", [], num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(3))
    c = reference_generate(pipe, "a red cup", [a, a], reference_prompt="a cup", num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


# ----------------------------------------------------------------- cache

def test_second_run_reuses_cached_images_and_experts(tmp_path, monkeypatch):
    base = load_pipeline("tiny")
    base.set_progress_bar_config(disable=True)
    config = FixedEvalConfig(num_subjects=1, seeds=1, model="tiny", expert_steps=2, num_class_images=1, sample_steps=2,
                             methods=("base", "expert", "reference"))
    first = run_fixed_eval(None, base, tmp_path, config, progress=lambda line: None)
    assert first["stats"]["expert"] == {"experts_trained": 1, "generated": 4}
    assert first["stats"]["base"] == {"generated": 4} and first["stats"]["reference"] == {"generated": 4}
    experts_dir = tmp_path / "experts"
    assert [p.name for p in experts_dir.iterdir()] == [p.name for p in experts_dir.glob("subject_*-*") if ".tmp" not in p.name]
    g = first["gap_closed"]["expert"]["attributes"]["point"]
    assert g == 1.0 or math.isnan(g)  # the expert closes its own gap (nan: no gap on 1 subject)

    import experts.train

    def no_training(*args, **kwargs):
        raise AssertionError("the expert was retrained")

    monkeypatch.setattr(experts.train, "train_expert", no_training)
    second = run_fixed_eval(None, base, tmp_path, config, progress=lambda line: None)
    assert second["stats"] == {"base": {"cached": 4}, "expert": {"cached": 4}, "reference": {"cached": 4}}
    assert second["mean"] == first["mean"]
    # another expert setting is another cache entry
    other = FixedEvalConfig(**{**config.__dict__, "expert_steps": 3, "methods": ("expert",)})
    monkeypatch.undo()
    third = run_fixed_eval(None, base, tmp_path, other, progress=lambda line: None)
    assert third["stats"]["expert"] == {"experts_trained": 1, "generated": 4}
    json.dumps(third)  # every number is JSON-ready


# ----------------------------------------------------------------- the benchmark's table

@pytest.mark.slow
def test_benchmark_prints_the_fixed_table_and_writes_every_number(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "in_context.py"
    spec = importlib.util.spec_from_file_location("in_context", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "fixed.json"
    args = ["--eval", "fixed", "--subjects", "2", "--seeds", "1", "--expert-steps", "2", "--sample-steps", "2",
            "--class-images", "1", "--work-dir", str(tmp_path / "work"), "--json", str(out)]
    assert bench.main(args) == 0
    text = capsys.readouterr().out
    for word in ("apprentice-3", "base", "expert", "reference", "apprentice-1", "apprentice-5", "gap closed", "class-only prompts"):
        assert word in text
    report = json.loads(out.read_text())
    fixed = report["fixed"]
    assert len(fixed["subjects"]) == 2 and set(fixed["mean"]) == set(fixed["seconds"])
    for m in ("apprentice-3", "reference", "apprentice-1", "apprentice-5"):
        assert {"point", "low", "high", "n_valid"} <= set(fixed["gap_closed"][m]["clip_i"])
    assert report["loss_class_prompts"]["ratio"] > 0
    assert len(report["loss_by_timestep"]["loss"]["copy"]) == 10 and "caption" in text
    assert bench.main(args) == 0  # the rerun reuses the experts and the cached images
    again = json.loads(out.read_text())["fixed"]["stats"]
    assert all(again[m] == {"cached": 8} for m in ("expert", "base", "reference", "apprentice-3", "apprentice-1", "apprentice-5"))
    assert bench.main(args + ["--no-apprentice-cache", "--no-loss"]) == 0
    third = json.loads(out.read_text())["fixed"]
    assert third["stats"]["apprentice-3"] == {"generated": 8} and third["stats"]["base"] == {"cached": 8}
    assert third["mean"]["apprentice-3"] == fixed["mean"]["apprentice-3"]  # same seeds, same images


def test_benchmark_refuses_bad_fixed_settings_in_one_line(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "in_context.py"
    spec = importlib.util.spec_from_file_location("in_context", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--eval", "fixed", "--subjects", "59", "--methods", "base"]) == 2
    assert bench.main(["--eval", "fixed", "--subjects", "1", "--methods", "base,oracle"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: --subjects must be in 1..58") and "unknown methods ['oracle']" in err[1]


# ----------------------------------------------------------------- the experts' held-out loss

def test_expert_loss_uses_the_apprentice_losss_photos_noise_and_timesteps():
    """heldout_expert_loss draws the very targets, noise and timesteps of heldout_demo_loss: an
    apprentice scored through both paths (demos off, the same prompt) gives the same loss."""
    from apprentice import ApprenticePipeline
    from apprentice.evaluate import apprentice_loss, heldout_expert_loss, heldout_shots

    app = ApprenticePipeline.from_base(load_pipeline("tiny"))
    _, subjects = fixed_subjects(2)
    shots = heldout_shots(subjects, seed=3, count=5, resolution=32)
    targets = [img for s in shots for img, _, _ in s[3:]]
    prompts = [f"a {s.class_noun}" for s in subjects for _ in range(2)]
    reference = apprentice_loss(app, targets, prompts, None, seed=3, draws=2)
    # the "expert" is the same pipeline with an empty identifier: "a  <class>" tokenizes as "a <class>"
    expert, base = heldout_expert_loss(app, [(app, ""), (app, "")], subjects, seed=3, num_targets=2, draws=2)
    assert expert == pytest.approx(reference, rel=1e-6) and base == pytest.approx(reference, rel=1e-6)
    other = heldout_shots(subjects, seed=4, count=5, resolution=32)
    assert not np.array_equal(np.asarray(other[0][3][0]), np.asarray(shots[0][3][0]))


def test_expert_loss_prompts_the_expert_with_its_identifier_and_the_base_with_the_class(monkeypatch):
    import apprentice.evaluate as ev

    seen = []
    monkeypatch.setattr(ev, "pipeline_loss", lambda pipe, targets, prompt, **kw: seen.append((pipe, prompt, len(targets))) or [1.0 if pipe == "expert" else 4.0])
    _, subjects = fixed_subjects(2)
    loaded = []
    expert, base = ev.heldout_expert_loss("base", lambda i: loaded.append(i) or ("expert", f"sks{i}"), subjects, seed=0, num_targets=3)
    assert (expert, base) == (1.0, 4.0) and loaded == [0, 1]
    assert seen == [("base", f"a {subjects[0].class_noun}", 3), ("expert", f"a sks0 {subjects[0].class_noun}", 3),
                    ("base", f"a {subjects[1].class_noun}", 3), ("expert", f"a sks1 {subjects[1].class_noun}", 3)]


def test_one_default_demonstration_guidance_everywhere():
    """Every entry point samples the apprentice at suti.sampling.DEFAULT_DEMO_GUIDANCE_SCALE
    unless told otherwise, and the fixed evaluation keys cached images by the apprentice's guidance."""
    import inspect

    from orchestration.compare import compare_on_world
    from orchestration.fixed_eval import _image_key
    from apprentice.pipeline import ApprenticePipeline
    from apprentice.sample import sample_apprentice
    from serving.settings import Settings
    from suti.sampling import DEFAULT_DEMO_GUIDANCE_SCALE as D

    for fn in (ApprenticePipeline.__call__, sample_apprentice, compare_on_world):
        assert inspect.signature(fn).parameters["demo_guidance_scale"].default == D, fn
    assert FixedEvalConfig().demo_guidance_scale == D and Settings().apprentice_demo_guidance_scale == D
    from orchestration.cli import build_parser

    args = build_parser().parse_args(["apprentice", "sample", "--apprentice", "a", "--demos", "d.png", "--prompt", "p", "--output", "o"])
    assert args.demo_guidance_scale == D
    app = type("App", (), {"_fixed_eval_fingerprint": "w"})()
    keys = {_image_key("apprentice-3", FixedEvalConfig(**kw), app) for kw in ({}, {"demo_guidance_scale": D + 1}, {"apprentice_guidance_scale": 9.0})}
    assert len(keys) == 3
    assert _image_key("base", FixedEvalConfig(apprentice_guidance_scale=9.0)) == _image_key("base", FixedEvalConfig())


def test_loss_by_timestep_scores_each_condition_on_the_same_noise():
    """heldout_loss_by_timestep: "without" is the plain class-prompted MSE at each timestep on the
    generator's noise (recomputed here); "copy" puts the target itself first among the demos and
    "demos" only the other photos; an untrained apprentice (zero-initialised demo layers) gives
    demos == copy == without exactly, while the full caption changes the prediction."""
    from diffusers import DDPMScheduler

    from apprentice import ApprenticePipeline
    from apprentice.evaluate import LOSS_CONDITIONS, heldout_loss_by_timestep, heldout_shots
    from suti.losses import denoising_target, per_sample_mse

    app = ApprenticePipeline.from_base(load_pipeline("tiny"))
    _, subjects = fixed_subjects(2)
    calls = []
    encode = app.encode_demonstrations
    app.encode_demonstrations = lambda demos, captions=None: calls.append(list(demos)) or encode(demos, captions)
    result = heldout_loss_by_timestep(app, subjects, seed=3, num_demos=3, num_targets=1, timesteps=(100, 900))
    assert result["timesteps"] == [100, 900] and set(result["loss"]) == set(LOSS_CONDITIONS)
    shots = heldout_shots(subjects, seed=3, count=4, resolution=app.resolution)
    for i, s in enumerate(shots):  # per subject: its 3 other photos, then (one target) the target + 2 others
        assert [np.asarray(x).tolist() for x in calls[2 * i]] == [np.asarray(x[0]).tolist() for x in s[:3]]
        assert [np.asarray(x).tolist() for x in calls[2 * i + 1]] == [np.asarray(x[0]).tolist() for x in (s[3], s[0], s[1])]
    scheduler = DDPMScheduler.from_config(app.scheduler.config)
    gen, expected = torch.Generator().manual_seed(3), [[], []]
    with torch.no_grad():
        for subject, s in zip(subjects, shots):
            latents = app.encode_images([s[3][0]])
            text = app.encode_conditioning([f"a {subject.class_noun}"]).unet_kwargs()
            for j, t in enumerate((100, 900)):
                noise, tt = torch.randn(latents.shape, generator=gen), torch.tensor([t])
                pred = app.unet(scheduler.add_noise(latents, noise, tt), tt, **text).sample
                expected[j].append(float(per_sample_mse(pred, denoising_target(scheduler, latents, noise, tt))))
    assert result["loss"]["without"] == pytest.approx([np.mean(e) for e in expected], rel=1e-5)
    assert result["loss"]["demos"] == result["loss"]["without"] == result["loss"]["copy"]
    assert result["loss"]["caption"] != result["loss"]["without"]
    assert result["mean"]["without"] == pytest.approx(np.mean(result["loss"]["without"]))
