"""``precision="auto"``: bf16 autocast where the hardware computes bf16 natively, fp32 elsewhere.

bf16 matrix products are fast on CUDA GPUs from Ampere on and on x86 CPUs with the AVX512-BF16 or
AMX-BF16 instructions (oneDNN runs them natively there; elsewhere it emulates bf16, which is slower
than fp32). In every precision the teacher logits, the center and the loss stay fp32 (`fdino.step`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

# Instruction-set flags of /proc/cpuinfo with native bf16 dot products.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The `BF16_CPU_FLAGS` this CPU has (none where /proc/cpuinfo is missing: not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return tuple(f for f in BF16_CPU_FLAGS if f in flags)
    return ()


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'fp32' or 'bf16': ``precision`` itself unless it is 'auto', which picks bf16 where it is native."""
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if kind == "cpu":
        return "bf16" if cpu_bf16_flags() else "fp32"
    return "fp32"


def precision_note(precision: str, device: torch.device | str) -> str:
    """What ``precision`` means on ``device``, for the run's summary."""
    chosen = resolve_precision(precision, device)
    if precision != "auto":
        return chosen
    kind = torch.device(device).type
    if kind == "cpu":
        why = f"this CPU has {', '.join(cpu_bf16_flags())}" if chosen == "bf16" else "this CPU has no native bf16"
    else:
        why = f"{kind} {'supports' if chosen == 'bf16' else 'lacks'} bf16"
    return f"auto -> {chosen} ({why})"


__all__ = ["BF16_CPU_FLAGS", "cpu_bf16_flags", "precision_note", "resolve_precision"]
