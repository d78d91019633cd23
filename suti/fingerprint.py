"""Cache keys: small helpers shared by every place that reuses an earlier result.

A cached result (eval images, experts, class images, a downloaded model) may be reused only when
everything that made it is the same. Each place builds a JSON-able *key* (a dict) of those
settings; these helpers hash a key into a folder name (:func:`digest`), hash file contents
(:func:`file_digest`) and name the settings that differ between a recorded key and this run's
(:func:`differences`, :func:`describe_differences`), so a refused reuse says in one line why.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def digest(obj: Any, length: int = 16) -> str:
    """Short SHA-256 of ``obj`` as sorted JSON (non-JSON values by ``str``): a stable folder name."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def file_digest(paths: list[str | Path], length: int = 16) -> str:
    """Short SHA-256 of the files' names and contents, in the order given (what a photo set is,
    wherever it lives and whatever its modification times)."""
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        h.update(path.name.encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:length]


def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``[(dotted name, old value, new value)]`` of the leaves that differ between two keys
    (nested dicts are compared key by key; a key missing on one side is ``None`` there)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            out += differences(old.get(key), new.get(key), name)
        return out
    return [] if _same(old, new) else [(prefix, old, new)]


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON would store them (a tuple equals a list, 5 equals 5.0). A hub model
    recorded before it was downloaded (``hub:ID``, no revision known) is the same as the snapshot
    that the download then brought (``hub:ID@commit``, :func:`suti.models.model_fingerprint`)."""
    if isinstance(a, str) and isinstance(b, str) and a.startswith("hub:") and b.startswith("hub:") and "@" in a + b:
        return a.split("@")[0] == b.split("@")[0] and ("@" not in a or "@" not in b or a == b)
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str) or a == b


def describe_differences(diffs: list[tuple[str, Any, Any]], names: dict[str, str] | None = None, limit: int = 6) -> str:
    """One line: ``--method base there, apprentice now; --seed 0 there, 1 now`` (``names`` maps a
    key's dotted name to the flag a user knows it by; long values are cut)."""
    names = names or {}

    def show(value: Any) -> str:
        text = "unset" if value is None else str(value)
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [f"{names.get(n, n)} {show(a)} there, {show(b)} now" for n, a, b in diffs[:limit]]
    if len(diffs) > limit:
        parts.append(f"and {len(diffs) - limit} more")
    return "; ".join(parts)
