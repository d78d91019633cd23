"""Training of the attribute probe (:mod:`suti.world.probe`, the network and its use).

The probe learns from scenes (half of them edited) of the train subjects of the seed-0 world of
:data:`PROBE_WORLD_SUBJECTS` subjects - thousands of subjects, so the heads read attributes
instead of memorising subjects - and is evaluated on held-out subjects of the 1024-subject
world (held out in every smaller seed-0 world too, the default 24-subject one included). The
loss is the heads' cross-entropies (colour heads masked on sketches) plus a supervised
contrastive loss (:func:`supcon_loss`) of the identity embedding over two scenes per subject.

``python -m suti.world.training.probe OUT_DIR [--minutes M] [--steps N] [--seed S]``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from suti import storage
from suti.world.probe import (
    COLOR_ATTRS,
    DEFAULT_CONFIG,
    IDENTITY_HEADS,
    PROMPT_HEADS,
    Probe,
    build_probe_net,
    evaluate_probe,
    head_labels,
)
from suti.world.toy_clip import TRAIN_WORLD_SEED, TRAIN_WORLD_SUBJECTS, training_world
from suti.world.training.scenes import SceneBuffer
from suti.world.training.schedule import Clock, progress_warmup_cosine, set_lr

log = logging.getLogger(__name__)

#: Size of the seed-0 world whose train split the probe learns from.
PROBE_WORLD_SUBJECTS = 6144


def _targets(subject, meta: dict) -> list[int]:
    """Label index per head (identity heads, then prompt heads) of a scene of ``subject``."""
    labels = head_labels()
    values = {"class_name": subject.class_name, "body_color": meta["color"],
              "pattern": subject.pattern, "pattern_color": subject.pattern_color,
              "part": f"{subject.class_name}/{subject.part}", "aspect": subject.aspect,
              "context": meta["context"], "accessory": meta["accessory"],
              "style": meta["style"]}
    return [labels[h].index(values[h]) for h in (*IDENTITY_HEADS, *PROMPT_HEADS)]


def probe_batch(buffer: SceneBuffer, pairs: int):
    """Two stored scenes of each of ``pairs`` random subjects of ``buffer``.

    Returns ``(images (2P,3,32,32), targets (2P, heads) long, identity labels (2P,) long,
    sketch mask (2P,) bool)``; identity label = subject index * 16 + displayed colour index (a
    colour-edited scene only pairs with scenes of the same displayed colour).
    """
    import torch

    labels = head_labels()
    x, ks, metas = buffer.sample(pairs, 2)
    targets = [_targets(buffer.subjects[k], m) for k, m in zip(ks, metas)]
    ident = [k * 16 + labels["body_color"].index(m["color"]) for k, m in zip(ks, metas)]
    sketch = [m["style"] == "sketch" for m in metas]
    return x, torch.tensor(targets), torch.tensor(ident), torch.tensor(sketch)


def supcon_loss(emb, labels, temperature: float = 0.1):
    """Supervised contrastive loss (Khosla et al. 2020) over L2-normalised ``emb`` (B, D);
    anchors without a positive are skipped."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(emb, dim=1)
    sim = z @ z.T / temperature  # (B, B)
    eye = torch.eye(len(z), dtype=torch.bool)
    sim = sim.masked_fill(eye, -1e9)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    logp = F.log_softmax(sim, 1)
    has = pos.any(1)
    if not has.any():
        return sim.new_zeros(())
    per = -(logp * pos).sum(1)[has] / pos.sum(1)[has]
    return per.mean()


def _probe_step(net, opt, batch, *, weights: dict[str, float], supcon_weight: float) -> float:
    """One optimizer step on a :func:`probe_batch`: weighted head cross-entropies (colour heads
    masked on sketches) + ``supcon_weight`` x :func:`supcon_loss`; returns the loss."""
    import torch.nn.functional as F

    x, y, ident, sketch = batch
    heads = (*IDENTITY_HEADS, *PROMPT_HEADS)
    color_cols = [heads.index(h) for h in COLOR_ATTRS]
    out = net(x)
    loss = x.new_zeros(())
    for j, h in enumerate(heads):
        ce = F.cross_entropy(out[h], y[:, j], reduction="none")  # (B,)
        if j in color_cols:
            keep = (~sketch).float()
            ce = (ce * keep).sum() / keep.sum().clamp(min=1)
        loss = loss + weights.get(h, 1.0) * ce.mean()
    if supcon_weight:
        loss = loss + supcon_weight * supcon_loss(out["embedding"], ident)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _write(out: Path, net, cfg: dict, training: dict, metrics: dict, parameters: int) -> dict:
    """Write ``probe.safetensors`` (fp16) and ``probe.json`` to ``out``; returns the json's
    content."""
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v
             for k, v in net.state_dict().items()}
    with storage.atomic_local_path(out / "probe.safetensors") as tmp:
        save_file(state, str(tmp))
    meta = {
        "config": cfg,
        "heads": {h: head_labels()[h] for h in (*IDENTITY_HEADS, *PROMPT_HEADS)},
        "training": training,
        "parameters": parameters,
        "metrics": metrics,
    }
    storage.write_text(out / "probe.json", json.dumps(meta, indent=1) + "\n")
    return meta


def pretrain_probe(out_dir: str | Path, *, seed: int = 0, minutes: float = 40.0,
                   steps: int = 4000, pairs: int = 64, fresh: int = 32, lr: float = 2e-3,
                   world_subjects: int = PROBE_WORLD_SUBJECTS,
                   head_weights: dict[str, float] | None = None,
                   supcon_weight: float = 1.0, config: dict | None = None,
                   progress: bool = True) -> dict:
    """Train the probe on the training world; write ``probe.safetensors`` + ``probe.json``.

    The subjects are the train split of the seed-0 world of ``world_subjects`` subjects (many
    subjects, so the heads learn attributes rather than memorise subjects; held-out subjects of
    every smaller seed-0 world stay unseen). Scenes come from a
    :class:`~suti.world.training.scenes.SceneBuffer` (8 per subject) that gets ``fresh`` newly
    rendered scenes per step. Each step sees ``2 * pairs`` scenes (two per subject, half of
    them edited); the loss is the sum of the head cross-entropies (colour heads masked on
    sketches) plus ``supcon_weight`` times the supervised contrastive loss of the identity
    embedding; ``head_weights`` scales single heads (default: ``part`` x2, the hardest).
    Stops after ``steps`` steps or ``minutes`` of wall time; warm-up + cosine learning rate
    over that budget; fp16 weights. The defaults are those of the shipped weights.

    Returns:
        The metadata written to ``probe.json`` (config, steps, time, held-out accuracies).
    """
    import torch

    cfg = dict(config or DEFAULT_CONFIG)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = build_probe_net(cfg)
    net.train()
    train = training_world(world_subjects).train_subjects
    heldout = training_world().heldout_subjects
    decay = [p for p in net.parameters() if p.ndim >= 2]
    other = [p for p in net.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": other, "weight_decay": 0.0}], lr=lr)
    weights = {"part": 2.0} if head_weights is None else dict(head_weights)
    net = net.to(memory_format=torch.channels_last)
    clock = Clock(steps, minutes * 60.0)
    buffer = SceneBuffer(train, seed + 1, per_subject=8)
    buffer.fill(2)
    step, losses = 0, []
    while step < steps:
        frac = clock.progress(step)
        if frac >= 1.0:
            break
        set_lr(opt, lr, progress_warmup_cosine(frac))
        buffer.add(fresh)
        losses.append(_probe_step(net, opt, probe_batch(buffer, pairs), weights=weights,
                                  supcon_weight=supcon_weight))
        step += 1
        if progress and step % 50 == 0:
            log.info("probe step %d  %.0fs  loss %.3f", step, clock.elapsed(),
                     float(np.mean(losses[-50:])))
    elapsed = clock.elapsed()
    net.eval()
    probe = Probe(net, cfg)
    metrics = evaluate_probe(probe, heldout)
    if progress:
        log.info("probe done: %d steps in %.0fs; held-out %s", step, elapsed, metrics)
    training = {"seed": seed, "steps": step, "batch_size": 2 * pairs, "lr": lr,
                "scenes_rendered": buffer.rendered,
                "supcon_weight": supcon_weight, "head_weights": weights,
                "seconds": round(elapsed, 1),
                "final_loss": float(np.mean(losses[-50:])),
                "world": {"num_subjects": world_subjects, "seed": TRAIN_WORLD_SEED,
                          "split": "train", "train_subjects": len(train)},
                "evaluated_on": {"num_subjects": TRAIN_WORLD_SUBJECTS,
                                 "seed": TRAIN_WORLD_SEED, "split": "heldout"},
                "edit_prob": 0.5, "torch_threads": torch.get_num_threads()}
    return _write(out, net, cfg, training, metrics, probe.parameter_count())


def main(argv: list[str] | None = None) -> int:
    """``python -m suti.world.training.probe OUT_DIR [--minutes M] [--steps N] [--seed S]
    [--supcon-weight W] [--threads T]``: train the probe into ``OUT_DIR``, print the metrics."""
    from suti.checks import NON_NEGATIVE
    from suti.world.training.schedule import run_pretrain_cli

    return run_pretrain_cli(argv, "pretrain the attribute probe of the world", pretrain_probe, minutes=40.0, steps=4000,
                            extra={"supcon_weight": (NON_NEGATIVE, 1.0, "weight of the supervised contrastive loss (1)")})


if __name__ == "__main__":  # pragma: no cover
    from suti.cli_format import report_errors

    raise SystemExit(report_errors(main))
