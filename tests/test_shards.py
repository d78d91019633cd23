"""Shard packing: fixed-size, atomic, exactly once across restarts; readable by webdataset."""

import json

import webdataset as wds
from PIL import Image

from suti.shards import ShardPacker, existing_shards, jpeg_bytes, sample_members, shard_keys


def _sample(key: str, n_demos: int = 3):
    img = Image.new("RGB", (16, 16), (10, 200, 30))
    meta = {"cluster_id": key.split("_")[0], "prompt": "a cup in the snow", "demo_captions": ["a cup"] * n_demos, "delta_clip": 0.1}
    return sample_members(key, jpeg_bytes(img), [jpeg_bytes(img)] * n_demos, meta)


def test_fixed_size_shards_round_trip_through_webdataset(tmp_path):
    packer = ShardPacker(tmp_path, samples_per_shard=4)
    for i in range(10):
        packer.add(f"c{i:02d}_p00_s00", _sample(f"c{i:02d}_p00_s00"))
    packer.flush()
    shards = existing_shards(tmp_path)
    assert [len(shard_keys(s)) for s in shards] == [4, 4, 2]
    ds = wds.WebDataset([str(s) for s in shards], shardshuffle=False).decode("pil")
    samples = list(ds)
    assert len(samples) == 10
    for s in samples:
        assert {"target.jpg", "demo_0.jpg", "demo_1.jpg", "demo_2.jpg", "json"} <= set(s)
        assert isinstance(s["target.jpg"], Image.Image)
        assert s["json"]["prompt"] == "a cup in the snow"


def test_restart_never_writes_a_sample_twice(tmp_path):
    packer = ShardPacker(tmp_path, samples_per_shard=3)
    for i in range(4):
        packer.add(f"k{i}", _sample(f"k{i}"))
    # "crash": 3 samples are in shard 0, k3 was only buffered; a half-written tmp shard lies around
    (tmp_path / ".shard-000001.tar.tmp-999").write_bytes(b"garbage")
    again = ShardPacker(tmp_path, samples_per_shard=3)
    assert again.written == {"k0", "k1", "k2"} and again.next_index == 1
    for i in range(6):  # the restarted driver feeds everything again
        again.add(f"k{i}", _sample(f"k{i}"))
    again.flush()
    keys = [k for s in existing_shards(tmp_path) for k in shard_keys(s)]
    assert sorted(keys) == [f"k{i}" for i in range(6)]
    assert not list(tmp_path.glob(".shard-*"))


def test_sample_meta_is_json(tmp_path):
    members = dict(_sample("a_p00_s00"))
    assert json.loads(members["a_p00_s00.json"])["delta_clip"] == 0.1
