"""Issue 16, failure 3: tar members are grouped by the field at the end of their name, so
sample keys may contain dots, in every reader (mining crawl, shard keys, apprentice data)."""

from __future__ import annotations

import io
import tarfile

import pytest

from suti.shards import group_samples, shard_keys
from suti.tar_members import drop_reason, split_member


@pytest.mark.parametrize("name,want", [
    ("img.2024.05_ab.png", ("img.2024.05_ab", "png")),
    ("a/b.c/img.2024.JPG", ("a/b.c/img.2024", "jpg")),
    ("000042.target.jpg", ("000042", "target.jpg")),
    ("k.v1.demo_12.png", ("k.v1", "demo_12.png")),
    ("k.json", ("k", "json")),
    ("README", (None, None)),
    (".hidden", (None, None)),
])
def test_split_member_takes_the_field_from_the_end(name, want):
    assert split_member(name) == want


def test_crawl_keys_are_split_at_the_last_dot_only():
    assert split_member("photo.target.jpg", compound=False) == ("photo.target", "jpg")
    assert split_member("img.demo_1.png", compound=False) == ("img.demo_1", "png")


def test_drop_reasons():
    assert drop_reason("README") == "no_extension"
    assert drop_reason("k.2024.xyz") == "unknown_field"
    assert drop_reason("k.2024.demo_0.png") is None


def _tar(path, names):
    with tarfile.open(path, "w") as tar:
        for name in names:
            data = name.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shard_keys_and_group_samples_keep_dotted_keys(tmp_path):
    names = ["a.1.target.jpg", "a.1.demo_0.jpg", "a.1.json", "b.2.json", "b.2.demo_0.png"]
    _tar(tmp_path / "s.tar", names)
    assert shard_keys(tmp_path / "s.tar") == ["a.1", "b.2"]
    groups = group_samples([(n, n.encode()) for n in names])
    assert sorted(groups) == ["a.1", "b.2"]
    assert sorted(groups["a.1"]) == ["demo_0.jpg", "json", "target.jpg"]


def test_apprentice_reader_groups_dotted_keys(tmp_path):
    import webdataset as wds

    from suti.tar_members import tarfile_to_samples

    names = [f"img.2024.05_{i}.{ext}" for i in range(3) for ext in ("png", "txt", "json")]
    _tar(tmp_path / "s.tar", names)
    samples = list(wds.DataPipeline(wds.SimpleShardList([str(tmp_path / "s.tar")]),
                                    tarfile_to_samples(handler=wds.reraise_exception)))
    assert [s["__key__"] for s in samples] == [f"img.2024.05_{i}" for i in range(3)]
    assert all({"png", "txt", "json"} <= set(s) for s in samples)
