"""Backbone-agnostic scoring: image/text embedders and the DreamBench / SuTI metrics.

A :class:`Scorer` embeds images (and, for CLIP-like scorers, texts) into L2-normalised vectors;
the metric functions only see those vectors, so the same code measures the offline synthetic
world (``toy-clip``, ``toy-identity``) and real checkpoints (``openai-clip-vit-b-32``,
``dino-vits16``). Pick one with :func:`get_scorer`.

Metrics (DreamBooth / DreamBench and SuTI definitions):

* :func:`clip_i` - subject fidelity: mean cosine over all (generated, real) image pairs.
* :func:`clip_t` - prompt fidelity: mean cosine of matched (image, prompt) pairs.
* :func:`dino` - subject fidelity with a self-supervised (DINO) embedding, same formula as
  ``clip_i``.
* :func:`delta_clip` - SuTI's filter: ``CLIP(y, p) - max_x CLIP(x, p)`` over the demonstrations.

Example::

    from suti.scoring import get_scorer, clip_i, clip_t

    clip = get_scorer("toy-clip")
    gen, real = clip.embed_images(generated), clip.embed_images(references)  # (N, D), (M, D)
    print(clip_i(gen, real), clip_t(gen, clip.embed_texts(prompts)))
"""

from __future__ import annotations

import contextlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from suti.errors import InputError, ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)


def _normalise(x):
    """``x`` as a float32 ``(N, D)`` tensor with unit rows (a 1-D vector becomes ``(1, D)``)."""
    import torch

    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2:
        raise InputError(f"embeddings must be (N, D), got shape {tuple(t.shape)}")
    return torch.nn.functional.normalize(t, dim=1)


def _rgb(images) -> list:
    images = list(images)
    if not images:
        raise InputError("no images to embed")
    return [im.convert("RGB") for im in images]


def _offline_env() -> bool:
    from suti.models import hub_offline

    return hub_offline()


@contextlib.contextmanager
def _hub_offline():
    """Make huggingface_hub answer from its local cache only (no network, no retries)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _cache_then_network(load: Callable, what: str, errors: list[str]):
    """``load()`` from the local hub cache first, then (unless ``HF_HUB_OFFLINE`` is set) with
    network access; returns ``None`` and appends to ``errors`` when both fail."""
    attempts = [("cache", _hub_offline)] + ([] if _offline_env() else
                                           [("network", contextlib.nullcontext)])
    for where, ctx in attempts:
        previous = logging.root.manager.disable
        logging.disable(logging.ERROR)  # open_clip logs its own "Failed to download" error: ours says it in one line
        try:
            with ctx():
                return load()
        except Exception as exc:  # missing cache, no network, bad tag, corrupt file
            errors.append(f"{what} ({where}): {type(exc).__name__}: {str(exc)[:160]}")
        finally:
            logging.disable(previous)
    return None


# --------------------------------------------------------------------------- scorers


def _embed_batched(images, preprocess, forward, batch_size: int, device) -> "torch.Tensor":
    """``forward`` over preprocessed ``images`` in batches, without gradients: (N, D), L2-normalised."""
    import torch

    images = _rgb(images)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.stack([preprocess(im) for im in images[i:i + batch_size]])  # (b, 3, H, W)
            out.append(forward(x.to(device)).float().cpu())  # (b, D)
    return _normalise(torch.cat(out))


class Scorer(ABC):
    """Embeds images (and texts, when ``supports_text``) into L2-normalised vectors.

    Attributes:
        name: the :func:`get_scorer` name (or a description for custom scorers).
        supports_text: whether :meth:`embed_texts` works (CLIP-like) or not (DINO-like).
    """

    name: str = "scorer"
    supports_text: bool = False

    @abstractmethod
    def embed_images(self, images: Sequence) -> torch.Tensor:
        """PIL images -> ``(N, D)`` float32 CPU tensor with unit-norm rows."""

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> ``(N, D)`` float32 CPU tensor with unit-norm rows (CLIP-like scorers)."""
        raise NotImplementedError(f"scorer {self.name!r} embeds images only, not texts")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class ToyClipScorer(Scorer):
    """The synthetic world's small CLIP (:func:`suti.world.toy_clip.load_toy_clip`)."""

    name = "toy-clip"
    supports_text = True

    def __init__(self, weights_dir=None):
        from suti.world.toy_clip import load_toy_clip

        self.model, self.preprocess, self.tokenizer = load_toy_clip(weights_dir)

    def embed_images(self, images):
        from suti.world.toy_clip import encode_images

        return encode_images(self.model, _rgb(images))  # (N, 128)

    def embed_texts(self, texts):
        from suti.world.toy_clip import encode_texts

        return encode_texts(self.model, list(texts), self.tokenizer)  # (N, 128)


class ToyIdentityScorer(Scorer):
    """The world probe's identity embedding (:meth:`suti.world.probe.Probe.identity_embedding`),
    playing DINO's role in the synthetic world: similar for scenes of the same subject, whatever
    the context, pose or accessory."""

    name = "toy-identity"

    def __init__(self, weights_dir=None):
        from suti.world.probe import load_probe

        self.probe = load_probe(weights_dir)

    def embed_images(self, images):
        return self.probe.identity_embedding(_rgb(images))  # (N, 64)


class OpenClipScorer(Scorer):
    """A real CLIP through open_clip (default OpenAI ViT-B/32, the DreamBench CLIP-I/T model).

    ``pretrained`` is an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``...) or
    a local checkpoint file. The local Hugging Face hub cache (where open_clip downloads weights)
    is tried first, then the network unless ``HF_HUB_OFFLINE=1`` (then it fails fast). The model
    gets the activation its weights were trained with (open_clip's pretrained config: QuickGELU
    for ``"openai"``, as in OpenAI's CLIP and the DreamBench metrics).

    Raises:
        ModelLoadError: the model or its weights cannot be loaded (the message says how to
            provide them).
    """

    supports_text = True

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str = "openai",
                 device: str | None = None, batch_size: int = 64):
        import torch

        try:
            import open_clip
        except ImportError as exc:  # pragma: no cover - a dependency of suti
            raise ModelLoadError(f"open_clip is not installed ({exc}); pip install open_clip_torch")
        self.name = f"open_clip:{model_name}/{pretrained}"
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        errors: list[str] = []
        # the activation the weights were trained with: OpenAI's CLIPs use QuickGELU, which the
        # plain "ViT-B-32" config lacks (open_clip only warns; the embeddings would drift)
        from open_clip.pretrained import get_pretrained_cfg

        quick_gelu = bool(get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))
        loaded = _cache_then_network(
            lambda: open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                          device=self.device,
                                                          force_quick_gelu=quick_gelu),
            "open_clip", errors)
        if loaded is None:
            raise ModelLoadError(
                f"could not load open_clip model {model_name!r} with pretrained={pretrained!r} "
                f"({'; '.join(errors)}). Offline, its weights must be in the local cache: on a "
                f"machine with network access run `python -c \"import open_clip; "
                f"open_clip.create_model_and_transforms('{model_name}', "
                f"pretrained='{pretrained}')\"` and copy ~/.cache/huggingface here (or pass "
                f"pretrained=/path/to/checkpoint). The offline world metrics use "
                f"get_scorer('toy-clip') instead")
        model, _, preprocess = loaded
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model = model.eval()
        self.preprocess = preprocess

    def embed_images(self, images):
        return _embed_batched(images, self.preprocess, self.model.encode_image, self.batch_size, self.device)

    def embed_texts(self, texts):
        import torch

        texts = list(texts)
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                tok = self.tokenizer(texts[i:i + self.batch_size]).to(self.device)
                out.append(self.model.encode_text(tok).float().cpu())
        return _normalise(torch.cat(out))  # (N, D)


#: DINO hub names -> timm model names.
DINO_TIMM_NAMES = {
    "dino_vits16": "vit_small_patch16_224.dino",
    "dino_vits8": "vit_small_patch8_224.dino",
    "dino_vitb16": "vit_base_patch16_224.dino",
    "dino_vitb8": "vit_base_patch8_224.dino",
}


class DinoScorer(Scorer):
    """Self-supervised DINO ViT embeddings (CLS token), the DreamBench DINO metric's model.

    Loads ``name`` (``dino_vits16`` by default) with timm (``vit_small_patch16_224.dino``) from
    the Hugging Face hub cache, else the hub; failing that with ``torch.hub`` from
    ``facebookresearch/dino`` (a cached checkout, else GitHub). With ``HF_HUB_OFFLINE=1`` only
    the caches are tried (fails fast). Images are
    resized to 256, centre-cropped to 224 and ImageNet-normalised.

    Raises:
        ModelLoadError: neither source can provide the model (the message says how to).
    """

    def __init__(self, name: str = "dino_vits16", device: str | None = None,
                 batch_size: int = 64):
        import torch

        if name not in DINO_TIMM_NAMES:
            raise ModelLoadError(f"unknown DINO model {name!r}; known: "
                                 f"{', '.join(DINO_TIMM_NAMES)}")
        self.name = name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        errors: list[str] = []
        model = None
        try:
            import timm
        except ImportError:
            errors.append("timm is not installed")
        else:
            model = _cache_then_network(
                lambda: timm.create_model(DINO_TIMM_NAMES[name], pretrained=True, num_classes=0),
                "timm", errors)
        if model is None:
            local = os.path.join(torch.hub.get_dir(), "facebookresearch_dino_main")
            if os.path.isdir(local):  # a cached checkout (its checkpoint cache is used too)
                try:
                    model = torch.hub.load(local, name, source="local")
                except Exception as exc:
                    errors.append(f"torch.hub (cache): {type(exc).__name__}: {str(exc)[:160]}")
            elif not _offline_env():
                try:
                    model = torch.hub.load("facebookresearch/dino:main", name, trust_repo=True)
                except Exception as exc:
                    errors.append(f"torch.hub (network): {type(exc).__name__}: "
                                  f"{str(exc)[:160]}")
        if model is None:
            raise ModelLoadError(
                f"could not load DINO model {name!r} ({'; '.join(errors)}). Offline, provide it "
                f"in a cache: on a machine with network access run `python -c \"import timm; "
                f"timm.create_model('{DINO_TIMM_NAMES[name]}', pretrained=True)\"` and copy "
                f"~/.cache/huggingface here (or torch.hub.load('facebookresearch/dino:main', "
                f"'{name}') and copy ~/.cache/torch/hub). The offline world metrics use "
                f"get_scorer('toy-identity') instead")
        self.model = model.eval().to(self.device)
        from torchvision import transforms

        self.preprocess = transforms.Compose([
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])

    def embed_images(self, images):
        return _embed_batched(images, self.preprocess, self.model, self.batch_size, self.device)  # CLS tokens


#: :func:`get_scorer` names -> (class, keyword arguments).
SCORERS = {
    "toy-clip": (ToyClipScorer, {}),
    "toy-identity": (ToyIdentityScorer, {}),
    "openai-clip-vit-b-32": (OpenClipScorer, {"model_name": "ViT-B-32", "pretrained": "openai"}),
    "dino-vits16": (DinoScorer, {"name": "dino_vits16"}),
}


#: Scorers trained on the synthetic world only: meaningless on real images.
TOY_SCORERS = ("toy-clip", "toy-identity")
#: The delta-CLIP scorer of a real model (a hub id or diffusers folder, not a preset).
REAL_MODEL_SCORER = "openai-clip-vit-b-32"


def model_scorer(model: str) -> str:
    """The :func:`get_scorer` name that goes with a text-to-image ``model``: a preset's ``scorer``
    field (``toy-clip`` for the world presets ``tiny``/``toy``; ``openai-clip-vit-b-32`` for
    ``sd15-arch``), else (a checkpoint folder or hub id) :data:`REAL_MODEL_SCORER`."""
    from suti.models import list_presets, load_preset

    if model in list_presets():
        return str(load_preset(model).get("scorer") or REAL_MODEL_SCORER)
    return REAL_MODEL_SCORER


def check_scorer_for_model(scorer: str, model: str) -> str:
    """``scorer``, checked against ``model``: a toy scorer (world-only) with a real model is refused.
    A model preset's name stands for its own scorer (``toy`` -> ``toy-clip``).

    Raises:
        InputError: ``scorer`` is unknown, or is a toy scorer while ``model`` is not a world preset.
    """
    from suti.models import list_presets

    if scorer in list_presets():  # a model preset names its own scorer, as `suti mine --model` reads it
        scorer = model_scorer(scorer)
    if scorer not in SCORERS:
        raise InputError(f"--scorer {scorer!r}: unknown scorer; known: {', '.join(SCORERS)} (or a model preset: {', '.join(list_presets())})")
    if scorer in TOY_SCORERS and model_scorer(model) not in TOY_SCORERS:
        raise InputError(f"--scorer {scorer} is the synthetic world's model and cannot judge samples of "
                         f"--model {model}; use --scorer {model_scorer(model)} (the default for this model)")
    return scorer


def get_scorer(name: str, **kwargs) -> Scorer:
    """Build a scorer by name: ``toy-clip``, ``toy-identity`` (offline world models),
    ``openai-clip-vit-b-32``, ``dino-vits16`` (real checkpoints; need their weights cached).

    Extra keyword arguments go to the scorer (``weights_dir`` for the toy ones, ``device``...).

    Raises:
        InputError: unknown name.
        ModelLoadError: the model cannot be loaded.
    """
    if name not in SCORERS:
        raise InputError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}")
    cls, defaults = SCORERS[name]
    scorer = cls(**{**defaults, **kwargs})
    scorer.name = name
    return scorer


# --------------------------------------------------------------------------- metrics


def clip_i(gen_emb, real_emb) -> float:
    """CLIP-I: mean cosine similarity over all (generated, real) pairs.

    Args:
        gen_emb: ``(N, D)`` embeddings of generated images.
        real_emb: ``(M, D)`` embeddings of the subject's real images (same scorer).

    Returns:
        ``mean_{i,j} cos(gen_i, real_j)`` in [-1, 1]; rows are re-normalised first.
    """
    g, r = _normalise(gen_emb), _normalise(real_emb)
    if g.shape[1] != r.shape[1]:
        raise InputError(f"embedding sizes differ: {g.shape[1]} vs {r.shape[1]}")
    return float((g @ r.T).mean())  # (N, M) -> scalar


def clip_t(img_emb, txt_emb) -> float:
    """CLIP-T: mean cosine similarity of matched (image, prompt) pairs.

    Args:
        img_emb: ``(N, D)`` image embeddings.
        txt_emb: ``(N, D)`` embeddings of each image's prompt, or ``(1, D)`` / ``(D,)`` for one
            prompt shared by all images.

    Returns:
        ``mean_i cos(img_i, txt_i)``.
    """
    i, t = _normalise(img_emb), _normalise(txt_emb)
    if t.shape[0] == 1:
        t = t.expand_as(i)
    if i.shape != t.shape:
        raise InputError(f"clip_t needs matched pairs: {tuple(i.shape)} images vs "
                         f"{tuple(t.shape)} texts")
    return float((i * t).sum(1).mean())


def dino(gen_emb, real_emb) -> float:
    """DINO score: :func:`clip_i`'s formula on DINO-like (identity) embeddings, ``(N, D)`` and
    ``(M, D)``."""
    return clip_i(gen_emb, real_emb)


def delta_clip(scorer: Scorer, target_image, prompt: str, demo_images) -> float:
    """SuTI's ΔCLIP: ``CLIP(y, p) - max_x CLIP(x, p)``.

    How much better the expert output ``target_image`` (y) matches ``prompt`` (p) than the best
    matching demonstration ``x`` of ``demo_images``; SuTI keeps an expert output only when it
    clears a threshold, so outputs that merely copy a demonstration are filtered out.

    Args:
        scorer: a text-capable scorer (``supports_text``).
        target_image: one PIL image.
        prompt: the prompt it was generated for.
        demo_images: the subject's demonstration images (at least one).
    """
    if not scorer.supports_text:
        raise InputError(f"delta_clip needs a text-capable scorer, not {scorer.name!r}")
    demos = list(demo_images)
    if not demos:
        raise InputError("delta_clip needs at least one demonstration image")
    emb = scorer.embed_images([target_image, *demos])  # (1 + K, D)
    txt = scorer.embed_texts([prompt])[0]  # (D,)
    sims = emb @ txt  # (1 + K,)
    return float(sims[0] - sims[1:].max())
