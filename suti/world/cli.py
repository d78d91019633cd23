"""``suti world ...``: make a synthetic world + crawl, show it, export a subject's photos."""

from __future__ import annotations

import argparse
from pathlib import Path

from suti.errors import InputError


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
                         progress=True)
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


def register(subparsers) -> None:
    """Add the ``world`` command group to the top-level ``suti`` subparsers."""
    world = subparsers.add_parser("world", help="the synthetic subject world (offline default)",
                                  description=__doc__)
    sub = world.add_subparsers(dest="world_command", metavar="SUBCOMMAND")
    sub.required = True

    make = sub.add_parser("make", help="generate a world and its synthetic web crawl")
    make.add_argument("--output", required=True, help="new or empty output folder")
    make.add_argument("--subjects", type=int, default=24, help="subjects in the world (24)")
    make.add_argument("--noise-pages", type=float, default=0.2,
                      help="fraction of crawl pages that are noise, in [0, 1] (0.2)")
    make.add_argument("--seed", type=int, default=0, help="world and crawl seed (0)")
    make.add_argument("--size", type=int, default=64, help="image side in pixels (64)")
    make.add_argument("--images-per-page-min", type=int, default=3)
    make.add_argument("--images-per-page-max", type=int, default=8)
    make.add_argument("--pages-per-subject", type=int, default=1,
                      help="clean pages per crawled subject (1)")
    make.add_argument("--heldout-fraction", type=float, default=0.25,
                      help="fraction of subjects held out, never crawled (0.25)")
    make.add_argument("--include-heldout", action="store_true",
                      help="also crawl the held-out subjects")
    make.add_argument("--shard-size", type=int, default=1000,
                      help="images per webdataset tar shard; 0: no shards (1000)")
    make.set_defaults(func=cmd_make)

    show = sub.add_parser("show", help="list the subjects of a world")
    show.add_argument("--world", required=True, help="world folder or world.json")
    show.set_defaults(func=cmd_show)

    export = sub.add_parser("export-subject",
                            help="write photos of one subject as a DreamBooth instance folder")
    export.add_argument("--world", required=True, help="world folder or world.json")
    export.add_argument("--subject", required=True, help="subject id, e.g. subject_0003")
    export.add_argument("--output", required=True, help="new or empty output folder")
    export.add_argument("--n", type=int, default=4, help="number of photos (4)")
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--size", type=int, default=64)
    export.set_defaults(func=cmd_export_subject)
