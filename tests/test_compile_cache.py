"""`fdino.compile_cache`: a graph compiled by one process is loaded from disk by the next.

Guards against the compiled step being rebuilt on every run (about 4 minutes for ViT-tiny on
2 CPU cores) because the cache sat in a wiped temp directory or was never consulted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default_cache_dir

from fdino.compile_cache import CompileCacheStats, default_cache_dir

# A tiny graph: one fused elementwise kernel and a reduction, quick for gcc.
_CHILD = """
import json, sys
import torch
from fdino.compile_cache import compile_cache_stats, enable_compile_cache

path = enable_compile_cache(sys.argv[1])
fn = torch.compile(lambda x: (x * 2.0).sin().sum(), fullgraph=True, dynamic=False)
value = float(fn(torch.arange(8, dtype=torch.float32)))
stats = compile_cache_stats()
print(json.dumps({"dir": str(path), "value": value, "stats": stats._asdict(), "describe": stats.describe()}))
"""


def _compile_in_subprocess(cache_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(cache_dir)], env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_graph_from_the_cache(tmp_path):
    first = _compile_in_subprocess(tmp_path)
    second = _compile_in_subprocess(tmp_path)
    assert first["dir"] == str(tmp_path.resolve())
    assert any((tmp_path / "fxgraph").iterdir()), "the graph was not written to the chosen directory"
    assert first["stats"]["fx_misses"] >= 1 and first["stats"]["fx_hits"] == 0, first
    assert second["stats"]["fx_hits"] >= 1 and second["stats"]["fx_misses"] == 0, second
    assert second["describe"].startswith(f"compiled graphs: {second['stats']['fx_hits']} loaded")
    assert second["value"] == first["value"]


def test_stats_since_and_describe():
    before = CompileCacheStats(1, 2, 0, 0, 1, 0)
    after = CompileCacheStats(3, 2, 1, 1, 1, 0)
    delta = after.since(before)
    assert (delta.loaded, delta.compiled) == (2, 1)
    assert delta.describe() == "compiled graphs: 2 loaded from the cache, 1 built (1 not cacheable)"


def test_default_dir_is_persistent_unless_the_environment_names_one(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "fdino" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    # Importing torch._inductor sets the variable to its /tmp default: that is not a user's choice.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", torch_default_cache_dir())
    assert default_cache_dir() == tmp_path / "fdino" / "inductor"
