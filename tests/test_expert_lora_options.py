"""The LoRA and optimizer options of diffusers' ``train_dreambooth_lora.py`` and
``train_dreambooth_lora_sdxl.py`` in ``suti expert train`` (issue 34, section 5), each by its
effect: ``--lora-alpha``, ``--lora-dropout``, ``--use-dora``, ``--text-encoder-lr``,
``--adam-weight-decay-text-encoder``, ``--optimizer prodigy`` with ``--prodigy-*``,
``--output-kohya-format``, the weight-decay default; and ``suti generate --keep-experts-format``
(section 1). Tiny presets, a few steps each."""

import dataclasses
import json
import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import exit_code
from experts import load_expert, resolve_config
from experts.train import train_expert
from suti.errors import InputError
from suti.models import preset_folder


def _config(instance_dir, **overrides):
    base = dict(model="tiny", instance_dir=str(instance_dir), class_noun="star toy", steps=2, prior_preservation=False, report_to="none", identifier="sks")
    base.update(overrides)
    return resolve_config(base.pop("recipe", "dreambooth-lora"), base)


def _train_cli(instance_dir, out, *extra):
    return exit_code(["expert", "train", "--model", "tiny", "--recipe", "dreambooth-lora", "--instance-dir", str(instance_dir), "--class-noun", "star toy",
                      "--identifier", "sks", "--no-prior-preservation", "--steps", "2", "--report-to", "none", "--output", str(out), *extra])


def _image(pipe, prompt="a sks star toy", seed=3):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="np", height=32, width=32).images[0]


def _plain_sd(folder, weight_name):
    """Plain diffusers: the preset's folder, then ``load_lora_weights`` on the file."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(preset_folder("tiny")), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(folder), weight_name=weight_name)
    return pipe


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _capture_optimizer(monkeypatch):
    """The optimizer train_expert builds, kept after training."""
    from experts import train as expert_train

    made, real = [], expert_train.make_optimizer
    monkeypatch.setattr(expert_train, "make_optimizer", lambda params, config: made.append(real(params, config)) or made[-1])
    return made


def test_output_kohya_format_and_lora_alpha(instance_dir, tmp_path):
    """--output-kohya-format writes a kohya file that plain diffusers loads into the expert's
    images (that it is the file `suti expert export` writes: the stacked test below); --lora-alpha
    8 at rank 4 scales by 2; --lora-dropout reaches the saved adapter config."""
    out = tmp_path / "e"
    assert _train_cli(instance_dir, out, "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.125", "--train-text-encoder", "--output-kohya-format") == 0
    kohya = out / "pytorch_lora_weights_kohya.safetensors"
    tensors, meta = _tensors(kohya)
    assert tensors and all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {8.0} and meta["ss_network_alpha"] == "8"
    info = json.loads((out / "expert.json").read_text())
    assert info["config"]["lora_alpha"] == 8 and info["config"]["output_kohya_format"] is True
    _, diffusers_meta = _tensors(out / "pytorch_lora_weights.safetensors")
    adapter = json.loads(diffusers_meta["lora_adapter_metadata"])
    assert adapter["unet.lora_alpha"] == adapter["text_encoder.lora_alpha"] == 8 and adapter["unet.lora_dropout"] == adapter["text_encoder.lora_dropout"] == 0.125

    ours = load_expert(out)
    assert {float(layer.scaling["default_0"]) for layer in _lora_layers(ours.unet)} == {2.0}
    np.testing.assert_allclose(_image(_plain_sd(out, kohya.name)), _image(ours), atol=1e-4)


def test_lora_options_need_lora_and_dora_has_no_kohya_layout(instance_dir, tmp_path, capsys):
    for extra, said in ((["--use-dora", "--output-kohya-format"], "--output-kohya-format"), (["--lora-rank", "0", "--use-dora"], "--use-dora"),
                        (["--lora-rank", "0", "--output-kohya-format"], "--output-kohya-format"), (["--lora-dropout", "1"], "--lora-dropout"),
                        (["--text-encoder-lr", "0"], "--text-encoder-lr"), (["--prodigy-beta3", "1.5"], "--prodigy-beta3"), (["--optimizer", "sgd"], "--optimizer")):
        capsys.readouterr()
        assert _train_cli(instance_dir, tmp_path / "never", *extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[-1], (extra, err)
        assert not (tmp_path / "never").exists()


def test_use_dora_saves_magnitudes_that_plain_diffusers_loads(instance_dir, tmp_path):
    out = tmp_path / "dora"
    assert _train_cli(instance_dir, out, "--lora-rank", "4", "--use-dora") == 0
    tensors, meta = _tensors(out / "pytorch_lora_weights.safetensors")
    magnitudes = [k for k in tensors if k.endswith("lora_magnitude_vector")]
    assert magnitudes and json.loads(meta["lora_adapter_metadata"])["unet.use_dora"] is True
    ours = load_expert(out)
    assert all(any(layer.use_dora.values()) for layer in _lora_layers(ours.unet))
    plain = _plain_sd(out, "pytorch_lora_weights.safetensors")
    assert all(any(layer.use_dora.values()) for layer in _lora_layers(plain.unet))
    np.testing.assert_allclose(_image(plain), _image(ours), atol=1e-4)
    from experts.export import lora_parts

    with pytest.raises(InputError, match="DoRA"):  # what `suti expert export` says of it
        lora_parts(ours)


def test_lora_dropout_is_in_the_layers_and_drops_in_training_only(instance_dir):
    """peft's LoRA dropout on the U-Net's and text encoder's layers: in training mode the same
    input gives another output each call, in eval mode (sampling) the same one."""
    from experts.train import add_lora
    from suti.models import load_pipeline

    pipe = load_pipeline("tiny")
    add_lora(pipe, _config(instance_dir, lora_rank=4, lora_dropout=0.5, train_text_encoder=True))
    for model in (pipe.unet, pipe.text_encoder):
        assert {layer.lora_dropout["default"].p for layer in _lora_layers(model)} == {0.5}
    layer = _lora_layers(pipe.unet)[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # B starts at zero: make the adapter act
    x = torch.randn(2, layer.in_features)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_text_encoder_lr_and_weight_decay_are_the_text_encoders_param_group(instance_dir, tmp_path, monkeypatch):
    """diffusers' SDXL script's groups: the U-Net at --learning-rate and --adam-weight-decay,
    the text encoders at --text-encoder-lr and --adam-weight-decay-text-encoder (the preset's
    scale applies to both); a rate of 1e-6 leaves the text encoders' LoRA nearly where it started."""
    from safetensors.torch import load_file

    made = _capture_optimizer(monkeypatch)
    out = tmp_path / "te"
    train_expert(_config(instance_dir, lora_rank=4, train_text_encoder=True, text_encoder_lr=1e-6, adam_weight_decay_text_encoder=0.5), out, progress=False)
    unet_group, text_group = made[-1].param_groups
    assert (unet_group["lr"], unet_group["weight_decay"]) == (pytest.approx(1e-4 * 100), 1e-2)  # tiny's learning_rate_scale is 100
    assert (text_group["lr"], text_group["weight_decay"]) == (pytest.approx(1e-6 * 100), 0.5)
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert len(text_group["params"]) == sum(1 for k in weights if k.startswith("text_encoder."))
    moved = {part: max(v.abs().max().item() for k, v in weights.items() if k.startswith(part) and ".up." in k) for part in ("unet.", "text_encoder.")}
    assert moved["text_encoder."] < 1e-3 < moved["unet."], moved

    from experts.optim import param_groups

    p = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    default = _config(instance_dir, lora_rank=4, train_text_encoder=True, adam_weight_decay=0.125)
    groups = param_groups({"unet.a": p[0], "text_encoder.b": p[1], "text_encoder_2.c": p[2]}, default)  # SDXL: both encoders in one group
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in groups] == [(1, pytest.approx(1e-2), 0.125), (2, pytest.approx(1e-2), 0.125)]


def test_adam_weight_decay_default_is_train_dreambooth_lora_s(instance_dir, monkeypatch, tmp_path):
    """1e-2, as train_dreambooth.py and train_dreambooth_lora.py (the SDXL LoRA script's 1e-4 is
    --adam-weight-decay 1e-4, docs/experts.md); it reaches the optimizer."""
    made = _capture_optimizer(monkeypatch)
    assert _config(instance_dir).adam_weight_decay == 1e-2 and _config(instance_dir, recipe="dreambooth").adam_weight_decay == 1e-2
    train_expert(_config(instance_dir, lora_rank=4, steps=1, adam_weight_decay=1e-4), tmp_path / "wd", progress=False)
    assert [g["weight_decay"] for g in made[-1].param_groups] == [1e-4]


def test_prodigy_optimizer_settings_adapt_and_resume(instance_dir, tmp_path, monkeypatch, caplog):
    from prodigyopt import Prodigy
    from safetensors.torch import load_file

    made = _capture_optimizer(monkeypatch)
    settings = dict(lora_rank=4, optimizer="prodigy", learning_rate=1.0, prodigy_beta3=0.9, prodigy_decouple=False, prodigy_use_bias_correction=False,
                    prodigy_safeguard_warmup=False, adam_weight_decay=0.0, steps=2)
    train_expert(_config(instance_dir, **settings), tmp_path / "straight", progress=False)
    opt = made[-1]
    group = opt.param_groups[0]
    assert isinstance(opt, Prodigy)
    assert group["lr"] == 1.0, "Prodigy's rate is not scaled by the preset's learning_rate_scale"
    assert (group["beta3"], group["decouple"], group["use_bias_correction"], group["safeguard_warmup"]) == (0.9, False, False, False)
    straight = {k: group[k] for k in ("k", "d", "d_numerator")}
    assert straight["k"] == 2 and straight["d_numerator"] > 0, "Prodigy's estimate accumulated"
    # resumed from a checkpoint, Prodigy keeps its step count and estimate: the straight run's
    train_expert(_config(instance_dir, **{**settings, "steps": 1, "checkpointing_steps": 1}), tmp_path / "resumed", progress=False)
    train_expert(_config(instance_dir, **settings), tmp_path / "resumed", resume="latest", progress=False)
    resumed = made[-1].param_groups[0]
    assert resumed["k"] == 2 and resumed["d"] == straight["d"] and resumed["d_numerator"] == pytest.approx(straight["d_numerator"], rel=1e-4)
    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    # the step size adapts: on a least-squares problem d grows from d0 within a few steps
    from experts.optim import make_optimizer

    torch.manual_seed(0)
    w, x = torch.nn.Parameter(torch.zeros(16, 4)), torch.randn(64, 16)
    opt = make_optimizer([w], _config(instance_dir, **settings))
    for _ in range(4):
        opt.zero_grad()
        ((x @ w - 1) ** 2).mean().backward()
        opt.step()
    assert opt.param_groups[0]["d"] > 10 * opt.param_groups[0]["d0"]
    with pytest.raises(InputError, match="--optimizer adamw"):  # another optimizer's state cannot resume
        train_expert(_config(instance_dir, lora_rank=4, steps=4), tmp_path / "resumed", resume="latest", progress=False)
    with caplog.at_level(logging.WARNING):
        _config(instance_dir, lora_rank=4, optimizer="prodigy", learning_rate=0.0625)
    assert "around 1.0" in caplog.text


def test_prodigy_needs_prodigyopt(instance_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(InputError, match="prodigyopt"):
        train_expert(_config(instance_dir, lora_rank=4, optimizer="prodigy", learning_rate=1.0), tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_stacked_experts_refuse_dropout_dora_and_prodigy(instance_dir):
    from experts.batched import check_batchable
    from experts.stacked import StackedLoRA
    from experts.train import add_lora
    from suti.models import load_pipeline

    for overrides, said in (({"lora_dropout": 0.1}, "lora_dropout"), ({"use_dora": True}, "use_dora"), ({"optimizer": "prodigy", "learning_rate": 1.0}, "prodigy")):
        with pytest.raises(InputError, match=said):
            check_batchable([_config(instance_dir, lora_rank=4, **overrides)])
    pipe = load_pipeline("tiny")
    add_lora(pipe, _config(instance_dir, lora_rank=4, use_dora=True), adapter_name="a")
    with pytest.raises(ValueError, match="DoRA"):
        StackedLoRA.from_peft(pipe.unet, ["a"])


def test_stacked_experts_write_their_own_kohya_files(instance_dir, tmp_path):
    """save_expert writes each adapter's kohya file: the one `suti expert export` writes."""
    from experts.batched import train_lora_experts
    from suti.models import load_pipeline

    configs = [_config(instance_dir, lora_rank=2, steps=1, seed=s, output_kohya_format=True) for s in (1, 2)]
    train_lora_experts(load_pipeline("tiny"), configs, ["a", "b"], outputs=[tmp_path / "a", tmp_path / "b"])
    assert exit_code(["expert", "export", "--expert", str(tmp_path / "b"), "--output", str(tmp_path / "b.safetensors")]) == 0
    written, _ = _tensors(tmp_path / "b" / "pytorch_lora_weights_kohya.safetensors")
    exported, _ = _tensors(tmp_path / "b.safetensors")
    assert written.keys() == exported.keys() and all(torch.allclose(written[k], exported[k]) for k in written)
    first, _ = _tensors(tmp_path / "a" / "pytorch_lora_weights_kohya.safetensors")
    assert first.keys() == written.keys() and any(not torch.equal(first[k], written[k]) for k in first if "lora_up" in k), "each expert's own adapter"


def test_generate_keeps_experts_in_kohya_layout(tmp_path, capsys):
    from generation import task as expert_task
    from generation.config import GenerateConfig

    def generate(**kw):
        return GenerateConfig(clusters="c.jsonl", crawl="crawl", output=str(tmp_path / "o"), model="tiny", **kw)

    with pytest.raises(InputError, match="--keep-experts-format kohya goes with --keep-experts"):
        generate(keep_experts_format="kohya")
    with pytest.raises(InputError, match="--keep-experts-format"):
        generate(keep_experts=True, keep_experts_format="onnx")
    with pytest.raises(InputError, match="plain LoRA experts"):
        generate(keep_experts=True, keep_experts_format="kohya").resolved()  # suti-expert: full fine-tunes
    assert exit_code(["generate", "--clusters", "c", "--crawl", "d", "--output", str(tmp_path / "o"), "--keep-experts-format", "kohya"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--keep-experts" in err[0] and not (tmp_path / "o").exists()

    config = generate(keep_experts=True, keep_experts_format="kohya", recipe_overrides={"lora_rank": 2}, steps=1)
    assert "output_kohya_format" not in json.dumps(config.identity()), "the layout is not part of the job's identity"
    job = dataclasses.replace(config.expert_job("cpu"), recipe="suti-expert", scorer="toy-clip", lambda_=-10.0, sample_steps=2, prompts_per_cluster=None)
    assert job.recipe_overrides == {"lora_rank": 2, "output_kohya_format": True}
    demos = [Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)) for i in range(3)]
    cluster = {"cluster_id": "c0", "keys": ["k0", "k1", "k2"], "captions": [], "class_noun": "cup", "prompts": [{"prompt": "a {S} in a city"}]}
    assert expert_task.run_cluster(cluster, demos, job)["status"] == "accepted"
    kept = tmp_path / "o" / "experts" / "c0"
    tensors, meta = _tensors(kept / "pytorch_lora_weights_kohya.safetensors")
    assert all(k.startswith("lora_unet_") for k in tensors) and meta["ss_network_dim"] == "2"
    np.testing.assert_allclose(_image(_plain_sd(kept, "pytorch_lora_weights_kohya.safetensors"), "a cup"), _image(load_expert(kept), "a cup"), atol=1e-4)


#: Every option of diffusers' examples/dreambooth train_dreambooth.py, train_dreambooth_lora.py and
#: train_dreambooth_lora_sdxl.py (their argparse at diffusers commit 58eb52c).
DIFFUSERS_OPTIONS = """
    --adam_beta1 --adam_beta2 --adam_epsilon --adam_weight_decay --adam_weight_decay_text_encoder --allow_tf32
    --cache_dir --caption_column --center_crop --checkpointing_steps --checkpoints_total_limit --class_data_dir
    --class_labels_conditioning --class_prompt --dataloader_num_workers --dataset_config_name --dataset_name
    --do_edm_style_training --enable_xformers_memory_efficient_attention --gradient_accumulation_steps
    --gradient_checkpointing --hub_model_id --hub_token --image_column --image_interpolation_mode
    --instance_data_dir --instance_prompt --learning_rate --local_rank --logging_dir --lora_dropout
    --lr_num_cycles --lr_power --lr_scheduler --lr_warmup_steps --max_grad_norm --max_train_steps
    --mixed_precision --num_class_images --num_train_epochs --num_validation_images --offset_noise --optimizer
    --output_dir --output_kohya_format --pre_compute_text_embeddings --pretrained_model_name_or_path
    --pretrained_vae_model_name_or_path --prior_generation_precision --prior_loss_weight --prodigy_beta3
    --prodigy_decouple --prodigy_safeguard_warmup --prodigy_use_bias_correction --push_to_hub --random_flip
    --rank --repeats --report_to --resolution --resume_from_checkpoint --revision --sample_batch_size --scale_lr
    --seed --set_grads_to_none --skip_save_text_encoder --snr_gamma --text_encoder_lr
    --text_encoder_use_attention_mask --tokenizer_max_length --tokenizer_name --train_batch_size
    --train_text_encoder --use_8bit_adam --use_dora --validation_epochs --validation_images --validation_prompt
    --validation_scheduler --validation_steps --variant --with_prior_preservation
""".split()


def test_the_docs_table_lists_every_option_of_the_three_scripts():
    """Issue 34, acceptance 5: each diffusers option is in docs/experts.md's table (mapped or not
    offered), and the suti flags this issue added are real flags of `suti expert train`."""
    import re
    from pathlib import Path

    from orchestration.cli import build_parser

    doc = (Path(__file__).resolve().parents[1] / "docs" / "experts.md").read_text()
    table = doc[doc.index("## diffusers `train_dreambooth.py` options in suti"):]
    rows = [line for line in table.splitlines() if line.startswith("| `--") or line.startswith("| multi-GPU") or line.startswith("| alpha")]
    named = {m for row in rows for m in re.findall(r"`(--[a-z0-9_]+)", row.split(" | ")[0])}
    named |= {f"--{m}" for row in rows for m in re.findall(r"--([a-z0-9_]+)", row.split(" | ")[0])}
    assert not [o for o in DIFFUSERS_OPTIONS if o not in named]
    train = build_parser()._subparsers._group_actions[0].choices["expert"]._subparsers._group_actions[0].choices["train"]
    flags = {s for action in train._actions for s in action.option_strings}
    for flag in ("--lora-alpha", "--lora-dropout", "--use-dora", "--text-encoder-lr", "--adam-weight-decay-text-encoder", "--prodigy-beta3",
                 "--prodigy-decouple", "--no-prodigy-decouple", "--prodigy-use-bias-correction", "--prodigy-safeguard-warmup", "--output-kohya-format"):
        assert flag in flags and flag.removeprefix("--no-").removeprefix("--") in table, flag


def test_kohya_layout_is_refused_for_flux_up_front(instance_dir, tmp_path):
    from generation.config import GenerateConfig

    with pytest.raises(InputError, match="--output-kohya-format: .* not the FLUX model tiny-flux"):
        _config(instance_dir, model="tiny-flux", lora_rank=4, output_kohya_format=True)
    config = GenerateConfig(clusters="c.jsonl", crawl="crawl", output=str(tmp_path / "o"), model="tiny-flux", keep_experts=True, keep_experts_format="kohya",
                            recipe_overrides={"lora_rank": 4})
    with pytest.raises(InputError, match="^--keep-experts-format kohya: .*FLUX"):  # this command's own flag
        config.resolved()
    assert not (tmp_path / "o").exists()
