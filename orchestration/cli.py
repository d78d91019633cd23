"""The ``suti`` console script: one entry point, one subcommand group per capability.

It sits on top of the layers (orchestration imports the stages, never the other way round).

Each capability module exposes ``register(subparsers)`` which adds its commands and sets
``func`` on every leaf parser; ``func(args)`` returns the exit code. A :class:`SutiError`
becomes a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from suti.cli_format import ArgumentParser, report_errors
from suti.errors import InputError, SutiError

# Modules that contribute subcommands, imported lazily so `suti --help` stays fast.
COMMAND_MODULES = (
    "experts.cli",
    "suti.world.cli",
    "orchestration.demo",
    "generation.cli",
    "mining.cli",
    "apprentice.cli",
    "orchestration.eval.cli",
    "serving.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the full argument parser with every available subcommand."""
    parser = ArgumentParser(
        prog="suti",
        description="Subject-driven text-to-image generation: DreamBooth experts, mining, "
        "expert generation on Ray, the in-context apprentice and serving.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    groups = {}
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a capability not built yet
            if exc.name and name.startswith(exc.name):
                continue
            raise
        groups[name] = module.register(sub)
    if groups.get("apprentice.cli") is not None:  # mining writes the apprentice's photo shards
        from mining.cli import register_pack_photos

        register_pack_photos(groups["apprentice.cli"])
    return parser


def check_local_paths(args) -> None:
    """Refuse an object-store URI in an option its command reads or writes as a local file
    (the options named by the command's ``set_defaults(local_paths=...)``): an ``s3://``
    ``--output`` must never become a local folder named ``s3:``. A ``file://`` URL there is
    replaced by its local path (never a folder named ``file:``).

    Raises:
        InputError: naming the option and the value.
    """
    from suti.storage import is_local, resolve

    for name in getattr(args, "local_paths", ()):
        value = getattr(args, name, None)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if item is not None and not is_local(str(item)):
                raise InputError(f"--{name.replace('_', '-')} {item}: this command reads and writes local files only; give a local path "
                                 f"(and copy to or from object storage with your storage tools, e.g. `aws s3 sync`)")
        local = [resolve(i) if isinstance(i, str) and "://" in i else i for i in items]
        setattr(args, name, local if isinstance(value, list) else local[0])


def _run_command(args) -> int:
    check_local_paths(args)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return report_errors(_run_command, args)


if __name__ == "__main__":
    sys.exit(main())
