"""The apprentice: a U-Net with demonstration-attention layers that generates a new subject in
context from 1-8 (image, caption) demonstrations, without tuning (SuTI).

>>> from apprentice import ApprenticePipeline
>>> pipe = ApprenticePipeline.from_pretrained("my-apprentice")
>>> pipe("a photo in the snow", demo_images=[...], demo_captions=[...]).images

The names below are imported lazily (PEP 562), so importing :mod:`apprentice` or any of its
command-line modules does not pull in torch or diffusers until a model is actually used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ApprenticePipeline": "apprentice.pipeline",
    "DemoAttentionAdapter": "apprentice.adapter",
    "DemoAttnProcessor": "apprentice.attention",
    "DemoContext": "apprentice.attention",
    "PassthroughProcessor": "apprentice.attention",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'apprentice' has no attribute {name!r}")
