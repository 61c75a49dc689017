"""csnlib.vector_db: a mask model's catalogue written to LanceDB (the real engine, embedded) answers every notion with
today's exact neighbours, through search_catalogue and through LanceDB's own API as the docs write it; retrieve.py
--export-db; and one clear line without LanceDB or for a model with one embedding per notion."""
import sys

import numpy as np
import pytest

from conftest import make_dataset, save_checkpoint
from triplet_image_loader import load_dataset_info

lancedb = pytest.importorskip('lancedb', reason='LanceDB is optional (pip install lancedb; requirements-dev.txt)')


def catalogue(n=600, dim=24, c=3, seed=0):
    """Raw embeddings (N, D), learned masks (C, D) (zeros and non-binary weights), paths (N,), queries (Q, D)."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    masks = np.maximum(rng.normal(0.9, 0.7, (c, dim)), 0).astype(np.float32)
    return emb, masks, [f'shop/item_{i}.jpg' for i in range(n)], rng.standard_normal((6, dim)).astype(np.float32)


def test_every_notion_asked_of_the_database_gives_todays_exact_neighbours(tmp_path):
    from csnlib.search import Index
    from csnlib.vector_db import export_catalogue, search_catalogue
    emb, masks, paths, q = catalogue()
    db = export_catalogue(str(tmp_path / 'db'), emb, masks, paths, ['colour', 'sleeve', 'collar'])
    db = lancedb.connect(str(tmp_path / 'db'))  # as another process opens it
    assert db.open_table('images').count_rows() == 600 and db.open_table('notions').count_rows() == 3
    for c, name in enumerate(['colour', 'sleeve', 'collar']):
        want_i, want_d = Index(emb * masks[c]).search(q * masks[c], 10)
        ids, got_paths, dist = search_catalogue(db, q, 10, name)
        assert ids.tolist() == want_i.tolist()
        assert got_paths == [[paths[j] for j in row] for row in want_i]
        np.testing.assert_allclose(dist, want_d, rtol=1e-4, atol=1e-4)
        # the query in LanceDB's own API, as NOTES_DOCS.md shows it
        n = db.open_table('notions').search().where(f"name = '{name}'").to_list()[0]
        for f_q, want in zip(q, want_i):
            u = np.concatenate([2 * np.square(n['mask']) * f_q, -np.eye(n['slots'])[n['slot']]])
            hits = db.open_table('images').search(u).distance_type('dot').limit(10).to_list()
            assert [h['id'] for h in hits] == want.tolist()
            d = np.sqrt(np.square(np.asarray(n['mask']) * f_q).sum() - 1 + np.array([h['_distance'] for h in hits]))
            np.testing.assert_allclose(d, Index(emb * masks[c]).search(f_q * masks[c], 10)[1][0], rtol=1e-3)


def test_a_second_export_replaces_the_first_and_untrained_notions_are_refused(tmp_path):
    from csnlib.options import UserError
    from csnlib.vector_db import export_catalogue, search_catalogue
    emb, masks, paths, q = catalogue()
    export_catalogue(str(tmp_path / 'db'), emb, masks, paths, ['a', 'b', 'c'])
    db = export_catalogue(str(tmp_path / 'db'), emb[:100], masks, paths[:100], ['a', 'b', 'c'], conditions=[1])
    assert db.open_table('images').count_rows() == 100
    assert search_catalogue(db, q[:1], 3, 'b')[0].max() < 100
    with pytest.raises(UserError, match='notion a: the checkpoint was not trained on it'):
        search_catalogue(db, q[:1], 3, 'a')
    with pytest.raises(UserError, match="notion 'z': unknown notion; this catalogue has 0=a, 1=b, 2=c"):
        search_catalogue(db, q[:1], 3, 'z')
    with pytest.raises(UserError, match=r'one embedding per image \(N, D\), not \(3, 600, 24\)'):
        export_catalogue(str(tmp_path / 'db'), np.stack([emb] * 3), masks, paths, ['a', 'b', 'c'])


def test_without_lancedb_the_export_says_how_to_install_it(tmp_path, monkeypatch):
    from csnlib.options import UserError
    from csnlib.vector_db import export_catalogue
    monkeypatch.setitem(sys.modules, 'lancedb', None)  # import lancedb raises ImportError
    emb, masks, paths, _ = catalogue(n=10)
    with pytest.raises(UserError, match=r'needs LanceDB: pip install lancedb \(requirements-dev.txt has it\)'):
        export_catalogue(str(tmp_path / 'db'), emb, masks, paths, ['a', 'b', 'c'])
    assert not (tmp_path / 'db').exists()


@pytest.mark.parametrize('variant', [['--learned'], ['--model', 'task']])
def test_retrieve_export_db_writes_the_models_catalogue(tmp_path, variant, monkeypatch):
    from test_retrieve import one_error_line, retrieve
    from test_trained_csn import hub_load

    from csnlib.vector_db import search_catalogue
    data = str(tmp_path / 'shapes')
    make_dataset(data)
    (tmp_path / 'run').mkdir()
    ckpt = save_checkpoint(tmp_path / 'run' / 'checkpoint.pth.tar', variant)
    out = tmp_path / 'catalogue.lancedb'
    if variant == ['--model', 'task']:  # one embedding per notion: refused before any embedding
        line = one_error_line(retrieve('--resume', ckpt, '--data', data, '--export-db', out, check=False))
        assert line.startswith('error: --export-db: ') and 'no one embedding per image' in line
        assert not out.exists() and not (tmp_path / 'run' / 'embeddings.npy').exists()
        monkeypatch.setitem(sys.modules, 'lancedb', None)
        line = one_error_line(retrieve('--resume', ckpt, '--data', data, '--export-db', out, check=False))
        assert line == ('error: exporting to a vector database needs LanceDB: pip install lancedb '
                        '(requirements-dev.txt has it)')
        return
    stdout = retrieve('--resume', ckpt, '--data', data, '--export-db', out, '--amp', 'off').stdout
    assert 'wrote the catalogue of 40 images and 2 notions to the LanceDB database' in stdout
    model = hub_load(ckpt)
    names = load_dataset_info(data).filenames
    emb = np.load(tmp_path / 'run' / 'embeddings.npy')  # the cache retrieve.py wrote
    index = model.index(emb)
    for name in model.notions:
        ids, paths, dist = search_catalogue(lancedb.connect(str(out)), emb[:4], 5, name)
        want_i, want_d = index.search(emb[:4], 5, name)
        assert ids.tolist() == want_i.tolist() and paths == [[names[j] for j in row] for row in want_i]
        # the database's distance comes from the score, |m_c f(q)|^2 - <u, v> in float32: digits are lost for close
        # pairs (an image's own copy reads about 1e-3, not 0), so compare the squares
        np.testing.assert_allclose(dist ** 2, want_d ** 2, atol=1e-5 * float((emb ** 2).sum(1).max()))
