"""Every command that writes, against an output it cannot use: a regular file, a read-only file
system and a full small file system. Each exits 2 with one line naming the path, no traceback,
and leaves what was there as it was (the file keeps its bytes; no temporary file is left).

The read-only and full file systems are tmpfs mounts (this needs root and a kernel that allows
them, as the cluster tests' private /tmp does); elsewhere those cases skip with the reason.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from orchestration.cli import main


def _umount(folder: Path) -> None:
    """Unmount ``folder``; lazily when a process (a Ray worker) still holds a file in it."""
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def _mount(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A world crawl, its mined clusters, their photo shards, a tiny expert and instance photos."""
    from conftest import draw_subject

    root = tmp_path_factory.mktemp("inputs")
    photos = root / "photos"
    photos.mkdir()
    for i in range(3):
        draw_subject(i).save(photos / f"p{i}.png")
    assert main(["world", "make", "--output", str(root / "crawl"), "--subjects", "2", "--noise-pages", "0", "--seed", "3", "--size", "32"]) == 0
    assert main(["mine", "--crawl", str(root / "crawl"), "--output", str(root / "mined")]) == 0
    assert main(["apprentice", "pack-photos", "--clusters", str(root / "mined" / "clusters.jsonl"), "--crawl", str(root / "crawl"), "--output", str(root / "shards")]) == 0
    assert main(["expert", "train", "--model", "tiny", "--instance-dir", str(photos), "--class-noun", "toy", "--output", str(root / "expert"),
                 "--steps", "1", "--lora-rank", "2", "--no-prior-preservation"]) == 0
    return root


def commands(root: Path, out: Path) -> dict[str, list[str]]:
    """Each writing command with the smallest work, writing to ``out``."""
    photos = [str(root / "photos" / f"p{i}.png") for i in range(2)]
    return {
        "expert train": ["expert", "train", "--model", "tiny", "--instance-dir", str(root / "photos"), "--class-noun", "toy", "--output", str(out), "--steps", "1",
                         "--lora-rank", "2", "--no-prior-preservation"],
        "expert sample": ["expert", "sample", "--expert", str(root / "expert"), "--prompt", "a {V} {class}", "--num-images", "1", "--steps", "1", "--output", str(out)],
        "expert import": ["expert", "import", "--lora", str(root / "expert" / "pytorch_lora_weights.safetensors"), "--identifier", "nhq", "--class-noun", "toy",
                          "--model", "tiny", "--output", str(out)],
        "world make": ["world", "make", "--output", str(out), "--subjects", "2", "--noise-pages", "0", "--size", "32"],
        "mine": ["mine", "--crawl", str(root / "crawl"), "--output", str(out)],
        "pack-photos": ["apprentice", "pack-photos", "--clusters", str(root / "mined" / "clusters.jsonl"), "--crawl", str(root / "crawl"), "--output", str(out)],
        "generate": ["generate", "--clusters", str(root / "mined" / "clusters.jsonl"), "--crawl", str(root / "crawl"), "--output", str(out), "--model", "tiny",
                     "--steps", "1", "--sample-steps", "1", "--prompts-per-cluster", "1", "--max-clusters", "1", "--max-workers", "1"],
        "apprentice train": ["apprentice", "train", "--shards", str(root / "shards" / "shard-*.tar"), "--model", "tiny", "--output", str(out), "--steps", "1",
                             "--freeze-base", "--batch-size", "1"],
        "apprentice sample": ["apprentice", "sample", "--demos", *photos[:2], "--prompt", "a toy", "--num-images", "1", "--steps", "1", "--output", str(out)],
        "eval": ["eval", "--dataset", "world:1", "--method", "base", "--model", "tiny", "--clip", "toy-clip", "--dino", "toy-identity", "--prompts", "1",
                 "--images-per-prompt", "1", "--sample-steps", "1", "--output", str(out)],
    }


COMMANDS = list(commands(Path("r"), Path("o")))


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    """The exit code and suti's error lines; other stderr lines (progress bars, Ray's and
    torch's start-up notices) are allowed, a traceback is not."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return code, [line.split("suti: error:", 1)[1] and "suti: error:" + line.split("suti: error:", 1)[1] for line in err.splitlines() if "suti: error:" in line]


def _fill(folder: Path, free: int = 0) -> None:
    """Leave about ``free`` bytes free on the file system of ``folder``."""
    try:
        with open(folder / "filler", "wb", buffering=0) as f:
            while True:
                f.write(b"x" * 4096)
    except OSError:
        pass
    if free:
        size = (folder / "filler").stat().st_size
        os.truncate(folder / "filler", max(0, size - free))


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_an_output_that_is_a_regular_file(inputs, tmp_path, capsys, name):
    target = tmp_path / "taken"
    target.write_text("keep me")
    code, err = _run(commands(inputs, target)[name], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("suti: error:") and "taken" in err[0], (name, err)
    assert target.read_text() == "keep me"


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_an_output_where_no_folder_can_be_made(inputs, tmp_path, capsys, name):
    """/proc holds no new folders (even for root): one line naming the output, exit 2, before any
    work (an expert used to generate its class images and train first)."""
    import time

    started = time.monotonic()
    code, err = _run(commands(inputs, Path("/proc/suti-no-such/out"))[name], capsys)
    assert code == 2 and len(err) == 1 and "/proc/suti-no-such" in err[0], (name, err)
    assert time.monotonic() - started < 60, "refused before the work"


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_an_output_on_a_read_only_file_system(inputs, tmp_path, capsys, name):
    ro = tmp_path / "ro"
    if not _mount(ro, "ro,size=1m"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        code, err = _run(commands(inputs, ro / "out")[name], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("suti: error:") and "ro" in err[0], (name, err)
    finally:
        _umount(ro)


@pytest.mark.slow
@pytest.mark.parametrize("free", [0, 24 * 1024], ids=["full", "nearly-full"])
@pytest.mark.parametrize("name", COMMANDS)
def test_an_output_on_a_full_file_system(inputs, tmp_path, capsys, name, free):
    """No space at all: exit 2 in one line. Some space: the command either fits, or stops in
    one line when a write fails part-way; either way no temporary file is left behind."""
    full = tmp_path / "full"
    if not _mount(full, "size=128k"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    _fill(full, free)
    try:
        code, err = _run(commands(inputs, full / "out")[name], capsys)
        assert code in ((2,) if free == 0 else (0, 2)), (name, code, err)
        if code == 2:
            assert len(err) == 1 and ("No space left on device" in err[0] or "free space" in err[0]), (name, err)
        leftovers = [p.name for p in full.rglob("*") if ".tmp" in p.name or p.name.startswith(".save-")]
        assert not leftovers, f"{name} left temporary files: {leftovers}"
    finally:
        _umount(full)
