"""The synthetic world as a DreamBench-layout dataset (the offline second source of ``suti eval``).

``world:N`` (N held-out subjects of the toy model's world) is written once into
``RESULTS/dataset``: one folder of 4-5 photos per subject, ``prompts_and_classes.txt`` with the
world's prompt templates (its contexts, colour edits, accessories and styles), and
``world_subjects.json`` so the probe can score exact identity accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

from suti import storage
from suti.errors import InputError

WORLD_PROMPTS = [
    "a {V} {class} on the beach", "a {V} {class} in the snow", "a {V} {class} in the jungle", "a {V} {class} in a city",
    "a {V} {class} on a wooden floor", "a {V} {class} on a blue carpet", "a {V} {class} on the grass", "a {V} {class} in front of a red brick wall",
    "a {V} {class} wearing a hat", "a {V} {class} wearing sunglasses", "a sketch of a {V} {class}", "a watercolor painting of a {V} {class}",
]


def world_dataset(spec: str, folder: Path, *, photos: int = 5, seed: int = 0) -> Path:
    """Write (or reuse) the world benchmark for ``spec`` = ``world`` or ``world:N``."""
    from suti.models import default_resolution, list_presets, load_preset
    from suti.world import export_subject, make_world

    count = spec.split(":", 1)[1] if ":" in spec else "8"
    if not count.strip().isdigit() or int(count) < 1:
        raise InputError(f"--dataset {spec}: world:N takes a whole number of subjects N >= 1, got {count!r}")
    n = int(count)
    if (folder / "world_subjects.json").is_file():
        return folder
    preset = load_preset("toy") if "toy" in list_presets() else {}
    world_cfg = preset.get("world", {"num_subjects": 64, "seed": 0})
    world = make_world(int(world_cfg["num_subjects"]), seed=int(world_cfg["seed"]))
    subjects = world.heldout_subjects[:n]
    if len(subjects) < n:
        raise InputError(f"{spec}: the world has only {len(subjects)} held-out subjects")
    folder.mkdir(parents=True, exist_ok=True)
    size = default_resolution("toy") if "toy" in list_presets() else 32
    rows = ["Classes", "", "subject_name,class"] + [f"{s.subject_id},{s.class_noun}" for s in subjects] + ["", "Prompts", "", "Object Prompts", "", "prompt_list = ["]
    rows += [f"'{t.replace('{V}', '{0}').replace('{class}', '{1}')}'.format(unique_token, class_token)," for t in WORLD_PROMPTS] + ["]", ""]
    for s in subjects:
        export_subject(world, s.subject_id, folder / s.subject_id, n=photos, seed=seed, size=size)
    storage.write_text(folder / "prompts_and_classes.txt", "\n".join(rows) + "\n")
    storage.write_text(folder / "world_subjects.json", json.dumps({s.subject_id: s.to_dict() for s in subjects}, indent=2))
    return folder
