"""Photo shards (``suti apprentice pack-photos``): mined clusters' photos as reconstruction examples."""

import json
from pathlib import Path

import pytest

from apprentice.data import make_pipeline
from suti.shards import existing_shards, shard_keys
from shard_util import world_shards
from orchestration.cli import main


@pytest.fixture(scope="module")
def mined(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("photos")
    crawl, out = root / "crawl", root / "mined"
    assert main(["world", "make", "--output", str(crawl), "--subjects", "12", "--noise-pages", "0.2", "--seed", "5", "--size", "32"]) == 0
    assert main(["mine", "--crawl", str(crawl), "--output", str(out)]) == 0
    return crawl, out / "clusters.jsonl"


def _keys(folder: Path) -> list[str]:
    return [k for shard in existing_shards(folder) for k in shard_keys(shard)]


def test_pack_photos_writes_each_cluster_once_and_a_rerun_adds_nothing(mined, tmp_path, capsys):
    crawl, clusters = mined
    rows = [json.loads(line) for line in clusters.read_text().splitlines()]
    assert len(rows) >= 5
    out = tmp_path / "ph"
    argv = ["apprentice", "pack-photos", "--clusters", str(clusters), "--crawl", str(crawl), "--output", str(out), "--samples-per-shard", "4"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["written"] == len(rows) and first["skipped_too_few_photos"] == 0
    keys = _keys(out)
    assert sorted(keys) == sorted(f"{r['cluster_id']}_photos" for r in rows)
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["written"] == 0 and second["already_present"] == len(rows)
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == before


def test_photo_samples_become_reconstruction_examples(mined, tmp_path):
    crawl, clusters = mined
    out = tmp_path / "ph"
    assert main(["apprentice", "pack-photos", "--clusters", str(clusters), "--crawl", str(crawl), "--output", str(out)]) == 0
    rows = {f"{r['cluster_id']}_photos": r for r in map(json.loads, clusters.read_text().splitlines())}
    examples = list(make_pipeline(str(out / "*.tar"), resolution=32, num_demos=3, repeat=False, caption_prompt=0.5, seed=3))
    assert len(examples) == len(rows)
    prompts = set()
    for e in examples:
        noun = rows[e["key"]]["class_noun"]
        assert e["prompt"] == f"a {noun}" or (noun in e["prompt"] and e["prompt"] in rows[e["key"]]["captions"])
        prompts.add(e["prompt"] == f"a {noun}")
        assert e["target"].shape == (3, 32, 32) and e["demos"].shape == (3, 3, 32, 32)
        if len(rows[e["key"]]["keys"]) >= 4:  # enough photos: the target is never a demonstration
            assert min(float((e["target"] - d).abs().mean()) for d in e["demos"]) > 1e-3
    assert prompts == {True, False}, "both the class-noun prompt and the alt text occur at caption_prompt=0.5"
    only_noun = list(make_pipeline(str(out / "*.tar"), resolution=32, repeat=False, caption_prompt=0.0))
    assert all(e["prompt"] == f"a {rows[e['key']]['class_noun']}" for e in only_noun)
    # demonstrations keep their alt texts by default; --demo-caption 0 captions them with the class only
    assert all(set(e["demo_captions"]) <= set(rows[e["key"]]["captions"]) for e in only_noun)
    class_demos = list(make_pipeline(str(out / "*.tar"), resolution=32, repeat=False, caption_prompt=0.0, demo_caption=0.0))
    assert all(e["demo_captions"] == [f"a {rows[e['key']]['class_noun']}"] * 3 for e in class_demos)
    assert [e["target"].tolist() for e in class_demos] == [e["target"].tolist() for e in only_noun], "the same examples otherwise"
    half = list(make_pipeline(str(out / "*.tar"), resolution=32, repeat=False, demo_caption=0.5, seed=3))
    assert any(e["demo_captions"] == [f"a {rows[e['key']]['class_noun']}"] * 3 for e in half)


def test_photo_and_expert_shards_mix_and_the_lambda_filter_keeps_photos(mined, tmp_path):
    crawl, clusters = mined
    photos = tmp_path / "ph"
    assert main(["apprentice", "pack-photos", "--clusters", str(clusters), "--crawl", str(crawl), "--output", str(photos)]) == 0
    experts = world_shards(tmp_path / "sh", num_subjects=2, per_subject=2)  # delta_clip 0.1
    n_photos = len(_keys(photos))
    mixed = list(make_pipeline([str(photos / "*.tar"), str(experts / "*.tar")], resolution=32, repeat=False))
    assert len(mixed) == n_photos + 4
    strict = list(make_pipeline([str(photos / "*.tar"), str(experts / "*.tar")], resolution=32, repeat=False, min_delta_clip=0.5))
    assert len(strict) == n_photos and all(e["key"].endswith("_photos") for e in strict)


def test_a_photo_sample_with_one_photo_is_logged_and_skipped(tmp_path, caplog):
    from suti.shards import ShardPacker, jpeg_bytes
    from PIL import Image

    packer = ShardPacker(tmp_path / "ph", 8)
    one = [("c1_photos.demo_0.jpg", jpeg_bytes(Image.new("RGB", (32, 32), "red"))),
           ("c1_photos.json", json.dumps({"kind": "photos", "class_noun": "cup", "demo_captions": ["a red cup"]}).encode())]
    packer.add("c1_photos", one)
    packer.flush()
    with caplog.at_level("WARNING"):
        assert list(make_pipeline(str(tmp_path / "ph" / "*.tar"), resolution=32, repeat=False)) == []
    assert "needs at least 2 photos" in caplog.text


def test_pack_photos_names_a_missing_clusters_file(tmp_path, capsys):
    code = main(["apprentice", "pack-photos", "--clusters", str(tmp_path / "nope.jsonl"), "--crawl", str(tmp_path), "--output", str(tmp_path / "o")])
    assert code == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_pack_photos_names_a_missing_crawl(mined, tmp_path, capsys):
    _, clusters = mined
    code = main(["apprentice", "pack-photos", "--clusters", str(clusters), "--crawl", str(tmp_path / "no-crawl"), "--output", str(tmp_path / "o")])
    assert code == 2
    assert "no-crawl: no such crawl" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
