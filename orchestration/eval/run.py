"""``suti eval``: generate (resumably) with a method and score it with the DreamBench metrics.

Layout of a results folder::

    settings.json           method, model, backbones, prompts, seeds (and the PRES/DIV definitions),
                            every value as resolved (``dtype``, the number of prompts used), and
                            ``images_key``: what made the images (below)
    images/<subject>/p{prompt:02d}_{k}.png      generated images (existing ones are never redone)
    experts/<subject>/      DreamBooth experts (method expert), reused when present
    per_image.csv|json      one row per image: subject, prompt, DINO, CLIP-I, CLIP-T (+ probe)
    per_subject.csv|json    means per subject, plus PRES and DIV where defined
    overall.csv|json        means over subjects
    grids/<subject>.png     real photos on top, one row per prompt

Reuse: one results folder holds the images of one set of settings. Rerunning into it reuses its
images and experts (and a ``world:N`` dataset written there) only when everything that made them
is the same (:func:`images_key`): the method, the model (its fingerprint: preset content, a
folder's files, an object store's ETags), the apprentice (its weights), the seed, ``--sample-steps``,
``--guidance-scale``, the resolved ``--dtype``, ``--num-demos``, the expert's fully resolved
training config (``--recipe`` content, ``--expert-steps``, ``--num-class-images``), ``--dataset``
(for ``world:N`` the spec) and, per subject, its class, its prompt templates and (apprentice,
expert) the photo contents. Otherwise the run is refused before anything is written, with one
line naming each setting that differs: a folder is a record of one experiment, and silently
scoring one method's table on another's images (or rewriting its images) would lose that
record. What only chooses *which* images are made or how they are scored may change between
runs: ``--subjects``, ``--prompts``, ``--images-per-prompt`` (more are added, fewer are scored),
``--clip``/``--dino`` and ``--sample-batch-size`` (images do not depend on it, up to float
rounding). The device is not keyed beyond the dtype it implies (CPU and GPU float32 images differ
only by float rounding).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from suti.errors import InputError, ModelLoadError, OutputExistsError
from orchestration.eval.dataset import EvalDataset, EvalSubject, load_dataset
from orchestration.eval.metrics import diversity, mean_cosine_to_set, paired_cosine
from suti import storage
from suti.fingerprint import describe_differences, differences, digest, file_digest
from suti.images import load_cached_image, load_image, save_image_atomic

log = logging.getLogger(__name__)

METHODS = ("expert", "apprentice", "base", "real")
# Published DreamBench numbers (DreamBooth Table 1; SuTI Table 1), reported as published.
PUBLISHED = [
    ("Real images (published)", 0.774, 0.885, None),
    ("DreamBooth, Imagen (published)", 0.696, 0.812, 0.306),
    ("DreamBooth, Stable Diffusion (published)", 0.668, 0.803, 0.305),
    ("Textual Inversion, SD (published)", 0.569, 0.780, 0.255),
    ("Re-Imagen (published)", 0.600, 0.740, 0.270),
    ("SuTI (published)", 0.741, 0.819, 0.304),
]
REAL_BACKBONES = {"clip": "openai-clip-vit-b-32", "dino": "dino-vits16"}
TOY_BACKBONES = {"clip": "toy-clip", "dino": "toy-identity"}


def resolve_backbones(clip: str, dino: str) -> tuple[dict[str, str], object, object]:
    """Scorers by name; ``auto`` tries the real backbones and falls back to the world's."""
    from suti.scoring import get_scorer

    chosen = {}
    scorers = {}
    for kind, name in (("clip", clip), ("dino", dino)):
        candidates = [REAL_BACKBONES[kind], TOY_BACKBONES[kind]] if name == "auto" else [name]
        last = None
        for cand in candidates:
            try:
                scorers[kind] = get_scorer(cand)
                chosen[kind] = cand
                break
            except ModelLoadError as exc:
                last = exc
                log.warning("backbone %s unavailable (%s); trying the next", cand, exc)
        if kind not in scorers:
            raise last
    return chosen, scorers["clip"], scorers["dino"]


def _prompt_for(template: str, identifier: str | None, class_noun: str) -> str:
    text = template.replace("{class}", class_noun)
    return text.replace("{V}", identifier) if identifier else text.replace("{V} ", "").replace("{V}", "")


class Generator:
    """Makes the images of one method for one subject (models loaded lazily, once)."""

    def __init__(self, method: str, model: str, apprentice: str, output: Path, args):
        self.method, self.model, self.apprentice, self.output, self.args = method, model, apprentice, output, args
        self._base = self._app = None

    def prepare(self, subject: EvalSubject):
        """Load or train what the subject needs; returns (callable(prompt, seeds) -> images, identifier).

        The callable makes one image per seed in one pipeline call (image ``i`` from its own
        generator, :func:`suti.sampling.seeded_generators`: the images of one call per seed, up to
        float rounding).
        """
        from suti.models import default_device, default_resolution, load_pipeline
        from suti.sampling import check_prompt, resolve_dtype, seeded_generators

        steps, guidance = self.args.sample_steps, self.args.guidance_scale
        dtype_name = getattr(self.args, "dtype", None)
        device = default_device()
        dtype = resolve_dtype(dtype_name, device)
        if self.method == "base":
            self._base = self._base or load_pipeline(self.model, device=device, torch_dtype=dtype)
            res = default_resolution(self.model)
            base = self._base

            def make_base(p, seeds):
                check_prompt(base.tokenizer, p)
                return base([p] * len(seeds), height=res, width=res, num_inference_steps=steps, guidance_scale=guidance, generator=seeded_generators(seeds)).images

            return make_base, None
        if self.method == "apprentice":
            from apprentice.sample import load_apprentice

            self._app = self._app or load_apprentice(self.apprentice, device=device, dtype=dtype_name)
            demos = [load_image(p) for p in subject.images[: self.args.num_demos]]
            captions = [f"a {subject.class_noun}"] * len(demos)
            ctx = self._app.encode_demonstrations(demos, captions)
            return (lambda p, seeds: self._app(p, num_images=len(seeds), demo_context=ctx, num_inference_steps=steps, guidance_scale=guidance, generator=seeded_generators(seeds)).images), None
        if self.method == "expert":
            from experts import load_expert, resolve_config
            from experts.expert import ExpertInfo
            from experts.train import train_expert

            folder = self.output / "experts" / subject.name
            if not (folder / "expert.json").is_file():
                instance = self.output / "experts" / f"{subject.name}-photos"
                instance.mkdir(parents=True, exist_ok=True)
                for p in subject.images:
                    storage.write_bytes(instance / p.name, p.read_bytes())
                train_expert(resolve_config(self.args.recipe, expert_overrides(self.args, subject.class_noun, str(instance))), folder, overwrite=True, progress=False)
            info = ExpertInfo.read(folder)
            pipe = load_expert(folder, device=device, torch_dtype=dtype)
            pipe.set_progress_bar_config(disable=True)
            res = info.resolution

            def make_expert(p, seeds):
                check_prompt(pipe.tokenizer, p, identifier=info.identifier)
                return pipe([p] * len(seeds), height=res, width=res, num_inference_steps=steps, guidance_scale=guidance, generator=seeded_generators(seeds)).images

            return make_expert, info.identifier
        raise InputError(f"unknown method {self.method!r}")


def check_args(args) -> None:
    """Every check of the command line that needs no data, before anything is written.

    Raises:
        InputError: an unknown method, a sampler number out of range, ``--prompts``,
            ``--num-demos`` or ``--expert-steps`` below 1, an unknown dtype, or a model that
            cannot be loaded (:func:`suti.models.check_model`).
    """
    if args.method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}")
    from suti.sampling import check_sampler_args, resolve_dtype

    check_sampler_args(steps=args.sample_steps, num_images=args.images_per_prompt, guidance_scale=args.guidance_scale, seed=args.seed, sample_batch_size=getattr(args, "sample_batch_size", None),
                       flags={"steps": "--sample-steps", "num_images": "--images-per-prompt", "guidance_scale": "--guidance-scale", "seed": "--seed", "sample_batch_size": "--sample-batch-size"})
    resolve_dtype(getattr(args, "dtype", None))
    for flag, value in (("--prompts", getattr(args, "prompts", None)), ("--num-demos", getattr(args, "num_demos", None)), ("--expert-steps", getattr(args, "expert_steps", None))):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be at least 1 (got {value}){'; leave it out for all prompts' if flag == '--prompts' else ''}")
    if args.method in ("base", "expert"):
        from suti.models import check_model

        check_model(args.model)
    if args.method == "apprentice" and args.apprentice != "toy" and not (Path(args.apprentice) / "model_index.json").is_file():
        raise InputError(f"--apprentice {args.apprentice}: not an apprentice folder (no model_index.json)")  # before the dataset and images are written
    from suti.scoring import SCORERS

    for flag, name in (("--clip", getattr(args, "clip", "auto")), ("--dino", getattr(args, "dino", "auto"))):
        if name != "auto" and name not in SCORERS:
            raise InputError(f"{flag} {name!r}: unknown scorer; known: auto, {', '.join(SCORERS)}")


#: The entries of :func:`images_key` by the flag a user knows them by (for the refusal's line).
KEY_FLAGS = {"method": "--method", "model": "--model", "apprentice": "--apprentice", "seed": "--seed", "sample_steps": "--sample-steps",
             "guidance_scale": "--guidance-scale", "dtype": "--dtype", "num_demos": "--num-demos", "dataset": "--dataset",
             "expert.steps": "--expert-steps", "expert.num_class_images": "--num-class-images", "expert.recipe": "--recipe"}
#: Bumped whenever :func:`images_key` gains an entry, so an older key is never taken as equal.
KEY_VERSION = 1


def expert_overrides(args, class_noun: str, instance_dir: str) -> dict:
    """The settings given to a subject's expert on top of ``--recipe`` (``None`` values: the recipe's)."""
    return dict(model=args.model, instance_dir=instance_dir, class_noun=class_noun, steps=args.expert_steps,
                seed=args.seed, num_class_images=args.num_class_images)


def dataset_spec(args) -> str:
    """``world:N`` for the synthetic world (N resolved), ``folder`` for a DreamBench folder (whose
    content is keyed per subject, wherever it lives)."""
    spec = str(getattr(args, "dataset_spec", None) or args.dataset)
    if not spec.startswith("world"):
        return "folder"
    count = spec.split(":", 1)[1] if ":" in spec else "8"
    return f"world:{int(count) if count.strip().isdigit() else count}"


def resolved_dtype(args) -> str:
    """The dtype the images are sampled in (``--dtype``, else fp16 on CUDA and fp32 on CPU)."""
    from suti.models import default_device
    from suti.sampling import resolve_dtype

    return str(resolve_dtype(getattr(args, "dtype", None), default_device())).replace("torch.", "")


def apprentice_fingerprint(value: str) -> str:
    """What identifies ``--apprentice``: ``toy`` by the toy preset and the shipped adapter files'
    content; a folder by its files' sizes and modification times."""
    from suti.models import load_preset, preset_fingerprint

    if value == "toy":
        from apprentice.toy import WEIGHTS

        files = sorted(p for p in WEIGHTS.rglob("*") if p.is_file()) if WEIGHTS.is_dir() else []
        return f"toy:{preset_fingerprint(load_preset('toy'))}:{file_digest(files)}"
    if Path(value).expanduser().exists():
        return f"folder:{Path(value).expanduser().resolve()}:{storage.fingerprint(str(Path(value).expanduser().resolve()))}"
    return value


def expert_settings(args) -> dict:
    """The experts' training config, resolved as :func:`experts.train.train_expert` gets it, less
    the per-subject parts (model given as its fingerprint in the key, instance folder, class)."""
    from experts import resolve_config

    resolved = resolve_config(args.recipe, expert_overrides(args, "{class}", "")).to_dict()
    return {k: v for k, v in resolved.items() if k not in ("model", "instance_dir", "class_noun")}


def subject_key(dataset: EvalDataset, subject: EvalSubject, method: str, num_demos: int) -> dict:
    """What of the dataset makes a subject's images: its class, its prompt templates and, for the
    methods that see them, the content of its photos (the apprentice's first ``num_demos``)."""
    out = {"class": subject.class_noun, "templates": digest(dataset.prompts_for(subject))}
    if method in ("apprentice", "expert"):
        out["photos"] = file_digest(subject.images[:num_demos] if method == "apprentice" else subject.images)
    return out


def images_key(args, dataset: EvalDataset | None) -> dict:
    """Everything that makes a results folder's images and experts (module docstring), resolved;
    ``subjects`` only when ``dataset`` is given."""
    from suti.models import model_fingerprint

    key = {"version": KEY_VERSION, "method": args.method, "dataset": dataset_spec(args)}
    if args.method == "real":
        return {**key, "seed": args.seed} if key["dataset"] != "folder" else key  # the world's photos depend on it
    key.update(seed=args.seed, sample_steps=args.sample_steps, guidance_scale=float(args.guidance_scale), dtype=resolved_dtype(args))
    if args.method in ("base", "expert"):
        key["model"] = model_fingerprint(args.model)
    if args.method == "apprentice":
        key.update(apprentice=apprentice_fingerprint(args.apprentice), num_demos=args.num_demos)
    if args.method == "expert":
        key["expert"] = expert_settings(args)
    if dataset is not None:
        key["subjects"] = {s.name: subject_key(dataset, s, args.method, args.num_demos) for s in dataset.subjects}
    return key


def _has_cached_outputs(output: Path) -> bool:
    """Whether ``output`` holds generated images or experts."""
    return any(p.is_file() for d in ("images", "experts") for p in (output / d).rglob("*"))


def key_differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """The entries that differ between a recorded key and this run's; subjects are compared only
    where both runs have them (``--subjects`` may change), and not at all without this run's.
    Another method is named without the entries that only one of the two methods has."""
    diffs = differences({k: v for k, v in old.items() if k != "subjects"}, {k: v for k, v in new.items() if k != "subjects"})
    if "subjects" in new:
        old_subjects = old.get("subjects") or {}
        for name in sorted(set(old_subjects) & set(new["subjects"])):
            diffs += differences(old_subjects[name], new["subjects"][name], f"subjects.{name}")
    if any(name == "method" for name, _, _ in diffs):  # entries only one method has follow from it
        diffs = [d for d in diffs if d[1] is not None and d[2] is not None]
    return diffs


def check_reuse(args, dataset: EvalDataset | None) -> dict:
    """This run's :func:`images_key`, after refusing an ``--output`` whose cached images,
    experts or world dataset were made with other settings. Writes nothing.

    Raises:
        OutputExistsError: one line naming each setting that differs (and the folder).
    """
    output = Path(args.output)
    key = images_key(args, dataset)
    path = output / "settings.json"
    if not path.is_file():
        if _has_cached_outputs(output):
            raise OutputExistsError(f"--output {output}: holds images or experts but no settings.json, so what made them is unknown; use another --output")
        return key
    try:
        old = json.loads(path.read_text()).get("images_key")
    except (json.JSONDecodeError, AttributeError):
        raise InputError(f"{path}: not a settings file of suti eval (not JSON); use another --output") from None
    cached = _has_cached_outputs(output) or (key["dataset"] != "folder" and (output / "dataset").is_dir())
    if not cached:
        return key
    if old is None:
        raise OutputExistsError(f"--output {output}: its images were made by an older suti that did not record their settings; use another --output")
    diffs = key_differences(old, key)
    if diffs:
        names = {n: _flag_name(n) for n, _, _ in diffs}
        raise OutputExistsError(f"--output {output}: its images were made with other settings ({describe_differences(diffs, names)}); "
                                f"use another --output, or delete {output / 'images'} and {output / 'experts'} to make them again")
    return key


def _flag_name(entry: str) -> str:
    """How the refusal names a key entry: its flag (``--sample-steps``), ``--recipe <field>`` for
    another expert setting, ``--dataset subject <name> <what>`` for a subject's data."""
    if entry in KEY_FLAGS:
        return KEY_FLAGS[entry]
    if entry.startswith("subjects."):
        name, what = entry.split(".", 1)[1].rsplit(".", 1)
        return f"--dataset subject {name} {what}"
    return f"--recipe {entry.split('.', 1)[1]}" if entry.startswith("expert.") else entry


def prompts_used(args, dataset: EvalDataset) -> int | dict[str, int]:
    """How many prompt templates each subject gets (``--prompts``, else all of its list): one
    number, or one per subject where their lists differ in length."""
    counts = {s.name: len(dataset.prompts_for(s)[: args.prompts or None]) for s in dataset.subjects}
    return counts[dataset.subjects[0].name] if len(set(counts.values())) == 1 else counts


def run_eval(args) -> dict:
    """Run the protocol; writes the results folder and returns the overall row."""
    from suti.sampling import DEFAULT_SAMPLE_BATCH_SIZE, batches

    check_args(args)
    subjects = [s for s in args.subjects.split(",")] if args.subjects else None
    dataset = load_dataset(args.dataset, subjects)
    output = Path(args.output)
    key = check_reuse(args, dataset)  # before anything is written
    backbones, clip, dino = resolve_backbones(args.clip, args.dino)
    output.mkdir(parents=True, exist_ok=True)
    settings = {
        "dataset": str(Path(args.dataset).resolve()), "dataset_spec": getattr(args, "dataset_spec", None), "method": args.method, "model": args.model, "apprentice": args.apprentice,
        "subjects": [s.name for s in dataset.subjects], "prompts": prompts_used(args, dataset), "images_per_prompt": args.images_per_prompt,
        "seed": args.seed, "sample_steps": args.sample_steps, "guidance_scale": args.guidance_scale, "dtype": resolved_dtype(args), "backbones": backbones,
        "num_demos": args.num_demos if args.method == "apprentice" else None, "images_key": key,
        "metrics": {"CLIP-I": "mean cosine of CLIP image embeddings, generated vs each real photo", "CLIP-T": "cosine of CLIP image and prompt (identifier removed) embeddings", "DINO": "mean cosine of DINO embeddings, generated vs each real photo", "PRES": "mean DINO cosine of images generated for 'a [class]' to the real photos (expert only; lower is better)", "DIV": "1 - mean pairwise DINO cosine among images of the same prompt (embedding-based, not LPIPS)"},
    }
    storage.write_text(output / "settings.json", json.dumps(settings, indent=2))

    rows, per_subject = [], []
    generated = 0
    batch = getattr(args, "sample_batch_size", None) or DEFAULT_SAMPLE_BATCH_SIZE  # images per pipeline call
    started = time.perf_counter()
    gen = Generator(args.method, args.model, args.apprentice, output, args) if args.method != "real" else None
    probe_world = _world_probe(dataset)
    for si, subject in enumerate(dataset.subjects):
        real = [load_image(p) for p in subject.images]
        real_clip, real_dino = clip.embed_images(real), dino.embed_images(real)
        if args.method == "real":
            images, prompts, entries = real, [f"a {subject.class_noun}"] * len(real), [(None, i, p.name) for i, p in enumerate(subject.images)]
        else:
            templates = dataset.prompts_for(subject)[: args.prompts or None]
            folder = output / "images" / subject.name
            folder.mkdir(parents=True, exist_ok=True)
            # cached outputs are reused; a missing one or one that does not decode (a killed
            # run, a full disk) is regenerated, with a warning naming it
            cache = {f"p{pi:02d}_{k}.png": load_cached_image(folder / f"p{pi:02d}_{k}.png") for pi in range(len(templates)) for k in range(args.images_per_prompt)}
            todo = [(pi, k) for pi in range(len(templates)) for k in range(args.images_per_prompt) if cache[f"p{pi:02d}_{k}.png"] is None]
            make, identifier = (None, None)
            if todo:
                make, identifier = gen.prepare(subject)
            # one pipeline call per prompt and up to --sample-batch-size of its images
            chunks = [c for pi in sorted({pi for pi, _ in todo}) for c in batches([t for t in todo if t[0] == pi], batch)]
            with tqdm(total=len(todo), desc=f"{subject.name} ({si + 1}/{len(dataset.subjects)})", unit="img", disable=not todo) as bar:
                for chunk in chunks:
                    pi = chunk[0][0]
                    images = make(_prompt_for(templates[pi], identifier, subject.class_noun), [args.seed + 1000 * pi + k for _, k in chunk])
                    for (_, k), image in zip(chunk, images):
                        save_image_atomic(image, folder / f"p{pi:02d}_{k}.png")
                        cache[f"p{pi:02d}_{k}.png"] = image.convert("RGB")
                        generated += 1
                        bar.update(1)
            if args.method == "expert":  # PRES: the expert on the bare class prompt
                pres_todo = [k for k in range(args.images_per_prompt) if load_cached_image(folder / f"pres_{k}.png") is None]
                if pres_todo and make is None:
                    make, identifier = gen.prepare(subject)
                for chunk in batches(pres_todo, batch):
                    for k, image in zip(chunk, make(f"a {subject.class_noun}", [args.seed + 999_000 + k for k in chunk])):
                        save_image_atomic(image, folder / f"pres_{k}.png")
                        generated += 1
            entries = [(pi, k, f"p{pi:02d}_{k}.png") for pi in range(len(templates)) for k in range(args.images_per_prompt)]
            images = [cache[name] for _, _, name in entries]
            prompts = [_prompt_for(templates[pi], None, subject.class_noun) for pi, _, _ in entries]
        gen_clip, gen_dino = clip.embed_images(images), dino.embed_images(images)
        text = clip.embed_texts(prompts)
        exclude = args.method == "real"
        clip_i = mean_cosine_to_set(gen_clip, real_clip, exclude_self=exclude)
        dino_s = mean_cosine_to_set(gen_dino, real_dino, exclude_self=exclude)
        clip_t = paired_cosine(gen_clip, text)
        probe_rows = probe_world(subject, images) if probe_world else [{}] * len(images)
        subject_rows = []
        for (pi, k, name), p, a, b, c, extra in zip(entries, prompts, dino_s.tolist(), clip_i.tolist(), clip_t.tolist(), probe_rows):
            row = {"subject": subject.name, "class": subject.class_noun, "prompt_index": pi, "image": name, "prompt": p, "DINO": a, "CLIP-I": b, "CLIP-T": c, **extra}
            rows.append(row)
            subject_rows.append(row)
        summary = {"subject": subject.name, "class": subject.class_noun, "images": len(subject_rows), **_means(subject_rows)}
        if args.method != "real":
            by_prompt: dict = {}
            for row, emb in zip(subject_rows, gen_dino):
                by_prompt.setdefault(row["prompt_index"], []).append(emb)
            divs = [diversity(torch.stack(v)) for v in by_prompt.values() if len(v) > 1]
            summary["DIV"] = sum(divs) / len(divs) if divs else float("nan")
        if args.method == "expert":
            pres = [im for im in (load_cached_image(p) for p in sorted((output / "images" / subject.name).glob("pres_*.png"))) if im is not None]
            summary["PRES"] = float(mean_cosine_to_set(dino.embed_images(pres), real_dino).mean()) if pres else float("nan")
        per_subject.append(summary)
    overall = {"method": args.method, "subjects": len(per_subject), "images": len(rows), **_means(per_subject, keys=[k for k in per_subject[0] if k not in ("subject", "class", "images")])}
    for name, data in (("per_image", rows), ("per_subject", per_subject), ("overall", [overall])):
        _write_table(output / name, data)
    _grids(dataset, output, args)
    overall["generated_now"] = generated
    overall["seconds"] = round(time.perf_counter() - started, 1)
    print_table(overall, backbones)
    print(f"generated {generated} new images; results in {output}")
    return overall


def _means(rows: list[dict], keys: list[str] | None = None) -> dict:
    keys = keys or [k for k in rows[0] if isinstance(rows[0][k], float)]
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float)) and not math.isnan(r[k])]
        out[k] = round(sum(vals) / len(vals), 6) if vals else float("nan")
    return out


def json_safe(value):
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON has no NaN: a metric
    that is undefined, such as DIV with one image per prompt, is ``null``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _write_table(stem: Path, rows: list[dict]) -> None:
    storage.write_text(stem.with_suffix(".json"), json.dumps(json_safe(rows), indent=2, allow_nan=False))
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(stem.with_suffix(".csv"), buf.getvalue())


def _grids(dataset: EvalDataset, output: Path, args) -> None:
    folder = output / "grids"
    folder.mkdir(exist_ok=True)
    cell = 96
    for subject in dataset.subjects:
        real = [load_image(p) for p in subject.images]
        rows = [real]
        gen_dir = output / "images" / subject.name
        if gen_dir.is_dir():
            by_prompt: dict = {}
            for p in sorted(gen_dir.glob("p[0-9]*_*.png")):
                image = load_cached_image(p)
                if image is not None:
                    by_prompt.setdefault(p.name.split("_")[0], []).append(image)
            rows += [by_prompt[k] for k in sorted(by_prompt)]
        width = max(len(r) for r in rows)
        grid = Image.new("RGB", (width * cell, len(rows) * cell), "white")
        for y, row in enumerate(rows):
            for x, img in enumerate(row):
                grid.paste(img.resize((cell, cell)), (x * cell, y * cell))
        save_image_atomic(grid, folder / f"{subject.name}.png")


def _world_probe(dataset: EvalDataset):
    """When the dataset is the synthetic world (``world_subjects.json`` beside it), the probe's
    per-image exact identity (all identity attributes right), share of identity attributes
    right, and class accuracy."""
    meta = dataset.root / "world_subjects.json"
    if not meta.is_file():
        return None
    from suti.world import Subject
    from suti.world.probe import load_probe

    subjects = {k: Subject(**v) for k, v in json.loads(meta.read_text()).items()}
    probe = load_probe()

    def score(subject: EvalSubject, images: list[Image.Image]) -> list[dict]:
        hits = probe.identity_hits(images, subjects[subject.name])  # one batched pass
        return [{"probe_identity": float(all(h.values())), "probe_attributes": float(np.mean(list(h.values()))),
                 "probe_class": float(h["class_name"])} for h in hits]

    return score


def print_table(overall: dict, backbones: dict) -> None:
    """The paper's table: published rows, then this run."""
    print(f"\n{'Method':48s} {'DINO':>7s} {'CLIP-I':>7s} {'CLIP-T':>7s}")
    for name, d, ci, ct in PUBLISHED:
        print(f"{name:48s} {d:7.3f} {ci:7.3f} {('%7.3f' % ct) if ct is not None else '    N/A'}")
    label = f"suti {overall['method']} (backbones: {backbones['dino']}, {backbones['clip']})"
    fmt = lambda v: "    N/A" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:7.3f}"  # noqa: E731
    print(f"{label:48s} {fmt(overall.get('DINO'))} {fmt(overall.get('CLIP-I'))} {fmt(overall.get('CLIP-T'))}")
    extra = {k: v for k, v in overall.items() if k in ("DIV", "PRES", "probe_identity", "probe_attributes", "probe_class")}
    if extra:
        print("  " + ", ".join(f"{k} {v:.3f}" for k, v in extra.items() if isinstance(v, float) and not math.isnan(v)))
