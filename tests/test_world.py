"""Tests of the synthetic subject world (suti.world): spec, rendering, captions, crawl, CLI."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from suti.errors import InputError
from suti.world import (
    ACCESSORIES,
    CLASSES,
    CONTEXTS,
    STYLES,
    Pose,
    caption,
    dataset_iter,
    export_subject,
    load_ground_truth,
    load_world,
    make_crawl,
    make_world,
    render,
    render_background,
    sample_scene,
    subject_images,
)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


# --- spec --------------------------------------------------------------------------------------

def test_world_is_deterministic_and_extends_smaller_worlds():
    a, b = make_world(30, seed=3), make_world(30, seed=3)
    assert a == b
    assert make_world(12, seed=3).subjects == a.subjects[:12]
    assert make_world(30, seed=4).subjects != a.subjects


def test_world_has_enough_classes_and_contexts():
    assert len(CLASSES) >= 5 and len(CONTEXTS) >= 6
    world = make_world(len(CLASSES) * 2, seed=0)
    assert {s.class_name for s in world.subjects} == set(CLASSES)


def test_subjects_of_a_class_differ_in_identity():
    world = make_world(60, seed=1)
    identities = [s.identity() for s in world.subjects]
    assert len(set(identities)) == len(identities)
    by_class = {}
    for s in world.subjects:
        by_class.setdefault(s.class_name, []).append(s)
    for subjects in by_class.values():
        short = [s.description() for s in subjects]
        assert len(set(short)) == len(short)  # colour + pattern already tell them apart
    # and they look different in the same scene
    s1, s2 = by_class["star_toy"][:2]
    pose = Pose()
    im1 = render(s1, "beach", pose=pose, rng=np.random.default_rng(0))
    im2 = render(s2, "beach", pose=pose, rng=np.random.default_rng(0))
    assert np.abs(_pixels(im1) - _pixels(im2)).mean() > 2


@pytest.mark.parametrize("n", [2, 4, 9, 40])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heldout_split_is_nonempty_and_disjoint(n, seed):
    world = make_world(n, seed=seed, heldout_fraction=0.25)
    train = {s.subject_id for s in world.train_subjects}
    held = {s.subject_id for s in world.heldout_subjects}
    assert train and held and not train & held
    assert train | held == {s.subject_id for s in world.subjects}
    assert make_world(n, seed=seed).splits == world.splits


def test_world_json_round_trip(tmp_path):
    world = make_world(10, seed=7)
    world.save(tmp_path / "world.json")
    assert load_world(tmp_path) == world


def test_descriptions_are_dreambench_like():
    world = make_world(12, seed=0)
    for s in world.subjects:
        text = s.description()
        assert text.startswith(s.body_color) and text.endswith(s.class_noun)
        assert s.description(detailed=True).count(s.class_noun) == 1


# --- rendering and captions --------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 64])
def test_render_sizes_every_class_context_and_edit(size):
    world = make_world(len(CLASSES), seed=0)
    rng = np.random.default_rng(0)
    for i, subject in enumerate(world.subjects):
        for ctx in CONTEXTS:
            img = render(subject, ctx, size=size, rng=rng)
            assert img.mode == "RGB" and img.size == (size, size)
        accessory = list(ACCESSORIES)[i % len(ACCESSORIES)]
        for style in STYLES:
            img = render(subject, "snow", accessory=accessory, style=style, color_override="green",
                         size=size, rng=rng)
            assert img.mode == "RGB" and img.size == (size, size)
    assert render_background("city", rng, size).size == (size, size)


def test_render_is_deterministic_and_edits_change_pixels():
    subject = make_world(3, seed=2).subjects[0]

    def draw(**kw):
        return _pixels(render(subject, "grass", pose=Pose(), rng=np.random.default_rng(5), **kw))

    base = draw()
    assert np.array_equal(base, draw())
    other = "green" if subject.body_color != "green" else "red"
    for kw in ({"color_override": other}, {"accessory": "hat"}, {"style": "pixel_art"}):
        assert np.abs(draw(**kw) - base).mean() > 1, kw
    sketch = draw(style="sketch")
    assert np.array_equal(sketch[..., 0], sketch[..., 1])  # grey strokes
    assert np.median(sketch) > 200  # on white
    with pytest.raises(ValueError):
        render(subject, "the moon")


def test_captions_name_class_context_and_edits():
    world = make_world(12, seed=0)
    for s in world.subjects:
        for ctx in CONTEXTS.values():
            text = caption(s, ctx.name)
            assert text == f"a {s.description()} {ctx.phrase}".replace("a orange", "an orange")
            assert s.class_noun in text and ctx.phrase in text
    s = world.subjects[0]
    text = caption(s, "snow", accessory="hat", style="sketch")
    assert text == f"a sketch of a {s.description()} wearing a hat in the snow"
    assert caption(s, "jungle", color_override="green", identifier="sks") == \
        f"a green sks {s.class_noun} in the jungle"
    assert caption(s, None, style="watercolor").startswith("a watercolor painting of ")


def test_sample_scene_meta_matches_caption():
    world = make_world(6, seed=0)
    rng = np.random.default_rng(1)
    kinds = Counter()
    for i in range(60):
        s = world.subjects[i % 6]
        img, text, meta = sample_scene(s, rng, size=32, edit_prob=0.7)
        assert img.size == (32, 32)
        assert meta["subject_id"] == s.subject_id and meta["class_noun"] == s.class_noun
        assert s.class_noun in text and CONTEXTS[meta["context"]].phrase in text
        assert meta["color"] in text
        kinds[meta["edit"]] += 1
        if meta["edit"] == "accessory":
            assert ACCESSORIES[meta["accessory"]] in text
        if meta["edit"] == "style":
            assert text.startswith(STYLES[meta["style"]])
    assert set(kinds) == {None, "attribute", "accessory", "style"}


def test_subject_images_and_dataset_iter_are_deterministic(tmp_path):
    world = make_world(8, seed=0)
    sid = world.train_subjects[0].subject_id
    a = subject_images(world, sid, 3, seed=1, size=32)
    b = subject_images(world, sid, 3, seed=1, size=32)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    assert len({im.tobytes() for im in a}) == 3
    items = list(dataset_iter(world, "heldout", seed=0, size=32, n=10))
    held = {s.subject_id for s in world.heldout_subjects}
    assert len(items) == 10 and all(meta["subject_id"] in held for _, _, meta in items)
    paths = export_subject(world, sid, tmp_path / "inst", n=4, size=32)
    assert len(paths) == 4 and all(Image.open(p).size == (32, 32) for p in paths)
    with pytest.raises(InputError):
        export_subject(world, sid, tmp_path / "inst")
    with pytest.raises(InputError):
        export_subject(world, "nobody", tmp_path / "other")


# --- crawl -------------------------------------------------------------------------------------

def test_crawl_is_byte_identical_for_a_seed(tmp_path):
    kw = dict(num_subjects=8, noise_pages_fraction=0.3, images_per_page=(2, 4), size=32)
    make_crawl(tmp_path / "a", seed=11, **kw)
    make_crawl(tmp_path / "b", seed=11, **kw)
    make_crawl(tmp_path / "c", seed=12, **kw)
    a, b, c = (_tree_hashes(tmp_path / x) for x in "abc")
    assert a == b
    assert any(name.startswith("shards/") for name in a)
    assert a != c and a["world.json"] != c["world.json"]


def test_crawl_ground_truth_is_consistent(tmp_path):
    out = tmp_path / "crawl"
    summary = make_crawl(out, 40, 0.25, seed=3, images_per_page=(3, 5), size=32, shard_size=50)
    truth = load_ground_truth(out)
    rows = [json.loads(line) for line in (out / "crawl.jsonl").read_text().splitlines()]
    assert summary["images"] == len(rows) == len(truth["images"])
    assert abs(summary["noise_pages"] / summary["pages"] - 0.25) < 0.05
    assert set(truth["pages"]) == {r["page_url"] for r in rows}
    heldout = set(truth["splits"]["heldout"])
    assert heldout and not heldout & set(truth["splits"]["train"])
    by_page = {}
    for r in rows:
        sidecar = json.loads((out / "images" / f"{r['key']}.json").read_text())
        assert sidecar == {k: r[k] for k in ("key", "url", "page_url", "caption")}
        assert (out / "images" / f"{r['key']}.txt").read_text() == r["caption"]
        assert Image.open(out / r["path"]).size == (32, 32)
        by_page.setdefault(r["page_url"], []).append(truth["images"][r["key"]])
    for page, shown in by_page.items():
        assert not heldout & set(shown)  # held-out subjects are never crawled
        if truth["pages"][page] is not None:  # clean: one subject, shown on every image
            assert truth["page_kinds"][page] == "clean" and set(shown) == {truth["pages"][page]}
        else:
            assert truth["page_kinds"][page] != "clean"
            assert None in shown or len(set(shown)) >= 2
    # every train subject has a clean page; the subject table has every identity attribute
    assert set(truth["pages"].values()) - {None} == set(truth["splits"]["train"])
    assert {"class_noun", "body_color", "pattern", "part", "aspect", "split"} <= set(
        next(iter(truth["subjects"].values())))
    # the webdataset shards hold exactly the image files
    members = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    assert len(members) == 3 * len(rows)
    key = rows[7]["key"]
    assert members[f"{key}.jpg"] == (out / "images" / f"{key}.jpg").read_bytes()


def test_png_crawl_is_lossless_and_has_the_jpg_crawls_pixels_and_layout(tmp_path):
    kw = dict(num_subjects=4, noise_pages_fraction=0.0, images_per_page=(2, 3), size=32, seed=2)
    make_crawl(tmp_path / "jpg", **kw)
    make_crawl(tmp_path / "png", image_format="png", **kw)
    jpg_rows = [json.loads(line) for line in (tmp_path / "jpg" / "crawl.jsonl").read_text().splitlines()]
    png_rows = [json.loads(line) for line in (tmp_path / "png" / "crawl.jsonl").read_text().splitlines()]
    assert [r["key"] for r in jpg_rows] == [r["key"] for r in png_rows]
    for j, p in zip(jpg_rows, png_rows):
        assert p["path"].endswith(".png") and p["url"].endswith(".png") and j["caption"] == p["caption"]
        png = np.asarray(Image.open(tmp_path / "png" / p["path"]).convert("RGB"), dtype=np.float32)
        jpg = np.asarray(Image.open(tmp_path / "jpg" / j["path"]).convert("RGB"), dtype=np.float32)
        assert 0 < np.abs(png - jpg).mean() < 12  # the same scene; JPEG adds its artifacts
    with tarfile.open(next((tmp_path / "png" / "shards").glob("*.tar"))) as tar:
        assert any(m.name.endswith(".png") for m in tar.getmembers())
    with pytest.raises(InputError, match="image format"):
        make_crawl(tmp_path / "gif", image_format="gif", **kw)


@pytest.mark.parametrize("noise,expect_clean", [(0.0, True), (1.0, False)])
def test_crawl_noise_extremes(tmp_path, noise, expect_clean):
    make_crawl(tmp_path / "c", 6, noise, seed=0, images_per_page=(2, 3), size=32, shard_size=0)
    kinds = set(load_ground_truth(tmp_path / "c")["page_kinds"].values())
    assert (kinds == {"clean"}) if expect_clean else ("clean" not in kinds and kinds)
    assert not (tmp_path / "c" / "shards").exists()


@pytest.mark.parametrize("kwargs", [
    {"num_subjects": -1}, {"num_subjects": 0}, {"noise_pages_fraction": 1.5},
    {"noise_pages_fraction": -0.1}, {"images_per_page": (5, 2)}, {"size": 8},
])
def test_crawl_rejects_bad_input(tmp_path, kwargs):
    args = dict(num_subjects=4, noise_pages_fraction=0.2, seed=0) | kwargs
    with pytest.raises(InputError):
        make_crawl(tmp_path / "x", **args)


def test_crawl_rejects_non_empty_output(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        make_crawl(tmp_path, 4, 0.2, seed=0)


# --- CLI ---------------------------------------------------------------------------------------

def test_cli_make_show_export(tmp_path, capsys):
    from conftest import exit_code
    from orchestration.cli import main

    out = tmp_path / "w"
    assert main(["world", "make", "--output", str(out), "--subjects", "6", "--noise-pages",
                 "0.2", "--seed", "1", "--size", "32", "--images-per-page-min", "2",
                 "--images-per-page-max", "3"]) == 0
    assert (out / "crawl.jsonl").is_file() and (out / "ground_truth.json").is_file()
    assert main(["world", "show", "--world", str(out)]) == 0
    sid = load_world(out).train_subjects[0].subject_id
    assert main(["world", "export-subject", "--world", str(out), "--subject", sid,
                 "--output", str(tmp_path / "inst"), "--n", "3", "--size", "32"]) == 0
    assert len(list((tmp_path / "inst").glob("*.png"))) == 3
    capsys.readouterr()
    assert main(["world", "make", "--output", str(out)]) == 2  # not empty
    assert exit_code(["world", "make", "--output", str(tmp_path / "n"), "--subjects", "-2"]) == 2
    assert exit_code(["world", "make", "--output", str(tmp_path / "n"), "--noise-pages", "2"]) == 2
    assert not (tmp_path / "n").exists()
    assert main(["world", "export-subject", "--world", str(tmp_path), "--subject", sid,
                 "--output", str(tmp_path / "e")]) == 2
    assert "suti: error:" in capsys.readouterr().err


def test_cli_pretrain_continue_rejects_bad_input_before_training(tmp_path, capsys):
    """``suti world pretrain --continue-from``: a folder that is not a toy pipeline, another
    model than t2i, or a non-empty output stop with exit code 2 and say which."""
    from orchestration.cli import main

    out = tmp_path / "p"
    assert main(["world", "pretrain", "--continue-from", str(tmp_path / "nope"), "--output", str(out)]) == 2
    assert "not a toy pipeline folder" in capsys.readouterr().err
    assert main(["world", "pretrain", "--what", "clip", "--continue-from", "shipped", "--output", str(out)]) == 2
    assert "--what t2i only" in capsys.readouterr().err
    assert main(["world", "pretrain", "--continue-from", "shipped", "--subjects", "10", "--output", str(out)]) == 2
    assert "subjects must be >=" in capsys.readouterr().err
    (out / "t2i").mkdir(parents=True)
    (out / "t2i" / "keep.txt").write_text("earlier results")
    pipeline = tmp_path / "pipe"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    assert main(["world", "pretrain", "--continue-from", str(pipeline), "--output", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "t2i" / "keep.txt").read_text() == "earlier results"
