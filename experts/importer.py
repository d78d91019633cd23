"""``suti expert import``: wrap a diffusers DreamBooth output as a suti expert folder.

diffusers' ``train_dreambooth_lora.py`` writes ``pytorch_lora_weights.safetensors``
(``StableDiffusionPipeline.save_lora_weights``; ``train_dreambooth_lora_flux.py`` the same file
with ``FluxPipeline.save_lora_weights``, peft-named ``transformer.*`` keys: import it with a FLUX
``--model`` such as ``tiny-flux``); ``train_dreambooth.py`` writes a pipeline folder
(``save_pretrained``). A kohya-layout LoRA (``lora_unet_``/``lora_te_`` keys: ComfyUI, A1111,
``suti expert export --format kohya``) imports too: diffusers' ``load_lora_weights`` converts it,
and the same checks refuse an empty or foreign file. None of these records the identifier or the
class noun, which ``suti expert sample`` needs to fill ``{V}`` and ``{class}``; this writes them
into ``expert.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from experts.expert import LORA_FILE, ExpertInfo, check_lora_applied
from suti.errors import InputError


def import_expert(output: str | Path, *, identifier: str, class_noun: str, lora: str | None = None, pipeline: str | None = None, model: str | None = None, instance_prompt: str = "a {V} {class}", resolution: int | None = None, overwrite: bool = False) -> ExpertInfo:
    """Copy a diffusers LoRA file or pipeline folder into ``output`` and write ``expert.json``.

    Args:
        output: the expert folder to create (must be empty or absent unless ``overwrite``).
        identifier: the rare token the subject was trained with (e.g. ``"sks"``).
        class_noun: the subject's class noun (e.g. ``"dog"``).
        lora: a LoRA ``.safetensors`` file, or a folder holding ``pytorch_lora_weights.safetensors``;
            in diffusers' or kohya's layout; it must load into ``model`` with diffusers'
            ``load_lora_weights`` and change it (checked here).
        pipeline: a diffusers pipeline folder (``model_index.json``); copied to ``output/pipeline``.
        model: the base model (preset, folder or hub id); required with ``lora``; with
            ``pipeline`` it is the base that ``suti expert loss`` compares with (default: the
            pipeline itself).
        instance_prompt: the training prompt with ``{V}``/``{class}``.
        resolution: sampling resolution (default: the base's native one).

    Raises:
        InputError: not exactly one of ``lora``/``pipeline``, a missing or unloadable file, a
            non-empty output.
    """
    from experts.identifier import fill_prompt
    from experts.train import prepare_output
    from suti.models import default_resolution, load_pipeline

    if (lora is None) == (pipeline is None):
        raise InputError("give exactly one of --lora FILE and --pipeline DIR")
    from experts.identifier import check_identifier

    check_identifier(identifier)
    if not class_noun.strip():
        raise InputError("--class-noun must not be empty")
    if "{V}" not in instance_prompt:
        raise InputError(f"--instance-prompt must contain {{V}} (got {instance_prompt!r})")
    if resolution is not None:
        from suti.sampling import check_sampler_args

        check_sampler_args(height=resolution, flags={"height": "--resolution"})  # a positive multiple of 8, as sampling needs
    output = Path(output)
    if lora is not None:
        if model is None:
            raise InputError("--lora needs --model, the base model the LoRA was trained on")
        source = Path(lora)
        if source.is_dir():
            source = source / LORA_FILE
        if not source.is_file():
            raise InputError(f"{lora}: no such LoRA file (a .safetensors file or a folder with {LORA_FILE})")
        pipe = load_pipeline(model)
        from suti.weights import quiet_library_errors

        try:
            with quiet_library_errors():  # diffusers logs the whole size-mismatch list before raising
                pipe.load_lora_weights(str(source.parent), weight_name=source.name)
        except Exception as exc:  # diffusers raises ValueError/KeyError/OSError for foreign files
            raise InputError(f"{source}: not a diffusers LoRA for {model} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        from suti.weights import safetensors_header

        check_lora_applied(pipe, source, safetensors_header(source), model, error=InputError)  # an empty or foreign file loads as a no-op
        prepare_output(output, None, overwrite)
        output.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, output / LORA_FILE)
        kind, weights, base = "lora", LORA_FILE, model
        resolution = resolution or default_resolution(model)
    else:
        source = Path(pipeline)
        if not (source / "model_index.json").is_file():
            raise InputError(f"{pipeline}: not a diffusers pipeline folder (no model_index.json)")
        try:
            load_pipeline(str(source))
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{source}: the pipeline does not load ({type(exc).__name__})") from None
        prepare_output(output, None, overwrite)
        output.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, output / "pipeline", dirs_exist_ok=True)
        kind, weights, base = "full", "pipeline", model or str(source.resolve())
        resolution = resolution or _pipeline_resolution(source)
    import suti

    from suti.models import model_family

    # the sampling default of expert.json (suti expert sample): the family's (FLUX's distilled 3.5), else 7.5
    guidance_scale = model_family(base if lora is not None else str(source)).training_defaults.get("guidance_scale", 7.5)
    config = {"model": base, "identifier": identifier, "class_noun": class_noun, "instance_prompt": instance_prompt, "resolution": resolution,
              "guidance_scale": guidance_scale, "imported_from": str(Path(lora or pipeline).resolve())}
    info = ExpertInfo(
        identifier=identifier,
        class_noun=class_noun,
        base_model=base,
        recipe="imported",
        kind=kind,
        steps=0,
        seed=0,
        resolution=resolution,
        instance_prompt=fill_prompt(instance_prompt, identifier, class_noun),
        weights=weights,
        config=config,
        suti_version=suti.__version__,
    )
    info.write(output)
    return info


def _pipeline_resolution(folder: Path) -> int:
    """Native resolution of a pipeline folder: U-Net sample size x the VAE's downsampling, or (a
    transformer base such as FLUX, no ``unet/``) the VAE's ``sample_size`` in pixels; 512 when
    neither can be read."""
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        if not (folder / "unet" / "config.json").is_file():
            return int(vae["sample_size"])
        unet = json.loads((folder / "unet" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, ValueError, TypeError):
        return 512
