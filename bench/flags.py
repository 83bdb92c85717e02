"""Numeric command-line values, checked as they are parsed: a value outside its range (0 where it means
nothing, negative, not a number, NaN, infinity, a fraction where a count is due) ends the command with
one line that names the flag and the range, before anything loads or is written.

Each factory returns an ``argparse`` type; what it returns is what the flag always held (an int, a
float, or for lists and rules the text itself, which bench/spec.py splits), so a spec built from a
plain Namespace sees the same values.
"""

from __future__ import annotations

import argparse
import math
import re

SEED_MAX = 2**32 - 1  # numpy's and Optuna's samplers take seeds in [0, 2**32 - 1]


class Invalid(argparse.ArgumentTypeError):
    """``argparse`` prefixes it with ``argument --flag:``; run_bench.py prints ``error: --flag <message>``."""


def _int(text: str) -> int | None:
    text = text.strip()
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else None


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def count(minimum: int = 1, example: str = "8"):
    """A whole number >= ``minimum``."""

    def parse(text: str) -> int:
        value = _int(text)
        if value is None or value < minimum:
            raise Invalid(f"must be a whole number >= {minimum} (got {text!r}); e.g. {example}")
        return value

    parse.__name__ = "count"
    return parse


def seed(text: str) -> int:
    value = _int(text)
    if value is None or not 0 <= value <= SEED_MAX:
        raise Invalid(f"must be a whole number in [0, {SEED_MAX}] (got {text!r}); e.g. 0")
    return value


def positive(example: str = "1e-3"):
    """A finite number > 0."""

    def parse(text: str) -> float:
        value = _float(text)
        if value is None or not math.isfinite(value) or value <= 0:
            raise Invalid(f"must be a finite number > 0 (got {text!r}); e.g. {example}")
        return value

    parse.__name__ = "positive"
    return parse


def fraction(low_open: bool, high_open: bool, example: str):
    """A number in [0, 1] with either end open."""
    interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"

    def parse(text: str) -> float:
        value = _float(text)
        ok = value is not None and math.isfinite(value) and (value > 0 if low_open else value >= 0) \
            and (value < 1 if high_open else value <= 1)
        if not ok:
            raise Invalid(f"must be a number in {interval} (got {text!r}); e.g. {example}")
        return value

    parse.__name__ = "fraction"
    return parse


def _list(text: str, item, what: str, example: str) -> str:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise Invalid(f"is empty; give {what}, comma-separated, e.g. {example}")
    for part in parts:
        if item(part) is None:
            raise Invalid(f"has {part!r}: each value must be {what} (got {text!r}); e.g. {example}")
    return text


def ranks(text: str) -> str:
    return _list(text, lambda p: v if (v := _int(p)) is not None and v >= 1 else None, "a whole number >= 1", "4,16")


def counts(example: str):
    """A comma list of whole numbers >= 1 (a factor's levels, e.g. ``--train-items 250,1000,8000``)."""
    def parse(text: str) -> str:
        return _list(text, lambda p: v if (v := _int(p)) is not None and v >= 1 else None, "a whole number >= 1", example)

    return parse


def seeds(text: str) -> str:
    return _list(text, lambda p: v if (v := _int(p)) is not None and 0 <= v <= SEED_MAX else None,
                 f"a whole number in [0, {SEED_MAX}]", "0,1,2")


def rates(text: str) -> str:
    return _list(text, lambda p: v if (v := _float(p)) is not None and math.isfinite(v) and v > 0 else None,
                 "a finite number > 0", "1e-3,3e-3,1e-2")


def resolutions(text: str) -> str:
    """Values of the model family's resolution knob (whole numbers >= 1), ``default`` for the checkpoint's own."""
    return _list(text, lambda p: p if p.lower() == "default" else v if (v := _int(p)) is not None and v >= 1 else None,
                 "a whole number >= 1 or default", "200704,802816")


def alpha_rule(text: str) -> str:
    """``2r`` / ``r`` / ``0.5r`` (a multiple of the rank) or a plain alpha: finite and > 0."""
    body = text.strip()
    number = body[:-1] if body.endswith("r") else body
    value = 1.0 if body == "r" else _float(number)
    if value is None or not math.isfinite(value) or value <= 0:
        raise Invalid(f"must be a multiple of the rank such as 2r or r, or an alpha, finite and > 0 (got {text!r}); e.g. 2r or 16")
    return text


_UNITS = {"b": 1 / 2**20, "kib": 1 / 1024, "mib": 1, "gib": 1024, "tib": 1024**2,
          "kb": 1e3 / 2**20, "mb": 1e6 / 2**20, "gb": 1e9 / 2**20, "tb": 1e12 / 2**20}


def memory_mib(text: str) -> float | None:
    """``16GiB``, ``512MiB``, ``1.5GB`` -> MiB (> 0); None when ``text`` is no such size."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        return None
    return float(match.group(1)) * _UNITS[unit]


def memory(text: str) -> str:
    if memory_mib(text) is None:
        raise Invalid(f"must be a memory size > 0 with its unit (got {text!r}); e.g. 16GiB, 512MiB or 1.5GB")
    return text
