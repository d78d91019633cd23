"""``suti apprentice train|pack-photos|sample``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from suti.cli_format import HelpFormatter
from suti.errors import InputError, InvalidValueError, SutiError


def register(subparsers) -> None:
    """Add the ``apprentice`` command group."""
    from apprentice.train_config import build_arg_parser
    from suti.sampling import add_sampler_flags

    group = subparsers.add_parser("apprentice", help="train and query the in-context apprentice")
    sub = group.add_subparsers(dest="apprentice_command", metavar="SUBCOMMAND")
    sub.required = True
    train = sub.add_parser("train", help="train the apprentice with DeepSpeed on generation shards", formatter_class=HelpFormatter)
    build_arg_parser(train)
    train.add_argument("--nproc", type=int, default=1, help="processes on this machine (launched with torchrun)")
    train.set_defaults(func=_train)

    pack = sub.add_parser("pack-photos", help="write mined clusters' photos as training shards (reconstruction examples, no experts)", formatter_class=HelpFormatter)
    pack.add_argument("--clusters", required=True, help="clusters.jsonl of `suti mine`")
    pack.add_argument("--crawl", required=True, help="the crawl the clusters were mined from")
    pack.add_argument("--output", required=True, help="folder for shard-*.tar (a rerun adds only missing clusters)")
    pack.add_argument("--samples-per-shard", type=int, default=256)
    pack.set_defaults(func=_pack_photos)

    sample = sub.add_parser("sample", help="generate a subject in context from 1-8 demonstration photos", formatter_class=HelpFormatter)
    sample.add_argument("--apprentice", default="toy", help='apprentice folder, or "toy" for the embedded default')
    sample.add_argument("--demos", nargs="+", required=True, help="1-8 photos of the subject")
    sample.add_argument("--demo-captions", nargs="+", help="one caption per photo")
    sample.add_argument("--prompt", required=True, help="the target prompt, e.g. \"a cup in the snow\"")
    sample.add_argument("--num-images", type=int, default=4)
    sample.add_argument("--output", required=True, help="folder for the PNG files")
    sample.add_argument("--steps", type=int, default=25)
    sample.add_argument("--guidance-scale", type=float, default=5.0, help="text guidance")
    sample.add_argument("--demo-guidance-scale", type=float, default=2.0, help="demonstration guidance")
    sample.add_argument("--seed", type=int, default=0)
    add_sampler_flags(sample, size=True)
    sample.add_argument("--overwrite", action="store_true")
    sample.set_defaults(func=_sample)


def _train(args) -> int:
    from apprentice.train import check_inputs, config_from_args, train_apprentice

    if args.nproc < 1:
        raise InvalidValueError(f"--nproc must be >= 1, got {args.nproc}")
    check_inputs(config_from_args(args))  # bad options exit 2 here, not in every worker
    output = Path(args.output)
    if output.is_dir() and any(output.iterdir()) and not args.resume and not args.overwrite:
        raise InputError(f"{output}: output folder is not empty; pass --resume latest or --overwrite")
    if args.nproc > 1 and "RANK" not in os.environ:
        argv = [a for a in sys.argv[sys.argv.index("train") + 1:]]
        drop = {"--nproc"}
        cleaned, skip = [], False
        for a in argv:
            if skip:
                skip = False
                continue
            if a in drop:
                skip = True
                continue
            if a.startswith("--nproc="):
                continue
            cleaned.append(a)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "-m", "apprentice.train", *cleaned]
        code = subprocess.call(cmd)
        if code != 0:
            raise SutiError(f"apprentice training failed in a torchrun worker (exit code {code}); its error is above")
        print(json.dumps({"output": args.output}))
        return 0
    train_apprentice(config_from_args(args), resume=args.resume, overwrite=args.overwrite)
    print(json.dumps({"output": args.output}))
    return 0


def _pack_photos(args) -> int:
    from apprentice.photos import pack_photos

    print(json.dumps(pack_photos(args.clusters, args.crawl, args.output, samples_per_shard=args.samples_per_shard)))
    return 0


def _sample(args) -> int:
    from apprentice.sample import sample_apprentice

    paths = sample_apprentice(args.apprentice, args.demos, args.prompt, args.num_images, args.output, demo_captions=args.demo_captions, steps=args.steps, guidance_scale=args.guidance_scale, demo_guidance_scale=args.demo_guidance_scale, seed=args.seed, overwrite=args.overwrite, height=args.height, width=args.width, dtype=args.dtype)
    print(json.dumps({"images": [str(p) for p in paths]}))
    return 0
