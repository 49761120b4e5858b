"""Benchmarks live in ``bench_*.py`` files, which pytest's default ``test_*.py`` pattern misses:
collect them when the folder is given (``pytest bench``, as ``make bench`` does). A file named on
the command line is collected by pytest itself, so it is left alone here (no double collection).
"""

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
