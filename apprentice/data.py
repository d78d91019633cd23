"""The apprentice's training data: the generation job's shards as an explicit webdataset pipeline.

Stages: shard list -> seeded shard shuffle -> split by node -> split by worker -> tar to samples
-> seeded sample shuffle -> decode -> to training example; every stage after the shard list
logs a bad sample and continues. When there are fewer shards than (nodes x workers), shards are
not split; samples are split by index instead, so every process still gets distinct data.
"""

from __future__ import annotations

import glob
import json
import logging
import random
import re
from pathlib import Path

import torch
import webdataset as wds

from apprentice.photos import PHOTO_KIND
from suti.errors import InputError, InvalidValueError
from suti.images import fit_square, to_tensor
from suti.tar_members import tarfile_to_samples

log = logging.getLogger(__name__)


#: A demonstration's field in a sample: ``demo_<i>.jpg`` (expert shards) or ``demo_<i>.png``
#: (photo shards).
DEMO_FIELD = re.compile(r"demo_(\d+)\.(?:jpg|png)")


def log_and_continue(exn: Exception) -> bool:
    """webdataset handler: log the bad sample and keep going."""
    log.warning("skipping a bad training sample: %s: %s", type(exn).__name__, exn)
    return True


def expand_shards(spec: str | list[str]) -> list[str]:
    """A glob, a brace pattern (``shard-{000000..000009}.tar``), a folder or a list -> shard paths."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        if Path(s).is_dir():
            out += sorted(str(p) for p in Path(s).glob("*.tar"))
        elif "{" in s:
            import braceexpand

            out += list(braceexpand.braceexpand(s))
        else:
            out += sorted(glob.glob(s))
    if not out:
        raise InputError(f"no shards match {spec!r}")
    return out


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ToExample:
    """Decoded webdataset sample -> training example with a random subset of demonstrations.

    With probability ``self_target`` the target is not the expert's sample but one of the
    cluster's own photos, and the demonstrations are drawn from the other photos: a
    reconstruction example that teaches the demonstration layers to copy the subject (as
    in-context subject models are commonly pretrained); 0 keeps SuTI's pure expert-target
    training. Photo samples (:mod:`apprentice.photos`: a cluster's photos, no expert target) are
    always reconstruction examples.

    A reconstruction example's prompt names the class only ("a ball"), as a query does, so the
    identity (colour, pattern, parts) has to come from the demonstrations; with probability
    ``caption_prompt`` it is the target photo's own alt text instead, when that alt text names
    the class noun (a descriptive caption, not "image" or "untitled"), so the apprentice also
    learns to add the demonstrations to a prompt that already describes the subject and its
    context. Without a class noun the alt text is used.
    """

    def __init__(self, resolution: int, num_demos: int, seed: int, self_target: float = 0.0, caption_prompt: float = 0.5):
        for name, value in (("self_target", self_target), ("caption_prompt", caption_prompt)):
            if not 0.0 <= value <= 1.0:
                raise InvalidValueError(f"{name} (--{name.replace('_', '-')}) must be in [0, 1], got {value}")
        self.resolution = resolution
        self.num_demos = num_demos
        self.self_target = self_target
        self.caption_prompt = caption_prompt
        self.rng = random.Random(seed)

    def _reconstruction_prompt(self, noun: str | None, alt_text: str) -> str:
        if not noun:
            return alt_text
        if noun.lower() in alt_text.lower() and self.rng.random() < self.caption_prompt:
            return alt_text
        return f"a {noun}"

    def __call__(self, sample: dict) -> dict:
        meta = sample["json"] if isinstance(sample["json"], dict) else json.loads(sample["json"])
        index = {k: int(m.group(1)) for k in sample if (m := DEMO_FIELD.fullmatch(k))}  # field -> demo number
        demo_fields = sorted(index, key=index.get)
        if not demo_fields:
            raise ValueError(f"sample {sample.get('__key__')} has no demonstrations")
        captions = meta.get("demo_captions") or [""] * len(demo_fields)

        def caption(field: str) -> str:
            i = index[field]
            return captions[i] if i < len(captions) else ""

        photos_only = "target.jpg" not in sample
        if photos_only and len(demo_fields) < 2:
            raise ValueError(f"photo sample {sample.get('__key__')} needs at least 2 photos (got {len(demo_fields)})")
        if photos_only or (len(demo_fields) >= 2 and self.rng.random() < self.self_target):
            held = self.rng.choice(demo_fields)
            demo_fields = [f for f in demo_fields if f != held]
            target, prompt = sample[held], self._reconstruction_prompt(meta.get("class_noun"), caption(held))
        else:
            target, prompt = sample["target.jpg"], meta["prompt"]
        picks = self.rng.sample(demo_fields, self.num_demos) if len(demo_fields) >= self.num_demos else [self.rng.choice(demo_fields) for _ in range(self.num_demos)]
        return {
            "target": to_tensor(fit_square(target, self.resolution)),  # (3, R, R)
            "demos": torch.stack([to_tensor(fit_square(sample[f], self.resolution)) for f in picks]),  # (n, 3, R, R)
            "prompt": prompt,
            "demo_captions": [caption(f) for f in picks],
            "key": sample["__key__"],
        }


def collate(examples: list[dict]) -> dict:
    """List of examples -> batch (tensors stacked, strings listed)."""
    return {
        "target": torch.stack([e["target"] for e in examples]),  # (B, 3, R, R)
        "demos": torch.stack([e["demos"] for e in examples]),  # (B, n, 3, R, R)
        "prompt": [e["prompt"] for e in examples],
        "demo_captions": [e["demo_captions"] for e in examples],
        "key": [e["key"] for e in examples],
    }


def make_pipeline(shards: str | list[str], *, resolution: int, num_demos: int = 3, seed: int = 0, shuffle_buffer: int = 256, num_workers: int = 0, repeat: bool = True, min_delta_clip: float | None = None, self_target: float = 0.0, caption_prompt: float = 0.5) -> wds.DataPipeline:
    """The training pipeline over ``shards`` (an infinite stream when ``repeat``).

    ``min_delta_clip`` keeps only samples whose recorded delta-CLIP exceeds it (the paper's
    lambda ablation on shards generated with ``suti generate --no-filter``); ``self_target``: see
    :class:`ToExample`.
    Expert shards (``suti generate``) and photo shards (``suti apprentice pack-photos``) mix
    freely in ``shards``.
    """
    urls = expand_shards(shards)
    rank, world = _dist()
    split_shards = len(urls) >= world * max(1, num_workers)
    stages = [wds.SimpleShardList(urls), wds.detshuffle(bufsize=len(urls), seed=seed)]
    if split_shards:
        stages += [wds.split_by_node, wds.split_by_worker]
    stages += [tarfile_to_samples(handler=log_and_continue)]  # keys split from the end of the name
    if not split_shards:
        stages += [_split_samples(rank, world)]
    stages += [
        wds.shuffle(shuffle_buffer, rng=random.Random(seed + rank)),
        wds.decode("pil", handler=log_and_continue),
    ]
    if min_delta_clip is not None:
        # the lambda filter applies to expert samples; photo samples hold real photos only
        stages.append(wds.select(lambda s: s["json"].get("kind") == PHOTO_KIND or float(s["json"].get("delta_clip", float("-inf"))) > min_delta_clip))
    stages.append(wds.map(ToExample(resolution, num_demos, seed + rank, self_target, caption_prompt), handler=log_and_continue))
    pipeline = wds.DataPipeline(*stages)
    return _Epochs(pipeline) if repeat else pipeline


class _Epochs(torch.utils.data.IterableDataset):
    """Repeat a pipeline forever; an epoch that yields nothing is an error, not a hang."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __iter__(self):
        while True:
            count = 0
            for sample in self.pipeline:
                count += 1
                yield sample
            if count == 0:
                raise InputError("the shards yield no usable training sample (all bad, or all filtered out by --min-delta-clip)")


def _split_samples(rank: int, world: int):
    def stage(samples):
        for i, s in enumerate(samples):
            if i % world == rank:
                yield s

    return stage
