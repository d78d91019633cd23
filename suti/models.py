"""Model presets and the one factory that loads a text-to-image pipeline from any source.

``--model`` (and :func:`load_pipeline`) accepts:

* a preset name from ``configs/models/*.yaml`` (``tiny``, ``sd15-arch``, ``tiny-flux``, ...). A preset with
  ``source: random`` is built from its configs with a fixed seed; with ``cache: true`` it is saved
  once with ``save_pretrained`` into the suti cache and always loaded back with
  ``from_pretrained``, the same path a real checkpoint takes. A preset with ``source: builder``
  names a ``module:function`` that writes the pipeline folder (the trained ``toy`` world model).
* a local diffusers pipeline folder (``model_index.json`` inside);
* a Hugging Face hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``). Offline, a hub id that is
  not in the local hub cache fails with one message that says how to provide a local copy.

Presets are data; weight sources are separate (the preset says where weights come from).

Pipeline families (:data:`FAMILIES`): Stable Diffusion 1.x/2.x, SDXL and FLUX.1. A family says which
diffusers class loads a folder (by its ``model_index.json`` ``_class_name``), what builds a random
preset of it, and which keyword arguments its ``from_pretrained`` takes; every place that depends
on the family asks :func:`preset_family`, :func:`folder_family` or :func:`pipeline_family`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from suti import storage
from suti.errors import ModelLoadError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


#: The presets, recipes and DeepSpeed configs shipped inside the package (and so the wheel).
PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"


def config_dir() -> Path:
    """The ``configs/`` folder: ``suti/configs`` inside the installed package (``$SUTI_CONFIG_DIR``
    overrides). The repository's top-level ``configs`` is a link to it."""
    return Path(os.environ.get("SUTI_CONFIG_DIR", PACKAGE_CONFIGS))


def config_path(kind: str, name_or_path: str, suffix: str) -> Path:
    """A shipped config by name (``configs/<kind>/<name><suffix>``) or an existing file path.

    ``kind`` is ``models``, ``recipes`` or ``deepspeed``. A path like ``configs/deepspeed/zero2.json``
    is also found inside the package, so commands written for a source checkout work from a wheel.
    Returns the path, which exists only if one of the candidates does (callers raise their own
    error naming the value).
    """
    given = Path(name_or_path)
    if given.is_file():
        return given
    parts = given.parts
    if parts and parts[0] == "configs":  # a repository-relative path: look inside the package
        inside = config_dir().joinpath(*parts[1:])
        if inside.is_file():
            return inside
    return config_dir() / kind / (given.name if given.name.endswith(suffix) else f"{given.name}{suffix}")


def cache_dir() -> Path:
    """Where built presets and class images are cached (``$SUTI_CACHE`` or ``~/.cache/suti``)."""
    path = Path(os.environ.get("SUTI_CACHE", Path.home() / ".cache" / "suti"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def list_presets() -> list[str]:
    """Names of the model presets in ``configs/models``."""
    return sorted(p.stem for p in (config_dir() / "models").glob("*.yaml"))


@lru_cache(maxsize=None)
def _read_preset(name: str) -> str:
    return (config_dir() / "models" / f"{name}.yaml").read_text()


@lru_cache(maxsize=None)
def _parsed_preset(text: str) -> dict[str, Any]:
    return yaml.safe_load(text)


def load_preset(name: str) -> dict[str, Any]:
    """The preset ``name`` as a dict, the caller's own copy (raises :class:`ModelLoadError` if
    unknown). Parsed once per process: every expert of a job reads it several times."""
    if name not in list_presets():
        raise ModelLoadError(f"unknown model preset {name!r}; presets: {', '.join(list_presets())}")
    return copy.deepcopy(_parsed_preset(_read_preset(name)))


#: Preset keys that advise how to fine-tune the model and do not change its weights: editing them
#: does not rebuild the cached pipeline (nor invalidate class images or the toy apprentice).
TRAINING_KEYS = ("description", "learning_rate_scale", "expert_defaults", "scorer")


def preset_fingerprint(preset: dict[str, Any]) -> str:
    """Content hash of a preset's weight-defining keys (all but :data:`TRAINING_KEYS`): its cache
    folder changes whenever those change."""
    defining = {k: v for k, v in preset.items() if k not in TRAINING_KEYS}
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:12]


def model_fingerprint(model: str) -> str:
    """What identifies a model's weights now, for cache keys (class images, experts, eval images):

    * a preset: its name and :func:`preset_fingerprint` (the keys that define its weights);
    * a folder on object storage: the URI and its objects' sizes and ETags (:func:`suti.storage.fingerprint`);
    * a local folder: its path and every file's size and modification time (a model retrained
      or copied over in place is another model, whichever of its files changed);
    * a hub id: the id and, when it is in the local hub cache, the snapshot's commit (a newer
      download of the same id is another model).
    """
    if model in list_presets():
        return f"preset:{model}:{preset_fingerprint(load_preset(model))}"
    if storage.is_remote(model):
        return f"uri:{storage.resolve(model)}:{storage.fingerprint(model)}"
    path = storage.local_path(model)  # a plain path or file:// URL
    if path.exists():
        return f"folder:{path.resolve()}:{storage.fingerprint(str(path.resolve()))}"
    return f"hub:{model}{_hub_revision(model)}"


def _hub_revision(model: str) -> str:
    """``@<commit>`` of the hub id's snapshot in the local hub cache, else ``""``."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "model_index.json")
    except Exception:  # noqa: BLE001 - not a valid repo id: no revision to add
        return ""
    return f"@{Path(found).parent.name}" if isinstance(found, str) else ""


def default_resolution(model: str) -> int:
    """Native resolution of ``model`` (preset field, or 512 for checkpoints)."""
    if model in list_presets():
        return int(load_preset(model).get("resolution", 512))
    return 512


#: ``model_index.json`` ``_class_name`` values of each family's pipelines.
SD_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
SDXL_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
FLUX_CLASSES = ("FluxPipeline", "FluxImg2ImgPipeline")


@dataclass(frozen=True)
class Family:
    """One family of text-to-image pipelines: how the factory builds and loads it.

    Attributes:
        name: ``sd``, ``sdxl`` or ``flux`` (a preset's ``family`` key).
        pipeline: the diffusers class that loads a folder of this family.
        class_names: the ``model_index.json`` ``_class_name`` values that belong to it.
        builder: ``module:function`` that builds a seeded random-weight pipeline from a preset.
        load_kwargs: extra keyword arguments of ``pipeline.from_pretrained``.
        denoiser: ``module:class`` of its denoising network's adapter (:mod:`suti.denoisers`).
        text_encoders: the pipeline attributes of the text encoders that fine-tuning trains
            (``--train-text-encoder``; FLUX: CLIP only, its T5 stays frozen as in diffusers'
            ``train_dreambooth_lora_flux.py``).
        objective: ``diffusion`` (epsilon/v prediction) or ``flow_matching``: how it trains
            (:mod:`suti.objectives`; decided by its scheduler, told here to check flags early).
        training_defaults: training settings that differ for this family, applied below a
            recipe's own values and the command line (FLUX: the distilled ``guidance_scale`` 3.5).
    """

    name: str
    pipeline: str
    class_names: tuple[str, ...]
    builder: str
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    denoiser: str = "suti.denoisers:UNetDenoiser"
    text_encoders: tuple[str, ...] = ("text_encoder",)
    objective: str = "diffusion"
    training_defaults: dict[str, Any] = field(default_factory=dict)

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)


#: The families the factory knows, by name. A folder whose ``_class_name`` is in none of them is
#: loaded as :data:`DEFAULT_FAMILY` (as before families existed).
FAMILIES: dict[str, Family] = {
    "sd": Family("sd", "StableDiffusionPipeline", SD_CLASSES, "suti.models:build_stable_diffusion",
                 {"safety_checker": None, "requires_safety_checker": False}),
    "sdxl": Family("sdxl", "StableDiffusionXLPipeline", SDXL_CLASSES, "suti.models:build_stable_diffusion",
                   text_encoders=("text_encoder", "text_encoder_2")),
    "flux": Family("flux", "FluxPipeline", FLUX_CLASSES, "suti.flux_presets:build_flux_pipeline", denoiser="suti.denoisers:FluxDenoiser",
                   objective="flow_matching", training_defaults={"guidance_scale": 3.5}),
}
DEFAULT_FAMILY = "sd"


def preset_family(preset: dict[str, Any]) -> Family:
    """The family of a preset: its ``family`` key, else ``sdxl`` when it has ``text_encoder_2``
    (the SDXL presets predate the key), else ``sd``.

    Raises:
        ModelLoadError: an unknown ``family``.
    """
    name = preset.get("family") or ("sdxl" if "text_encoder_2" in preset else DEFAULT_FAMILY)
    if name not in FAMILIES:
        raise ModelLoadError(f"preset {preset.get('name')!r}: unknown family {name!r}; families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def model_family(model: str) -> Family:
    """The family of a ``--model``: a preset's (:func:`preset_family`), else the folder's or hub
    id's ``model_index.json`` (:func:`folder_family`); :data:`DEFAULT_FAMILY` when that cannot be
    read (an unreachable hub id fails later, where it is loaded)."""
    if model in list_presets():
        return preset_family(load_preset(model))
    try:
        return folder_family(model)
    except Exception:  # noqa: BLE001 - a hub id offline, a folder without model_index.json
        return FAMILIES[DEFAULT_FAMILY]


def family_of_class(class_name: str) -> Family:
    """The family whose pipelines have this ``_class_name`` (:data:`DEFAULT_FAMILY` if none)."""
    for family in FAMILIES.values():
        if class_name in family.class_names:
            return family
    return FAMILIES[DEFAULT_FAMILY]


def folder_family(folder: str | Path, **kwargs) -> Family:
    """The family of a local pipeline folder or hub id, by its ``model_index.json``."""
    return family_of_class(_pipeline_class_name(folder, **kwargs))


def pipeline_family(pipe) -> Family:
    """The family of a loaded pipeline: by its class or a base class, else (a class no family
    lists, such as the apprentice's) SDXL when it has a second text encoder or ``text_time``
    added conditioning, else SD."""
    for cls in type(pipe).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ in family.class_names:
                return family
    unet = getattr(pipe, "unet", None)
    if getattr(pipe, "text_encoder_2", None) is not None or getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time":
        return FAMILIES["sdxl"]
    return FAMILIES[DEFAULT_FAMILY]


def is_sdxl_preset(preset: dict[str, Any]) -> bool:
    """Whether a preset describes a Stable Diffusion XL-class model (:func:`preset_family`)."""
    return preset_family(preset).name == "sdxl"


def is_sdxl(pipe) -> bool:
    """Whether ``pipe`` is SDXL-class: two CLIP text encoders and ``text_time`` added conditioning
    (``unet.config.addition_embed_type``), as in diffusers' ``StableDiffusionXLPipeline``; a FLUX
    pipeline (whose ``text_encoder_2`` is T5) is not."""
    return pipeline_family(pipe).name == "sdxl"


def resolve(target: str):
    """The function or class named by ``module:name`` (a family's builder or denoiser)."""
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def build_random_pipeline(preset: dict[str, Any]):
    """Build a seeded random-weight pipeline from a preset's configs, with its family's builder
    (:func:`build_stable_diffusion` for SD and SDXL, :func:`suti.flux_presets.build_flux_pipeline`
    for FLUX)."""
    return resolve(preset_family(preset).builder)(preset)


def build_stable_diffusion(preset: dict[str, Any]):
    """Build a seeded random-weight SD or SDXL pipeline from a preset's configs.

    Returns a ``StableDiffusionPipeline``, or a ``StableDiffusionXLPipeline`` for an ``sdxl``
    preset (``text_encoder_2``: a ``CLIPTextModelWithProjection`` whose pooled output feeds the
    U-Net's ``text_time`` add_embeds; SDXL section 2.2, diffusers' ``StableDiffusionXLPipeline``).
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from suti.tokenizer import load_clip_tokenizer

    torch.manual_seed(int(preset.get("seed", 0)))
    unet = UNet2DConditionModel(**preset["unet"])
    vae = AutoencoderKL(**preset["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**preset["text_encoder"]))
    max_length = int(preset.get("tokenizer", {}).get("model_max_length", 77))
    tokenizer = load_clip_tokenizer(max_length)
    scheduler = DDIMScheduler(**preset["scheduler"])
    if is_sdxl_preset(preset):
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**preset["text_encoder_2"]))
        return StableDiffusionXLPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=tokenizer, tokenizer_2=load_clip_tokenizer(max_length), scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def cached_build(folder: Path, build, marker: str = "model_index.json") -> Path:
    """``folder`` once it holds ``marker``; else ``build(tmp)`` writes a temp folder beside it
    that is renamed into place. Safe across processes (a file lock); a failed or interrupted
    build leaves nothing behind, so the next call builds again."""
    from filelock import FileLock

    folder = Path(folder)
    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / marker).is_file():
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            build(tmp)
            from suti.storage import umask_modes

            umask_modes(tmp)  # mkdtemp's 0o700 would hide the cache from other users
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


def preset_folder(name: str) -> Path:
    """Folder of a cached preset, building and saving it on first use (safe across processes)."""
    preset = load_preset(name)
    folder = cache_dir() / "models" / f"{name}-{preset_fingerprint(preset)}"

    def build(tmp: Path) -> None:
        source = preset.get("source", "random")
        if source == "random":
            log.info("building preset %r (random weights, seed %s) into %s", name, preset.get("seed", 0), folder)
            build_random_pipeline(preset).save_pretrained(tmp, safe_serialization=True)
        elif source == "builder":
            log.info("building preset %r with %s into %s", name, preset["builder"], folder)
            resolve(preset["builder"])(preset, tmp)
        else:
            raise ModelLoadError(f"preset {name!r}: unknown source {source!r}")

    return cached_build(folder, build)


def _pipeline_class_name(folder: str | Path, **kwargs) -> str:
    """``_class_name`` of a local pipeline folder's or hub id's ``model_index.json``."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        from huggingface_hub import hf_hub_download

        index = Path(hf_hub_download(str(folder), "model_index.json", local_files_only=kwargs.get("local_files_only", False)))
    return json.loads(index.read_text()).get("_class_name", "StableDiffusionPipeline")


def _from_folder(folder: str | Path, **kwargs):
    """Load a pipeline folder or hub id with its family's class (:func:`folder_family`: SD
    1.x/2.x, SDXL or FLUX, chosen by its ``model_index.json``)."""
    family = folder_family(folder, **kwargs)
    return family.pipeline_class().from_pretrained(str(folder), use_safetensors=True, **family.load_kwargs, **kwargs)


def _load_cached_preset(model: str, kwargs: dict):
    """Load a preset from its cache folder; a cache left broken (a cut weight file from a killed
    build or a full disk) is rebuilt once, with a warning naming it."""
    from suti.weights import check_weight_folder, loading

    folder = preset_folder(model)
    try:
        with loading(folder):
            check_weight_folder(folder)
            return _from_folder(folder, **kwargs)
    except ModelLoadError as exc:
        log.warning("%s: the cached preset %r does not load (%s); rebuilding it", folder, model, exc)
        shutil.rmtree(folder, ignore_errors=True)
    folder = preset_folder(model)
    with loading(f"{folder} (the rebuilt preset {model!r})"):
        check_weight_folder(folder)
        return _from_folder(folder, **kwargs)


def _hub_help(model: str) -> str:
    return (
        f"could not load model {model!r}: it is neither a preset ({', '.join(list_presets())}) nor a "
        f"local diffusers folder, and the Hugging Face hub is not reachable (or has no such model). "
        f"Download it on a machine with network access (`huggingface-cli download {model} "
        f"--local-dir DIR`, or `pipe.save_pretrained(DIR)`), copy DIR here and pass `--model DIR`"
    )


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) forbids the network."""
    return os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "0")).lower() not in ("0", "", "false", "no")


def portable_model(model: str) -> str:
    """``model`` as another process finds it: a preset name unchanged (even if a folder of that
    name exists here, the preset wins, as in :func:`load_pipeline`), an existing local folder made
    absolute (Ray workers have other working directories), anything else unchanged."""
    from suti.storage import absolute_if_local

    return model if model in list_presets() else absolute_if_local(model)


#: A Hugging Face hub repository id: ``namespace/name`` (huggingface_hub's rule, without revisions).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_model(model: str, flag: str = "--model") -> None:
    """Refuse at once a ``model`` that :func:`load_pipeline` could never load, before a command
    writes or starts anything (instead of minutes of hub retries, or a job whose every expert
    fails): it must be a preset, an existing diffusers folder (with ``model_index.json``), or a
    hub id ``namespace/name`` (with ``HF_HUB_OFFLINE`` set: one in the local hub cache).

    Raises:
        InputError: naming ``flag``, the value and what it could have been.
    """
    from suti.errors import InputError

    if model in list_presets():
        return
    if storage.is_remote(str(model)):  # a pipeline folder on object storage
        storage.filesystem(str(model))  # a missing s3fs/gcsfs: exit 2 naming the extra
        if not storage.isfile(storage.join(str(model), "model_index.json")):
            raise InputError(f"{flag} {model}: no diffusers pipeline folder there (no model_index.json)")
        return
    path = storage.local_path(str(model))  # not remote here: a plain path or file:// URL
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise InputError(f"{flag} {model}: not a diffusers pipeline folder (no model_index.json)")
        return
    what = f"{flag} {model!r}: not a preset ({', '.join(list_presets())}), an existing diffusers folder or a hub id (namespace/name)"
    if "://" in str(model) or not _HUB_ID.match(str(model)):
        raise InputError(what)
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "model_index.json"), str):
            raise InputError(f"{flag} {model!r}: not a preset or a folder, and not in the local hub cache (HF_HUB_OFFLINE is set). {_hub_help(model).split('. ', 1)[1]}")


def local_model_folder(uri: str) -> Path:
    """The local folder of a pipeline at a storage URI (``s3://bucket/sd15``, ``file:///models/sd``):
    the folder itself when local, else a copy made once per machine in ``<suti cache>/remote``
    (:func:`suti.storage.cached_copy`: keyed by the URI and the objects' sizes and ETags or
    modification times, under a file lock), so that the nodes of a cluster without a shared
    filesystem each download it once, and again whenever an object there changes.

    Raises:
        ModelLoadError: nothing at ``uri`` (or its protocol's package is missing).
    """
    from suti.errors import SutiError

    try:
        return storage.cached_copy(uri, cache_dir() / "remote")
    except SutiError as exc:
        raise ModelLoadError(f"model {uri}: {exc}") from None


def load_pipeline(model: str, *, device: str | None = None, torch_dtype=None):
    """Load a ``StableDiffusionPipeline`` (SD 1.x/2.x), ``StableDiffusionXLPipeline`` (SDXL) or
    ``FluxPipeline`` (FLUX.1) for a preset name, local folder or hub id: the family
    (:data:`FAMILIES`) comes from the folder's ``model_index.json`` or the preset.

    Args:
        model: a preset name, a local diffusers folder, a folder at a storage URI (``s3://``,
            ``gs://``, ``file://``; :func:`local_model_folder`), or a hub id.
        device: move the pipeline there (``None``: leave it on the CPU).
        torch_dtype: load the weights in this dtype (``None``: float32).

    Raises:
        ModelLoadError: the model cannot be found or loaded; the message says what to do.
    """
    _quiet_loading()
    kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}  # diffusers >= 0.36 spelling of torch_dtype
    if "://" in str(model) and model not in list_presets():  # file:// or object storage: a local folder, downloaded once per machine
        model = str(local_model_folder(model))
    if model in list_presets():
        preset = load_preset(model)
        if preset.get("cache", True):
            pipe = _load_cached_preset(model, kwargs)
        else:
            pipe = build_random_pipeline(preset)
            if torch_dtype is not None:
                pipe = pipe.to(dtype=torch_dtype)
    elif Path(model).expanduser().exists():
        folder = Path(model).expanduser()
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
        from suti.weights import check_weight_folder, describe_load_error, quiet_library_errors

        check_weight_folder(folder)
        try:
            with quiet_library_errors():
                pipe = _from_folder(folder, **kwargs)
        except Exception as exc:  # diffusers/transformers raise many types for a bad folder
            raise ModelLoadError(f"{folder}: could not load the pipeline ({describe_load_error(exc)})") from None
    else:
        try:  # the local hub cache first, then the network unless HF_HUB_OFFLINE is set
            pipe = _from_folder(model, local_files_only=True, **kwargs)
        except Exception:
            if hub_offline():
                raise ModelLoadError(_hub_help(model)) from None
            try:
                pipe = _from_folder(model, **kwargs)
            except Exception:
                raise ModelLoadError(_hub_help(model)) from None
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def _quiet_loading() -> None:
    """Silence the per-component loading bars of diffusers and transformers (we log instead)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
