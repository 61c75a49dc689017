"""csnlib.catalogue: one index for every notion of a mask model. The inner-product identity, exact search equal to
today's per-notion exact search (learned masks, faiss and numpy, ties by index), the approximate kind's recall at true
distances, the one-notion case, the models that keep one index per notion, and model.index without a notion."""
import numpy as np
import pytest
import torch
from test_search import clustered, recall, slow_nearest
from test_trained_csn import hub_load, images

from conftest import save_checkpoint

faiss_missing = pytest.mark.skipif(not __import__('csnlib.search', fromlist=['search']).faiss_or_none(),
                                   reason='faiss is not installed (pip install faiss-cpu)')


def learned(c=4, n=3000, dim=32, seed=0):
    """Raw embeddings (N, D) and learned masks (C, D) as a learned CSN starts them: ReLU(N(0.9, 0.7)), zeros and
    non-binary weights, and queries (Q, D)."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    masks = np.maximum(rng.normal(0.9, 0.7, (c, dim)), 0).astype(np.float32)
    assert (masks == 0).any() and ((masks > 0) & (masks != 1)).any()
    return emb, masks, rng.standard_normal((50, dim)).astype(np.float32)


def test_the_inner_product_of_the_augmented_vectors_is_the_masks_norm_minus_the_squared_distance():
    from csnlib.catalogue import augmented_vectors, query_vectors
    emb, masks, q = learned(n=200)
    v, slots = augmented_vectors(emb, masks)
    assert v.shape == (200, 32 + 4) and sorted(slots.tolist()) == [0, 1, 2, 3]  # a slot per distinct mask
    for c in range(4):
        u = query_vectors(q, masks, slots, c)  # (Q, D + C)
        d2 = (((q[:, None].astype(np.float64) - emb[None]) * masks[c]) ** 2).sum(2)  # (Q, N) the model's distance
        want = ((q.astype(np.float64) * masks[c]) ** 2).sum(1)[:, None] - d2
        np.testing.assert_allclose(u.astype(np.float64) @ v.T.astype(np.float64), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('use_faiss', [False, pytest.param(None, marks=faiss_missing)])
def test_exact_search_returns_todays_per_notion_exact_search_for_every_notion(use_faiss):
    from csnlib.catalogue import CatalogueIndex
    from csnlib.search import Index
    emb, masks, q = learned()
    one = CatalogueIndex(emb, masks, use_faiss=use_faiss)
    assert one.vectors.shape == (3000, 32 + 4)  # one vector per image, not one per image and notion
    for c in range(4):
        today = Index(emb * masks[c], use_faiss=use_faiss)
        for exclude in (None, np.arange(50)):
            want_i, want_d = today.search(q * masks[c] if exclude is None else emb[:50] * masks[c], 10, exclude)
            got_i, got_d = one.search(q if exclude is None else emb[:50], 10, notion=c, exclude=exclude)
            assert got_i.tolist() == want_i.tolist()
            np.testing.assert_allclose(got_d, want_d, rtol=1e-6, atol=1e-6)
    small_emb, small_masks = emb[:300], masks
    got_i, got_d = CatalogueIndex(small_emb, small_masks, use_faiss=use_faiss).search(q[:2], 7, notion=2)
    for query, i, d in zip(q[:2], got_i, got_d):  # and the obvious loop over the model's distance
        want_i, want_d = slow_nearest(small_emb, small_masks[2], query, 7)
        assert i.tolist() == want_i
        np.testing.assert_allclose(d, want_d, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('use_faiss', [False, pytest.param(None, marks=faiss_missing)])
def test_ties_go_by_index_as_in_todays_search(use_faiss):
    """Row 5 stored at 3, 5, 9, 11 and 14 (equal distances to any query): the k-th place cuts between the copies,
    and both searches keep the lowest indices, in order."""
    from csnlib.catalogue import CatalogueIndex
    from csnlib.search import Index
    emb, masks, _ = learned(n=400, dim=16)
    for i in (3, 9, 11, 14):
        emb[i] = emb[5]
    query = emb[5:6] + 0.001
    one = CatalogueIndex(emb, masks, use_faiss=use_faiss)
    for c in range(4):
        got_i, got_d = one.search(query, 3, notion=c)
        want_i, _ = Index(emb * masks[c], use_faiss=use_faiss).search(query * masks[c], 3)
        assert got_i.tolist() == want_i.tolist() == [[3, 5, 9]] and got_d[0, 0] == got_d[0, 1] == got_d[0, 2]
        got_i, _ = one.search(emb[5:6], 4, notion=c, exclude=[5])  # the query itself left out
        assert got_i.tolist() == [[3, 9, 11, 14]]


def test_notions_by_name_and_the_one_notion_case():
    from csnlib.catalogue import CatalogueIndex
    from csnlib.options import UserError
    from csnlib.search import Index
    emb, masks, q = learned(c=2, n=500)
    named = CatalogueIndex(emb, masks, notions=['colour', 'shape'])
    assert named.search(q, 5, 'shape')[0].tolist() == named.search(q, 5, 1)[0].tolist()
    with pytest.raises(UserError, match="notion 'size': unknown notion; this index has 0=colour, 1=shape"):
        named.search(q, 5, 'size')
    with pytest.raises(UserError, match=r'queries of 31 dimensions, the index holds 32'):
        named.search(q[:, :31], 5, 0)
    triplet = CatalogueIndex(emb, np.ones((3, 32), np.float32))  # the standard triplet network: no masks
    assert triplet.vectors.shape == (500, 33) and triplet.slots.tolist() == [0, 0, 0]  # one slot serves every notion
    want = Index(emb).search(q, 5)
    for c in range(3):
        got = triplet.search(q, 5, c)
        assert got[0].tolist() == want[0].tolist()
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    fixed = np.zeros((2, 32), np.float32)
    fixed[0, :16] = fixed[1, 16:] = 1  # fixed disjoint masks: each notion sees its block only
    one = CatalogueIndex(emb, fixed)
    assert one.search(q, 5, 1)[0].tolist() == Index(emb[:, 16:]).search(q[:, 16:], 5)[0].tolist()


def test_bad_arguments_are_refused_by_name():
    from csnlib.catalogue import CatalogueIndex
    from csnlib.options import UserError
    emb, masks, _ = learned(n=1000, dim=8)
    for args, options, message in [((emb[None].repeat(4, 0), masks), {}, r'task-specific networks and ASEN'),
                                   ((emb, masks[:, :4]), {}, r'expected raw embeddings \(N, D\) and masks \(C, D\)'),
                                   ((emb, masks, 'hnsw'), {}, "unknown index 'hnsw': use exact or ivf"),
                                   ((emb, masks, 'ivf'), {'nprobe': 0}, 'nprobe must be a positive integer, not 0'),
                                   ((emb, masks, 'ivf'), {'nlist': 30}, 'nlist 30 is over N/39 = 25'),
                                   ((emb, masks, 'ivf'), {'codes': 'pq8'}, "unknown codes 'pq8'"),
                                   ((emb, masks, 'ivf'), {'cells': 'all'}, "unknown cells 'all': use shared or")]:
        with pytest.raises(UserError, match=message):
            CatalogueIndex(*args, **options)


@faiss_missing
@pytest.mark.parametrize('codes, cells', [('pq4', 'shared'), ('flat', 'shared'), ('pq4', 'notion')])
def test_ivf_finds_most_true_neighbours_of_every_notion_at_their_true_distances(codes, cells):
    from csnlib.catalogue import CatalogueIndex
    space, queries = clustered()  # (5000, 32) in 50 clusters
    rng = np.random.default_rng(3)
    masks = np.maximum(rng.normal(0.9, 0.7, (3, 32)), 0).astype(np.float32)
    exact = CatalogueIndex(space, masks)
    one = CatalogueIndex(space, masks, 'ivf', codes=codes, nprobe=32, cells=cells)
    assert one.codes == codes and one.nlist == 70 and one.vectors.shape == (5000, 32 + 3)  # f(x) stored once
    if cells == 'notion':
        assert len(one.ivfs) == 3 and one.nbytes() < 5000 * 32 * 4 * 3  # less than the masked floats of 3 notions
    for c in range(3):
        truth, _ = exact.search(queries, 10, c)
        idx, dist = one.search(queries, 10, c)
        assert idx.shape == dist.shape == (100, 10) and recall(idx, truth) > 0.9
        want = np.sqrt((((space[idx] - queries[:, None]) * masks[c]).astype(np.float64) ** 2).sum(2))
        np.testing.assert_allclose(dist, want, rtol=1e-5, atol=1e-5)  # true distances of the ids returned
        assert (np.diff(dist, axis=1) >= 0).all()
        idx, _ = one.search(queries, 10, c, exclude=np.arange(100))
        assert not (idx == np.arange(100)[:, None]).any()
    emb, masks, q = learned(n=5000)  # no clusters: the cells searched decide
    exact, one = CatalogueIndex(emb, masks), CatalogueIndex(emb, masks, 'ivf', codes=codes, nprobe=1, cells=cells)
    assert recall(one.search(q, 10, 0)[0], exact.search(q, 10, 0)[0]) < 0.5  # one cell of 70: it misses most
    one.nprobe = 70  # every cell: all but the codes' misses (none for floats)
    assert recall(one.search(q, 10, 0)[0], exact.search(q, 10, 0)[0]) >= (0.9 if codes == 'pq4' else 1.0)


def test_task_specific_embeddings_and_hnsw_keep_one_index_per_notion():
    from csnlib.catalogue import CatalogueIndex, PerNotionIndex, notion_index_for
    from csnlib.search import Index
    emb, masks, q = learned(c=2, n=400)
    per = np.stack([emb, emb[::-1].copy()])  # (C, N, D): one embedding per notion
    index = notion_index_for(per, np.ones_like(masks), notions=['a', 'b'])
    assert isinstance(index, PerNotionIndex)
    assert index.search(q, 5, 'b')[0].tolist() == Index(per[1]).search(q, 5)[0].tolist()
    assert index.row(3, 'b').tolist() == per[1, 3].tolist()
    assert isinstance(notion_index_for(emb, masks), CatalogueIndex)


@pytest.mark.parametrize('variant', [['--learned'], [], ['--model', 'triplet'], ['--model', 'task']])
def test_model_index_without_a_notion_answers_every_notion_as_model_nearest(tmp_path, variant):
    from csnlib.catalogue import CatalogueIndex, PerNotionIndex
    model = hub_load(save_checkpoint(tmp_path / 'm.pth', variant))
    x = torch.stack([model.transform(im) for im in images(24)])
    gallery = model.embed(x).numpy()  # (N, D), or (C, N, D) for task-specific networks
    index = model.index(gallery)
    assert isinstance(index, PerNotionIndex if variant == ['--model', 'task'] else CatalogueIndex)
    for c, name in enumerate(model.notions):
        q = model.embed(x[:3], c) if variant == ['--model', 'task'] else model.embed(x[:3])  # raw queries
        want_i, want_d = model.nearest(x[:3], gallery, name, k=6)
        got_i, got_d = index.search(q.numpy(), 6, notion=name)
        assert got_i.tolist() == want_i.tolist()
        np.testing.assert_allclose(got_d, want_d.numpy(), rtol=1e-5, atol=1e-6)


def test_model_index_refuses_a_notion_the_checkpoint_was_not_trained_on(tmp_path):
    model = hub_load(save_checkpoint(tmp_path / 'm.pth', ['--learned'], conditions=[1]))  # shape only
    x = torch.stack([model.transform(im) for im in images(6)])
    index = model.index(model.embed(x).numpy())
    index.search(model.embed(x[:1]).numpy(), 2, 'shape')
    with pytest.raises(ValueError, match='notion colour: the checkpoint was not trained on it'):
        index.search(model.embed(x[:1]).numpy(), 2, 'colour')
