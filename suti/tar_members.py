"""Which sample a webdataset tar member belongs to, with keys that may contain dots.

webdataset (``webdataset.tariterators.base_plus_ext``) splits a member name at its *first* dot:
``img.2024.05_ab12.png`` becomes key ``img`` with field ``2024.05_ab12.png``, so every image of
a page whose img2dataset keys contain dots collapses into one broken sample. Here a member name
is split from its *end*: the field is the last extension (``png``, ``jpg``, ``txt``, ``json``,
...), or a compound field of our own shards (``target.jpg``, ``demo_3.png``); the key is the rest.

>>> split_member("crawl/img.2024.05_ab12.png")
('crawl/img.2024.05_ab12', 'png')
>>> split_member("00000042.demo_2.jpg")
('00000042', 'demo_2.jpg')

:func:`tarfile_to_samples` is the webdataset stage (``url_opener`` -> ``tar_file_expander`` ->
``group_by_keys``) with this split instead of webdataset's.
"""

from __future__ import annotations

import re

#: Fields whose member name ends ``.<field>`` (lower-case), besides compound fields.
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
KNOWN_FIELDS = IMAGE_FIELDS + ("txt", "json", "cls", "npy")
#: Compound fields of suti's own shards (:mod:`suti.shards`): ``target.jpg``, ``demo_<i>.png``.
COMPOUND_FIELD = re.compile(r"^(target|demo_\d+)$")


def split_member(name: str, compound: bool = True) -> tuple[str | None, str | None]:
    """``(key, field)`` of a tar member name; ``(None, None)`` when it has no extension.

    The field is lower-cased. A folder part of the name stays in the key. With ``compound``
    (suti's own shards) ``K.target.jpg`` and ``K.demo_<i>.png`` give key ``K``; without it (a web
    crawl, where any key is possible) only the last extension is the field.
    """
    folder, _, fname = name.rpartition("/")
    stem, dot, ext = fname.rpartition(".")
    if not dot or not stem or not ext:
        return None, None
    field = ext.lower()
    head, dot2, last = stem.rpartition(".")
    if compound and dot2 and head and COMPOUND_FIELD.match(last):
        stem, field = head, f"{last}.{field}"
    key = f"{folder}/{stem}" if folder else stem
    return key, field


def drop_reason(name: str, compound: bool = True) -> str | None:
    """Why a member is not part of any sample (``no_extension``, ``unknown_field``), or ``None``."""
    key, field = split_member(name, compound)
    if key is None:
        return "no_extension"
    if field.rsplit(".", 1)[-1] not in KNOWN_FIELDS:
        return "unknown_field"
    return None


def tarfile_to_samples(handler):
    """A webdataset pipeline stage: shard URLs -> samples grouped by :func:`split_member`.

    Same as ``webdataset.tarfile_to_samples(handler=handler)`` except for dotted keys. Raises
    nothing itself: errors go to ``handler`` (log and continue).
    """
    from webdataset import filters, tariterators

    def samples(src):
        streams = tariterators.url_opener(src, handler=handler)
        files = tariterators.tar_file_expander(streams, handler=handler)
        return tariterators.group_by_keys(files, keys=split_member, handler=handler)

    return filters.pipelinefilter(samples)()


def tar_streams_to_samples(handler):
    """A webdataset pipeline stage: opened shards (``{"url", "stream"}``, e.g. from fsspec) ->
    samples grouped by :func:`split_member` (``tar_file_expander`` -> ``group_by_keys``)."""
    from webdataset import filters, tariterators

    def samples(src):
        files = tariterators.tar_file_expander(src, handler=handler)
        return tariterators.group_by_keys(files, keys=split_member, handler=handler)

    return filters.pipelinefilter(samples)()
