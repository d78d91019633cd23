"""The caption grammar of the synthetic world: the one place that turns a scene into words.

Every caption has the shape (DreamBench's)::

    [style prefix] a|an <noun phrase> [accessory phrase] [context phrase]

``"a red checkered star toy on the beach"``, ``"a sketch of a red star toy wearing a hat in the
snow"``, and the noun phrase is::

    [proportions] [colour] [pattern adjective] [part adjective] [identifier] <class noun>
    [with <pattern colour> <stripes|dots|checks>]

where each bracket is an option of :func:`noun_phrase` / :func:`compose`. The variants the world
and its models use are these options, nothing else:

* :func:`caption` - the world's DreamBench caption (render, crawl alt texts, evaluation), with
  an identifier the DreamBooth form ``"a green sks star toy in the jungle"``;
* :func:`compose_caption` - a caption of a rendered scene (``meta`` of
  :func:`~suti.world.render.sample_scene`) with colour, pattern or context left out (the toy
  text-to-image model's training captions, :mod:`suti.world.training.t2i`);
* :func:`form_caption` - the toy CLIP's caption forms ``full``/``class``/``detailed``/
  ``nocontext`` (:mod:`suti.world.training.clip`);
* :func:`describe` - :meth:`Subject.description <suti.world.spec.Subject.description>`.

The shipped weights were trained on exactly these strings: changing the grammar changes what the
toy models read.
"""

from __future__ import annotations

from suti.world.vocab import (
    ACCESSORIES,
    CLASSES,
    CONTEXTS,
    PATTERN_NOUNS,
    PATTERNS,
    STYLES,
    Context,
    check_edit,
    context_named,
)

def noun_phrase(subject, color: str | None, *, pattern: bool = True, detailed: bool = False,
                identifier: str | None = None) -> str:
    """The noun phrase of ``subject`` (without article), e.g. ``"red checkered star toy"``.

    Args:
        subject: a :class:`~suti.world.spec.Subject`.
        color: the colour word to name (``None`` or ``""``: no colour word).
        pattern: name the pattern adjective (``"striped"``...) of a patterned subject; ignored
            when ``detailed`` (which names the pattern at the end instead).
        detailed: also name proportions (unless regular), the part adjective and the pattern
            colour: ``"slim red six-pointed star toy with yellow checks"``.
        identifier: a rare token put right before the class noun (``"sks"``), DreamBooth-style.
    """
    words = [color] if color else []
    if detailed:
        if subject.aspect != "regular":
            words.insert(0, subject.aspect)
        words.append(CLASSES[subject.class_name].parts[subject.part])
    elif pattern and subject.pattern != "plain":
        words.append(PATTERNS[subject.pattern])
    if identifier:
        words.append(identifier)
    words.append(subject.class_noun)
    text = " ".join(words)
    if detailed and subject.pattern != "plain":
        text += f" with {subject.pattern_color} {PATTERN_NOUNS[subject.pattern]}"
    return text


def compose(subject, *, color: str | None, pattern: bool = True, detailed: bool = False,
            identifier: str | None = None, style: str | None = None,
            accessory: str | None = None, context: str | Context | None = None) -> str:
    """A caption: ``[style prefix] a|an <noun phrase> [accessory phrase] [context phrase]``.

    ``color``, ``pattern``, ``detailed`` and ``identifier`` shape the noun phrase
    (:func:`noun_phrase`); ``style`` (a key of :data:`~suti.world.vocab.STYLES`) and
    ``accessory`` (of :data:`~suti.world.vocab.ACCESSORIES`) are named when truthy;
    ``context`` (a key of :data:`~suti.world.vocab.CONTEXTS`, or a :class:`Context`, whose own
    ``phrase`` is used) when not ``None``. No validation: an unknown key raises ``KeyError``
    (:func:`caption` checks its arguments first).
    """
    noun = noun_phrase(subject, color, pattern=pattern, detailed=detailed, identifier=identifier)
    words = [STYLES[style]] if style else []
    words.append(f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}")
    if accessory:
        words.append(ACCESSORIES[accessory])
    if context is not None:
        words.append(context.phrase if isinstance(context, Context) else CONTEXTS[context].phrase)
    return " ".join(words)


def describe(subject, color: str | None = None, detailed: bool = False) -> str:
    """The subject's own noun phrase (:meth:`Subject.description
    <suti.world.spec.Subject.description>`): its body colour (or ``color``, an attribute edit)
    and pattern adjective, or with ``detailed`` proportions, colour, part and pattern colour."""
    return noun_phrase(subject, color or subject.body_color, detailed=detailed)


def caption(subject, context: str | Context | None = None, *,
            color_override: str | None = None, accessory: str | None = None,
            style: str | None = None, identifier: str | None = None) -> str:
    """DreamBench-style caption of a scene.

    ``"a red checkered star toy on the beach"``, ``"a sketch of a red checkered star toy
    wearing a hat in the snow"``. With ``identifier`` (e.g. ``"sks"``) the subject is named
    DreamBooth-style instead of described: ``"a green sks star toy in the jungle"`` (colour only
    with ``color_override``, no pattern).

    Args:
        subject: a :class:`~suti.world.spec.Subject`.
        context: a key of :data:`~suti.world.vocab.CONTEXTS` or a :class:`Context` (its
            canonical phrase, looked up by name, is used); ``None``: no context phrase.
        color_override, accessory, style: the scene's edits (keys of ``COLORS``,
            ``ACCESSORIES``, ``STYLES``) or ``None``.
        identifier: DreamBooth identifier token, or ``None``/``""`` to describe the subject.

    Raises:
        InvalidValueError: an unknown context, colour, accessory or style.
    """
    check_edit(color_override, accessory, style)
    ctx = None if context is None else context_named(context)
    if identifier:
        return compose(subject, color=color_override, pattern=False, identifier=identifier,
                       style=style, accessory=accessory, context=ctx)
    return compose(subject, color=color_override or subject.body_color, style=style,
                   accessory=accessory, context=ctx)


def compose_caption(subject, meta: dict, *, color: bool = True, pattern: bool = True,
                    context: bool = True) -> str:
    """A caption of a rendered scene with some parts left out; with everything it equals
    :func:`caption` of the scene.

    ``meta`` is the scene's ``meta`` from :func:`~suti.world.render.sample_scene` (``color``:
    the colour shown, ``context``, and optionally ``accessory``, ``style``). ``color``,
    ``pattern``, ``context``: name the shown colour, the pattern adjective, the context phrase.
    Raises ``KeyError`` for a ``meta`` without ``color`` (when named) or ``context``.
    """
    return compose(subject, color=meta["color"] if color else None, pattern=pattern,
                   style=meta.get("style"), accessory=meta.get("accessory"),
                   context=meta["context"] if context else None)


def form_caption(subject, meta: dict, form: str) -> str:
    """The toy CLIP's caption of a scene in one caption form (``meta`` from
    :func:`~suti.world.render.sample_scene`, with ``color``, ``edit``, ``context``,
    ``accessory``, ``style``).

    ``full``: :func:`caption` of the scene; ``class``: the class noun only, with the colour
    only for a colour edit (``"a robot wearing a hat on the beach"``); ``detailed``:
    proportions, part and pattern colour too; ``nocontext``: ``full`` without the context
    phrase. Any other ``form`` reads as ``full``.
    """
    override = meta["color"] if meta.get("edit") == "attribute" else None
    if form == "class":
        color, pattern = override, False
    else:
        color, pattern = override or subject.body_color, True
    return compose(subject, color=color, pattern=pattern, detailed=form == "detailed",
                   style=meta["style"], accessory=meta["accessory"],
                   context=None if form == "nocontext" else meta["context"])
