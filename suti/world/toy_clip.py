"""A small CLIP for the synthetic world: makes CLIP-I / CLIP-T measurable offline.

The model is an ordinary :class:`open_clip.model.CLIP` built from a custom config
(``"suti-toy-clip"``, :data:`DEFAULT_CONFIG`): a ModifiedResNet (CLIP-RN style) vision tower
on 32x32 images and a causal text transformer over the standard CLIP BPE tokens
(:class:`open_clip.tokenizer.SimpleTokenizer`, context length 32, the real 49408-token
vocabulary). Any image size is accepted: images are centre-cropped to a square and resized to
32 px with LANCZOS (the world itself renders 32 px scenes by LANCZOS-downsampling 4x sprites).

This module is the model, its weights format and its evaluation. It is pretrained
contrastively on scenes of the *train* subjects of the training world
(:data:`TRAIN_WORLD_SUBJECTS` subjects, seed :data:`TRAIN_WORLD_SEED`; :func:`training_world`)
by :mod:`suti.world.training.clip` (``python -m suti.world.training.clip``), with captions in
several forms (:func:`suti.world.captions.form_caption`) and multi-positive targets. Held-out
subjects of that world (all held-out subjects of ``make_world(n, seed=0)`` for ``n <= 1024``,
the default 24-subject world included) are never seen.

Usage::

    from suti.world.toy_clip import load_toy_clip, encode_images, encode_texts

    model, preprocess, tokenizer = load_toy_clip()
    img = encode_images(model, images)          # (N, D), L2-normalised
    txt = encode_texts(model, ["a red ball on the beach"])  # (1, D)
"""

from __future__ import annotations

import importlib
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from suti.errors import ModelLoadError

log = logging.getLogger(__name__)

#: Where the shipped weights live (``toy_clip.safetensors`` + ``toy_clip.json``, ``probe.*``).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: The world whose *train* split the toy models learn from (its held-out split is never seen).
TRAIN_WORLD_SUBJECTS = 1024
TRAIN_WORLD_SEED = 0
#: Side of the images the toy models see.
IMAGE_SIZE = 32

MODEL_NAME = "suti-toy-clip"
#: open_clip model config (``CLIP(embed_dim, vision_cfg, text_cfg)``) of the toy CLIP.
DEFAULT_CONFIG: dict = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": [1, 1, 1, 1], "width": 16,
                   "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4,
                 "layers": 3},
}
#: Pixel normalisation: [0, 255] -> [-1, 1] (the same scale as :func:`suti.images.to_tensor`).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


# --------------------------------------------------------------------------- images and text


def resize_to(img: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """RGB, centre-cropped to a square and resized to ``size`` (LANCZOS) when needed."""
    img = img.convert("RGB")
    if img.width != img.height:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.width != size:
        img = img.resize((size, size), Image.LANCZOS)
    return img


def images_to_tensor(images, size: int = IMAGE_SIZE):
    """PIL images (any size/mode) -> float tensor ``(N, 3, size, size)`` in [-1, 1]."""
    import torch

    arr = np.stack([np.asarray(resize_to(im, size), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div_(127.5).sub_(1.0).contiguous()


class Preprocess:
    """The toy CLIP's image transform: PIL image -> ``(3, 32, 32)`` float tensor in [-1, 1]."""

    def __init__(self, size: int = IMAGE_SIZE):
        self.size = size

    def __call__(self, img: Image.Image):
        return images_to_tensor([img], self.size)[0]

    def __repr__(self) -> str:
        return f"Preprocess(size={self.size}, resample=LANCZOS, mean={IMAGE_MEAN}, std={IMAGE_STD})"


@lru_cache(maxsize=4)
def get_tokenizer(context_length: int = 32):
    """The standard CLIP BPE tokenizer of open_clip (offline): ``tok(list[str]) -> (N, L) long``."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def build_toy_clip(config: dict | None = None):
    """A randomly initialised toy CLIP (an ``open_clip.model.CLIP``) from an open_clip config."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    cfg = config or DEFAULT_CONFIG
    return CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]),
                CLIPTextCfg(**cfg["text_cfg"]))


def _image_size(model) -> int:
    size = getattr(model.visual, "image_size", IMAGE_SIZE)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def encode_images(model, images, batch_size: int = 256):
    """Embed PIL images with a toy CLIP: ``(N, D)`` L2-normalised float32 tensor."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images_to_tensor(images[i:i + batch_size], _image_size(model))
            out.append(model.encode_image(x, normalize=True).float())
    return torch.cat(out) if out else torch.zeros(0, model.text_projection.shape[1])


def encode_texts(model, texts, tokenizer=None, batch_size: int = 512):
    """Embed strings with a toy CLIP: ``(N, D)`` L2-normalised float32 tensor."""
    import torch

    tokenizer = tokenizer or get_tokenizer(model.context_length)
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            out.append(model.encode_text(tokenizer(list(texts[i:i + batch_size])),
                                         normalize=True).float())
    return torch.cat(out) if out else torch.zeros(0, model.text_projection.shape[1])


# --------------------------------------------------------------------------- evaluation


def training_world(num_subjects: int = TRAIN_WORLD_SUBJECTS):
    """The world the toy models are trained on (only its train split is used).

    Worlds of one seed extend each other with the same splits, so a bigger training world
    (the probe uses 6144 subjects) keeps every held-out subject of the smaller ones unseen.
    """
    from suti.world.spec import make_world

    return make_world(num_subjects, seed=TRAIN_WORLD_SEED)


def retrieval_accuracy(model, subjects, n: int = 64, seed: int = 1234, edit_prob: float = 0.5,
                       tokenizer=None) -> dict[str, float]:
    """Caption retrieval among ``n`` scenes of ``n`` different subjects (one each).

    Each scene gets the world's caption (:func:`suti.world.caption`, edits included). Returns
    ``image_to_text`` / ``text_to_image`` top-1 accuracies and ``chance`` (= 1/n); a retrieved
    caption counts as right when its text equals the true caption.
    """
    from suti.world.render import sample_scene

    rng = np.random.default_rng(seed)
    chosen = [subjects[i] for i in rng.permutation(len(subjects))[:n]]
    scenes = [sample_scene(s, rng, size=IMAGE_SIZE, edit_prob=edit_prob) for s in chosen]
    img = encode_images(model, [im for im, _, _ in scenes])
    texts = [t for _, t, _ in scenes]
    txt = encode_texts(model, texts, tokenizer)
    sim = img @ txt.T  # (n images, n captions)
    i2t = [texts[int(j)] == texts[i] for i, j in enumerate(sim.argmax(1))]
    t2i = [texts[int(i)] == texts[j] for j, i in enumerate(sim.argmax(0))]
    return {"image_to_text": float(np.mean(i2t)), "text_to_image": float(np.mean(t2i)),
            "chance": 1.0 / len(chosen), "n": len(chosen)}


# --------------------------------------------------------------------------- loading

_EMB = "token_embedding.weight"


def pack_state(model, token_ids) -> dict:
    """The model's state dict for saving: fp16 floats, and of the 49408 x width token
    embedding only the rows of ``token_ids`` (the tokens seen in training), as
    ``token_embedding.rows`` + ``token_embedding.ids``; the others never received a gradient
    and are restored as zeros (an unknown word). Keeps the file at a few MB."""
    import torch

    state = {}
    for k, v in model.state_dict().items():
        if k == _EMB:
            ids = torch.as_tensor(token_ids, dtype=torch.long).unique()
            state["token_embedding.ids"] = ids.contiguous()
            state["token_embedding.rows"] = v[ids].to(torch.float16).contiguous()
        elif k == "attn_mask":
            continue  # a constant buffer, rebuilt by the constructor
        else:
            state[k] = (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
    return state


def unpack_state(state: dict, model) -> dict:
    """Inverse of :func:`pack_state` for ``model``: float32 state dict with the full token
    embedding (rows never trained are zero)."""
    import torch

    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if "token_embedding.ids" in state:
        ids, rows = state.pop("token_embedding.ids"), state.pop("token_embedding.rows")
        table = torch.zeros_like(model.token_embedding.weight)
        table[ids] = rows
        state[_EMB] = table
    return state


def _load_from(folder: Path):
    """``(model, preprocess, tokenizer)`` from ``toy_clip.safetensors`` + ``toy_clip.json`` in
    ``folder`` (:class:`ModelLoadError` when they are missing, cut or do not match)."""
    from safetensors.torch import load_file

    from suti.weights import check_safetensors, loading, read_json_file

    meta = read_json_file(folder / "toy_clip.json")
    check_safetensors(folder / "toy_clip.safetensors")
    with loading(folder / "toy_clip.safetensors"):
        model = build_toy_clip(meta["model_cfg"])
        state = unpack_state(load_file(str(folder / "toy_clip.safetensors")), model)
        missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if k != "attn_mask"] or unexpected:
        raise ModelLoadError(f"{folder}/toy_clip.safetensors does not match toy_clip.json "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, Preprocess(meta["image_size"]), get_tokenizer(
        meta["tokenizer"]["context_length"])


def _weights_folder(name: str, files: tuple[str, ...], pretrain: str, weights_dir) -> Path:
    """The folder holding ``files``: ``weights_dir``, the shipped weights, or a cache folder
    pretrained on first use by ``pretrain`` (``"module:function"``, called as
    ``function(folder, progress=True)``; resolved only then, so the training code is not
    imported by the model's module) with a warning; safe across processes.

    Raises:
        ModelLoadError: ``weights_dir`` lacks one of ``files``.
    """
    if weights_dir is not None:
        folder = Path(weights_dir)
        if not all((folder / f).is_file() for f in files):
            raise ModelLoadError(f"{folder}: no {' + '.join(files)} there")
        return folder
    if all((WEIGHTS_DIR / f).is_file() for f in files):
        return WEIGHTS_DIR
    from filelock import FileLock

    from suti.models import cache_dir

    folder = cache_dir() / "world" / name
    if not all((folder / f).is_file() for f in files):
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if not all((folder / f).is_file() for f in files):
                log.warning("no shipped %s weights in %s: pretraining them into %s (minutes)",
                            name, WEIGHTS_DIR, folder)
                module, func = pretrain.split(":")
                getattr(importlib.import_module(module), func)(folder, progress=True)
    return folder


def load_toy_clip(weights_dir: str | Path | None = None):
    """Load the toy CLIP: ``(model, preprocess, tokenizer)``, model in eval mode, frozen.

    Weights come from ``weights_dir`` when given, else the shipped ``suti/world/weights/``; when
    those are missing they are pretrained once into ``<suti cache>/world/toy_clip`` (a logged
    warning, several minutes). ``preprocess(PIL) -> (3, 32, 32)`` tensor; ``tokenizer(list[str])
    -> (N, 32)`` token ids (standard CLIP BPE).

    Raises:
        ModelLoadError: ``weights_dir`` lacks the files or they do not match their config.
    """
    folder = _weights_folder("toy_clip", ("toy_clip.safetensors", "toy_clip.json"),
                             "suti.world.training.clip:pretrain_clip", weights_dir)
    return _load_from(folder)
