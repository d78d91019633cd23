"""The apprentice's training data: the generation job's shards as an explicit webdataset pipeline.

Stages: shard list -> seeded shard shuffle -> open (fsspec: any URI it reads, ``s3://``,
``gs://``, ``file://``, local paths) -> tar to samples -> this process's share of the samples
-> seeded sample shuffle -> decode -> delta-CLIP filter -> training example. Every stage after the
shard list logs a bad sample, naming its shard and key, and continues.

Balance: every process (rank x data-loader worker) reads the same seeded shard order and keeps
every ``world``-th sample, so with shards of any sizes each process gets an equal share of an
epoch's samples (within one), at the price of each process reading (not decoding) all shards.
At scale (many shards, many processes) ``resampled=True`` reads less: each process draws its own
shards with replacement (webdataset's ``ResampledShards``, seeded per rank and worker), equal in
expectation, and every training step still takes one micro-batch per process.
Several patterns with ``weights`` are mixed by a seeded weighted draw, e.g. expert shards 3 : 1
photo shards.
"""

from __future__ import annotations

import json
import logging
import random
import re

import torch
import webdataset as wds
from PIL import Image, ImageOps

from suti.shards import PHOTO_KIND
from suti import storage
from suti.errors import InputError, InvalidValueError
from suti.images import fit_square, to_tensor
from suti.tar_members import tar_streams_to_samples

log = logging.getLogger(__name__)


#: A demonstration's field in a sample: ``demo_<i>.jpg`` (expert shards) or ``demo_<i>.png``
#: (photo shards).
DEMO_FIELD = re.compile(r"demo_(\d+)\.(?:jpg|png)")


def log_and_continue(exn: Exception) -> bool:
    """webdataset handler: log the bad sample (webdataset appends the shard URL to ``args``) and keep going."""
    log.warning("skipping a bad training sample: %s: %s", type(exn).__name__, exn)
    return True


def _where(sample: dict) -> str:
    return f"sample {sample.get('__key__', '?')!r} of shard {sample.get('__url__', '?')}"


def per_sample(stage_name: str, fn):
    """A pipeline stage applying ``fn`` to each sample; ``fn`` returning ``None`` drops the sample.

    An exception drops the sample with a warning naming the stage, the shard and the key (the
    log-and-continue rule for every stage after decoding).
    """

    def stage(samples):
        for sample in samples:
            try:
                out = fn(sample)
            except Exception as exn:  # noqa: BLE001 - a bad sample must never stop training
                log.warning("skipping a bad training sample at %s: %s: %s: %s", stage_name, _where(sample), type(exn).__name__, exn)
                continue
            if out is not None:
                yield out

    return stage


def sample_meta(sample: dict) -> dict:
    """A sample's ``.json`` member as a dict.

    Raises:
        ValueError: the member is missing or is not a JSON object.
    """
    if "json" not in sample:
        raise ValueError("no .json member")
    meta = sample["json"]
    if isinstance(meta, (bytes, str)):
        meta = json.loads(meta)
    if not isinstance(meta, dict):
        raise ValueError(f".json is a {type(meta).__name__}, not an object")
    return meta


def _has_pattern(uri: str) -> bool:
    return any(c in uri for c in "*?[{")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard URIs of a pattern or a list of them.

    Each entry may be a folder (its ``*.tar``), a glob, a webdataset brace range
    (``shard-{000000..000009}.tar``), or a single shard, local or any fsspec URI (``s3://b/x.tar``).

    Raises:
        InputError: nothing matches, or a single shard named without a pattern does not exist.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        if not _has_pattern(s) and storage.isdir(s):
            out += storage.glob(storage.join(s, "*.tar"))
            continue
        found = storage.expand(s)
        if not _has_pattern(s) and not storage.exists(s):
            raise InputError(f"{s}: no such shard")
        out += found
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
    training. Photo samples (:mod:`mining.photos`: a cluster's photos, no expert target) are
    always reconstruction examples.

    A reconstruction example's prompt names the class only ("a ball"), as a query does, so the
    identity (colour, pattern, parts) has to come from the demonstrations; with probability
    ``caption_prompt`` it is the target photo's own alt text instead, when that alt text names
    the class noun (a descriptive caption, not "image" or "untitled"), so the apprentice also
    learns to add the demonstrations to a prompt that already describes the subject and its
    context. Without a class noun the alt text is used.

    The demonstrations keep their own alt texts as captions with probability ``demo_caption``
    (per example); otherwise each is captioned ``"a <class noun>"``, as a class-only query encodes
    them (:meth:`apprentice.pipeline.ApprenticePipeline.encode_demonstrations` in the fixed
    evaluation), so the identity has to come from the demonstrations' pixels, not their captions.

    ``teacher_prompt`` is the target photo's descriptive alt text (one naming the class noun) when
    the example is a reconstruction prompted with the class only, else ``""``: the privileged
    caption of ``--caption-distillation`` (:func:`apprentice.train.denoising_loss`).

    With probability ``copy_view`` a reconstruction example's demonstrations include a view of the
    target photo itself (:func:`augmented_view`: mirrored and re-cropped, so that its pixels do not
    line up with the target's) in place of one of the other photos, at a random position: the
    demonstration attention is rewarded for finding the subject in a demonstration and carrying
    its whole appearance, silhouette included, to wherever the target has it (the "copy oracle"
    of :func:`apprentice.evaluate.heldout_loss_by_timestep` measures how far it does).
    """

    def __init__(self, resolution: int, num_demos: int, seed: int, self_target: float = 0.0, caption_prompt: float = 0.5, demo_caption: float = 1.0, copy_view: float = 0.0):
        for name, value in (("self_target", self_target), ("caption_prompt", caption_prompt), ("demo_caption", demo_caption), ("copy_view", copy_view)):
            if not 0.0 <= value <= 1.0:
                raise InvalidValueError(f"{name} (--{name.replace('_', '-')}) must be in [0, 1], got {value}")
        self.resolution = resolution
        self.num_demos = num_demos
        self.self_target = self_target
        self.caption_prompt = caption_prompt
        self.demo_caption = demo_caption
        self.copy_view = copy_view
        self.rng = random.Random(seed)

    @staticmethod
    def _describes(noun: str | None, alt_text: str) -> bool:
        """A descriptive alt text: one that names the class noun (not "image" or "untitled")."""
        return bool(noun) and noun.lower() in alt_text.lower()

    def _reconstruction_prompt(self, noun: str | None, alt_text: str) -> str:
        if not noun:
            return alt_text
        if self._describes(noun, alt_text) and self.rng.random() < self.caption_prompt:
            return alt_text
        return f"a {noun}"

    def __call__(self, sample: dict) -> dict:
        meta = sample_meta(sample)
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
        teacher, reconstruction = "", False
        if photos_only or (len(demo_fields) >= 2 and self.rng.random() < self.self_target):
            held = self.rng.choice(demo_fields)
            demo_fields = [f for f in demo_fields if f != held]
            alt_text, noun = caption(held), meta.get("class_noun")
            target, prompt = sample[held], self._reconstruction_prompt(noun, alt_text)
            reconstruction = True
            if self._describes(noun, alt_text) and prompt != alt_text:
                teacher = alt_text
        else:
            target, prompt = sample["target.jpg"], meta["prompt"]
        picks = self.rng.sample(demo_fields, self.num_demos) if len(demo_fields) >= self.num_demos else [self.rng.choice(demo_fields) for _ in range(self.num_demos)]
        demo_captions = [caption(f) for f in picks]
        noun = meta.get("class_noun")
        class_captions = bool(noun and self.demo_caption < 1.0 and (self.demo_caption == 0.0 or self.rng.random() >= self.demo_caption))  # 0 and 1 draw nothing
        if class_captions:
            demo_captions = [f"a {noun}"] * len(picks)
        demos = [sample[f] for f in picks]
        if reconstruction and self.copy_view > 0.0 and self.rng.random() < self.copy_view:  # 0 draws nothing
            i = self.rng.randrange(len(demos))
            demos[i] = augmented_view(target, self.rng)  # from the full-size photo: as sharp as the other demos
            if not class_captions:
                demo_captions[i] = caption(held)
        return {
            "target": to_tensor(fit_square(target, self.resolution)),  # (3, R, R)
            "demos": torch.stack([to_tensor(fit_square(d, self.resolution)) for d in demos]),  # (n, 3, R, R)
            "prompt": prompt,
            "teacher_prompt": teacher,
            "demo_captions": demo_captions,
            "key": sample["__key__"],
        }


def augmented_view(image: Image.Image, rng: random.Random, min_scale: float = 0.75) -> Image.Image:
    """Another view of ``image``, same size: mirrored with probability 0.5, then a crop of
    ``s`` in [``min_scale``, 1] times each side at a uniform offset, resized back (bicubic).

    The view shows the same subject shifted, scaled and maybe mirrored, so a demonstration made
    from it cannot be copied pixel for pixel into the target (``--copy-view``, :class:`ToExample`).
    """
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    w, h = image.size
    s = rng.uniform(min_scale, 1.0)
    cw, ch = max(1, round(w * s)), max(1, round(h * s))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return image.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)


def collate(examples: list[dict]) -> dict:
    """List of examples -> batch (tensors stacked, strings listed)."""
    return {
        "target": torch.stack([e["target"] for e in examples]),  # (B, 3, R, R)
        "demos": torch.stack([e["demos"] for e in examples]),  # (B, n, 3, R, R)
        "prompt": [e["prompt"] for e in examples],
        "teacher_prompt": [e.get("teacher_prompt", "") for e in examples],
        "demo_captions": [e["demo_captions"] for e in examples],
        "key": [e["key"] for e in examples],
    }


def make_pipeline(shards: str | list[str], *, resolution: int, num_demos: int = 3, seed: int = 0, shuffle_buffer: int = 256, num_workers: int = 0, repeat: bool = True, min_delta_clip: float | None = None, self_target: float = 0.0, caption_prompt: float = 0.5, demo_caption: float = 1.0, copy_view: float = 0.0, weights: list[float] | None = None, rank: int | None = None, world: int | None = None, resampled: bool = False):
    """The training pipeline over ``shards`` (an infinite stream when ``repeat``).

    Args:
        shards: a pattern or a list of patterns (see :func:`expand_shards`); expert shards
            (``suti generate``) and photo shards (``suti apprentice pack-photos``) mix freely.
        weights: one weight per pattern of ``shards``: each example is drawn from pattern ``i``
            with probability ``weights[i] / sum(weights)`` (e.g. ``[3, 1]`` for expert shards 3 :
            1 photo shards); ``None`` reads all patterns as one shard list. Needs ``repeat``.
        min_delta_clip: keep only expert samples whose recorded delta-CLIP exceeds it (the paper's
            lambda ablation on shards generated with ``suti generate --no-filter``).
        self_target, caption_prompt, demo_caption, copy_view: see :class:`ToExample`.
        rank, world: this process's data-parallel rank and world size (default: torch.distributed's).
        resampled: draw shards with replacement per process instead of splitting samples (an
            "epoch" is ``len(shards)`` draws).

    Raises:
        InputError: a pattern matches nothing, or ``weights`` does not fit ``shards``.
    """
    patterns = [shards] if isinstance(shards, str) else list(shards)
    if rank is None or world is None:
        rank, world = _dist()
    kw = dict(resolution=resolution, num_demos=num_demos, shuffle_buffer=shuffle_buffer, min_delta_clip=min_delta_clip, self_target=self_target, caption_prompt=caption_prompt, demo_caption=demo_caption, copy_view=copy_view, rank=rank, world=world, resampled=resampled)
    if weights is None:
        pipeline = _one_pipeline(expand_shards(patterns), seed=seed, **kw)
        return _Epochs(pipeline) if repeat else pipeline
    if len(weights) != len(patterns) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise InputError(f"--shard-weights: give one non-negative weight per --shards pattern ({len(patterns)}), not all 0; got {list(weights)}")
    if not repeat:
        raise ValueError("weighted mixing needs repeat=True (an infinite stream)")
    streams = [_Epochs(_one_pipeline(expand_shards(p), seed=seed + 7 * i, **kw)) for i, (p, w) in enumerate(zip(patterns, weights)) if w > 0]
    return _WeightedMix(streams, [w for w in weights if w > 0], seed=seed * 31 + rank)


def _one_pipeline(urls: list[str], *, resolution, num_demos, seed, shuffle_buffer, min_delta_clip, self_target, caption_prompt, demo_caption, copy_view, rank, world, resampled) -> wds.DataPipeline:
    if resampled:
        shards = [wds.ResampledShards(urls, nshards=len(urls), seed=seed, worker_seed=_worker_seed(rank), deterministic=True)]
    else:
        shards = [wds.SimpleShardList(urls), wds.detshuffle(bufsize=len(urls), seed=seed)]
    stages = [
        *shards,
        _open_shards,
        tar_streams_to_samples(handler=log_and_continue),  # keys split at the field at the end of the name
        *([] if resampled else [_split_samples(rank, world)]),
        wds.shuffle(shuffle_buffer, rng=random.Random(seed + rank)),
        per_sample("decode", wds.autodecode.Decoder([wds.autodecode.imagehandler("pil")])),
    ]
    if min_delta_clip is not None:
        stages.append(per_sample("--min-delta-clip filter", _DeltaClipFilter(min_delta_clip)))
    stages.append(per_sample("to example", ToExample(resolution, num_demos, seed + rank, self_target, caption_prompt, demo_caption, copy_view)))
    return wds.DataPipeline(*stages)


def _worker_seed(rank: int):
    def seed() -> int:
        info = torch.utils.data.get_worker_info()
        return rank * 1000 + (info.id if info else 0)

    return seed


def _open_shards(sources):
    """``{"url": u}`` -> ``{"url": u, "stream": file}``, opened with fsspec (:func:`suti.storage.open_uri`)."""
    for source in sources:
        url = source["url"]
        try:
            fs, path = storage.filesystem(url)
            stream = fs.open(path, "rb")
        except Exception as exn:  # noqa: BLE001
            log.warning("skipping shard %s: %s: %s", url, type(exn).__name__, exn)
            continue
        try:
            yield dict(source, stream=stream)
        finally:
            stream.close()


class _DeltaClipFilter:
    """Keep photo samples and expert samples whose recorded ``delta_clip`` exceeds ``threshold``."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, sample: dict) -> dict | None:
        meta = sample_meta(sample)
        if meta.get("kind") == PHOTO_KIND:  # photo samples hold real photos only
            return sample
        return sample if float(meta.get("delta_clip", float("-inf"))) > self.threshold else None


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


class _WeightedMix(torch.utils.data.IterableDataset):
    """Draw each example from stream ``i`` with probability ``weights[i] / sum(weights)``.

    webdataset's ``RandomMix`` does the same with the global ``random`` state; this one is seeded
    per rank so a run is reproducible.
    """

    def __init__(self, streams, weights: list[float], seed: int):
        self.streams, self.weights, self.seed = streams, weights, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1009 + (info.id if info else 0))
        iters = [iter(s) for s in self.streams]
        while True:
            yield next(rng.choices(iters, weights=self.weights)[0])


def _split_samples(rank: int, world: int):
    """Keep every ``world x workers``-th sample: this rank's and data-loader worker's equal share."""

    def stage(samples):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slots, slot = world * workers, worker * world + rank  # i % world == rank: ranks' shares differ by at most one
        for i, s in enumerate(samples):
            if i % slots == slot:
                yield s

    return stage
