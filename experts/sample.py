"""Sampling a trained expert into PNG files."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from experts.expert import ExpertInfo, load_expert
from suti.errors import InputError
from suti.images import save_image_atomic
from suti.outputs import numbered_images, remove_stale_images
from suti.models import default_device
from suti.sampling import DEFAULT_SAMPLE_BATCH_SIZE, batches, check_prompt, check_sampler_args, resolve_dtype, seeded_generators

log = logging.getLogger(__name__)


def sample_expert(expert: str | Path, prompt: str, num_images: int, output: str | Path, *, steps: int = 25, guidance_scale: float | None = None, seed: int = 0, overwrite: bool = False, height: int | None = None, width: int | None = None, dtype: str | None = None, sample_batch_size: int = DEFAULT_SAMPLE_BATCH_SIZE) -> list[Path]:
    """Generate ``num_images`` PNGs of ``prompt`` (``{V}``/``{class}`` filled from ``expert.json``).

    Files are ``OUTPUT/image_000.png`` ...; existing files of those names are refused unless
    ``overwrite``. Image i uses the seed ``seed + i``, so any image can be regenerated alone.
    Images are ``height`` x ``width`` pixels (default: the expert's training resolution), sampled
    in ``dtype`` (``fp32``/``fp16``/``bf16``; default fp16 on CUDA, fp32 on CPU), up to
    ``sample_batch_size`` per pipeline call (the images do not depend on it), at
    ``guidance_scale`` (default: the expert's own ``guidance_scale``, recorded in ``expert.json``:
    classifier-free guidance 7.5 for SD and SDXL, the distilled guidance 3.5 for FLUX).

    Raises:
        InputError: an argument out of range (:func:`suti.sampling.check_sampler_args`), or a
            prompt whose truncation to the text encoder's 77 tokens cuts the identifier.
    """
    check_sampler_args(steps=steps, num_images=num_images, guidance_scale=guidance_scale, seed=seed, height=height, width=width, sample_batch_size=sample_batch_size, flags=True)
    device = default_device()
    torch_dtype = resolve_dtype(dtype, device)
    info = ExpertInfo.read(expert)
    if guidance_scale is None:
        guidance_scale = float((info.config or {}).get("guidance_scale", 7.5))
    output = Path(output)
    paths = numbered_images(output, num_images, overwrite=overwrite)
    text = info.prompt(prompt)
    pipe = load_expert(expert, device=device, torch_dtype=torch_dtype)
    check_prompt(pipe.tokenizer, text, identifier=info.identifier, what="--prompt")
    height, width = height or info.resolution, width or info.resolution
    output.mkdir(parents=True, exist_ok=True)
    log.info("sampling %d images of %r", num_images, text)
    with tqdm(total=num_images, desc="sample", unit="img") as bar:
        for chunk in batches(list(range(num_images)), sample_batch_size):
            images = pipe([text] * len(chunk), height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale, generator=seeded_generators([seed + i for i in chunk])).images
            for i, image in zip(chunk, images):
                save_image_atomic(image, paths[i])
                bar.update(1)
    if overwrite:
        remove_stale_images(output, num_images)  # the older run's images beyond these
    return paths
