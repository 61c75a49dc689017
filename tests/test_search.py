"""csnlib.search.Index: exact numpy search against a full sort, faiss's exact search against numpy's, masked search with
learned (non-binary) masks, the approximate indexes, bench.py --search on a small gallery, and the keys of the
embeddings cache next to a checkpoint."""
import argparse
import json
import os

import numpy as np
import pytest

faiss_missing = pytest.mark.skipif(not __import__('csnlib.search', fromlist=['search']).faiss_or_none(),
                                   reason='faiss is not installed (pip install faiss-cpu)')


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
    assert (a[:, 0].tolist() == list(range(50))
            and sorted(map(tuple, np.sort(b, 1))) == sorted(map(tuple, np.sort(a, 1))))


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


def clustered(n=5000, dim=32, clusters=50, seed=0):
    """(N, D) rows around `clusters` centres, and 100 queries near the first rows: what approximate search exploits."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32) * 4
    space = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim)).astype(np.float32)  # (N, D)
    return space, space[:100] + 0.1


def recall(idx, truth):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(idx, truth)])


@faiss_missing
@pytest.mark.parametrize('kind, options', [('ivf', {}), ('ivf', {'codes': 'flat'}), ('hnsw', {}),
                                           ('ivf', {'nlist': 100, 'nprobe': 8}), ('hnsw', {'m': 8, 'ef_search': 16})])
def test_approximate_indexes_find_most_true_neighbours_at_their_exact_distances(kind, options):
    from csnlib.search import Index
    space, queries = clustered()
    truth, _ = Index(space).search(queries, 10)
    index = Index(space, kind, **options)
    idx, dist = index.search(queries, 10)
    assert idx.shape == dist.shape == (100, 10) and recall(idx, truth) > 0.9
    exact = np.sqrt(((space[idx].astype(np.float64) - queries[:, None]) ** 2).sum(2))  # (Q, k) of the ids returned
    np.testing.assert_allclose(dist, exact, rtol=1e-5, atol=1e-5)
    assert (np.diff(dist, axis=1) >= 0).all()
    idx, _ = index.search(queries, 10, exclude=np.arange(100))  # each query's own row left out
    assert idx.shape == (100, 10) and not (idx == np.arange(100)[:, None]).any()


@faiss_missing
def test_ivf_defaults_to_4bit_codes_whose_candidates_are_reranked():
    from csnlib.search import PQ_MIN_ROWS, Index
    space, queries = clustered(dim=16)
    truth, true_dist = Index(space).search(queries, 10)
    index = Index(space, 'ivf')
    assert index.codes == 'pq4' and index.nlist == 70 and index.nprobe >= index.nlist  # sqrt(5000): every cell searched
    idx, dist = index.search(queries, 10)
    assert recall(idx, truth) > 0.99  # the 64 candidates of the 4-bit codes, re-ranked: the true 10 nearest
    assert (dist >= true_dist - 1e-5).all()  # the j-th found is never nearer than the true j-th
    same = (idx == truth).all(1)  # (Q,) the queries whose 10 were all found: at the exact distances
    assert same.mean() > 0.95
    np.testing.assert_allclose(dist[same], true_dist[same], rtol=1e-5, atol=1e-5)
    index.rerank = 10  # the codes' own top 10, only sorted by exact distance: misses some
    assert recall(index.search(queries, 10)[0], truth) < recall(idx, truth)
    small = Index(space[:PQ_MIN_ROWS - 1], 'ivf')  # too few rows to train the codes: the floats, one cell per 39 rows
    assert small.codes == 'flat' and small.nlist == (PQ_MIN_ROWS - 1) // 39
    tiny = Index(space[:40], 'ivf')  # one cell: exact
    assert tiny.nlist == 1
    assert tiny.search(space[:5], 3)[0].tolist() == Index(space[:40]).search(space[:5], 3)[0].tolist()


@faiss_missing
def test_building_an_ivf_index_of_a_small_gallery_gives_no_faiss_warning(capfd):
    from csnlib.search import PQ_MIN_ROWS, Index
    space, _ = clustered(dim=8)
    for n in (40, 100, PQ_MIN_ROWS - 1, PQ_MIN_ROWS, 2000):
        Index(space[:n], 'ivf').search(space[:2], 5)
    assert 'WARNING' not in capfd.readouterr().err


@pytest.mark.parametrize('options, message', [
    ({'nprobe': 0}, 'nprobe must be a positive integer, not 0'),
    ({'ef_search': -1}, 'ef_search must be a positive integer'),
    ({'rerank': 1.5}, 'rerank must be a positive integer, not 1.5'),
    ({'m': True}, 'm must be a positive integer'),
    ({'ef_construction': None}, 'ef_construction must be a positive integer'),
    ({'nlist': 0}, 'nlist must be a positive integer'),
    ({'nlist': 30}, 'nlist 30 is over N/39 = 25 for 1000 rows'),
    ({'codes': 'pq8'}, "unknown codes 'pq8': use pq4 or flat"),
])
def test_bad_parameters_are_refused_by_name(options, message):
    from csnlib.options import UserError
    from csnlib.search import Index
    with pytest.raises(UserError, match=message.replace('(', r'\(').replace('.', r'\.')):
        Index(np.zeros((1000, 4), np.float32), 'ivf', **options)


def test_4bit_codes_need_enough_rows_to_train():
    from csnlib.options import UserError
    from csnlib.search import PQ_MIN_ROWS, Index
    with pytest.raises(UserError, match=f"codes 'pq4' needs at least {PQ_MIN_ROWS} rows to train, not 100"):
        Index(np.zeros((100, 4), np.float32), 'ivf', codes='pq4')


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
    import bench
    from csnlib.search import faiss_or_none
    assert bench.search_speed(sizes=(2000,), dim=16, queries=120, min_s=0.01,
                              indexes=('exact', 'numpy', 'ivf', 'hnsw')) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{')]
    kinds = ['exact', 'numpy', *['ivf'] * 4, *['hnsw'] * 5] if faiss_or_none() else ['numpy']
    assert [r['index'] for r in rows] == kinds
    assert all(r['images'] == 2000 and r['queries_per_s'] > 0 and r['ms_per_query'] > 0 for r in rows)
    assert [r['recall_at_10'] for r in rows[:2]] == [1.0, 1.0][:len(rows)]  # numpy and faiss: the same neighbours
    if faiss_or_none():  # the former settings and the defaults, the defaults marked
        assert [r['setting'] for r in rows[2:]] == [
            'flat codes, nprobe 16', 'flat codes, nprobe 64', 'pq4 codes, nprobe 64', 'pq4 codes, nprobe 128 (default)',
            'm 16 efc 40, ef_search 64', 'm 16 efc 40, ef_search 256', 'm 32 efc 80, ef_search 128',
            'm 32 efc 80, ef_search 192 (default)', 'm 32 efc 80, ef_search 256']
        assert all(r['recall_at_10'] > 0.9 for r in rows[3:6] + rows[7:])  # 45 cells: 64 probes search them all


def test_bench_search_times_only_the_indexes_asked_for_with_recall_against_exact_search(capsys):
    import bench
    from csnlib.search import faiss_or_none
    if faiss_or_none() is None:
        pytest.skip('faiss-cpu is not installed: only the numpy search exists')
    assert bench.search_speed(sizes=(2000,), dim=16, queries=120, min_s=0.01, indexes=('ivf',)) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{')]
    assert [r['index'] for r in rows] == ['ivf'] * 4                 # no exact, numpy or hnsw row
    assert all(r['recall_at_10'] > 0.9 for r in rows[1:])           # against the exact neighbours, not its own
    assert rows[0]['recall_at_10'] < 1.0                              # 16 of 45 cells: it misses some


def test_bench_search_sets_one_index_per_notion_beside_one_index_for_every_notion(capsys):
    import bench
    from csnlib.search import faiss_or_none
    assert bench.search_speed(sizes=(3000,), dim=16, queries=90, min_s=0.01, indexes=('notions',), notions=3) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{')]
    want = [('per-notion', 'exact'), ('one', 'exact')]
    if faiss_or_none():
        want += [('per-notion', 'ivf (defaults)'), ('one', 'ivf (defaults)'), ('one', 'ivf, shared cells, nprobe 128'),
                 ('one', 'ivf, shared cells, nprobe 256'), ('one', 'ivf, shared cells, nprobe 512')]
    assert [(r['index'], r['setting']) for r in rows] == want
    assert all(r['images'] == 3000 and r['notions'] == 3 and r['queries'] == 90 for r in rows)
    assert rows[1]['recall_at_10'] == 1.0  # the one exact index finds the per-notion exact neighbours
    # per notion: a masked copy per notion (and faiss's); one index: f(x) and 3 norms, once
    assert rows[0]['memory_mb'] == pytest.approx(2 * 3 * 3000 * 16 * 4 / 2 ** 20, rel=0.01)
    assert rows[1]['memory_mb'] == pytest.approx(3000 * (16 + 3) * 4 / 2 ** 20, rel=0.01)
    if faiss_or_none():
        assert all(r['recall_at_10'] > 0.9 for r in rows[2:])


def test_bench_search_takes_the_sizes_to_measure():
    import bench
    assert bench.build_parser().parse_args(['--search', '1000', '20000']).search == [1000, 20000]
    assert bench.build_parser().parse_args(['--search']).search == []
    assert bench.build_parser().parse_args([]).search is None
    assert bench.build_parser().parse_args(['--search', '--search-indexes', 'exact', 'ivf']).search_indexes == [
        'exact', 'ivf']
    assert bench.build_parser().parse_args([]).search_indexes == list(bench.SEARCH_INDEXES)
    assert bench.build_parser().parse_args(['--search', '--search-notions', '2']).search_notions == 2
    assert bench.build_parser().parse_args([]).search_notions == 4
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(['--search-indexes', 'lsh'])
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(['--search', '0'])


# ----------------------------------------------------------------------------------- the embeddings cache's keys

class FakeEmbedder:
    """Stands in for csnlib.search.embed_dataset: counts the calls, returns fixed (N, D) embeddings and (C, D) masks."""

    def __init__(self, n, c=2, d=64, value=None):
        rng = np.random.default_rng(0)
        self.emb = (rng.standard_normal((n, d)).astype(np.float32) if value is None
                    else np.full((n, d), value, np.float32))
        self.masks = np.ones((c, d), np.float32)
        self.calls = 0

    def __call__(self, model, images, store, rt, n_notions):
        self.calls += 1
        return self.emb.copy(), self.masks.copy()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A shapes dataset, a checkpoint file next to which the cache goes, and export/load through a fake embedder."""
    from conftest import make_dataset
    from csnlib import search
    from csnlib.options import main_parser
    from triplet_image_loader import load_dataset_info
    data = tmp_path / 'shapes'
    make_dataset(str(data))
    run = tmp_path / 'run'
    run.mkdir()
    ckpt = run / 'model_best.pth.tar'
    ckpt.write_bytes(b'weights 1')
    args = main_parser().parse_args(['--no-pretrained', '--image-size', '32'])
    fake = FakeEmbedder(40)
    monkeypatch.setattr(search, 'embed_dataset', fake)
    notes = []

    def export(out=run, log=notes.append):
        model = argparse.Namespace(embednet=argparse.Namespace())  # the fake embedder never looks into it
        return search.export_embeddings(model, load_dataset_info(str(data)),
                                        argparse.Namespace(args=args, resume=str(ckpt)),
                                        str(out), store=object(), log=log)

    def load(root=data):
        notes.clear()
        got = search.load_cached_embeddings(str(run), str(ckpt), load_dataset_info(str(root)), args, log=notes.append)
        return got, ' '.join(notes)
    return argparse.Namespace(data=data, run=run, ckpt=ckpt, fake=fake, export=export, load=load, args=args)


def test_the_cache_is_used_for_the_same_checkpoint_and_images(cache):
    cache.export()
    (emb, masks), note = cache.load()
    assert note == '' and np.array_equal(emb, cache.fake.emb) and np.array_equal(masks, cache.fake.masks)
    meta = json.loads((cache.run / 'embeddings.json').read_text())
    assert meta['checkpoint'] == 'model_best.pth.tar' and meta['images'] == 40 and meta['embeddings_shape'] == [40, 64]
    assert not [f for f in os.listdir(cache.run) if '.tmp' in f]  # atomic writes leave no temporary file


def test_a_changed_image_recomputes_even_with_its_old_size(cache):
    cache.export()
    img = cache.data / 'images' / 'shapes' / 'red_circle_3.png'
    st = img.stat()
    img.write_bytes(img.read_bytes())  # the same bytes again, written later: its mtime changes
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    got, note = cache.load()
    assert got is None and 'an image under' in note and 'changed since' in note and 'computed again' in note


def test_a_checkpoint_of_the_same_size_and_mtime_but_other_weights_recomputes(cache):
    cache.export()
    st = cache.ckpt.stat()
    cache.ckpt.write_bytes(b'weights 2')  # same size
    os.utime(cache.ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime, as cp -p or rsync -a keep it
    got, note = cache.load()
    assert got is None and f'the checkpoint {cache.ckpt} changed since' in note


def test_another_data_folder_with_the_same_file_names_recomputes(cache, tmp_path):
    import shutil
    cache.export()
    other = tmp_path / 'copy'
    shutil.copytree(cache.data, other)  # copy2: the same names, sizes and mtimes
    got, note = cache.load(other)
    assert got is None and f'computed from the images of {os.path.realpath(cache.data)}, not' in note
    assert cache.load()[0] is not None  # the original folder still matches


def rewrite_stamped(cache, emb):
    """embeddings.npy replaced by emb, with the stamp's digest and shape updated to match (an export of older code that
    wrote bad values, which the stamp then describes)."""
    from csnlib.search import _array_sha256
    np.save(cache.run / 'embeddings.npy', emb)
    meta = json.loads((cache.run / 'embeddings.json').read_text())
    meta['embeddings_sha256'], meta['embeddings_shape'] = _array_sha256(emb), list(emb.shape)
    (cache.run / 'embeddings.json').write_text(json.dumps(meta))


@pytest.mark.parametrize('stamped', [False, True])
def test_nan_rows_in_the_cache_recompute_and_never_answer_minus_one(cache, stamped, monkeypatch):
    from csnlib import search
    cache.export()
    emb = cache.fake.emb.copy()
    emb[[3, 17]] = np.nan
    if stamped:
        rewrite_stamped(cache, emb)
    else:
        np.save(cache.run / 'embeddings.npy', emb)
    got, note = cache.load()
    assert got is None and ('2 of its 40 images have non-finite embeddings' if stamped
                            else 'not the file its stamp describes') in note, note
    # what retrieve.py then does: recompute, and search finite embeddings
    emb, masks = cache.export()
    idx, dist = search.nearest(emb * masks[0], emb[3] * masks[0], 10, exclude=3)
    assert (idx >= 0).all() and np.isfinite(dist).all() and len(idx) == 10


@pytest.mark.parametrize('bad', ['wrong shape', 'truncated', 'old stamp', 'no stamp'])
def test_a_damaged_cache_recomputes_with_a_note_instead_of_crashing(cache, bad):
    cache.export()
    if bad == 'wrong shape':
        rewrite_stamped(cache, np.zeros((40, 63), np.float32))
        want = 'not float (40, 64)'
    elif bad == 'truncated':
        (cache.run / 'embeddings.npy').write_bytes((cache.run / 'embeddings.npy').read_bytes()[:300])
        want = 'cannot be read'
    elif bad == 'old stamp':  # embeddings.json as earlier code wrote it: no images' stamp
        meta = json.loads((cache.run / 'embeddings.json').read_text())
        del meta['cache_version']
        (cache.run / 'embeddings.json').write_text(json.dumps(meta))
        want = 'written by older code'
    else:  # an export killed between its arrays and its stamp
        (cache.run / 'embeddings.json').unlink()
        want = 'without its embeddings.json'
    got, note = cache.load()
    assert got is None and want in note and 'computed again' in note, note


def test_an_export_of_non_finite_embeddings_is_refused_and_an_unwritable_folder_only_warns(cache, monkeypatch,
                                                                                           tmp_path):
    from csnlib import search
    from csnlib.errors import CheckpointError
    cache.export()
    monkeypatch.setattr(search, 'embed_dataset', FakeEmbedder(40, value=np.nan))
    with pytest.raises(CheckpointError, match=r'non-finite embeddings \(NaN or inf\) for 40 of 40 images \(first: '
                                              r'shapes/red_circle_0.png\)'):
        cache.export()
    assert cache.load()[0] is not None  # the good cache is left as it was
    monkeypatch.setattr(search, 'embed_dataset', cache.fake)
    (tmp_path / 'a_file').write_text('')
    notes = []
    emb, _ = cache.export(out=tmp_path / 'a_file' / 'sub', log=notes.append)  # a folder that cannot be made
    assert emb.shape == (40, 64) and notes[0].startswith('WARNING: cannot cache the embeddings in ')
