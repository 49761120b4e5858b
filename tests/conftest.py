"""Test-session setup shared by every test file.

- Without CUDA, Triton kernels run in the interpreter (TRITON_INTERPRET=1 on CPU tensors); the
  variable must be set before triton is first imported, hence here, at collection time.
- Hypothesis profiles: "ci" (default, few examples, no deadline: compiled code and the Triton
  interpreter are slow on 2 cores) and "thorough" (select with HYPOTHESIS_PROFILE=thorough).
- Strict numerics: deterministic algorithms on, default dtype fp32, seeded RNGs per test.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "triton" in sys.modules and os.environ["TRITON_INTERPRET"] == "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET was set; kernels would not run on CPU")

import pytest
from hypothesis import HealthCheck, settings

# Decoded-image caches of the tests' folders go to a scratch folder, not the user's ~/.cache/fdino
# (subprocesses inherit it).
if "FDINO_DECODE_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["FDINO_DECODE_CACHE_DIR"] = tempfile.mkdtemp(prefix="fdino-test-decoded-")
# Compiled graphs too (fdino.compile_cache): a fixed scratch folder, so reruns of the suite reuse them.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"fdino-test-inductor-{os.getuid()}")

settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seeded_rng():
    """Every test starts from the same global RNG state, so failures reproduce."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny tensors: thread hand-offs dominate their cost, and on
    a busy 2-core machine they cost ~100x. Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def two_class_folder(tmp_path_factory):
    """An image folder of 2 classes x 12 random 20 px PNGs (class c has channel c at 255): trains in seconds."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("two_class_folder")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir()
        for i in range(12):
            pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            pixels[..., c] = 255
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root
