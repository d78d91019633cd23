"""Training images of an expert as VAE latents, with diffusers' DreamBooth augmentations.

diffusers' ``train_dreambooth.py`` resizes each image (shorter side to the resolution), crops it
(``--center_crop``, else a random crop), optionally flips it (``--random_flip``) and encodes it
with the VAE at every step. The VAE is frozen, so suti encodes once and caches the latent
distributions (mean, std) wherever the result does not depend on the step:

- centre crop: one encoding per image, plus one of the flipped image with ``random_flip``
  (exact: a drawn flip picks the latents of the flipped pixels);
- random crop: the pixels (shorter side at the resolution) stay in memory and each step encodes
  its crops, as diffusers does.

With ``--aspect-ratio-buckets`` each image is resized to cover its bucket instead
(:mod:`experts.buckets`) and the images of one bucket form one set (:class:`BucketedLatents`);
class images are encoded once per bucket in use (:class:`FollowingLatents`). Each set knows its
photos' original sizes and crops, SDXL's ``time_ids`` (:meth:`TrainingLatents.time_ids`).

Encoding runs in chunks of ``vae_encode_batch_size`` images, so peak memory does not grow with
the number of class images (issue 15: 0.64 GiB per 512-px image in one call).

The cache lives in memory for one training run and is never written to disk: every run encodes
its own images with its own VAE again, so no earlier run's latents can be served (it needs no
cache key, and no option of the latents (buckets, crops, the resize filter) needs to be in one;
the persistent caches are the generated class images, :mod:`experts.data`, made at R x R
whatever those options are).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from suti.images import load_image, to_tensor

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_in_chunks(vae, images: torch.Tensor | list[torch.Tensor], batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, H, W) in [-1, 1] -> latent distribution (mean, std), each (N, C, H/8, W/8).

    At most ``batch_size`` images go through ``vae.encode`` at once; the result equals one call
    on all images (each image is encoded independently) up to float rounding.
    """
    from suti.losses import encode_images

    means, stds = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        chunk = torch.stack(list(chunk)) if isinstance(chunk, list) else chunk
        mean, std = encode_images(vae, chunk)
        means.append(mean)
        stds.append(std)
    return torch.cat(means), torch.cat(stds)


def resize_shorter_side(img: Image.Image, resolution: int, resample: Image.Resampling = Image.Resampling.LANCZOS) -> Image.Image:
    """Resize so that the shorter side is ``resolution`` (torchvision ``Resize(resolution)``,
    with ``resample``: diffusers' ``--image_interpolation_mode``, lanczos by default)."""
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    return img if size == img.size else img.resize(size, resample)


class TrainingImages(list):
    """Training images as (3, H, W) tensors in [-1, 1] (a list, so ``torch.stack`` takes it), with
    what SDXL's micro-conditioning and the buckets need, per image:

    - ``sizes``: its bucket (target) ``(height, width)`` in pixels (``(R, R)`` without buckets);
    - ``original_sizes``: ``(height, width)`` of the photo as read (EXIF orientation applied);
    - ``crop_top_lefts``: ``(top, left)`` of its centre crop in the resized image, or ``None``
      for every image with ``--random-crop`` (a crop is drawn per step);
    - ``paths``: the files; ``captions``: each photo's caption text (:func:`experts.data.
      read_captions`), ``None`` for a photo without one (or all ``None``).
    """

    def __init__(self, pixels, sizes, original_sizes, crop_top_lefts, paths, captions=None):
        super().__init__(pixels)
        self.sizes, self.original_sizes, self.crop_top_lefts, self.paths = sizes, original_sizes, crop_top_lefts, paths
        self.captions = captions if captions is not None else [None] * len(pixels)

    def by_size(self) -> dict[tuple[int, int], list[int]]:
        """The indices of the images of each bucket, buckets in order of first use."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(self.sizes):
            groups.setdefault(size, []).append(i)
        return groups

    def subset(self, indices: list[int]) -> "TrainingImages":
        """The images ``indices``, with their metadata."""
        pick = lambda xs: [xs[i] for i in indices]  # noqa: E731
        crops = None if self.crop_top_lefts is None else pick(self.crop_top_lefts)
        return TrainingImages(pick(self), pick(self.sizes), pick(self.original_sizes), crops, pick(self.paths), pick(self.captions))


def load_training_pixels(paths: list[Path], resolution: int, center_crop: bool = True, *, buckets: list[tuple[int, int]] | None = None,
                         interpolation: str = "lanczos", captions: list[str | None] | None = None) -> TrainingImages:
    """Validate and load images as (3, H, W) tensors in [-1, 1] (:class:`TrainingImages`).

    Each image goes to the bucket nearest its aspect ratio (:func:`experts.buckets.nearest_bucket`;
    ``buckets`` ``None``: the one square bucket R x R), is resized to cover it with the
    ``interpolation`` filter (:data:`experts.buckets.INTERPOLATION_MODES`) and, with
    ``center_crop``, centre-cropped to it; else kept whole, to be cropped at random per step.
    Every file is read before any is used, so the first bad one raises :class:`InputError`
    naming it.
    """
    from experts.buckets import center_crop_box, cover, nearest_bucket, resample_filter

    resample = resample_filter(interpolation)
    images = [load_image(p) for p in paths]
    buckets = buckets or [(resolution, resolution)]
    pixels, sizes, crops = [], [], []
    for path, img in zip(paths, images):
        size = nearest_bucket(img.height, img.width, buckets)
        if not center_crop and size[0] == size[1]:
            resized = resize_shorter_side(img, size[0], resample)
            _warn_upscale(img, size, path)
        else:
            resized = cover(img, size, resample, name=str(path))
        if center_crop:
            top, left = center_crop_box(resized.height, resized.width, size)
            resized = resized.crop((left, top, left + size[1], top + size[0]))
            crops.append((top, left))
        pixels.append(to_tensor(resized))
        sizes.append(size)
    return TrainingImages(pixels, sizes, [(img.height, img.width) for img in images], crops if center_crop else None, list(paths), captions)


def _warn_upscale(img: Image.Image, size: tuple[int, int], path) -> None:
    if img.height < size[0] or img.width < size[1]:
        log.warning("%s: %dx%d is smaller than the resolution %d; upscaling", path, img.width, img.height, size[0])


def augment(pixels: list[torch.Tensor], idx: torch.Tensor, flips: torch.Tensor | None, crops: torch.Tensor | None, resolution: int | tuple[int, int]) -> torch.Tensor:
    """The augmented batch: image ``idx[i]``, cropped at ``crops[i] = (top, left)`` to
    ``resolution`` (R, or (height, width); ``crops`` ``None``: the images are already that size),
    flipped left-right where ``flips[i]``. -> (B, 3, h, w)."""
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    out = []
    for i, j in enumerate(idx.tolist()):
        x = pixels[j]
        if crops is not None:
            top, left = crops[i].tolist()
            x = x[:, top : top + h, left : left + w]
        if flips is not None and bool(flips[i]):
            x = torch.flip(x, dims=[-1])
        out.append(x)
    return torch.stack(out)


class TrainingLatents:
    """The latent distributions of one image set (instance or class) of one size, drawn with
    augmentation.

    Args:
        vae: the frozen VAE.
        pixels: images from :func:`load_training_pixels` (a :class:`TrainingImages` carries each
            photo's original size and crop for SDXL's ``time_ids``; a plain list counts as photos
            of the training size, uncropped).
        resolution: the training size: R (square) or ``(height, width)`` (a bucket), pixels.
        random_flip: flip each drawn image with probability 1/2.
        center_crop: the pixels are centre crops (else a crop of that size is drawn per sample).
        batch_size: images per VAE call (``vae_encode_batch_size``).

    ``last`` is ``(idx, crops)`` of the latest :meth:`latents` call (the rows of the step being
    drawn, for :meth:`last_time_ids` and per-image captions); ``None`` before the first.
    """

    def __init__(self, vae, pixels: list[torch.Tensor], resolution: int | tuple[int, int], *, random_flip: bool = False, center_crop: bool = True, batch_size: int = 8):
        self.vae, self.pixels, self.resolution = vae, pixels, resolution
        self.size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        self.random_flip, self.center_crop, self.batch_size = random_flip, center_crop, batch_size
        self.original_sizes = getattr(pixels, "original_sizes", None) or [tuple(x.shape[-2:]) for x in pixels]
        crops = getattr(pixels, "crop_top_lefts", None)
        self.crop_top_lefts = crops if crops is not None else [(0, 0)] * len(pixels)
        self.last = None
        self.cached = None
        if center_crop:
            stacked = torch.stack(list(pixels))
            mean, std = encode_in_chunks(vae, stacked, batch_size)
            self.cached = [(mean, std)]
            if random_flip:
                self.cached.append(encode_in_chunks(vae, torch.flip(stacked, dims=[-1]), batch_size))

    def __len__(self) -> int:
        return len(self.pixels)

    def draw_indices(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` image indices drawn uniformly with replacement from ``generator`` (n,). A
        subclass may draw in another order (an epoch-wise shuffle, as a PyTorch DataLoader with
        ``shuffle=True``); every trainer (one expert or a stack) draws through here."""
        return torch.randint(0, len(self), (n,), generator=generator)

    def draw_augmentation(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Random flips (n,) bool and crop positions (n, 2) uniform in [0, 1) (top, left, as a
        fraction of each image's free range); ``None`` where unused.

        Draws nothing from ``generator`` when both augmentations are off, so runs without them
        see the same random stream as before they existed.
        """
        flips = torch.rand(n, generator=generator) < 0.5 if self.random_flip else None
        crops = None if self.center_crop else torch.rand(n, 2, generator=generator)
        return flips, crops

    def latents(self, idx: torch.Tensor, flips: torch.Tensor | None, crops: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (B, C, h, w), of the images ``idx`` with the drawn augmentation."""
        self.last = (idx, crops)
        if self.cached is not None:
            mean, std = self.cached[0][0][idx], self.cached[0][1][idx]
            if flips is not None:
                f_mean, f_std = self.cached[1][0][idx], self.cached[1][1][idx]
                m = flips.view(-1, 1, 1, 1).to(mean.device)
                mean, std = torch.where(m, f_mean, mean), torch.where(m, f_std, std)
            return mean, std
        return encode_in_chunks(self.vae, self.pixels_for(idx, flips, crops), self.batch_size)

    def offsets(self, idx: torch.Tensor, crops: torch.Tensor | None) -> torch.Tensor:
        """``(top, left)`` (B, 2) long of each drawn crop in its resized image: ``crops`` (uniform
        (B, 2) from :meth:`draw_augmentation`) scaled to each image's free range, or the fixed
        centre crops (``crops`` ``None``)."""
        if crops is None:
            return torch.tensor([self.crop_top_lefts[j] for j in idx.tolist()], dtype=torch.long).view(-1, 2)
        offsets = torch.zeros(len(idx), 2, dtype=torch.long)
        for i, j in enumerate(idx.tolist()):
            _, h, w = self.pixels[j].shape
            free = torch.tensor([h - self.size[0] + 1, w - self.size[1] + 1])
            offsets[i] = (crops[i] * free).long().clamp(max=free - 1)
        return offsets

    def pixels_for(self, idx: torch.Tensor, flips: torch.Tensor | None, crops: torch.Tensor | None) -> torch.Tensor:
        """The augmented pixels (B, 3, h, w) of a draw (``crops``: uniform (B, 2) from
        :meth:`draw_augmentation`, scaled here to each image's free range)."""
        offsets = None if crops is None else self.offsets(idx, crops)
        return augment(self.pixels, idx, flips, offsets, self.size)

    def time_ids(self, idx: torch.Tensor, crops: torch.Tensor | None) -> torch.Tensor:
        """SDXL's micro-conditioning of the drawn rows, (B, 6) float32: original height and width
        of each photo, the top and left of its crop in the resized photo, and the target height
        and width (diffusers' ``compute_time_ids(original_size, crops_coords_top_left)``)."""
        original = torch.tensor([self.original_sizes[j] for j in idx.tolist()], dtype=torch.float32).view(-1, 2)
        target = torch.tensor(self.size, dtype=torch.float32).expand(len(idx), 2)
        return torch.cat([original, self.offsets(idx, crops).float(), target], dim=1)

    def last_time_ids(self) -> torch.Tensor:
        """:meth:`time_ids` of the latest draw, (B, 6)."""
        return self.time_ids(*self.last)


class BucketedLatents:
    """Instance images in aspect-ratio buckets (:mod:`experts.buckets`): one
    :class:`TrainingLatents` per bucket, drawn so that the rows of one step share a bucket.

    A draw takes its first row uniformly over all N images and the others uniformly within that
    row's bucket, so every row is each image with probability 1/N (as without buckets). Indices
    are global (the order of the loaded images); ``members[size]`` lists a bucket's images.
    """

    def __init__(self, sets: dict[tuple[int, int], TrainingLatents], members: dict[tuple[int, int], list[int]]):
        self.sets, self.cached, self.last = sets, None, None
        self.members = {size: torch.tensor(m) for size, m in members.items()}
        self.bucket_of, self.local = {}, {}
        for size, m in members.items():
            for k, j in enumerate(m):
                self.bucket_of[j], self.local[j] = size, k
        self.n = len(self.bucket_of)

    def __len__(self) -> int:
        return self.n

    def size_of(self, idx: torch.Tensor) -> tuple[int, int]:
        """The bucket ``(height, width)`` of a draw (all its rows share it)."""
        return self.bucket_of[int(idx[0])]

    def draw_indices(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` global indices of one bucket (see the class docstring); (n,)."""
        first = torch.randint(0, len(self), (1,), generator=generator)
        members = self.members[self.bucket_of[int(first)]]
        rest = members[torch.randint(0, len(members), (n - 1,), generator=generator)]
        return torch.cat([first, rest])

    def draw_augmentation(self, n: int, generator: torch.Generator):
        """As :meth:`TrainingLatents.draw_augmentation` (the buckets share the settings)."""
        return next(iter(self.sets.values())).draw_augmentation(n, generator)

    def _local(self, idx: torch.Tensor) -> tuple[TrainingLatents, torch.Tensor]:
        return self.sets[self.size_of(idx)], torch.tensor([self.local[int(j)] for j in idx])

    def latents(self, idx: torch.Tensor, flips, crops):
        """(mean, std), each (B, C, h, w), of the draw ``idx`` (global indices of one bucket)."""
        self.last = (idx, crops)
        subset, local = self._local(idx)
        return subset.latents(local, flips, crops)

    def last_time_ids(self) -> torch.Tensor:
        """SDXL's ``time_ids`` (B, 6) of the latest draw (:meth:`TrainingLatents.time_ids`)."""
        subset, local = self._local(self.last[0])
        return subset.time_ids(local, self.last[1])


class FollowingLatents:
    """Class images in buckets that follow an instance set (a :class:`BucketedLatents`): each
    step's class rows are drawn uniformly over all the class images (as without buckets), resized
    and cropped to the bucket of the step's instance rows (the leader's latest draw), so that
    instance and class rows stack in one batch (diffusers' ``train_dreambooth_lora_flux2.py``
    matches each class image to its instance image's bucket in the same way).

    ``sets[size]``: all the class images at bucket ``size``.
    """

    def __init__(self, sets: dict[tuple[int, int], TrainingLatents], leader: BucketedLatents):
        self.sets, self.leader, self.cached, self.last = sets, leader, None, None
        self.current = next(iter(sets.values()))

    def __len__(self) -> int:
        return len(self.current)

    def draw_indices(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` class images, uniformly (n,), at the bucket of the leader's latest draw."""
        self.current = self.sets[self.leader.size_of(self.leader.last[0])]
        return self.current.draw_indices(n, generator)

    def draw_augmentation(self, n: int, generator: torch.Generator):
        return self.current.draw_augmentation(n, generator)

    def latents(self, idx: torch.Tensor, flips, crops):
        self.last = (idx, crops)
        return self.current.latents(idx, flips, crops)

    def last_time_ids(self) -> torch.Tensor:
        return self.current.time_ids(*self.last)


def latent_sets(vae, instance: TrainingImages, class_images: TrainingImages | None, *, bucketed: bool, random_flip: bool = False,
                center_crop: bool = True, batch_size: int = 8, interpolation: str = "lanczos"):
    """The instance and class latent sets of a run, ``(inst, cls)`` (``cls`` ``None`` without
    class images).

    Without buckets: one :class:`TrainingLatents` each. With ``bucketed`` (``--aspect-ratio-
    buckets``): a :class:`BucketedLatents` of the instance images' buckets, and the class images
    (square, :func:`load_training_pixels` at R) read again, resized and cropped to each bucket
    that an instance image uses (:class:`FollowingLatents`).
    """
    aug = dict(random_flip=random_flip, center_crop=center_crop, batch_size=batch_size)
    if not bucketed:
        inst = TrainingLatents(vae, instance, instance.sizes[0] if isinstance(instance, TrainingImages) else instance[0].shape[-1], **aug)
        cls = TrainingLatents(vae, class_images, class_images.sizes[0] if isinstance(class_images, TrainingImages) else class_images[0].shape[-1], **aug) if class_images is not None else None
        return inst, cls
    groups = instance.by_size()
    inst = BucketedLatents({size: TrainingLatents(vae, instance.subset(m), size, **aug) for size, m in groups.items()}, groups)
    if class_images is None:
        return inst, None
    sets = {}
    for size in groups:
        pixels = load_training_pixels(class_images.paths, size[0], center_crop, buckets=[size], interpolation=interpolation)
        sets[size] = TrainingLatents(vae, pixels, size, **aug)
    return inst, FollowingLatents(sets, inst)
