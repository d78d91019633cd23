"""One check per kind of number, shared by every command's flags, recipes, YAML files and HTTP
forms, so that no sibling is left out.

A :class:`Number` is a kind: whole or real, finite, within bounds. It is an ``argparse`` type
(``type=STEPS``: a bad value is refused while the command line is parsed, in one line, before
anything is written) and a checker for values that come from elsewhere (``STEPS.check(value,
"--steps")`` in a config's ``validate``). ``nan <= 0`` is false, so a check written as a
comparison lets ``nan`` through; :meth:`Number.check` refuses non-finite values first.

>>> LEARNING_RATE.check(1e-4, "--learning-rate")
0.0001
>>> LEARNING_RATE("nan")  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
argparse.ArgumentTypeError: must be a finite number in (0, 1], got nan
"""

from __future__ import annotations

import argparse
import math
import numbers
from dataclasses import dataclass

from suti.errors import InvalidValueError

#: The largest seed: torch's generators take unsigned 64-bit seeds, and seeds are offset per
#: image and per prompt (``seed + 1000 * prompt + image``), so the user's seed stays below 2**63.
MAX_SEED = 2**63 - 1
#: The largest count of anything (steps, images, workers ...): a 32-bit integer.
MAX_COUNT = 2**31 - 1


@dataclass(frozen=True)
class Number:
    """A kind of number: ``whole`` or real, always finite, in ``[lo, hi]`` (``lo_open`` /
    ``hi_open`` exclude a bound; ``None``: unbounded on that side).

    Used as an ``argparse`` type it parses the text and raises ``argparse.ArgumentTypeError``
    (one line, exit 2); :meth:`check` raises :class:`~suti.errors.InvalidValueError` naming the
    setting.
    """

    whole: bool
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        """``a whole number from 1 to 100``, ``a finite number in (0, 1]``."""
        if self.whole:
            lo = "-inf" if self.lo is None else f"{int(self.lo) + (1 if self.lo_open else 0)}"
            hi = "inf" if self.hi is None else f"{int(self.hi) - (1 if self.hi_open else 0)}"
            return f"a whole number from {lo} to {hi}"
        left = "(" if self.lo_open or self.lo is None else "["
        right = ")" if self.hi_open or self.hi is None else "]"
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"a finite number in {left}{lo}, {hi}{right}"

    def problem(self, value) -> str | None:
        """Why ``value`` is not of this kind, or ``None``."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"must be {self.describe()}, got {value!r}"
        if self.whole and not isinstance(value, numbers.Integral):
            if not (math.isfinite(value) and float(value).is_integer()):
                return f"must be {self.describe()}, got {value!r}"
        if not math.isfinite(float(value)):
            return f"must be {self.describe()}, got {value}"
        low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if low or high:
            return f"must be {self.describe()}, got {value:g}" if not self.whole else f"must be {self.describe()}, got {int(value)}"
        return None

    def check(self, value, name: str):
        """``value`` (an int for a whole kind) if it is of this kind.

        Raises:
            InvalidValueError: ``"<name> must be ..., got <value>"``.
        """
        why = self.problem(value)
        if why:
            raise InvalidValueError(f"{name} {why}")
        return int(value) if self.whole else value

    def __call__(self, text: str):
        """Parse a command-line value (``argparse`` type)."""
        try:
            value = int(text) if self.whole else float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        why = self.problem(value)
        if why:
            raise argparse.ArgumentTypeError(why)
        return value

    @property
    def __name__(self) -> str:  # argparse names the type in some messages
        return "whole number" if self.whole else "number"


def whole(lo: int | None = None, hi: int | None = MAX_COUNT) -> Number:
    """A whole number in ``[lo, hi]``."""
    return Number(True, lo, hi)


def real(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Number:
    """A finite real number in ``[lo, hi]`` (open where asked)."""
    return Number(False, lo, hi, lo_open, hi_open)


#: Counts of at least one (steps, images, batch sizes, workers).
COUNT = whole(1)
#: Counts that may be zero (warm-up steps, "keep all" limits, retries).
COUNT_OR_ZERO = whole(0)
#: Seeds of every random generator.
SEED = whole(0, MAX_SEED)
#: Learning rates (AdamW, Adafactor, Prodigy-style rates stay below 1).
LEARNING_RATE = real(0.0, 1.0, lo_open=True)
#: Positive finite numbers (gradient-norm limits, loss weights that must act, temperatures).
POSITIVE = real(0.0, 1e6, lo_open=True)
#: Non-negative finite numbers (loss weights, noise offsets, weight decay, guidance scales).
NON_NEGATIVE = real(0.0, 1e6)
#: Probabilities and fractions.
PROBABILITY = real(0.0, 1.0)
#: Adam's betas: [0, 1).
BETA = real(0.0, 1.0, hi_open=True)
#: Adam's epsilon and other small positive constants.
EPSILON = real(0.0, 1.0, lo_open=True)
