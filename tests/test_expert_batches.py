"""LoRA experts trained together in one U-Net pass per step (experts.batched, --expert-batch-size)."""

import shutil

import pytest
import torch
from peft.utils import get_peft_model_state_dict

from experts import load_pipeline, resolve_config
from experts.batched import check_batchable, train_lora_experts
from experts.train import train_expert
from suti.errors import InputError


def _config(instance_dir, recipe, seed, **extra):
    overrides = dict(model="tiny", instance_dir=str(instance_dir), class_noun="star toy", steps=12, lora_rank=4, seed=seed, report_to="none", num_class_images=3, class_sample_steps=2)
    return resolve_config(recipe, {**overrides, **extra})


@pytest.mark.parametrize("recipe", ["suti-expert", "dreambooth-lora"], ids=["no-prior", "prior-preservation"])
def test_batched_experts_equal_experts_trained_one_at_a_time(instance_dir, tmp_path, recipe):
    """Each adapter of a batch ends where its own train_expert run ends (float rounding aside),
    including prior preservation and different instance images per expert."""
    dirs = [instance_dir]
    for i in (1, 2):  # other subjects: the same photos in another order and fewer of them
        other = tmp_path / f"instance{i}"
        other.mkdir()
        for j, photo in enumerate(sorted(instance_dir.iterdir())[i:]):
            shutil.copy(photo, other / f"{j}_{photo.name}")
        dirs.append(other)
    pipe = load_pipeline("tiny", device="cpu")
    alone = []
    for i, folder in enumerate(dirs):
        train_expert(_config(folder, recipe, 10 + i), tmp_path / f"alone{i}", progress=False, pipeline=pipe, save=False)
        alone.append({k: v.clone() for k, v in get_peft_model_state_dict(pipe.unet).items()})
        pipe.unet.delete_adapters(["default"])
    names = ["expert_0", "expert_1", "expert_2"]
    infos = train_lora_experts(pipe, [_config(folder, recipe, 10 + i) for i, folder in enumerate(dirs)], names, outputs=[tmp_path / "saved0", None, None])
    assert [info.seed for info in infos] == [10, 11, 12] and all(info.kind == "lora" for info in infos)
    for name, weights in zip(names, alone):
        batched = get_peft_model_state_dict(pipe.unet, adapter_name=name)
        assert batched.keys() == weights.keys()
        moved = max((weights[k] - 0).abs().max().item() for k in weights if "lora_B" in k)
        assert moved > 1e-3, "the experts trained (lora_B starts at zero)"
        worst = max((batched[k] - weights[k]).abs().max().item() for k in weights)
        assert worst < 1e-4 * max(1.0, moved), f"{name}: {worst}"
    assert (tmp_path / "saved0" / "pytorch_lora_weights.safetensors").is_file() and not (tmp_path / "saved1").exists()
    assert set(pipe.unet.peft_config) == set(names), "the adapters stay for sampling; the caller deletes them"


def test_batches_refuse_full_fine_tuning_and_unequal_settings(instance_dir):
    with pytest.raises(InputError, match="LoRA"):
        check_batchable([resolve_config("suti-expert", dict(model="tiny", instance_dir=str(instance_dir), class_noun="toy"))])
    a, b = _config(instance_dir, "suti-expert", 1), _config(instance_dir, "suti-expert", 2, steps=7)
    check_batchable([a, _config(instance_dir, "suti-expert", 2, class_noun="other")])  # per-expert fields may differ
    with pytest.raises(InputError, match="steps differ"):
        check_batchable([a, b])
    with pytest.raises(InputError, match="train_text_encoder"):
        check_batchable([_config(instance_dir, "suti-expert", 1, train_text_encoder=True)])


def test_routed_adapters_send_each_row_to_its_adapter():
    """One forward with rows routed to two adapters equals each row through its own adapter."""
    from peft import LoraConfig

    from experts.batched import routed_adapters

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 6))
    from peft import inject_adapter_in_model

    for name in ("a", "b"):
        net = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], init_lora_weights="gaussian"), net, adapter_name=name)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))  # lora_B away from zero: the adapters differ
    x = torch.randn(4, 6)
    with routed_adapters(net) as route:
        route["names"] = ["a", "b", "b", "a"]
        mixed = net(x)
        route["names"] = ["a", "b"]  # a batch twice as long (classifier-free guidance): repeated
        doubled = net(x)
    layer = net[0]
    for rows, name in (([0, 3], "a"), ([1, 2], "b")):
        layer.set_adapter(name)
        assert torch.allclose(mixed[rows], net(x[rows]), atol=1e-6)
    layer.set_adapter("a")
    assert torch.allclose(doubled[[0, 2]], net(x[[0, 2]]), atol=1e-6)
