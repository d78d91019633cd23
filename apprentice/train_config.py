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
    base_lora_rank: int = 0  # >0: the base trains as LoRA adapters of this rank (its weights frozen), merged into the saved apprentice
    demo_positions: str = "frame"  # FLUX: how demonstration tokens sit apart from the target's (apprentice.flux: frame | diagonal)
    guidance_scale: float = 3.5  # FLUX: the distilled guidance embedded while training (diffusers' flux scripts' --guidance_scale)
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`~suti.errors.InvalidValueError` naming the first out-of-range option.

        Every numeric field is checked by its kind (:func:`apprentice_number`, the same kinds the
        command line's flags parse with), so a config built without the command line (a Python
        caller, a benchmark, a checkpoint's config) is refused the same way: ``nan``, ``inf`` and
        out-of-range values never reach the training loop."""
        from suti.errors import InvalidValueError

        def need(ok: bool, option: str, rule: str, value) -> None:
            if not ok:
                raise InvalidValueError(f"{option} must be {rule}, got {value}")

        for name, kind in _apprentice_numbers().items():
            value = getattr(self, name)
            if value is None:
                continue
            option = _OPTION.get(name, "--" + name.replace("_", "-"))
            if name == "shard_weights":
                if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                    raise InvalidValueError(f"{option} must be a list of weights, one per --shards pattern, got {value!r}")
                for weight in value:
                    kind.check(weight, option)
            else:  # a whole number given as 2.0 is stored as 2
                setattr(self, name, kind.check(value, option))
        need(not (self.base_lora_rank and self.freeze_base), "--base-lora-rank", "0 with --freeze-base (a frozen base trains no LoRA)", self.base_lora_rank)
        need(self.base_learning_rate is None or not self.freeze_base, "--base-learning-rate", "unset with --freeze-base (the U-Net does not train)", self.base_learning_rate)
        if self.shard_weights is not None:
            patterns = 1 if isinstance(self.shards, str) else len(self.shards)
            need(len(self.shard_weights) == patterns, "--shard-weights", f"one weight per --shards pattern ({patterns})", " ".join(map(str, self.shard_weights)))
            need(any(w > 0 for w in self.shard_weights), "--shard-weights", "not all 0", " ".join(map(str, self.shard_weights)))
        need(self.subject_tokens == 0 or self.method == "attention", "--subject-tokens", "0 with --method reference", self.subject_tokens)
        need(self.subject_tokens > 0 or self.image_encoder is None, "--image-encoder", "left out without --subject-tokens N > 0 (it embeds the demos for the subject channel)",
             self.image_encoder)
        need(not self.demo_position_bias or self.method == "attention", "--demo-position-bias", "off with --method reference (its attention has no trained weights)", "on")
        if self.subject_tokens and self.image_encoder not in (None, "unet-features"):  # apprentice.adapter.UNET_FEATURES needs no scorer
            from suti.scoring import check_scorer_for_model

            check_scorer_for_model(self.image_encoder, self.model)
        if self.resolution is not None:
            need(self.resolution % 8 == 0, "--resolution", "a positive multiple of 8", self.resolution)
        self._validate_family()

    def _validate_family(self) -> None:
        """Options the base's family does not take (FLUX: the U-Net apprentice's subject channel,
        reference method, position bias and caption distillation; Min-SNR-gamma), refused early."""
        from suti.errors import InvalidValueError
        from suti.models import model_family
        from suti.objectives import training_objective_options

        if self.demo_positions not in DEMO_POSITIONS:
            raise InvalidValueError(f"--demo-positions must be one of {', '.join(DEMO_POSITIONS)}, got {self.demo_positions!r}")
        family = model_family(self.model)
        if family.name == "flux":
            unsupported = {"--subject-tokens": self.subject_tokens, "--method reference": self.method == "reference",
                           "--demo-position-bias": self.demo_position_bias, "--caption-distillation": self.caption_distillation}
            named = [flag for flag, value in unsupported.items() if value]
            if named:
                raise InvalidValueError(f"{', '.join(named)}: not offered for a FLUX base (--model {self.model}); its demonstrations are tokens of the joint attention (apprentice.flux)")
        training_objective_options(family.objective == "flow_matching", snr_gamma=self.snr_gamma, weighting_scheme="none")


#: Fields whose option is not ``--`` + the field's name with dashes (not flags of their own).
_OPTION = {"drop_text": "--caption-dropout", "drop_demos": "drop_demos", "drop_both": "drop_both", "demo_timestep": "demo_timestep"}


def _apprentice_numbers() -> dict:
    """The kind of every numeric :class:`ApprenticeTrainConfig` field (:mod:`suti.checks`): one
    table for the command line's flags (``type=``) and :meth:`ApprenticeTrainConfig.validate`
    (``shard_weights``: the kind of each weight)."""
    from suti import checks
    from suti.sampling import MAX_SIDE

    return {
        "steps": checks.whole(1, 10_000_000),
        "batch_size": checks.whole(1, 4096),
        "learning_rate": checks.LEARNING_RATE,
        "base_learning_rate": checks.LEARNING_RATE,
        "num_demos": checks.whole(1, 8),
        "drop_text": checks.PROBABILITY,
        "drop_demos": checks.PROBABILITY,
        "drop_both": checks.PROBABILITY,
        "demo_timestep": checks.whole(0, 999),  # a DDPM timestep (num_train_timesteps 1000)
        "ema_decay": checks.BETA,  # [0, 1); 0: no EMA
        "save_steps": checks.whole(0, 10_000_000),  # 0: a checkpoint only at the end
        "keep_checkpoints": checks.whole(1, 100_000),
        "seed": checks.SEED,
        "resolution": checks.whole(8, MAX_SIDE),  # and a multiple of 8
        "min_delta_clip": checks.real(-2.0, 2.0),  # delta-CLIP: a difference of two cosines
        "self_target": checks.PROBABILITY,
        "caption_prompt": checks.PROBABILITY,
        "demo_caption": checks.PROBABILITY,
        "shard_weights": checks.real(0.0, 1e6),  # each weight; not all 0
        "num_workers": checks.whole(0, 1024),  # 0: load in the training process
        "subject_tokens": checks.whole(0, 256),  # 0: no subject channel
        "snr_gamma": checks.real(0.0, 1e3, lo_open=True),
        "guidance_scale": checks.real(0.0, 50.0),
        "base_lora_rank": checks.whole(0, 1024),
        "copy_view": checks.PROBABILITY,
        "caption_distillation": checks.PROBABILITY,
    }


def apprentice_number(name: str):
    """The :class:`suti.checks.Number` of an :class:`ApprenticeTrainConfig` field (an ``argparse`` type)."""
    return _apprentice_numbers()[name]


def launch_number(name: str):
    """The :class:`suti.checks.Number` of a launcher flag: ``suti apprentice train --nproc``
    (processes per node), ``--nnodes``, ``--node-rank``, ``--master-port`` (a TCP port) and the
    DeepSpeed launcher's ``--local_rank``."""
    from suti import checks

    return {"nproc": checks.whole(1, 1024), "nnodes": checks.whole(1, 100_000), "node_rank": checks.whole(0, 99_999),
            "master_port": checks.whole(1, 65535), "local_rank": checks.whole(0, 1023)}[name]


#: FLUX bases: where demonstration tokens sit apart from the target's (:mod:`apprentice.flux`).
DEMO_POSITIONS = ("frame", "diagonal")


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``suti apprentice train`` (also ``python -m apprentice.train``)."""
    p = parser or ArgumentParser(prog="apprentice.train", description=_train_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, nargs="+", help='shards of `suti generate` and/or `suti apprentice pack-photos`: folders, globs, brace ranges or single shards, local or any fsspec URI (s3://...), e.g. "SH/*.tar" "PH/*.tar"')
    p.add_argument("--shard-weights", type=apprentice_number("shard_weights"), nargs="+", help="one weight per --shards pattern: the share of examples drawn from each (e.g. 3 1 for expert shards 3 : 1 photo shards); default: all patterns read as one list")
    p.add_argument("--resampled-shards", action="store_true", help="each process draws shards with replacement (reads only those; for many shards and processes) instead of reading all shards for an equal share of samples")
    p.add_argument("--model", default="toy", help="base model preset, folder or hub id")
    p.add_argument("--output", required=True, help="apprentice folder or URI (s3://...) to write; checkpoints go to OUTPUT/checkpoints")
    p.add_argument("--steps", type=apprentice_number("steps"), default=1000, help="optimizer steps of the whole run (a resume may raise it)")
    p.add_argument("--batch-size", type=apprentice_number("batch_size"), default=4, help="micro-batch per process")
    p.add_argument("--learning-rate", type=apprentice_number("learning_rate"), default=1e-4, help="learning rate of the trainable weights (AdamW or Adafactor; default 1e-4); a resume may change it, with a warning")
    p.add_argument("--base-learning-rate", type=apprentice_number("base_learning_rate"), help="learning rate of the U-Net's own weights when they train (without --freeze-base), so that the demonstration layers can learn fast while the base stays near its prior; default: --learning-rate. A resume takes the rates given now, not the checkpoint's: repeat it (a resume warns when a rate changes)")
    p.add_argument("--optimizer", choices=["adamw", "adafactor"], default="adamw")
    p.add_argument("--freeze-base", action="store_true", help="train only the demonstration-attention layers")
    p.add_argument("--num-demos", type=apprentice_number("num_demos"), default=3, help="demonstrations per example, 1 to 8")
    p.add_argument("--method", choices=["attention", "reference"], default="attention")
    p.add_argument("--subject-tokens", type=apprentice_number("subject_tokens"), default=0, help="add a global subject channel of N tokens beside the demonstration attention (IP-Adapter-style: the demos' mean image embedding, attended to by every cross-attention); 0: none")
    p.add_argument("--image-encoder", help="scorer that embeds the demos for --subject-tokens (toy-clip, openai-clip-vit-b-32...; default: the model's scorer), or unet-features: a learned resampler (IP-Adapter-Plus's) reads the demos' own U-Net features at the first self-attention on the down path, every token with its place, instead of one pooled embedding per demo")
    p.add_argument("--snr-gamma", type=apprentice_number("snr_gamma"), help="Min-SNR-gamma loss weighting (Hang et al. 2023; diffusers' --snr_gamma, 5.0 is the usual value): down-weights the low-noise timesteps whose large noise-prediction error otherwise dominates the loss; default: plain MSE")
    p.add_argument("--demo-position-bias", action="store_true", help="add a learned per-head bias -w*d^2 (d: distance between a token's position and a demonstration token's; w starts at 0) to the demonstration attention, so that a noisy image can take each position's content from the same place in the demos (layout, silhouette)")
    p.add_argument("--caption-distillation", type=apprentice_number("caption_distillation"), default=0.0, metavar="W", help="learning from a privileged caption: in reconstruction examples prompted with the class only, the target becomes (1-W) * the true target + W * the frozen base's prediction given the target photo's own alt text (in the world: class, colour, pattern and scene), so the demos learn what that caption adds, with far less noise than the true target alone; 0 (default): off, 1: only the teacher")
    p.add_argument("--copy-view", type=apprentice_number("copy_view"), default=0.0, metavar="P", help="share of reconstruction examples (photo shards, --self-target) whose demonstrations include a view of the target photo itself (mirrored half the time, re-cropped) in place of another photo, so that the demonstration attention learns to find the subject in a demonstration and carry all of it, silhouette included; 0 (default): off")
    p.add_argument("--caption-dropout", dest="drop_text", type=apprentice_number("drop_text"), default=0.1, metavar="P", help="share of examples trained on the empty prompt with their demos kept "
                   "(classifier-free guidance over the text; diffusers' --proportion_empty_prompts); a further 5%% drop text and demos together and 10%% the demos alone (default 0.1)")
    p.add_argument("--base-lora-rank", type=apprentice_number("base_lora_rank"), default=0, help="train the base (U-Net or FLUX transformer) as LoRA adapters of this rank on the layers diffusers' DreamBooth LoRA scripts adapt, its own weights frozen, beside the demonstration layers; merged into the saved apprentice (0: the base trains in full unless --freeze-base)")
    p.add_argument("--demo-positions", choices=DEMO_POSITIONS, default="frame", help="FLUX bases: where the demonstration tokens sit: frame (FLUX.1 Kontext: frame index i+1, same rows and columns) or diagonal (UNO: rows and columns shifted by the grid's size per demo)")
    p.add_argument("--guidance-scale", type=apprentice_number("guidance_scale"), default=3.5, help="FLUX bases: the distilled guidance embedded while training (diffusers' flux scripts' --guidance_scale; default 3.5)")
    p.add_argument("--ema-decay", type=apprentice_number("ema_decay"), default=0.0, help="decay of an exponential moving average of the trainable weights, saved instead of them, in [0, 1) (0: no EMA)")
    p.add_argument("--deepspeed-config", default="zero2", help="a shipped DeepSpeed config (zero0, zero2) or a JSON path")
    p.add_argument("--resolution", type=apprentice_number("resolution"), help="training image size in pixels (default: the model's native size); recorded in OUTPUT/training.json")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute U-Net activations in the backward pass (less memory, ~30%% slower)")
    p.add_argument("--num-workers", type=apprentice_number("num_workers"), default=0, help="data-loader worker processes per training process")
    p.add_argument("--save-steps", type=apprentice_number("save_steps"), default=500, help="a checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep-checkpoints", type=apprentice_number("keep_checkpoints"), default=2, help="newest checkpoints kept in OUTPUT/checkpoints")
    p.add_argument("--seed", type=apprentice_number("seed"), default=0, help="seed of the data order, dropout and noise")
    p.add_argument("--min-delta-clip", type=apprentice_number("min_delta_clip"), help="train only on samples whose delta-CLIP exceeds this, in [-2, 2] (lambda ablation)")
    p.add_argument("--self-target", type=apprentice_number("self_target"), default=0.0, help="share of expert examples whose target is one of the cluster's own photos instead of the expert's sample (0: the paper's training)")
    p.add_argument("--caption-prompt", type=apprentice_number("caption_prompt"), default=0.5, help="share of reconstruction examples (photo shards, --self-target) prompted with the target photo's alt text instead of 'a <class noun>'")
    p.add_argument("--demo-caption", type=apprentice_number("demo_caption"), default=1.0, help="share of examples whose demonstrations are encoded with their own alt texts; the rest get 'a <class noun>', as a class-only query does")
    p.add_argument("--resume", help='"latest" (the newest intact checkpoint) or a checkpoint tag (step-N) under OUTPUT/checkpoints; pass the same '
                   "settings again: those that decide what trains (model, --freeze-base, --method, --optimizer, the subject channel...) must match, "
                   "the learning rates may change (with a warning), --steps may grow")
    p.add_argument("--overwrite", action="store_true", help="delete a non-empty OUTPUT and start again (without it and without --resume, a non-empty OUTPUT is an error)")
    # the deepspeed launcher passes --local_rank=N to every process (torchrun sets LOCAL_RANK instead)
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=launch_number("local_rank"), default=None, help=argparse.SUPPRESS)
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
        drop_text=args.drop_text, demo_positions=args.demo_positions, guidance_scale=args.guidance_scale, base_lora_rank=args.base_lora_rank,
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
