"""The expert folder: ``expert.json`` plus safetensors weights, and loading it back.

Layout of an expert folder::

    expert.json                          identifier, class noun, base model, recipe, config, steps, seed
    pipeline/                            full fine-tuning: a complete diffusers pipeline folder
    pytorch_lora_weights.safetensors     LoRA: loads with diffusers' ``load_lora_weights``
    pytorch_lora_weights_kohya.safetensors  LoRA with ``output_kohya_format``: kohya's layout (ComfyUI, A1111)
    checkpoints/step-N/                  resumable training state
    logs/                                TensorBoard
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from suti import storage
from suti.errors import InputError, ModelLoadError

log = logging.getLogger(__name__)

EXPERT_FILE = "expert.json"
LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class ExpertInfo:
    """What ``expert.json`` records about a trained expert."""

    identifier: str
    class_noun: str
    base_model: str
    recipe: str
    kind: str  # "full" | "lora"
    steps: int
    seed: int
    resolution: int
    instance_prompt: str
    weights: str  # relative path of the pipeline folder or the LoRA file
    config: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0
    suti_version: str = ""

    def write(self, folder: Path) -> None:
        """Write ``expert.json`` atomically (it marks the expert as complete)."""
        tmp = folder / (EXPERT_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.rename(folder / EXPERT_FILE)

    @classmethod
    def read(cls, folder: str | Path) -> "ExpertInfo":
        """Read ``expert.json`` from an expert folder."""
        path = Path(folder) / EXPERT_FILE
        if not path.is_file():
            raise InputError(f"{folder}: not an expert folder (no {EXPERT_FILE}; was training finished?)")
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise InputError(f"{path}: malformed expert file ({exc})") from None

    def prompt(self, template: str) -> str:
        """Fill ``{V}`` and ``{class}`` in a prompt template. A prompt without the identifier
        samples the class, not the subject: that is warned about (DreamBooth's subject is bound
        to the identifier, Ruiz et al. 2023, section 3)."""
        import re

        from experts.identifier import fill_prompt

        text = fill_prompt(template, self.identifier, self.class_noun)
        if not re.search(rf"(?<![\w]){re.escape(self.identifier)}(?![\w])", text):
            log.warning("prompt %r does not name the expert's identifier %r ({V}): it draws a %s, not the subject; write e.g. %r",
                        text, self.identifier, self.class_noun, f"a {{V}} {{class}} {template.removeprefix('a ').removeprefix('an ')}")
        return text


def unsaved_expert_info(config, instance_prompt: str, train_seconds: float) -> ExpertInfo:
    """The :class:`ExpertInfo` of an expert trained in place and not written (a resident expert
    worker's): no weights file, ``train_seconds`` rounded to milliseconds."""
    return ExpertInfo(identifier=config.identifier, class_noun=config.class_noun, base_model=config.model, recipe=config.recipe, kind="lora" if config.lora_rank > 0 else "full",
                      steps=config.steps, seed=config.seed, resolution=config.resolution, instance_prompt=instance_prompt, weights="", config=config.to_dict(),
                      train_seconds=round(train_seconds, 3))


def save_lora_weights(pipe, output: Path, adapter_name: str = "default", *, with_text_encoders: bool = False) -> Path:
    """Write the peft adapter ``adapter_name`` of ``pipe``'s denoiser (and of the text encoders
    its family trains, :attr:`suti.models.Family.text_encoders`) to ``output/LORA_FILE``
    atomically, with the family pipeline's own ``save_lora_weights`` (the layout its
    ``load_lora_weights`` reads: ``unet.*``/``text_encoder.*`` for SD and SDXL, converted to
    diffusers' keys as ``train_dreambooth_lora.py`` does; ``transformer.*`` in peft's keys for
    FLUX, as ``train_dreambooth_lora_flux.py`` does) and each adapter's config as metadata (so
    that loading restores ``lora_alpha``). Returns the file."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from suti.denoisers import denoiser_for
    from suti.models import pipeline_family

    family = pipeline_family(pipe)
    denoiser = denoiser_for(pipe)
    parts = [(denoiser.attribute, denoiser.module)]
    if with_text_encoders:
        parts += [(name, getattr(pipe, name)) for name in family.text_encoders]
    kwargs = {}
    for name, module in parts:
        layers = get_peft_model_state_dict(module, adapter_name=adapter_name)
        kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(layers) if denoiser.lora_keys == "diffusers" else layers
        kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config[adapter_name].to_dict()  # diffusers restores lora_alpha from it
    with tempfile.TemporaryDirectory(prefix=".lora-", dir=output) as tmp:  # then renamed: atomic
        family.pipeline_class().save_lora_weights(tmp, safe_serialization=True, **kwargs)
        storage.umask_modes(Path(tmp) / LORA_FILE)  # safetensors writes 0o600
        os.replace(Path(tmp) / LORA_FILE, output / LORA_FILE)
    return output / LORA_FILE


def save_expert(pipe, config, output: Path, train_seconds: float = 0.0, adapter_name: str = "default") -> ExpertInfo:
    """Save the trained weights (safetensors only) and ``expert.json``; a LoRA expert is the
    peft adapter ``adapter_name`` of ``pipe``'s U-Net (and text encoders), saved in diffusers'
    layout whatever its name (``config.output_kohya_format``'s kohya copy is written by the
    trainers beside it: :func:`experts.export.write_kohya_copy`)."""
    import suti
    from experts.identifier import fill_prompt

    if config.lora_rank > 0:
        save_lora_weights(pipe, output, adapter_name, with_text_encoders=config.train_text_encoder)
        kind, weights = "lora", LORA_FILE
    else:
        storage.save_pretrained_atomic(pipe, output / "pipeline", safe_serialization=True)
        kind, weights = "full", "pipeline"
    info = ExpertInfo(
        identifier=config.identifier,
        class_noun=config.class_noun,
        base_model=config.model,
        recipe=config.recipe,
        kind=kind,
        steps=config.steps,
        seed=config.seed,
        resolution=config.resolution,
        instance_prompt=fill_prompt(config.instance_prompt_template, config.identifier, config.class_noun),
        weights=weights,
        config=config.to_dict(),
        train_seconds=round(train_seconds, 3),
        suti_version=suti.__version__,
    )
    info.write(output)
    return info


def check_lora_applied(pipe, weights: Path, header: dict, base: str, error: type[Exception] = ModelLoadError) -> None:
    """After ``load_lora_weights``: refuse a LoRA that did not change the model. diffusers skips
    unmatched keys with a warning only, so a file of another base's layers, an empty file or an
    untrained adapter (every up-projection zero) would silently give the base model.

    Args:
        pipe: the pipeline the weights were loaded into.
        weights: the LoRA file (named in errors); ``header``: its safetensors header.
        base: the base model's name (named in errors).
        error: the exception class to raise.

    Raises:
        error: naming the file and what is wrong.
    """
    tensors = [k for k in header if k != "__metadata__"]
    if not tensors:
        raise error(f"{weights}: holds no tensors, so it would leave base {base} unchanged")
    modules = [getattr(pipe, part, None) for part in ("unet", "transformer", "text_encoder", "text_encoder_2")]
    for part in ("unet", "text_encoder"):
        wanted = any(k.startswith(f"{part}.") for k in tensors)
        module = getattr(pipe, part, None)
        if wanted and module is not None and not any("lora_" in n for n, _ in module.named_parameters()):
            raise error(f"{weights}: no {part} layer of base {base} matches its LoRA weights (trained for another base?)")
    ups = [p for m in modules if m is not None for n, p in m.named_parameters() if "lora_B" in n]
    if not ups:
        raise error(f"{weights}: none of its {len(tensors)} tensors matches a layer of base {base}, so it would leave the base unchanged (trained for another base?)")
    if all(not p.detach().any() for p in ups):
        raise error(f"{weights}: every LoRA up-projection is zero, so it leaves base {base} unchanged (an untrained adapter?)")


def load_expert(folder: str | Path, *, device: str | None = None, torch_dtype=None):
    """Load a trained expert as a ready diffusers pipeline.

    Full fine-tuning loads the saved pipeline folder; LoRA loads the base model named in
    ``expert.json`` and applies the adapter with ``load_lora_weights``.

    Raises:
        InputError: ``expert.json`` is missing or malformed.
        ModelLoadError: one line naming the file: ``FILE: not a complete safetensors file``
            (an interrupted copy), ``FILE: trained for base X, its shapes do not fit base Y``
            (``expert.json`` names another base), or the library's first error line.
    """
    import torch

    from suti.models import load_pipeline
    from suti.weights import check_weight_folder, describe_load_error, is_shape_mismatch, loading, quiet_library_errors, safetensors_header

    folder = Path(folder)
    info = ExpertInfo.read(folder)
    weights = folder / info.weights
    if info.kind == "lora":
        header = safetensors_header(weights)
        pipe = load_pipeline(info.base_model, torch_dtype=torch_dtype)
        try:
            with quiet_library_errors():
                pipe.load_lora_weights(str(folder), weight_name=info.weights)
        except Exception as exc:  # diffusers/peft raise RuntimeError, ValueError, KeyError ...
            if is_shape_mismatch(exc):
                trained = (info.config or {}).get("model")
                if trained and trained != info.base_model:
                    raise ModelLoadError(f"{weights}: trained for base {trained}, its shapes do not fit base "
                                         f"{info.base_model} (named in {folder / EXPERT_FILE})") from None
                raise ModelLoadError(f"{weights}: trained for another base, its shapes do not fit base "
                                     f"{info.base_model} (named in {folder / EXPERT_FILE}; "
                                     f"{describe_load_error(exc)})") from None
            raise ModelLoadError(f"{weights}: could not apply the LoRA weights to base "
                                 f"{info.base_model} ({describe_load_error(exc)})") from None
        check_lora_applied(pipe, weights, header, info.base_model)
        for part in ("unet", "transformer", "text_encoder", "text_encoder_2"):  # peft adds its layers in training mode: LoRA dropout would act while sampling
            if isinstance(getattr(pipe, part, None), torch.nn.Module):
                getattr(pipe, part).eval()
    elif info.kind == "full":
        if not weights.is_dir():
            raise ModelLoadError(f"{weights}: the expert's pipeline folder is missing")
        check_weight_folder(weights)
        with loading(weights):
            pipe = load_pipeline(str(weights), torch_dtype=torch_dtype)
    else:
        raise InputError(f"{folder / EXPERT_FILE}: unknown expert kind {info.kind!r} (full or lora)")
    if device is not None:
        pipe = pipe.to(device)
    return pipe
