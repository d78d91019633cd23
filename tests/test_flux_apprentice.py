"""The apprentice on FLUX (issue 33): demonstrations as extra tokens of every joint-attention
block, their keys and values computed once per request, exact equality with the base when
untrained, DeepSpeed training on shards and sampling with three demonstrations."""

import json

import pytest
import torch
from PIL import Image

from apprentice.flux import FluxApprenticeModule, FluxDemoAdapter, demo_position_ids
from apprentice.flux_pipeline import FluxApprenticePipeline
from orchestration.cli import main
from shard_util import world_shards
from suti.conditioning import encode_prompt
from suti.denoisers import denoiser_for
from suti.models import load_pipeline


def _demos(n=3):
    return [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "green", "white")[:n]]


def test_untrained_flux_apprentice_equals_the_base_exactly():
    """Zero-initialised output projections: without demos the apprentice samples FluxPipeline's
    image bit for bit (same generator, steps, guidance); with demos its velocity is the base's."""
    base = load_pipeline("tiny-flux")
    kw = dict(num_inference_steps=3, height=32, width=32, guidance_scale=3.5, output_type="pt")
    expected = base("a photo of a dog", generator=torch.Generator().manual_seed(0), **kw).images
    app = FluxApprenticePipeline.from_base(base)
    assert torch.equal(app("a photo of a dog", generator=torch.Generator().manual_seed(0), **kw).images, expected)

    module = FluxApprenticeModule(app.transformer, app.adapter, vae_scale_factor=2)
    x, t = torch.randn(2, 16, 16, 16), torch.tensor([700.0, 200.0])
    cond = encode_prompt(base, ["a dog", "a cat"], max_sequence_length=16)
    demo_cond = encode_prompt(base, ["a photo"] * 6, max_sequence_length=16)
    with torch.no_grad():
        plain = denoiser_for(base)(x, t, cond)
        with_demos = module(x, t, cond.encoder_hidden_states, torch.randn(2, 3, 16, 16, 16), demo_cond.encoder_hidden_states.view(2, 3, 16, -1), torch.ones(2),
                            cond.added_cond_kwargs, demo_cond.added_cond_kwargs)
    assert torch.equal(with_demos, plain)


def test_demonstrations_reach_every_joint_attention_block_and_are_masked_per_row():
    """A trained (non-zero) branch changes the prediction through both kinds of block; rows whose
    demos are dropped (mask 0, classifier-free guidance) get exactly the base's prediction."""
    base = load_pipeline("tiny-flux")
    adapter = FluxDemoAdapter.for_transformer(base.transformer)
    names = adapter.config.layer_names
    assert any(n.startswith("transformer_blocks.") for n in names) and any(n.startswith("single_transformer_blocks.") for n in names)
    cond = encode_prompt(base, ["a dog", "a cat"], max_sequence_length=16)
    demo_cond = encode_prompt(base, ["a photo"] * 4, max_sequence_length=16)
    x, t = torch.randn(2, 16, 16, 16), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        plain = denoiser_for(base)(x, t, cond)
        adapter.install(base.transformer)
        for layer in adapter.layers.values():
            torch.nn.init.normal_(layer.to_out.weight, std=0.05)
        module = FluxApprenticeModule(base.transformer, adapter, vae_scale_factor=2)
        out = module(x, t, cond.encoder_hidden_states, torch.randn(2, 2, 16, 16, 16), demo_cond.encoder_hidden_states.view(2, 2, 16, -1), torch.tensor([1.0, 0.0]),
                     cond.added_cond_kwargs, demo_cond.added_cond_kwargs)
    assert (out[0] - plain[0]).abs().max() > 1e-3, "the demonstrations change the first row"
    assert torch.equal(out[1], plain[1]), "the second row's demos are dropped"


def test_one_requests_demonstration_keys_and_values_are_computed_once(monkeypatch):
    """Acceptance 3: one request with 3 demos, 2 images, 4 steps and demo guidance encodes the
    demonstrations in one transformer pass; every step reuses the cached keys and values."""
    app = FluxApprenticePipeline.from_base(load_pipeline("tiny-flux"))
    calls = {"encode": 0, "capture": 0, "steps": 0}
    original = FluxDemoAdapter.encode_demos

    def counting(self, *args, **kwargs):
        calls["encode"] += 1
        return original(self, *args, **kwargs)

    def hook(module, args, kwargs):
        mode = (kwargs.get("joint_attention_kwargs") or {}).get("demo")
        calls["capture" if mode is not None and mode.mode == "capture" else "steps"] += 1

    monkeypatch.setattr(FluxDemoAdapter, "encode_demos", counting)
    handle = app.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        images = app("a dog on the beach", demo_images=_demos(3), num_images=2, num_inference_steps=4, demo_guidance_scale=2.0,
                     generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    finally:
        handle.remove()
    assert len(images) == 2
    assert calls == {"encode": 1, "capture": 1, "steps": 4}, calls


def test_demo_position_ids_keep_each_demonstration_apart():
    frame = demo_position_ids(2, 2, 3, "frame")
    assert frame.shape == (12, 3) and frame[:6, 0].tolist() == [1] * 6 and frame[6:, 0].tolist() == [2] * 6
    assert frame[:6, 1:].tolist() == frame[6:, 1:].tolist() == [[r, c] for r in range(2) for c in range(3)]
    diagonal = demo_position_ids(2, 2, 3, "diagonal")
    assert diagonal[:, 0].abs().sum() == 0 and diagonal[:6, 1:].min(0).values.tolist() == [2, 3] and diagonal[6:, 1:].min(0).values.tolist() == [4, 6]


def test_flux_apprentice_trains_with_deepspeed_and_samples_three_demonstrations(tmp_path, capsys):
    """Acceptance 3: `suti apprentice train --model tiny-flux` runs with DeepSpeed on shards, the
    transformer as LoRA (--base-lora-rank, merged into the saved weights) beside the adapter, and
    writes a FluxApprenticePipeline folder; `suti apprentice sample` with 3 demos writes images."""
    shards = world_shards(tmp_path / "shards", num_subjects=2, per_subject=2, size=32)
    out = tmp_path / "apprentice"
    assert main(["apprentice", "train", "--model", "tiny-flux", "--shards", str(shards / "*.tar"), "--steps", "2", "--batch-size", "1",
                 "--save-steps", "0", "--learning-rate", "1e-3", "--demo-positions", "diagonal", "--base-lora-rank", "4", "--output", str(out)]) == 0
    info = json.loads((out / "training.json").read_text())
    assert info["prediction_type"] == "flow_matching" and info["config"]["demo_positions"] == "diagonal"
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "FluxApprenticePipeline"
    from apprentice.sample import load_apprentice

    pipe = load_apprentice(str(out))
    assert isinstance(pipe, FluxApprenticePipeline) and pipe.adapter.config.demo_positions == "diagonal"
    assert any(layer.to_out.weight.abs().sum() > 0 for layer in pipe.adapter.layers.values()), "the demonstration branch trained"
    base = load_pipeline("tiny-flux").transformer.state_dict()
    saved = pipe.transformer.state_dict()
    assert saved.keys() == base.keys(), "the LoRA is merged: a plain transformer"
    changed = [k for k in base if not torch.equal(saved[k], base[k])]
    assert changed and all(k.endswith(".weight") and any(t in k for t in ("attn.", "ff")) for k in changed), changed[:5]
    demos = []
    for i, image in enumerate(_demos(3)):
        image.save(tmp_path / f"d{i}.png")
        demos.append(str(tmp_path / f"d{i}.png"))
    capsys.readouterr()
    assert main(["apprentice", "sample", "--apprentice", str(out), "--demos", *demos, "--prompt", "a toy on the beach", "--num-images", "2",
                 "--steps", "2", "--output", str(tmp_path / "samples")]) == 0
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["image_000.png", "image_001.png"]
    # acceptance 4: suti eval --method apprentice (the FLUX apprentice folder carries its base) scores it (FLUX's guidance 3.5 by default)
    capsys.readouterr()
    assert main(["eval", "--dataset", "world:1", "--method", "apprentice", "--apprentice", str(out), "--prompts", "1",
                 "--images-per-prompt", "1", "--sample-steps", "2", "--output", str(tmp_path / "eval")]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["method"] == "apprentice" and scores["images"] == 1 and 0 <= scores["CLIP-I"] <= 1


@pytest.mark.parametrize("flag", [["--subject-tokens", "4"], ["--method", "reference"], ["--demo-position-bias"], ["--snr-gamma", "5"]])
def test_u_net_only_apprentice_options_are_refused_on_flux_in_one_line(tmp_path, capsys, flag):
    shards = world_shards(tmp_path / "shards", num_subjects=1, per_subject=1, size=32)
    code = main(["apprentice", "train", "--model", "tiny-flux", "--shards", str(shards / "*.tar"), "--output", str(tmp_path / "o"), *flag])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and flag[0] in err[0], err
    assert not (tmp_path / "o").exists()


def test_serve_runs_a_flux_apprentice_and_flux_expert_jobs(tmp_path):
    """Acceptance 4: `suti serve --model tiny-flux` with a FLUX apprentice answers /v1/generate,
    trains a FLUX LoRA expert job and generates with it, at FLUX's distilled guidance by default."""
    import io

    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.settings import Settings

    folder = tmp_path / "flux-apprentice"
    FluxApprenticePipeline.from_base(load_pipeline("tiny-flux")).save_pretrained(str(folder), safe_serialization=True)
    settings = Settings(model="tiny-flux", apprentice=str(folder), data_dir=tmp_path / "data", torch_threads=1, preload=False, default_steps=2,
                        max_concurrency=1, max_queue=4, request_timeout=120.0, job_stale_seconds=30.0)

    def upload(n):
        out = []
        for i, image in enumerate(_demos(n)):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append(("images", (f"{i}.png", buf.getvalue(), "image/png")))
        return out

    with TestClient(create_app(settings)) as c:
        assert (settings.apprentice_guidance_scale, settings.expert_guidance_scale) == (3.5, 3.5)
        r = c.post("/v1/generate", files=upload(3), data={"prompt": "a toy on the beach", "seed": 1, "steps": 2})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        assert Image.open(io.BytesIO(r.content)).size == (32, 32)
        job = c.post("/v1/experts", files=upload(4), data={"class_noun": "toy", "steps": 2})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        import time

        deadline = time.monotonic() + 240
        while (state := c.get(f"/v1/experts/{job_id}").json())["status"] not in ("done", "failed", "cancelled") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert state["status"] == "done", state
        r = c.post(f"/v1/experts/{job_id}/generate", data={"prompt": "a {V} {class} on the beach", "seed": 1, "steps": 2})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text


def test_base_lora_on_a_u_net_apprentice_trains_only_lora_and_adapter_and_merges():
    """--base-lora-rank is the family's LoRA (U-Net: diffusers' attention projections): only the
    LoRA and the demonstration layers train, the untrained apprentice is the base, and merging
    leaves the U-Net's own keys."""
    from apprentice.adapter import DemoAttentionAdapter
    from apprentice.engine import ApprenticeModule, add_base_lora, merge_base_lora

    base = load_pipeline("tiny")
    keys = set(base.unet.state_dict())
    adapter = DemoAttentionAdapter.for_unet(base.unet)
    adapter.install(base.unet)
    base.unet.requires_grad_(False)
    add_base_lora(base, 4)
    module = ApprenticeModule(base.unet, adapter)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("adapter.") for n in trainable)
    assert any(".to_q.lora_A." in n for n in trainable) and not any("ff." in n for n in trainable)
    for name, p in base.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.01)
    merge_base_lora(module)
    assert set(base.unet.state_dict()) == keys
