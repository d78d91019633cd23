"""Every sampler validates its numbers the same way, reports truncated prompts, and samples in
fp32/fp16/bf16 (suti.sampling and its entry points: CLI, Python pipeline, HTTP, generation job)."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import exit_code
from orchestration.cli import main
from suti.errors import InputError
from suti.sampling import MAX_SEED, PromptTruncatedError, check_prompt, check_sampler_args, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
SCENE = " ".join(["a quiet meadow with tall grass and wild flowers under a soft morning light"] * 6)  # 78 words
LONG_WITH_ID_AT_END = SCENE + " and in the middle of it all a photo of a {V} {class}"
LONG_WITH_ID_FIRST = "a photo of a {V} {class} in " + SCENE

BAD = [
    (dict(steps=0), "steps: 0 is out of range"),
    (dict(steps=-3), "steps: -3 is out of range"),
    (dict(steps=1001), "steps: 1001 is out of range"),
    (dict(steps=2.5), "steps: 2.5 is not an integer"),
    (dict(steps=True), "steps: True is not an integer"),
    (dict(num_images=0), "num_images: 0 is out of range"),
    (dict(guidance_scale=float("nan")), "guidance_scale: nan is not a finite number"),
    (dict(guidance_scale=float("inf")), "guidance_scale: inf is not a finite number"),
    (dict(guidance_scale=-1.0), "guidance_scale: -1 is out of range"),
    (dict(demo_guidance_scale=51), "demo_guidance_scale: 51 is out of range"),
    (dict(demo_guidance_scale=float("-inf")), "demo_guidance_scale: -inf is not a finite number"),
    (dict(seed=-1), "seed: -1 is out of range"),
    (dict(seed=MAX_SEED + 1), f"seed: {MAX_SEED + 1} is out of range"),
    (dict(height=30), "height: 30 is not a multiple of 8"),
    (dict(width=0), "width: 0 is out of range"),
    (dict(width=8192), "width: 8192 is out of range"),
    (dict(sample_batch_size=0), "sample_batch_size: 0 is out of range"),
    (dict(sample_batch_size=1.5), "sample_batch_size: 1.5 is not an integer"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_check_sampler_args_names_the_field_and_value(kwargs, message):
    with pytest.raises(InputError) as err:
        check_sampler_args(**kwargs)
    assert message in str(err.value)
    flag = "--" + next(iter(kwargs)).replace("_", "-")
    with pytest.raises(InputError, match=flag):
        check_sampler_args(**kwargs, flags=True)


def test_check_sampler_args_accepts_the_edges():
    check_sampler_args(steps=1, num_images=1, guidance_scale=0.0, demo_guidance_scale=50, seed=0, height=8, width=4096)
    check_sampler_args(steps=1000, seed=MAX_SEED, guidance_scale=7.5, height=512, width=768)
    with pytest.raises(InputError, match="--sample-steps: 0"):
        check_sampler_args(steps=0, flags={"steps": "--sample-steps"})


def test_resolve_dtype():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("fp16") is torch.float16 and resolve_dtype("fp32") is torch.float32
    assert resolve_dtype(None, "cpu") is torch.float32 and resolve_dtype(None, "cuda") is torch.float16
    with pytest.raises(InputError, match="--dtype: 'int8'"):
        resolve_dtype("int8")


# --- prompts -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from suti.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer()


def test_prompt_truncation_uses_the_real_token_count(tokenizer, caplog):
    short = "a photo of a sks dog"
    assert check_prompt(tokenizer, short, identifier="sks") == len(tokenizer(short).input_ids) == 8
    assert not caplog.records
    with pytest.raises(PromptTruncatedError, match="cuts the identifier 'sks'"):
        check_prompt(tokenizer, LONG_WITH_ID_AT_END.format(V="sks", **{"class": "dog"}), identifier="sks")
    with caplog.at_level(logging.WARNING, logger="suti.sampling"):
        n = check_prompt(tokenizer, LONG_WITH_ID_FIRST.replace("{V}", "sks").replace("{class}", "dog"), identifier="sks")
    assert n > 77
    assert "more than the text encoder's 77" in caplog.text and "the end is ignored" in caplog.text
    # exactly 77 tokens fits: no warning
    caplog.clear()
    words = ["dog"] * 75
    assert check_prompt(tokenizer, " ".join(words)) == 77 and not caplog.records
    with pytest.raises(PromptTruncatedError, match="78 tokens"):  # one token too many, and it is the identifier
        check_prompt(tokenizer, " ".join(words + ["sks"]), identifier="sks")


# --- fixtures: a tiny full expert and a tiny apprentice -------------------------------------------


@pytest.fixture(scope="module")
def expert_dir(suti_cache, tmp_path_factory) -> Path:
    from experts.expert import ExpertInfo
    from suti.models import load_pipeline

    folder = tmp_path_factory.mktemp("expert") / "sks-dog"
    load_pipeline("tiny").save_pretrained(str(folder / "pipeline"), safe_serialization=True)
    ExpertInfo(identifier="sks", class_noun="dog", base_model="tiny", recipe="dreambooth", kind="full", steps=0, seed=0, resolution=32,
               instance_prompt="a sks dog", weights="pipeline").write(folder)
    return folder


@pytest.fixture(scope="module")
def apprentice_dir(suti_cache, tmp_path_factory) -> Path:
    from apprentice import ApprenticePipeline
    from suti.models import load_pipeline

    folder = tmp_path_factory.mktemp("apprentice") / "app"
    app = ApprenticePipeline.from_base(load_pipeline("tiny"))
    with torch.no_grad():  # a non-zero adapter, so demonstrations change the output
        for p in app.adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    app.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture()
def demo_png(tmp_path) -> Path:
    path = tmp_path / "demo.png"
    Image.new("RGB", (40, 40), (200, 60, 30)).save(path)
    return path


# --- the CLI --------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,value,message", [
    ("--steps", "0", "--steps: must be a whole number from 1 to 1000, got 0"),  # refused while parsing (suti.checks kinds)
    ("--guidance-scale", "nan", "--guidance-scale: must be a finite number in [0, 50], got nan"),
    ("--seed", "-1", "--seed: must be a whole number from 0 to 9223372036854775807, got -1"),
    ("--num-images", "0", "--num-images: must be a whole number from 1 to 256, got 0"),
    ("--height", "20", "--height: 20 is not a multiple of 8"),  # a whole number in range: refused by check_sampler_args
    ("--sample-batch-size", "0", "--sample-batch-size: must be a whole number from 1 to 256, got 0"),
])
def test_cli_samplers_refuse_bad_numbers_with_one_line(flag, value, message, tmp_path, demo_png, capsys):
    # checked before anything is loaded: the expert and apprentice folders need not exist
    runs = [
        ["expert", "sample", "--expert", str(tmp_path / "none"), "--prompt", "a {V} {class}", "--output", str(tmp_path / "o1")],
        ["apprentice", "sample", "--apprentice", str(tmp_path / "none"), "--demos", str(demo_png), "--prompt", "a cup", "--output", str(tmp_path / "o2")],
    ]
    for argv in runs:
        assert exit_code(argv + [flag, value]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert exit_code(["apprentice", "sample", "--apprentice", "x", "--demos", str(demo_png), "--prompt", "a", "--output", str(tmp_path / "o3"), "--demo-guidance-scale", "inf"]) == 2
    assert "--demo-guidance-scale: must be a finite number in [0, 50], got inf" in capsys.readouterr().err


def test_expert_sample_long_prompt_that_cuts_the_identifier_exits_2(expert_dir, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    assert main(["expert", "sample", "--expert", str(expert_dir), "--prompt", LONG_WITH_ID_AT_END, "--num-images", "1", "--output", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "cuts the identifier 'sks'" in err and "Traceback" not in err
    assert not out.exists()
    with caplog.at_level(logging.WARNING, logger="suti.sampling"):
        assert main(["expert", "sample", "--expert", str(expert_dir), "--prompt", LONG_WITH_ID_FIRST, "--num-images", "1", "--output", str(out), "--steps", "1"]) == 0
    assert "the end is ignored" in caplog.text
    assert len(list(out.glob("*.png"))) == 1


def test_truncation_warning_shows_on_the_command_line(apprentice_dir, demo_png, tmp_path):
    """The warning reaches the terminal (library logging is silenced while loading models)."""
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "SUTI_CACHE": str(Path(__import__("os").environ.get("SUTI_CACHE", tmp_path)))}
    proc = subprocess.run([sys.executable, "-m", "orchestration.cli", "apprentice", "sample", "--apprentice", str(apprentice_dir), "--demos", str(demo_png),
                           "--prompt", SCENE, "--num-images", "1", "--steps", "1", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--prompt:" in proc.stderr and "more than the text encoder's 77; the end is ignored" in proc.stderr


# --- the Python pipeline --------------------------------------------------------------------------


def test_apprentice_pipeline_call_validates(apprentice_dir):
    from apprentice.sample import load_apprentice

    app = load_apprentice(str(apprentice_dir), device="cpu")
    demos = [Image.new("RGB", (32, 32), (90, 30 * i, 10)) for i in range(2)]
    for kwargs, message in [(dict(num_inference_steps=0), "steps: 0"), (dict(guidance_scale=math.nan), "not a finite number"),
                            (dict(num_images=0), "num_images: 0"), (dict(height=12), "height: 12")]:
        with pytest.raises(InputError, match=message):
            app("a cup", demo_images=demos, **kwargs)


def test_sample_functions_validate_before_loading(tmp_path, demo_png):
    from apprentice.sample import sample_apprentice
    from experts.sample import sample_expert

    with pytest.raises(InputError, match="--steps: 0"):
        sample_expert(tmp_path / "missing", "a {V}", 1, tmp_path / "o", steps=0)
    with pytest.raises(InputError, match="--guidance-scale: nan"):
        sample_apprentice("missing", [str(demo_png)], "a cup", 1, tmp_path / "o", guidance_scale=float("nan"))


# --- dtype and size -------------------------------------------------------------------------------


def test_bf16_sampling_returns_images(apprentice_dir, expert_dir, demo_png, tmp_path):
    from apprentice.sample import load_apprentice

    app = load_apprentice(str(apprentice_dir), device="cpu", dtype="bf16")
    assert app.unet.dtype == torch.bfloat16 and app.adapter.dtype == torch.bfloat16
    out = app("a cup", demo_images=[Image.open(demo_png)], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out.float()).all()
    assert main(["expert", "sample", "--expert", str(expert_dir), "--prompt", "a {V} {class}", "--num-images", "2", "--steps", "2", "--dtype", "bf16", "--output", str(tmp_path / "e")]) == 0
    images = [Image.open(p) for p in sorted((tmp_path / "e").glob("*.png"))]
    assert len(images) == 2 and all(im.size == (32, 32) for im in images)
    assert main(["apprentice", "sample", "--apprentice", str(apprentice_dir), "--demos", str(demo_png), "--prompt", "a cup", "--num-images", "1", "--steps", "2", "--dtype", "bf16", "--output", str(tmp_path / "a")]) == 0
    assert Image.open(tmp_path / "a" / "image_000.png").size == (32, 32)


def test_apprentice_renders_at_its_trained_resolution_unless_told(apprentice_dir, demo_png, tmp_path):
    import json
    import shutil

    from apprentice.sample import load_apprentice

    folder = tmp_path / "app16"
    shutil.copytree(apprentice_dir, folder)
    (folder / "training.json").write_text(json.dumps({"config": {"resolution": 16}}))
    app = load_apprentice(str(folder), device="cpu")
    assert app.resolution == 16
    out = app("a cup", demo_images=[Image.open(demo_png)], num_inference_steps=1, output_type="pt").images
    assert out.shape[-2:] == (16, 16)
    assert main(["apprentice", "sample", "--apprentice", str(folder), "--demos", str(demo_png), "--prompt", "a cup", "--num-images", "1", "--steps", "1",
                 "--height", "24", "--width", "40", "--output", str(tmp_path / "o")]) == 0
    assert Image.open(tmp_path / "o" / "image_000.png").size == (40, 24)  # PIL: (width, height)


# --- HTTP (serving.generation) and the generation job ---------------------------------------------


def test_http_generation_checks_numbers_and_identifier_cuts(expert_dir, tmp_path):
    import asyncio

    from serving import Settings
    from serving.generation import GenerationService
    from serving.limits import ApiError

    settings = Settings(data_dir=tmp_path, max_steps=50, preload=False, device="cpu")
    service = GenerationService(settings)
    try:
        for kwargs, message in [(dict(guidance_scale=float("nan")), "guidance_scale: nan is not a finite number"),
                                (dict(steps=0), "steps: 0 is out of range"), (dict(steps=51), "steps: 51 is out of range; give an integer from 1 to 50"),
                                (dict(seed=-5), "seed: -5")]:
            args = dict(num_images=1, steps=2, guidance_scale=5.0, seed=0) | kwargs
            with pytest.raises(ApiError) as err:
                service.expert_work(expert_dir, "a {V} {class}", **args)
            assert err.value.status == 400 and message in err.value.message
            with pytest.raises(ApiError) as err:
                service.apprentice_work([], None, "a cup", demo_guidance_scale=2.0, **args)
            assert err.value.status == 400 and message in err.value.message
        work = service.expert_work(expert_dir, LONG_WITH_ID_AT_END, 1, 1, 5.0, 0)
        with pytest.raises(ApiError) as err:
            asyncio.run(service.submit(work))
        assert err.value.status == 400 and "cuts the identifier 'sks'" in err.value.message
    finally:
        service.shutdown()


def test_generation_job_config_validates():
    from generation.job import GenerateConfig

    base = dict(clusters="c.jsonl", crawl="crawl", output="out")
    for kwargs, message in [(dict(sample_steps=0), "--sample-steps must be a whole number from 1 to 1000, got 0"),
                            (dict(guidance_scale=float("nan")), r"--guidance-scale must be a finite number in \[0, 50\], got nan"),
                            (dict(samples_per_prompt=0), "--samples-per-prompt must be a whole number from 1 to 256, got 0"),
                            (dict(seed=-1), "--seed must be a whole number from 0 to 9223372036854775807, got -1"), (dict(dtype="fp8"), "--dtype")]:
        with pytest.raises(InputError, match=message):
            GenerateConfig(**base, **kwargs)
    assert GenerateConfig(**base, dtype="bf16").expert_job("cpu").dtype == "bf16"
    assert exit_code(["generate", "--clusters", "c.jsonl", "--crawl", "x", "--output", "o", "--sample-steps", "0"]) == 2


def test_eval_validates_before_generating(tmp_path, capsys):
    assert exit_code(["eval", "--dataset", str(tmp_path / "none"), "--method", "base", "--output", str(tmp_path / "o"), "--sample-steps", "0"]) == 2
    assert "--sample-steps: must be a whole number from 1 to 1000, got 0" in capsys.readouterr().err
    assert exit_code(["eval", "--dataset", str(tmp_path / "none"), "--method", "base", "--output", str(tmp_path / "o"), "--guidance-scale", "inf"]) == 2
    assert "--guidance-scale: must be a finite number in [0, 50], got inf" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- demonstration keys/values shared across guidance branches ------------------------------------


@pytest.mark.parametrize("method", ["attention", "reference"])
def test_shared_demo_keys_values_match_the_repeated_ones_and_hold_less(method):
    from apprentice import ApprenticePipeline, DemoContext
    from suti.models import load_pipeline

    app = ApprenticePipeline.from_base(load_pipeline("tiny"), method=method)
    with torch.no_grad():
        for p in app.adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ctx = app.encode_demonstrations([Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)) for i in range(3)])
    batch = 6  # 3 guidance branches x 2 images
    shared = ctx.repeat(batch)
    repeated = DemoContext(num_demos=ctx.num_demos, kv={k: (a.repeat(batch, 1, 1, 1), b.repeat(batch, 1, 1, 1)) for k, (a, b) in ctx.kv.items()})
    mask = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # the no-demonstration branch
    shared.mask, repeated.mask = mask, mask
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    emb = torch.randn(batch, 77, 32, generator=g)
    with torch.no_grad():
        new = app.unet(x, 500, emb, cross_attention_kwargs={"demo": shared}).sample
        old = app.unet(x, 500, emb, cross_attention_kwargs={"demo": repeated}).sample
        plain = app.unet(x, 500, emb, cross_attention_kwargs={"demo": None}).sample
    torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(new[2:], plain[2:], atol=1e-4), "the demonstrations change the output"
    torch.testing.assert_close(new[:2], plain[:2], atol=1e-5, rtol=1e-5)  # masked rows see no demos
    assert shared.cache_bytes() == ctx.cache_bytes() > 0
    assert repeated.cache_bytes() == batch * ctx.cache_bytes()


def test_expert_training_refuses_a_validation_prompt_whose_cut_loses_the_identifier(instance_dir, tmp_path):
    from experts.recipe import resolve_config
    from experts.train import train_expert

    config = resolve_config("dreambooth", dict(model="tiny", instance_dir=str(instance_dir), class_noun="dog", steps=1, prior_preservation=False,
                                               validation_prompt=LONG_WITH_ID_AT_END, identifier="sks"))
    with pytest.raises(PromptTruncatedError, match="--validation-prompt: .* cuts the identifier 'sks'"):
        train_expert(config, tmp_path / "expert", progress=False)
    assert not (tmp_path / "expert" / "expert.json").exists()


def test_http_refuses_non_finite_guidance_saying_so(tmp_path):
    import io

    from fastapi.testclient import TestClient

    from serving import Settings, create_app

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    with TestClient(create_app(Settings(data_dir=tmp_path, preload=False, device="cpu"))) as client:
        for field in ("guidance_scale", "demo_guidance_scale"):
            for value in ("nan", "inf", "-inf"):
                r = client.post("/v1/generate", files=[("images", ("a.png", buf.getvalue(), "image/png"))], data={"prompt": "a cup", field: value})
                assert r.status_code == 422 and r.json()["error"] == f"{field}: Input should be a finite number"
        r = client.post("/v1/experts/" + "0" * 32 + "/generate", data={"prompt": "a {V}", "guidance_scale": "nan"})
        assert r.status_code == 422 and "guidance_scale: Input should be a finite number" in r.json()["error"]


def test_http_reports_a_truncated_prompt_in_a_header(tmp_path, apprentice_dir, demo_png):
    from fastapi.testclient import TestClient

    from serving import Settings, create_app

    prompt = "a cup" + ", a" * 80  # 245 characters (under the 300 limit), 164 tokens
    settings = Settings(data_dir=tmp_path, apprentice=str(apprentice_dir), preload=False, device="cpu", default_steps=1)
    with TestClient(create_app(settings)) as client:
        photo = [("images", ("d.png", demo_png.read_bytes(), "image/png"))]
        r = client.post("/v1/generate", files=photo, data={"prompt": prompt})
        assert r.status_code == 200 and r.headers["X-Prompt-Truncated"] == "164 tokens, the text encoder reads 77"
        r = client.post("/v1/generate", files=photo, data={"prompt": "a cup"})
        assert r.status_code == 200 and "X-Prompt-Truncated" not in r.headers


# --- batches: sample_batch_size images per pipeline call, each from its own seed ------------------
# A batch gives image i the initial noise of its own seed, so it is the image of one call per seed
# up to the float rounding of batched kernels (a latent differs by ~1e-5: a pixel by at most one
# level here and there). Different seeds differ by far more than that.


def _pixels(data) -> "torch.Tensor":
    import io

    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB")
    return torch.tensor(list(image.getdata()), dtype=torch.int32)


def _same_image(a, b, levels: int = 1) -> bool:
    return int((_pixels(a) - _pixels(b)).abs().max()) <= levels


def _folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.png"))}


def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _same_folders(a: dict, b: dict, levels: int = 1) -> bool:
    return a.keys() == b.keys() and all(_same_image(a[k], b[k], levels) for k in a)


def test_expert_and_apprentice_sample_give_the_same_images_whatever_the_batch(expert_dir, apprentice_dir, demo_png, tmp_path):
    from apprentice.sample import load_apprentice
    from experts.expert import load_expert

    common = ["--num-images", "3", "--steps", "2", "--seed", "5"]
    for batch in ("1", "2", "3"):
        assert main(["expert", "sample", "--expert", str(expert_dir), "--prompt", "a {V} {class}", *common, "--sample-batch-size", batch, "--output", str(tmp_path / f"e{batch}")]) == 0
        assert main(["apprentice", "sample", "--apprentice", str(apprentice_dir), "--demos", str(demo_png), "--prompt", "a cup", *common, "--sample-batch-size", batch, "--output", str(tmp_path / f"a{batch}")]) == 0
    expert, app = _folder(tmp_path / "e1"), _folder(tmp_path / "a1")
    assert len(expert) == 3 and not _same_image(expert["image_000.png"], expert["image_001.png"], levels=20)
    assert not _same_image(app["image_000.png"], app["image_001.png"], levels=20)
    assert _same_folders(_folder(tmp_path / "e2"), expert) and _same_folders(_folder(tmp_path / "e3"), expert)
    assert _same_folders(_folder(tmp_path / "a2"), app) and _same_folders(_folder(tmp_path / "a3"), app)
    # image i is the image of one call with the seed 5 + i, as before batching
    pipe = load_expert(expert_dir, device="cpu")
    alone = pipe("a sks dog", height=32, width=32, num_inference_steps=2, guidance_scale=7.5, generator=torch.Generator().manual_seed(7)).images[0]
    assert _png(alone) == expert["image_002.png"]  # batch 1: the very same call
    assert _same_image(_png(alone), _folder(tmp_path / "e3")["image_002.png"])
    ap = load_apprentice(str(apprentice_dir), device="cpu")
    alone = ap("a cup", demo_images=[Image.open(demo_png).convert("RGB")], num_inference_steps=2, generator=torch.Generator().manual_seed(6)).images[0]
    assert _same_image(_png(alone), _folder(tmp_path / "a3")["image_001.png"])
    with pytest.raises(InputError, match="2 generators for 3 images"):
        ap("a cup", num_images=3, num_inference_steps=1, generator=[torch.Generator(), torch.Generator()])


def test_class_images_are_made_in_batches_and_do_not_depend_on_them(suti_cache):
    import shutil

    from experts.data import class_images_folder, ensure_class_images
    from suti.models import load_pipeline

    pipe = load_pipeline("tiny")
    made = {}
    for batch in (1, 3):
        shutil.rmtree(class_images_folder("tiny", "a batched cup", 32, 0, 2), ignore_errors=True)
        calls = []
        real = pipe.__class__.__call__
        pipe.__class__.__call__ = lambda self, prompt, **kw: calls.append(len(prompt)) or real(self, prompt, **kw)
        try:
            paths = ensure_class_images(pipe, "tiny", "a batched cup", 4, 32, 0, 2, sample_batch_size=batch)
        finally:
            pipe.__class__.__call__ = real
        made[batch] = [p.read_bytes() for p in paths]
        assert calls == ([1, 1, 1, 1] if batch == 1 else [3, 1])
    assert all(_same_image(a, b) for a, b in zip(made[1], made[3]))
    assert not _same_image(made[1][0], made[1][1], levels=20)


def test_generation_candidates_are_made_in_batches_and_do_not_depend_on_them(tmp_path, monkeypatch):
    import dataclasses

    from generation import resident, task as expert_task
    from generation.config import ExpertJob

    demos = [Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)) for i in range(3)]
    cluster = {"cluster_id": "c0", "keys": ["k0", "k1", "k2"], "captions": [], "class_noun": "cup",
               "prompts": [{"prompt": "a {S} in a city"}, {"prompt": "a {S} on the moon"}]}
    job = ExpertJob(model="tiny", recipe="suti-expert", steps=1, seed=0, samples_per_prompt=2, prompts_per_cluster=None, sample_steps=2,
                    guidance_scale=7.5, scorer="toy-clip", lambda_=-10.0, output=str(tmp_path / "o"), device="cpu")
    from suti import sampling

    calls, original = [], sampling.seeded_generators

    def spy(seeds):
        calls.append(list(seeds))
        return original(seeds)

    monkeypatch.setattr(sampling, "seeded_generators", spy)
    out = {b: expert_task.run_cluster(cluster, demos, dataclasses.replace(job, sample_batch_size=b)) for b in (1, 3)}
    seed = expert_task.cluster_seed("c0", 0)
    assert calls == [[seed], [seed + 1], [seed + 1000], [seed + 1001], [seed, seed + 1, seed + 1000], [seed + 1001]]
    assert out[1]["num_candidates"] == 4 and out[1]["kept"] == out[3]["kept"]
    images = {b: {name: data for name, data in out[b]["members"] if name.endswith(".target.jpg")} for b in out}
    assert len(images[1]) == 4 and images[1].keys() == images[3].keys()
    def mean_diff(x, y):
        return float((_pixels(x) - _pixels(y)).abs().float().mean())

    # JPEG turns a one-level change into a few levels at a few pixels: compare the mean difference
    assert all(mean_diff(images[1][k], images[3][k]) < 0.5 for k in images[1])
    first, *others = images[1].values()
    assert all(mean_diff(first, o) > 5 for o in others)
    assert out[1]["delta_clip"] == pytest.approx(out[3]["delta_clip"], abs=1e-3)


def test_eval_images_do_not_depend_on_the_batch(tmp_path):
    args = ["eval", "--dataset", "world:1", "--method", "base", "--model", "tiny", "--clip", "toy-clip", "--dino", "toy-identity", "--prompts", "2", "--images-per-prompt", "3", "--sample-steps", "2"]
    for batch in ("1", "2"):
        assert main([*args, "--output", str(tmp_path / batch), "--sample-batch-size", batch]) == 0
    one = {str(p.relative_to(tmp_path / "1")): p.read_bytes() for p in (tmp_path / "1" / "images").rglob("*.png")}
    two = {str(p.relative_to(tmp_path / "2")): p.read_bytes() for p in (tmp_path / "2" / "images").rglob("*.png")}
    assert len(one) == 6 and _same_folders(one, two)
    assert not (tmp_path / "3").exists()
    assert exit_code([*args, "--output", str(tmp_path / "3"), "--sample-batch-size", "0"]) == 2
    assert not (tmp_path / "3").exists()


@pytest.mark.parametrize("resident", [False, True], ids=["per-task", "resident"])
def test_keep_experts_uploads_a_loadable_expert_and_only_kept_experts_log(tmp_path, monkeypatch, resident):
    """``--keep-experts`` puts each expert (weights, config, TensorBoard logs) under
    OUTPUT/experts/<cluster>; without it the expert's folder is temporary, so it trains with no
    tracker (no TensorBoard writer per expert) and nothing reaches OUTPUT/experts."""
    from experts import load_expert
    from experts import train as expert_train
    import dataclasses

    from generation import resident, task as expert_task
    from generation.config import ExpertJob

    trackers, original = [], expert_train.train_expert
    monkeypatch.setattr(expert_train, "train_expert", lambda config, *a, **kw: trackers.append(config.report_to) or original(config, *a, **kw))
    demos = [Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)) for i in range(3)]
    cluster = {"cluster_id": "c0", "keys": ["k0", "k1", "k2"], "captions": [], "class_noun": "cup", "prompts": [{"prompt": "a {S} in a city"}]}
    job = ExpertJob(model="tiny", recipe="suti-expert", steps=1, seed=0, samples_per_prompt=1, prompts_per_cluster=None, sample_steps=2,
                    guidance_scale=7.5, scorer="toy-clip", lambda_=-10.0, device="cpu", recipe_overrides={"lora_rank": 2}, output="")
    worker = resident.ResidentExpertWorker(job) if resident else None
    for keep in (False, True):
        out = tmp_path / f"keep-{keep}"
        settings = dataclasses.replace(job, output=str(out), keep_experts=keep)
        if worker:
            worker.job = settings
        result = worker.run(cluster, demos) if worker else expert_task.run_cluster(cluster, demos, settings)
        assert result["status"] == "accepted"
        assert (out / "experts" / "c0").is_dir() == keep
    assert trackers == ["none", "tensorboard"]
    kept = out / "experts" / "c0"
    assert any((kept / "logs").rglob("events.out.tfevents.*"))
    assert load_expert(kept).unet is not None
