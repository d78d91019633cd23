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
from suti.sampling import check_prompt, check_sampler_args, resolve_dtype

log = logging.getLogger(__name__)


def sample_expert(expert: str | Path, prompt: str, num_images: int, output: str | Path, *, steps: int = 25, guidance_scale: float = 7.5, seed: int = 0, overwrite: bool = False, height: int | None = None, width: int | None = None, dtype: str | None = None) -> list[Path]:
    """Generate ``num_images`` PNGs of ``prompt`` (``{V}``/``{class}`` filled from ``expert.json``).

    Files are ``OUTPUT/image_000.png`` ...; existing files of those names are refused unless
    ``overwrite``. Image i uses the seed ``seed + i``, so any image can be regenerated alone.
    Images are ``height`` x ``width`` pixels (default: the expert's training resolution), sampled
    in ``dtype`` (``fp32``/``fp16``/``bf16``; default fp16 on CUDA, fp32 on CPU).

    Raises:
        InputError: an argument out of range (:func:`suti.sampling.check_sampler_args`), or a
            prompt whose truncation to the text encoder's 77 tokens cuts the identifier.
    """
    check_sampler_args(steps=steps, num_images=num_images, guidance_scale=guidance_scale, seed=seed, height=height, width=width, flags=True)
    device = default_device()
    torch_dtype = resolve_dtype(dtype, device)
    info = ExpertInfo.read(expert)
    output = Path(output)
    paths = [output / f"image_{i:03d}.png" for i in range(num_images)]
    clash = [p for p in paths if p.exists()]
    if clash and not overwrite:
        raise InputError(f"{clash[0]}: already exists; pass --overwrite or choose another --output")
    text = info.prompt(prompt)
    pipe = load_expert(expert, device=device, torch_dtype=torch_dtype)
    check_prompt(pipe.tokenizer, text, identifier=info.identifier, what="--prompt")
    height, width = height or info.resolution, width or info.resolution
    output.mkdir(parents=True, exist_ok=True)
    log.info("sampling %d images of %r", num_images, text)
    for i, path in enumerate(tqdm(paths, desc="sample", unit="img")):
        generator = torch.Generator(device="cpu").manual_seed(seed + i)
        image = pipe(text, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator).images[0]
        save_image_atomic(image, path)
    return paths
