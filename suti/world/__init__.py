"""The synthetic subject world: the offline default in which DreamBooth and SuTI are measured.

Pure numpy + Pillow. A *world* (:func:`make_world`) is a seeded list of subjects - star toys,
balls, cube boxes, cups, robots and teddy bears, each with its own colour, pattern, part and
proportions - split into train and held-out subjects. :func:`render` draws a subject in one of
eight contexts (beach, snow, jungle, city, wooden floor, blue carpet, grass, brick wall), with
the SuTI edits (colour change, accessory, style) and a DreamBench-style :func:`caption`.
:func:`make_crawl` writes a synthetic web crawl (with noise pages and a separate ground truth)
for subject mining; :func:`subject_images`, :func:`export_subject` and :func:`dataset_iter`
give DreamBooth instance sets and pretraining streams.

Modules: :mod:`~suti.world.vocab` (the words), :mod:`~suti.world.captions` (the one caption
grammar), :mod:`~suti.world.spec` (subjects and worlds), :mod:`~suti.world.render` (pixels and
the one scene sampler, :func:`sample_scene`), :mod:`~suti.world.crawl`, :mod:`~suti.world.data`;
the models :mod:`~suti.world.toy_t2i`, :mod:`~suti.world.toy_clip`, :mod:`~suti.world.probe`,
and their training in :mod:`suti.world.training`.

Example::

    from suti.world import make_world, sample_scene
    import numpy as np

    world = make_world(24, seed=0)
    image, text, meta = sample_scene(world.subjects[0], np.random.default_rng(0), edit_prob=0.5)
"""

from suti.world.captions import caption
from suti.world.crawl import load_ground_truth, make_crawl
from suti.world.data import dataset_iter, export_subject, subject_images
from suti.world.render import EDIT_KINDS, Pose, apply_style, render, render_background, sample_scene
from suti.world.spec import (
    ACCESSORIES,
    ASPECTS,
    CLASSES,
    COLORS,
    CONTEXTS,
    PATTERNS,
    STYLES,
    ClassSpec,
    Context,
    Subject,
    World,
    load_world,
    make_world,
)

__all__ = [
    "ACCESSORIES", "ASPECTS", "CLASSES", "COLORS", "CONTEXTS", "EDIT_KINDS", "PATTERNS", "STYLES",
    "ClassSpec", "Context", "Pose", "Subject", "World",
    "apply_style", "caption", "dataset_iter", "export_subject", "load_ground_truth", "load_world",
    "make_crawl", "make_world", "render", "render_background", "sample_scene", "subject_images",
]
