"""The scene sources the world's models train on, both drawn with
:func:`suti.world.render.sample_scene` (the world's one scene sampler).

* :class:`SceneStream` - endless batches of fresh scenes with their captions (the toy
  text-to-image model, :mod:`suti.world.training.t2i`); :func:`heldout_scenes` - a fixed
  evaluation batch of held-out subjects;
* :class:`SceneBuffer` - rendered scenes kept for reuse (the toy CLIP and the probe,
  :mod:`suti.world.training.clip`, :mod:`suti.world.training.probe`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from suti.world.captions import compose_caption
from suti.world.render import sample_scene
from suti.world.toy_clip import IMAGE_SIZE
from suti.world.toy_t2i import RESOLUTION, pretrain_world

CFG_DROP = 0.1  # empty captions, for classifier-free guidance


def random_caption(subject, meta: dict, rng: np.random.Generator) -> str:
    """Training caption of the toy text-to-image model (:func:`compose_caption` of the scene
    with parts left out): empty (10%); else colour and pattern are each kept or dropped (both
    kept 65%, pattern dropped 10%, colour dropped 5%, both dropped 20%) and the context phrase
    kept 85% of the time. About half the captions are the full DreamBench caption; "a cup",
    "a cup on the beach", "a red cup" (the prompts of DreamBooth's class prior and of
    "a [V] cup") are in distribution. Draws 1 (empty caption) or 3 numbers from ``rng``."""
    if rng.random() < CFG_DROP:
        return ""
    u = rng.random()
    if u < 0.65:
        color = pattern = True
    elif u < 0.75:
        color, pattern = True, False
    elif u < 0.8:
        color, pattern = False, True
    else:
        color = pattern = False
    return compose_caption(subject, meta, color=color, pattern=pattern,
                           context=rng.random() >= 0.15)


class SceneStream:
    """Endless batches of freshly rendered scenes of random ``subjects`` (seeded by ``seed``).

    :meth:`batch` returns ``(pixels (B, 3, 32, 32) float32 in [-1, 1], captions, metas)``.
    With probability ``edit_prob`` a scene has one edit; a fraction ``hires`` (a quarter by
    default) is rendered at 64 px and downsampled (bicubic) the way DreamBooth instance photos
    are (:func:`suti.images.fit_square`). ``captions``: ``"random"`` (:func:`random_caption`)
    or ``"full"`` (the world's caption).
    """

    def __init__(self, subjects, seed: int, *, edit_prob: float = 0.35, hires: float = 0.25,
                 captions: str = "random"):
        self.subjects = list(subjects)
        self.rng = np.random.default_rng([seed, 0x707])
        self.edit_prob, self.hires, self.captions = edit_prob, hires, captions

    def batch(self, n: int):
        """``n`` fresh scenes: ``(pixels (n, 3, 32, 32), captions, metas)``."""
        import torch

        imgs, texts, metas = [], [], []
        for _ in range(n):
            subject = self.subjects[int(self.rng.integers(len(self.subjects)))]
            img, text, meta = sample_scene(subject, self.rng, size=RESOLUTION,
                                           edit_prob=self.edit_prob, hires=self.hires,
                                           downsample=Image.Resampling.BICUBIC)
            if self.captions == "random":
                text = random_caption(subject, meta, self.rng)
            imgs.append(np.asarray(img, np.float32))
            texts.append(text)
            metas.append(meta)
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0
        return x, texts, metas


def heldout_scenes(n: int, seed: int = 0, edit_prob: float = 0.3):
    """``n`` scenes of held-out subjects of the pretraining world (never seen in pretraining),
    with full captions: ``(pixels (n, 3, 32, 32) float32 in [-1, 1], captions, metas)``. For
    evaluation; the same ``(n, seed, edit_prob)`` always gives the same scenes."""
    world = pretrain_world()
    return SceneStream(world.heldout_subjects, seed + 1_000_003, edit_prob=edit_prob,
                       hires=0.0, captions="full").batch(n)


class SceneBuffer:
    """Rendered training scenes kept for reuse, so training is not bound by rendering.

    Holds up to ``per_subject`` 32 px scenes (uint8) for each subject in a ring; :meth:`add`
    renders fresh scenes of random subjects (half of them edited, a fraction ``p64`` rendered at
    64 px and resized, as real inputs may be) and :meth:`sample` draws batches with random
    horizontal flips (a flip is a valid pose of every subject). Both the toy CLIP and the probe
    train from one: each step renders a few fresh scenes and samples a batch.
    """

    def __init__(self, subjects, seed: int, *, per_subject: int = 48, edit_prob: float = 0.5,
                 p64: float = 0.25):
        self.subjects = list(subjects)
        self.rng = np.random.default_rng([seed, 303])
        self.per_subject = per_subject
        self.edit_prob = edit_prob
        self.p64 = p64
        n = len(self.subjects)
        self.images = np.zeros((n, per_subject, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        self.meta: list[list] = [[None] * per_subject for _ in range(n)]
        self.count = np.zeros(n, int)
        self.rendered = 0

    def render_one(self, k: int) -> None:
        """Render a fresh scene of subject ``k`` into its ring."""
        img, _, meta = sample_scene(self.subjects[k], self.rng, size=IMAGE_SIZE,
                                    edit_prob=self.edit_prob, hires=self.p64,
                                    downsample=Image.Resampling.LANCZOS)
        slot = self.count[k] % self.per_subject
        self.images[k, slot] = np.asarray(img)
        self.meta[k][slot] = meta
        self.count[k] += 1
        self.rendered += 1

    def add(self, n: int) -> None:
        """Render ``n`` fresh scenes of random subjects."""
        for k in self.rng.integers(len(self.subjects), size=n):
            self.render_one(int(k))

    def fill(self, per_subject: int) -> None:
        """Render until every subject has at least ``per_subject`` scenes."""
        for k in range(len(self.subjects)):
            while self.count[k] < per_subject:
                self.render_one(k)

    def sample(self, n_subjects: int, views: int = 1):
        """``views`` distinct stored scenes of each of ``n_subjects`` distinct subjects.

        Returns ``(images (n_subjects * views, 3, 32, 32) float in [-1, 1], subject indices,
        metas)``, ordered view-major (all first views, then all second views...).
        """
        import torch

        ready = np.flatnonzero(self.count >= views)
        chosen = self.rng.choice(ready, size=min(n_subjects, len(ready)), replace=False)
        arrays, ks, metas = [], [], []
        slots = [self.rng.choice(min(self.count[k], self.per_subject), size=views,
                                 replace=False) for k in chosen]
        for v in range(views):
            for k, sl in zip(chosen, slots):
                arr = self.images[k, sl[v]]
                arrays.append(arr[:, ::-1] if self.rng.random() < 0.5 else arr)
                ks.append(int(k))
                metas.append(self.meta[k][sl[v]])
        x = torch.from_numpy(np.ascontiguousarray(np.stack(arrays), np.float32))
        x = x.permute(0, 3, 1, 2).div_(127.5).sub_(1.0)
        return x.contiguous(memory_format=torch.channels_last), ks, metas

