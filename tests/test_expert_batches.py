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


CLASSES = ["star toy", "dog", "star toy", "red cup", "dog", "backpack", "vase", "star toy"]


def _instance_dirs(instance_dir, tmp_path, k):
    """``k`` instance folders: the photos in another order, and fewer of them, per expert."""
    dirs = [instance_dir]
    photos = sorted(instance_dir.iterdir())
    for i in range(1, k):
        other = tmp_path / f"instance{i}"
        other.mkdir()
        for j, photo in enumerate(photos[i % 3 :] or photos):
            shutil.copy(photo, other / f"{j}_{photo.name}")
        dirs.append(other)
    return dirs


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("recipe, optimizer", [("suti-expert", "adafactor"), ("suti-expert", "adamw"), ("dreambooth-lora", "adamw"), ("dreambooth-lora", "adafactor")],
                         ids=["adafactor", "adamw", "adamw-prior", "adafactor-prior"])
def test_stacked_experts_equal_experts_trained_one_at_a_time(instance_dir, tmp_path, recipe, optimizer, k):
    """Each expert of a stacked batch ends within 1e-4 of its own train_expert run (fp32, CPU):
    AdamW and Adafactor, with and without prior preservation, experts of different classes
    (some sharing a class set), different instance photos and seeds."""
    # With Adam's epsilon at 1e-8, AdamW moves the few parameters whose gradients are near that
    # size (self-attention's to_k: softmax is shift-invariant) by about lr * g / (|g| + eps):
    # there the rounding of the base's batch-K kernels grows to 1e-3 over 8 steps (peft's
    # mixed-adapter batches gave the same 9.7e-4; a K=1 stack stays at 2e-5). At 1e-6 it does not.
    rate = dict(adam_epsilon=1e-6) if optimizer == "adamw" else {}
    dirs = _instance_dirs(instance_dir, tmp_path, k)
    configs = [_config(folder, recipe, 10 + i, optimizer=optimizer, class_noun=CLASSES[i], steps=8, **rate) for i, folder in enumerate(dirs)]
    pipe = load_pipeline("tiny", device="cpu")
    alone = []
    for i, config in enumerate(configs):
        train_expert(_config(dirs[i], recipe, 10 + i, optimizer=optimizer, class_noun=CLASSES[i], steps=8, **rate), tmp_path / f"alone{i}", progress=False, pipeline=pipe, save=False)
        alone.append({key: v.clone() for key, v in get_peft_model_state_dict(pipe.unet).items()})
        pipe.unet.delete_adapters(["default"])
    names = [f"expert_{i}" for i in range(k)]
    infos = train_lora_experts(pipe, configs, names, outputs=[tmp_path / "saved0"] + [None] * (k - 1))
    assert [info.seed for info in infos] == [10 + i for i in range(k)] and all(info.kind == "lora" for info in infos)
    for name, weights in zip(names, alone):
        stacked = get_peft_model_state_dict(pipe.unet, adapter_name=name)
        assert stacked.keys() == weights.keys()
        moved = max(weights[key].abs().max().item() for key in weights if "lora_B" in key)
        assert moved > 1e-3, "the experts trained (lora_B starts at zero)"
        worst = max((stacked[key] - weights[key]).abs().max().item() for key in weights)
        assert worst < 1e-4, f"{name}: {worst}"
    assert (tmp_path / "saved0" / "pytorch_lora_weights.safetensors").is_file() and not (tmp_path / "saved1").exists()
    assert set(pipe.unet.peft_config) == set(names), "the adapters stay for sampling; the caller deletes them"
    assert not any(type(m).__name__ == "StackedLoRALinear" for m in pipe.unet.modules()), "the peft layers are back"


def test_a_stacked_expert_saves_as_an_expert_trained_alone(instance_dir, tmp_path):
    """The saved file of a stacked expert has the keys of a lone expert's and loads with
    diffusers' load_lora_weights, giving that expert's images."""
    from safetensors.torch import load_file

    pipe = load_pipeline("tiny", device="cpu")
    train_expert(_config(instance_dir, "suti-expert", 10, steps=3), tmp_path / "alone", progress=False)
    train_lora_experts(pipe, [_config(instance_dir, "suti-expert", 10, steps=3), _config(instance_dir, "suti-expert", 11, steps=3, class_noun="dog")], ["a", "b"],
                       outputs=[tmp_path / "s0", tmp_path / "s1"])
    lone = load_file(str(tmp_path / "alone" / "pytorch_lora_weights.safetensors"))
    saved = load_file(str(tmp_path / "s0" / "pytorch_lora_weights.safetensors"))
    assert saved.keys() == lone.keys()
    assert max((saved[key] - lone[key]).abs().max().item() for key in lone) < 1e-5
    fresh = load_pipeline("tiny", device="cpu")
    fresh.load_lora_weights(str(tmp_path / "s0"))
    assert fresh.unet.peft_config


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl", "tiny-flux"])
def test_an_adapter_added_like_the_first_equals_peft_add_adapter(model):
    """add_adapter_like (the batch's second and later experts) draws the initialisation peft's
    add_adapter draws after the same seed, bit for bit, on the same layers, with the same saved
    config, on a U-Net and a transformer alike."""
    from experts.batched import add_adapter_like
    from experts.train import add_lora
    from suti.denoisers import denoiser_module

    config = resolve_config("suti-expert", dict(model=model, instance_dir=".", class_noun="dog", lora_rank=4))
    weights = []
    for fast in (False, True):
        pipe = load_pipeline(model, device="cpu")
        module = denoiser_module(pipe)
        for i, seed in enumerate((3, 4, 5)):
            torch.manual_seed(seed)
            if fast and i:
                add_adapter_like(module, "e0", f"e{i}")
            else:
                add_lora(pipe, config, adapter_name=f"e{i}")
        weights.append({a: get_peft_model_state_dict(module, adapter_name=a) for a in ("e1", "e2")})
        configs = {a: module.peft_config[a].to_dict() for a in ("e1", "e2")}
        if not fast:
            peft_configs = configs
    assert configs == peft_configs
    for a in ("e1", "e2"):
        assert weights[1][a].keys() == weights[0][a].keys() and len(weights[0][a]) > 0
        assert all(torch.equal(weights[1][a][key], weights[0][a][key]) for key in weights[0][a]), a
    with pytest.raises(ValueError, match="exists"):
        add_adapter_like(module, "e0", "e1")
    module.peft_config["e0"].modules_to_save = ["conv_in"]
    with pytest.raises(ValueError, match="modules_to_save are added with add_adapter"):
        add_adapter_like(module, "e0", "e3")


def test_batches_refuse_full_fine_tuning_and_unequal_settings(instance_dir):
    with pytest.raises(InputError, match="LoRA"):
        check_batchable([resolve_config("suti-expert", dict(model="tiny", instance_dir=str(instance_dir), class_noun="toy"))])
    a, b = _config(instance_dir, "suti-expert", 1), _config(instance_dir, "suti-expert", 2, steps=7)
    check_batchable([a, _config(instance_dir, "suti-expert", 2, class_noun="other")])  # per-expert fields may differ
    with pytest.raises(InputError, match="steps differ"):
        check_batchable([a, b])
    with pytest.raises(InputError, match="train_text_encoder"):
        check_batchable([_config(instance_dir, "suti-expert", 1, train_text_encoder=True)])


def _two_adapters():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 6))
    for name, alpha in (("a", 2), ("b", 6)):  # scalings 1 and 3
        net = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=alpha, target_modules=["0", "1"], init_lora_weights="gaussian"), net, adapter_name=name)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))  # lora_B away from zero: the adapters differ
    return net


def _alone(net, name, x):
    for layer in net:
        layer.set_adapter(name)
    return net(x)


def test_stacked_layers_send_each_row_to_its_expert():
    """Rows grouped by expert (training), in any order (sampling) and repeated (classifier-free
    guidance's cat([uncond, cond])) each get their own adapter's output, with scalings that
    differ per expert; the peft layers come back afterwards."""
    from experts.stacked import StackedLoRALinear, stacked_lora

    net = _two_adapters()
    x = torch.randn(4, 3, 6)
    expected = {name: _alone(net, name, x) for name in ("a", "b")}
    with stacked_lora(net, ["a", "b"], write_back=False) as stack:
        assert all(isinstance(layer, StackedLoRALinear) for layer in net)
        stack.route.set_grouped(2)
        grouped = net(x)
        stack.route.set([0, 1, 1, 0])
        mixed = net(x)
        stack.route.set([1, 1, 0, 0])  # runs of equal length in another order
        swapped = net(x)
        stack.route.set([0, 1])
        doubled = net(x)
        stack.route.set(None)
        base = net(x)
    assert torch.allclose(grouped[:2], expected["a"][:2], atol=1e-5) and torch.allclose(grouped[2:], expected["b"][2:], atol=1e-5)
    assert torch.allclose(mixed[[0, 3]], expected["a"][[0, 3]], atol=1e-5) and torch.allclose(mixed[[1, 2]], expected["b"][[1, 2]], atol=1e-5)
    assert torch.allclose(swapped[:2], expected["b"][:2], atol=1e-5) and torch.allclose(swapped[2:], expected["a"][2:], atol=1e-5)
    assert torch.allclose(doubled[[0, 2]], expected["a"][[0, 2]], atol=1e-5) and torch.allclose(doubled[[1, 3]], expected["b"][[1, 3]], atol=1e-5)
    assert torch.allclose(base, net[1].get_base_layer()(net[0].get_base_layer()(x)), atol=1e-6)
    assert all(type(layer).__name__ == "Linear" and hasattr(layer, "lora_A") for layer in net), "the peft layers are back"


def test_stacked_layers_count_their_kernels_not_their_experts():
    """The aten operators of a forward and backward through the stacked layers do not grow
    with the number of experts (peft's mixed batches loop over the adapters)."""
    from peft import LoraConfig, inject_adapter_in_model

    from experts.stacked import stacked_lora

    def ops(k):
        net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        names = [f"e{i}" for i in range(k)]
        for name in names:
            net = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "1"]), net, adapter_name=name)
        with stacked_lora(net, names) as stack:
            for p in stack.parameters():
                p.requires_grad_(True)
            stack.route.set_grouped(2)
            x = torch.randn(2 * k, 5, 8)
            with torch.profiler.profile() as prof:
                net(x).sum().backward()
        return sum(e.count for e in prof.key_averages())

    assert ops(8) == ops(1)


def test_stacked_adafactor_equals_one_adafactor_per_expert():
    """Adafactor over (K, r, c) stacks of several shapes (two parameters share one, so their
    batched step is exercised): every slice's update equals its own ``transformers.Adafactor``'s,
    though the slices' gradients differ in scale by 1000x (the RMS clip is per slice)."""
    from transformers.optimization import Adafactor

    from experts.stacked import StackedAdafactor, clip_grad_norm_per_expert

    torch.manual_seed(0)
    shapes = [(3, 4, 5), (3, 4, 5), (3, 6, 2)]
    scale = torch.tensor([1.0, 1e3, 1e-3]).view(3, 1, 1)
    starts = [torch.randn(*shape) for shape in shapes]
    grads = [[torch.randn(*shape) * scale for shape in shapes] for _ in range(4)]
    stacked = [torch.nn.Parameter(x.clone()) for x in starts]
    opt = StackedAdafactor(stacked, lr=1e-2)
    alone = [[torch.nn.Parameter(x[i].clone()) for x in starts] for i in range(3)]
    opts = [Adafactor(ps, lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False) for ps in alone]
    for g in grads:
        for p, gp in zip(stacked, g):
            p.grad = gp.clone()
        norms = clip_grad_norm_per_expert(stacked, 1.0)
        opt.step()
        for i, (ps, o) in enumerate(zip(alone, opts)):
            for p, gp in zip(ps, g):
                p.grad = gp[i].clone()
            assert torch.isclose(norms[i], torch.nn.utils.clip_grad_norm_(ps, 1.0), rtol=1e-5)
            o.step()
    for i in range(3):
        for j, p in enumerate(stacked):
            assert torch.allclose(p[i], alone[i][j], atol=1e-6), (i, j)
    with pytest.raises(ValueError, match="stacked"):
        StackedAdafactor([torch.nn.Parameter(torch.zeros(4, 5))], lr=1e-2)
    # bf16 parameters: updated in an fp32 copy and rounded once, as transformers does
    low = torch.nn.Parameter(starts[0].clone().bfloat16())
    low_alone = [torch.nn.Parameter(starts[0][i].clone().bfloat16()) for i in range(3)]
    opt, opts = StackedAdafactor([low], lr=1e-2), [Adafactor([p], lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False) for p in low_alone]
    for g in grads:
        low.grad = g[0].bfloat16()
        opt.step()
        for i, (p, o) in enumerate(zip(low_alone, opts)):
            p.grad = g[0][i].bfloat16()
            o.step()
    assert all(torch.equal(low[i], low_alone[i]) for i in range(3))


def test_stacked_sdxl_experts_equal_experts_trained_one_at_a_time(instance_dir, tmp_path):
    """SDXL's U-Net (pooled text embeddings and time ids in the conditioning): each of two
    stacked experts with prior preservation ends within 1e-4 of its own run."""
    dirs = _instance_dirs(instance_dir, tmp_path, 2)

    def config(i):
        return resolve_config("dreambooth-lora", dict(model="tiny-sdxl", instance_dir=str(dirs[i]), class_noun=CLASSES[i], steps=5, lora_rank=4, seed=20 + i,
                                                      report_to="none", num_class_images=2, class_sample_steps=2, adam_epsilon=1e-6))

    pipe = load_pipeline("tiny-sdxl", device="cpu")
    alone = []
    for i in range(2):
        train_expert(config(i), tmp_path / f"alone{i}", progress=False, pipeline=pipe, save=False)
        alone.append({key: v.clone() for key, v in get_peft_model_state_dict(pipe.unet).items()})
        pipe.unet.delete_adapters(["default"])
    train_lora_experts(pipe, [config(0), config(1)], ["x0", "x1"])
    for name, weights in zip(["x0", "x1"], alone):
        stacked = get_peft_model_state_dict(pipe.unet, adapter_name=name)
        assert max(weights[key].abs().max().item() for key in weights if "lora_B" in key) > 1e-3
        assert max((stacked[key] - weights[key]).abs().max().item() for key in weights) < 1e-4, name
