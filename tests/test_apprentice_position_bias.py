"""The demonstration attention's learned position bias (``--demo-position-bias``): its values by
hand, its effect (a strong bias copies each position from the same place in the demos), a zero
bias is the plain adapter, it round-trips through save/from_pretrained and old adapters load."""

import pytest
import torch

from apprentice import DemoAttentionAdapter
from apprentice.attention import _shared_attention, position_bias
from apprentice.checkpoint import config_differences
from apprentice.train_config import build_arg_parser, config_from_args
from suti.errors import InvalidValueError
from suti.models import load_pipeline


def test_bias_values_by_hand():
    w = torch.tensor([1.0, 0.5])
    bias = position_bias(w, queries=4, keys_per_demo=4, num_demos=2, latent_size=(8, 8))  # 2x2 grids
    assert bias.shape == (2, 4, 8)
    # query 0 at cell (0, 0); keys at (0, 0), (0, 1), (1, 0), (1, 1), twice (two demos); d in cells
    assert bias[0, 0].tolist() == pytest.approx([0.0, -1.0, -1.0, -2.0] * 2, abs=1e-6)
    assert bias[1, 3].tolist() == pytest.approx([-1.0, -0.5, -0.5, 0.0] * 2, abs=1e-6)
    # demos at twice the resolution (4x4 grid), distances still in the query grid's cells
    fine = position_bias(torch.ones(1), queries=4, keys_per_demo=16, num_demos=1, latent_size=(8, 8))
    assert fine.shape == (1, 4, 16)
    assert fine[0, 0, 0].item() == pytest.approx(-(0.25**2 + 0.25**2))  # key centre (0.125, 0.125) * 2 cells
    assert fine[0, 0, 5].item() == pytest.approx(-(0.25**2 + 0.25**2))  # (0.375, 0.375) * 2 = (0.75, 0.75) vs (0.5, 0.5)
    # a non-square grid (2 x 4 tokens for 4:8 latents)
    wide = position_bias(torch.ones(1), queries=8, keys_per_demo=8, num_demos=1, latent_size=(4, 8))
    assert wide[0, 0, 7].item() == pytest.approx(-(1.0**2 + 3.0**2))
    # a wide image (2 x 4 tokens) against square demos (2 x 2): matched by relative place
    mixed = position_bias(torch.ones(1), queries=8, keys_per_demo=4, num_demos=1, latent_size=(8, 8), query_size=(4, 8))
    assert mixed.shape == (1, 8, 4)
    assert mixed[0, 0].argmax().item() == 0 and mixed[0, 7].argmax().item() == 3  # corners to corners
    assert mixed[0, 0, 1].item() == pytest.approx(-(2.5**2))  # query (0.5, 0.5) cells; key (0.25, 0.75) * (2, 4) = (0.5, 3.0)
    with pytest.raises(ValueError, match="grid"):
        position_bias(torch.ones(1), queries=7, keys_per_demo=7, num_demos=1, latent_size=(8, 8))


def test_strong_bias_takes_each_position_from_the_same_place_in_the_demos():
    gen = torch.Generator().manual_seed(0)
    b, heads, tokens, d = 2, 2, 16, 8
    query = torch.randn(b, heads, tokens, d, generator=gen)
    keys = torch.randn(1, heads, tokens, d, generator=gen)
    values = torch.randn(1, heads, tokens, d, generator=gen)
    strong = position_bias(torch.full((heads,), 200.0), tokens, tokens, 1, None)
    out = _shared_attention(query, keys, values, strong)  # shared keys/values (batch folded)
    assert torch.allclose(out, values.expand(b, -1, -1, -1), atol=1e-4), "one demo: each position's own value"
    # without the bias the content decides, not the position
    assert not torch.allclose(_shared_attention(query, keys, values), values.expand(b, -1, -1, -1), atol=1e-2)
    # shared (batch 1) and tiled keys give the same attention under the bias
    tiled = _shared_attention(query, keys.expand(b, -1, -1, -1), values.expand(b, -1, -1, -1), strong)
    assert torch.allclose(out, tiled, atol=1e-6)
    # three demos and a query that says nothing (all logits equal but the bias): the mean over
    # the demos of the value at the same place
    n = 3
    values3 = torch.randn(1, heads, n * tokens, d, generator=gen)
    out3 = _shared_attention(torch.zeros(b, heads, tokens, d), torch.randn(1, heads, n * tokens, d, generator=gen), values3,
                             position_bias(torch.full((heads,), 200.0), tokens, tokens, n, None))
    assert torch.allclose(out3, values3[0].view(heads, n, tokens, d).mean(1).expand(b, -1, -1, -1), atol=1e-4)


def _run(adapter, unet, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    demo_lat, demo_emb = torch.randn(2, 3, 4, 16, 16, generator=gen), torch.randn(2, 3, 77, 32, generator=gen)
    x, emb = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        ctx = adapter.encode_demos(unet, demo_lat, demo_emb)
        assert ctx.latent_size == (16, 16)
        return unet(x, torch.tensor([900, 900]), emb, cross_attention_kwargs={"demo": ctx}).sample


def test_zero_bias_is_the_plain_adapter_and_a_trained_one_round_trips(tmp_path):
    unet = load_pipeline("tiny").unet
    plain = DemoAttentionAdapter.for_unet(unet)
    biased = DemoAttentionAdapter.for_unet(unet, position_bias=True)
    torch.manual_seed(3)
    for layer in plain.layers.values():
        torch.nn.init.normal_(layer.to_out.weight, std=0.05)
    missing = biased.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.endswith("position_weight") for k in missing)
    plain.install(unet)
    ref = _run(plain, unet)
    biased.install(unet)
    assert torch.equal(_run(biased, unet), ref), "w = 0 adds nothing"
    with torch.no_grad():
        for layer in biased.layers.values():
            assert layer.position_weight.shape == (unet.get_submodule(biased.config.layer_names[0][: -len(".processor")]).heads,)
            layer.position_weight.fill_(2.0)
    moved = _run(biased, unet)
    assert not torch.allclose(moved, ref, atol=1e-4)
    biased.save_pretrained(tmp_path / "adapter")
    loaded = DemoAttentionAdapter.from_pretrained(tmp_path / "adapter")
    assert loaded.config.position_bias is True
    loaded.install(unet)
    assert torch.equal(_run(loaded, unet), moved)
    # an adapter saved before the option existed loads without it
    plain.save_pretrained(tmp_path / "old")
    assert DemoAttentionAdapter.from_pretrained(tmp_path / "old").config.position_bias is False


def test_pipeline_samples_other_sizes_than_the_demos_with_the_bias():
    from PIL import Image

    from apprentice import ApprenticePipeline

    app = ApprenticePipeline.from_base(load_pipeline("tiny"), position_bias=True)
    app.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for layer in app.adapter.layers.values():
            torch.nn.init.normal_(layer.to_out.weight, std=0.05)
            layer.position_weight.fill_(1.0)
    demos = [Image.new("RGB", (32, 32), (40 * i, 200 - 20 * i, 90)) for i in range(3)]
    ctx = app.encode_demonstrations(demos)
    for height, width in ((32, 32), (32, 64), (64, 32)):
        out = app("a cup", demo_context=ctx, num_inference_steps=2, height=height, width=width, generator=torch.Generator().manual_seed(0), output_type="pt").images
        assert out.shape == (1, 3, height, width) and torch.isfinite(out).all()
    assert ctx.query_size is None, "the request's cached context is not changed by a call"


def test_cli_option_and_resume_check():
    args = build_arg_parser().parse_args(["--shards", "x.tar", "--output", "o", "--demo-position-bias"])
    config = config_from_args(args)
    assert config.demo_position_bias is True
    config.validate()
    with pytest.raises(InvalidValueError, match="--demo-position-bias must be off with --method reference"):
        config_from_args(build_arg_parser().parse_args(["--shards", "x.tar", "--output", "o", "--demo-position-bias", "--method", "reference"])).validate()
    saved = dict(config.__dict__, demo_position_bias=False)
    assert [d.split()[0] for d in config_differences(saved, config.__dict__)] == ["demo_position_bias"]
    # a checkpoint written before the option existed resumes without it, not with it
    old = {k: v for k, v in config.__dict__.items() if k != "demo_position_bias"}
    assert config_differences(old, dict(config.__dict__, demo_position_bias=False)) == []
    assert config_differences(old, config.__dict__) != []
