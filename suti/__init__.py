"""suti: subject-driven text-to-image generation by apprenticeship learning (SuTI).

The shared foundation lives here: model presets and loading (:mod:`suti.models`), image I/O and
validation (:mod:`suti.images`), the CLIP tokenizer built offline (:mod:`suti.tokenizer`), the
synthetic world (:mod:`suti.world`) and the ``suti`` command line (:mod:`orchestration.cli`).
"""

__version__ = "0.1.0"
