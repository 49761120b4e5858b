"""Seed derivation: every random stream of the data pipeline is named by a tuple of integers.

The crops of sample ``i`` in epoch ``e`` come from ``derive_seed(seed, "crops", e, i)``, the
permutation of epoch ``e`` from ``derive_seed(seed, "perm", e)``, and so on. Because a stream is a
pure function of its name, results do not depend on which process draws them, in which order, or
where a run resumed; and nothing here reads or writes the global RNGs of torch, numpy or `random`.
"""

from __future__ import annotations

import hashlib

import torch

from ..checks import is_int


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (ints and strings), stable across runs.

    A cryptographic hash rather than ``hash()`` (salted per process for strings) or arithmetic
    mixing (neighbouring (epoch, index) pairs would give correlated Mersenne-Twister states).
    The top bit is cleared so the value is a valid ``torch.manual_seed`` argument.
    """
    for p in parts:
        if not (is_int(p) or isinstance(p, str)):
            raise TypeError(f"derive_seed parts must be int or str, got {p!r} ({type(p).__name__})")
    data = "\x1f".join(f"{type(p).__name__[0]}{p}" for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def torch_generator(*parts: int | str) -> torch.Generator:
    """A fresh CPU `torch.Generator` seeded with ``derive_seed(*parts)`` (global RNG untouched)."""
    return torch.Generator().manual_seed(derive_seed(*parts))


__all__ = ["derive_seed", "torch_generator"]
