"""Weighted k-NN (fdino.eval.knn): known answers and a float64 brute-force twin.
The Fashion-MNIST raw-pixel figure is checked in test_eval_fashion_mnist.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fdino.eval import center_features, knn_classify, knn_topk, knn_vote, raw_pixel_features
from fdino.eval.knn import topk_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


def clusters(n_per_class: int, num_classes: int, dim: int, *, noise: float, seed: int):
    """Gaussian blobs: features ``[C * n, dim]`` and their labels; one center per class."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * 10
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centers[labels] + noise * torch.randn(len(labels), dim, generator=g), labels


def reference_knn(bank, bank_y, queries, k, temperature, num_classes):
    """Brute force in float64: all similarities, a full sort, the paper's vote."""
    sims = F.normalize(queries.double(), dim=1) @ F.normalize(bank.double(), dim=1).T
    values, order = sims.sort(dim=1, descending=True, stable=True)
    k = min(k, bank.shape[0])
    votes = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    votes.scatter_add_(1, bank_y[order[:, :k]], (values[:, :k] / temperature).exp())
    return sims, values, votes


def test_separable_clusters_are_classified_perfectly():
    bank, bank_y = clusters(100, 4, 16, noise=0.1, seed=0)
    queries, query_y = clusters(25, 4, 16, noise=0.1, seed=0)  # same centers, new noise draws below
    queries = queries + 0.05 * torch.randn_like(queries)
    result = knn_classify(bank, bank_y, queries, query_y, ks=(1, 10, 20, 100, 200), query_chunk=7, bank_chunk=33)
    assert set(result) == {1, 10, 20, 100, 200}
    for k, acc in result.items():
        assert acc == {"top1": 100.0, "top5": 100.0}, k


def test_shuffled_labels_score_chance():
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(3000, 16, generator=g), torch.randn(2000, 16, generator=g)
    bank_y, query_y = torch.randint(0, 10, (3000,), generator=g), torch.randint(0, 10, (2000,), generator=g)
    result = knn_classify(bank, bank_y, queries, query_y, ks=(20,), num_classes=10)
    # chance: 10% top-1 and 50% top-5; the standard error with 2000 queries is ~0.7% / 1.1%
    assert abs(result[20]["top1"] - 10.0) < 3.5
    assert abs(result[20]["top5"] - 50.0) < 5.0


@given(
    n=st.integers(1, 60),
    m=st.integers(1, 30),
    dim=st.integers(2, 8),
    k=st.integers(1, 70),
    query_chunk=st.integers(1, 40),
    bank_chunk=st.integers(1, 70),
    num_classes=st.integers(1, 6),
    temperature=st.sampled_from([0.07, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_chunked_knn_matches_float64_brute_force(n, m, dim, k, query_chunk, bank_chunk, num_classes, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    bank, queries = torch.randn(n, dim, generator=g), torch.randn(m, dim, generator=g)
    bank_y, query_y = torch.randint(0, num_classes, (n,), generator=g), torch.randint(0, num_classes, (m,), generator=g)
    sims, ref_values, ref_votes = reference_knn(bank, bank_y, queries, k, temperature, num_classes)

    values, index = knn_topk(bank, queries, k, query_chunk=query_chunk, bank_chunk=bank_chunk)
    kk = min(k, n)
    assert values.shape == index.shape == (m, kk)
    # The similarities are the true top-k; each index points at a row with that similarity
    # (tie-breaking may pick another row of equal similarity, which is equally correct).
    torch.testing.assert_close(values.double(), ref_values[:, :kk], rtol=0, atol=1e-5)
    torch.testing.assert_close(sims.gather(1, index), values.double(), rtol=0, atol=1e-5)
    assert all(len(set(row)) == kk for row in index.tolist())  # no bank row counted twice

    votes = knn_vote(values, bank_y[index], kk, temperature=temperature, num_classes=num_classes)
    torch.testing.assert_close(votes, ref_votes, rtol=1e-4, atol=0)

    # Aggregate accuracy equals the brute force's, up to queries whose ranking is a near-tie.
    result = knn_classify(
        bank,
        bank_y,
        queries,
        query_y,
        ks=(k,),
        temperature=temperature,
        num_classes=num_classes,
        query_chunk=query_chunk,
        bank_chunk=bank_chunk,
    )
    ref = topk_accuracy(ref_votes, query_y, (1, 5))
    top = ref_votes.sort(dim=1, descending=True).values
    boundary = ref_values[:, kk - 1] - (ref_values[:, kk] if kk < n else -2.0)
    gaps = (top[:, :-1] - top[:, 1:]).abs().min(dim=1).values if num_classes > 1 else torch.ones(m)
    ambiguous = int(((boundary < 1e-4) | (gaps < 1e-6 * top[:, :1].squeeze(1))).sum())
    for name, j in (("top1", 1), ("top5", 5)):
        assert abs(result[k][name] - ref[j]) * m / 100 <= ambiguous + 1e-9


def test_chunking_does_not_change_the_result():
    bank, queries = torch.randn(1000, 8), torch.randn(300, 8)
    small = knn_topk(bank, queries, 17, query_chunk=64, bank_chunk=100)  # 5 x 10 blocks, ragged tail
    whole = knn_topk(bank, queries, 17, query_chunk=300, bank_chunk=1000)  # one block
    torch.testing.assert_close(small[0], whole[0])
    assert torch.equal(small[1], whole[1])


def test_k_larger_than_the_bank_uses_the_whole_bank():
    bank, bank_y = clusters(3, 2, 4, noise=0.1, seed=2)
    result = knn_classify(bank, bank_y, bank, bank_y, ks=(200,))
    assert result[200]["top1"] == 100.0  # exp(s/T) lets the own cluster dominate the 6 votes


def test_input_validation_names_the_problem():
    x, y = torch.randn(5, 3), torch.zeros(5, dtype=torch.int64)
    with pytest.raises(ValueError, match="negative"):
        knn_classify(x, y - 1, x, y)
    with pytest.raises(ValueError, match="labels for"):
        knn_classify(x, y[:4], x, y)
    with pytest.raises(ValueError, match="ks="):
        knn_classify(x, y, x, y, ks=())
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(x, y, x, y, temperature=0.0)
    with pytest.raises(ValueError, match="query_chunk"):
        knn_topk(x, x, 2, query_chunk=0)
    with pytest.raises(ValueError, match="same D"):
        knn_topk(x, torch.randn(2, 4), 2)


def test_top5_is_clipped_to_the_number_of_classes():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    acc = topk_accuracy(scores, torch.tensor([2, 0]), (1, 5))
    assert acc == {1: 50.0, 5: 100.0}


def test_raw_pixel_features_drop_duplicate_gray_channels_without_changing_cosines():
    gray = torch.randint(0, 256, (6, 1, 5, 5), dtype=torch.uint8)
    data = [(img.expand(3, -1, -1), i % 2) for i, img in enumerate(gray)]

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

    feats, labels = raw_pixel_features(Items(), batch_size=4)
    assert feats.shape == (6, 25) and labels.tolist() == [0, 1, 0, 1, 0, 1]
    full = torch.stack([d[0] for d in data]).reshape(6, -1).float() / 255
    (a,) = center_features(feats)
    (b,) = center_features(full)
    torch.testing.assert_close(
        F.normalize(a, dim=1) @ F.normalize(a, dim=1).T, F.normalize(b, dim=1) @ F.normalize(b, dim=1).T
    )
