"""Bad input refused before anything is written or started: a misspelt --model in every command
that loads one, expert settings and a missing crawl in `suti generate`, and an object-store URI
given to a command that only writes local files (never a local folder named ``s3:``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from orchestration.cli import main
from suti.errors import InputError
from suti.models import check_model


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_check_model_knows_presets_folders_and_hub_ids(tmp_path, monkeypatch):
    for preset in ("tiny", "toy", "sd15-arch", "tiny-sdxl"):
        check_model(preset)
    with pytest.raises(InputError, match=r"--model 'tyni': not a preset \(.*toy.*\), an existing diffusers folder or a hub id"):
        check_model("tyni")
    with pytest.raises(InputError, match="memory://models/sd15: no diffusers pipeline folder there"):
        check_model("memory://models/sd15")  # a URI is a folder on storage (tests/test_remote_artifacts.py loads one from S3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a diffusers pipeline folder"):
        check_model(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="not in the local hub cache"):
        check_model("someone/not-cached")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    check_model("someone/not-cached")  # online: the load itself will tell


@pytest.fixture()
def job_inputs(tmp_path) -> tuple[Path, Path]:
    crawl = tmp_path / "crawl"
    (crawl / "images").mkdir(parents=True)
    clusters = tmp_path / "clusters.jsonl"
    clusters.write_text(json.dumps({"cluster_id": "c0", "keys": ["k0"], "prompts": ["a {S}"], "class_noun": "cup"}) + "\n")
    return clusters, crawl


@pytest.mark.parametrize("extra,message", [
    (["--model", "tyni"], "--model 'tyni': not a preset"),
    (["--steps", "0"], "--steps: must be a whole number from 1 to 10000000, got 0"),
    (["--steps", "-3"], "--steps: must be a whole number from 1 to 10000000, got -3"),
    (["--lora-rank", "-1"], "--lora-rank: must be a whole number from 0 to 1024, got -1"),
    (["--sample-batch-size", "0"], "--sample-batch-size: must be a whole number from 1 to 256, got 0"),
    (["--crawl", "NOWHERE"], "no such crawl file or folder (--crawl)"),
])
def test_generate_refuses_before_writing_or_starting_ray(job_inputs, tmp_path, capsys, monkeypatch, extra, message):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not start"))
    clusters, crawl = job_inputs
    argv = ["generate", "--clusters", str(clusters), "--crawl", str(crawl), "--output", str(tmp_path / "job")]
    if extra[0] == "--crawl":
        argv[4] = str(tmp_path / extra[1])
        extra = []
    try:
        code = main(argv + extra)
    except SystemExit as exc:  # refused while parsing (suti.checks kinds)
        code = exc.code
    assert code == 2
    assert message in one_line(capsys)
    assert not (tmp_path / "job").exists()


def test_every_model_flag_refuses_a_misspelt_model_at_once(tmp_path, capsys, instance_dir):
    from suti.world import make_crawl

    make_crawl(tmp_path / "w", 2, 0.0, seed=1, shard_size=0)
    runs = [
        ["expert", "train", "--model", "tyni", "--instance-dir", str(instance_dir), "--class-noun", "cup", "--output", str(tmp_path / "e")],
        ["eval", "--dataset", "world:1", "--method", "base", "--model", "tyni", "--output", str(tmp_path / "v"), "--clip", "toy-clip", "--dino", "toy-identity"],
        ["apprentice", "train", "--shards", str(tmp_path / "none-*.tar"), "--model", "tyni", "--output", str(tmp_path / "a")],
        ["serve", "--model", "tyni", "--port", "18765", "--data-dir", str(tmp_path / "s")],
        ["mine", "--crawl", str(tmp_path / "w"), "--output", str(tmp_path / "m"), "--model", "tyni"],
    ]
    for argv in runs:
        started = time.perf_counter()
        assert main(argv) == 2, argv
        err = one_line(capsys)
        assert "'tyni'" in err and ("not a preset" in err or "not a model preset (" in err and "sd15-arch" in err), err
        assert time.perf_counter() - started < 30, "no hub retries"
    assert not any((tmp_path / d).exists() for d in ("e", "v", "a", "s", "m"))


@pytest.mark.parametrize("argv", [
    ["world", "make", "--output", "s3://bucket/crawl", "--subjects", "2"],
    ["expert", "sample", "--expert", "e", "--prompt", "a {V}", "--output", "s3://bucket/images"],
    ["expert", "train", "--instance-dir", "gs://bucket/photos", "--class-noun", "cup", "--output", "e"],
    ["apprentice", "sample", "--apprentice", "a", "--demos", "s3://bucket/d.png", "--prompt", "a cup", "--output", "o"],
    ["eval", "--dataset", "world:1", "--method", "real", "--output", "s3://bucket/eval"],
])
def test_local_only_commands_refuse_object_store_uris(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = one_line(capsys)
    assert "://" in err and "local files only" in err
    assert not any(tmp_path.iterdir()), "nothing written, no folder named s3: or gs:"


def test_local_model_and_recipe_paths_reach_workers_absolute(tmp_path, monkeypatch):
    """Ray workers have other working directories: a relative model folder or recipe file is made
    absolute on the driver; a preset name stays a name even beside a folder of that name."""
    from generation.job import GenerateConfig
    from suti.models import load_pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a folder model's real scorer is then fetched by the workers, not loaded here
    load_pipeline("tiny").save_pretrained("my-model")
    (tmp_path / "toy").mkdir()  # a folder named like a preset
    (tmp_path / "recipe.yaml").write_text("name: mine\nsteps: 3\nprior_preservation: false\nuse_class_noun: false\n")
    (tmp_path / "crawl").mkdir()
    config = GenerateConfig(clusters="c.jsonl", crawl="crawl", output="out", model="my-model", recipe="recipe.yaml").resolved()
    assert config.model == str(tmp_path / "my-model") and config.recipe == str(tmp_path / "recipe.yaml")
    assert config.crawl == str(tmp_path / "crawl") and config.output == str(tmp_path / "out")
    assert GenerateConfig(clusters="c.jsonl", crawl="crawl", output="out", model="toy").resolved().model == "toy"
    from serving.cli import settings_from_args
    from orchestration.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "my-model", "--apprentice", "toy"])
    settings = settings_from_args(args)
    assert settings.model == str(tmp_path / "my-model") and settings.apprentice == "toy"
    from suti.storage import absolute_if_local

    assert absolute_if_local("s3://bucket/model") == "s3://bucket/model"
    assert absolute_if_local("org/not-here") == "org/not-here" and absolute_if_local(None) is None
    assert absolute_if_local("recipe.yaml") == str(tmp_path / "recipe.yaml")


def test_mine_checks_its_model_before_reading_the_crawl(tmp_path, capsys, monkeypatch):
    import mining.crawl

    monkeypatch.setattr(mining.crawl, "iter_records", lambda *a, **k: pytest.fail("the crawl must not be read"))
    (tmp_path / "w").mkdir()
    assert main(["mine", "--crawl", str(tmp_path / "w"), "--output", str(tmp_path / "m"), "--model", "tyni"]) == 2
    assert "--model 'tyni': not a model preset" in one_line(capsys)
    assert not (tmp_path / "m").exists()


def test_demo_refuses_a_bad_model_before_any_stage_writes(tmp_path, capsys):
    assert main(["demo", "--model", "nope", "--output", str(tmp_path / "demo")]) == 2
    assert "--model 'nope': not a preset" in one_line(capsys)
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("argv, expected", [
    (["generate", "--clusters", "c", "--crawl", "w", "--output", "o", "--expert-batch-size", "abc"], "suti generate: error: argument --expert-batch-size: must be a whole number from 1 to 256, got 'abc' (see suti generate --help)"),
    (["expert", "train", "--steps", "1.5"], "suti expert train: error: argument --steps: must be a whole number from 1 to 10000000, got '1.5'"),
    (["world", "make", "--output", "w", "--bogus"], "suti: error: unrecognized arguments: --bogus"),
    (["mine"], "suti mine: error: the following arguments are required: --crawl"),
])
def test_usage_errors_are_one_line_with_exit_2(capsys, argv, expected):
    """A mistyped flag or value is one line naming it, not argparse's whole usage text."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and one_line(capsys).startswith(expected)


def test_apprentice_train_usage_errors_are_one_line():
    from apprentice.train_config import build_arg_parser

    with pytest.raises(SystemExit) as exc:
        build_arg_parser().parse_args(["--steps", "abc"])
    assert exc.value.code == 2


def test_eval_refuses_a_missing_apprentice_before_writing_its_dataset(tmp_path, capsys):
    assert main(["eval", "--method", "apprentice", "--apprentice", str(tmp_path / "nosuch"), "--dataset", "world:2", "--output", str(tmp_path / "ev")]) == 2
    assert "--apprentice" in one_line(capsys) and not (tmp_path / "ev").exists()


def test_apprentice_train_on_shards_with_no_usable_sample_leaves_no_output(tmp_path, capsys):
    """The first batch is drawn before logs/ is written: shards that yield nothing leave no
    output folder behind (the run made it)."""
    (tmp_path / "bad.tar").write_bytes(b"not a tar file")
    code = main(["apprentice", "train", "--model", "tiny", "--shards", str(tmp_path / "bad.tar"), "--output", str(tmp_path / "a"), "--steps", "1", "--batch-size", "1"])
    err = [line for line in capsys.readouterr().err.splitlines() if "suti: error:" in line]
    assert code == 2 and len(err) == 1 and "no usable training sample" in err[0], err
    assert not (tmp_path / "a").exists()
