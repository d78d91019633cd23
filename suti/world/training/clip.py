"""Pretraining of the toy CLIP (:mod:`suti.world.toy_clip`, the model).

It is trained contrastively (symmetric InfoNCE, learnable temperature) on scenes of the *train*
subjects of the training world (:func:`~suti.world.toy_clip.training_world`), half of them
edited (colour change, accessory, style), rendered into a
:class:`~suti.world.training.scenes.SceneBuffer` (each step renders 64 fresh scenes and reuses
stored ones, with flips), each drawn with a fresh caption of one of several forms
(:func:`suti.world.captions.form_caption`, weights :data:`CAPTION_FORMS`):

* ``full``: the world's DreamBench caption (``"a sketch of a red striped robot in the snow"``),
* ``class``: class noun only (``"a robot wearing a hat on the beach"``) as DreamBench prompts
  are worded, naming the colour only for a colour edit,
* ``detailed``: proportions, part and pattern colour too,
* ``nocontext``: the full caption without its context phrase.

Captions that leave an attribute out are true of many images, so the contrastive targets are
*multi-positive*: caption ``j`` counts as a positive of image ``i`` whenever everything caption
``j`` states holds for image ``i`` (colour counts as unknowable in sketches).

``python -m suti.world.training.clip OUT_DIR [--minutes M] [--steps N] [--seed S]``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from suti import storage
from suti.world.captions import form_caption
from suti.world.toy_clip import (
    DEFAULT_CONFIG,
    IMAGE_MEAN,
    IMAGE_SIZE,
    IMAGE_STD,
    MODEL_NAME,
    TRAIN_WORLD_SEED,
    TRAIN_WORLD_SUBJECTS,
    build_toy_clip,
    get_tokenizer,
    pack_state,
    retrieval_accuracy,
    training_world,
)
from suti.world.training.scenes import SceneBuffer
from suti.world.training.schedule import Clock, progress_warmup_cosine, set_lr
from suti.world.vocab import attribute_labels

log = logging.getLogger(__name__)

#: Attribute fields of a scene, in the column order of :func:`scene_truth`.
FIELDS = ("class", "color", "pattern", "pattern_color", "part", "aspect", "context",
          "accessory", "style")
#: Caption form -> probability in a training batch (see :func:`suti.world.captions.form_caption`).
CAPTION_FORMS = {"full": 0.55, "class": 0.2, "detailed": 0.15, "nocontext": 0.1}


def vocabularies() -> dict[str, list]:
    """Per-field label lists (:func:`suti.world.vocab.attribute_labels`)."""
    return attribute_labels()


def scene_truth(subject, meta: dict) -> dict[str, object]:
    """The attribute values shown in a scene of ``subject`` (``meta`` from ``sample_scene``)."""
    return {"class": subject.class_name, "color": meta["color"], "pattern": subject.pattern,
            "pattern_color": subject.pattern_color,
            "part": f"{subject.class_name}/{subject.part}", "aspect": subject.aspect,
            "context": meta["context"], "accessory": meta["accessory"], "style": meta["style"]}


def _codes(values: dict) -> list[int]:
    """Label indices of ``values`` over :data:`FIELDS` (``-1``: field not in ``values``)."""
    voc = vocabularies()
    return [voc[f].index(values[f]) if f in values else -1 for f in FIELDS]


def scene_caption(subject, meta: dict, form: str) -> tuple[str, dict]:
    """A caption of one caption form (:func:`suti.world.captions.form_caption`) and the
    attributes it states (field of :data:`FIELDS` -> value).

    Attributes a caption leaves out are unconstrained, except accessory and style (naming none
    means there is none, as in :func:`suti.world.caption`) and, in ``full``/``detailed``
    captions, the pattern (the world omits the word for plain subjects).
    """
    truth = scene_truth(subject, meta)
    override = meta["color"] if meta.get("edit") == "attribute" else None
    stated = {"class": truth["class"], "accessory": truth["accessory"], "style": truth["style"]}
    if form == "class":
        if override:
            stated["color"] = override
    else:
        stated.update(color=truth["color"], pattern=truth["pattern"])
        if form == "detailed":
            stated.update(pattern_color=truth["pattern_color"], part=truth["part"],
                          aspect=truth["aspect"])
    if form != "nocontext":
        stated["context"] = truth["context"]
    return form_caption(subject, meta, form), stated


def positives(truth_codes, caption_codes):
    """``(B, B)`` bool: caption ``j`` holds for image ``i`` (all its stated fields match).

    ``truth_codes``/``caption_codes``: ``(B, F)`` int arrays over :data:`FIELDS`; a caption code
    ``-1`` is an unstated field, a truth code ``-2`` an unknowable one (colour in a sketch).
    """
    t = truth_codes[:, None, :]
    c = caption_codes[None, :, :]
    return ((c == -1) | (t == -2) | (c == t)).all(-1)


def clip_batch(buffer: SceneBuffer, batch_size: int, forms: dict[str, float] | None = None):
    """A contrastive batch from ``buffer`` (one scene each of ``batch_size`` subjects, each with
    a fresh random caption form): ``(images (B,3,32,32), captions, truth codes (B, F),
    caption codes (B, F))`` for :func:`positives`."""
    forms = forms or CAPTION_FORMS
    names, probs = list(forms), np.array(list(forms.values()), float)
    probs /= probs.sum()
    x, ks, metas = buffer.sample(batch_size, 1)
    texts, tcodes, ccodes = [], [], []
    for k, meta in zip(ks, metas):
        subject = buffer.subjects[k]
        form = names[int(buffer.rng.choice(len(names), p=probs))]
        text, stated = scene_caption(subject, meta, form)
        truth = _codes(scene_truth(subject, meta))
        if meta["style"] == "sketch":
            truth[FIELDS.index("color")] = truth[FIELDS.index("pattern_color")] = -2
        texts.append(text)
        tcodes.append(truth)
        ccodes.append(_codes(stated))
    return x, texts, np.array(tcodes), np.array(ccodes)


def _optimizer(model, lr: float):
    """AdamW with weight decay 0.05 on matrices other than embeddings, none elsewhere."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                              {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def _contrastive_step(model, opt, tokenizer, batch, seen) -> float:
    """One optimizer step of the multi-positive symmetric InfoNCE loss on a :func:`clip_batch`;
    marks the batch's token ids in ``seen`` (vocab-sized bool); returns the loss."""
    import torch
    import torch.nn.functional as F

    x, texts, tcodes, ccodes = batch
    pos = torch.from_numpy(positives(tcodes, ccodes)).float()  # (B images, B captions)
    tokens = tokenizer(texts)  # (B, 32)
    seen[tokens.unique()] = True
    img, txt, scale = model(x, tokens)  # (B, D), (B, D), ()
    logits = scale * img @ txt.T
    loss_i = -(F.log_softmax(logits, 1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
    loss_t = -(F.log_softmax(logits, 0) * pos / pos.sum(0, keepdim=True)).sum(0).mean()
    loss = 0.5 * (loss_i + loss_t)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return float(loss.detach())


def _write(out: Path, model, cfg: dict, seen, training: dict, metrics: dict) -> dict:
    """Write ``toy_clip.safetensors`` (:func:`~suti.world.toy_clip.pack_state`, the rows of
    ``seen`` token ids) and ``toy_clip.json`` to ``out``; returns the json's content."""
    import torch
    from safetensors.torch import save_file

    state = pack_state(model, torch.nonzero(seen).flatten())
    with storage.atomic_local_path(out / "toy_clip.safetensors") as tmp:
        save_file(state, str(tmp))
    meta = {
        "model_name": MODEL_NAME, "model_cfg": cfg, "image_size": IMAGE_SIZE,
        "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD),
        "tokenizer": {"kind": "open_clip.SimpleTokenizer",
                      "context_length": cfg["text_cfg"]["context_length"]},
        "training": training,
        "parameters": sum(p.numel() for p in model.parameters()),
        "token_embedding": {"rows_stored": int(seen.sum()), "other_rows": "zero (never trained)"},
        "metrics": metrics,
    }
    storage.write_text(out / "toy_clip.json", json.dumps(meta, indent=1) + "\n")
    return meta


def pretrain_clip(out_dir: str | Path, *, seed: int = 0, minutes: float = 20.0,
                  steps: int = 500, batch_size: int = 256, fresh: int = 64, lr: float = 1e-3,
                  config: dict | None = None, progress: bool = True) -> dict:
    """Pretrain the toy CLIP on the training world; write ``toy_clip.safetensors`` + ``.json``.

    Training stops after ``steps`` steps or ``minutes`` of wall time, whichever comes first;
    the learning rate follows warm-up + cosine over that budget. Weights are saved in fp16
    (:func:`~suti.world.toy_clip.pack_state`). The defaults are those of the shipped weights
    (500 steps took 10 min on one shared CPU core).

    Args:
        out_dir: folder for ``toy_clip.safetensors`` and ``toy_clip.json`` (created).
        seed: seeds the initialisation and the scene stream.
        minutes: wall-time budget.
        steps: step budget.
        batch_size: scenes (and captions) per contrastive batch, of distinct subjects.
        fresh: scenes rendered into the :class:`SceneBuffer` per step (the rest is reuse).
        lr: peak AdamW learning rate.
        config: open_clip model config (default :data:`~suti.world.toy_clip.DEFAULT_CONFIG`).
        progress: log the loss every 50 steps and the final held-out retrieval.

    Returns:
        The metadata written to ``toy_clip.json`` (config, steps, time, held-out retrieval).
    """
    import torch

    cfg = json.loads(json.dumps(config or DEFAULT_CONFIG))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_toy_clip(cfg)
    model.train()
    tokenizer = get_tokenizer(cfg["text_cfg"]["context_length"])
    world = training_world()
    train, heldout = world.train_subjects, world.heldout_subjects
    opt = _optimizer(model, lr)
    model = model.to(memory_format=torch.channels_last)
    clock = Clock(steps, minutes * 60.0)
    buffer = SceneBuffer(train, seed)
    buffer.fill(2)
    seen = torch.zeros(cfg["text_cfg"]["vocab_size"], dtype=torch.bool)  # token ids trained
    step, losses = 0, []
    while step < steps:
        frac = clock.progress(step)
        if frac >= 1.0:
            break
        set_lr(opt, lr, progress_warmup_cosine(frac))
        buffer.add(fresh)
        losses.append(_contrastive_step(model, opt, tokenizer, clip_batch(buffer, batch_size),
                                        seen))
        step += 1
        if progress and step % 50 == 0:
            log.info("toy clip step %d  %.0fs  loss %.3f  temp %.1f", step, clock.elapsed(),
                     float(np.mean(losses[-50:])), float(model.logit_scale.detach().exp()))
    elapsed = clock.elapsed()
    model.eval()
    metrics = {"heldout_retrieval_64": retrieval_accuracy(model, heldout, 64, tokenizer=tokenizer),
               "train_retrieval_64": retrieval_accuracy(model, train, 64, tokenizer=tokenizer)}
    if progress:
        log.info("toy clip done: %d steps in %.0fs; held-out retrieval %s", step, elapsed,
                 metrics["heldout_retrieval_64"])
    training = {"seed": seed, "steps": step, "batch_size": batch_size, "lr": lr,
                "scenes_rendered": buffer.rendered,
                "seconds": round(elapsed, 1), "final_loss": float(np.mean(losses[-50:])),
                "world": {"num_subjects": TRAIN_WORLD_SUBJECTS, "seed": TRAIN_WORLD_SEED,
                          "split": "train"},
                "caption_forms": CAPTION_FORMS, "edit_prob": 0.5,
                "torch_threads": torch.get_num_threads()}
    return _write(out, model, cfg, seen, training, metrics)


def main(argv: list[str] | None = None) -> int:
    """``python -m suti.world.training.clip OUT_DIR [--minutes M] [--steps N] [--seed S]
    [--threads T]``: pretrain the toy CLIP into ``OUT_DIR``, print the metrics."""
    from suti.world.training.schedule import run_pretrain_cli

    return run_pretrain_cli(argv, "pretrain the toy CLIP of the synthetic world", pretrain_clip, minutes=20.0, steps=500)


if __name__ == "__main__":  # pragma: no cover
    from suti.cli_format import report_errors

    raise SystemExit(report_errors(main))
