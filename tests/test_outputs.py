"""Output folders: a file, a file above, a read-only folder are refused before any work; an
``--overwrite`` sample run replaces the older run's numbered images whole; an expert prompt
without the identifier is warned about."""

import logging
import os

import pytest

from orchestration.cli import main
from suti.errors import InputError, OutputExistsError
from suti.outputs import check_output_folder, numbered_images, remove_stale_images


def test_an_output_that_is_a_file_or_lies_under_one_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "f")
    with pytest.raises(OutputExistsError, match=r"f is a file, not a folder"):
        check_output_folder(tmp_path / "f" / "sub" / "deeper")
    assert check_output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"


def test_a_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == os.fspath(folder) else real(p, mode))  # root ignores mode bits
    with pytest.raises(InputError, match="is not writable"):
        check_output_folder(folder / "out")


def test_numbered_images_refuse_a_clash_and_overwrite_removes_the_older_runs_extra_images(tmp_path):
    for i in range(4):
        (tmp_path / f"image_{i:03d}.png").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        numbered_images(tmp_path, 2, overwrite=False)
    assert numbered_images(tmp_path, 2, overwrite=True) == [tmp_path / "image_000.png", tmp_path / "image_001.png"]
    assert [p.name for p in remove_stale_images(tmp_path, 2)] == ["image_002.png", "image_003.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image_000.png", "image_001.png", "notes.txt"]


@pytest.fixture(scope="module")
def instance_dir_module(tmp_path_factory):
    from conftest import draw_subject

    folder = tmp_path_factory.mktemp("instance")
    for i in range(3):
        draw_subject(i).save(folder / f"photo_{i}.png")
    return folder


@pytest.fixture(scope="module")
def expert(tmp_path_factory, instance_dir_module):
    out = tmp_path_factory.mktemp("expert") / "e"
    assert main(["expert", "train", "--model", "tiny", "--instance-dir", str(instance_dir_module), "--class-noun", "toy", "--output", str(out),
                 "--steps", "1", "--lora-rank", "2", "--no-prior-preservation"]) == 0
    return out


@pytest.mark.parametrize("command", ["expert", "apprentice"])
def test_sample_into_a_file_is_refused_in_one_line_before_loading_a_model(expert, instance_dir_module, tmp_path, capsys, command):
    (tmp_path / "f").write_text("x")
    args = (["expert", "sample", "--expert", str(expert), "--prompt", "a {V}"] if command == "expert" else
            ["apprentice", "sample", "--demos", *[str(p) for p in sorted(instance_dir_module.iterdir())[:2]], "--prompt", "a toy"])
    assert main([*args, "--output", str(tmp_path / "f"), "--num-images", "1", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file, not a folder" in err, err
    assert (tmp_path / "f").read_text() == "x"


def test_expert_sample_overwrite_replaces_the_whole_set_and_warns_without_the_identifier(expert, tmp_path, caplog):
    out = tmp_path / "s"
    base = ["expert", "sample", "--expert", str(expert), "--output", str(out), "--steps", "1"]
    assert main([*base, "--prompt", "a {V} {class}", "--num-images", "3"]) == 0
    with caplog.at_level(logging.WARNING, logger="experts.expert"):
        assert main([*base, "--prompt", "a stuffed animal on a boat", "--num-images", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["image_000.png"]
    assert any("does not name the expert's identifier" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="experts.expert"):
        assert main([*base, "--prompt", "a {V} {class} on a boat", "--num-images", "1", "--overwrite"]) == 0
    assert not any("identifier" in r.getMessage() for r in caplog.records)
