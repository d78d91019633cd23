"""Photos as people take them (issue 34): aspect-ratio buckets, SDXL's true sizes in
``time_ids``, per-image captions, caption dropout and the resize filter of expert training
(and the apprentice's --caption-dropout), each by its effect, on the tiny presets."""

import json

import pytest
import torch
from PIL import Image

from conftest import draw_subject, subject_photos
from experts import load_pipeline, resolve_config
from experts.batched import check_batchable
from experts.buckets import bucket_ladder, nearest_bucket, parse_buckets
from experts.latents import latent_sets, load_training_pixels
from experts.train import train_expert
from orchestration.cli import main
from suti.errors import InputError

SHAPES = {"portrait_0": (96, 160), "portrait_1": (100, 150), "landscape_0": (160, 96), "landscape_1": (150, 100)}  # (width, height)


@pytest.fixture()
def mixed_dir(tmp_path):
    """Two portrait and two landscape photos."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, (name, size) in enumerate(SHAPES.items()):
        draw_subject(i, size=160).resize(size).save(folder / f"{name}.png")
    return folder


def config(folder, **overrides):
    base = dict(model="tiny", instance_dir=str(folder), class_noun="star toy", steps=2, prior_preservation=False, report_to="none")
    base.update(overrides)
    return resolve_config(base.pop("recipe", "dreambooth"), base)


def cli(*argv) -> int:
    try:
        return main(list(argv))
    except SystemExit as exc:  # argparse refusals
        return exc.code


def test_the_ladder_and_the_nearest_bucket_are_diffusers():
    from diffusers.training_utils import find_nearest_bucket, generate_aspect_ratio_buckets

    for resolution in (128, 512, 1024):
        assert bucket_ladder(resolution) == generate_aspect_ratio_buckets(resolution, divisibility=64)
    ladder = bucket_ladder(512)
    for h, w in [(3000, 4000), (4000, 3000), (1080, 1920), (512, 512), (700, 300)]:
        assert nearest_bucket(h, w, ladder) == ladder[find_nearest_bucket(h, w, ladder)]
    assert nearest_bucket(4000, 3000, ladder)[0] > nearest_bucket(4000, 3000, ladder)[1], "a portrait photo goes to a portrait bucket"
    assert parse_buckets("512,512; 576,448") == [(512, 512), (576, 448)]
    for bad in ("512x512", "512,500", "0,512", ""):
        with pytest.raises(InputError, match="--aspect-ratio-buckets"):
            parse_buckets(bad)


def test_each_photo_is_resized_to_cover_its_bucket_and_cropped_as_torchvision(mixed_dir):
    paths = sorted(mixed_dir.glob("*.png"))
    buckets = bucket_ladder(128)
    images = load_training_pixels(paths, 128, buckets=buckets)
    for path, x, size, original, crop in zip(paths, images, images.sizes, images.original_sizes, images.crop_top_lefts):
        w, h = SHAPES[path.stem]
        assert original == (h, w) and size == nearest_bucket(h, w, buckets) and x.shape == (3, *size)
        scale = max(size[0] / h, size[1] / w)
        assert crop == (int(round((round(h * scale) - size[0]) / 2)), int(round((round(w * scale) - size[1]) / 2)))
    assert {s[0] > s[1] for s in images.sizes} == {True, False}, "portrait and landscape buckets"
    whole = load_training_pixels(paths, 128, center_crop=False, buckets=buckets)
    assert whole.crop_top_lefts is None and all(x.shape[1] >= s[0] and x.shape[2] >= s[1] for x, s in zip(whole, whole.sizes))


def test_a_step_draws_one_bucket_and_class_images_follow_it(mixed_dir, class_photos):
    vae = load_pipeline("tiny").vae
    paths = sorted(mixed_dir.glob("*.png"))
    inst_images = load_training_pixels(paths, 128, buckets=bucket_ladder(128))
    class_images = load_training_pixels(class_photos, 128)
    inst, cls = latent_sets(vae, inst_images, class_images, bucketed=True)
    g = torch.Generator().manual_seed(0)
    seen = torch.zeros(len(paths))
    for _ in range(200):
        idx = inst.draw_indices(3, g)
        assert len({inst_images.sizes[j] for j in idx.tolist()}) == 1, "the rows of a step share a bucket"
        mean, _ = inst.latents(idx, None, None)
        c_mean, _ = cls.latents(cls.draw_indices(3, g), None, None)
        assert c_mean.shape == mean.shape, "the class rows are at the instance rows' bucket"
        seen += torch.bincount(idx, minlength=len(paths))
    assert (seen / seen.sum() - 0.25).abs().max() < 0.06, "each photo about 1/N of the rows"


@pytest.fixture()
def class_photos(tmp_path):
    return sorted(subject_photos(tmp_path / "class", [50, 51], size=128).glob("*.png"))


@pytest.mark.slow
def test_acceptance_experts_train_on_portrait_and_landscape_photos_and_record_the_buckets(mixed_dir, tmp_path, monkeypatch):
    import experts.train as train

    shapes = []
    real = train.draw_training_batch
    monkeypatch.setattr(train, "draw_training_batch", lambda *a, **k: (lambda out: shapes.append(tuple(out[0].shape[-2:])) or out)(real(*a, **k)))
    out = tmp_path / "e"
    code = cli("expert", "train", "--model", "tiny", "--instance-dir", str(mixed_dir), "--class-noun", "star toy", "--output", str(out),
               "--aspect-ratio-buckets", "--resolution", "128", "--steps", "6", "--no-prior-preservation", "--report-to", "none")
    assert code == 0
    cfg = json.loads((out / "expert.json").read_text())["config"]
    assert cfg["aspect_ratio_buckets"] == "auto"
    recorded = {tuple(b["size"]): sorted(b["images"]) for b in cfg["extra"]["aspect_ratio_buckets"]}
    assert sorted(n for names in recorded.values() for n in names) == sorted(f"{n}.png" for n in SHAPES)
    assert all(name.startswith("portrait") for size, names in recorded.items() if size[0] > size[1] for name in names)
    assert all(name.startswith("landscape") for size, names in recorded.items() if size[0] < size[1] for name in names)
    vae_scale = 2 ** (len(load_pipeline("tiny").vae.config.block_out_channels) - 1)  # latent side = pixels / vae scale
    latent_buckets = {(h // vae_scale, w // vae_scale) for h, w in recorded}
    assert set(shapes) <= latent_buckets and any(h > w for h, w in shapes) and any(h < w for h, w in shapes), "both shapes trained, at their buckets"


def test_bucket_refusals_are_one_line_before_any_write(mixed_dir, tmp_path, capsys):
    base = ["expert", "train", "--model", "tiny", "--instance-dir", str(mixed_dir), "--class-noun", "star toy", "--no-prior-preservation"]
    assert cli(*base, "--output", str(tmp_path / "a"), "--aspect-ratio-buckets", "500,512") == 2
    assert "--aspect-ratio-buckets" in capsys.readouterr().err
    assert cli(*base, "--output", str(tmp_path / "b"), "--aspect-ratio-buckets") == 2, "tiny's 32 px is below two bucket steps"
    assert "--resolution" in capsys.readouterr().err
    assert cli(*base, "--output", str(tmp_path / "c"), "--caption-extension", ".png") == 2
    assert cli(*base, "--output", str(tmp_path / "d"), "--image-interpolation-mode", "cubic") == 2
    assert cli(*base, "--output", str(tmp_path / "e"), "--caption-dropout", "1.5") == 2
    assert not any((tmp_path / x).exists() for x in "abcde")
    for field, value in (("aspect_ratio_buckets", "auto"), ("caption_extension", ".txt"), ("caption_dropout", 0.1)):
        lora = config(mixed_dir, recipe="dreambooth-lora", **{field: value})
        with pytest.raises(InputError, match=field):
            check_batchable([lora])


def test_sdxl_time_ids_are_each_photos_original_size_and_crop(tmp_path, monkeypatch):
    """diffusers' compute_time_ids(original_size, crop_top_left) + target size, not (R, R, 0, 0, R, R)."""
    import experts.rows as rows

    folder = tmp_path / "tall"
    folder.mkdir()
    draw_subject(0, size=48).resize((48, 80)).save(folder / "tall.png")  # width 48, height 80
    seen = []
    real = rows.with_time_ids
    monkeypatch.setattr("experts.train.with_time_ids", lambda *a: (lambda c: seen.append(c.added_cond_kwargs["time_ids"].clone()) or c)(real(*a)))
    train_expert(config(folder, model="tiny-sdxl", steps=1), tmp_path / "centre", progress=False)
    # shorter side to 32: 32 x round(80 * 32 / 48) = 53 rows; centre crop top round((53 - 32) / 2) = 10
    assert seen[-1].tolist() == [[80.0, 48.0, 10.0, 0.0, 32.0, 32.0]]
    seen.clear()
    train_expert(config(folder, model="tiny-sdxl", steps=6, center_crop=False), tmp_path / "random", progress=False)
    tops = {int(t[0, 2]) for t in seen}
    assert all(t[0, [0, 1, 3, 4, 5]].tolist() == [80.0, 48.0, 0.0, 32.0, 32.0] for t in seen) and len(tops) > 1 and max(tops) <= 21, "each step's own crop"


def test_per_image_captions_are_the_rows_prompts(instance_dir, tmp_path, monkeypatch):
    import suti.conditioning as conditioning

    (instance_dir / "photo_0.txt").write_text("a photo of {V} {class} on green grass\n")
    (instance_dir / "photo_1.txt").write_text("zwx star toy beside a cup")  # the identifier itself
    seen = []
    real = conditioning.tokenize
    monkeypatch.setattr(conditioning, "tokenize", lambda tok, prompts: seen.extend(prompts) or real(tok, prompts))
    info = train_expert(config(instance_dir, identifier="zwx", caption_extension=".txt"), tmp_path / "e", progress=False)
    assert info.config["caption_extension"] == ".txt"
    assert {"a photo of zwx star toy on green grass", "zwx star toy beside a cup", "a zwx star toy"} <= set(seen), "captions and, without one, the instance prompt"
    seen.clear()
    train_expert(config(instance_dir, identifier="zwx", caption_extension=".txt", train_text_encoder=True, steps=2, batch_size=4), tmp_path / "t", progress=False)
    assert "a photo of zwx star toy on green grass" in seen, "encoded per step when the text encoder trains"
    (instance_dir / "photo_2.txt").write_text("a toy on a table")
    assert cli("expert", "train", "--model", "tiny", "--instance-dir", str(instance_dir), "--class-noun", "star toy", "--output", str(tmp_path / "bad"),
               "--caption-extension", ".txt", "--no-prior-preservation") == 2
    assert not (tmp_path / "bad").exists()


def test_caption_dropout_trains_instance_rows_on_the_empty_prompt(instance_dir, tmp_path, monkeypatch):
    import experts.train as train

    prompts = []
    real = train.row_prompts
    monkeypatch.setattr(train, "row_prompts", lambda *a: (lambda p: prompts.append(p) or p)(real(*a)))
    conds = []
    real_cond = train.cached_conditioning
    monkeypatch.setattr(train, "cached_conditioning", lambda *a: (lambda c: conds.append(c) or c)(real_cond(*a)))
    train_expert(config(instance_dir, identifier="zwx", caption_dropout=1.0, batch_size=2, prior_preservation=True, num_class_images=1, class_sample_steps=2), tmp_path / "all", progress=False)
    assert all(p == ["", "", "a star toy", "a star toy"] for p in prompts), "every instance row dropped, class rows kept"
    pipe = load_pipeline("tiny")
    from suti.conditioning import encode_prompt

    with torch.no_grad():
        empty, cls = encode_prompt(pipe, [""]), encode_prompt(pipe, ["a star toy"])
    torch.testing.assert_close(conds[0].encoder_hidden_states, torch.cat([empty.encoder_hidden_states] * 2 + [cls.encoder_hidden_states] * 2))
    from experts.rows import step_rows

    class Drawn:  # a latent set after a draw of 4000 rows
        last = (torch.zeros(4000, dtype=torch.long), None)

        def last_time_ids(self):
            return torch.zeros(4000, 6)

    g = torch.Generator().manual_seed(0)
    assert abs(float(step_rows(Drawn(), None, 4000, g, 0.3).drop.float().mean()) - 0.3) < 0.03
    state = g.get_state()
    assert step_rows(Drawn(), None, 4000, g, 0.0).drop is None and torch.equal(g.get_state(), state), "P = 0 draws nothing: the stream of runs without it"


def test_the_resize_filter_is_the_one_asked(tmp_path):
    photo = tmp_path / "p.png"
    draw_subject(3, size=96).resize((96, 120)).save(photo)
    img = Image.open(photo).convert("RGB")
    out = {}
    for mode, pil in (("lanczos", Image.Resampling.LANCZOS), ("nearest", Image.Resampling.NEAREST), ("bicubic", Image.Resampling.BICUBIC)):
        out[mode] = load_training_pixels([photo], 32, interpolation=mode)[0]
        resized = img.resize((32, 40), pil).crop((0, 4, 32, 36))
        torch.testing.assert_close(out[mode], torch.from_numpy(__import__("numpy").asarray(resized, dtype="float32") / 127.5 - 1).permute(2, 0, 1))
    assert not torch.equal(out["lanczos"], out["nearest"])
    assert config(tmp_path, class_noun="x").image_interpolation_mode == "lanczos", "diffusers' SDXL script's default"


def test_apprentice_caption_dropout_is_its_text_dropout():
    from apprentice.train_config import build_arg_parser, config_from_args

    parser = build_arg_parser()
    args = parser.parse_args(["--shards", "s", "--output", "o", "--caption-dropout", "0.3"])
    assert config_from_args(args).drop_text == 0.3
    assert config_from_args(parser.parse_args(["--shards", "s", "--output", "o"])).drop_text == 0.1
    with pytest.raises(SystemExit):
        parser.parse_args(["--shards", "s", "--output", "o", "--caption-dropout", "2"])


def test_apprentice_caption_dropout_drops_the_text_and_keeps_the_demos():
    from apprentice.objective import guidance_dropout
    from apprentice.train_config import ApprenticeTrainConfig
    from suti.conditioning import Conditioning

    text, null = Conditioning(torch.randn(2000, 4, 8)), Conditioning(torch.zeros(1, 4, 8))
    g = torch.Generator().manual_seed(0)
    cond, mask = guidance_dropout(ApprenticeTrainConfig(shards="s", output="o", drop_text=0.3, drop_demos=0.0, drop_both=0.0), 2000, text, null, g, "cpu")
    dropped = (cond.encoder_hidden_states == 0).all(dim=(1, 2))
    assert abs(float(dropped.float().mean()) - 0.3) < 0.04 and bool((mask == 1).all()), "text dropped at P, demos kept"
    torch.testing.assert_close(cond.encoder_hidden_states[~dropped], text.encoder_hidden_states[~dropped])
    cond, _ = guidance_dropout(ApprenticeTrainConfig(shards="s", output="o", drop_text=0.0, drop_demos=0.0, drop_both=0.0), 2000, text, null, g, "cpu")
    torch.testing.assert_close(cond.encoder_hidden_states, text.encoder_hidden_states)
