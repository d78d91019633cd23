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


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_a_resume_with_another_learning_rate_trains_at_the_new_rate(tmp_path, schedule):
    """The optimizer and schedule state of the checkpoint carry the old rate; the run asked for
    another: from the resume step on, the new base rate times the schedule's factor acts."""
    from diffusers.optimization import get_scheduler

    def run(lr, betas=(0.9, 0.999)):
        param = torch.nn.Parameter(torch.ones(2))
        optimizer = torch.optim.AdamW([param], lr=lr, betas=betas)
        return param, optimizer, get_scheduler(schedule, optimizer, num_warmup_steps=2, num_training_steps=10)

    param, optimizer, scheduler = run(1e-4)
    for _ in range(4):
        param.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
    saved = ckpt.save_checkpoint(tmp_path, 4, {"w": param}, optimizer, torch.Generator(), {"model": "tiny"}, keep=0, lr_scheduler=scheduler)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)

    param2, optimizer2, scheduler2 = run(5e-4, betas=(0.8, 0.999))
    asked = [{k: v for k, v in g.items() if k != "params"} for g in optimizer2.param_groups]
    ckpt.load_checkpoint(saved, {"w": param2}, optimizer2, torch.Generator(), lr_scheduler=scheduler2)
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(1e-4 * factor), "the checkpoint's rate is loaded first"
    changes = ckpt.apply_hyperparameters(optimizer2, scheduler2, asked)
    assert changes == {"learning_rate": (1e-4, 5e-4), "betas[0]": (0.9, 0.8)}
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(5e-4 * factor) and scheduler2.get_last_lr()[0] == pytest.approx(5e-4 * factor)
    assert scheduler2.last_epoch == 4 and optimizer2.param_groups[0]["betas"] == (0.8, 0.999)
    scheduler2.step()
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(5e-4 * scheduler2.lr_lambdas[0](5))


def test_expert_train_resumed_with_a_new_rate_records_what_ran(instance_dir, tmp_path, caplog):
    import logging

    from orchestration.cli import main

    out = tmp_path / "e"
    base = ["expert", "train", "--model", "tiny", "--instance-dir", str(instance_dir), "--class-noun", "toy", "--output", str(out),
            "--no-prior-preservation", "--lora-rank", "2", "--checkpointing-steps", "1"]
    assert main([*base, "--steps", "2", "--learning-rate", "1e-4"]) == 0
    with caplog.at_level(logging.WARNING, logger="experts.train"):
        assert main([*base, "--steps", "3", "--learning-rate", "5e-4", "--resume", "latest"]) == 0
    # the rates as they act: the tiny preset scales the learning rate by 100
    assert any("learning_rate 0.01 -> 0.05" in r.getMessage() and "from step 3 on" in r.getMessage() for r in caplog.records)
    config = json.loads((out / "expert.json").read_text())["config"]
    assert config["lora_learning_rate"] == 5e-4
    assert config["extra"]["resumes"] == [{"checkpoint": "step-000002", "step": 2, "changed": {"learning_rate": [pytest.approx(0.01), pytest.approx(0.05)]}}]


def test_weights_and_checkpoints_are_written_with_the_umasks_modes(instance_dir, tmp_path):
    """safetensors writes its file 0o600 and tempfile makes folders 0o700: renamed into place
    they would be unreadable to other users; every weight writer gives them the umask's modes."""
    import os
    import stat

    from orchestration.cli import main

    old = os.umask(0o022)
    try:
        out = tmp_path / "e"
        assert main(["expert", "train", "--model", "tiny", "--instance-dir", str(instance_dir), "--class-noun", "toy", "--output", str(out),
                     "--no-prior-preservation", "--lora-rank", "2", "--steps", "1", "--checkpointing-steps", "1"]) == 0
        full = tmp_path / "f"
        assert main(["expert", "train", "--model", "tiny", "--instance-dir", str(instance_dir), "--class-noun", "toy", "--output", str(full),
                     "--no-prior-preservation", "--steps", "1"]) == 0
    finally:
        os.umask(old)
    files = [out / "pytorch_lora_weights.safetensors", *(out / "checkpoints").rglob("*.safetensors"), *(full / "pipeline").rglob("*.safetensors")]
    assert len(files) >= 3
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {"0o644"}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in (out / "checkpoints").iterdir()} == {"0o755"}
