"""A real CLIP BPE tokenizer built offline from the vocabulary that ships inside open_clip.

OpenAI's CLIP tokenizer (the one Stable Diffusion 1.x uses) is fully determined by the BPE merge
list ``bpe_simple_vocab_16e6.txt.gz`` that ``open_clip_torch`` ships. We rebuild the
``vocab.json``/``merges.txt`` pair that ``transformers.CLIPTokenizer`` reads, so tiny models get
exactly the token ids a Stable Diffusion checkpoint would, without any download.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

# 49152 BPE entries = 256 bytes + 256 bytes with </w> + 48894 merges + 2 special tokens ... the
# original code keeps merges[1 : 49152 - 256 - 2 + 1].
_NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable unicode map of GPT-2/CLIP BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def open_clip_bpe_path() -> Path:
    """Path of the BPE merge list inside the installed open_clip package."""
    import open_clip.tokenizer as oct

    return Path(oct.default_bpe())


@lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Return CLIP's ``token -> id`` vocabulary and its merge lines, built from open_clip's file."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: str | Path, model_max_length: int = 77) -> Path:
    """Write a ``transformers.CLIPTokenizer`` folder (vocab.json, merges.txt, configs)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def load_clip_tokenizer(model_max_length: int = 77):
    """Build the CLIP tokenizer in a temporary folder and load it with ``from_pretrained``."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(tmp, model_max_length)
        return CLIPTokenizer.from_pretrained(tmp)
