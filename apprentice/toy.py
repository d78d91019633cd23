"""The ``toy`` apprentice: trained on the synthetic world by the main job's pipeline.

Its demonstration-attention weights ship in ``suti/world/weights/toy_apprentice/`` (the base is
the ``toy`` preset, frozen during its training). :func:`toy_apprentice_folder` assembles them
with the toy base into an :class:`~apprentice.pipeline.ApprenticePipeline` folder in the suti
cache (once). If they are missing (a source checkout without them), the error says how to train
one with the main job (``suti demo``: crawl, mining, photo shards, expert generation on Ray,
DeepSpeed training; about 15 minutes on a 2-core CPU).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

WEIGHTS = Path(__file__).resolve().parents[1] / "suti" / "world" / "weights" / "toy_apprentice"


def toy_apprentice_folder() -> Path:
    """Folder of the toy apprentice pipeline (built on first use, then cached)."""
    from suti.models import cache_dir, cached_build, load_preset, preset_fingerprint

    stamp = preset_fingerprint(load_preset("toy"))
    adapter_stamp = _adapter_stamp()
    folder = cache_dir() / "apprentices" / f"toy-{stamp}-{adapter_stamp}"

    def build(tmp: Path) -> None:
        if (WEIGHTS / "config.json").is_file():
            assemble(WEIGHTS, tmp)
            return
        from suti.errors import MissingInputError

        raise MissingInputError(
            f"{WEIGHTS}: the toy apprentice's weights are not shipped in this installation; train one with the main "
            "job (`suti demo --output DIR`, about 15 minutes on a CPU) and pass its apprentice folder (DIR/apprentice) instead of \"toy\"")

    return cached_build(folder, build)


def _adapter_stamp() -> str:
    """Short hash of the shipped adapter weights ("none" when not shipped), so new shipped
    weights get a new cache folder."""
    weights = WEIGHTS / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        return "none"
    import hashlib

    return hashlib.sha256(weights.read_bytes()).hexdigest()[:10]


def assemble(adapter_dir: Path, out: Path) -> Path:
    """Toy base + shipped adapter -> an ApprenticePipeline folder."""
    from apprentice.adapter import DemoAttentionAdapter
    from apprentice.pipeline import ApprenticePipeline
    from suti.models import load_pipeline

    base = load_pipeline("toy")
    from suti.weights import check_weight_folder, loading

    with loading(check_weight_folder(adapter_dir)):
        adapter = DemoAttentionAdapter.from_pretrained(str(adapter_dir))
    pipe = ApprenticePipeline(base.unet, base.vae, base.text_encoder, base.tokenizer, base.scheduler, adapter)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def ship(apprentice_dir: Path, dest: Path = WEIGHTS) -> Path:
    """Copy a trained (frozen-base) apprentice's adapter into the shipped weights."""
    from apprentice.adapter import DemoAttentionAdapter

    from suti.weights import check_weight_folder, loading

    with loading(check_weight_folder(Path(apprentice_dir) / "adapter")):
        adapter = DemoAttentionAdapter.from_pretrained(str(Path(apprentice_dir) / "adapter"))
    shutil.rmtree(dest, ignore_errors=True)
    adapter.save_pretrained(str(dest), safe_serialization=True)
    return dest
