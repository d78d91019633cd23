"""Expert checkpoints: only ``step-<digits>`` folders are checkpoints, newest by step; a save
that fails (a full disk) leaves no half-written folder behind."""

import errno
import json
import shutil

import pytest
import torch

from experts import checkpoint as ckpt


def _save(tmp_path, step):
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param])
    return ckpt.save_checkpoint(tmp_path, step, {"w": param}, optimizer, torch.Generator().manual_seed(0), {"model": "tiny"}, keep=0)


def test_only_step_digits_folders_are_checkpoints_and_the_newest_step_wins(tmp_path):
    two = _save(tmp_path, 2)
    _save(tmp_path, 10)
    shutil.copytree(two, tmp_path / "checkpoints" / "step-000099-bak")  # a user's backup copy of step 2
    (tmp_path / "checkpoints" / "step-old").mkdir()
    (tmp_path / "checkpoints" / "step-old" / "config.json").write_text(json.dumps({"step": 1, "config": {}}))
    (tmp_path / "checkpoints" / "step-").mkdir()
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step-000002", "step-000010"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000010"
    assert ckpt.find_checkpoint(tmp_path, "latest").name == "step-000010"
    assert ckpt.find_checkpoint(tmp_path, "step-000002") == two


def test_a_checkpoint_save_that_fails_leaves_no_temporary_folder(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"], "no .tmp-step-* left, the earlier checkpoint kept"
