"""Training data of an expert: validated instance images and cached class (prior) images."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from suti import storage
from suti.images import fit_square, list_image_files, load_cached_image, load_image, save_image_atomic, to_tensor
from suti.models import cache_dir, list_presets, load_preset, preset_fingerprint

log = logging.getLogger(__name__)


def load_instance_images(folder: str | Path, resolution: int) -> torch.Tensor:
    """Validate every image of ``folder`` and return them as a (N, 3, R, R) tensor in [-1, 1].

    Every file is checked before any is used: the first bad one raises :class:`InputError`
    naming it, so a bad folder creates no output.
    """
    paths = list_image_files(folder)
    images = [load_image(p) for p in paths]  # validates all first
    return torch.stack([to_tensor(fit_square(img, resolution, name=str(p))) for p, img in zip(paths, images)])


def model_fingerprint(model: str) -> str:
    """A stable id of a model for cache keys: preset content, folder path or hub id."""
    if model in list_presets():
        return f"preset:{model}:{preset_fingerprint(load_preset(model))}"
    path = Path(model).expanduser()
    if path.exists():
        index = path / "model_index.json"
        stamp = index.stat().st_mtime_ns if index.exists() else 0
        return f"folder:{path.resolve()}:{stamp}"
    return f"hub:{model}"


def class_images_folder(model: str, prompt: str, num: int, resolution: int, seed: int, steps: int) -> Path:
    """Cache folder of prior-preservation images, keyed by everything that determines them."""
    key = json.dumps(
        {"model": model_fingerprint(model), "prompt": prompt, "num": num, "resolution": resolution, "seed": seed, "steps": steps},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "class_images" / digest


def ensure_class_images(pipe, model: str, prompt: str, num: int, resolution: int, seed: int, steps: int, guidance_scale: float = 7.5, progress_callback=None) -> list[Path]:
    """Generate (or reuse) ``num`` images of ``prompt`` with the frozen base ``pipe``.

    Images are written one by one (``class_000.png`` ...) under a folder keyed by model, prompt,
    count, resolution, seed and sampler steps, so an interrupted run resumes and a second run with
    the same key generates nothing. ``progress_callback("class_images", done, total, {})`` is
    called after each image (see :func:`experts.train.train_expert`).
    """
    folder = class_images_folder(model, prompt, num, resolution, seed, steps)
    folder.mkdir(parents=True, exist_ok=True)
    storage.write_text(folder / "meta.json", json.dumps({"model": model, "prompt": prompt, "num": num, "resolution": resolution, "seed": seed, "steps": steps}, indent=2))
    paths = [folder / f"class_{i:04d}.png" for i in range(num)]
    missing = [i for i, p in enumerate(paths) if load_cached_image(p) is None]  # a cut file: warned, regenerated
    if missing:
        log.info("generating %d class images for %r into %s", len(missing), prompt, folder)
    for k, i in enumerate(tqdm(missing, desc="class images", unit="img", disable=not missing)):
        generator = torch.Generator(device="cpu").manual_seed(seed * 100003 + i)
        image = pipe(prompt, height=resolution, width=resolution, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator).images[0]
        save_image_atomic(image, paths[i])  # a crash leaves no half-written image
        if progress_callback is not None:
            progress_callback("class_images", k + 1, len(missing), {})
    return paths


def load_class_images(paths: list[Path], resolution: int) -> torch.Tensor:
    """Cached class images as a (N, 3, R, R) tensor in [-1, 1]."""
    return torch.stack([to_tensor(fit_square(Image.open(p).convert("RGB"), resolution, name=str(p))) for p in paths])
