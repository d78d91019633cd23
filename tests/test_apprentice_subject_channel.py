"""The adapter's global subject channel (IP-Adapter-style decoupled cross-attention):
untrained it is the base model, gated it depends on the image embeddings, dropped demos remove it,
it round-trips through save/from_pretrained, trains with DeepSpeed, and old adapters still load."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from apprentice import ApprenticePipeline, DemoAttentionAdapter
from apprentice.checkpoint import config_differences
from apprentice.train import ApprenticeTrainConfig, train_apprentice
from apprentice.train_config import build_arg_parser, config_from_args
from shard_util import world_shards
from suti.errors import InvalidValueError
from suti.models import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "suti" / "world" / "weights" / "toy_apprentice"


def _demos(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), (40 * i, 200 - 20 * i, 90)) for i in range(n)]


def _channel(tokens: int = 4):
    """Tiny base U-Net with an installed adapter (channel of ``tokens``, 128-d embeddings, no encoder)."""
    base = load_pipeline("tiny")
    adapter = DemoAttentionAdapter.for_unet(base.unet, subject_tokens=tokens, image_embed_dim=128)
    adapter.install(base.unet)
    return base.unet, adapter


def _inputs(b: int = 2):
    gen = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(b, 4, 16, 16, generator=gen), t=torch.tensor([10, 500])[:b], emb=torch.randn(b, 77, 32, generator=gen),
                demo_lat=torch.randn(b, 3, 4, 16, 16, generator=gen), demo_emb=torch.randn(b, 3, 77, 32, generator=gen),
                image=torch.nn.functional.normalize(torch.randn(b, 3, 128, generator=gen), dim=-1))


@torch.no_grad()
def _run(unet, adapter, inp, image=None, mask=None, scale=1.0):
    ctx = adapter.encode_demos(unet, inp["demo_lat"], inp["demo_emb"], image_embeds=inp["image"] if image is None else image, scale=scale)
    ctx.mask = mask
    return unet(inp["x"], inp["t"], inp["emb"], cross_attention_kwargs={"demo": ctx}).sample


def _open_gates(adapter, value: float = 1.0) -> None:
    with torch.no_grad():
        for layer in adapter.subject.values():
            layer.gate.fill_(value)


def test_untrained_channel_equals_the_base_model():
    base = load_pipeline("tiny")
    ref = base("a red cup", height=32, width=32, num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    app = ApprenticePipeline.from_base(load_pipeline("tiny"), subject_tokens=4, image_encoder="toy-clip")
    app.set_progress_bar_config(disable=True)
    assert app.adapter.config.image_embed_dim == 128 and app.adapter.config.cross_attention_dim == 32
    assert len(app.adapter.config.subject_layer_names) == sum(n.endswith("attn2.processor") for n in app.unet.attn_processors)
    ctx = app.encode_demonstrations(_demos(3))
    assert ctx.subject.shape == (1, 4, 32)
    for s_demo in (3.0, 1.0):  # three and two guidance branches
        out = app("a red cup", demo_context=ctx, num_inference_steps=3, guidance_scale=5.0, demo_guidance_scale=s_demo, generator=torch.Generator().manual_seed(0), output_type="pt").images
        assert torch.equal(out, ref)
    assert base.unet.state_dict().keys() == app.unet.state_dict().keys(), "the U-Net is not forked"


def test_ip_projections_start_as_copies_of_the_cross_attention():
    unet, adapter = _channel()
    name = adapter.config.subject_layer_names[0]
    attn = unet.get_submodule(name[: -len(".processor")])
    layer = adapter.subject[name.replace(".processor", "").replace(".", "__")]
    assert torch.equal(layer.to_k_ip.weight, attn.to_k.weight) and torch.equal(layer.to_v_ip.weight, attn.to_v.weight)
    assert float(layer.gate.detach()) == 0.0


def test_open_gate_changes_the_output_through_the_image_embeddings():
    unet, adapter = _channel()
    inp = _inputs()
    plain = _run(unet, adapter, inp)
    _open_gates(adapter)
    gated = _run(unet, adapter, inp)
    assert not torch.allclose(gated, plain)
    other = torch.nn.functional.normalize(torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert not torch.allclose(_run(unet, adapter, inp, image=other), gated)
    # the tokens are image_proj(mean over demos): the order of the demos does not matter
    assert torch.allclose(_run(unet, adapter, inp, image=inp["image"].flip(1)), gated, atol=1e-5)
    assert torch.allclose(_run(unet, adapter, inp, scale=0.0), plain, atol=1e-6)  # scale 0: no channel either


def test_dropped_demos_remove_the_channel():
    unet, adapter = _channel()
    inp = _inputs()
    with torch.no_grad():
        base_out = unet(inp["x"], inp["t"], inp["emb"], cross_attention_kwargs={"demo": None}).sample
    _open_gates(adapter)
    gated = _run(unet, adapter, inp)
    dropped = _run(unet, adapter, inp, mask=torch.tensor([0.0, 1.0]))
    assert torch.allclose(dropped[0], base_out[0], atol=1e-6), "mask 0: neither demo attention nor subject channel"
    assert torch.allclose(dropped[1], gated[1], atol=1e-6)
    assert not torch.allclose(gated[0], base_out[0])


def test_channel_needs_image_embeds_of_the_right_shape():
    unet, adapter = _channel()
    inp = _inputs()
    with pytest.raises(InvalidValueError, match="image_embeds"):
        adapter.encode_demos(unet, inp["demo_lat"], inp["demo_emb"])
    with pytest.raises(InvalidValueError, match="image_embeds"):
        adapter.encode_demos(unet, inp["demo_lat"], inp["demo_emb"], image_embeds=torch.zeros(2, 3, 64))


def test_channel_gets_gradients():
    unet, adapter = _channel()
    unet.requires_grad_(False)
    _open_gates(adapter, 0.5)
    inp = _inputs()
    ctx = adapter.encode_demos(unet, inp["demo_lat"], inp["demo_emb"], image_embeds=inp["image"])
    unet(inp["x"], inp["t"], inp["emb"], cross_attention_kwargs={"demo": ctx}).sample.pow(2).mean().backward()
    for name, p in adapter.named_parameters():
        if name.startswith(("image_proj", "subject")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_adapter_with_channel_round_trips(tmp_path):
    unet, adapter = _channel(tokens=2)
    _open_gates(adapter, 0.3)
    adapter.save_pretrained(tmp_path / "ad", safe_serialization=True)
    loaded = DemoAttentionAdapter.from_pretrained(str(tmp_path / "ad"))
    for key in ("subject_tokens", "image_encoder", "image_embed_dim", "cross_attention_dim", "subject_layer_names", "subject_dims"):
        assert loaded.config[key] == adapter.config[key], key
    a, b = adapter.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    inp = _inputs()
    expected = _run(unet, adapter, inp)
    loaded.install(unet)
    assert torch.equal(_run(unet, loaded, inp), expected)


def test_old_adapters_without_the_channel_still_load(tmp_path):
    base = load_pipeline("tiny")
    adapter = DemoAttentionAdapter.for_unet(base.unet)
    adapter.save_pretrained(tmp_path / "old", safe_serialization=True)
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("subject_tokens", "image_encoder", "image_embed_dim", "cross_attention_dim", "subject_layer_names", "subject_dims"):
        config.pop(key)  # as written before the channel existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    old = DemoAttentionAdapter.from_pretrained(str(tmp_path / "old"))
    assert old.config.subject_tokens == 0 and not old.has_subject_channel and not hasattr(old, "image_proj")
    shipped = DemoAttentionAdapter.from_pretrained(str(SHIPPED))  # the shipped toy apprentice has the channel (issue 17)
    assert shipped.config.subject_tokens == 4 and shipped.has_subject_channel and shipped.config.image_encoder == "toy-clip"
    old.install(base.unet)
    inp = _inputs()
    ctx = old.encode_demos(base.unet, inp["demo_lat"], inp["demo_emb"])  # no image_embeds needed
    assert ctx.subject is None


def test_config_cli_and_resume_keys():
    args = build_arg_parser().parse_args(["--shards", "s/*.tar", "--output", "o", "--subject-tokens", "4", "--image-encoder", "toy-clip"])
    config = config_from_args(args)
    assert config.subject_tokens == 4 and config.image_encoder == "toy-clip"
    config.validate()
    with pytest.raises(InvalidValueError, match="--subject-tokens"):
        ApprenticeTrainConfig(shards="s", output="o", subject_tokens=4, method="reference").validate()
    with pytest.raises(InvalidValueError, match="--image-encoder must be left out without --subject-tokens"):  # not silently ignored
        ApprenticeTrainConfig(shards="s", output="o", image_encoder="toy-clip").validate()
    old = {"model": "tiny", "freeze_base": True, "method": "attention", "optimizer": "adamw", "demo_timestep": 1}
    now = {**old, "subject_tokens": 0, "image_encoder": None}
    assert config_differences(old, now) == []  # checkpoints from before the channel resume
    assert config_differences(old, {**now, "subject_tokens": 4, "image_encoder": "toy-clip"})


def test_training_with_a_subject_channel_saves_a_pipeline_that_samples_and_resumes(tmp_path):
    shards = world_shards(tmp_path / "sh", num_subjects=2, per_subject=2)
    config = ApprenticeTrainConfig(shards=str(shards / "*.tar"), output=str(tmp_path / "app"), model="tiny", steps=2, batch_size=2, learning_rate=1e-2,
                                   freeze_base=True, subject_tokens=4, resolution=32, save_steps=2, deepspeed_config="configs/deepspeed/zero2.json")
    out = train_apprentice(config, progress=False)
    info = json.loads((out / "training.json").read_text())
    assert info["config"]["subject_tokens"] == 4 and info["config"]["image_encoder"] == "toy-clip"  # the tiny preset's scorer
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert any("image_proj" in k for k in saved) and any(k.endswith(".gate") for k in saved)
    pipe = ApprenticePipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.adapter.config.subject_tokens == 4 and pipe.adapter.config.image_encoder == "toy-clip"
    assert any(float(layer.gate.detach()) != 0.0 for layer in pipe.adapter.subject.values()), "the gates trained"
    image = pipe("a cup", demo_images=_demos(3), num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    config.steps = 3  # resume: the channel's weights and optimizer state come back from the checkpoint
    train_apprentice(config, resume="latest", progress=False)
    assert json.loads((out / "training.json").read_text())["steps"] == 3
