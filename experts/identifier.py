"""Rare-token identifiers ("[V]") as in DreamBooth, section 3.2.

The paper looks up rare tokens in the vocabulary, keeps those that decode to at most 3 characters
without spaces, and samples from a rare id range, so the identifier starts with a weak prior. In
CLIP's BPE vocabulary ids follow merge order, i.e. frequency: high ids are rare. We keep
whole-word tokens of 2-4 consonants (no vowels) in that range, and drop every one that is a
word, an acronym, slang or profanity: ``configs/identifiers/denylist.txt`` holds the 2-4
consonant strings of wordfreq's large English list plus tokens notorious among DreamBooth users
("sks", the paper's own example, is also a rifle; ``scripts/identifier_denylist.py`` rebuilds it).
"""

from __future__ import annotations

import random
import weakref

from suti.errors import ModelLoadError

# CLIP BPE ids: 0-511 are single bytes, merges follow in frequency order, 49406/49407 are special.
RARE_ID_RANGE = (40000, 49405)
_VOWELS = set("aeiouy")
_INTERJECTIONS = {"hmm", "brr", "shh", "tsk", "pst", "nth", "zzz", "cwm", "hm", "mm", "pfft", "grr", "sh", "st", "mr", "ms", "dr", "jr", "sr", "th", "nd", "rd"}
_DENYLIST: frozenset[str] | None = None


def denylist() -> frozenset[str]:
    """The strings an identifier must never be (``configs/identifiers/denylist.txt``)."""
    global _DENYLIST
    if _DENYLIST is None:
        from suti.models import config_dir

        lines = (config_dir() / "identifiers" / "denylist.txt").read_text().splitlines()
        _DENYLIST = frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    return _DENYLIST


def rare_token_candidates(tokenizer, id_range: tuple[int, int] = RARE_ID_RANGE) -> list[str]:
    """Whole-word tokens in ``id_range`` that decode to 2-4 consonant letters and are no word,
    acronym, slang or profanity (:func:`denylist`).

    Each candidate encodes back to exactly one token, so "[V]" costs one position in the prompt.
    """
    vocab = tokenizer.get_vocab()
    lo, hi = id_range
    deny = denylist()
    out = []
    for token, idx in vocab.items():
        if not (lo <= idx <= hi) or not token.endswith("</w>"):
            continue
        word = token[: -len("</w>")]
        if not (2 <= len(word) <= 4 and word.isascii() and word.isalpha() and word.islower()):
            continue
        if _VOWELS & set(word) or word in _INTERJECTIONS or word in deny:
            continue
        out.append(word)
    return sorted(out, key=lambda w: vocab[w + "</w>"])


_CANDIDATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (vocabulary size, one-token candidates)


def identifier_candidates(tokenizer) -> list[str]:
    """:func:`rare_token_candidates` that encode to exactly one token, in id order. Kept per
    tokenizer object (and vocabulary size), so a resident expert worker scans the 49k-token
    vocabulary once, not once per expert."""
    size = len(tokenizer)
    try:
        cached = _CANDIDATES.get(tokenizer)
    except TypeError:  # not weak-referenceable: no cache
        cached = None
    if cached is not None and cached[0] == size:
        return cached[1]
    candidates = [w for w in rare_token_candidates(tokenizer) if token_count(tokenizer, w) == 1]
    try:
        _CANDIDATES[tokenizer] = (size, candidates)
    except TypeError:
        pass
    return candidates


def sample_identifier(tokenizer, seed: int = 0, num_tokens: int = 1) -> str:
    """Sample a rare identifier of ``num_tokens`` tokens, deterministically for ``seed``."""
    candidates = identifier_candidates(tokenizer)
    if len(candidates) < num_tokens:
        raise ModelLoadError("the model's tokenizer has too few rare short tokens for an identifier; pass --identifier")
    rng = random.Random(seed)
    return " ".join(rng.sample(candidates, num_tokens))  # one word per token


def token_count(tokenizer, text: str) -> int:
    """Number of tokens ``text`` encodes to (no special tokens)."""
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def instance_prompt(identifier: str, class_noun: str, use_class_noun: bool = True) -> str:
    """The training prompt: "a [V] [class noun]" (or "a [V]" without the class noun)."""
    return f"a {identifier} {class_noun}" if use_class_noun else f"a {identifier}"


def check_identifier(identifier: str, flag: str = "--identifier") -> None:
    """Refuse an identifier that would train or sample the wrong prompt: empty, with braces
    (``{class}`` would train "a dog dog"), or with surrounding spaces ("a  dog").

    Raises:
        InvalidValueError: naming ``flag`` and the value.
    """
    from suti.errors import InvalidValueError

    if not identifier.strip() or any(c in identifier for c in "{}") or identifier != identifier.strip():
        raise InvalidValueError(f"{flag} must be a token such as 'nhq', without braces or surrounding spaces (got {identifier!r}); leave it out to sample a rare one")


def fill_prompt(template: str, identifier: str, class_noun: str) -> str:
    """Fill ``{V}`` and ``{class}`` placeholders of a user prompt."""
    return template.replace("{V}", identifier).replace("{class}", class_noun)
