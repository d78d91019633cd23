"""Image generation for the API: the apprentice (tuning-free, from demonstrations) and trained
experts, on a bounded thread pool with a bounded queue and per-request deadlines.

* Models are loaded once per worker process, lazily, and cached (the apprentice; experts in a
  small LRU). Every request runs on a shallow copy of the cached pipeline with its own scheduler,
  so concurrent requests never share denoising state.
* At most ``max_concurrency`` requests run; ``max_queue`` more may wait; beyond that
  :class:`QueueFull` (HTTP 429) with an estimated ``retry_after``.
* A request past its deadline stops at the next denoising step (or before it starts) and raises
  :class:`DeadlineExceeded` (HTTP 504); its slot is freed as soon as its thread lets go.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import copy
import io
import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"too many requests in the queue; retry in {retry_after} s")
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    pass


class ModelUnavailable(Exception):
    """The apprentice or an expert could not be loaded (HTTP 503)."""


def check_request(settings, *, steps: int, num_images: int, guidance_scale: float, seed: int, demo_guidance_scale: float | None = None) -> None:
    """The sampler checks every entry point shares (:func:`suti.sampling.check_sampler_args`),
    within this server's limits; a bad value is an ``ApiError`` 400 naming the field."""
    from serving.limits import ApiError
    from suti.errors import InputError
    from suti.sampling import check_sampler_args

    try:
        check_sampler_args(steps=steps, num_images=num_images, guidance_scale=guidance_scale, demo_guidance_scale=demo_guidance_scale,
                           seed=seed, max_steps=settings.max_steps, max_num_images=settings.max_num_images)
    except InputError as exc:
        raise ApiError(400, str(exc)) from None


def _check_prompt(tokenizer, prompt: str, identifier: str | None = None) -> str | None:
    """A prompt whose truncation cuts the identifier is a 400; another cut is logged and returned
    as ``"N tokens, the text encoder reads M"`` (the ``X-Prompt-Truncated`` response header)."""
    from serving.limits import ApiError
    from suti.sampling import PromptTruncatedError, check_prompt

    try:
        n = check_prompt(tokenizer, prompt, identifier=identifier)
    except PromptTruncatedError as exc:
        raise ApiError(400, str(exc)) from None
    limit = int(tokenizer.model_max_length)
    return f"{n} tokens, the text encoder reads {limit}" if n > limit else None


def _load(what: str, fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - any loading failure is the server's, not the request's
        raise ModelUnavailable(f"{what} could not be loaded: {exc}") from exc


# --- per-process model cache -----------------------------------------------------------------

_LOCK = threading.Lock()
_APPRENTICES: dict[tuple, Any] = {}
_EXPERTS: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_KEY_LOCKS: dict[tuple, threading.Lock] = collections.defaultdict(threading.Lock)


def _key_lock(key: tuple) -> threading.Lock:
    with _LOCK:
        return _KEY_LOCKS[key]


def get_apprentice(name_or_path: str, device: str | None = None, dtype: str | None = None):
    """The apprentice of this process (loaded on first use, then cached); ``dtype`` is
    ``fp32``/``fp16``/``bf16`` (``None``: fp16 on CUDA, fp32 on CPU)."""
    key = (name_or_path, device) if dtype is None else (name_or_path, device, dtype)
    pipe = _APPRENTICES.get(key)
    if pipe is not None:
        return pipe
    with _key_lock(("apprentice",) + key):
        if key not in _APPRENTICES:
            from apprentice.sample import load_apprentice

            started = time.perf_counter()
            _APPRENTICES[key] = load_apprentice(name_or_path, device=device, dtype=dtype)
            log.info("apprentice %s loaded in %.1f s", name_or_path, time.perf_counter() - started)
    return _APPRENTICES[key]


def apprentice_loaded(name_or_path: str, device: str | None = None, dtype: str | None = None) -> bool:
    return ((name_or_path, device) if dtype is None else (name_or_path, device, dtype)) in _APPRENTICES


def get_expert(folder: Path, capacity: int, device: str | None = None, dtype: str | None = None):
    """A trained expert's pipeline (LRU cache of ``capacity`` experts per process)."""
    from experts.expert import ExpertInfo

    key = (str(folder), device) if dtype is None else (str(folder), device, dtype)
    with _LOCK:
        if key in _EXPERTS:
            _EXPERTS.move_to_end(key)
            return _EXPERTS[key]
    with _key_lock(("expert",) + key):
        with _LOCK:
            if key in _EXPERTS:
                return _EXPERTS[key]
        from experts.expert import load_expert
        from suti.models import default_device
        from suti.sampling import resolve_dtype

        info = ExpertInfo.read(folder)
        device = device or default_device()
        pipe = load_expert(folder, device=device, torch_dtype=resolve_dtype(dtype, device))
        pipe.set_progress_bar_config(disable=True)
        entry = (pipe, info)
        with _LOCK:
            _EXPERTS[key] = entry
            while len(_EXPERTS) > max(1, capacity):
                _EXPERTS.popitem(last=False)
    return entry


def forget_expert(folder: Path) -> None:
    """Drop a deleted expert's pipelines from this process's cache."""
    with _LOCK:
        for key in [k for k in _EXPERTS if k[0] == str(folder)]:
            del _EXPERTS[key]


class _StepGuard:
    """Replaces a pipeline copy's ``progress_bar``: checks the deadline at every denoising step.

    Works for both call styles of diffusers pipelines: ``for t in self.progress_bar(timesteps)``
    and ``with self.progress_bar(total=n) as bar: bar.update()``.
    """

    def __init__(self, check: Callable[[], None]):
        self.check = check

    def __call__(self, iterable=None, total=None):
        if iterable is not None:
            return self._iterate(iterable)
        return self

    def _iterate(self, iterable):
        for item in iterable:
            self.check()
            yield item

    def update(self, n: int = 1) -> None:
        self.check()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_THREAD = threading.local()


def thread_tokenizer(tokenizer):
    """This thread's own copy of a shared tokenizer (made once per thread, about 0.25 s for CLIP's).

    transformers' tokenizers keep padding and truncation as state of their Rust backend, set anew
    by every call (``set_truncation_and_padding``; huggingface/tokenizers is not thread-safe), so
    two generations tokenizing with one tokenizer at once can strip each other's padding: an
    unpadded prompt of 6 tokens beside 77-token ones, a 500 (seen under load). Each generation
    thread therefore tokenizes, in suti's code and inside diffusers' pipelines alike, with its own
    copy. Copies are dropped with the tokenizer (weak keys).
    """
    copies = getattr(_THREAD, "tokenizers", None)
    if copies is None:
        copies = _THREAD.tokenizers = weakref.WeakKeyDictionary()
    own = copies.get(tokenizer)
    if own is None:
        own = copies[tokenizer] = copy.deepcopy(tokenizer)
    return own


def request_copy(pipe, check: Callable[[], None]):
    """A per-request view of a cached pipeline: shared weights, own scheduler and call state, and
    the calling thread's own tokenizers (:func:`thread_tokenizer`)."""
    view = copy.copy(pipe)
    view.__dict__["scheduler"] = copy.deepcopy(pipe.scheduler)
    view.__dict__["progress_bar"] = _StepGuard(check)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            view.__dict__[name] = thread_tokenizer(getattr(pipe, name))
    return view


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Result:
    images: list[bytes]  # PNG files
    seed: int
    seconds: float
    prompt_truncated: str | None = None  # "N tokens, the text encoder reads M" when the prompt was cut

    def b64(self) -> list[str]:
        return [base64.b64encode(b).decode("ascii") for b in self.images]


class Admission:
    """One request's place in a :class:`GenerationService` (released once)."""

    def __init__(self, service: "GenerationService"):
        self.service = service
        self.owned = False  # handed to submit(): the work's thread releases it
        self._released = False

    def release(self, force: bool = False) -> None:
        """Free the place, unless :meth:`GenerationService.submit` owns it (or ``force``)."""
        if self.owned and not force:
            return
        with self.service._lock:
            if self._released:
                return
            self._released = True
            self.service.active -= 1


class GenerationService:
    """Bounded, deadline-aware execution of generation requests on a thread pool."""

    def __init__(self, settings):
        self.settings = settings
        self.capacity = settings.max_concurrency + settings.max_queue
        self._pool = concurrent.futures.ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="suti-gen")
        self._lock = threading.Lock()
        self.active = 0  # admitted, not finished (running + waiting)
        self.running = 0
        self._ewma = 2.0  # seconds per request, for Retry-After
        self.closed = False

    @property
    def waiting(self) -> int:
        return max(0, self.active - self.running)

    def retry_after(self) -> int:
        per_slot = self._ewma * (self.waiting + 1) / self.settings.max_concurrency
        return max(1, math.ceil(per_slot))

    def admit(self) -> "Admission":
        """Take one of the ``capacity`` places now, before the request's photos are decoded;
        raises :class:`QueueFull` when none is free. Hand it to :meth:`submit`, or release it."""
        with self._lock:
            if self.active >= self.capacity:
                raise QueueFull(self.retry_after())
            self.active += 1
        return Admission(self)

    async def submit(self, fn: Callable[[Callable[[], None]], Result], admission: "Admission | None" = None) -> Result:
        """Run ``fn(check)`` within the limits; ``check()`` raises once the deadline has passed.

        ``admission`` (from :meth:`admit`) is the request's place; without one a place is taken
        now. The place is freed when the work's thread lets go of it."""
        admission = admission or self.admit()
        admission.owned = True
        deadline = time.monotonic() + self.settings.request_timeout
        abandoned = threading.Event()

        def check() -> None:
            if abandoned.is_set() or time.monotonic() > deadline:
                raise DeadlineExceeded()

        def job() -> Result:
            check()  # do not start work nobody waits for
            with self._lock:
                self.running += 1
            started = time.perf_counter()
            try:
                result = fn(check)
                with self._lock:
                    self._ewma = 0.8 * self._ewma + 0.2 * (time.perf_counter() - started)
                return result
            finally:
                with self._lock:
                    self.running -= 1

        try:
            future = self._pool.submit(job)
        except RuntimeError:  # shut down
            admission.release(force=True)
            raise
        future.add_done_callback(lambda _: admission.release(force=True))
        wrapped = asyncio.wrap_future(future)
        wrapped.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even when abandoned
        try:
            return await asyncio.wait_for(asyncio.shield(wrapped), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            abandoned.set()
            raise DeadlineExceeded() from None
        except asyncio.CancelledError:  # the client went away
            abandoned.set()
            raise

    def shutdown(self) -> None:
        self.closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- the two kinds of work ----------------------------------------------------------------

    def apprentice_work(self, images: list[Image.Image], captions: list[str] | None, prompt: str, num_images: int, steps: int, guidance_scale: float, demo_guidance_scale: float, seed: int):
        """The work of one apprentice request; its numbers are checked here, before queueing
        (:func:`check_request`, ``ApiError`` 400)."""
        settings = self.settings
        check_request(settings, steps=steps, num_images=num_images, guidance_scale=guidance_scale, demo_guidance_scale=demo_guidance_scale, seed=seed)

        def work(check) -> Result:
            from suti.sampling import DEFAULT_SAMPLE_BATCH_SIZE, batches, seeded_generators

            started = time.perf_counter()
            pipe = _load(f"the apprentice {settings.apprentice!r}", get_apprentice, settings.apprentice, settings.device, getattr(settings, "dtype", None))
            check()
            view = request_copy(pipe, check)
            truncated = _check_prompt(view.tokenizer, prompt)
            ctx = view.encode_demonstrations(images, captions)  # once per request
            out = []
            for chunk in batches(list(range(num_images)), DEFAULT_SAMPLE_BATCH_SIZE):  # image i: seed + i, whatever the batch
                made = view(prompt, num_images=len(chunk), demo_context=ctx, num_inference_steps=steps, guidance_scale=guidance_scale, demo_guidance_scale=demo_guidance_scale, generator=seeded_generators([seed + i for i in chunk])).images
                out += [png_bytes(image) for image in made]
            return Result(out, seed, time.perf_counter() - started, truncated)

        return work

    def expert_work(self, folder: Path, template: str, num_images: int, steps: int, guidance_scale: float, seed: int):
        """The work of one expert request; numbers checked before queueing, the filled prompt
        against the expert's tokenizer (a cut identifier: ``ApiError`` 400)."""
        settings = self.settings
        check_request(settings, steps=steps, num_images=num_images, guidance_scale=guidance_scale, seed=seed)

        def work(check) -> Result:
            from suti.sampling import DEFAULT_SAMPLE_BATCH_SIZE, batches, seeded_generators

            from serving.limits import ApiError

            started = time.perf_counter()
            gone = ApiError(410, f"job {folder.name}: the expert files are missing (the job was deleted while the request waited)")
            if not (folder / "expert.json").is_file():
                raise gone
            try:
                pipe, info = _load("the expert", get_expert, folder, settings.expert_cache, settings.device, getattr(settings, "dtype", None))
            except ModelUnavailable:
                if not (folder / "expert.json").is_file():  # deleted while it loaded
                    raise gone from None
                raise
            check()
            prompt = info.prompt(template)
            view = request_copy(pipe, check)
            truncated = _check_prompt(view.tokenizer, prompt, info.identifier)
            out = []
            for chunk in batches(list(range(num_images)), DEFAULT_SAMPLE_BATCH_SIZE):
                images = view([prompt] * len(chunk), height=info.resolution, width=info.resolution, num_inference_steps=steps, guidance_scale=guidance_scale, generator=seeded_generators([seed + i for i in chunk])).images
                out += [png_bytes(image) for image in images]
            return Result(out, seed, time.perf_counter() - started, truncated)

        return work
