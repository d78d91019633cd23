"""Loading an apprentice and sampling it from demonstration photos."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from suti.errors import InputError, ModelLoadError
from suti.images import load_image, save_image_atomic

log = logging.getLogger(__name__)


def load_apprentice(name_or_path: str, *, device: str | None = None):
    """An :class:`~apprentice.pipeline.ApprenticePipeline` from a folder, or ``"toy"``.

    ``"toy"`` is the apprentice trained on the synthetic world (shipped with the toy weights or
    built on first use and cached).
    """
    from apprentice.pipeline import ApprenticePipeline
    from suti.models import default_device

    if name_or_path == "toy":
        from apprentice.toy import toy_apprentice_folder

        folder = toy_apprentice_folder()
    else:
        folder = Path(name_or_path)
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"{folder}: not an apprentice folder (no model_index.json)")
    from suti.models import _quiet_loading

    from suti.weights import check_weight_folder, loading

    _quiet_loading()
    check_weight_folder(folder)
    with loading(folder):
        pipe = ApprenticePipeline.from_pretrained(str(folder), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or default_device())


def sample_apprentice(apprentice: str, demos: list[str], prompt: str, num_images: int, output: str | Path, *, demo_captions: list[str] | None = None, steps: int = 25, guidance_scale: float = 5.0, demo_guidance_scale: float = 2.0, seed: int = 0, overwrite: bool = False) -> list[Path]:
    """Generate ``num_images`` PNGs of ``prompt`` in context of the demonstration photos.

    Every photo is validated first (a bad one stops with its name); then the demonstrations are
    encoded once and reused for every image and every denoising step.
    """
    if not 1 <= len(demos) <= 8:
        raise InputError(f"give 1 to 8 demonstration photos (got {len(demos)})")
    if demo_captions and len(demo_captions) != len(demos):
        raise InputError(f"{len(demo_captions)} captions for {len(demos)} photos")
    if num_images < 1:
        raise InputError("--num-images must be at least 1")
    images = [load_image(p) for p in demos]
    output = Path(output)
    paths = [output / f"image_{i:03d}.png" for i in range(num_images)]
    clash = [p for p in paths if p.exists()]
    if clash and not overwrite:
        raise InputError(f"{clash[0]}: already exists; pass --overwrite or choose another --output")
    pipe = load_apprentice(apprentice)
    ctx = pipe.encode_demonstrations(images, demo_captions)
    output.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        generator = torch.Generator().manual_seed(seed + i)
        image = pipe(prompt, demo_context=ctx, num_inference_steps=steps, guidance_scale=guidance_scale, demo_guidance_scale=demo_guidance_scale, generator=generator).images[0]
        save_image_atomic(image, path)
    return paths
