"""Argument checks shared by configs, loaders and functions: one wording for every "bad value" error.

Every error reads ``{name}={value!r} is invalid: allowed {what is allowed}``, where ``name`` is what
the user wrote (``"DinoConfig.batch_size"``, ``"rank"``, ...). ``bool`` is rejected wherever an
integer or a real number is expected: ``True`` is an ``int`` to Python, but ``batch_size=True`` is
a bug, not a batch of one. A leaf module (standard library only), so anything may import it.
"""

from __future__ import annotations

import math
from typing import Any, NoReturn


def fail(name: str, value: Any, allowed: str) -> NoReturn:
    """Raise the ValueError every check here raises: it names the argument, the value and what is allowed."""
    raise ValueError(f"{name}={value!r} is invalid: allowed {allowed}")


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool`` (NaN and infinities included)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in ``[lo, hi]`` (``None``: unbounded); else `fail`."""
    if not is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        fail(name, value, "an integer" + _int_range(lo, hi))
    return value


def check_real(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """``value`` if it is a finite int or float (not a bool) within the bounds; else `fail`.

    The bounds are closed unless ``lo_open``/``hi_open``; ``None`` leaves that side unbounded.
    NaN and the infinities are never allowed: no setting of a run means "infinitely many".
    """
    if not is_number(value) or not math.isfinite(value):
        fail(name, value, f"a finite number {_bounds(lo, hi, lo_open, hi_open)}".rstrip())
    ok_lo = lo is None or (value > lo if lo_open else value >= lo)
    ok_hi = hi is None or (value < hi if hi_open else value <= hi)
    if not (ok_lo and ok_hi):
        fail(name, value, f"values {_bounds(lo, hi, lo_open, hi_open)}")
    return value


def _int_range(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    return f" <= {hi}" if hi is not None else ""


def _bounds(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


__all__ = ["check_int", "check_real", "fail", "is_int", "is_number"]
