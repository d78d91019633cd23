"""Models for the GPU benchmarks, made on the machine itself (it has no network).

* :func:`model_folder`: a preset that is not cached on disk (``sd15-arch``, ``sdxl-arch``: real
  architectures, random weights) is built once and saved with ``save_pretrained``, so that every
  stage of a benchmark loads it with ``from_pretrained`` (the real loading path) in seconds.
* :func:`random_clip_hub_cache`: OpenAI CLIP ViT-B/32's architecture with random weights, written
  in the Hugging Face hub cache layout that open_clip reads for ``pretrained="openai"``
  (``timm/vit_base_patch32_clip_224.openai``, ``open_clip_model.safetensors``), in a temporary
  cache. The scorer of a real model (``openai-clip-vit-b-32``) then loads through its real code,
  offline. Its scores are meaningless: use it for timing only.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

#: open_clip's hub repository and file for ViT-B-32 / "openai" (open_clip.pretrained).
OPENAI_CLIP_REPO = "timm/vit_base_patch32_clip_224.openai"
OPENAI_CLIP_FILE = "open_clip_model.safetensors"


def model_folder(model: str, work: Path, log=print, cached_as_folder: bool = False) -> str:
    """What the stages of a benchmark load for ``model``: a preset with ``cache: false`` is built
    once with its seeded random weights and saved under ``work`` (its folder is returned); a
    cached preset stays a name (or, with ``cached_as_folder``, its cache folder); a folder or hub
    id is returned unchanged."""
    from suti.models import build_random_pipeline, list_presets, load_preset, preset_folder

    if model not in list_presets():
        return model
    preset = load_preset(model)
    if preset.get("cache", True):
        return str(preset_folder(model)) if cached_as_folder else model
    folder = Path(work) / f"{model}-base"
    started = time.perf_counter()
    build_random_pipeline(preset).save_pretrained(str(folder), safe_serialization=True)
    log(f"built {model} once (random weights) in {time.perf_counter() - started:.1f} s, saved for from_pretrained")
    return str(folder)


def random_clip_hub_cache(cache: str | os.PathLike | None = None) -> str:
    """Point ``HF_HUB_CACHE`` at ``cache`` (a new temporary folder by default, never the user's
    real cache, so that random weights are never mistaken for OpenAI's) and write random ViT-B/32
    CLIP weights there (:func:`write_random_clip`). Call it before ``huggingface_hub`` is
    imported, which reads ``HF_HUB_CACHE`` once.

    Returns:
        The cache folder.
    """
    cache = str(cache or tempfile.mkdtemp(prefix="suti-random-clip-"))
    os.environ["HF_HUB_CACHE"] = cache
    write_random_clip(cache)
    return cache


def write_random_clip(cache: str | os.PathLike, seed: int = 0) -> Path:
    """Write ViT-B/32 CLIP (QuickGELU, OpenAI's architecture) with seeded random weights into the
    hub cache folder ``cache``, as revision ``main`` of :data:`OPENAI_CLIP_REPO`.

    Returns:
        The weights file (``.../snapshots/<revision>/open_clip_model.safetensors``).
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-B-32", pretrained=None, quick_gelu=True)
    revision = "0" * 40
    repo = Path(cache) / f"models--{OPENAI_CLIP_REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    path = snapshot / OPENAI_CLIP_FILE
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return path
