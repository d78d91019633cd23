"""Loading weight files with errors that name the file and say what is wrong.

Every place that loads weights (experts, LoRA adapters, the apprentice, the world models,
scoring backbones, training checkpoints) goes through :func:`check_safetensors` /
:func:`check_weight_folder` before handing a file to torch, safetensors or diffusers, and wraps
the load in :func:`loading`, so an interrupted copy, a wrong base model or a corrupt checkpoint
becomes one :class:`~suti.errors.ModelLoadError` line instead of a library traceback.

Checks (safetensors format: 8-byte little-endian header length, a JSON header mapping tensor
names to ``dtype``/``shape``/``data_offsets``, then the data; see
https://github.com/huggingface/safetensors#format):

* ``FILE: not a complete safetensors file (...)``: the file is shorter than its header says,
  the header is cut or not JSON (an interrupted copy or download);
* ``FILE: shapes do not fit the model (...)``: a ``size mismatch`` from ``load_state_dict``.
"""

from __future__ import annotations

import json
import re
import struct
from contextlib import contextmanager
from pathlib import Path

from suti.errors import ModelLoadError, SutiError

_MAX_HEADER = 100 * 1024 * 1024
_MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape (torch\.Size\(\[[\d, ]*\]\)) from checkpoint, the shape in current model is (torch\.Size\(\[[\d, ]*\]\))")


def safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file, after checking that the file is complete.

    Raises:
        ModelLoadError: ``PATH: not a complete safetensors file (why)``, or ``PATH: no such file``.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{path}: not a complete safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ModelLoadError(f"{path}: not a complete safetensors file (header of {n} bytes, "
                                     f"file of {size} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such weight file") from None
    except (ValueError, UnicodeDecodeError):
        raise ModelLoadError(f"{path}: not a complete safetensors file (unreadable header)") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the weight file ({exc.strerror or exc})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: not a complete safetensors file (header is not an object)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise ModelLoadError(f"{path}: not a complete safetensors file (bad header entry {name!r})") from None
    if 8 + n + end > size:
        raise ModelLoadError(f"{path}: not a complete safetensors file ({size} of {8 + n + end} bytes)")
    return header


def check_safetensors(path: str | Path) -> Path:
    """Raise :class:`ModelLoadError` unless ``path`` is a complete safetensors file; returns it."""
    safetensors_header(path)
    return Path(path)


def check_weight_folder(folder: str | Path) -> Path:
    """Check every ``*.safetensors`` under a model folder (a diffusers pipeline, an adapter)."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*.safetensors")):
        check_safetensors(path)
    return folder


def describe_load_error(exc: BaseException) -> str:
    """One line for a library's loading error: the first shape mismatch, or the first line."""
    text = str(exc)
    mismatches = _MISMATCH.findall(text)
    if mismatches:
        name, got, want = mismatches[0]
        more = f" and {len(mismatches) - 1} more" if len(mismatches) > 1 else ""
        return f"shapes do not fit the model: {name} is {got[11:-1]} in the file, {want[11:-1]} in the model{more}"
    if "size mismatch" in text:
        return "shapes do not fit the model"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return first if len(first) <= 300 else first[:297] + "..."


def is_shape_mismatch(exc: BaseException) -> bool:
    """Whether a loading error says the weights' shapes do not fit the model."""
    text = str(exc)
    return "size mismatch" in text or "shape" in text.lower() and "mismatch" in text.lower()


@contextmanager
def quiet_library_errors():
    """Keep diffusers/transformers from logging a loading error we re-raise as one line.

    (diffusers' ``load_lora_weights`` logs the full ``size mismatch`` list at ERROR level
    before raising.)
    """
    import diffusers
    import transformers

    old = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity(diffusers.utils.logging.CRITICAL)
    transformers.utils.logging.set_verbosity(transformers.utils.logging.CRITICAL)
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(old[0])
        transformers.utils.logging.set_verbosity(old[1])


@contextmanager
def loading(what: str | Path):
    """Turn any library error raised while loading ``what`` into one :class:`ModelLoadError` line.

    ``SutiError`` passes through unchanged; ``KeyboardInterrupt``/``SystemExit`` too.
    """
    try:
        yield
    except SutiError:
        raise
    except Exception as exc:  # torch, safetensors, diffusers and peft raise many types
        raise ModelLoadError(f"{what}: could not load the weights ({describe_load_error(exc)})") from None


def read_json_file(path: str | Path) -> dict:
    """A JSON object from a model's config file (``ModelLoadError`` naming it otherwise)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: not a JSON object")
    return data
