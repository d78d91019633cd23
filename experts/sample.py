"""Sampling a trained expert into PNG files."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from experts.expert import ExpertInfo, load_expert
from suti.errors import InputError
from suti.images import save_image_atomic
from suti.models import default_device

log = logging.getLogger(__name__)


def sample_expert(expert: str | Path, prompt: str, num_images: int, output: str | Path, *, steps: int = 25, guidance_scale: float = 7.5, seed: int = 0, overwrite: bool = False) -> list[Path]:
    """Generate ``num_images`` PNGs of ``prompt`` (``{V}``/``{class}`` filled from ``expert.json``).

    Files are ``OUTPUT/image_000.png`` ...; existing files of those names are refused unless
    ``overwrite``. Image i uses the seed ``seed + i``, so any image can be regenerated alone.
    """
    if num_images < 1:
        raise InputError(f"--num-images must be at least 1 (got {num_images})")
    info = ExpertInfo.read(expert)
    output = Path(output)
    paths = [output / f"image_{i:03d}.png" for i in range(num_images)]
    clash = [p for p in paths if p.exists()]
    if clash and not overwrite:
        raise InputError(f"{clash[0]}: already exists; pass --overwrite or choose another --output")
    text = info.prompt(prompt)
    pipe = load_expert(expert, device=default_device())
    output.mkdir(parents=True, exist_ok=True)
    log.info("sampling %d images of %r", num_images, text)
    for i, path in enumerate(tqdm(paths, desc="sample", unit="img")):
        generator = torch.Generator(device="cpu").manual_seed(seed + i)
        image = pipe(text, height=info.resolution, width=info.resolution, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator).images[0]
        save_image_atomic(image, path)
    return paths
