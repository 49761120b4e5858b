"""Small helpers shared by test files (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU twin runs instead")

# Per-dtype tolerances for comparisons against a float64 reference: (rtol, atol).
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 2e-3),
    torch.float16: (5e-3, 5e-4),
}


def load_bench_module(name: str):
    """A script of ``bench/`` imported by file path (``bench/`` is not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ema_update_reference_(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    """The reference code's per-parameter EMA loop (paper eq. 2), the twin of `fdino.ema_update_`."""
    with torch.no_grad():
        for t, s in zip(teacher, student):
            t.mul_(momentum).add_((1.0 - momentum) * s)
