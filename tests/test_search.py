"""retrieval.Index: exact numpy search against a full sort, faiss's exact search against numpy's, masked search with
learned (non-binary) masks, the approximate indexes, and bench.py --search on a small gallery."""
import numpy as np
import pytest

faiss_missing = pytest.mark.skipif(not __import__('csnlib.search', fromlist=['search']).faiss_or_none(), reason='faiss is not installed '
                                   '(pip install faiss-cpu)')


def gallery(n=3000, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)  # (N, D) raw embeddings
    mask = np.maximum(rng.normal(0.9, 0.7, dim), 0).astype(np.float32)  # a learned mask after ReLU: zeros and weights
    return emb, mask


def slow_nearest(emb, mask, query, k, exclude=None):
    """The obvious loop: the model's distance ||f(x) m - f(q) m|| of every row, in float64, sorted (ties by index)."""
    d = [(float(np.sqrt(sum((m * (a - b)) ** 2 for a, b, m in zip(row, query, mask)))), i) for i, row in enumerate(emb)
         if i != exclude]
    d.sort()
    return [i for _, i in d[:k]], [v for v, _ in d[:k]]


@pytest.mark.parametrize('use_faiss', [False, pytest.param(None, marks=faiss_missing)])
def test_masked_search_matches_a_loop_over_the_models_distance(use_faiss):
    from csnlib.search import Index
    emb, mask = gallery(400, 16)
    assert (mask == 0).any() and ((mask > 0) & (mask != 1)).any()
    index = Index(emb * mask, use_faiss=use_faiss)
    queries = np.stack([emb[7], emb[123] + 0.01])  # a gallery row (left out) and a new point
    idx, dist = index.search(queries * mask, 6, exclude=[7, -1])
    for q, ex, got_i, got_d in zip(queries, [7, None], idx, dist):
        want_i, want_d = slow_nearest(emb, mask, q, 6, ex)
        assert got_i.tolist() == want_i
        np.testing.assert_allclose(got_d, want_d, rtol=1e-4, atol=1e-5)
    assert 7 not in idx[0] and idx[1][0] == 123


def test_numpy_search_edge_cases():
    from csnlib.search import Index, nearest
    space = np.array([[0.0], [1.0], [1.0], [3.0]], np.float32)
    idx, dist = Index(space, use_faiss=False).search([[1.0]], 10)  # k over N: all rows; a tie goes by index
    assert idx.tolist() == [[1, 2, 0, 3]] and dist.tolist() == [[0, 0, 1, 2]]
    idx, _ = Index(space, use_faiss=False).search([[1.0], [3.0]], 2, exclude=[1, 3])
    assert idx.tolist() == [[2, 0], [1, 2]]
    idx, dist = nearest(space[:1], space[0], 3, exclude=0)  # nothing left
    assert idx.shape == dist.shape == (0,)
    emb = np.random.default_rng(0).standard_normal((5000, 8)).astype(np.float32)  # several chunks of queries
    index = Index(emb, use_faiss=False)
    a, _ = index.search(emb[:50], 4)
    _, b = index._numpy_search(emb[:50], 4, chunk=5000 * 3)  # 3 queries per chunk
    assert a[:, 0].tolist() == list(range(50)) and sorted(map(tuple, np.sort(b, 1))) == sorted(map(tuple, np.sort(a, 1)))


@faiss_missing
def test_exact_faiss_returns_numpys_neighbours():
    from csnlib.search import Index
    emb, mask = gallery(20_000, 64, seed=1)
    space = emb * mask
    queries = np.random.default_rng(2).standard_normal((40, 64)).astype(np.float32) * mask
    f_idx, f_dist = Index(space).search(queries, 10, exclude=np.arange(40))
    n_idx, n_dist = Index(space, use_faiss=False).search(queries, 10, exclude=np.arange(40))
    assert f_idx.tolist() == n_idx.tolist()
    np.testing.assert_allclose(f_dist, n_dist, rtol=1e-4)
    for i in range(40):
        assert i not in f_idx[i]


@faiss_missing
@pytest.mark.parametrize('kind', ['ivf', 'hnsw'])
def test_approximate_indexes_find_most_true_neighbours(kind):
    from csnlib.search import Index
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 32)).astype(np.float32) * 4
    space = centres[rng.integers(0, 50, 5000)] + rng.standard_normal((5000, 32)).astype(np.float32)  # clustered
    queries = space[:100] + 0.1
    truth, _ = Index(space).search(queries, 10)
    idx, dist = Index(space, kind).search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, truth)])
    assert recall > 0.9 and idx.shape == (100, 10) and (np.diff(dist, axis=1) >= 0).all()


def test_without_faiss_exact_search_is_numpy_and_approximate_is_refused(monkeypatch):
    from csnlib import search as retrieval
    from csnlib.options import UserError
    monkeypatch.setattr(retrieval, 'faiss_or_none', lambda: None)
    space = np.eye(4, dtype=np.float32)
    index = retrieval.Index(space)
    assert index.faiss is None and index.search(space[2:3], 1)[0].tolist() == [[2]]
    for kind in ('ivf', 'hnsw'):
        with pytest.raises(UserError, match='needs faiss: pip install faiss-cpu'):
            retrieval.Index(space, kind)
    with pytest.raises(UserError, match="unknown index 'lsh'"):
        retrieval.Index(space, 'lsh')


def test_bench_search_prints_each_index_with_its_recall(capsys):
    import json

    import bench
    from csnlib.search import faiss_or_none
    assert bench.search_speed(sizes=(2000,), dim=16, queries=120, min_s=0.01) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{')]
    kinds = ['exact', 'numpy', 'ivf', 'ivf', 'hnsw', 'hnsw'] if faiss_or_none() else ['numpy']
    assert [r['index'] for r in rows] == kinds
    assert all(r['images'] == 2000 and r['queries_per_s'] > 0 for r in rows)
    assert [r['recall_at_10'] for r in rows[:2]] == [1.0, 1.0][:len(rows)]  # numpy and faiss: the same neighbours
