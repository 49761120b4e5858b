"""The README's custom-loop example runs as written (compiled step included)."""

from __future__ import annotations

import math
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_custom_loop_example_runs_as_written(capsys):
    blocks = python_blocks(README.read_text())
    loop = [b for b in blocks if "fdino.train_step(" in b]
    assert len(loop) == 1, "the README must show exactly one custom-loop example"
    assert len(loop[0].strip().splitlines()) <= 15
    exec(compile(loop[0], "README.md", "exec"), {"__name__": "readme_example"})
    lines = [line for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    assert [line.split()[0] for line in lines] == ["0", "1", "2"]
    assert all("'loss'" in line for line in lines)
    # Each line is `step {'loss': value, ...}`: the loss parses as a number and is finite (`nan`/`inf` parse too).
    losses = [re.search(r"'loss': ([^,}]+)", line) for line in lines]
    assert all(losses), lines
    values = [float(m.group(1)) for m in losses]
    assert all(math.isfinite(v) for v in values), f"non-finite loss printed: {lines}"
