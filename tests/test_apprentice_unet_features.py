"""The subject channel read from the demonstrations' own U-Net features (``--image-encoder
unet-features``): a resampler over every demo token with its place; no image encoder is built; it
round-trips, knows where a feature lies, and trains, samples and resumes."""

import json

import pytest
import torch
from PIL import Image

from apprentice import ApprenticePipeline, DemoAttentionAdapter
from apprentice.adapter import UNET_FEATURES
from apprentice.train import ApprenticeTrainConfig, train_apprentice
from shard_util import world_shards
from suti.errors import InvalidValueError
from suti.models import load_pipeline


def _adapter(tokens: int = 3):
    base = load_pipeline("tiny")
    adapter = DemoAttentionAdapter.for_unet(base.unet, subject_tokens=tokens, image_encoder=UNET_FEATURES)
    adapter.install(base.unet)
    with torch.no_grad():
        for layer in adapter.subject.values():
            layer.gate.fill_(0.5)
    return base.unet, adapter


def _inputs(b: int = 2):
    gen = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(b, 4, 16, 16, generator=gen), t=torch.tensor([10, 900])[:b], emb=torch.randn(b, 77, 32, generator=gen),
                demo_lat=torch.randn(b, 3, 4, 16, 16, generator=gen), demo_emb=torch.randn(b, 3, 77, 32, generator=gen))


@torch.no_grad()
def _run(unet, adapter, inp):
    ctx = adapter.encode_demos(unet, inp["demo_lat"], inp["demo_emb"])  # no image_embeds: the features are the input
    return ctx, unet(inp["x"], inp["t"], inp["emb"], cross_attention_kwargs={"demo": ctx}).sample


def test_the_channel_reads_the_first_down_block_features_without_an_image_encoder():
    unet, adapter = _adapter(tokens=3)
    assert adapter.reads_unet_features and adapter.config.subject_feature_layer.startswith("down_blocks.")
    layer = unet.get_submodule(adapter.config.subject_feature_layer[: -len(".processor")])
    assert adapter.config.image_embed_dim == layer.to_q.in_features
    inp = _inputs()
    ctx, out = _run(unet, adapter, inp)
    assert ctx.subject.shape == (2, 3, unet.config.cross_attention_dim)
    other = dict(inp, demo_lat=inp["demo_lat"].flip(0))  # the other image's demos
    assert not torch.allclose(_run(unet, adapter, other)[0].subject, ctx.subject), "the tokens depend on the demos"
    with torch.no_grad():
        for layer in adapter.subject.values():
            layer.gate.zero_()
        base = unet(inp["x"], inp["t"], inp["emb"]).sample  # no demo context: the base model
    assert torch.allclose(_run(unet, adapter, inp)[1], base, atol=1e-6), "closed gates (and zero-initialised demo attention): the base"
    assert not torch.allclose(out, base, atol=1e-4), "open gates let the channel in"


@torch.no_grad()
def test_the_resampler_knows_where_each_feature_lies():
    """Shuffling the tokens of a demo changes the subject tokens through the position code only:
    with the code's projection zeroed the resampler reads a set and the shuffle changes nothing."""
    _, adapter = _adapter()
    c = adapter.config.image_embed_dim
    features = torch.randn(2 * 3, 64, c, generator=torch.Generator().manual_seed(1))  # (B * n, 8 x 8, C)
    shuffled = features[:, torch.randperm(64, generator=torch.Generator().manual_seed(2))]
    placed = adapter.resample_subject(features, 2, 3, (16, 16))
    assert placed.shape == (2, adapter.config.subject_tokens, adapter.config.cross_attention_dim)
    assert not torch.allclose(adapter.resample_subject(shuffled, 2, 3, (16, 16)), placed, atol=1e-4)
    adapter.feature_position.weight.zero_()
    adapter.feature_position.bias.zero_()
    assert torch.allclose(adapter.resample_subject(shuffled, 2, 3, (16, 16)), adapter.resample_subject(features, 2, 3, (16, 16)), atol=1e-5)


def test_round_trip_and_a_bad_layer(tmp_path):
    unet, adapter = _adapter()
    adapter.save_pretrained(tmp_path / "ad", safe_serialization=True)
    loaded = DemoAttentionAdapter.from_pretrained(str(tmp_path / "ad"))
    for key in ("image_encoder", "subject_feature_layer", "image_embed_dim", "subject_tokens"):
        assert loaded.config[key] == adapter.config[key], key
    inp = _inputs()
    expected = _run(unet, adapter, inp)[1]
    loaded.install(unet)
    assert torch.equal(_run(unet, loaded, inp)[1], expected)
    with pytest.raises(InvalidValueError, match="subject_feature_layer must be one of the U-Net's self-attentions"):
        DemoAttentionAdapter.for_unet(load_pipeline("tiny").unet, subject_tokens=2, image_encoder=UNET_FEATURES, subject_feature_layer="mid_block.nope")


def test_training_with_unet_features_builds_no_scorer_and_samples(tmp_path, monkeypatch):
    import suti.scoring

    def no_scorer(*a, **k):
        raise AssertionError("no image encoder is needed for unet-features")

    monkeypatch.setattr(suti.scoring, "get_scorer", no_scorer)
    shards = world_shards(tmp_path / "sh", num_subjects=2, per_subject=2)
    config = ApprenticeTrainConfig(shards=str(shards / "*.tar"), output=str(tmp_path / "app"), model="tiny", steps=2, batch_size=2, learning_rate=1e-2,
                                   freeze_base=True, subject_tokens=2, image_encoder=UNET_FEATURES, resolution=32, save_steps=2,
                                   deepspeed_config="configs/deepspeed/zero2.json")
    config.validate()
    out = train_apprentice(config, progress=False)
    assert json.loads((out / "training.json").read_text())["config"]["image_encoder"] == UNET_FEATURES
    pipe = ApprenticePipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.adapter.reads_unet_features
    assert any(float(layer.gate.detach()) != 0.0 for layer in pipe.adapter.subject.values()), "the gates trained"
    demos = [Image.new("RGB", (32, 32), (40 * i, 200 - 20 * i, 90)) for i in range(3)]
    assert pipe("a cup", demo_images=demos, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0].size == (32, 32)
