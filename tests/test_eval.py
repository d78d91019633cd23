"""Evaluation: metrics on hand-made cases, prompt parsing, bad datasets, determinism and resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from orchestration.cli import main
from suti.errors import InputError
from orchestration.eval.dataset import load_dataset, parse_prompts_and_classes
from orchestration.eval.metrics import diversity, mean_cosine_to_set, paired_cosine
from conftest import draw_subject

PROMPTS = """Classes

subject_name,class
star,toy
other_star,toy

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""


def make_bench(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts_and_classes.txt").write_text(PROMPTS)
    for name, offset in (("star", 0), ("other_star", 10)):
        (root / name).mkdir()
        for i in range(3):
            draw_subject(offset + i).save(root / name / f"{i:02d}.jpg")
    return root


def test_identical_embeddings_give_one_orthogonal_give_zero():
    e = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    assert torch.allclose(mean_cosine_to_set(e[:1], e[:1]), torch.ones(1))
    assert torch.allclose(paired_cosine(e, e), torch.ones(4))
    basis = torch.eye(4)
    assert torch.allclose(mean_cosine_to_set(basis[:1], basis[1:]), torch.zeros(1))
    assert diversity(torch.stack([e[0], e[0]])) == pytest.approx(0.0, abs=1e-6)
    assert diversity(basis) == pytest.approx(1.0)
    # exclude_self: each photo against the other photos only
    assert torch.allclose(mean_cosine_to_set(basis, basis, exclude_self=True), torch.zeros(4))


def test_prompt_template_parsing(dreambench):
    classes, objects, live = parse_prompts_and_classes(dreambench / "prompts_and_classes.txt")
    assert classes["dog"] == "dog" and classes["bear_plushie"] == "stuffed animal"
    assert len(objects) == 25 and len(live) == 25
    assert objects[0] == "a {V} {class} in the jungle"
    assert "a {V} {class} wearing a red hat" in live and "a {V} {class} wearing a red hat" not in objects


def test_parsing_a_made_dataset(tmp_path):
    ds = load_dataset(make_bench(tmp_path / "bench"))
    assert [s.name for s in ds.subjects] == ["other_star", "star"]
    assert ds.object_prompts == ["a {V} {class} in the jungle", "a {V} {class} in the snow", "a red {V} {class}"]


def test_missing_subject_folder_and_bad_image(tmp_path):
    root = make_bench(tmp_path / "bench")
    shutil.rmtree(root / "star")
    with pytest.raises(InputError, match=r"star: missing subject folder"):
        load_dataset(root)
    root = make_bench(tmp_path / "bench2")
    (root / "star" / "03.jpg").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"03\.jpg"):
        load_dataset(root)
    with pytest.raises(InputError, match="not listed"):
        load_dataset(make_bench(tmp_path / "bench3"), ["nope"])


def test_bad_prompt_line_names_the_line(tmp_path):
    root = make_bench(tmp_path / "bench")
    (root / "prompts_and_classes.txt").write_text(PROMPTS.replace("'a red {0} {1}'.format(unique_token, class_token)", "oops"))
    with pytest.raises(InputError, match=r"prompts_and_classes.txt:\d+"):
        load_dataset(root)


def _eval(root, out, method, *extra):
    sampling = ["--prompts", "2", "--images-per-prompt", "1", "--sample-steps", "2"] if method != "real" else []  # real samples nothing
    return main(["eval", "--dataset", str(root), "--method", method, *(["--model", "tiny"] if method in ("base", "expert") else []), "--output", str(out),
                 "--clip", "toy-clip", "--dino", "toy-identity", *sampling, *extra])


def test_real_and_base_tables_are_written_deterministic_and_resumable(tmp_path, capsys):
    root = make_bench(tmp_path / "bench")
    assert _eval(root, tmp_path / "real", "real") == 0
    per_subject = json.loads((tmp_path / "real" / "per_subject.json").read_text())
    assert {r["subject"] for r in per_subject} == {"star", "other_star"}
    for key in ("DINO", "CLIP-I", "CLIP-T"):
        assert key in per_subject[0]
    assert _eval(root, tmp_path / "base", "base") == 0
    first = json.loads((tmp_path / "base" / "overall.json").read_text())
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "base" / "images").rglob("*.png")}
    assert len(stamps) == 4
    capsys.readouterr()
    assert _eval(root, tmp_path / "base", "base") == 0
    assert "generated 0 new images" in capsys.readouterr().out
    assert json.loads((tmp_path / "base" / "overall.json").read_text()) == first
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "base" / "images").rglob("*.png")} == stamps
    assert (tmp_path / "base" / "per_image.csv").is_file() and (tmp_path / "base" / "grids" / "star.png").is_file()
    settings = json.loads((tmp_path / "base" / "settings.json").read_text())
    assert settings["backbones"] == {"clip": "toy-clip", "dino": "toy-identity"}

    def strict(text):  # JSON has no NaN/Infinity: an undefined metric (DIV of one image per prompt) is null
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON output"))

    for name in ("overall", "per_subject", "per_image"):
        strict((tmp_path / "base" / f"{name}.json").read_text())
    assert _eval(root, tmp_path / "base", "base") == 0
    printed = strict(capsys.readouterr().out.strip().splitlines()[-1])
    assert "DIV" in printed and (printed["DIV"] is None or printed["DIV"] == printed["DIV"])


def test_world_dataset_is_scored_by_the_probe(tmp_path, capsys):
    """``--dataset world:N``: real photos of held-out world subjects get the probe's exact
    identity, attribute share and class numbers, and they read as their subjects."""
    out = tmp_path / "world"
    assert main(["eval", "--dataset", "world:2", "--method", "real", "--output", str(out), "--clip", "toy-clip", "--dino", "toy-identity"]) == 0
    (overall,) = json.loads((out / "overall.json").read_text())  # one row
    for key in ("probe_identity", "probe_attributes", "probe_class"):
        assert 0.0 <= overall[key] <= 1.0, key
    assert overall["probe_attributes"] >= overall["probe_identity"]
    assert overall["probe_class"] > 0.9 and overall["probe_attributes"] > 0.8, overall
    assert "probe_attributes" in capsys.readouterr().out


def test_a_subject_named_twice_counts_once(tmp_path, caplog):
    root = make_bench(tmp_path / "bench")
    names = [s.name for s in load_dataset(root).subjects]
    with caplog.at_level("WARNING"):
        ds = load_dataset(root, [names[0], names[0], " ", names[-1]])
    assert [s.name for s in ds.subjects] == [names[0], names[-1]]
    assert any("each subject counts once" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("spec", ["world:abc", "world:0", "world:-3", "world:"])
def test_a_bad_world_dataset_size_is_one_line_and_writes_nothing(tmp_path, capsys, spec):
    assert main(["eval", "--dataset", spec, "--method", "base", "--model", "tiny", "--output", str(tmp_path / "e"), "--prompts", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--dataset {spec}" in err[0] and "whole number" in err[0], err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("flag", ["--clip", "--dino"])
def test_an_unknown_scorer_is_refused_naming_its_flag_before_the_dataset_is_written(tmp_path, capsys, flag):
    assert main(["eval", "--dataset", "world:1", "--method", "base", "--model", "tiny", "--output", str(tmp_path / "e"), "--prompts", "1", flag, "bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} 'bogus'" in err[0], err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("method, extra, flag", [("apprentice", ["--model", "tiny"], "--model tiny"), ("real", ["--model", "tiny"], "--model tiny"),
                                                 ("base", ["--num-demos", "2"], "--num-demos 2"), ("expert", ["--apprentice", "toy"], "--apprentice toy"),
                                                 ("apprentice", ["--expert-steps", "5"], "--expert-steps 5"), ("base", ["--recipe", "dreambooth-lora"], "--recipe dreambooth-lora"),
                                                 ("real", ["--sample-steps", "5"], "--sample-steps 5"), ("real", ["--guidance-scale", "9"], "--guidance-scale 9.0"),
                                                 ("real", ["--images-per-prompt", "2"], "--images-per-prompt 2"), ("real", ["--dtype", "bf16"], "--dtype bf16")])
def test_a_flag_the_method_does_not_read_is_refused_not_ignored(tmp_path, capsys, method, extra, flag):
    """e.g. ``--model`` with ``--method apprentice`` was silently ignored (the apprentice folder
    carries its base), and ``real`` (the photos themselves) ignored every sampling flag: now one
    line naming the flag, exit 2, nothing written."""
    assert main(["eval", "--dataset", "world:1", "--method", method, *extra, "--output", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and f"--method {method} does not read it" in err[0], err
    assert not (tmp_path / "e").exists()
