"""Training data of an expert: validated instance images and cached class (prior) images."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from suti import storage
from suti.errors import InputError
from suti.fingerprint import digest
from suti.images import fit_square, list_image_files, load_cached_image, load_image, save_image_atomic, to_tensor
from suti.models import cache_dir, model_fingerprint

log = logging.getLogger(__name__)


def load_instance_images(folder: str | Path, resolution: int) -> torch.Tensor:
    """Validate every image of ``folder`` and return them as a (N, 3, R, R) tensor in [-1, 1].

    Every file is checked before any is used: the first bad one raises :class:`InputError`
    naming it, so a bad folder creates no output.
    """
    paths = list_image_files(folder)
    images = [load_image(p) for p in paths]  # validates all first
    return torch.stack([to_tensor(fit_square(img, resolution, name=str(p))) for p, img in zip(paths, images)])


def class_images_folder(model: str, prompt: str, resolution: int, seed: int, steps: int, guidance_scale: float = 7.5, precision: str | None = None) -> Path:
    """Cache folder of generated prior-preservation images.

    Keyed by everything that determines the images: the model's weights
    (:func:`suti.models.model_fingerprint`: preset content, a folder's files, an object store's
    ETags, a hub snapshot), the prompt (the class prompt filled in), the resolution, the sampler
    settings (seed, steps, guidance scale) and the sampling ``precision`` (:func:`sampling_precision`;
    ``None``, the float32 default, adds nothing, so earlier float32 folders stay valid). Not by
    their count, so experts of the same class share one folder and a larger count tops it up, nor
    by the batch size (images do not depend on it). The scheduler is part of the model. ``seed``
    is the class sampler's seed (``ExpertConfig.class_seed``, the same for every expert), never an
    expert's own seed.
    """
    key = {"model": model_fingerprint(model), "prompt": prompt, "resolution": resolution, "seed": seed, "steps": steps, "guidance_scale": float(guidance_scale)}
    if precision is not None:
        key["precision"] = precision
    return cache_dir() / "class_images" / digest(key)


def sampling_precision(pipe) -> str | None:
    """How ``pipe`` computes now, where that is not plain float32: its weights' dtype and any
    autocast in force on its device (``"bfloat16"``, ``"float32+autocast-float16"``); ``None``
    for float32 weights without autocast."""
    dtype = getattr(pipe, "dtype", torch.float32)
    device = getattr(getattr(pipe, "device", None), "type", "cpu")
    autocast = device in ("cuda", "cpu") and torch.is_autocast_enabled(device)
    if dtype == torch.float32 and not autocast:
        return None
    return _dtype_name(dtype) + (f"+autocast-{_dtype_name(torch.get_autocast_dtype(device))}" if autocast else "")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def ensure_class_images(pipe, model: str, prompt: str, num: int, resolution: int, seed: int, steps: int, guidance_scale: float = 7.5, progress_callback=None, sample_batch_size: int = 4) -> list[Path]:
    """Generate (or reuse) ``num`` images of ``prompt`` with the frozen base ``pipe``.

    Image ``i`` is ``class_{i:04d}.png``, sampled with the seed ``seed * 100003 + i`` whatever
    ``num`` is, under :func:`class_images_folder` (keyed also on ``pipe``'s precision,
    :func:`sampling_precision`). Only missing files are generated, up to
    ``sample_batch_size`` per pipeline call, each from its own seed (:func:`suti.sampling.seeded_generators`:
    the image of a call of its own, up to float rounding). An interrupted run resumes, a second run with the same
    key generates nothing, and a larger ``num`` keeps the existing files and adds the rest. Each
    file is written to a unique temporary name and renamed (atomic; concurrent writers of the
    same image write the same image). ``progress_callback("class_images", done, total, {})`` is
    called after each image (see :func:`experts.train.train_expert`).
    """
    from suti.sampling import batches, seeded_generators

    precision = sampling_precision(pipe)
    folder = class_images_folder(model, prompt, resolution, seed, steps, guidance_scale, precision)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"class_{i:04d}.png" for i in range(num)]
    missing = [i for i, p in enumerate(paths) if load_cached_image(p) is None]  # a cut file: warned, regenerated
    if missing:
        log.info("generating %d class images for %r into %s", len(missing), prompt, folder)
        meta = {"model": model, "model_fingerprint": model_fingerprint(model), "prompt": prompt, "resolution": resolution, "seed": seed, "steps": steps, "guidance_scale": guidance_scale, "precision": precision}
        storage.write_bytes(folder / "meta.json", json.dumps(meta, indent=2).encode())
    done = 0
    with tqdm(total=len(missing), desc="class images", unit="img", disable=not missing) as bar:
        for chunk in batches(missing, sample_batch_size):
            generators = seeded_generators([seed * 100003 + i for i in chunk])
            images = pipe([prompt] * len(chunk), height=resolution, width=resolution, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators).images
            for i, image in zip(chunk, images):
                save_image_atomic(image, paths[i])  # a crash leaves no half-written image
                done += 1
                bar.update(1)
                if progress_callback is not None:
                    progress_callback("class_images", done, len(missing), {})
    return paths


def real_class_images(folder: str | Path, num: int) -> list[Path]:
    """The first ``num`` (sorted by name) of the user's class photos in ``folder``.

    Every image of the folder is validated first (like instance images): the first bad file
    raises :class:`InputError` naming it. Fewer than ``num`` photos is allowed; the caller tops
    them up with generated images (see :func:`experts.train.train_expert`).
    """
    paths = list_image_files(folder)
    for path in paths:
        load_image(path)
    return paths[:num]


def load_class_images(paths: list[Path], resolution: int) -> torch.Tensor:
    """Class images (generated or the user's) as a (N, 3, R, R) tensor in [-1, 1]."""
    return torch.stack([to_tensor(fit_square(load_image(p), resolution, name=str(p))) for p in paths])


def read_captions(paths: list[Path], extension: str | None, identifier: str | None = None) -> list[str | None]:
    """Each photo's caption: the text of the file beside it with ``extension`` (``photo.txt``
    for ``photo.jpg``, kohya's ``--caption_extension`` convention), stripped; ``None`` for a
    photo without one or with an empty one (it trains on the instance prompt, as diffusers' SDXL
    script does for an empty caption), and for every photo when ``extension`` is ``None``.

    A caption is an instance prompt: it names the subject with ``{V}`` (and may say
    ``{class}``), filled in as in ``--instance-prompt``; a caption that already holds the
    ``identifier`` word (``--identifier sks`` and ``"a photo of sks dog"``, as kohya's datasets
    are written) is taken as it is.

    Raises:
        InputError: a caption file that is not UTF-8 text, or a caption without ``{V}`` (nor
            the identifier), naming the file.
    """
    if extension is None:
        return [None] * len(paths)
    captions = []
    for path in paths:
        file = Path(path).with_suffix(extension)
        if not file.is_file():
            captions.append(None)
            continue
        try:
            text = " ".join(file.read_text(encoding="utf-8").split())
        except UnicodeDecodeError:
            raise InputError(f"{file}: a caption file must be UTF-8 text") from None
        if text and "{V}" not in text and not (identifier and identifier in text.split()):
            raise InputError(f"{file}: a caption must name the subject with {{V}} (e.g. \"a photo of {{V}} {{class}} on a sofa\")"
                             + (f" or the identifier {identifier!r}" if identifier else "") + f"; got {text!r}")
        captions.append(text or None)
    return captions


def instance_images(config, resolution: int):
    """The instance photos of ``config`` (an :class:`experts.recipe.ExpertConfig`) as
    :class:`experts.latents.TrainingImages`: every photo validated, each in its bucket
    (``aspect_ratio_buckets``, :func:`experts.buckets.training_buckets`), resized with
    ``image_interpolation_mode``, with its caption (``caption_extension``, :func:`read_captions`).

    Raises:
        InputError: a bad photo or caption file (named), or buckets that do not fit ``resolution``.
    """
    from experts.buckets import training_buckets
    from experts.latents import load_training_pixels

    paths = list_image_files(config.instance_dir)
    buckets = training_buckets(config.aspect_ratio_buckets, resolution)
    captions = read_captions(paths, config.caption_extension, config.identifier)
    return load_training_pixels(paths, resolution, config.center_crop, buckets=buckets, interpolation=config.image_interpolation_mode, captions=captions)
