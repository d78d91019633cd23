"""Unseen creative prompts for a subject cluster, and its class noun.

Prompts are templates with ``{S}``, the subject's noun phrase without article (filled later,
e.g. with ``"sks star toy"``), and cover the four SuTI skills at DreamBench-v2-like
compositional levels (level n combines n skills)::

    recontextualization   "a {S} on the beach"
    attribute             "a green {S}"
    stylization           "a watercolor painting of a {S}"
    accessorization       "a {S} wearing a hat"
    level 2               "a {S} wearing a hat in the snow"
    level 3               "a sketch of a green {S} in the jungle"

They use the synthetic world's caption vocabulary and word order (:func:`suti.world.caption`:
``[style] a [colour] {S} [accessory] [context]``), so the toy models can render them. *Unseen*:
contexts, colours, accessories and styles named in the cluster's alt texts are avoided (unless
nothing else is left). :func:`template_prompts` is deterministic by ``(seed, cluster_id)``;
:func:`llm_prompts` asks a local text-generation model instead (``--prompt-generator llm``).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np

from suti.errors import InputError
from suti.world.spec import ACCESSORIES, COLORS, CONTEXTS, PATTERNS, STYLES

log = logging.getLogger(__name__)

SKILLS = ("recontextualization", "attribute", "stylization", "accessorization")
DEFAULT_PROMPTS_PER_CLUSTER = 12
FALLBACK_NOUN = "object"

_STOP = set("""a an the my our your his her their this that these those look at on in of with
and or for by to from is are it its here there front view background wearing photo photos image
images picture pictures pic untitled img dsc jpg jpeg png new best cute nice favorite favourite
some very so me i we you just""".split())
_WORD = re.compile(r"[a-z][a-z'-]*")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _content(phrase: str) -> set[str]:
    return {w for w in _words(phrase) if w not in _STOP and w not in COLORS}


#: Words that reveal a context / accessory / style in an alt text.
CONTEXT_WORDS = {k: _content(c.phrase) | _content(c.short) for k, c in CONTEXTS.items()}
for _k, _extra in {"beach": {"sandy", "sand", "sea", "seaside"}, "snow": {"snowy", "winter"},
                   "grass": {"meadow", "lawn"}, "city": {"street"},
                   "jungle": {"forest", "leaves"}}.items():
    CONTEXT_WORDS[_k] = CONTEXT_WORDS[_k] | _extra
ACCESSORY_WORDS = {k: _content(p) for k, p in ACCESSORIES.items()}
STYLE_WORDS = {k: _content(p) - {"image"} for k, p in STYLES.items()}
_NOT_NOUN = (set(COLORS) | {a for a in PATTERNS.values() if a} | set(PATTERNS)
             | set().union(*CONTEXT_WORDS.values(), *ACCESSORY_WORDS.values(),
                           *STYLE_WORDS.values())
             | {"painting", "art", "landscape"})


def _noun_phrases(caption: str) -> set[str]:
    """Candidate noun phrases of a caption: the one-to-three-word endings of its runs of
    content words (stop words, colours, patterns, context, accessory and style words break
    runs)."""
    found, run = set(), []
    for w in [*_words(caption), "."]:
        if w == "." or w in _STOP or w in _NOT_NOUN or len(w) < 2:
            found.update(" ".join(run[-n:]) for n in range(1, min(3, len(run)) + 1))
            run = []
        else:
            run.append(w)
    return found


def estimate_class_noun(captions: list[str]) -> str:
    """The most frequent noun phrase of the alt texts (``"star toy"``, ``"cup"``...).

    Candidate phrases (:func:`_noun_phrases`) are counted once per caption; the longest one
    seen in at least 3/4 as many captions as the most frequent one wins. ``"object"`` when no
    caption has a content word.
    """
    df: Counter = Counter()
    for cap in captions:
        df.update(_noun_phrases(cap))
    if not df:
        return FALLBACK_NOUN
    top = max(df.values())
    best = [p for p, c in df.items() if c >= 0.75 * top]
    return max(best, key=lambda p: (len(p.split()), df[p], p))


def noun_support(captions: list[str], noun: str) -> float:
    """Share of the informative alt texts (those with a content word; not ``"IMG_0412"``,
    ``"photo"`` or empty) that name ``noun``; 0.0 when none is informative.

    Alt texts of one subject agree on what it is; a page mixing a robot and a ball, or showing
    only backgrounds, does not.
    """
    informative = [f" {' '.join(_words(c))} " for c in captions if _noun_phrases(c)]
    if not informative:
        return 0.0
    return sum(1 for text in informative if f" {noun} " in text) / len(informative)


def seen_vocabulary(captions: list[str]) -> dict[str, set[str]]:
    """Contexts, colours, accessories and styles the alt texts already name."""
    words = set().union(*(_words(c) for c in captions)) if captions else set()
    return {"context": {k for k, ws in CONTEXT_WORDS.items() if ws & words},
            "color": {c for c in COLORS if c in words},
            "accessory": {k for k, ws in ACCESSORY_WORDS.items() if ws and ws <= words},
            "style": {k for k, ws in STYLE_WORDS.items() if ws and ws <= words}}


def compose(context: str | None = None, color: str | None = None,
            accessory: str | None = None, style: str | None = None) -> str:
    """A prompt template in the world's caption order, e.g. ``"a sketch of a green {S}"``."""
    noun = f"{color} {{S}}" if color else "{S}"
    words = [STYLES[style]] if style else []
    words.append(("an " if noun[0] in "aeiou" else "a ") + noun)
    if accessory:
        words.append(ACCESSORIES[accessory])
    if context:
        words.append(CONTEXTS[context].phrase)
    return " ".join(words)


def _rng(seed: int, cluster_id: str) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(cluster_id.encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, digest])


def _plan(n: int, rng: np.random.Generator) -> list[tuple[str, ...]]:
    """Skill combinations of ``n`` prompts: levels 1, 2, 3 in turn; each level cycles through
    its combinations in a shuffled order (so level 1 covers all four skills first)."""
    queues = {}
    for level in (1, 2, 3):
        combos = list(itertools.combinations(SKILLS, level))
        queues[level] = [combos[int(i)] for i in rng.permutation(len(combos))]
    plan, used = [], Counter()
    for i in range(n):
        level = (1, 2, 3)[i % 3]
        q = queues[level]
        plan.append(q[used[level] % len(q)])
        used[level] += 1
    return plan


def template_prompts(cluster_id: str, captions: list[str], n: int = DEFAULT_PROMPTS_PER_CLUSTER,
                     seed: int = 0) -> list[dict]:
    """``n`` distinct prompts ``{"prompt", "skill", "level"}`` for a cluster (``skill``: the
    skills joined by ``+``), deterministic by ``(seed, cluster_id)`` and the alt texts."""
    rng = _rng(seed, cluster_id)
    seen = seen_vocabulary(captions)
    pools = {"context": list(CONTEXTS), "color": list(COLORS), "accessory": list(ACCESSORIES),
             "style": list(STYLES)}
    pools = {k: [v for v in vs if v not in seen[k]] or vs for k, vs in pools.items()}
    slot = {"recontextualization": "context", "attribute": "color",
            "accessorization": "accessory", "stylization": "style"}
    out, made = [], set()
    for combo in _plan(n, rng):
        for _ in range(20):
            values = {slot[s]: pools[slot[s]][int(rng.integers(len(pools[slot[s]])))]
                      for s in combo}
            prompt = compose(**values)
            if prompt not in made:
                break
        made.add(prompt)
        out.append({"prompt": prompt, "skill": "+".join(combo), "level": len(combo)})
    return out


def classify_prompt(prompt: str) -> list[str]:
    """The SuTI skills a free-form prompt exercises (keyword rules, for LLM prompts)."""
    text = prompt.lower().replace("{s}", " ")
    words = set(_words(text))
    skills = []
    if re.search(r"\b(on|in|at|under|inside|beside|near|by|in front of)\b (a|an|the)\b", text):
        skills.append("recontextualization")
    if words & set(COLORS) or re.search(r"\bmade of\b", text):
        skills.append("attribute")
    if re.search(r"\b(sketch|painting|drawing|style|pixel art|cartoon|illustration|render)\b",
                 text):
        skills.append("stylization")
    if re.search(r"\b(wearing|with a|holding)\b", text):
        skills.append("accessorization")
    return skills or ["recontextualization"]


@lru_cache(maxsize=1)
def _generator(model_path: str):
    from transformers import pipeline

    return pipeline("text-generation", model=model_path, device_map="auto")


def llm_prompts(cluster_id: str, captions: list[str], class_noun: str, model_path: str,
                n: int = DEFAULT_PROMPTS_PER_CLUSTER, seed: int = 0) -> list[dict]:
    """Prompts from a local text-generation model (transformers pipeline at ``model_path``).

    The model is asked for one prompt per line containing ``{S}``; lines without exactly one
    ``{S}`` or with fewer than 3 or more than 25 words are ignored, skills and level are read
    off each prompt (:func:`classify_prompt`), and missing
    prompts are filled with :func:`template_prompts`.

    Raises:
        InputError: ``model_path`` is not a local folder or file.
    """
    if not model_path or not Path(model_path).exists():
        raise InputError(f"--llm-model {model_path!r}: no such local model folder (the LLM "
                         "prompt generator needs a local transformers text-generation model)")
    from transformers import set_seed

    set_seed(int.from_bytes(hashlib.sha256(f"{seed}/{cluster_id}".encode()).digest()[:4], "big"))
    seen = "; ".join(c for c in captions if c)[:500]
    instruction = (
        f"Write {n} short, creative image prompts about a {class_noun}, one per line. Write "
        "{S} where the subject goes, e.g. 'a {S} wearing a hat in the snow'. Mix new places, "
        "new colours, art styles and accessories, and combine up to three of them in one "
        f"prompt. Avoid what these captions already show: {seen}\n1.")
    text = _generator(model_path)(instruction, max_new_tokens=32 * n, do_sample=True,
                                  temperature=0.9, return_full_text=False)[0]["generated_text"]
    out, made = [], set()
    for line in text.splitlines():
        prompt = re.sub(r"^\s*(\d+[.)]|[-*])\s*", "", line).strip().strip('"')
        if (prompt.count("{S}") == 1 and 3 <= len(prompt.split()) <= 25
                and prompt not in made and len(out) < n):
            made.add(prompt)
            skills = classify_prompt(prompt)
            out.append({"prompt": prompt, "skill": "+".join(skills), "level": len(skills)})
    for p in template_prompts(cluster_id, captions, 3 * n, seed):
        if len(out) >= n:
            break
        if p["prompt"] not in made:
            out.append(p)
    return out
