"""suti.storage: local paths, fsspec URIs, a real S3-protocol server (moto) started by the test."""

from __future__ import annotations

import os
import sys

import pytest

from suti import storage
from suti.errors import InputError, MissingInputError


def test_resolve_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("runs/job") == str(tmp_path / "runs" / "job")
    assert storage.resolve(f"file://{tmp_path}/x") == str(tmp_path / "x")
    assert storage.resolve("s3://bucket/job/") == "s3://bucket/job"
    assert storage.is_local("runs") and not storage.is_local("s3://b/k")


def test_local_write_is_atomic_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "a.json"
    storage.write_text(target, "one")
    storage.write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]
    with pytest.raises(MissingInputError, match="no such file"):
        storage.read_bytes(tmp_path / "missing")


def test_expand_braces_and_globs(tmp_path):
    for i in range(3):
        (tmp_path / f"shard-{i:06d}.tar").write_bytes(b"x")
    assert storage.expand(tmp_path / "shard-{000000..000001}.tar") == [str(tmp_path / f"shard-{i:06d}.tar") for i in range(2)]
    assert len(storage.expand(tmp_path / "shard-*.tar")) == 3
    assert storage.expand(tmp_path / "one.tar") == [str(tmp_path / "one.tar")]


def test_memory_filesystem_round_trip():
    storage.write_bytes("memory://suti-test/a/b.bin", b"123")
    assert storage.read_bytes("memory://suti-test/a/b.bin") == b"123"
    assert storage.listdir("memory://suti-test/a") == ["b.bin"]
    (found,) = storage.glob("memory://suti-test/a/*.bin")
    assert found.startswith("memory://") and storage.read_bytes(found) == b"123"


def test_missing_protocol_package_names_the_extra(monkeypatch, tmp_path):
    import importlib

    registry = importlib.import_module("fsspec.registry")  # (fsspec.registry is also a mapping's name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed ...
    for proto in ("s3", "s3a"):  # ... and not imported by an earlier test either
        if proto in registry._registry:
            monkeypatch.delitem(registry._registry, proto)
    with pytest.raises(InputError, match=r"s3fs.*suti\[s3\]"):
        storage.write_text("s3://bucket/job/x.json", "{}")
    assert not (tmp_path / "s3:").exists()


def test_s3_round_trip_through_standard_variables(s3_server, tmp_path):
    uri = storage.join(s3_server, "job", "summary.json")
    storage.write_text(uri, '{"a": 1}')
    assert storage.read_text(uri) == '{"a": 1}'
    assert storage.isfile(uri) and storage.isdir(storage.join(s3_server, "job"))
    assert storage.listdir(storage.join(s3_server, "job")) == ["summary.json"]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("x")
    storage.upload(tmp_path / "d", storage.join(s3_server, "up"))
    assert storage.glob(storage.join(s3_server, "up", "*.txt")) == [f"{s3_server}/up/x.txt"]
    with storage.local_copy(storage.join(s3_server, "up")) as local:
        assert (local / "x.txt").read_text() == "x"
    storage.remove(uri)
    assert not storage.exists(uri)
    assert not os.path.exists("s3:")
