"""DreamBench-layout datasets: one folder of photos per subject + ``prompts_and_classes.txt``.

``prompts_and_classes.txt`` (as in google/dreambooth) has a ``subject_name,class`` table under
"Classes" and two Python-style ``prompt_list`` blocks ("Object Prompts", "Live Subject Prompts")
of ``'a {0} {1} in the jungle'.format(unique_token, class_token)`` lines. We turn them into
templates with ``{V}`` (identifier) and ``{class}`` placeholders.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from suti.errors import InputError
from suti.images import list_image_files, load_image

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = {"dog", "cat"}  # DreamBooth's live subjects
_PROMPT_RE = re.compile(r"""^\s*['"](.*)['"]\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""")

log = logging.getLogger(__name__)


@dataclass
class EvalSubject:
    """One subject of the benchmark."""

    name: str
    class_noun: str
    live: bool
    images: list[Path] = field(default_factory=list)


@dataclass
class EvalDataset:
    """Subjects and prompt templates (``{V}``, ``{class}``)."""

    root: Path
    subjects: list[EvalSubject]
    object_prompts: list[str]
    live_prompts: list[str]

    def prompts_for(self, subject: EvalSubject) -> list[str]:
        """The prompt templates of a subject (live or object list)."""
        return self.live_prompts if subject.live else self.object_prompts


def parse_prompts_and_classes(path: str | Path) -> tuple[dict[str, str], list[str], list[str]]:
    """Parse the file: returns (subject -> class noun, object templates, live templates)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing (a DreamBench-layout dataset needs {PROMPTS_FILE})")
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        low = line.lower()
        if low.startswith("object prompts"):
            section = "object"
            continue
        if low.startswith("live subject prompts"):
            section = "live"
            continue
        if low == "classes":
            section = "classes"
            continue
        if not line or low.startswith("prompt_list") or line in ("]", "prompts") or low == "subject_name,class":
            continue
        if section == "classes":
            if line.lower() == "prompts":
                section = None
                continue
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 2 or not all(parts):
                raise InputError(f"{path}:{n}: expected 'subject_name,class', got {raw!r}")
            classes[parts[0]] = parts[1]
        elif section in ("object", "live"):
            m = _PROMPT_RE.match(line)
            if not m:
                raise InputError(f"{path}:{n}: cannot parse prompt line {raw!r}")
            lists[section].append(m.group(1).replace("{0}", "{V}").replace("{1}", "{class}"))
    if not classes:
        raise InputError(f"{path}: no 'subject_name,class' rows under 'Classes'")
    if not lists["object"]:
        raise InputError(f"{path}: no object prompts")
    return classes, lists["object"], lists["live"] or lists["object"]


def load_dataset(root: str | Path, subjects: list[str] | None = None, validate_images: bool = True) -> EvalDataset:
    """Read a DreamBench-layout folder; ``subjects`` restricts to those names (in that order; a
    name given twice counts once, with a warning: ``--subjects dog,dog`` is one subject).

    Raises :class:`InputError` for a subject listed without a folder, a requested subject that is
    not listed, an empty folder or (with ``validate_images``) a bad image, naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such dataset folder")
    classes, objects, live = parse_prompts_and_classes(root / PROMPTS_FILE)
    names = list(dict.fromkeys(n.strip() for n in subjects if n.strip())) if subjects else sorted(classes)
    if subjects and len(names) < len(subjects):
        log.warning("--subjects %s: each subject counts once (%s)", ",".join(subjects), ",".join(names))
    out = []
    for name in names:
        if name not in classes:
            raise InputError(f"{root / PROMPTS_FILE}: subject {name!r} is not listed (known: {', '.join(sorted(classes))})")
        folder = root / name
        if not folder.is_dir():
            raise InputError(f"{folder}: missing subject folder (listed in {PROMPTS_FILE})")
        paths = list_image_files(folder)
        if validate_images:
            for p in paths:
                load_image(p)
        out.append(EvalSubject(name, classes[name], classes[name] in LIVE_CLASSES, paths))
    return EvalDataset(root, out, objects, live)
