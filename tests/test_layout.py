"""The README's layout section matches the tree: every module is named there, and every module name
there exists (a renamed or deleted module leaves a stale name, which fails here). In that section
a bare lower-case name in backticks is a module (``loader``) or a package (``data/``); functions are
written with parentheses (``load_model()``)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, "README.md has no '## Layout' section"
    return match.group(1)


def tree_names() -> set[str]:
    """Module stems and package folders (``data/``) of fdino/ and kernels/."""
    names = set()
    for top in ("fdino", "kernels"):
        for path in (ROOT / top).rglob("*.py"):
            if path.stem not in ("__init__", "__main__") and not path.stem.startswith("_"):
                names.add(path.stem)
        names.update(f"{p.name}/" for p in (ROOT / top).iterdir() if (p / "__init__.py").is_file())
    return names


def test_every_module_is_named_in_the_layout_section():
    named = set(re.findall(r"`([^`]+)`", layout_section()))
    missing = sorted(tree_names() - named)
    assert not missing, f"README.md's Layout section does not name: {missing}"


def test_every_module_name_in_the_layout_section_exists():
    tokens = set(re.findall(r"`([a-z_][a-z0-9_]*/?)`", layout_section()))
    top_level = {"fdino/", "kernels/", "tests/", "bench/"}
    stale = sorted(tokens - tree_names() - top_level)
    assert not stale, f"README.md's Layout section names modules that do not exist: {stale}"


def test_every_package_is_listed_for_installation():
    """pyproject.toml lists packages by hand: a subpackage missing there works from the source tree
    (editable installs) but is absent from a built wheel. fdino.batched once was."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {"fdino"} | {f"fdino.{p.name}" for p in (ROOT / "fdino").iterdir() if (p / "__init__.py").is_file()}
    packages.add("fdino.kernels")
    assert packages == listed, f"pyproject.toml [tool.setuptools] packages differ: {sorted(packages ^ listed)}"
