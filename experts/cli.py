"""``suti expert train|sample|import|export|loss``: the command line of DreamBooth experts."""

from __future__ import annotations

import argparse
import json

from experts.buckets import INTERPOLATION_MODES
from experts.export import FORMATS
from experts.recipe import LR_SCHEDULERS, OPTIMIZERS, REPORT_TO, expert_number
from suti import checks
from suti.cli_format import HelpFormatter
from suti.objectives import WEIGHTING_SCHEMES
from suti.sampling import GUIDANCE_SCALE, NUM_IMAGES, SEED, SIDE, STEPS


def register(subparsers) -> None:
    """Add the ``expert`` command group to the top-level parser."""
    from suti.models import list_presets
    from suti.sampling import add_sampler_flags

    group = subparsers.add_parser("expert", help="train and sample per-subject DreamBooth experts")
    sub = group.add_subparsers(dest="expert_command", metavar="SUBCOMMAND")
    sub.required = True

    train = sub.add_parser("train", help="fine-tune an expert on 3-5 photos of a subject", formatter_class=HelpFormatter, epilog=recipe_defaults_epilog())
    train.add_argument("--model", default="tiny", help=f"model preset ({', '.join(list_presets())}), local diffusers folder or hub id")
    train.add_argument("--instance-dir", required=True, help="folder with the subject's photos")
    train.add_argument("--class-noun", required=True, help='class noun of the subject, e.g. "dog"')
    train.add_argument("--output", required=True, help="expert folder to create")
    train.add_argument("--recipe", default="dreambooth", help="recipe name in configs/recipes or a YAML path")
    train.add_argument("--steps", type=expert_number("steps"), help="training steps (default: the recipe's)")
    train.add_argument("--prior-preservation", action="store_true", default=None, help="use the class-specific prior-preservation loss (default: the recipe's, see below)")
    train.add_argument("--no-prior-preservation", dest="prior_preservation", action="store_false", help="disable prior preservation (the suti-expert recipe's choice)")
    train.add_argument("--num-class-images", type=expert_number("num_class_images"), help="class images the frozen base generates for the prior loss (default: the recipe's)")
    train.add_argument("--prior-loss-weight", type=expert_number("prior_loss_weight"), help="lambda of the prior term (default: the recipe's)")
    train.add_argument("--lora-rank", type=expert_number("lora_rank"), help="LoRA rank, 0: full fine-tuning (default: the recipe's)")
    train.add_argument("--train-text-encoder", action="store_true", default=None, help="also fine-tune the text encoder (default: the model preset's for the recipe, else the recipe's; see below)")
    train.add_argument("--no-train-text-encoder", dest="train_text_encoder", action="store_false", help="keep the text encoder frozen even where the recipe or preset trains it")
    train.add_argument("--identifier", help="use this identifier instead of a sampled rare token")
    train.add_argument("--learning-rate", type=expert_number("learning_rate"), help="learning rate (overrides the recipe; the preset's scale still applies)")
    train.add_argument("--learning-rate-scale", type=expert_number("learning_rate_scale"), help="multiplier of the learning rate (default: the preset's)")
    train.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer (default: the recipe's); prodigy: prodigyopt's Prodigy, set --learning-rate 1.0")
    train.add_argument("--batch-size", type=expert_number("batch_size"), help="instance images per step (default: the recipe's)")
    train.add_argument("--resolution", type=expert_number("resolution"), help="training resolution (default: the model's)")
    train.add_argument("--seed", type=expert_number("seed"), default=0, help="seed of the identifier, data order and noise")
    train.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="autocast dtype on CUDA (default: bf16)")
    train.add_argument("--gradient-checkpointing", action="store_true", default=None, help="trade compute for memory (default: off)")
    train.add_argument("--snr-gamma", type=expert_number("snr_gamma"), help="Min-SNR-gamma loss weighting (default: off)")
    train.add_argument("--offset-noise", type=expert_number("offset_noise"), help="offset noise strength (default: 0)")
    train.add_argument("--weighting-scheme", choices=WEIGHTING_SCHEMES, help="flow-matching models (FLUX): timestep density and loss weighting, as diffusers' --weighting_scheme (default: none)")
    train.add_argument("--logit-mean", type=expert_number("logit_mean"), help="logit_normal density mean (default: 0)")
    train.add_argument("--logit-std", type=expert_number("logit_std"), help="logit_normal density standard deviation (default: 1)")
    train.add_argument("--mode-scale", type=expert_number("mode_scale"), help="mode density scale (default: 1.29)")
    train.add_argument("--max-sequence-length", type=expert_number("max_sequence_length"), help="FLUX: T5 tokens per prompt (default: 512, capped by the tokenizer)")
    train.add_argument("--checkpointing-steps", type=expert_number("checkpointing_steps"), help="save a resumable checkpoint every N steps (default: only at the end)")
    train.add_argument("--validation-steps", type=expert_number("validation_steps"), help="write a validation image every N steps (default: none)")
    train.add_argument("--validation-prompt", help='validation prompt, e.g. "a {V} {class} on the beach"')
    train.add_argument("--guidance-scale", type=expert_number("guidance_scale"), help="guidance of the class and validation images (SD/SDXL: classifier-free, default 7.5); on FLUX also the distilled guidance fed to the transformer while training (diffusers' flux script's --guidance_scale, default 3.5)")
    # diffusers train_dreambooth.py options (same names, dashes for underscores)
    train.add_argument("--instance-prompt", help='instance prompt with {V} and {class}, e.g. "a photo of {V} {class}" (default "a {V} {class}")')
    train.add_argument("--class-prompt", help='class prompt of the prior images, with {class} (default "a {class}")')
    train.add_argument("--class-data-dir", help="folder of real class photos for the prior loss (validated; topped up with generated images if fewer than --num-class-images)")
    train.add_argument("--gradient-accumulation-steps", type=expert_number("gradient_accumulation_steps"), help="micro-batches per optimizer step (--steps counts optimizer steps)")
    train.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, help="learning-rate schedule (diffusers.optimization.get_scheduler; default constant)")
    train.add_argument("--lr-warmup-steps", type=expert_number("lr_warmup_steps"), help="linear warmup steps of the schedule")
    train.add_argument("--lr-num-cycles", type=expert_number("lr_num_cycles"), help="hard restarts of cosine_with_restarts")
    train.add_argument("--lr-power", type=expert_number("lr_power"), help="power of the polynomial schedule")
    train.add_argument("--use-8bit-adam", action="store_true", default=None, help="bitsandbytes' 8-bit AdamW (needs bitsandbytes)")
    train.add_argument("--adam-beta1", type=expert_number("adam_beta1"))
    train.add_argument("--adam-beta2", type=expert_number("adam_beta2"))
    train.add_argument("--adam-weight-decay", type=expert_number("adam_weight_decay"))
    train.add_argument("--adam-epsilon", type=expert_number("adam_epsilon"))
    # LoRA and optimizer options of train_dreambooth_lora.py / train_dreambooth_lora_sdxl.py
    train.add_argument("--lora-alpha", type=expert_number("lora_alpha"), help="LoRA alpha: the update is scaled by alpha / rank (default: the rank, as diffusers' scripts)")
    train.add_argument("--lora-dropout", type=expert_number("lora_dropout"), help="dropout probability of the LoRA layers (default 0)")
    train.add_argument("--use-dora", action="store_true", default=None, help="train DoRA (weight-decomposed LoRA; peft use_dora) instead of plain LoRA")
    train.add_argument("--text-encoder-lr", type=expert_number("text_encoder_lr"), help="learning rate of the text encoders with --train-text-encoder (default: the U-Net's; the preset's scale applies)")
    train.add_argument("--adam-weight-decay-text-encoder", type=expert_number("adam_weight_decay_text_encoder"), help="weight decay of the text encoders (default: --adam-weight-decay)")
    train.add_argument("--prodigy-beta3", type=expert_number("prodigy_beta3"), help="Prodigy's beta3 (default: sqrt(adam beta2))")
    train.add_argument("--prodigy-decouple", action=argparse.BooleanOptionalAction, default=None, help="Prodigy: AdamW-style decoupled weight decay (default: on)")
    train.add_argument("--prodigy-use-bias-correction", action=argparse.BooleanOptionalAction, default=None, help="Prodigy: Adam's bias correction (default: on)")
    train.add_argument("--prodigy-safeguard-warmup", action=argparse.BooleanOptionalAction, default=None, help="Prodigy: leave the rate out of the D estimate's denominator during warmup (default: on)")
    train.add_argument("--output-kohya-format", action="store_true", default=None, help="LoRA: also write OUTPUT/pytorch_lora_weights_kohya.safetensors in kohya's layout (ComfyUI, A1111)")
    train.add_argument("--max-grad-norm", type=expert_number("max_grad_norm"), help="gradient clipping norm")
    train.add_argument("--checkpoints-total-limit", type=expert_number("checkpoints_total_limit"), help="checkpoints kept (0: all)")
    train.add_argument("--random-flip", action="store_true", default=None, help="flip images horizontally at random")
    train.add_argument("--center-crop", action="store_true", default=None, help="centre-crop images to a square (the default)")
    train.add_argument("--random-crop", dest="center_crop", action="store_false", help="a random square crop per step instead of the centre crop")
    # photos as people take them (docs/experts.md#photos-of-any-shape)
    train.add_argument("--aspect-ratio-buckets", nargs="?", const="auto", metavar="H,W;H,W", help="train each photo at the bucket nearest its aspect ratio: "
                       "bare, diffusers' ladder (1:1 ... 2:1) at about --resolution squared pixels; or these buckets, sides multiples of 64 (recorded in expert.json)")
    train.add_argument("--caption-extension", metavar="EXT", help="per-image captions: photo.txt beside photo.jpg (.txt or .caption) is its instance prompt, with {V} and {class}")
    train.add_argument("--caption-dropout", type=expert_number("caption_dropout"), metavar="P", help="train each instance row on the empty prompt with probability P (diffusers' --proportion_empty_prompts; default 0)")
    train.add_argument("--image-interpolation-mode", choices=list(INTERPOLATION_MODES), help="resize filter of the photos (default lanczos, as diffusers' SDXL script)")
    train.add_argument("--report-to", choices=REPORT_TO, help="experiment tracker (tensorboard default; wandb needs the wandb package, WANDB_MODE=offline works without an account)")
    train.add_argument("--vae-encode-batch-size", type=expert_number("vae_encode_batch_size"), help="images per VAE encode call when caching latents")
    train.add_argument("--sample-batch-size", type=expert_number("sample_batch_size"), help="class images generated per pipeline call (default 4; the images do not depend on it)")
    train.add_argument("--resume", help='"latest", a checkpoint name (step-000004) or a checkpoint folder')
    train.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    train.set_defaults(func=_train, local_paths=("output", "instance_dir", "class_data_dir"))

    sample = sub.add_parser("sample", help="generate images from a trained expert", formatter_class=HelpFormatter)
    sample.add_argument("--expert", required=True, help="expert folder")
    sample.add_argument("--prompt", required=True, help='prompt with {V} and {class}, e.g. "a {V} {class} on the beach"')
    sample.add_argument("--num-images", type=NUM_IMAGES, default=4)
    sample.add_argument("--output", required=True, help="folder for the PNG files")
    sample.add_argument("--steps", type=STEPS, default=25, help="denoising steps")
    sample.add_argument("--guidance-scale", type=GUIDANCE_SCALE, help="default: the expert's own (expert.json: 7.5 for SD/SDXL, 3.5 for FLUX)")
    sample.add_argument("--seed", type=SEED, default=0)
    add_sampler_flags(sample, size=True)
    sample.add_argument("--overwrite", action="store_true", help="replace existing image files")
    sample.set_defaults(func=_sample, local_paths=("expert", "output"))

    imp = sub.add_parser("import", help="wrap a diffusers DreamBooth output (LoRA file or pipeline folder) as an expert", formatter_class=HelpFormatter)
    source = imp.add_mutually_exclusive_group(required=True)
    source.add_argument("--lora", help="LoRA .safetensors file (or a folder with pytorch_lora_weights.safetensors), e.g. from train_dreambooth_lora.py")
    source.add_argument("--pipeline", help="diffusers pipeline folder, e.g. the output of train_dreambooth.py")
    imp.add_argument("--identifier", required=True, help='the rare token the subject was trained with, e.g. "sks"')
    imp.add_argument("--class-noun", required=True, help='class noun of the subject, e.g. "dog"')
    imp.add_argument("--model", help="base model of the LoRA (required with --lora); with --pipeline the base for `suti expert loss`")
    imp.add_argument("--instance-prompt", default="a {V} {class}", help="the training prompt")
    imp.add_argument("--resolution", type=SIDE, help="sampling resolution (default: the base's)")
    imp.add_argument("--output", required=True, help="expert folder to create")
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    imp.set_defaults(func=_import, local_paths=("lora", "pipeline", "output"))

    export = sub.add_parser("export", help="write a LoRA expert as one .safetensors file for ComfyUI, Forge/A1111, kohya (--format kohya) or diffusers", formatter_class=HelpFormatter)
    export.add_argument("--expert", required=True, help="LoRA expert folder")
    export.add_argument("--format", default="kohya", choices=FORMATS, help="kohya (lora_unet_/lora_te_ keys, ss_* metadata) or diffusers (load_lora_weights' layout)")
    export.add_argument("--output", required=True, help=".safetensors file to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    export.set_defaults(func=_export, local_paths=("expert", "output"))

    loss = sub.add_parser("loss", help="denoising loss of an expert and its base model on the instance images")
    loss.add_argument("--expert", required=True, help="expert folder")
    loss.add_argument("--instance-dir", help="images to score (default: the training images)")
    loss.add_argument("--draws", type=checks.whole(1, 1024), default=8, help="noise draws per image")
    loss.add_argument("--seed", type=SEED, default=0)
    loss.set_defaults(func=_loss, local_paths=("expert", "instance_dir"))


def recipe_defaults_epilog() -> str:
    """The effective defaults of the recipe-decided options, per recipe and model preset.

    Read from ``configs/recipes/*.yaml`` and the presets' ``expert_defaults`` (cheap: YAML only),
    so ``--help`` shows what training will actually use. Empty if the configs cannot be read.
    """
    from experts.recipe import list_recipes, load_recipe, preset_expert_defaults
    from suti.errors import SutiError
    from suti.models import list_presets

    def onoff(value) -> str:
        return "on" if value else "off"

    lines = ["effective defaults (recipe < model preset < command line):"]
    try:
        for name in list_recipes():
            recipe = load_recipe(name)
            rank = int(recipe.get("lora_rank", 0))
            rate = recipe.get("lora_learning_rate" if rank else "learning_rate")
            lines.append(f"  --recipe {name}: steps {recipe.get('steps')}, prior preservation "
                         f"{onoff(recipe.get('prior_preservation'))}, lora rank {rank}, text encoder "
                         f"{'trained' if recipe.get('train_text_encoder') else 'frozen'}, optimizer "
                         f"{recipe.get('optimizer')}, learning rate {rate}")
            for model in list_presets():
                extra = {k: v for k, v in preset_expert_defaults(model, name).items() if k != "learning_rate_scale"}
                if extra:
                    said = ", ".join(f"{k.replace('_', ' ')} {onoff(v) if isinstance(v, bool) else v}" for k, v in sorted(extra.items()))
                    lines.append(f"      with --model {model}: {said}")
    except (SutiError, OSError, ValueError):
        return ""
    return "\n".join(lines)


_OVERRIDES = (
    "steps", "prior_preservation", "num_class_images", "prior_loss_weight", "lora_rank", "train_text_encoder",
    "identifier", "learning_rate", "learning_rate_scale", "optimizer", "batch_size", "resolution", "seed",
    "mixed_precision", "gradient_checkpointing", "snr_gamma", "offset_noise", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "max_sequence_length", "checkpointing_steps",
    "validation_steps", "validation_prompt", "guidance_scale",
    "instance_prompt", "class_prompt", "class_data_dir", "gradient_accumulation_steps", "lr_scheduler", "lr_warmup_steps",
    "lr_num_cycles", "lr_power", "use_8bit_adam", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
    "max_grad_norm", "checkpoints_total_limit", "random_flip", "center_crop", "report_to", "vae_encode_batch_size",
    "sample_batch_size",
    "lora_alpha", "lora_dropout", "use_dora", "text_encoder_lr", "adam_weight_decay_text_encoder", "prodigy_beta3", "prodigy_decouple",
    "prodigy_use_bias_correction", "prodigy_safeguard_warmup", "output_kohya_format",
    "aspect_ratio_buckets", "caption_extension", "caption_dropout", "image_interpolation_mode",
)


def _train(args) -> int:
    from experts.recipe import resolve_config
    from experts.train import train_expert

    overrides = {k: getattr(args, k) for k in _OVERRIDES}
    overrides.update(model=args.model, instance_dir=args.instance_dir, class_noun=args.class_noun)
    config = resolve_config(args.recipe, overrides)
    info = train_expert(config, args.output, resume=args.resume, overwrite=args.overwrite)
    print(json.dumps({"output": args.output, "identifier": info.identifier, "instance_prompt": info.instance_prompt, "kind": info.kind, "steps": info.steps, "train_seconds": info.train_seconds}))
    return 0


def _import(args) -> int:
    from experts.importer import import_expert

    info = import_expert(args.output, identifier=args.identifier, class_noun=args.class_noun, lora=args.lora, pipeline=args.pipeline, model=args.model, instance_prompt=args.instance_prompt, resolution=args.resolution, overwrite=args.overwrite)
    print(json.dumps({"output": args.output, "identifier": info.identifier, "instance_prompt": info.instance_prompt, "kind": info.kind, "base_model": info.base_model}))
    return 0


def _export(args) -> int:
    from experts.export import export_expert

    print(json.dumps(export_expert(args.expert, args.output, args.format, overwrite=args.overwrite)))
    return 0


def _sample(args) -> int:
    from experts.sample import sample_expert

    paths = sample_expert(args.expert, args.prompt, args.num_images, args.output, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed, overwrite=args.overwrite, height=args.height, width=args.width, dtype=args.dtype, sample_batch_size=args.sample_batch_size)
    print(json.dumps({"images": [str(p) for p in paths]}))
    return 0


def _loss(args) -> int:
    from experts.data import load_instance_images
    from experts.evaluate import denoising_loss
    from experts.expert import ExpertInfo, load_expert
    from suti.models import load_pipeline

    info = ExpertInfo.read(args.expert)
    folder = args.instance_dir or info.config.get("instance_dir")
    if not folder:
        from suti.errors import InputError

        raise InputError(f"{args.expert}: expert.json names no training images (an imported expert); pass --instance-dir")
    images = load_instance_images(folder, info.resolution)
    base = denoising_loss(load_pipeline(info.base_model), images, info.instance_prompt, seed=args.seed, draws=args.draws)
    expert = denoising_loss(load_expert(args.expert), images, info.instance_prompt, seed=args.seed, draws=args.draws)
    print(json.dumps({"prompt": info.instance_prompt, "base_loss": base, "expert_loss": expert, "ratio": expert / base}))
    return 0
