"""Loading an apprentice and sampling it from demonstration photos."""

from __future__ import annotations

import logging
from pathlib import Path


from suti.errors import InputError, ModelLoadError
from suti.images import load_image, save_image_atomic
from suti.outputs import numbered_images, remove_stale_images
from suti.sampling import DEFAULT_DEMO_GUIDANCE_SCALE, DEFAULT_SAMPLE_BATCH_SIZE, batches, check_prompt, check_sampler_args, resolve_dtype, seeded_generators

log = logging.getLogger(__name__)


def load_apprentice(name_or_path: str, *, device: str | None = None, dtype: str | None = None):
    """An :class:`~apprentice.pipeline.ApprenticePipeline` from a folder, or ``"toy"``.

    ``"toy"`` is the apprentice trained on the synthetic world (shipped with the toy weights or
    built on first use and cached). ``dtype`` is ``fp32``, ``fp16`` or ``bf16`` (``None``: fp16 on
    CUDA, fp32 on CPU; :func:`suti.sampling.resolve_dtype`). The pipeline's default image size is
    the resolution it was trained at (``training.json``), else the U-Net's native size.
    """
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
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    check_weight_folder(folder)
    with loading(folder):
        pipe = apprentice_class(folder).from_pretrained(str(folder), use_safetensors=True, dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.trained_resolution = _trained_resolution(folder)
    return pipe.to(device)


def apprentice_class(folder: Path):
    """The pipeline class of an apprentice folder, by its ``model_index.json`` ``_class_name``:
    :class:`~apprentice.flux_pipeline.FluxApprenticePipeline` on a FLUX base, else
    :class:`~apprentice.pipeline.ApprenticePipeline`."""
    import json

    from apprentice.pipeline import ApprenticePipeline

    try:
        name = json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        name = None
    if name == "FluxApprenticePipeline":
        from apprentice.flux_pipeline import FluxApprenticePipeline

        return FluxApprenticePipeline
    return ApprenticePipeline


def _trained_resolution(folder: Path) -> int | None:
    """``config.resolution`` of the folder's ``training.json`` (``None`` when absent)."""
    import json

    path = Path(folder) / "training.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("config", {}).get("resolution")
    except (ValueError, AttributeError):
        log.warning("%s: unreadable; rendering at the U-Net's native size", path)
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def sample_apprentice(apprentice: str, demos: list[str], prompt: str, num_images: int, output: str | Path, *, demo_captions: list[str] | None = None, steps: int = 25, guidance_scale: float | None = None, demo_guidance_scale: float = DEFAULT_DEMO_GUIDANCE_SCALE, seed: int = 0, overwrite: bool = False, height: int | None = None, width: int | None = None, dtype: str | None = None, sample_batch_size: int = DEFAULT_SAMPLE_BATCH_SIZE) -> list[Path]:
    """Generate ``num_images`` PNGs of ``prompt`` in context of the demonstration photos.

    Every argument and photo is validated first (a bad one stops with its name); then the
    demonstrations are encoded once and reused for every image and every denoising step.
    Images are ``height`` x ``width`` pixels (default: the apprentice's trained resolution),
    ``sample_batch_size`` per call; image ``i`` uses the seed ``seed + i`` whatever the batch.
    ``guidance_scale``: the text guidance (default 5.0), or on a FLUX base the distilled guidance
    (default 3.5).

    Raises:
        InputError: a bad argument (:func:`suti.sampling.check_sampler_args`), photo, or a prompt
            or caption that does not fit the text encoder.
    """
    if not 1 <= len(demos) <= 8:
        raise InputError(f"give 1 to 8 demonstration photos (got {len(demos)})")
    if demo_captions and len(demo_captions) != len(demos):
        raise InputError(f"{len(demo_captions)} captions for {len(demos)} photos")
    check_sampler_args(steps=steps, num_images=num_images, guidance_scale=guidance_scale, demo_guidance_scale=demo_guidance_scale, seed=seed, height=height, width=width, sample_batch_size=sample_batch_size, flags=True)
    resolve_dtype(dtype)
    images = [load_image(p) for p in demos]
    output = Path(output)
    paths = numbered_images(output, num_images, overwrite=overwrite)
    pipe = load_apprentice(apprentice, dtype=dtype)
    if guidance_scale is None:  # the pipeline's own default: text CFG 5.0, FLUX's distilled 3.5
        import inspect

        guidance_scale = inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default
    check_prompt(pipe.tokenizer, prompt, what="--prompt")
    ctx = pipe.encode_demonstrations(images, demo_captions)
    output.mkdir(parents=True, exist_ok=True)
    for chunk in batches(list(range(num_images)), sample_batch_size):
        images = pipe(prompt, num_images=len(chunk), demo_context=ctx, num_inference_steps=steps, guidance_scale=guidance_scale, demo_guidance_scale=demo_guidance_scale, generator=seeded_generators([seed + i for i in chunk]), height=height, width=width).images
        for i, image in zip(chunk, images):
            save_image_atomic(image, paths[i])
    if overwrite:
        remove_stale_images(output, num_images)  # the older run's images beyond these
    return paths
