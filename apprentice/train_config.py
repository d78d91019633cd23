"""Configuration and command-line arguments of apprentice training (no torch import here).

:class:`ApprenticeTrainConfig` is saved in every checkpoint; :func:`build_arg_parser` serves both
``suti apprentice train`` and ``python -m apprentice.train`` (see :mod:`apprentice.train`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from suti.cli_format import ArgumentParser


@dataclass
class ApprenticeTrainConfig:
    """Everything that determines an apprentice training run (saved in every checkpoint)."""

    shards: str | list[str]
    output: str
    model: str = "toy"
    steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-4
    base_learning_rate: float | None = None  # the U-Net's rate when it trains (None: learning_rate)
    optimizer: str = "adamw"  # adamw | adafactor (paper)
    freeze_base: bool = False
    num_demos: int = 3
    drop_text: float = 0.1
    drop_demos: float = 0.1
    drop_both: float = 0.05
    demo_timestep: int = 1
    method: str = "attention"
    ema_decay: float = 0.0  # 0: no EMA
    deepspeed_config: str = "zero2"
    save_steps: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    resolution: int | None = None
    min_delta_clip: float | None = None  # train only on samples with delta-CLIP above this
    self_target: float = 0.0  # share of expert examples whose target is a held-out cluster photo (0: SuTI)
    caption_prompt: float = 0.5  # share of reconstruction examples prompted with the photo's alt text
    demo_caption: float = 1.0  # share of examples whose demos keep their alt texts as captions (else "a <class noun>")
    shard_weights: list[float] | None = None  # one per --shards pattern (e.g. expert 3 : photo 1)
    resampled_shards: bool = False  # each process draws shards with replacement instead of an equal share of samples
    gradient_checkpointing: bool = False
    num_workers: int = 0  # data-loader workers per process
    subject_tokens: int = 0  # tokens of the adapter's global subject channel (IP-Adapter-style); 0: none
    image_encoder: str | None = None  # scorer embedding the demos for that channel (None: the model's scorer; "unet-features": a resampler over the demos' U-Net features)
    snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (None: plain MSE, every timestep weighted 1)
    demo_position_bias: bool = False  # a learned per-head position bias in the demonstration attention
    copy_view: float = 0.0  # share of reconstruction examples with an augmented view of the target among the demos
    caption_distillation: float = 0.0  # weight of the base-with-alt-text teacher in reconstruction targets (0: off)
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`~suti.errors.InvalidValueError` naming the first out-of-range option."""
        from suti.errors import InvalidValueError

        def need(ok: bool, option: str, rule: str, value) -> None:
            if not ok:
                raise InvalidValueError(f"{option} must be {rule}, got {value}")

        need(self.steps >= 1, "--steps", ">= 1", self.steps)
        need(self.batch_size >= 1, "--batch-size", ">= 1", self.batch_size)
        need(self.learning_rate > 0 and self.learning_rate == self.learning_rate, "--learning-rate", "> 0", self.learning_rate)
        need(self.base_learning_rate is None or self.base_learning_rate > 0, "--base-learning-rate", "> 0", self.base_learning_rate)
        need(self.base_learning_rate is None or not self.freeze_base, "--base-learning-rate", "unset with --freeze-base (the U-Net does not train)", self.base_learning_rate)
        need(1 <= self.num_demos <= 8, "--num-demos", "in 1..8", self.num_demos)
        need(self.save_steps >= 0, "--save-steps", ">= 0 (0: a checkpoint only at the end)", self.save_steps)
        need(self.keep_checkpoints >= 1, "--keep-checkpoints", ">= 1", self.keep_checkpoints)
        need(self.num_workers >= 0, "--num-workers", ">= 0", self.num_workers)
        need(0.0 <= self.ema_decay < 1.0, "--ema-decay", "in [0, 1)", self.ema_decay)
        for option, value in (("--self-target", self.self_target), ("--caption-prompt", self.caption_prompt), ("--demo-caption", self.demo_caption),
                              ("--caption-distillation", self.caption_distillation), ("--copy-view", self.copy_view), ("drop_text", self.drop_text), ("drop_demos", self.drop_demos), ("drop_both", self.drop_both)):
            need(0.0 <= value <= 1.0, option, "in [0, 1]", value)
        need(self.snr_gamma is None or self.snr_gamma > 0, "--snr-gamma", "> 0", self.snr_gamma)
        need(self.subject_tokens >= 0, "--subject-tokens", ">= 0", self.subject_tokens)
        need(self.subject_tokens == 0 or self.method == "attention", "--subject-tokens", "0 with --method reference", self.subject_tokens)
        need(not self.demo_position_bias or self.method == "attention", "--demo-position-bias", "off with --method reference (its attention has no trained weights)", "on")
        if self.subject_tokens and self.image_encoder not in (None, "unet-features"):  # apprentice.adapter.UNET_FEATURES needs no scorer
            from suti.scoring import check_scorer_for_model

            check_scorer_for_model(self.image_encoder, self.model)
        if self.resolution is not None:
            need(self.resolution >= 8 and self.resolution % 8 == 0, "--resolution", "a positive multiple of 8", self.resolution)


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``suti apprentice train`` (also ``python -m apprentice.train``)."""
    p = parser or ArgumentParser(prog="apprentice.train", description=_train_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, nargs="+", help='shards of `suti generate` and/or `suti apprentice pack-photos`: folders, globs, brace ranges or single shards, local or any fsspec URI (s3://...), e.g. "SH/*.tar" "PH/*.tar"')
    p.add_argument("--shard-weights", type=float, nargs="+", help="one weight per --shards pattern: the share of examples drawn from each (e.g. 3 1 for expert shards 3 : 1 photo shards); default: all patterns read as one list")
    p.add_argument("--resampled-shards", action="store_true", help="each process draws shards with replacement (reads only those; for many shards and processes) instead of reading all shards for an equal share of samples")
    p.add_argument("--model", default="toy", help="base model preset, folder or hub id")
    p.add_argument("--output", required=True, help="apprentice folder or URI (s3://...) to write; checkpoints go to OUTPUT/checkpoints")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch per process")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="learning rate of the trainable weights (AdamW or Adafactor; default 1e-4); a resume may change it, with a warning")
    p.add_argument("--base-learning-rate", type=float, help="learning rate of the U-Net's own weights when they train (without --freeze-base), so that the demonstration layers can learn fast while the base stays near its prior; default: --learning-rate. A resume takes the rates given now, not the checkpoint's: repeat it (a resume warns when a rate changes)")
    p.add_argument("--optimizer", choices=["adamw", "adafactor"], default="adamw")
    p.add_argument("--freeze-base", action="store_true", help="train only the demonstration-attention layers")
    p.add_argument("--num-demos", type=int, default=3)
    p.add_argument("--method", choices=["attention", "reference"], default="attention")
    p.add_argument("--subject-tokens", type=int, default=0, help="add a global subject channel of N tokens beside the demonstration attention (IP-Adapter-style: the demos' mean image embedding, attended to by every cross-attention); 0: none")
    p.add_argument("--image-encoder", help="scorer that embeds the demos for --subject-tokens (toy-clip, openai-clip-vit-b-32...; default: the model's scorer), or unet-features: a learned resampler (IP-Adapter-Plus's) reads the demos' own U-Net features at the first self-attention on the down path, every token with its place, instead of one pooled embedding per demo")
    p.add_argument("--snr-gamma", type=float, help="Min-SNR-gamma loss weighting (Hang et al. 2023; diffusers' --snr_gamma, 5.0 is the usual value): down-weights the low-noise timesteps whose large noise-prediction error otherwise dominates the loss; default: plain MSE")
    p.add_argument("--demo-position-bias", action="store_true", help="add a learned per-head bias -w*d^2 (d: distance between a token's position and a demonstration token's; w starts at 0) to the demonstration attention, so that a noisy image can take each position's content from the same place in the demos (layout, silhouette)")
    p.add_argument("--caption-distillation", type=float, default=0.0, metavar="W", help="learning from a privileged caption: in reconstruction examples prompted with the class only, the target becomes (1-W) * the true target + W * the frozen base's prediction given the target photo's own alt text (in the world: class, colour, pattern and scene), so the demos learn what that caption adds, with far less noise than the true target alone; 0 (default): off, 1: only the teacher")
    p.add_argument("--copy-view", type=float, default=0.0, metavar="P", help="share of reconstruction examples (photo shards, --self-target) whose demonstrations include a view of the target photo itself (mirrored half the time, re-cropped) in place of another photo, so that the demonstration attention learns to find the subject in a demonstration and carry all of it, silhouette included; 0 (default): off")
    p.add_argument("--ema-decay", type=float, default=0.0)
    p.add_argument("--deepspeed-config", default="zero2", help="a shipped DeepSpeed config (zero0, zero2) or a JSON path")
    p.add_argument("--resolution", type=int, help="training image size in pixels (default: the model's native size); recorded in OUTPUT/training.json")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute U-Net activations in the backward pass (less memory, ~30%% slower)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes per training process")
    p.add_argument("--save-steps", type=int, default=500)
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept in OUTPUT/checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-delta-clip", type=float, help="train only on samples whose delta-CLIP exceeds this (lambda ablation)")
    p.add_argument("--self-target", type=float, default=0.0, help="share of expert examples whose target is one of the cluster's own photos instead of the expert's sample (0: the paper's training)")
    p.add_argument("--caption-prompt", type=float, default=0.5, help="share of reconstruction examples (photo shards, --self-target) prompted with the target photo's alt text instead of 'a <class noun>'")
    p.add_argument("--demo-caption", type=float, default=1.0, help="share of examples whose demonstrations are encoded with their own alt texts; the rest get 'a <class noun>', as a class-only query does")
    p.add_argument("--resume", help='"latest" (the newest intact checkpoint) or a checkpoint tag (step-N) under OUTPUT/checkpoints; pass the same '
                   "settings again: those that decide what trains (model, --freeze-base, --method, --optimizer, the subject channel...) must match, "
                   "the learning rates may change (with a warning), --steps may grow")
    p.add_argument("--overwrite", action="store_true", help="delete a non-empty OUTPUT and start again (without it and without --resume, a non-empty OUTPUT is an error)")
    # the deepspeed launcher passes --local_rank=N to every process (torchrun sets LOCAL_RANK instead)
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(args) -> ApprenticeTrainConfig:
    """Namespace -> config."""
    return ApprenticeTrainConfig(
        shards=args.shards, output=args.output, model=args.model, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, base_learning_rate=args.base_learning_rate, optimizer=args.optimizer, freeze_base=args.freeze_base, num_demos=args.num_demos,
        method=args.method, ema_decay=args.ema_decay, deepspeed_config=args.deepspeed_config, save_steps=args.save_steps, seed=args.seed,
        min_delta_clip=args.min_delta_clip, self_target=args.self_target, caption_prompt=args.caption_prompt, demo_caption=args.demo_caption,
        shard_weights=args.shard_weights, resampled_shards=args.resampled_shards, resolution=args.resolution, gradient_checkpointing=args.gradient_checkpointing,
        num_workers=args.num_workers, keep_checkpoints=args.keep_checkpoints,
        subject_tokens=args.subject_tokens, image_encoder=args.image_encoder, snr_gamma=args.snr_gamma,
        demo_position_bias=args.demo_position_bias, caption_distillation=args.caption_distillation, copy_view=args.copy_view,
    )


def apply_local_rank(args) -> None:
    """Honour a launcher's ``--local_rank`` (DeepSpeed's) when ``LOCAL_RANK`` is not already set."""
    if getattr(args, "local_rank", None) is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))


def _train_doc() -> str:
    """The docstring of :mod:`apprentice.train` without importing it (it imports torch)."""
    import ast
    from pathlib import Path

    return ast.get_docstring(ast.parse((Path(__file__).parent / "train.py").read_text())) or ""
