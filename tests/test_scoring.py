"""Tests of suti.scoring: metric formulas on hand-made embeddings, delta_clip, the scorer
factory, the offline toy scorers and the errors of the real-checkpoint scorers offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from suti.errors import InputError, ModelLoadError
from suti.scoring import (
    SCORERS,
    Scorer,
    ToyClipScorer,
    clip_i,
    clip_t,
    delta_clip,
    dino,
    get_scorer,
)


pytestmark = pytest.mark.usefixtures("one_thread")


E1, E2, E3 = torch.eye(3)


def test_clip_i_identical_embeddings_give_one():
    v = torch.tensor([0.3, -1.2, 2.0])
    assert clip_i(v.repeat(3, 1), v.repeat(5, 1)) == pytest.approx(1.0, abs=1e-6)
    # rows are normalised first: scale does not matter
    assert clip_i(7 * v.repeat(2, 1), v[None]) == pytest.approx(1.0, abs=1e-6)


def test_clip_i_orthogonal_give_zero_and_mixtures_average():
    assert clip_i(E1.repeat(4, 1), torch.stack([E2, E3])) == pytest.approx(0.0, abs=1e-7)
    # (e1, e2) vs (e1): pairs give 1 and 0 -> 0.5; opposite vectors give -1
    assert clip_i(torch.stack([E1, E2]), E1[None]) == pytest.approx(0.5)
    assert clip_i(-E1[None], E1[None]) == pytest.approx(-1.0)
    assert dino(torch.stack([E1, E2]), E1[None]) == clip_i(torch.stack([E1, E2]), E1[None])


def test_clip_t_matched_pairs_and_broadcast():
    imgs = torch.stack([E1, E2])
    assert clip_t(imgs, imgs) == pytest.approx(1.0)
    assert clip_t(imgs, torch.stack([E2, E1])) == pytest.approx(0.0)
    assert clip_t(imgs, E1) == pytest.approx(0.5)  # one prompt for every image
    assert clip_t(np.array([[1.0, 1.0, 0.0]]), np.array([[2.0, 2.0, 0.0]])) == pytest.approx(1.0)
    with pytest.raises(InputError):
        clip_t(imgs, torch.stack([E1, E2, E3]))
    with pytest.raises(InputError):
        clip_i(torch.ones(2, 3), torch.ones(2, 4))


class ColourScorer(Scorer):
    """Hand-made CLIP: images -> mean RGB, texts -> the RGB of the colour word they contain."""

    name = "colour"
    supports_text = True
    WORDS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}

    def embed_images(self, images):
        arr = np.stack([np.asarray(im.convert("RGB"), np.float32).mean((0, 1)) for im in images])
        return torch.nn.functional.normalize(torch.from_numpy(arr), dim=1)

    def embed_texts(self, texts):
        vec = [next(v for w, v in self.WORDS.items() if w in t) for t in texts]
        return torch.nn.functional.normalize(torch.tensor(vec), dim=1)


def _solid(rgb):
    return Image.new("RGB", (8, 8), rgb)


def test_delta_clip_sign_with_hand_made_scorer():
    scorer = ColourScorer()
    red, blue, purple = _solid((250, 0, 0)), _solid((0, 0, 250)), _solid((150, 0, 150))
    # the target matches the prompt better than every demonstration: positive
    assert delta_clip(scorer, red, "a red toy", [blue, purple]) == pytest.approx(1 - 0.5 ** 0.5)
    # a demonstration matches better: negative
    assert delta_clip(scorer, blue, "a red toy", [red, purple]) < -0.5
    # copying a demonstration gives exactly 0 at best
    assert delta_clip(scorer, purple, "a red toy", [purple]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(InputError):
        delta_clip(scorer, red, "a red toy", [])


def test_get_scorer_names_and_unknown():
    assert set(SCORERS) == {"toy-clip", "toy-identity", "openai-clip-vit-b-32", "dino-vits16"}
    with pytest.raises(InputError, match="toy-clip"):
        get_scorer("clip-of-my-dreams")


def _world_images():
    from suti.world.render import render
    from suti.world.toy_clip import training_world

    world = training_world()
    subject = world.heldout_subjects[0]
    return subject, [render(subject, ctx, rng=np.random.default_rng(i), size=32)
                     for i, ctx in enumerate(("beach", "snow", "grass"))]


def test_toy_scorers_embed_normalised():
    subject, images = _world_images()
    clip = get_scorer("toy-clip")
    assert isinstance(clip, ToyClipScorer) and clip.name == "toy-clip" and clip.supports_text
    img = clip.embed_images(images + [images[0].resize((64, 64))])
    txt = clip.embed_texts(["a red ball on the beach", "a sketch of a cup"])
    assert img.shape == (4, 128) and txt.shape == (2, 128)
    assert torch.allclose(img.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(txt.norm(dim=1), torch.ones(2), atol=1e-5)
    # a 64 px render of the same scene embeds close to the 32 px one
    assert float(img[0] @ img[3]) > 0.9
    ident = get_scorer("toy-identity")
    emb = ident.embed_images(images)
    assert emb.shape[0] == 3 and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not ident.supports_text
    with pytest.raises(NotImplementedError):
        ident.embed_texts(["a cup"])
    with pytest.raises(InputError):
        delta_clip(ident, images[0], "a cup", images[1:])


def test_delta_clip_with_toy_clip_prefers_the_requested_edit():
    """An expert output showing the requested colour edit beats the unedited demonstrations;
    an output that copies a demonstration does not."""
    from suti.world.render import caption, render
    from suti.world.spec import COLORS

    subject, demos = _world_images()
    clip = get_scorer("toy-clip")
    wins = []
    for i, colour in enumerate(c for c in COLORS if c != subject.body_color):
        target = render(subject, "beach", color_override=colour, size=32,
                        rng=np.random.default_rng(100 + i))
        prompt = caption(subject, "beach", color_override=colour)
        wins.append(delta_clip(clip, target, prompt, demos) > 0)
    assert np.mean(wins) >= 0.7
    prompt = caption(subject, "snow")
    assert delta_clip(clip, demos[1], prompt, demos) <= 1e-6


def test_real_scorers_fail_fast_offline_with_a_clear_message(monkeypatch):
    """Offline (HF_HUB_OFFLINE=1) and without cached weights, loading raises ModelLoadError
    naming how to provide the weights (skipped where the weights happen to be cached)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, hint in (("dino-vits16", "timm.create_model"),
                       ("openai-clip-vit-b-32", "create_model_and_transforms")):
        try:
            scorer = get_scorer(name)
        except ModelLoadError as exc:
            assert hint in str(exc) and "offline" in str(exc).lower()
        else:  # pragma: no cover - only where the real weights are cached
            assert scorer.embed_images([_solid((1, 2, 3))]).shape[0] == 1


def test_openai_clip_loads_offline_from_the_hub_cache_with_quick_gelu(tmp_path, monkeypatch):
    """The real-model scorer loads OpenAI's ViT-B/32 through open_clip from the hub cache (here:
    random weights in its layout, written by benchmarks/bench_models.py), offline, with the
    QuickGELU activation those weights were trained with (the plain config has GELU)."""
    import sys
    from pathlib import Path

    import huggingface_hub.constants
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from bench_models import write_random_clip
    finally:
        sys.path.pop(0)
    weights = write_random_clip(tmp_path / "hub", seed=3)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scorer = get_scorer("openai-clip-vit-b-32", device="cpu")
    activations = {type(m).__name__ for m in scorer.model.modules() if "GELU" in type(m).__name__}
    assert activations == {"QuickGELU"}
    saved = load_file(str(weights))
    assert torch.equal(scorer.model.state_dict()["visual.proj"], saved["visual.proj"])  # the file's weights, not a fresh init
    image, text = scorer.embed_images([_solid((10, 200, 30))]), scorer.embed_texts(["a photo of a dog"])
    assert image.shape == text.shape == (1, 512)
    assert torch.allclose(image.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_a_preset_name_as_scorer_means_its_own_scorer():
    from suti.scoring import check_scorer_for_model

    assert check_scorer_for_model("toy", "tiny") == "toy-clip"
    assert check_scorer_for_model("sd15-arch", "sd15-arch") == "openai-clip-vit-b-32"
    with pytest.raises(InputError, match="unknown scorer; known: .*or a model preset"):
        check_scorer_for_model("toyy", "tiny")
    with pytest.raises(InputError, match="cannot judge samples"):
        check_scorer_for_model("toy", "sd15-arch")
