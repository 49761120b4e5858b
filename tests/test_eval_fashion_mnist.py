"""The raw-pixel k-NN figure on Fashion-MNIST: a known number that checks the evaluation protocol
end to end (cosine similarity of centered pixels, T = 0.07 vote, chunked top-k, bookkeeping).

Runs with the session's thread count (the 60k x 10k x 784 matmul is the whole cost)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fdino.eval import raw_pixel_knn

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not FASHION_MNIST.is_dir(),
    reason=f"{FASHION_MNIST} is absent: install Debian's dataset-fashion-mnist "
    f"(apt-get install dataset-fashion-mnist) to check the raw-pixel k-NN figure",
)
def test_fashion_mnist_raw_pixel_20nn_matches_the_known_figure():
    """Raw-pixel 20-NN on Fashion-MNIST (60k bank, 10k test queries) scores about 85-86% top-1.

    A known figure for the whole protocol: cosine similarity of centered pixels, T = 0.07
    weighting, chunked top-k, accuracy bookkeeping. A bug in any of them moves it by points.
    """
    from fdino.data import build_dataset

    start = time.perf_counter()
    memory = build_dataset("fashion-mnist", split="memory")
    query = build_dataset("fashion-mnist", split="query")
    assert (len(memory), len(query)) == (60000, 10000)
    result = raw_pixel_knn(memory.dataset, query.dataset, ks=(20,), batch_size=2000)
    elapsed = time.perf_counter() - start
    print(f"Fashion-MNIST raw-pixel 20-NN: {result[20]} in {elapsed:.1f} s")
    assert 83.0 <= result[20]["top1"] <= 87.0
    assert result[20]["top5"] > 97.0
