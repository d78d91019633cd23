"""Issue 31 (A): the numbers of ``suti apprentice train``, ``suti generate``, ``suti mine`` and
``suti demo`` are checked by one kind each (:mod:`suti.checks`), the same from the command line
and from a config built without it; a refused run writes nothing; a warmup that outlasts the run
is logged."""

from __future__ import annotations

import logging
import math
import tarfile

import pytest

from conftest import exit_code
from suti.errors import InputError


def _shard(tmp_path):
    with tarfile.open(tmp_path / "shard-000000.tar", "w"):
        pass
    return str(tmp_path / "shard-*.tar")


def test_every_numeric_apprentice_setting_is_checked_without_the_command_line():
    """A config made by a Python caller (a benchmark, a notebook) refuses nan, inf and 2**64 in
    every numeric field, as the flags do."""
    import dataclasses

    from apprentice.train_config import ApprenticeTrainConfig, _apprentice_numbers

    numeric = [f.name for f in dataclasses.fields(ApprenticeTrainConfig) if str(f.type).replace(" ", "").split("|")[0] in ("int", "float", "list[float]")]
    assert set(numeric) == set(_apprentice_numbers()), "one kind per numeric field"
    unchecked = []
    for name in numeric:
        for bad in (float("nan"), float("inf"), -math.inf, 2**64):
            value = [bad] if name == "shard_weights" else bad
            try:
                ApprenticeTrainConfig(shards="x", output="y", **{name: value}).validate()
            except InputError:
                continue
            unchecked.append(f"{name}={bad}")
    assert not unchecked, f"ApprenticeTrainConfig accepts {unchecked}"
    ApprenticeTrainConfig(shards="x", output="y", min_delta_clip=-0.1, shard_weights=[3.0], seed=2**63 - 1).validate()


@pytest.mark.parametrize("flag, value, message", [
    ("--min-delta-clip", "nan", "--min-delta-clip: must be a finite number in [-2, 2], got nan"),
    ("--min-delta-clip", "3", "--min-delta-clip: must be a finite number in [-2, 2], got 3"),
    ("--seed", str(2**64), "--seed: must be a whole number from 0 to 9223372036854775807, got 18446744073709551616"),
    ("--learning-rate", "nan", "--learning-rate: must be a finite number in (0, 1], got nan"),
    ("--ema-decay", "1", "--ema-decay: must be a finite number in [0, 1), got 1"),
    ("--shard-weights", "inf", "--shard-weights: must be a finite number in [0, 1e+06], got inf"),
    ("--master-port", "70000", "--master-port: must be a whole number from 1 to 65535, got 70000"),
    ("--nproc", "0", "--nproc: must be a whole number from 1 to 1024, got 0"),
])
def test_apprentice_train_refuses_bad_numbers_while_parsing(tmp_path, capsys, flag, value, message):
    assert exit_code(["apprentice", "train", "--shards", _shard(tmp_path), "--output", str(tmp_path / "o"), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()
    if flag in ("--master-port", "--nproc"):  # the launcher's own flags
        return
    from apprentice.train import main

    with pytest.raises(SystemExit) as exc:  # python -m apprentice.train (the launched workers' entry point) parses the same
        main(["--shards", _shard(tmp_path), "--output", str(tmp_path / "o2"), flag, value])
    assert exc.value.code == 2 and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("config, message", [
    (dict(min_delta_clip=float("nan")), "--min-delta-clip must be a finite number in [-2, 2], got nan"),
    (dict(shard_weights=[1.0, 1.0]), "--shard-weights must be one weight per --shards pattern (1), got 1.0 1.0"),
    (dict(shard_weights=[0.0]), "--shard-weights must be not all 0, got 0.0"),
])
def test_a_refused_training_run_writes_nothing_so_the_next_run_starts(tmp_path, config, message):
    """Before: ``--min-delta-clip nan`` exited 2 only after writing ``OUTPUT/logs``, and the next,
    valid run was refused as "output folder is not empty"."""
    from apprentice.train import train_apprentice
    from apprentice.train_config import ApprenticeTrainConfig

    out = tmp_path / "app"
    with pytest.raises(InputError) as exc:
        train_apprentice(ApprenticeTrainConfig(shards=_shard(tmp_path), output=str(out), model="tiny", steps=1, **config), progress=False)
    assert message in str(exc.value)
    assert not out.exists(), "nothing written"


def test_a_weighted_pattern_that_matches_nothing_is_refused_before_writing(tmp_path):
    from apprentice.train import check_inputs
    from apprentice.train_config import ApprenticeTrainConfig

    config = ApprenticeTrainConfig(shards=[_shard(tmp_path), str(tmp_path / "none-*.tar")], output=str(tmp_path / "o"), model="tiny", shard_weights=[3.0, 1.0])
    with pytest.raises(InputError, match="none-"):
        check_inputs(config)
    config.shard_weights = [1.0, 0.0]  # a pattern of weight 0 is not read
    check_inputs(config)


def test_a_deepspeed_schedule_that_outlasts_the_run_is_logged_once(tmp_path, caplog):
    import json

    from apprentice.train import warn_about_schedule
    from apprentice.train_config import ApprenticeTrainConfig

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0}, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}))
    with caplog.at_level(logging.WARNING):
        warn_about_schedule(ApprenticeTrainConfig(shards="x", output="y", steps=3, deepspeed_config=str(ds)))
        warn_about_schedule(ApprenticeTrainConfig(shards="x", output="y", steps=30, deepspeed_config=str(ds)))
        warn_about_schedule(ApprenticeTrainConfig(shards="x", output="y", steps=3))  # the shipped configs have no schedule
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "warms up for 10 steps, not fewer than --steps 3" in lines[0]


def test_an_expert_warmup_that_outlasts_the_run_is_logged(caplog):
    from experts import resolve_config

    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # validated by the command and again by train_expert: one line
            resolve_config("dreambooth", {"model": "tiny", "instance_dir": ".", "class_noun": "dog", "steps": 3, "lr_warmup_steps": 17, "lr_scheduler": "linear"}).validate()
        resolve_config("dreambooth", {"model": "tiny", "instance_dir": ".", "class_noun": "dog", "steps": 30, "lr_warmup_steps": 17, "lr_scheduler": "linear"})
        resolve_config("dreambooth", {"model": "tiny", "instance_dir": ".", "class_noun": "dog", "steps": 3, "lr_warmup_steps": 19})
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2, lines
    assert "--lr-warmup-steps 17 is not below --steps 3" in lines[0] and "never reaches" in lines[0]
    assert "--lr-warmup-steps 19 has no effect with --lr-scheduler constant" in lines[1]


def test_every_numeric_generate_setting_is_checked_without_the_command_line():
    import dataclasses

    from generation.config import GenerateConfig, _generate_numbers

    numeric = [f.name for f in dataclasses.fields(GenerateConfig) if str(f.type).replace(" ", "").split("|")[0] in ("int", "float")]
    assert set(numeric) == set(_generate_numbers())
    unchecked = []
    for name in numeric:
        for bad in (float("nan"), float("inf"), 2**64, -1):
            try:
                GenerateConfig(clusters="c", crawl="w", output="o", **{name: bad})
            except InputError:
                continue
            if not (bad == -1 and name in ("lambda_",)):  # a negative lambda keeps more samples
                unchecked.append(f"{name}={bad}")
    assert not unchecked, f"GenerateConfig accepts {unchecked}"


def test_mine_checks_a_namespace_built_without_the_parser(tmp_path):
    import argparse

    from mining.cli import add_arguments, run_mine

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--crawl", str(tmp_path), "--output", str(tmp_path / "m")])
    args.min_image_sim = float("nan")
    with pytest.raises(InputError, match=r"--min-image-sim must be a finite number in \[-1, 1\], got nan"):
        run_mine(args)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("argv, message", [
    (["mine", "--crawl", "w", "--output", "m", "--dedup-threshold", "nan"], "--dedup-threshold: must be a finite number in [-1, 1], got nan"),
    (["mine", "--crawl", "w", "--output", "m", "--min-noun-support", "1.5"], "--min-noun-support: must be a finite number in [0, 1], got 1.5"),
    (["demo", "--apprentice-lr", "nan"], "--apprentice-lr: must be a finite number in (0, 1], got nan"),
    (["demo", "--noise-pages", "2"], "--noise-pages: must be a finite number in [0, 1], got 2"),
    (["apprentice", "pack-photos", "--clusters", "c", "--crawl", "w", "--output", "o", "--samples-per-shard", "0"], "--samples-per-shard: must be a whole number from 1 to 1000000, got 0"),
    (["generate", "--clusters", "c", "--crawl", "w", "--output", "o", "--lambda", "5"], "--lambda: must be a finite number in [-2, 2], got 5"),
])
def test_other_commands_refuse_bad_numbers_in_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not any(tmp_path.iterdir())


def test_the_largest_seed_trains_and_an_outlasting_schedule_warns_once(tmp_path, caplog):
    """``--seed 2**63 - 1`` (the largest :data:`suti.checks.SEED`) trains: every generator the run
    derives from it stays within torch's 64 bits. A DeepSpeed schedule that warms up past
    ``--steps`` is one warning line, and the run still trains."""
    import json

    from orchestration.cli import main
    from shard_util import world_shards

    shards = world_shards(tmp_path / "sh", num_subjects=2, per_subject=2)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0}, "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-4, "warmup_num_steps": 10}}}))
    with caplog.at_level(logging.WARNING):
        assert main(["apprentice", "train", "--shards", str(shards / "*.tar"), "--model", "tiny", "--batch-size", "2", "--freeze-base", "--resolution", "32",
                     "--steps", "2", "--seed", str(2**63 - 1), "--deepspeed-config", str(ds), "--output", str(tmp_path / "app")]) == 0
    assert sum("warms up for 10 steps, not fewer than --steps 2" in r.getMessage() for r in caplog.records) == 1
    assert json.loads((tmp_path / "app" / "training.json").read_text())["config"]["seed"] == 2**63 - 1
