"""What each row of an expert's training step is conditioned on: its prompt (the instance
prompt, the photo's own caption, or the empty prompt when the caption is dropped) and, for SDXL,
its photo's true sizes.

- Per-image captions (``--caption-extension``, :func:`experts.data.read_captions`): a photo's
  caption, filled like ``--instance-prompt``, is the prompt of its rows.
- Caption dropout (``--caption-dropout P``, diffusers' ``--proportion_empty_prompts``): each
  instance row trains on the empty prompt ``""`` with probability P (class rows keep the class
  prompt); drawn after the step's other draws, so a run without it draws the same stream.
- SDXL's ``time_ids`` (Podell et al. 2023, section 2.2; diffusers' ``compute_time_ids``): each
  row's original photo size, its crop's top-left in the resized photo and its target size
  (:meth:`experts.latents.TrainingLatents.time_ids`), not the square resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from experts.identifier import fill_prompt
from suti.conditioning import Conditioning, encode_prompt


@dataclass
class InstanceText:
    """The prompts of the instance images: ``prompts[i]`` of image ``i`` (the instance prompt,
    or its filled caption), and with a frozen text encoder their cached conditionings
    (``conds``: one row per image, or ``None`` when no image has a caption of its own) and the
    empty prompt's (``empty``, for caption dropout; ``None`` without it)."""

    prompts: list[str]
    conds: Conditioning | None = None
    empty: Conditioning | None = None
    has_captions: bool = False


def instance_text(pipe, config, prompt: str, captions: list[str | None], encode: bool) -> InstanceText:
    """The :class:`InstanceText` of a run: each caption filled with the identifier and class noun
    and checked against the tokenizer (as the instance prompt is); ``encode``: cache the
    conditionings (a frozen text encoder).

    Raises:
        InputError: a caption whose truncation to the tokenizer's length cuts the identifier.
    """
    from suti.sampling import check_prompt

    prompts = []
    for caption in captions:
        if caption is None:
            prompts.append(prompt)
            continue
        filled = fill_prompt(caption, config.identifier, config.class_noun)
        check_prompt(pipe.tokenizer, filled, identifier=config.identifier, what=f"caption {filled!r}")
        prompts.append(filled)
    text = InstanceText(prompts, has_captions=any(c is not None for c in captions))
    if encode:
        with torch.no_grad():
            length = getattr(config, "max_sequence_length", None)  # FLUX's T5 tokens
            if text.has_captions:
                text.conds = encode_prompt(pipe, prompts, resolution=config.resolution, max_sequence_length=length)
            if config.caption_dropout > 0:
                text.empty = encode_prompt(pipe, [""], resolution=config.resolution, max_sequence_length=length)
    return text


@dataclass
class StepRows:
    """The rows of one optimizer step (``n`` instance rows, then ``n`` class rows):

    - ``idx`` (n,): the instance image of each instance row;
    - ``drop`` (n,) bool: the instance rows trained on the empty prompt (``None``: none);
    - ``time_ids`` (rows, 6): SDXL's sizes of every row.
    """

    idx: torch.Tensor
    drop: torch.Tensor | None
    time_ids: torch.Tensor


def step_rows(inst, cls, n: int, generator: torch.Generator, caption_dropout: float) -> StepRows:
    """The :class:`StepRows` of the step just drawn from ``inst`` and ``cls`` (their latest
    draws, :func:`experts.train.draw_training_batch`); the dropout is drawn here from
    ``generator``, after the step's other draws (nothing is drawn at ``caption_dropout`` 0)."""
    time_ids = [inst.last_time_ids()] + ([cls.last_time_ids()] if cls is not None else [])
    drop = torch.rand(n, generator=generator) < caption_dropout if caption_dropout > 0 else None
    return StepRows(inst.last[0], drop, torch.cat(time_ids))


def row_prompts(rows: StepRows, k: int, b: int, text: InstanceText, class_prompt: str | None) -> list[str]:
    """The prompts of micro-batch ``k`` (``b`` instance rows, then ``b`` class rows when
    ``class_prompt`` is given)."""
    sel = slice(k * b, (k + 1) * b)
    drop = rows.drop[sel].tolist() if rows.drop is not None else [False] * b
    prompts = ["" if d else text.prompts[j] for j, d in zip(rows.idx[sel].tolist(), drop)]
    return prompts + ([class_prompt] * b if class_prompt is not None else [])


def cached_conditioning(rows: StepRows, k: int, b: int, text: InstanceText, cond_inst: Conditioning, cond_cls: Conditioning | None) -> Conditioning:
    """Micro-batch ``k``'s conditioning from the cached ones (a frozen text encoder): each
    instance row its image's prompt (``cond_inst`` when no image has a caption), dropped rows the
    empty prompt's, then ``b`` class rows; SDXL's time ids are set by :func:`with_time_ids`."""
    sel = slice(k * b, (k + 1) * b)
    inst = text.conds[rows.idx[sel]] if text.conds is not None else Conditioning.cat([cond_inst] * b)
    if rows.drop is not None:
        inst = inst.where(rows.drop[sel], text.empty)
    return Conditioning.cat([inst] + ([cond_cls] * b if cond_cls is not None else []))


def with_time_ids(cond: Conditioning, rows: StepRows, micro_rows: torch.Tensor) -> Conditioning:
    """``cond`` with SDXL's ``time_ids`` replaced by the true sizes of ``micro_rows`` (the
    step's row indices of the micro-batch); unchanged for a model without time ids."""
    if cond.added_cond_kwargs is None or "time_ids" not in cond.added_cond_kwargs:
        return cond
    old = cond.added_cond_kwargs["time_ids"]
    added = dict(cond.added_cond_kwargs, time_ids=rows.time_ids[micro_rows].to(old.device, old.dtype))
    return Conditioning(cond.encoder_hidden_states, added)
