"""``suti expert export``: a LoRA expert as one ``.safetensors`` file for the tools people
generate with.

``--format kohya`` writes the layout of kohya-ss' sd-scripts, which ComfyUI, Forge/AUTOMATIC1111
and kohya's own tools read: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha`` (``lora_te_`` for the one text encoder of SD 1.x/2.x, ``lora_te1_``/``lora_te2_`` for
SDXL's two), with the usual ``ss_*`` and ``modelspec.*`` metadata. The key mapping is diffusers'
own (:func:`diffusers.utils.convert_state_dict_to_kohya`, as ``train_dreambooth_lora_sdxl.py
--output_kohya_format`` uses it); only the alpha is set here, from the loaded adapter's scaling,
where diffusers' converter assumes alpha = rank. ``--format diffusers`` writes diffusers' layout
(what ``save_lora_weights`` writes) with the adapter's ``lora_adapter_metadata``.

The adapter is read from the expert as suti loads it (:func:`experts.expert.load_expert`), so the
file gives the same model as ``suti expert sample`` whatever layout the expert's own file has.
"""

from __future__ import annotations

import json
from pathlib import Path

from suti.errors import InputError, InvalidValueError, MissingInputError, OutputExistsError

FORMATS = ("kohya", "diffusers")

#: kohya's ``ss_base_model_version`` and Stability's ``modelspec.architecture`` of each base kind.
BASE_VERSIONS = {
    "sd_v1": "stable-diffusion-v1/lora",
    "sd_v2": "stable-diffusion-v2-512/lora",
    "sdxl_base_v1-0": "stable-diffusion-xl-v1-base/lora",
    "flux1": "flux-1-dev/lora",  # modelspec's architecture id of FLUX.1 LoRAs
}


def export_expert(expert: str | Path, output: str | Path, fmt: str = "kohya", *, overwrite: bool = False) -> dict:
    """Write the LoRA of ``expert`` to ``output`` in ``fmt`` (``kohya`` or ``diffusers``).

    Returns:
        a summary: ``output``, ``format``, ``base_model_version``, ``rank``, ``alpha``, ``tensors``,
        ``text_encoder`` (whether the text encoders' LoRA is in the file).

    Raises:
        InputError: an unknown format, an output that exists (without ``overwrite``) or does not
            end in ``.safetensors``, a missing expert folder, a full fine-tune expert.
        ModelLoadError: the expert's LoRA does not load into its base.
    """
    from experts.expert import ExpertInfo

    if fmt not in FORMATS:
        raise InvalidValueError(f"--format {fmt!r}: unknown; formats: {', '.join(FORMATS)}")
    output = Path(output)
    if output.suffix != ".safetensors":
        raise InvalidValueError(f"--output {output}: must be a .safetensors file")
    if output.is_dir():
        raise OutputExistsError(f"{output}: is a folder; --output names the .safetensors file to write")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output}: exists; pass --overwrite to replace it")
    folder = Path(expert)
    if not folder.is_dir():
        raise MissingInputError(f"{expert}: no such expert folder")
    info = ExpertInfo.read(folder)
    if info.kind != "lora":
        raise InputError(f"{expert}: a full fine-tune expert ({info.kind}), not a LoRA; only LoRA experts export (its pipeline folder is {folder / info.weights})")

    from experts.expert import load_expert

    pipe = load_expert(folder)
    if fmt == "kohya" and getattr(pipe, "unet", None) is None:
        raise InputError(f"--format kohya: kohya's lora_unet_/lora_te_ layout is written for U-Net bases (SD 1.x/2.x, SDXL), not {info.base_model}; "
                         f"export this expert with --format diffusers")
    return write_lora_file(pipe, info, output, fmt)


KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"  # diffusers' --output_kohya_format name


def write_lora_file(pipe, info, output: Path, fmt: str = "kohya", *, adapter: str | None = None) -> dict:
    """Write the LoRA layers of ``pipe`` (the adapter ``adapter``; ``None``: its only one) to
    ``output`` in ``fmt`` with the expert's metadata (``info``: :class:`experts.expert.ExpertInfo`),
    atomically. Returns the summary of :func:`export_expert`.

    Raises:
        InputError: no LoRA layers, several adapters and none named, or a DoRA adapter.
    """
    parts = lora_parts(pipe, adapter)
    version = base_model_version(pipe)
    if fmt == "kohya":
        tensors = kohya_state_dict(parts, single_text_encoder=getattr(pipe, "text_encoder_2", None) is None)
    else:
        from suti.denoisers import denoiser_for

        denoiser = denoiser_for(pipe)
        tensors = diffusers_state_dict(parts, peft_keys={denoiser.attribute} if denoiser.lora_keys == "peft" else set())
    ranks = sorted({r for _, modules in parts for _, (_, _, r, _) in modules.items()})
    alphas = sorted({a for _, modules in parts for _, (_, _, _, a) in modules.items()})
    output = Path(output)
    title = output.stem if output.name != KOHYA_FILE else output.parent.name
    metadata = export_metadata(info, version, ranks, alphas, title, text_encoder=any(p.startswith("text_encoder") for p, _ in parts))
    if fmt == "diffusers":
        metadata["lora_adapter_metadata"] = adapter_metadata(pipe, [p for p, _ in parts])
    from safetensors.torch import save_file

    from suti import storage

    with storage.atomic_local_path(output) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return {"output": str(output), "format": fmt, "base_model_version": version, "rank": ranks[-1], "alpha": alphas[-1],
            "tensors": len(tensors), "text_encoder": any(p.startswith("text_encoder") for p, _ in parts)}


def lora_parts(pipe, adapter: str | None = None) -> list[tuple[str, dict]]:
    """``[(component, {module name: (down, up, rank, alpha)})]`` of the pipeline's LoRA layers
    (``unet`` or ``transformer``, ``text_encoder``, ``text_encoder_2``), read from peft's layers: the alpha is
    ``scaling * rank``, what kohya's ``alpha / dim`` scale reproduces; text encoder modules by
    :func:`canonical_name`."""
    from peft.tuners.lora import LoraLayer

    parts = []
    for component in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        modules = {}
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            names = [adapter] if adapter else list(module.lora_A.keys())
            if len(names) > 1:
                raise InputError(f"{component}.{name}: {len(names)} LoRA adapters loaded; export takes one")
            for key in names:
                if key not in module.lora_A:
                    continue
                if getattr(module, "use_dora", {}).get(key):
                    raise InputError(f"{component}.{name}: a DoRA adapter; export writes plain LoRA only")
                rank = int(module.r[key])
                alpha = float(module.scaling[key]) * rank
                modules[canonical_name(component, model, name)] = (module.lora_A[key].weight.detach().cpu(), module.lora_B[key].weight.detach().cpu(), rank, alpha)
        if modules:
            parts.append((component, modules))
    if not parts:
        raise InputError("the expert's pipeline holds no LoRA layers")
    return parts


def canonical_name(component: str, model, name: str) -> str:
    """A module's name as CLIP has long spelled it: transformers 5 flattened ``CLIPTextModel``
    (``encoder.layers.0...``, no ``text_model.``), while kohya's keys, ComfyUI, A1111 and older
    diffusers read ``text_model.encoder.layers.0...``; diffusers strips the prefix again where
    the encoder is flattened (``_load_lora_into_text_encoder``)."""
    if component.startswith("text_encoder") and not hasattr(model, "text_model") and not name.startswith("text_model."):
        return f"text_model.{name}"
    return name


def kohya_state_dict(parts, *, single_text_encoder: bool) -> dict:
    """kohya's keys by diffusers' :func:`~diffusers.utils.convert_state_dict_to_kohya`, one
    module at a time so that each ``.alpha`` is the module's own. SD 1.x/2.x name their one text
    encoder ``lora_te_`` (kohya's ``LORA_PREFIX_TEXT_ENCODER``), SDXL ``lora_te1_``/``lora_te2_``."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    out = {}
    for component, modules in parts:
        for name, (down, up, _, alpha) in modules.items():
            converted = convert_state_dict_to_kohya({f"{component}.{name}.lora_A.weight": down, f"{component}.{name}.lora_B.weight": up})
            for key, value in converted.items():
                if single_text_encoder and key.startswith("lora_te1_"):
                    key = "lora_te_" + key.removeprefix("lora_te1_")
                out[key] = torch.tensor(alpha, dtype=torch.float32) if key.endswith(".alpha") else value
    return out


def diffusers_state_dict(parts, peft_keys: set[str] = frozenset()) -> dict:
    """diffusers' LoRA layout (as ``save_lora_weights`` writes it): peft keys through
    :func:`~diffusers.utils.convert_state_dict_to_diffusers`, prefixed by the component; the
    components in ``peft_keys`` (FLUX's ``transformer``, as diffusers' flux script saves it) keep
    peft's names."""
    from diffusers.utils import convert_state_dict_to_diffusers

    out = {}
    for component, modules in parts:
        peft = {}
        for name, (down, up, _, _) in modules.items():
            peft[f"{name}.lora_A.weight"] = down
            peft[f"{name}.lora_B.weight"] = up
        keyed = peft if component in peft_keys else convert_state_dict_to_diffusers(peft)
        out.update({f"{component}.{k}": v for k, v in keyed.items()})
    return out


def adapter_metadata(pipe, components: list[str]) -> str:
    """diffusers' ``lora_adapter_metadata`` (each component's peft ``LoraConfig``, prefixed), so
    that ``load_lora_weights`` restores the rank and alpha of every layer."""
    out = {}
    for component in components:
        model = getattr(pipe, component)
        configs = getattr(model, "peft_config", {}) or {}
        if len(configs) != 1:
            continue
        config = next(iter(configs.values())).to_dict()
        for key, value in config.items():
            out[f"{component}.{key}"] = sorted(value) if isinstance(value, set) else value
    return json.dumps(out, indent=2, sort_keys=True, default=str)


def base_model_version(pipe) -> str:
    """kohya's ``ss_base_model_version``: ``sdxl_base_v1-0`` for SDXL, ``sd_v2`` for a U-Net
    with SD 2's 1024-wide cross-attention (OpenCLIP ViT-H), else ``sd_v1``."""
    from suti.models import is_sdxl

    if is_sdxl(pipe):
        return "sdxl_base_v1-0"
    if getattr(pipe, "unet", None) is None:  # a transformer base (kohya's name for FLUX.1)
        return "flux1"
    return "sd_v2" if getattr(pipe.unet.config, "cross_attention_dim", None) == 1024 else "sd_v1"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def export_metadata(info, version: str, ranks: list[int], alphas: list[float], title: str, *, text_encoder: bool) -> dict[str, str]:
    """The safetensors ``__metadata__``: kohya's ``ss_*`` keys (base model version, network
    module, dim, alpha, ...), Stability's ``modelspec.*`` and suti's ``suti_*`` (identifier,
    class noun, instance prompt, base model). Values are strings, as safetensors requires."""
    import suti

    resolution = int(info.resolution or 512)
    return {
        "ss_base_model_version": version,
        "ss_v2": str(version == "sd_v2"),
        "ss_sd_model_name": str(info.base_model),
        "ss_network_module": "networks.lora",
        "ss_network_dim": _number(ranks[-1]),
        "ss_network_alpha": _number(alphas[-1]),
        "ss_network_train_unet_only": str(not text_encoder),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_max_train_steps": str(info.steps),
        "ss_seed": str(info.seed),
        "ss_output_name": title,
        "ss_training_comment": f"suti expert: {info.instance_prompt}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": BASE_VERSIONS[version],
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "suti_identifier": info.identifier,
        "suti_class_noun": info.class_noun,
        "suti_instance_prompt": info.instance_prompt,
        "suti_base_model": str(info.base_model),
        "suti_recipe": str(info.recipe),
        "suti_version": str(info.suti_version or suti.__version__),
    }


def write_kohya_copy(pipe, info, output: Path, adapter_name: str = "default") -> Path | None:
    """diffusers' ``--output_kohya_format``: a LoRA expert's adapter ``adapter_name`` also written
    in kohya's layout as ``output/KOHYA_FILE`` (:func:`write_lora_file`); ``None`` (logged) on a
    base kohya's ``lora_unet_`` layout does not cover (FLUX)."""
    import logging

    if getattr(pipe, "unet", None) is None:
        logging.getLogger(__name__).warning("%s: no %s written: kohya's layout covers U-Net bases (SD 1.x/2.x, SDXL), not %s", output, KOHYA_FILE, info.base_model)
        return None
    write_lora_file(pipe, info, Path(output) / KOHYA_FILE, "kohya", adapter=adapter_name)
    return Path(output) / KOHYA_FILE
