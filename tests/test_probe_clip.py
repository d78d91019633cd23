"""Tests of the synthetic world's measuring models: the toy CLIP (suti.world.toy_clip) and the
attribute probe (suti.world.probe), with the shipped weights, on held-out subjects only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from suti.errors import ModelLoadError
from suti.world import make_world, render, sample_scene
from suti.world.probe import IDENTITY_ATTRS, load_probe
from suti.world.toy_clip import (
    WEIGHTS_DIR,
    encode_images,
    encode_texts,
    load_toy_clip,
    retrieval_accuracy,
    training_world,
)
from suti.world.training.clip import positives, scene_caption


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip():
    return load_toy_clip()


@pytest.fixture(scope="module")
def probe():
    return load_probe()


@pytest.fixture(scope="module")
def heldout():
    return training_world().heldout_subjects


def test_weights_are_shipped_small_and_loadable(clip):
    for name in ("toy_clip.safetensors", "toy_clip.json", "probe.safetensors", "probe.json"):
        assert (WEIGHTS_DIR / name).is_file(), name
    size = sum((WEIGHTS_DIR / n).stat().st_size for n in ("toy_clip.safetensors",
                                                           "probe.safetensors"))
    assert size < 10 * 2**20
    model, preprocess, tokenizer = clip
    assert not model.training
    assert preprocess(render(heldout_subject(), "beach", size=64)).shape == (3, 32, 32)
    assert tokenizer(["a red ball", "a sketch of a cup in the snow"]).shape == (2, 32)


def heldout_subject():
    return training_world().heldout_subjects[0]


def test_missing_weights_dir_is_a_model_load_error(tmp_path: Path):
    with pytest.raises(ModelLoadError):
        load_toy_clip(tmp_path)
    with pytest.raises(ModelLoadError):
        load_probe(tmp_path)


def test_training_world_keeps_the_default_worlds_heldout_subjects_unseen():
    big = training_world()
    small = make_world(24, seed=0)
    train_ids = {s.subject_id for s in big.train_subjects}
    for s in small.heldout_subjects:
        assert s.subject_id not in train_ids and big.subject(s.subject_id) == s


def test_multi_positive_targets():
    world = training_world()
    s = world.train_subjects[0]
    meta = {"color": s.body_color, "context": "beach", "accessory": None, "style": None,
            "edit": None}
    other = dict(meta, context="snow")
    full, stated_full = scene_caption(s, meta, "full")
    short, stated_short = scene_caption(s, meta, "nocontext")
    assert full.endswith("on the beach") and "context" not in stated_short
    from suti.world.training.clip import _codes, scene_truth

    truth = np.array([_codes(scene_truth(s, meta)), _codes(scene_truth(s, other))])
    caps = np.array([_codes(stated_full), _codes(stated_short)])
    pos = positives(truth, caps)
    # the context-free caption holds for both scenes, the beach caption only for the first
    assert pos.tolist() == [[True, True], [False, True]]


def test_toy_clip_retrieves_captions_of_heldout_subjects(clip, heldout):
    model, _, tokenizer = clip
    acc = retrieval_accuracy(model, heldout, n=64, seed=99, tokenizer=tokenizer)
    assert acc["chance"] == pytest.approx(1 / 64)
    assert acc["image_to_text"] >= 5 * acc["chance"]
    assert acc["text_to_image"] >= 5 * acc["chance"]


def test_toy_clip_text_reflects_edits(clip, heldout):
    """The caption naming the edit a scene shows beats the one naming another value."""
    from suti.world.render import caption
    from suti.world.spec import COLORS, STYLES

    model, _, tokenizer = clip
    rng = np.random.default_rng(5)
    wins = []
    for subject in heldout[:24]:
        colours = [c for c in COLORS if c != subject.body_color]
        shown, other = (colours[int(i)] for i in rng.choice(len(colours), 2, replace=False))
        img = render(subject, "grass", color_override=shown, size=32, rng=rng)
        texts = [caption(subject, "grass", color_override=c) for c in (shown, other)]
        sims = encode_images(model, [img]) @ encode_texts(model, texts, tokenizer).T
        wins.append(bool(sims[0, 0] > sims[0, 1]))
        style, other_style = rng.choice(list(STYLES), 2, replace=False)
        img = render(subject, "city", style=str(style), size=32, rng=rng)
        texts = [caption(subject, "city", style=str(s)) for s in (style, other_style)]
        sims = encode_images(model, [img]) @ encode_texts(model, texts, tokenizer).T
        wins.append(bool(sims[0, 0] > sims[0, 1]))
    assert np.mean(wins) >= 0.75


def test_probe_predicts_every_attribute(probe, heldout):
    subject = heldout[1]
    img = render(subject, "snow", accessory="hat", size=32, rng=np.random.default_rng(0))
    (row,) = probe.predict([img])
    assert set(row) == {"class_name", "body_color", "pattern", "pattern_color", "part",
                        "aspect", "context", "accessory", "style"}
    acc = probe.attribute_accuracy([img, img.resize((64, 64))],
                                   {"context": "snow", "class": subject.class_name})
    assert set(acc) == {"context", "class_name"} and acc["context"] == 1.0


def test_probe_identity_accuracy_right_vs_wrong_subject(probe):
    """On fresh renders of the default world's held-out subjects the probe recognises the
    subject, and rejects another subject of the same class."""
    world = make_world(24, seed=0)
    rng = np.random.default_rng(2024)
    right, wrong = [], []
    for subject in world.heldout_subjects:
        images = [sample_scene(subject, rng, size=32)[0] for _ in range(8)]
        other = next(s for s in training_world().heldout_subjects
                     if s.class_name == subject.class_name and s.identity() != subject.identity())
        right.append(probe.identity_accuracy(images, subject))
        wrong.append(probe.identity_accuracy(images, other))
    assert np.mean(right) > 0.7, right
    assert np.mean(wrong) < 0.2, wrong
    assert IDENTITY_ATTRS == ("class_name", "body_color", "pattern", "part", "aspect")


def test_probe_colour_edit_and_sketch(probe, heldout):
    subject = heldout[2]
    rng = np.random.default_rng(3)
    colour = "green" if subject.body_color != "green" else "blue"
    edited = [render(subject, "beach", color_override=colour, size=32, rng=rng)
              for _ in range(6)]
    assert probe.attribute_accuracy(edited, {"body_color": colour})["body_color"] >= 0.5
    sketches = [render(subject, "snow", style="sketch", size=32, rng=rng) for _ in range(4)]
    acc = probe.attribute_accuracy(sketches, {"style": "sketch", "body_color": "red"})
    assert acc["style"] == 1.0
    assert np.isnan(acc["body_color"])  # colour is not judged on sketches


def test_identity_embedding_same_subject_closer_than_different(probe, heldout):
    rng = np.random.default_rng(8)
    subjects = heldout[:16]
    images = [sample_scene(s, rng, size=32)[0] for s in subjects for _ in range(3)]
    emb = probe.identity_embedding(images)  # (48, D)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(images)), atol=1e-5)
    owner = torch.arange(len(subjects)).repeat_interleave(3)
    sim = emb @ emb.T
    same = (owner[:, None] == owner[None, :]) & ~torch.eye(len(images), dtype=torch.bool)
    diff = owner[:, None] != owner[None, :]
    assert float(sim[same].mean()) > float(sim[diff].mean()) + 0.3
    sim.fill_diagonal_(-2)
    assert float((owner[sim.argmax(1)] == owner).float().mean()) > 0.8
