"""The help formatter, argument parser and error reporting of every ``suti`` command: defaults shown only where they are true.

``argparse.ArgumentDefaultsHelpFormatter`` appends ``(default: X)`` to every option, which
misleads for on/off flag pairs (``--no-prior-preservation ... (default: True)`` while the recipe
decides) and for options whose default is resolved later (``None``: a recipe, a preset or the
model decides). :class:`HelpFormatter` appends the default only when it is a real value of an
option that takes one; flags and late-resolved options say their default in their own help.
"""

from __future__ import annotations

import argparse
import logging
import sys

from suti.errors import SutiError, describe_os_error


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Show ``(default: X)`` only for value-taking options with a concrete default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or "%(default)" in text:
            return text
        if action.default is None or action.default is argparse.SUPPRESS or action.default is False:
            return text
        if action.nargs == 0:  # store_true / store_false / store_const: a flag has no value to default to
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line on stderr and exit code 2,
    as every other bad input of suti (``suti generate: error: argument --steps: invalid int
    value: 'abc' (see suti generate --help)``), instead of the whole usage text. Sub-command
    parsers inherit it (``add_subparsers`` makes them of the parent's class).

    A negative number in scientific notation is a value, not an option: ``--lambda -1e-3`` and
    ``--logit-mean -2.5e-1`` parse (Python 3.11's argparse takes ``-1e-3`` for an unknown option
    and reports "expected one argument"; no suti option looks like a number). So are ``-inf``
    and ``-nan``, which the option's own check then refuses by name."""

    def __init__(self, *args, **kwargs):
        import re

        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def report_errors(func, *args, prog: str = "suti", **kwargs) -> int:
    """Run ``func(*args, **kwargs)`` as a command: a :class:`SutiError` becomes one line on
    stderr and its exit code (2); so does an error of the file system (an ``OSError`` or a writer
    library's own, :func:`as_os_error`: a full disk, a read-only or missing folder, a file where a
    folder should be; :func:`suti.errors.describe_os_error`, the traceback at debug level); Ctrl-C
    exit code 130; otherwise ``func``'s return value.

    Every entry point uses it: ``suti ...`` and the modules run with ``python -m`` (the
    launcher targets ``apprentice.train``, the world model scripts, ``mining.evaluate``).
    """
    try:
        return int(func(*args, **kwargs) or 0)
    except SutiError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        failed = as_os_error(exc)
        if failed is None:
            raise
        logging.getLogger("suti").debug("%s", exc, exc_info=True)
        print(f"{prog}: error: {describe_os_error(failed)}", file=sys.stderr)
        return 2


def as_os_error(exc: BaseException) -> OSError | None:
    """``exc`` as the file-system error it is, or ``None``: an ``OSError``, or a writer library's
    own error for one (safetensors' ``SafetensorError`` "... (os error 28)"; torch.save's
    "PytorchStreamWriter failed writing file", which a full disk causes)."""
    import errno
    import os
    import re

    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    found = re.search(r"os error (\d+)", text)
    if type(exc).__name__ == "SafetensorError" and found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    if isinstance(exc, RuntimeError) and "PytorchStreamWriter failed writing file" in text:
        return OSError(errno.EIO, "a file write failed (torch.save): is the disk full?")
    return None

