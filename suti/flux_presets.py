"""FLUX-family pipelines built offline from a preset's configs (``family: flux`` presets).

A FLUX.1 pipeline (Black Forest Labs; diffusers' ``FluxPipeline``) is a rectified-flow MMDiT
(``FluxTransformer2DModel``: double-stream blocks over text and image tokens, then single-stream
blocks, 3-axis RoPE) over the packed 2x2 patches of a 16-channel ``AutoencoderKL`` latent,
conditioned on a T5 encoder's token states (``joint_attention_dim``) and CLIP's pooled text
embedding (``pooled_projection_dim``), sampled with ``FlowMatchEulerDiscreteScheduler``.

Nothing is downloaded: the CLIP tokenizer is the real CLIP BPE (:mod:`suti.tokenizer`), and the
T5 tokenizer is a SentencePiece-style Unigram model trained here with the ``tokenizers`` library
on :data:`T5_CORPUS` (deterministic), wrapped as transformers' ``T5TokenizerFast`` with T5's
layout (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``</s>`` appended, ``▁`` word boundaries). It is
not T5's own vocabulary: a checkpoint's real T5 tokenizer gives other ids.
"""

from __future__ import annotations

import itertools
import json
import string
from typing import Any

_ASCII = string.ascii_letters + string.digits + string.punctuation

#: Special tokens of T5's vocabulary, in id order (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2).
T5_SPECIAL = ("<pad>", "</s>", "<unk>")

_SUBJECTS = (
    "dog", "cat", "backpack", "teapot", "vase", "sneaker", "robot toy", "teddy bear", "clock", "candle",
    "sunglasses", "boot", "bowl", "can", "cartoon monster", "duck toy", "fancy boot", "grey sloth plushie",
    "poop emoji", "rc car", "red cartoon", "shiny sneaker", "wolf plushie", "berry bowl", "colorful sneaker",
)
_COLOURS = ("red", "blue", "green", "yellow", "purple", "black", "white", "orange", "pink", "brown", "golden", "silver")
_CONTEXTS = (
    "on the beach", "in the snow", "in the jungle", "on a wooden table", "in front of the Eiffel Tower",
    "on top of a mountain", "in a city street at night", "on a cobblestone street", "floating in water",
    "on a pink fabric", "next to a lake", "in a kitchen", "under a tree in autumn", "on the moon",
    "in a field of flowers", "inside a cozy room", "at the Grand Canyon", "with a city in the background",
)
_STYLES = (
    "a photo of", "a close-up photo of", "a watercolor painting of", "an oil painting of", "a pencil sketch of",
    "a 3D render of", "a cartoon drawing of", "a high quality photograph of", "a cubist painting of",
    "a pixel art image of", "a vintage poster of", "a low-poly model of",
)
_EXTRAS = (
    "The quick brown fox jumps over the lazy dog.",
    "A sks dog wearing a Santa hat, 4k, highly detailed, trending on artstation.",
    "Photograph by Annie Leibovitz, 35mm, f/1.8, soft lighting, bokeh!",
    "In the style of Vincent van Gogh; Starry Night (1889).",
    "Two cats and 3 dogs play with a ball: one is sleeping, the other is running.",
    "Text that reads \"Hello, world\" written on a chalkboard.",
    "Cinematic shot, golden hour, wide angle lens, depth of field, 8K UHD, photorealistic.",
)


def t5_corpus() -> list[str]:
    """The built-in corpus the offline T5 tokenizer is trained on: subject-driven prompts
    (DreamBench-like subjects, colours, contexts, styles) and a few sentences with digits,
    capitals and punctuation. Deterministic."""
    lines = list(_EXTRAS) + [" ".join(_ASCII)]  # every ASCII character is a piece of the vocabulary
    for i, (style, subject, context) in enumerate(itertools.product(_STYLES, _SUBJECTS, _CONTEXTS)):
        colour = _COLOURS[i % len(_COLOURS)]
        lines.append(f"{style} a {colour} {subject} {context}" if i % 3 else f"{style} a {subject} {context}")
    return lines


def train_t5_tokenizer(vocab_size: int = 1000, model_max_length: int = 512):
    """A ``T5TokenizerFast`` whose Unigram model is trained offline on :func:`t5_corpus`.

    ``vocab_size`` is an upper bound (the small corpus may yield fewer pieces). Every ASCII letter,
    digit and punctuation mark is in the vocabulary (the corpus has them all), so ASCII text never
    maps to ``<unk>``; other characters do.

    Deterministic: every run gives the same pieces, ids and scores (:func:`_canonical_pieces`).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([  # T5TokenizerFast's own pre-tokenizer
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    trainer = trainers.UnigramTrainer(
        vocab_size=int(vocab_size), special_tokens=list(T5_SPECIAL), unk_token="<unk>",
        max_piece_length=16, show_progress=False,
    )
    tokenizer.train_from_iterator(t5_corpus(), trainer=trainer)
    scores = json.loads(tokenizer.to_str())["model"]["vocab"]  # [[piece, log-probability], ...]
    vocab = [(str(piece), float(score)) for piece, score in scores]
    assert tuple(p for p, _ in vocab[: len(T5_SPECIAL)]) == T5_SPECIAL, vocab[:3]
    return T5TokenizerFast(vocab=_canonical_pieces(vocab, len(T5_SPECIAL)), extra_ids=0, model_max_length=int(model_max_length))


def _canonical_pieces(vocab: list[tuple[str, float]], keep: int) -> list[tuple[str, float]]:
    """The trained pieces in an order and with scores that do not depend on the run.

    ``UnigramTrainer`` is not bit-reproducible: its EM sums in hash order (scores differ in their
    last bits), and its last step appends the required characters that EM dropped with scores
    ``min_score + k * 1e-4`` (``k = 0, 1, ...``) in hash-set order. Here the first ``keep`` pieces
    (the specials) stay, scores are rounded to 6 decimals, the single characters on that grid
    get its scores back in the characters' text order, and pieces are sorted by score, then text.
    """
    head = vocab[:keep]
    rest = {p: round(s, 6) for p, s in vocab[keep:]}
    if not rest:
        return head
    low = min(rest.values())
    grid: list[str] = []
    for k in range(len(rest)):
        on_grid = [p for p, s in rest.items() if len(p) == 1 and abs(s - (low + k * 1e-4)) < 2e-6]
        if not on_grid:
            break
        grid += on_grid
    values = sorted((rest[p] for p in grid), reverse=True)
    rest.update(zip(sorted(grid), values))  # the first character (in text order) gets the highest
    return head + sorted(rest.items(), key=lambda ps: (-ps[1], ps[0]))


def build_flux_pipeline(preset: dict[str, Any]):
    """A seeded random-weight ``FluxPipeline`` from a ``family: flux`` preset's configs.

    Keys: ``transformer`` (``FluxTransformer2DModel``), ``vae`` (``AutoencoderKL``, 16 latent
    channels: ``transformer.in_channels`` is 4x that, the packed 2x2 patches), ``text_encoder``
    (``CLIPTextConfig``: its pooled output, ``pooled_projection_dim``), ``text_encoder_2``
    (``T5Config`` of a ``T5EncoderModel``: ``d_model`` is ``joint_attention_dim``), ``tokenizer``
    (CLIP, ``model_max_length``), ``tokenizer_2`` (trained T5 Unigram: ``vocab_size``,
    ``model_max_length``) and ``scheduler`` (``FlowMatchEulerDiscreteScheduler``).
    """
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from suti.errors import ModelLoadError
    from suti.tokenizer import load_clip_tokenizer

    transformer_cfg, vae_cfg = preset["transformer"], preset["vae"]
    t5_cfg, clip_cfg = preset["text_encoder_2"], preset["text_encoder"]
    checks = {
        "transformer.in_channels == 4 * vae.latent_channels": transformer_cfg.get("in_channels", 64) == 4 * vae_cfg.get("latent_channels", 4),
        "transformer.joint_attention_dim == text_encoder_2.d_model": transformer_cfg.get("joint_attention_dim", 4096) == t5_cfg.get("d_model"),
        "transformer.pooled_projection_dim == text_encoder.hidden_size": transformer_cfg.get("pooled_projection_dim", 768) == clip_cfg.get("hidden_size"),
        "sum(transformer.axes_dims_rope) == transformer.attention_head_dim": sum(transformer_cfg.get("axes_dims_rope", (16, 56, 56))) == transformer_cfg.get("attention_head_dim", 128),
    }
    broken = [rule for rule, ok in checks.items() if not ok]
    if broken:
        raise ModelLoadError(f"preset {preset.get('name')!r}: inconsistent FLUX configs: {'; '.join(broken)}")

    torch.manual_seed(int(preset.get("seed", 0)))
    transformer = FluxTransformer2DModel(**transformer_cfg)
    vae = AutoencoderKL(**vae_cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_cfg))
    text_encoder_2 = T5EncoderModel(T5Config(**t5_cfg))
    tokenizer = load_clip_tokenizer(int(preset.get("tokenizer", {}).get("model_max_length", 77)))
    t5_tok = preset.get("tokenizer_2", {})
    tokenizer_2 = train_t5_tokenizer(int(t5_tok.get("vocab_size", 1000)), int(t5_tok.get("model_max_length", 512)))
    if len(tokenizer_2) > text_encoder_2.config.vocab_size:
        raise ModelLoadError(f"preset {preset.get('name')!r}: the T5 tokenizer has {len(tokenizer_2)} tokens, "
                             f"more than text_encoder_2.vocab_size {text_encoder_2.config.vocab_size}")
    scheduler = FlowMatchEulerDiscreteScheduler(**preset["scheduler"])
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
