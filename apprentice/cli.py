"""``suti apprentice train|sample`` (``pack-photos`` is mining's, :mod:`mining.cli`)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from suti.cli_format import HelpFormatter
from suti.errors import InvalidValueError, SutiError
from suti.sampling import DEFAULT_DEMO_GUIDANCE_SCALE


def register(subparsers):
    """Add the ``apprentice`` command group; returns its subcommands' action, to which the root
    command line adds ``pack-photos`` (:func:`mining.cli.register_pack_photos`)."""
    from apprentice.train_config import build_arg_parser, launch_number
    from suti.sampling import GUIDANCE_SCALE, NUM_IMAGES, SEED, STEPS, add_sampler_flags

    group = subparsers.add_parser("apprentice", help="train and query the in-context apprentice")
    sub = group.add_subparsers(dest="apprentice_command", metavar="SUBCOMMAND")
    sub.required = True
    train = sub.add_parser("train", help="train the apprentice with DeepSpeed on generation shards", formatter_class=HelpFormatter)
    build_arg_parser(train)
    launch = train.add_argument_group("launch (torchrun, or the deepspeed launcher with --hostfile)")
    launch.add_argument("--nproc", type=launch_number("nproc"), default=1, help="processes per node (GPUs per node)")
    launch.add_argument("--nnodes", type=launch_number("nnodes"), default=1, help="nodes; run the same command on each node with its --node-rank")
    launch.add_argument("--node-rank", type=launch_number("node_rank"), default=0, help="this node's rank, 0 .. nnodes-1")
    launch.add_argument("--master-addr", help="address of node 0, reachable from every node (multi-node)")
    launch.add_argument("--master-port", type=launch_number("master_port"), default=29500, help="TCP port (1-65535) on node 0 for the rendezvous")
    launch.add_argument("--hostfile", help="a DeepSpeed hostfile (\"host slots=N\" lines): launch on all its hosts over ssh with the deepspeed launcher, from one node")
    train.set_defaults(func=_train, local_paths=("hostfile",))

    sample = sub.add_parser("sample", help="generate a subject in context from 1-8 demonstration photos", formatter_class=HelpFormatter)
    sample.add_argument("--apprentice", default="toy", help='apprentice folder, or "toy" for the embedded default')
    sample.add_argument("--demos", nargs="+", required=True, help="1-8 photos of the subject")
    sample.add_argument("--demo-captions", nargs="+", help="one caption per photo")
    sample.add_argument("--prompt", required=True, help="the target prompt, e.g. \"a cup in the snow\"")
    sample.add_argument("--num-images", type=NUM_IMAGES, default=4, help="images to generate")
    sample.add_argument("--output", required=True, help="folder for the PNG files")
    sample.add_argument("--steps", type=STEPS, default=25, help="denoising steps")
    sample.add_argument("--guidance-scale", type=GUIDANCE_SCALE, help="text guidance (default 5.0); on a FLUX base the distilled guidance (default 3.5)")
    sample.add_argument("--demo-guidance-scale", type=GUIDANCE_SCALE, default=DEFAULT_DEMO_GUIDANCE_SCALE, help="demonstration guidance s_demo: higher carries more of the subject, less of the prompt (default: %(default)s)")
    sample.add_argument("--seed", type=SEED, default=0, help="image k uses seed + k")
    add_sampler_flags(sample, size=True)
    sample.add_argument("--overwrite", action="store_true")
    sample.set_defaults(func=_sample, local_paths=("apprentice", "demos", "output"))
    return sub


def launch_command(args, train_argv: list[str]) -> list[str] | None:
    """The launcher command line for ``suti apprentice train`` (``None``: train in this process).

    ``--hostfile``: ``deepspeed --hostfile H --module apprentice.train`` (ssh to every host;
    each process gets ``--local_rank``). ``--nnodes > 1``: ``torchrun --nnodes --node-rank
    --master-addr --master-port`` (static rendezvous; run once per node). ``--nproc > 1`` alone:
    ``torchrun --standalone``.

    Raises:
        InputError: a multi-node launch without ``--master-addr``, or a bad ``--node-rank``.
    """
    from suti.errors import InputError

    if "RANK" in os.environ:  # already inside a launched process
        return None
    if args.hostfile:
        if not os.path.isfile(args.hostfile):
            raise InputError(f"--hostfile {args.hostfile}: no such file")
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", args.hostfile, "--master_port", str(args.master_port)]
        if args.master_addr:
            cmd += ["--master_addr", args.master_addr]
        if args.nnodes > 1:
            cmd += ["--num_nodes", str(args.nnodes)]
        if args.nproc > 1:
            cmd += ["--num_gpus", str(args.nproc)]
        return cmd + ["--module", "apprentice.train", *train_argv]
    if args.nnodes > 1:
        if not args.master_addr:
            raise InputError("--nnodes > 1 needs --master-addr (the address of node 0)")
        if not 0 <= args.node_rank < args.nnodes:
            raise InputError(f"--node-rank {args.node_rank} is not in 0..{args.nnodes - 1}")
        rdzv = ["--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank), "--master-addr", args.master_addr, "--master-port", str(args.master_port)]
    elif args.nproc > 1:
        rdzv = ["--standalone"]
    else:
        return None
    return [sys.executable, "-m", "torch.distributed.run", *rdzv, f"--nproc-per-node={args.nproc}", "-m", "apprentice.train", *train_argv]


def train_argv(args) -> list[str]:
    """``python -m apprentice.train`` arguments that reproduce ``args`` (the launched processes' command line)."""
    from apprentice.train_config import build_arg_parser

    out: list[str] = []
    for action in build_arg_parser()._actions:
        if not action.option_strings or action.dest in ("help", "local_rank"):
            continue
        value = getattr(args, action.dest, None)
        if value is None or (value == action.default and not action.required):
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def _train(args) -> int:
    from apprentice.train import check_inputs, train_apprentice
    from apprentice.train_config import apply_local_rank, config_from_args

    for flag, value in (("--nproc", args.nproc), ("--nnodes", args.nnodes)):
        if value < 1:
            raise InvalidValueError(f"{flag} must be >= 1, got {value}")
    check_inputs(config_from_args(args))  # bad options exit 2 here, not in every worker
    cmd = launch_command(args, train_argv(args))
    if cmd is not None:
        code = subprocess.call(cmd)
        if code != 0:
            raise SutiError(f"apprentice training failed in a launched worker (exit code {code}); its error is above")
        print(json.dumps({"output": args.output}))
        return 0
    apply_local_rank(args)
    output = train_apprentice(config_from_args(args), resume=args.resume, overwrite=args.overwrite)
    print(json.dumps({"output": str(output)}))
    return 0


def _sample(args) -> int:
    from apprentice.sample import sample_apprentice

    paths = sample_apprentice(args.apprentice, args.demos, args.prompt, args.num_images, args.output, demo_captions=args.demo_captions, steps=args.steps, guidance_scale=args.guidance_scale, demo_guidance_scale=args.demo_guidance_scale, seed=args.seed, overwrite=args.overwrite, height=args.height, width=args.width, dtype=args.dtype, sample_batch_size=args.sample_batch_size)
    print(json.dumps({"images": [str(p) for p in paths]}))
    return 0
