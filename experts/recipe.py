"""Expert training configuration: recipes are data (``configs/recipes/*.yaml``), resolved with
command-line overrides into one typed :class:`ExpertConfig` that goes into every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from suti.errors import InputError
from suti.models import config_dir


OPTIMIZERS = ("adamw", "adafactor", "prodigy")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
REPORT_TO = ("tensorboard", "wandb", "none")
#: Caption files beside the photos (``--caption-extension``): the sidecars that are never read as photos.
CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclass
class ExpertConfig:
    """Everything that determines one expert's training run (the resolved config).

    Recipe fields come from ``configs/recipes/<recipe>.yaml``; the rest from the command line.
    """

    # what to train on
    model: str = "tiny"
    instance_dir: str = ""
    class_noun: str = ""
    identifier: str | None = None  # None: sample a rare token with `seed`
    identifier_tokens: int = 1
    # the recipe
    recipe: str = "dreambooth"
    use_class_noun: bool = True
    instance_prompt: str | None = None  # with {V} and {class}; None: "a {V} {class}" ("a {V}" without use_class_noun)
    prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    class_prompt: str = "a {class}"
    class_data_dir: str | None = None  # real class photos; topped up with generated ones if fewer
    class_seed: int = 0  # sampler seed of generated class images (shared by all experts, not `seed`)
    optimizer: str = "adamw"  # adamw | adafactor | prodigy (OPTIMIZERS)
    use_8bit_adam: bool = False  # bitsandbytes' AdamW8bit instead of torch's AdamW
    learning_rate: float = 5e-6  # full fine-tuning
    lora_learning_rate: float = 1e-4  # LoRA adapters (used when lora_rank > 0)
    learning_rate_scale: float = 1.0  # from the model preset (tiny models need larger steps)
    lr_scheduler: str = "constant"  # diffusers.optimization.get_scheduler name (LR_SCHEDULERS)
    lr_warmup_steps: int = 0  # optimizer steps of linear warmup
    lr_num_cycles: int = 1  # cosine_with_restarts: hard restarts
    lr_power: float = 1.0  # polynomial: decay power
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2  # train_dreambooth(_lora).py's; the SDXL LoRA script's is 1e-4
    adam_weight_decay_text_encoder: float | None = None  # None: adam_weight_decay (the SDXL LoRA script: 1e-3)
    adam_epsilon: float = 1e-8
    text_encoder_lr: float | None = None  # the text encoders' rate (x learning_rate_scale); None: the U-Net's
    # prodigy (diffusers' --prodigy_*; betas, eps and weight decay are the adam_* fields)
    prodigy_beta3: float | None = None  # None: sqrt(adam_beta2)
    prodigy_decouple: bool = True  # AdamW-style decoupled weight decay
    prodigy_use_bias_correction: bool = True
    prodigy_safeguard_warmup: bool = True
    max_grad_norm: float = 1.0
    steps: int = 800  # optimizer steps (diffusers' max_train_steps)
    batch_size: int = 1  # instance images per micro-batch and process (train_batch_size)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    # augmentation (diffusers' --random_flip / --center_crop)
    random_flip: bool = False  # flip each image horizontally with probability 1/2
    center_crop: bool = True  # False: a random square crop per step (images resized shorter side first)
    # photos as people take them (issue 34): buckets, captions, resize filter
    aspect_ratio_buckets: str | None = None  # None: square R x R; "auto": the ladder at ~R*R pixels; "H,W;H,W": these buckets (experts.buckets)
    caption_extension: str | None = None  # e.g. ".txt": photo.txt beside photo.jpg is its instance prompt (kohya's --caption_extension)
    caption_dropout: float = 0.0  # probability of training an instance row on the empty prompt (diffusers' --proportion_empty_prompts)
    image_interpolation_mode: str = "lanczos"  # resize filter (diffusers' --image_interpolation_mode; experts.buckets.INTERPOLATION_MODES)
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float | None = None  # None: equal to the rank (scaling alpha / rank)
    lora_dropout: float = 0.0  # dropout probability of the LoRA layers' input (peft LoraConfig.lora_dropout)
    use_dora: bool = False  # DoRA (Liu et al. 2024): peft LoraConfig(use_dora=True)
    output_kohya_format: bool = False  # LoRA: also write pytorch_lora_weights_kohya.safetensors (kohya's layout)
    train_text_encoder: bool = False
    # numerics
    resolution: int | None = None  # None: the model's native resolution
    mixed_precision: str = "bf16"  # used on CUDA only: no | fp16 | bf16
    gradient_checkpointing: bool = False
    snr_gamma: float | None = None
    offset_noise: float = 0.0
    # flow-matching models (FLUX; diffusers' train_dreambooth_lora_flux.py --weighting_scheme, ...)
    weighting_scheme: str = "none"  # none | sigma_sqrt | logit_normal | mode | cosmap (suti.objectives)
    logit_mean: float = 0.0  # logit_normal timestep density
    logit_std: float = 1.0
    mode_scale: float = 1.29  # mode timestep density
    max_sequence_length: int | None = None  # T5 tokens of a FLUX prompt; None: 512 (capped by the tokenizer)
    seed: int = 0
    # bookkeeping
    checkpointing_steps: int = 0  # 0: only at the end
    checkpoints_total_limit: int = 2
    validation_steps: int = 0  # 0: no validation images
    validation_prompt: str = "a {V} {class} on the beach"
    sample_steps: int = 25
    guidance_scale: float = 7.5
    class_sample_steps: int = 25
    sample_batch_size: int = 4  # class images per pipeline call (diffusers' --sample_batch_size; images do not depend on it)
    report_to: str = "tensorboard"  # tensorboard | wandb | none (accelerate trackers, logs/ of the expert)
    vae_encode_batch_size: int = 8  # images per VAE encode call when caching latents
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def instance_prompt_template(self) -> str:
        """The instance prompt with ``{V}``/``{class}`` placeholders (the default if unset)."""
        if self.instance_prompt:
            return self.instance_prompt
        return "a {V} {class}" if self.use_class_noun else "a {V}"

    @property
    def effective_learning_rate(self) -> float:
        """The learning rate the optimiser uses (recipe rate for the mode x preset scale).

        With ``prodigy`` the rate is Prodigy's multiplier of its own step-size estimate (1.0
        recommended), so the preset's scale does not apply."""
        base = self.lora_learning_rate if self.lora_rank > 0 else self.learning_rate
        return base if self.optimizer == "prodigy" else base * self.learning_rate_scale

    @property
    def effective_text_encoder_learning_rate(self) -> float:
        """The text encoders' rate: ``text_encoder_lr`` x preset scale, or the U-Net's rate when
        unset or with ``prodigy`` (as diffusers' SDXL script: Prodigy takes one rate)."""
        if self.text_encoder_lr is None or self.optimizer == "prodigy":
            return self.effective_learning_rate
        return self.text_encoder_lr * self.learning_rate_scale

    @property
    def effective_text_encoder_weight_decay(self) -> float:
        """The text encoders' weight decay: ``adam_weight_decay_text_encoder``, else ``adam_weight_decay``."""
        return self.adam_weight_decay if self.adam_weight_decay_text_encoder is None else self.adam_weight_decay_text_encoder

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy."""
        return dataclasses.asdict(self)

    @classmethod
    def unknown_keys(cls, data: dict[str, Any]) -> list[str]:
        """Keys of ``data`` that are not config fields, sorted."""
        return sorted(set(data) - {f.name for f in dataclasses.fields(cls)})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExpertConfig":
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        unknown = cls.unknown_keys(data)
        if unknown:
            raise InputError(f"unknown expert config keys: {', '.join(unknown)}")
        return cls(**data)

    def validate(self) -> None:
        """Raise :class:`InputError` on a number out of its kind (every numeric field, finite,
        in range: :func:`expert_number`) or inconsistent settings."""
        for name, kind in _expert_numbers().items():
            value = getattr(self, name)
            if value is not None:
                kind.check(value, "--" + name.replace("_", "-"))
        if self.steps < 1:
            raise InputError(f"--steps must be at least 1 (got {self.steps})")
        if self.lora_rank < 0:
            raise InputError(f"--lora-rank must be >= 0 (got {self.lora_rank})")
        from suti.objectives import WEIGHTING_SCHEMES

        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise InputError(f"unknown --weighting-scheme {self.weighting_scheme!r} ({', '.join(WEIGHTING_SCHEMES)})")
        self._validate_objective_options()
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown --optimizer {self.optimizer!r} ({', '.join(OPTIMIZERS)})")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise InputError(f"unknown mixed precision {self.mixed_precision!r} (no, fp16, bf16)")
        if self.prior_preservation and self.num_class_images < 1:
            raise InputError("prior preservation needs --num-class-images >= 1")
        if not self.class_noun.strip():
            raise InputError("--class-noun must not be empty")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise InputError(f"--resolution must be a positive multiple of 8 (got {self.resolution})")
        if self.identifier is not None:
            from experts.identifier import check_identifier

            check_identifier(self.identifier)
        if "{V}" in self.class_prompt:
            raise InputError(f"--class-prompt must not contain the identifier {{V}}: prior preservation needs images of the class, not the subject (got {self.class_prompt!r})")
        if "{V}" not in self.instance_prompt_template:
            raise InputError(f"--instance-prompt must contain the identifier placeholder {{V}} (got {self.instance_prompt_template!r})")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.gradient_accumulation_steps < 1:
            raise InputError(f"--gradient-accumulation-steps must be at least 1 (got {self.gradient_accumulation_steps})")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise InputError(f"unknown --lr-scheduler {self.lr_scheduler!r} ({', '.join(LR_SCHEDULERS)})")
        if self.lr_warmup_steps < 0:
            raise InputError(f"--lr-warmup-steps must be >= 0 (got {self.lr_warmup_steps})")
        if self.max_grad_norm <= 0:
            raise InputError(f"--max-grad-norm must be > 0 (got {self.max_grad_norm})")
        if self.checkpoints_total_limit < 0:
            raise InputError(f"--checkpoints-total-limit must be >= 0 (0: keep all; got {self.checkpoints_total_limit})")
        if self.report_to not in REPORT_TO:
            raise InputError(f"unknown --report-to {self.report_to!r} ({', '.join(REPORT_TO)})")
        if self.vae_encode_batch_size < 1:
            raise InputError(f"vae_encode_batch_size must be at least 1 (got {self.vae_encode_batch_size})")
        from suti.sampling import check_sampler_args

        check_sampler_args(sample_batch_size=self.sample_batch_size, flags=True)
        if self.use_8bit_adam and self.optimizer != "adamw":
            raise InputError("--use-8bit-adam needs --optimizer adamw")
        self._validate_photo_options()
        self._validate_lora_options()
        if self.lr_warmup_steps and self.lr_scheduler == "constant":  # diffusers' constant schedule has no warmup
            _warn_once(f"--lr-warmup-steps {self.lr_warmup_steps} has no effect with --lr-scheduler constant (use constant_with_warmup to warm up)")
        elif self.lr_warmup_steps >= self.steps:
            _warn_once(f"--lr-warmup-steps {self.lr_warmup_steps} is not below --steps {self.steps}: the {self.lr_scheduler} schedule is still warming up when "
                       f"the run ends, so the learning rate never reaches its set value (shorten the warmup or raise --steps)")


    def _validate_objective_options(self) -> None:
        """Min-SNR-gamma is for epsilon/v models, the weighting schemes for flow-matching ones
        (:attr:`suti.models.Family.objective` of ``model``; the run checks its scheduler again)."""
        from suti.models import model_family
        from suti.objectives import training_objective_options

        training_objective_options(model_family(self.model).objective == "flow_matching", snr_gamma=self.snr_gamma, weighting_scheme=self.weighting_scheme)

    def _validate_lora_options(self) -> None:
        """The LoRA-only options need LoRA; kohya's layout has no DoRA; Prodigy's rate is ~1.0."""
        if self.lora_rank == 0:
            for name in ("use_dora", "output_kohya_format"):
                if getattr(self, name):
                    raise InputError(f"--{name.replace('_', '-')} needs a LoRA expert (--lora-rank > 0); got --lora-rank 0 (full fine-tuning)")
            for name in ("lora_alpha", "lora_dropout"):  # e.g. a LoRA recipe trained at --lora-rank 0: unused, not wrong
                if getattr(self, name):
                    _warn_once(f"--{name.replace('_', '-')} {getattr(self, name):g} has no effect with --lora-rank 0 (full fine-tuning)")
        if self.use_dora and self.output_kohya_format:
            raise InputError("--output-kohya-format writes plain LoRA (lora_down/lora_up/alpha); a --use-dora expert has magnitude vectors kohya's layout does not hold")
        if self.output_kohya_format and self.lora_rank > 0:
            from suti.models import model_family

            if model_family(self.model).name == "flux":
                raise InputError(f"--output-kohya-format: kohya's lora_unet_/lora_te_ layout is for U-Net bases (SD 1.x/2.x, SDXL), not the FLUX model {self.model}")
        if self.optimizer == "prodigy" and self.effective_learning_rate <= 0.1:  # diffusers' SDXL script warns the same
            _warn_once(f"--optimizer prodigy at learning rate {self.effective_learning_rate:g}: Prodigy's rate multiplies its own step-size estimate, "
                       f"so it is generally set around 1.0 (--learning-rate 1.0)")
        if self.optimizer == "prodigy" and self.text_encoder_lr is not None and self.train_text_encoder:
            _warn_once(f"--text-encoder-lr {self.text_encoder_lr:g} is not used with --optimizer prodigy: Prodigy takes one rate (--learning-rate) for every parameter group")
        if self.text_encoder_lr is not None and not self.train_text_encoder:
            _warn_once(f"--text-encoder-lr {self.text_encoder_lr:g} has no effect without --train-text-encoder")


    def _validate_photo_options(self) -> None:
        """Buckets, captions and the resize filter (:mod:`experts.buckets`, :func:`experts.data.read_captions`)."""
        from experts.buckets import INTERPOLATION_MODES, parse_buckets

        if self.image_interpolation_mode not in INTERPOLATION_MODES:
            raise InputError(f"unknown --image-interpolation-mode {self.image_interpolation_mode!r} ({', '.join(INTERPOLATION_MODES)})")
        if self.aspect_ratio_buckets not in (None, "auto"):
            parse_buckets(self.aspect_ratio_buckets)
        if self.caption_extension is not None and self.caption_extension.lower() not in CAPTION_EXTENSIONS:
            raise InputError(f"--caption-extension must be one of {', '.join(CAPTION_EXTENSIONS)} (files beside the photos that are not read as photos); got {self.caption_extension!r}")


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Log ``message`` as a warning once per process (a config is validated by the command, by
    :func:`experts.train.train_expert` and by each generation task: one line is enough)."""
    if message not in _warned:
        _warned.add(message)
        import logging

        logging.getLogger(__name__).warning(message)


def _expert_numbers() -> dict:
    """The kind of every numeric :class:`ExpertConfig` field (:mod:`suti.checks`): one table for
    the command line's flags (``type=``), recipes, YAML files and HTTP forms (:meth:`ExpertConfig.validate`)."""
    from suti import checks
    from suti.sampling import MAX_GUIDANCE_SCALE, MAX_NUM_IMAGES, MAX_SIDE, MAX_STEPS

    return {
        "identifier_tokens": checks.whole(1, 8),
        "prior_loss_weight": checks.real(0.0, 1e3),
        "num_class_images": checks.whole(0, 1_000_000),
        "class_seed": checks.SEED,
        "seed": checks.SEED,
        "learning_rate": checks.LEARNING_RATE,
        "lora_learning_rate": checks.LEARNING_RATE,
        "learning_rate_scale": checks.real(0.0, 1e4, lo_open=True),
        "lr_warmup_steps": checks.whole(0, 10_000_000),
        "lr_num_cycles": checks.whole(1, 10_000),
        "lr_power": checks.real(0.0, 100.0, lo_open=True),
        "caption_dropout": checks.PROBABILITY,
        "adam_beta1": checks.BETA,
        "adam_beta2": checks.BETA,
        "adam_weight_decay": checks.real(0.0, 1.0),
        "adam_weight_decay_text_encoder": checks.real(0.0, 1.0),
        "text_encoder_lr": checks.LEARNING_RATE,
        "prodigy_beta3": checks.BETA,
        "lora_dropout": checks.real(0.0, 1.0, hi_open=True),
        "adam_epsilon": checks.EPSILON,
        "max_grad_norm": checks.POSITIVE,
        "steps": checks.whole(1, 10_000_000),
        "batch_size": checks.whole(1, 4096),
        "gradient_accumulation_steps": checks.whole(1, 4096),
        "lora_rank": checks.whole(0, MAX_LORA_RANK),
        "lora_alpha": checks.real(0.0, 1e4, lo_open=True),
        "resolution": checks.whole(8, MAX_SIDE),
        "snr_gamma": checks.real(0.0, 1e3, lo_open=True),
        "offset_noise": checks.real(0.0, 1.0),
        "logit_mean": checks.real(-10.0, 10.0),
        "logit_std": checks.real(0.0, 10.0, lo_open=True),
        "mode_scale": checks.real(0.0, 10.0),
        "max_sequence_length": checks.whole(1, 4096),
        "checkpointing_steps": checks.whole(0, 10_000_000),
        "checkpoints_total_limit": checks.whole(0, 100_000),
        "validation_steps": checks.whole(0, 10_000_000),
        "sample_steps": checks.whole(1, MAX_STEPS),
        "guidance_scale": checks.real(0.0, MAX_GUIDANCE_SCALE),
        "class_sample_steps": checks.whole(1, MAX_STEPS),
        "sample_batch_size": checks.whole(1, MAX_NUM_IMAGES),
        "vae_encode_batch_size": checks.whole(1, 4096),
    }


#: LoRA ranks above this are refused (diffusers' scripts offer up to a few hundred; a rank at
#: least the layers' width is no low-rank adapter and writes a file larger than the model).
MAX_LORA_RANK = 1024


def expert_number(name: str):
    """The :class:`suti.checks.Number` of an :class:`ExpertConfig` field (an ``argparse`` type)."""
    return _expert_numbers()[name]


def list_recipes() -> list[str]:
    """Names of the recipes in ``configs/recipes``."""
    return sorted(p.stem for p in (config_dir() / "recipes").glob("*.yaml"))


def load_recipe(name_or_path: str | dict) -> dict[str, Any]:
    """A recipe by name (``configs/recipes/<name>.yaml``), by path or storage URI of a YAML file
    (``s3://bucket/recipes/mine.yaml``), or already loaded (a dict: a copy is returned; the
    generation job ships its recipe to the workers this way, as they cannot see the driver's disk).

    Raises:
        InputError: an unknown name, a missing file, or YAML that is not a mapping.
    """
    if isinstance(name_or_path, dict):
        return dict(name_or_path)
    from suti import storage

    text = str(name_or_path)
    if storage.is_remote(text):
        if not storage.isfile(text):
            raise InputError(f"--recipe {text}: no such file")
        raw, stem = storage.read_text(text), Path(text.split("://", 1)[1]).stem
    else:
        path = storage.local_path(text)  # a plain path or file:// URL
        if not path.is_file():
            path = config_dir() / "recipes" / f"{text}.yaml"
        if not path.is_file():
            raise InputError(f"unknown recipe {text!r}; recipes: {', '.join(list_recipes())}")
        raw, stem = path.read_text(), path.stem
    try:
        data = yaml.safe_load(raw) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"--recipe {text}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"--recipe {text}: a recipe is a YAML mapping of settings")
    data.setdefault("name", stem)
    return data


def preset_expert_defaults(model: str, recipe: str) -> dict[str, Any]:
    """What the model preset ``model`` sets for expert training with ``recipe``.

    ``learning_rate_scale`` (all recipes) and the preset's ``expert_defaults: {recipe: {field:
    value}}`` (fields of :class:`ExpertConfig`); empty for checkpoints that are not presets.
    """
    from suti.models import list_presets, load_preset

    if model not in list_presets():
        return {}
    preset = load_preset(model)
    out = {"learning_rate_scale": float(preset.get("learning_rate_scale", 1.0))}
    per_recipe = preset.get("expert_defaults") or {}
    if not isinstance(per_recipe, dict) or not all(isinstance(v, dict) for v in per_recipe.values()):
        raise InputError(f"model preset {model!r}: expert_defaults must map recipe names to "
                         f"{{field: value}} mappings")
    chosen = per_recipe.get(recipe, {})
    unknown = ExpertConfig.unknown_keys(chosen)
    if unknown:
        raise InputError(f"model preset {model!r}: expert_defaults[{recipe!r}] has unknown "
                         f"expert config keys: {', '.join(unknown)}")
    out.update(chosen)
    return out


def resolve_config(recipe: str | dict, overrides: dict[str, Any]) -> ExpertConfig:
    """Recipe (:func:`load_recipe`: a name, a YAML path or URI, or a loaded dict) < model preset
    (:func:`preset_expert_defaults`) < overrides (``None`` values ignored) -> a validated config."""
    data = load_recipe(recipe)
    data["recipe"] = data.pop("name")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "learning_rate" in overrides:  # an explicit rate applies to full and LoRA training alike
        overrides["lora_learning_rate"] = overrides["learning_rate"]
    model = overrides.get("model", data.get("model", "tiny"))
    from suti.models import model_family

    for key, value in model_family(model).training_defaults.items():  # e.g. FLUX's distilled guidance 3.5
        data.setdefault(key, value)  # a recipe's own setting stays
    data.update(preset_expert_defaults(model, data["recipe"]))
    data.update(overrides)
    config = ExpertConfig.from_dict(data)
    config.instance_prompt = config.instance_prompt_template  # recorded resolved in expert.json
    from suti.storage import absolute_if_local

    for name in ("instance_dir", "class_data_dir"):  # recorded in expert.json: valid from any working directory
        if getattr(config, name):
            setattr(config, name, absolute_if_local(getattr(config, name)))
    config.validate()
    return config
