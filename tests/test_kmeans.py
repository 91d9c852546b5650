"""The paper recipe's mini-batch k-means in torch (vwt.kmeans) against scikit-learn's
MiniBatchKMeans.partial_fit on the same batches: the same seeding draws, running counts and random
reassignments, centres within float32 rounding (vwt.kmeans.TOLERANCE)."""
import numpy as np
import pytest
import torch

from test_vocab import CountingState, reassigning_batches
from vwt.kmeans import TOLERANCE, MiniBatchKMeans, kmeans_plusplus


def sklearn_and_torch(batches, k, batch_size):
    """scikit-learn's estimator (compute_labels=False: the same centres) and ours, fed the same batches;
    after each batch the centres' largest difference relative to their largest magnitude."""
    from sklearn.cluster import MiniBatchKMeans as SK

    sk = SK(n_clusters=k, n_init="auto", batch_size=batch_size, compute_labels=False,
            random_state=CountingState.make(0))
    ours, gaps = MiniBatchKMeans(k, batch_size, seed=0), []
    for x in batches:
        sk.partial_fit(x)
        ours.partial_fit(torch.from_numpy(x))
        assert np.array_equal(sk._counts, ours.counts)  # the same rows went to every centre
        gaps.append(float(np.abs(sk.cluster_centers_ - ours.centres.numpy()).max() /
                          np.abs(sk.cluster_centers_).max()))
    return sk, ours, gaps


def test_seeding_is_sklearns_kmeans_plusplus():
    from sklearn.cluster._kmeans import _kmeans_plusplus

    x = np.random.default_rng(3).standard_normal((500, 12)).astype(np.float32)
    ref, _ = _kmeans_plusplus(x, 40, random_state=np.random.RandomState(7),
                              x_squared_norms=(x * x).sum(1), sample_weight=np.ones(500, np.float32))
    assert np.array_equal(kmeans_plusplus(torch.from_numpy(x), 40, np.random.RandomState(7)).numpy(), ref)


def test_equals_sklearn_through_random_reassignments():
    sk, ours, gaps = sklearn_and_torch(reassigning_batches(), 20, 50)
    assert type(sk._random_state).reassigned >= 2 and ours.reassigned > 0  # it did reassign
    assert max(gaps) <= TOLERANCE
    # the same generator state after all the draws: the same numbers were drawn
    assert np.array_equal(sk._random_state.get_state()[1], ours.random_state.get_state()[1])


@pytest.mark.parametrize("k, dim", [(100, 48), (1000, 8)])
def test_equals_sklearn_at_100_and_1000_words(k, dim):
    rng = np.random.default_rng(k)
    batch = 4 * k  # rows; scikit-learn's batch_size (k // 4) sets init_size = 3 * k
    batches = [(rng.standard_normal((batch, dim)) + 3 * (rng.random((batch, 1)) < 0.1)).astype(np.float32)
               for _ in range(4)]
    sk, ours, gaps = sklearn_and_torch(batches, k, k // 4)
    assert max(gaps) <= TOLERANCE and ours.steps == 4


def test_chunked_assignment_never_holds_the_whole_distance_matrix(monkeypatch):
    from vwt import kmeans

    monkeypatch.setitem(kmeans.CHUNK, "cpu", 300 * 20)  # 300 rows x 20 centres at a time
    seen = []
    real = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda c, a, b, **k: seen.append(a.shape[0]) or real(c, a, b, **k))
    x = torch.randn(1000, 6)
    labels, dist = kmeans.nearest(x, x[:20])
    assert max(seen) == 300 and sum(seen) == 1000
    full = torch.cdist(x.double(), x[:20].double()).pow(2)
    assert torch.equal(labels, full.argmin(1)) and torch.allclose(dist.double(), full.min(1).values, atol=1e-4)
