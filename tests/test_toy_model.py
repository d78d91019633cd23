"""The ``toy`` preset: a world-pretrained text-to-image model that follows its captions and on
which DreamBooth experts learn held-out subjects (offline, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from experts import load_expert, resolve_config
from experts.data import load_instance_images
from experts.evaluate import denoising_loss
from experts.train import train_expert
from suti.models import default_resolution, load_pipeline, load_preset, preset_folder
from suti.world import export_subject, make_world
from suti.world.toy_t2i import WEIGHTS_DIR
from suti.world.training.scenes import heldout_scenes

pytestmark = pytest.mark.skipif(not (WEIGHTS_DIR / "model_index.json").is_file(),
                                reason="no shipped toy weights (building them takes ~25 min)")


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return load_pipeline("toy")


def test_toy_preset_loads_offline(toy, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    preset = load_preset("toy")
    assert preset["source"] == "builder" and default_resolution("toy") == 32
    folder = preset_folder("toy")
    assert list((folder / "unet").glob("*.safetensors"))
    assert json.loads((folder / "model_index.json").read_text())["safety_checker"] == [None, None]
    assert toy.unet.dtype == torch.float32 and toy.vae.config.scaling_factor != 0.18215
    image = toy("a red ball on the beach", height=32, width=32, num_inference_steps=4,
                generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_right_captions_denoise_better_than_shuffled(toy):
    """Held-out subjects (never seen in pretraining), same images/noise/timesteps."""
    images, captions, _ = heldout_scenes(32, seed=0)
    right = denoising_loss(toy, images, captions, seed=0, draws=2)
    shuffled = denoising_loss(toy, images, captions[1:] + captions[:1], seed=0, draws=2)
    assert right <= 0.95 * shuffled, (right, shuffled)


@pytest.mark.slow
def test_dreambooth_expert_learns_a_heldout_subject(tmp_path):
    """A held-out subject (never seen in pretraining): the expert denoises its photos better
    than the base model and its samples carry more of the subject's identity (probe) than the
    base model's samples for the same prompts and seeds."""
    from suti.world.probe import load_probe
    from suti.world.toy_t2i import pretrain_world

    world = pretrain_world()
    subject = world.heldout_subjects[0]
    instance = tmp_path / "instance"
    export_subject(world, subject.subject_id, instance, n=4, seed=0, size=32)
    config = resolve_config("dreambooth", {
        "model": "toy", "instance_dir": str(instance), "class_noun": subject.class_noun,
        "steps": 300, "num_class_images": 8, "seed": 0,
    })
    assert config.learning_rate_scale == load_preset("toy")["learning_rate_scale"]
    assert config.train_text_encoder, "the toy preset's DreamBooth default (expert_defaults)"
    out = tmp_path / "expert"
    info = train_expert(config, out, progress=False)
    base_pipe, expert_pipe = load_pipeline("toy"), load_expert(out)
    images = load_instance_images(instance, 32)
    base = denoising_loss(base_pipe, images, info.instance_prompt, seed=1)
    expert = denoising_loss(expert_pipe, images, info.instance_prompt, seed=1)
    assert expert < 0.9 * base, (expert, base)

    prompts = ["a {} on the beach", "a {} in the snow", "a {} wearing a hat", "a {} in the city"]

    def samples(pipe, phrase):
        return [pipe(p.format(phrase), height=32, width=32, num_inference_steps=25, guidance_scale=5.0,
                     generator=torch.Generator().manual_seed(k)).images[0] for p in prompts for k in range(2)]

    probe = load_probe()
    base_score = probe.identity_attribute_score(samples(base_pipe, subject.class_noun), subject)
    expert_score = probe.identity_attribute_score(samples(expert_pipe, f"{info.identifier} {subject.class_noun}"), subject)
    assert expert_score > base_score + 0.1, (expert_score, base_score)


def test_toy_apprentice_assembles_from_shipped_weights_offline(monkeypatch):
    """The shipped adapter + the toy base -> an ApprenticePipeline folder in the cache, loaded
    by one call; its U-Net is the (frozen) toy base's and its adapter was trained (non-zero)."""
    from apprentice.sample import load_apprentice
    from apprentice.toy import WEIGHTS, toy_apprentice_folder

    if not (WEIGHTS / "config.json").is_file():
        pytest.skip("the toy apprentice's adapter is not shipped")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = toy_apprentice_folder()
    assert (folder / "model_index.json").is_file() and toy_apprentice_folder() == folder
    app = load_apprentice("toy")
    base = load_pipeline("toy")
    for (name, a), b in zip(app.unet.state_dict().items(), base.unet.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(p.abs().sum() > 0 for n, p in app.adapter.named_parameters() if "to_out" in n)
    image = app("a cup on the beach", demo_images=[image for image in base("a red cup", num_images_per_prompt=3, height=32, width=32, num_inference_steps=2).images], num_inference_steps=3).images[0]
    assert image.size == (32, 32)


def test_toy_apprentice_denoises_heldout_subjects_better_with_their_demonstrations():
    """Issues 5 and 17: on held-out world subjects (never seen by the toy base nor by the
    apprentice's training crawl), the shipped toy apprentice's denoising loss on the subject's
    other photos is lower with 3 demonstrations than without (same noise and timesteps) when the
    prompts name only the class, so that only the demonstrations can carry the identity (0.976
    measured). With full captions, which already name colour, pattern and context, the demos
    must not cost more than 1% (1.0015 measured; the apprentice trains on class-only prompts)."""
    from apprentice.evaluate import heldout_demo_loss
    from apprentice.sample import load_apprentice
    from apprentice.toy import WEIGHTS

    if not (WEIGHTS / "config.json").is_file():
        pytest.skip("the toy apprentice's adapter is not shipped")
    torch.manual_seed(0)
    app = load_apprentice("toy")
    with_demos, without = heldout_demo_loss(app, 12, seed=7, prompt_mode="class")
    assert with_demos < 0.99 * without, (with_demos, without)
    with_demos, without = heldout_demo_loss(app, 12, seed=7)
    assert with_demos < 1.01 * without, (with_demos, without)


def test_continue_pretraining_keeps_the_latent_space_and_records_its_history(tmp_path):
    """``suti world pretrain --continue-from``: the VAE encoder (the latent space the U-Net was
    trained on) is untouched, decoder and U-Net move, the result loads through
    ``from_pretrained`` and its summary carries the earlier run's."""
    from diffusers import StableDiffusionPipeline

    from suti.world.toy_t2i import SUMMARY_FILE
    from suti.world.training.t2i import continue_t2i

    out = tmp_path / "t2i"
    summary = continue_t2i(out, minutes=None, steps=3, decoder_minutes=0.05, subjects=300,
                           progress=False)
    assert not (tmp_path / "t2i.partial").exists()
    assert summary["unet_steps"] == 3 and summary["decoder_steps"] >= 1
    assert summary["continued_from"]["unet_steps"] > 0
    assert summary["total_unet_steps"] == summary["continued_from"].get(
        "total_unet_steps", summary["continued_from"]["unet_steps"]) + 3
    assert json.loads((out / SUMMARY_FILE).read_text())["world"]["num_subjects"] == 300
    new = StableDiffusionPipeline.from_pretrained(out)
    old = load_pipeline("toy")
    for (name, a), b in zip(new.vae.encoder.state_dict().items(), old.vae.encoder.state_dict().values()):
        assert torch.equal(a, b), name  # both are the shipped fp16 weights as float32
    moved = lambda m, n: any(not torch.equal(a, b) for a, b in zip(m.parameters(), n.parameters()))  # noqa: E731
    assert moved(new.vae.decoder, old.vae.decoder) and moved(new.unet, old.unet)
    with pytest.raises(FileExistsError):
        continue_t2i(out, minutes=None, steps=1, progress=False)
