"""Checks shared by every sampler: numeric arguments, prompt length and the sampling dtype.

One place for the rules, used by every entry point (``suti expert sample``, ``suti apprentice
sample``, :class:`apprentice.pipeline.ApprenticePipeline`, ``suti eval``, the HTTP API in
:mod:`serving.generation` and the generation job's :class:`generation.job.GenerateConfig`), so
that the same value is refused the same way everywhere: :class:`~suti.errors.InputError` with a
one-line message naming the field and the value (CLI exit 2, HTTP 400).

* :func:`check_sampler_args`: steps, num_images, guidance scales, seed and image size.
* :func:`check_prompt`: the tokenizer's real token count against its ``model_max_length`` (77 for
  CLIP); a truncated prompt is logged as a warning, a truncation that cuts the subject's
  identifier is an :class:`PromptTruncatedError`.
* :func:`resolve_dtype`: ``fp32``/``fp16``/``bf16`` to a ``torch.dtype`` (default fp16 on CUDA,
  fp32 elsewhere).
* :func:`batches` and :func:`seeded_generators`: every sampler that makes several images makes
  them ``sample_batch_size`` per pipeline call (diffusers' ``--sample_batch_size``), image ``i``
  from its own ``torch.Generator`` seeded as before, so a batch gives each image the initial
  noise it had alone: the images of one call per seed, up to the float rounding of batched
  kernels (on CPU a latent moves by about 1e-5, a pixel by at most one level here and there).
"""

from __future__ import annotations

import logging
import math
import numbers

from suti import checks
from suti.checks import MAX_SEED, SEED  # noqa: F401 (seeds: 0 to 2**63 - 1, one bound for every seed)
from suti.errors import InputError

log = logging.getLogger(__name__)

#: Denoising steps: at least 1, at most the schedulers' usual ``num_train_timesteps``.
MAX_STEPS = 1000
#: Images per call.
MAX_NUM_IMAGES = 256
#: Images per pipeline call of a sampler that makes several (diffusers' ``--sample_batch_size``).
DEFAULT_SAMPLE_BATCH_SIZE = 4
#: The apprentice's demonstration guidance ``s_demo`` when none is given (every entry point: the
#: pipeline, ``suti apprentice sample``, the HTTP API, the evaluations). s_demo trades subject
#: fidelity for prompt fidelity (docs/results.md, "Demonstration guidance sweep": 1 to 8); 6 is the
#: largest value measured at which the shipped toy apprentice still follows the prompt better than
#: a DreamBooth expert (CLIP-T 0.372 against 0.316, the probe reads the edit in 0.45 of images
#: against 0.39, 36 held-out subjects) while matching its CLIP-I. Measured on the toy world only.
DEFAULT_DEMO_GUIDANCE_SCALE = 6.0
#: Classifier-free guidance scales (text and demonstrations): finite, 0 to this.
MAX_GUIDANCE_SCALE = 50.0
#: Image height and width in pixels: positive multiples of 8, at most this.
MAX_SIDE = 4096
SIDE_MULTIPLE = 8

#: The sampler's kinds of numbers (:mod:`suti.checks`), the ``type=`` of every sampling command's
#: flags; :func:`check_sampler_args` checks the same bounds for values from forms and callers.
STEPS = checks.whole(1, MAX_STEPS)
NUM_IMAGES = checks.whole(1, MAX_NUM_IMAGES)
GUIDANCE_SCALE = checks.real(0.0, MAX_GUIDANCE_SCALE)
SIDE = checks.whole(SIDE_MULTIPLE, MAX_SIDE)

DTYPE_NAMES = ("fp32", "fp16", "bf16")


class PromptTruncatedError(InputError):
    """A prompt is longer than the text encoder's context and the cut removes the identifier."""


def _name(field: str, flags) -> str:
    if isinstance(flags, dict) and field in flags:
        return flags[field]
    return "--" + field.replace("_", "-") if flags else field


def _integer(field: str, value, lo: int, hi: int, flags: bool, hint: str = "") -> None:
    name = _name(field, flags)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        else:
            raise InputError(f"{name}: {value!r} is not an integer")
    if not lo <= int(value) <= hi:
        raise InputError(f"{name}: {value} is out of range; give an integer from {lo} to {hi}{hint}")


def _finite(field: str, value, lo: float, hi: float, flags: bool) -> None:
    name = _name(field, flags)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name}: {value!r} is not a number")
    if not math.isfinite(float(value)):
        raise InputError(f"{name}: {value} is not a finite number; give a number from {lo:g} to {hi:g}")
    if not lo <= float(value) <= hi:
        raise InputError(f"{name}: {value:g} is out of range; give a number from {lo:g} to {hi:g}")


def check_sampler_args(*, steps=None, num_images=None, guidance_scale=None, demo_guidance_scale=None, seed=None,
                       height=None, width=None, sample_batch_size=None, flags: bool | dict = False, max_steps: int = MAX_STEPS,
                       max_num_images: int = MAX_NUM_IMAGES) -> None:
    """Refuse any sampler argument out of its range (``None`` = not given, not checked).

    Args:
        steps: denoising steps, an integer in [1, ``max_steps``].
        num_images: images to generate, an integer in [1, ``max_num_images``].
        guidance_scale, demo_guidance_scale: finite numbers in [0, :data:`MAX_GUIDANCE_SCALE`].
        seed: an integer in [0, :data:`MAX_SEED`].
        height, width: pixels, positive multiples of 8 up to :data:`MAX_SIDE`.
        sample_batch_size: images per pipeline call, an integer in [1, :data:`MAX_NUM_IMAGES`].
        flags: name fields as command-line flags (``--num-images``) instead of ``num_images``; a
            dict maps fields to other flag names (``{"steps": "--sample-steps"}``).

    Raises:
        InputError: naming the first bad field and its value.
    """
    if steps is not None:
        _integer("steps", steps, 1, max_steps, flags)
    if num_images is not None:
        _integer("num_images", num_images, 1, max_num_images, flags)
    for field, value in (("guidance_scale", guidance_scale), ("demo_guidance_scale", demo_guidance_scale)):
        if value is not None:
            _finite(field, value, 0.0, MAX_GUIDANCE_SCALE, flags)
    if seed is not None:
        _integer("seed", seed, 0, MAX_SEED, flags)
    for field, value in (("height", height), ("width", width)):
        if value is not None:
            _integer(field, value, SIDE_MULTIPLE, MAX_SIDE, flags)
            if int(value) % SIDE_MULTIPLE:
                raise InputError(f"{_name(field, flags)}: {value} is not a multiple of {SIDE_MULTIPLE}")
    if sample_batch_size is not None:
        _integer("sample_batch_size", sample_batch_size, 1, MAX_NUM_IMAGES, flags)


def batches(items: list, size: int):
    """``items`` in consecutive chunks of at most ``size`` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def seeded_generators(seeds) -> list:
    """One CPU ``torch.Generator`` per image, seeded ``seeds[i]``: a diffusers pipeline given this
    list as ``generator`` draws image ``i``'s initial noise from generator ``i`` alone."""
    import torch

    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def token_count(tokenizer, text: str) -> int:
    """Tokens of ``text`` as the text encoder sees them (with start and end tokens, untruncated)."""
    return len(tokenizer(text, truncation=False, add_special_tokens=True).input_ids)


def _find(seq: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


def check_prompt(tokenizer, prompt: str, *, identifier: str | None = None, what: str = "prompt") -> int:
    """Check ``prompt`` against the tokenizer's context (``model_max_length``, 77 for CLIP).

    A prompt that fits is returned unchanged in meaning. A longer one is truncated by the
    pipelines (as Stable Diffusion does): that is logged as a warning naming the lost words.
    If ``identifier`` (the expert's rare token, e.g. ``"sks"``) occurs in the prompt but no
    occurrence survives the cut, the image would silently lose its subject:
    :class:`PromptTruncatedError`.

    Returns:
        The prompt's token count (start and end tokens included).
    """
    limit = int(tokenizer.model_max_length)
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids
    n = len(ids)
    if n <= limit:
        return n
    kept = ids[: limit - 1]  # the pipeline keeps limit - 1 tokens and puts the end token last
    lost = tokenizer.decode(ids[limit - 1:-1]).strip()
    if identifier:
        sub = tokenizer(identifier, add_special_tokens=False).input_ids
        if sub and _find(ids, sub) and not _find(kept, sub):
            raise PromptTruncatedError(
                f"{what}: {n} tokens, more than the text encoder's {limit}; the truncation cuts the identifier "
                f"{identifier!r} (lost: {lost!r}); shorten it or move the subject earlier")
    if (what, prompt) not in _WARNED:  # once per prompt, not once per image or step
        _WARNED[(what, prompt)] = None
        while len(_WARNED) > 256:
            _WARNED.pop(next(iter(_WARNED)))
        log.warning("%s: %d tokens, more than the text encoder's %d; the end is ignored: %r", what, n, limit, lost)
    return n


_WARNED: dict[tuple[str, str], None] = {}


def resolve_dtype(name: str | None, device: str | None = None):
    """``fp32``/``fp16``/``bf16`` -> ``torch.dtype``; ``None`` picks fp16 on CUDA, else fp32.

    Raises:
        InputError: an unknown name.
    """
    import torch

    if name is None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise InputError(f"--dtype: {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return table[name]


def add_sampler_flags(parser, *, dtype: bool = True, size: bool = False, batch: bool = True) -> None:
    """Add the shared ``--dtype``, ``--sample-batch-size`` (and optionally ``--height/--width``)
    flags to a sampler command."""
    if batch:
        add_sample_batch_flag(parser)
    if dtype:
        parser.add_argument("--dtype", choices=DTYPE_NAMES, help="weights and activations dtype for sampling (default: fp16 on CUDA, fp32 on CPU)")
    if size:
        parser.add_argument("--height", type=SIDE, help="image height in pixels, a multiple of 8 (default: the model's trained resolution)")
        parser.add_argument("--width", type=SIDE, help="image width in pixels, a multiple of 8 (default: the model's trained resolution)")


def add_sample_batch_flag(parser, what: str = "images") -> None:
    """``--sample-batch-size``: images per pipeline call (default :data:`DEFAULT_SAMPLE_BATCH_SIZE`)."""
    parser.add_argument("--sample-batch-size", type=NUM_IMAGES, default=DEFAULT_SAMPLE_BATCH_SIZE,
                        help=f"{what} per pipeline call; each keeps its own seed, so the images do not depend on it (lower it if sampling runs out of memory)")
