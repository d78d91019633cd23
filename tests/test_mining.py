"""Tests of subject mining (mining.crawl, embed, cluster, prompts and ``suti mine``).

The embedding model is the toy CLIP (``toy-clip`` of :mod:`suti.scoring`) when it and its
shipped weights are there; otherwise a colour-histogram stand-in scorer runs every test but the
purity/recall one (whose thresholds are calibrated for the toy CLIP).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import re
import shutil
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mining import embed as embed_mod
from mining.cluster import REASONS, Thresholds, cluster_id, mine_clusters
from mining.crawl import detect_format, iter_records, load_crawl_images
from mining.embed import embed_records, embed_records_ray
from mining.prompts import SKILLS, estimate_class_noun, seen_vocabulary, template_prompts
from orchestration.cli import main
from suti.errors import InputError
from suti.world import ACCESSORIES, COLORS, CONTEXTS, STYLES, caption, load_ground_truth, make_crawl
from suti.world.spec import make_world


def _toy_clip_ready() -> bool:
    try:
        import suti.scoring  # noqa: F401
        from suti.world.toy_clip import WEIGHTS_DIR
    except ImportError:
        return False
    return (WEIGHTS_DIR / "toy_clip.safetensors").is_file()


TOY = _toy_clip_ready()


class HistScorer:
    """Stand-in scorer: colour histogram of the image centre; colour words of the text."""

    @staticmethod
    def _hist(pixels: np.ndarray) -> np.ndarray:
        q = pixels.reshape(-1, 3).astype(int) // 64
        return np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64).astype(np.float32)

    def embed_images(self, images):
        import torch

        rows = [np.sqrt(self._hist(np.asarray(im.convert("RGB").resize((32, 32)))[8:24, 8:24]))
                for im in images]
        x = torch.tensor(np.stack(rows)) if rows else torch.zeros(0, 64)
        return torch.nn.functional.normalize(x, dim=-1)

    def embed_texts(self, texts):
        import torch

        rows = []
        for t in texts:
            h = np.full(64, 1e-3, np.float32)
            for w in re.findall(r"[a-z]+", t.lower()):
                if w in COLORS:
                    h += self._hist(np.array([COLORS[w]]))
            rows.append(np.sqrt(h))
        x = torch.tensor(np.stack(rows)) if rows else torch.zeros(0, 64)
        return torch.nn.functional.normalize(x, dim=-1)


def _scorer_factory():
    return embed_mod.load_scorer("toy-clip") if TOY else HistScorer()


#: Extra ``suti mine`` options: the stand-in needs its own (loose) thresholds.
MINE_ARGS = [] if TOY else ["--model", "hist-standin", "--min-image-sim", "0.5",
                            "--min-pair-sim", "0", "--min-text-sim", "-1",
                            "--outlier-threshold", "0.5"]


@pytest.fixture(autouse=True)
def _standin(monkeypatch):
    """Route ``--model hist-standin`` to the stand-in scorer."""
    real = embed_mod.load_scorer
    monkeypatch.setattr(embed_mod, "load_scorer", lambda model, pretrained=None: HistScorer()
                        if model == "hist-standin" else real(model, pretrained))


@pytest.fixture(scope="module")
def crawl(tmp_path_factory) -> Path:
    """A 40-subject world crawl with 20% noise pages, in several small shards."""
    out = tmp_path_factory.mktemp("crawl") / "w"
    make_crawl(out, 40, 0.2, seed=7, shard_size=64)
    return out


def _mine(crawl_arg, out: Path, *extra) -> dict:
    assert main(["mine", "--crawl", str(crawl_arg), "--output", str(out), *MINE_ARGS,
                 *extra]) == 0
    rows = [json.loads(line) for line in (out / "clusters.jsonl").read_text().splitlines()]
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    return {"kept": rows, "dropped": dropped,
            "stats": json.loads((out / "stats.json").read_text())}


@pytest.mark.skipif(not TOY, reason="needs suti.scoring and the shipped toy CLIP weights")
def test_purity_and_recall_against_ground_truth(crawl, tmp_path):
    from mining.evaluate import evaluate

    res = _mine(crawl, tmp_path / "m")
    rows = res["kept"]
    m = evaluate([r["keys"] for r in rows], [r["page_url"] for r in rows], load_ground_truth(crawl))
    assert m["purity"] >= 0.95 and m["recall"] >= 0.8, (m, res["stats"])


def test_mine_writes_clusters_dropped_and_stats(crawl, tmp_path):
    res = _mine(crawl, tmp_path / "m")
    stats = res["stats"]
    assert res["kept"], stats
    for row in res["kept"]:
        assert row["cluster_id"] == cluster_id(row["page_url"])
        assert 3 <= len(row["keys"]) <= 10 and len(row["captions"]) == len(row["keys"])
        assert row["class_noun"] and len(row["prompts"]) == 12
        assert all("{S}" in p["prompt"] for p in row["prompts"])
        assert row["image_similarity"] >= stats["thresholds"]["min_image_sim"]
    assert stats["pages"] == len(res["kept"]) + len(res["dropped"])
    assert stats["kept_clusters"] == len(res["kept"]) and stats["model"]
    assert sum(stats["dropped_clusters"].values()) == len(res["dropped"])
    # every dropped page says why, with its numbers
    for row in res["dropped"]:
        assert row["reason"] in REASONS and row["keys"] and "image_similarity" in row
    truth = load_ground_truth(crawl)
    background = [p for p, k in truth["page_kinds"].items() if k == "background"]
    assert not {r["page_url"] for r in res["kept"]} & set(background)
    # the rows say where their images are: no need to scan the crawl (it is not even there)
    row = res["kept"][0]
    direct = load_crawl_images(tmp_path / "elsewhere", row["keys"], sources=row["sources"])
    scanned = load_crawl_images(crawl, row["keys"])
    assert all(np.array_equal(np.asarray(direct[k]), np.asarray(scanned[k])) for k in row["keys"])
    assert not list(tmp_path.glob("m/.*tmp*"))  # atomic writes leave no temporary file
    # no silent overwrite
    assert main(["mine", "--crawl", str(crawl), "--output", str(tmp_path / "m")]) == 2


def test_drop_reasons_for_size_limits(crawl, tmp_path):
    res = _mine(crawl, tmp_path / "a", "--min-images", "9", "--max-images", "9")
    reasons = Counter(r["reason"] for r in res["dropped"])
    assert reasons["too_few_images"] > 0 and not res["kept"]
    res = _mine(crawl, tmp_path / "b", "--min-images", "2", "--max-images", "2",
                "--min-image-sim", "-1", "--outlier-threshold", "-1")
    assert Counter(r["reason"] for r in res["dropped"])["too_many_images"] > 0
    res = _mine(crawl, tmp_path / "c", "--min-text-sim", "1")
    assert not res["kept"]
    assert {r["reason"] for r in res["dropped"]} >= {"low_text_similarity"}


def _copy_images(crawl: Path, dest: Path) -> Path:
    shutil.copytree(crawl / "images", dest)
    return dest


def test_corrupt_and_tiny_images_are_skipped_and_counted(crawl, tmp_path):
    folder = _copy_images(crawl, tmp_path / "images")
    jpgs = sorted(folder.glob("*.jpg"))
    data = jpgs[0].read_bytes()
    jpgs[0].write_bytes(data[: len(data) // 3])  # truncated
    jpgs[1].write_bytes(b"this is not an image")
    jpgs[2].write_bytes(b"")
    buf = io.BytesIO()
    Image.new("RGB", (12, 40), (200, 10, 10)).save(buf, format="JPEG")
    jpgs[3].write_bytes(buf.getvalue())  # tiny
    res = _mine(folder, tmp_path / "m")
    stats = res["stats"]
    assert stats["skipped_images"] == {"too_small": 1, "unreadable": 3}
    assert stats["usable_images"] == stats["images"] - 4
    bad = {p.stem for p in jpgs[:4]}
    assert not bad & {k for r in res["kept"] for k in r["keys"]}
    skipped = {k: v for r in res["kept"] + res["dropped"] for k, v in r["skipped"].items()}
    assert skipped == {jpgs[0].stem: "unreadable", jpgs[1].stem: "unreadable",
                       jpgs[2].stem: "unreadable", jpgs[3].stem: "too_small"}
    # a smaller minimum side lets the tiny image through
    res = _mine(folder, tmp_path / "m2", "--min-side", "8")
    assert res["stats"]["skipped_images"] == {"unreadable": 3}


def _manifest(crawl: Path, dest: Path, lines: list[str] | None = None) -> Path:
    text = (crawl / "crawl.jsonl").read_text().splitlines()
    rows = [json.loads(t) for t in text]
    for r in rows:
        r["path"] = str(crawl / r["path"])  # absolute paths
    out = [json.dumps(r) for r in rows] if lines is None else lines
    dest.write_text("\n".join(out) + "\n")
    return dest


def test_malformed_jsonl_line_is_reported_with_its_line_number(crawl, tmp_path, capsys, caplog):
    lines = (crawl / "crawl.jsonl").read_text().splitlines()
    row = json.loads(lines[4])
    del row["page_url"]
    bad = lines[:2] + ['{"key": "broken", "path": '] + lines[3:4] + [json.dumps(row)] + lines[5:]
    manifest = tmp_path / "crawl.jsonl"
    manifest.write_text("\n".join(bad) + "\n")
    shutil.copytree(crawl / "images", tmp_path / "images")
    assert main(["mine", "--crawl", str(manifest), "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "not JSON" in err
    only5 = tmp_path / "only5.jsonl"
    only5.write_text("\n".join(lines[:4] + [json.dumps(row)] + lines[5:]) + "\n")
    with pytest.raises(InputError, match=r"line 5: .*page_url"):
        list(iter_records(only5, on_bad_line="error"))
    with caplog.at_level(logging.WARNING):
        res = _mine(manifest, tmp_path / "m2", "--on-bad-line", "skip")
    assert res["stats"]["skipped_samples"] == {"malformed_manifest_line": 2}
    assert "3, 5" in caplog.text


def test_all_four_crawl_formats_give_the_same_clusters(crawl, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(t) for t in (crawl / "crawl.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), crawl / "crawl.parquet")
    inputs = {"shards": crawl / "shards", "folder": crawl / "images",
              "jsonl": crawl / "crawl.jsonl", "parquet": crawl / "crawl.parquet"}
    results = {}
    for name, path in inputs.items():
        assert detect_format(path)[0] == name
        res = _mine(path, tmp_path / name)
        results[name] = [(r["cluster_id"], r["keys"], r["captions"], r["prompts"])
                         for r in res["kept"]]
        assert res["stats"]["images"] == len(rows) and res["stats"]["crawl_format"] == name
    assert results["shards"] and len({json.dumps(v) for v in results.values()}) == 1
    # shards also as a brace pattern, a glob, a single tar and through the world folder
    assert len(list((crawl / "shards").glob("*.tar"))) > 1
    want = [(r.key, r.caption, r.url, r.page_url) for r in iter_records(crawl / "shards")]
    for path in (crawl / "shards" / "crawl-{00000..00099}.tar", crawl / "shards" / "crawl-*.tar",
                 crawl):
        assert detect_format(path)[0] == "shards"
        assert [(r.key, r.caption, r.url, r.page_url) for r in iter_records(path)] == want
    one = [r.key for r in iter_records(crawl / "shards" / "crawl-00001.tar")]
    assert one == [k for k, *_ in want[64:128]]


def test_load_crawl_images(crawl):
    keys = ["000000003", "000000100", "000000007"]
    for src in (crawl / "shards", crawl / "crawl.jsonl"):
        images = load_crawl_images(src, keys)
        assert sorted(images) == sorted(keys)
        assert all(im.mode == "RGB" and im.size == (64, 64) for im in images.values())
    # a gzipped shard is read too (bytes inline instead of a byte range)
    import gzip

    gz = crawl.parent / "crawl-00000.tar.gz"
    gz.write_bytes(gzip.compress((crawl / "shards" / "crawl-00000.tar").read_bytes()))
    assert [r.key for r in iter_records(gz)] == [f"{i:09d}" for i in range(64)]
    assert np.array_equal(np.asarray(load_crawl_images(gz, ["000000003"])["000000003"]),
                          np.asarray(images["000000003"]))
    with pytest.raises(InputError, match="not in the crawl"):
        load_crawl_images(crawl / "shards", ["nope"])
    assert load_crawl_images(crawl / "shards", ["nope", "000000003"], strict=False).keys() == {
        "000000003"}


def test_prompts_cover_skills_and_levels_deterministically():
    caps = ["a red star toy on the beach", "my star toy in the snow", "IMG_0001", ""]
    prompts = template_prompts("c0123", caps, 12, seed=3)
    assert prompts == template_prompts("c0123", caps, 12, seed=3)
    assert prompts != template_prompts("c0123", caps, 12, seed=4)
    assert prompts != template_prompts("c9999", caps, 12, seed=3)
    assert len({p["prompt"] for p in prompts}) == 12
    assert {p["level"] for p in prompts} == {1, 2, 3}
    assert {p["skill"] for p in prompts if p["level"] == 1} == set(SKILLS)
    for p in prompts:
        assert len(p["skill"].split("+")) == p["level"] and "{S}" in p["prompt"]
        assert "beach" not in p["prompt"] and "snow" not in p["prompt"]  # unseen contexts
        assert not re.search(r"\bred\b", p["prompt"].replace("red brick", ""))
    assert seen_vocabulary(caps)["context"] == {"beach", "snow"}
    # every prompt is a caption the synthetic world can render ({S} = "sks star toy")
    subject = make_world(6, seed=0).subjects[0]
    renderable = {caption(subject, ctx, color_override=col, accessory=acc, style=sty,
                          identifier="sks")
                  for ctx in [None, *CONTEXTS] for col in [None, *COLORS]
                  for acc in [None, *ACCESSORIES] for sty in [None, *STYLES]}
    for seed in range(5):
        for p in template_prompts(f"c{seed}", caps, 12, seed):
            assert p["prompt"].replace("{S}", f"sks {subject.class_noun}") in renderable


def test_pages_whose_alt_texts_disagree_have_no_common_noun():
    from mining.prompts import noun_support

    mixed = ["a brown polka-dot robot wearing a hat on a blue carpet", "ball", "photo",
             "a black striped ball in front of a red brick wall", "photo"]
    assert estimate_class_noun(mixed) == "ball" and noun_support(mixed, "ball") == 2 / 3
    backgrounds = ["jungle leaves background", "view of a red brick wall", "sandy beach"]
    assert estimate_class_noun(backgrounds) == "object"
    assert noun_support(backgrounds, "object") == 0.0
    clean = ["a red star toy on the beach", "IMG_0001", "", "look at this star toy!"]
    assert noun_support(clean, "star toy") == 1.0


def test_class_noun_estimate():
    assert estimate_class_noun(["a red striped star toy on the beach", "my star toy downtown",
                                "star toy", "IMG_0412", "look at this star toy!"]) == "star toy"
    assert estimate_class_noun(["a blue polka-dot teddy bear wearing a hat in the snow",
                                "teddy bear", "our blue teddy bear"]) == "teddy bear"
    assert estimate_class_noun(["a green cup on the grass", "cup by the wall", "DSC00012.JPG"]
                               ) == "cup"
    assert estimate_class_noun(["", "IMG_0001", "untitled"]) == "object"


def test_llm_prompt_generator_needs_a_local_model(crawl, tmp_path, capsys):
    code = main(["mine", "--crawl", str(crawl), "--output", str(tmp_path / "m"),
                 "--prompt-generator", "llm", "--llm-model", str(tmp_path / "no-model")])
    assert code == 2 and "--llm-model" in capsys.readouterr().err


def test_cluster_filters_duplicates_and_outliers():
    from mining.crawl import Record
    from mining.embed import CrawlEmbeddings

    e = np.eye(4, dtype=np.float32)
    a = e[0] * 0.95 + e[1] * 0.3
    vecs = [e[0], e[0], a / np.linalg.norm(a), e[0] * 0.9 + e[1] * 0.436, e[3]]
    img = np.stack([v / np.linalg.norm(v) for v in vecs]).astype(np.float32)
    recs = [Record(f"k{i}", "a star toy", "", "https://x/p") for i in range(5)]
    emb = CrawlEmbeddings(recs, img, img.copy(), np.ones(5, bool))
    th = Thresholds(min_image_sim=0.8, min_pair_sim=0.8, min_text_sim=0.5, dedup=0.99,
                    outlier=0.5, min_noun_support=0.75)
    kept, dropped = mine_clusters(emb, th)
    assert not dropped and kept[0].keys == ["k0", "k2", "k3"]
    assert kept[0].duplicates == {"k1": "k0"} and kept[0].outliers == ["k4"]
    assert kept[0].class_noun == "star toy" and kept[0].noun_support == 1.0
    # the same images with alt texts naming different things
    for rec, cap in zip(recs, ["a cup", "a cup", "a ball", "a robot", "a star toy"]):
        rec.caption = cap
    kept, dropped = mine_clusters(emb, th)
    assert not kept and dropped[0].reason == "no_common_noun"
    kept, dropped = mine_clusters(emb, replace(th, min_pair_sim=0.95))
    assert dropped[0].reason == "low_pair_similarity" and dropped[0].min_pair_similarity < 0.95


@pytest.mark.slow
def test_ray_data_embedding_equals_in_process(crawl, tmp_path):
    ray = pytest.importorskip("ray")
    import ray.cloudpickle

    folder = _copy_images(crawl, tmp_path / "images")
    sorted(folder.glob("*.jpg"))[1].write_bytes(b"broken")
    records = list(iter_records(folder))[:24]
    local = embed_records(records, _scorer_factory(), batch_size=8)
    single = embed_records(records, _scorer_factory(), batch_size=1)  # an all-bad batch too
    np.testing.assert_allclose(single.image, local.image, atol=1e-5)
    # Ray workers cannot import this test module: ship its stand-in scorer by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = embed_records_ray(records, functools.partial(_scorer_factory), batch_size=8,
                                   actors=1)
    finally:
        if started:
            ray.shutdown()
    assert [r.key for r in remote.records] == [r.key for r in local.records]
    assert len(local.records) == 23 and local.skipped_counts == {"unreadable": 1}
    assert remote.skipped_counts == local.skipped_counts
    np.testing.assert_allclose(remote.image, local.image, atol=1e-5)
    np.testing.assert_allclose(remote.text, local.text, atol=1e-5)
    assert (remote.has_text == local.has_text).all()


def test_shard_samples_without_page_url_or_image_are_counted(crawl, tmp_path):
    import tarfile

    src = sorted((crawl / "shards").glob("*.tar"))[0]
    dest = tmp_path / "shards" / "bad-00000.tar"
    dest.parent.mkdir()
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        for i, m in enumerate(tin):
            data = tin.extractfile(m).read()
            key = m.name.split(".")[0]
            if key == "000000001" and m.name.endswith(".json"):
                data = json.dumps({"key": key, "url": "u"}).encode()  # no page_url
            if key == "000000002" and m.name.endswith(".jpg"):
                continue  # no image member
            if key == "000000003" and m.name.endswith(".jpg"):
                data = data[:40]  # truncated image
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    counts = Counter()
    records = list(iter_records(dest.parent, counts))
    assert counts == {"no_page_url": 1, "no_image_member": 1}
    assert "000000003" in {r.key for r in records} and len(records) == 64 - 2
    emb = embed_records(records, _scorer_factory())
    assert emb.skipped_counts == {"unreadable": 1}


def test_llm_prompt_generator_with_a_tiny_local_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from mining.prompts import llm_prompts

    words = ["<unk>", "<eos>", "a", "{S}", "on", "the", "beach", "wearing", "hat", "green", "1."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>"
                            ).save_pretrained(tmp_path / "llm")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_positions=512, n_embd=16, n_layer=1,
                               n_head=2)).save_pretrained(tmp_path / "llm")
    prompts = llm_prompts("c1", ["a red cup on the beach"], "cup", str(tmp_path / "llm"), n=6)
    assert len(prompts) == 6  # a random model's lines are filtered, templates fill the rest
    for p in prompts:
        assert p["prompt"].count("{S}") == 1 and 1 <= p["level"] <= 3
        assert set(p["skill"].split("+")) <= set(SKILLS)


def _dotted_crawl(tmp_path: Path) -> tuple[Path, Path]:
    """4 pages x 7 images with img2dataset-style dotted keys, as one tar and as a folder."""
    import tarfile

    folder, tar_path = tmp_path / "folder", tmp_path / "tar" / "crawl-00000.tar"
    folder.mkdir()
    tar_path.parent.mkdir()
    rng = np.random.default_rng(0)
    with tarfile.open(tar_path, "w") as tar:
        for page in range(4):
            colour = [int(c) for c in rng.integers(0, 255, 3)]
            for i in range(7):
                key = f"img.2024.05_{page:02d}{i:02d}"
                pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (40, 40, 3)), 0, 255)
                buf = io.BytesIO()
                Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
                meta = {"key": key, "url": f"https://example.com/{key}.png",
                        "page_url": f"https://example.com/page/{page}"}
                for ext, data in (("png", buf.getvalue()), ("txt", f"a red toy {i}".encode()),
                                  ("json", json.dumps(meta).encode())):
                    (folder / f"{key}.{ext}").write_bytes(data)
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            # a stray member without a known field is counted, never silently lost
        info = tarfile.TarInfo("README")
        tar.addfile(info, io.BytesIO(b""))
    return tar_path, folder


def test_dotted_img2dataset_keys_read_like_the_folder_layout(tmp_path):
    tar_path, folder = _dotted_crawl(tmp_path)
    counts = Counter()
    from_tar = [(r.key, r.caption, r.page_url) for r in iter_records(tar_path, counts)]
    from_folder = [(r.key, r.caption, r.page_url) for r in iter_records(folder)]
    assert len(from_tar) == 28 and from_tar == from_folder
    assert from_tar[0] == ("img.2024.05_0000", "a red toy 0", "https://example.com/page/0")
    assert counts == {"member:no_extension": 1}
    images = load_crawl_images(tar_path, [k for k, *_ in from_tar[:3]])
    assert [im.size for im in images.values()] == [(40, 40)] * 3


def test_mine_reads_every_dotted_key(tmp_path):
    tar_path, folder = _dotted_crawl(tmp_path)
    res = {name: _mine(path, tmp_path / name, "--min-images", "3")
           for name, path in (("tar", tar_path.parent), ("folder", folder))}
    for r in res.values():
        assert r["stats"]["images"] == 28 and r["stats"]["pages"] == 4
        assert r["stats"]["skipped_samples"] == {} and r["stats"]["skipped_images"] == {}
    assert res["tar"]["stats"]["skipped_tar_members"] == {"no_extension": 1}
    assert [r["keys"] for r in res["tar"]["kept"]] == [r["keys"] for r in res["folder"]["kept"]]
