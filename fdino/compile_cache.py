"""torch.compile's on-disk caches, kept across runs, and what this process got from them.

Inductor's FX graph cache and the AOTAutograd cache are on by default in torch >= 2.5, but they
live under the system temp directory (``/tmp/torchinductor_<user>``), which reboots and fresh
containers wipe: every run then rebuilds the compiled step (about 4 minutes for ViT-tiny on 2 CPU
cores). `enable_compile_cache` points both at a persistent directory; `compile_cache_stats`
counts, for this process, the graphs inductor built from scratch and those it loaded from disk,
so a run summary can say which happened.

A cached graph is reused only when everything that shapes it matches: the traced graph, input
shapes and dtypes, torch version and the inductor configuration. A changed config or model
compiles anew (a miss) and is stored next to the old entries.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch._dynamo.utils
import torch._functorch.config
import torch._inductor.config
from torch._inductor.runtime.cache_dir_utils import default_cache_dir as _torch_default_cache_dir  # /tmp/...

ENV_VAR = "TORCHINDUCTOR_CACHE_DIR"  # what inductor reads (at each use) for its cache root


def default_cache_dir() -> Path:
    """``$TORCHINDUCTOR_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/fdino/inductor`` (``~/.cache/...``).

    Importing ``torch._inductor`` sets the variable itself, to its temp-directory default; that
    value counts as unset here.
    """
    chosen = os.environ.get(ENV_VAR)
    if chosen and os.path.abspath(chosen) != os.path.abspath(_torch_default_cache_dir()):
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fdino" / "inductor"


def enable_compile_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Turn on inductor's FX graph cache and the AOTAutograd cache in a persistent directory.

    ``cache_dir`` defaults to `default_cache_dir` (an explicit argument wins over the environment).
    Call it before the process compiles anything: inductor resolves file locations on first use.
    A cache switched off in the environment (``TORCHINDUCTOR_FX_GRAPH_CACHE=0``,
    ``TORCHINDUCTOR_AUTOGRAD_CACHE=0``) stays off: those variables override the settings made here.
    Returns the directory, created if missing.
    """
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir().expanduser()
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ[ENV_VAR] = str(path)
    torch._inductor.config.fx_graph_cache = True
    if hasattr(torch._functorch.config, "enable_autograd_cache"):  # torch >= 2.5
        torch._functorch.config.enable_autograd_cache = True
    return path


class CompileCacheStats(NamedTuple):
    """Counts since the process started (or since `torch._dynamo.utils.counters` was last cleared).

    Inductor compiles each forward and each backward graph separately, so one compiled function
    can count 1 or 2 graphs. ``fx_*`` count inductor graphs; ``aot_*`` count AOTAutograd entries
    (a hit there loads its graphs through the FX graph cache, so they count as ``fx_hits`` too).
    """

    fx_hits: int
    fx_misses: int
    fx_bypasses: int
    aot_hits: int
    aot_misses: int
    aot_bypasses: int

    @property
    def loaded(self) -> int:
        """Graphs loaded from the on-disk cache."""
        return self.fx_hits

    @property
    def compiled(self) -> int:
        """Graphs built from scratch: cache misses plus graphs the cache cannot hold (bypasses)."""
        return self.fx_misses + self.fx_bypasses

    def since(self, earlier: CompileCacheStats) -> CompileCacheStats:
        """The counts added after ``earlier`` (an earlier `compile_cache_stats` of this process)."""
        return CompileCacheStats(*(now - then for now, then in zip(self, earlier)))

    def describe(self) -> str:
        """One line for a run summary, e.g. ``compiled graphs: 2 loaded from the cache, 0 built``."""
        text = f"compiled graphs: {self.loaded} loaded from the cache, {self.compiled} built"
        if self.fx_bypasses:
            text += f" ({self.fx_bypasses} not cacheable)"
        return text


def compile_cache_stats() -> CompileCacheStats:
    """How many inductor graphs this process built and how many it loaded from the cache."""
    counters = torch._dynamo.utils.counters
    inductor, aot = counters["inductor"], counters["aot_autograd"]
    return CompileCacheStats(
        fx_hits=inductor["fxgraph_cache_hit"],
        fx_misses=inductor["fxgraph_cache_miss"],
        fx_bypasses=inductor["fxgraph_cache_bypass"],
        aot_hits=aot["autograd_cache_hit"],
        aot_misses=aot["autograd_cache_miss"],
        aot_bypasses=aot["autograd_cache_bypass"],
    )
