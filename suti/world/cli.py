"""``suti world ...``: make a synthetic world + crawl, show it, export a subject's photos,
pretrain the world models (toy text-to-image, small CLIP, probe)."""

from __future__ import annotations

import argparse
from pathlib import Path

from suti.checks import COUNT, COUNT_OR_ZERO, POSITIVE, PROBABILITY, SEED, whole
from suti.errors import InputError

#: Image sides of the world: 16 px (the smallest a subject is drawn at) to 4096.
WORLD_SIDE = whole(16, 4096)


def _load(path: str):
    from suti.world.spec import load_world

    p = Path(path)
    if not (p / "world.json").is_file() and not (p.is_file() and p.suffix == ".json"):
        raise InputError(f"{path} is neither a world folder (with world.json) nor a world.json")
    try:
        return load_world(p)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a valid world description ({exc})") from None


def cmd_make(args: argparse.Namespace) -> int:
    """``suti world make``: write a world, its crawl and the ground truth."""
    from suti.world.crawl import make_crawl

    summary = make_crawl(args.output, args.subjects, args.noise_pages, args.seed,
                         (args.images_per_page_min, args.images_per_page_max), args.size,
                         pages_per_subject=args.pages_per_subject,
                         heldout_fraction=args.heldout_fraction,
                         include_heldout=args.include_heldout, shard_size=args.shard_size,
                         image_format=args.image_format, progress=True)
    print(f"wrote {summary['images']} images on {summary['pages']} pages "
          f"({summary['clean_pages']} clean, {summary['noise_pages']} noise) of "
          f"{summary['crawled_subjects']}/{summary['subjects']} subjects "
          f"to {summary['output_dir']}")
    print(f"ground truth: {Path(args.output) / 'ground_truth.json'} (keep it away from mining)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """``suti world show``: list the subjects of a world."""
    world = _load(args.world)
    print(f"world seed {world.seed}: {len(world.subjects)} subjects "
          f"({len(world.train_subjects)} train, {len(world.heldout_subjects)} held out)")
    for s in world.subjects:
        print(f"{s.subject_id}  {world.splits[s.subject_id]:7s}  {s.description(detailed=True)}")
    return 0


def cmd_export_subject(args: argparse.Namespace) -> int:
    """``suti world export-subject``: write a subject's photos as a DreamBooth instance folder."""
    from suti.world.data import export_subject

    world = _load(args.world)
    paths = export_subject(world, args.subject, args.output, n=args.n, seed=args.seed,
                           size=args.size)
    subject = world.subject(args.subject)
    print(f"wrote {len(paths)} photos of {args.subject} (class noun {subject.class_noun!r}: "
          f"{subject.description()}) to {args.output}")
    return 0


def _call(func, out_dir: Path, args: argparse.Namespace):
    """Call a ``pretrain_*(out_dir, ...)`` with the options its signature accepts."""
    import inspect

    params = inspect.signature(func).parameters
    kwargs = {k: getattr(args, k) for k in ("seed", "minutes")
              if k in params and getattr(args, k) is not None}
    return func(out_dir, **kwargs)


def cmd_pretrain(args: argparse.Namespace) -> int:
    """``suti world pretrain``: pretrain world models into OUTPUT/{t2i,clip,probe}."""
    import importlib

    if args.continue_from is not None:
        if args.what != "t2i":
            raise InputError("--continue-from applies to --what t2i only")
        from suti.world.toy_t2i import WEIGHTS_DIR
        from suti.world.training.t2i import continue_t2i

        # continue_t2i checks the folders before training (InputError: exit code 2)
        init = WEIGHTS_DIR if args.continue_from == "shipped" else Path(args.continue_from)
        target = Path(args.output) / "t2i"
        kwargs = {"minutes": args.minutes} if args.minutes is not None else {}
        continue_t2i(target, init=init, seed=1 if args.seed is None else args.seed,
                     subjects=args.subjects, **kwargs)
        print(f"continue_t2i: wrote {target}")
        return 0
    jobs = {"t2i": [("suti.world.training.t2i", "pretrain_t2i")],
            "clip": [("suti.world.training.clip", "pretrain_clip")],
            "all": [("suti.world.training.t2i", "pretrain_t2i"),
                    ("suti.world.training.clip", "pretrain_clip"),
                    ("suti.world.training.probe", "pretrain_probe")]}[args.what]
    out = Path(args.output)
    done = 0
    for module, name in jobs:
        try:
            func = getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as exc:  # a model whose module is not written yet
            if exc.name != module:
                raise
            print(f"skipping {name}: {module} is not available")
            continue
        target = out / name.removeprefix("pretrain_")
        _call(func, target, args)
        print(f"{name}: wrote {target}")
        done += 1
    if not done:
        raise InputError(f"nothing to pretrain for --what {args.what}")
    return 0


def register(subparsers) -> None:
    """Add the ``world`` command group to the top-level ``suti`` subparsers."""
    world = subparsers.add_parser("world", help="the synthetic subject world (offline default)",
                                  description=__doc__)
    sub = world.add_subparsers(dest="world_command", metavar="SUBCOMMAND")
    sub.required = True

    make = sub.add_parser("make", help="generate a world and its synthetic web crawl")
    make.add_argument("--output", required=True, help="new or empty output folder")
    make.add_argument("--subjects", type=COUNT, default=24, help="subjects in the world (24)")
    make.add_argument("--noise-pages", type=PROBABILITY, default=0.2,
                      help="fraction of crawl pages that are noise, in [0, 1] (0.2)")
    make.add_argument("--seed", type=SEED, default=0, help="world and crawl seed (0)")
    make.add_argument("--size", type=WORLD_SIDE, default=64, help="image side in pixels (64)")
    make.add_argument("--images-per-page-min", type=COUNT, default=3,
                      help="fewest images on a page (3)")
    make.add_argument("--images-per-page-max", type=COUNT, default=8,
                      help="most images on a page (8)")
    make.add_argument("--pages-per-subject", type=COUNT, default=1,
                      help="clean pages per crawled subject (1)")
    make.add_argument("--heldout-fraction", type=PROBABILITY, default=0.25,
                      help="fraction of subjects held out, never crawled (0.25)")
    make.add_argument("--include-heldout", action="store_true",
                      help="also crawl the held-out subjects")
    make.add_argument("--image-format", choices=["jpg", "png"], default="jpg",
                      help="jpg (quality 90, like crawled photos) or png (lossless) (jpg)")
    make.add_argument("--shard-size", type=COUNT_OR_ZERO, default=1000,
                      help="images per webdataset tar shard; 0: no shards (1000)")
    make.set_defaults(func=cmd_make, local_paths=("output",))

    show = sub.add_parser("show", help="list the subjects of a world")
    show.add_argument("--world", required=True, help="world folder or world.json")
    show.set_defaults(func=cmd_show, local_paths=("world",))

    export = sub.add_parser("export-subject",
                            help="write photos of one subject as a DreamBooth instance folder")
    export.add_argument("--world", required=True, help="world folder or world.json")
    export.add_argument("--subject", required=True, help="subject id, e.g. subject_0003")
    export.add_argument("--output", required=True, help="new or empty output folder")
    export.add_argument("--n", type=COUNT, default=4, help="number of photos (4)")
    export.add_argument("--seed", type=SEED, default=0, help="photo seed (0)")
    export.add_argument("--size", type=WORLD_SIDE, default=64, help="image side in pixels (64)")
    export.set_defaults(func=cmd_export_subject, local_paths=("world", "output"))

    pretrain = sub.add_parser("pretrain", help="pretrain the world models (toy t2i, CLIP, probe)")
    pretrain.add_argument("--output", required=True,
                          help="folder; models go to OUTPUT/t2i (a diffusers pipeline), "
                               "OUTPUT/clip, OUTPUT/probe")
    pretrain.add_argument("--what", choices=("t2i", "clip", "all"), default="t2i",
                          help="which models (t2i)")
    pretrain.add_argument("--minutes", type=POSITIVE, default=None,
                          help="time budget per model (default: each model's own, ~25 for t2i)")
    pretrain.add_argument("--seed", type=SEED, default=None,
                          help="randomness of the run (default 0; 1 with --continue-from, so the "
                               "continued run sees other scenes than the first)")
    pretrain.add_argument("--continue-from", default=None, metavar="FOLDER|shipped",
                          help="t2i: continue training this toy pipeline folder ('shipped': the "
                               "weights in suti/world/weights/toy) instead of starting from "
                               "scratch; the VAE encoder is kept, the decoder fine-tuned "
                               "(default budget 45 min for the U-Net + 5 for the decoder)")
    pretrain.add_argument("--subjects", type=COUNT, default=2000,
                          help="with --continue-from: train on the train split of the seed-0 "
                               "world of this many subjects (2000)")
    pretrain.set_defaults(func=cmd_pretrain, local_paths=("output", "continue_from"))
