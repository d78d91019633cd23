"""Training images of an expert as VAE latents, with diffusers' DreamBooth augmentations.

diffusers' ``train_dreambooth.py`` resizes each image (shorter side to the resolution), crops it
(``--center_crop``, else a random crop), optionally flips it (``--random_flip``) and encodes it
with the VAE at every step. The VAE is frozen, so suti encodes once and caches the latent
distributions (mean, std) wherever the result does not depend on the step:

- centre crop: one encoding per image, plus one of the flipped image with ``random_flip``
  (exact: a drawn flip picks the latents of the flipped pixels);
- random crop: the pixels (shorter side at the resolution) stay in memory and each step encodes
  its crops, as diffusers does.

Encoding runs in chunks of ``vae_encode_batch_size`` images, so peak memory does not grow with
the number of class images (issue 15: 0.64 GiB per 512-px image in one call).

The cache lives in memory for one training run and is never written to disk: every run encodes
its own images with its own VAE again, so no earlier run's latents can be served (it needs no
cache key; the persistent caches are the class images, :mod:`experts.data`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from suti.images import fit_square, load_image, to_tensor


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


def resize_shorter_side(img: Image.Image, resolution: int) -> Image.Image:
    """Resize so that the shorter side is ``resolution`` (torchvision ``Resize(resolution)``)."""
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    return img if size == img.size else img.resize(size, Image.Resampling.BICUBIC)


def load_training_pixels(paths: list[Path], resolution: int, center_crop: bool = True) -> list[torch.Tensor]:
    """Validate and load images as (3, H, W) tensors in [-1, 1].

    ``center_crop``: square (3, R, R) centre crops (:func:`suti.images.fit_square`); else the
    whole image with its shorter side at R, to be cropped at random per step. Every file is read
    before any is used, so the first bad one raises :class:`InputError` naming it.
    """
    images = [load_image(p) for p in paths]
    if center_crop:
        return [to_tensor(fit_square(img, resolution, name=str(p))) for p, img in zip(paths, images)]
    return [to_tensor(resize_shorter_side(img, resolution)) for img in images]


def augment(pixels: list[torch.Tensor], idx: torch.Tensor, flips: torch.Tensor | None, crops: torch.Tensor | None, resolution: int) -> torch.Tensor:
    """The augmented batch: image ``idx[i]``, cropped at ``crops[i] = (top, left)`` to R x R
    (``None``: the images are already R x R), flipped left-right where ``flips[i]``. -> (B, 3, R, R)."""
    out = []
    for i, j in enumerate(idx.tolist()):
        x = pixels[j]
        if crops is not None:
            top, left = crops[i].tolist()
            x = x[:, top : top + resolution, left : left + resolution]
        if flips is not None and bool(flips[i]):
            x = torch.flip(x, dims=[-1])
        out.append(x)
    return torch.stack(out)


class TrainingLatents:
    """The latent distributions of one image set (instance or class), drawn with augmentation.

    Args:
        vae: the frozen VAE.
        pixels: images from :func:`load_training_pixels`.
        resolution: the training resolution R (pixels).
        random_flip: flip each drawn image with probability 1/2.
        center_crop: the pixels are centre crops (else a random R x R crop is drawn per sample).
        batch_size: images per VAE call (``vae_encode_batch_size``).
    """

    def __init__(self, vae, pixels: list[torch.Tensor], resolution: int, *, random_flip: bool = False, center_crop: bool = True, batch_size: int = 8):
        self.vae, self.pixels, self.resolution = vae, pixels, resolution
        self.random_flip, self.center_crop, self.batch_size = random_flip, center_crop, batch_size
        self.cached = None
        if center_crop:
            stacked = torch.stack(pixels)
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
        if self.cached is not None:
            mean, std = self.cached[0][0][idx], self.cached[0][1][idx]
            if flips is not None:
                f_mean, f_std = self.cached[1][0][idx], self.cached[1][1][idx]
                m = flips.view(-1, 1, 1, 1).to(mean.device)
                mean, std = torch.where(m, f_mean, mean), torch.where(m, f_std, std)
            return mean, std
        return encode_in_chunks(self.vae, self.pixels_for(idx, flips, crops), self.batch_size)

    def pixels_for(self, idx: torch.Tensor, flips: torch.Tensor | None, crops: torch.Tensor | None) -> torch.Tensor:
        """The augmented pixels (B, 3, R, R) of a draw (``crops``: uniform (B, 2) from
        :meth:`draw_augmentation`, scaled here to each image's free range)."""
        offsets = None
        if crops is not None:
            offsets = torch.zeros(len(idx), 2, dtype=torch.long)
            for i, j in enumerate(idx.tolist()):
                _, h, w = self.pixels[j].shape
                free = torch.tensor([h - self.resolution + 1, w - self.resolution + 1])
                offsets[i] = (crops[i] * free).long().clamp(max=free - 1)
        return augment(self.pixels, idx, flips, offsets, self.resolution)
