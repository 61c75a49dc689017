"""retrieve.py: retrieval mAP against a slow loop, nearest-neighbour search, the embedding cache, pictures, and the
command line on a model trained on the coloured shapes."""
import argparse
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import FAST, REPO, draw, make_dataset, run_main


def slow_average_precisions(x, labels):
    """The obvious loop: rank every other row by distance (ties by index), precision at each relevant rank."""
    out = []
    for q in range(len(x)):
        cands = sorted((j for j in range(len(x)) if j != q), key=lambda j: (np.linalg.norm(x[j] - x[q]), j))
        rel = [labels[j] == labels[q] for j in cands]
        if not any(rel):
            out.append(np.nan)
            continue
        hits, precisions = 0, []
        for rank, ok in enumerate(rel, 1):
            if ok:
                hits += 1
                precisions.append(hits / rank)
        out.append(np.mean(precisions))
    return np.array(out)


def slow_map(x, labels):
    """mAP of one notion: unknown ('') labels left out, queries without any relevant candidate left out."""
    keep = [i for i, l in enumerate(labels) if l != '']
    ap = slow_average_precisions(x[keep], [labels[i] for i in keep])
    return float(np.nanmean(ap))


def retrieve(*args, check=True, subprocess_=False):
    """retrieve.py ARGS: through the command line (subprocess_), or in this process (fast):
    (returncode, stdout, stderr)."""
    argv = list(map(str, args))
    if subprocess_:
        p = subprocess.run([sys.executable, os.path.join(REPO, 'retrieve.py'), *argv], capture_output=True, text=True,
                           timeout=600)
        rc, out, err = p.returncode, p.stdout, p.stderr
    else:
        import retrieve as r
        from csnlib.errors import run_script
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = run_script(r.main, argv)
        out, err = out.getvalue(), err.getvalue()
    if check and rc != 0:
        raise AssertionError(f'retrieve.py {argv} exited {rc}\n{out[-3000:]}\n{err[-3000:]}')
    return argparse.Namespace(returncode=rc, stdout=out, stderr=err)


def neighbours(stdout):
    """(index, distance, label) rows of retrieve.py's table."""
    rows = []
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0].isdigit() and parts[1].isdigit():
            rows.append((int(parts[1]), float(parts[2]), parts[3]))
    return rows


# ------------------------------------------------------------------------------------------------------- metrics

def test_average_precision_matches_slow_loop():
    from csnlib.search import average_precisions, mean_average_precision
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 5))
    labels = list(rng.choice(['a', 'b', 'c'], 60))
    labels[7] = 'alone'  # no other row shares it: undefined AP, left out of the mean
    ap = average_precisions(x, labels, chunk=16)  # several chunks
    want = slow_average_precisions(x, labels)
    assert np.isnan(ap[7]) and np.isnan(want[7])
    np.testing.assert_allclose(ap, want, rtol=1e-5)
    assert mean_average_precision(x, labels) == pytest.approx(np.nanmean(want), rel=1e-5)
    # well separated clusters: every neighbour shares the label before any other does
    x = np.repeat(np.eye(3) * 10, 5, axis=0) + rng.standard_normal((15, 3)) * 0.1
    assert mean_average_precision(x, np.repeat(['p', 'q', 'r'], 5)) == pytest.approx(1.0)
    # a ranking that puts the only relevant candidate last
    assert mean_average_precision(np.array([[0.0], [1.0], [2.0]]), ['a', 'b', 'a']) == pytest.approx(
        np.mean([1 / 2, 1 / 2]))  # queries 0 and 2 find each other at rank 2; 'b' has no relevant candidate
    assert np.isnan(mean_average_precision(np.zeros((3, 2)), ['a', 'b', 'c']))


def test_notion_map_leaves_unknown_labels_out_and_masks_per_notion():
    from csnlib.search import notion_map
    rng = np.random.default_rng(1)
    emb, masks = rng.standard_normal((30, 8)), np.abs(rng.standard_normal((2, 8)))
    images = np.arange(5, 30, 2)  # rows of a bigger dataset
    labels = {'colour': list(rng.choice(['red', 'blue', ''], 40)), 'shape': list(rng.choice(['o', 'x'], 40))}
    got = notion_map(emb[:len(images)], masks, images, labels, ['colour', 'shape'], [0, 1])
    for c, name in enumerate(['colour', 'shape']):
        lab = [labels[name][i] for i in images]
        assert got[name] == pytest.approx(slow_map(emb[:len(images)] * masks[c], lab), rel=1e-5)
    task = rng.standard_normal((2, 13, 8))  # one embedding per notion's network
    got = notion_map(task, np.ones((2, 8)), images, labels, ['colour', 'shape'], [1])
    assert set(got) == {'shape'}
    assert got['shape'] == pytest.approx(slow_map(task[1], [labels['shape'][i] for i in images]), rel=1e-5)


def small_model(tmp_path, variant):
    """The coloured shapes and an untrained 32-px model of main.py's flags + variant: (info, runtime, model, store)."""
    from csnlib.builder import build_model
    from csnlib.image_cache import ImageStore
    from csnlib.options import main_parser
    from csnlib.runtime import Runtime
    from triplet_image_loader import load_dataset_info
    make_dataset(str(tmp_path / 'd'))
    info = load_dataset_info(str(tmp_path / 'd'))
    torch.manual_seed(0)
    args = main_parser().parse_args(['--no-pretrained', '--image-size', '32', *variant])
    rt = Runtime(args, torch.device('cpu'), workers=0, eval_batch_size=16)
    return info, rt, build_model(args, 2).eval(), ImageStore(info, 32)


@pytest.mark.parametrize('variant', [['--learned'], ['--model', 'task']])
def test_retrieval_map_of_a_model_matches_a_loop_over_its_embeddings(tmp_path, variant):
    from csnlib.loader import to_input
    from csnlib.search import retrieval_map
    from triplet_image_loader import read_labels
    info, rt, model, store = small_model(tmp_path, variant)
    labels = read_labels(info)
    labels['colour'][3] = labels['colour'][7] = ''  # unknown: left out for colour only
    images = np.arange(3, 40, 4)
    res = retrieval_map(model, info, images, labels, rt, store=store)
    want = {}
    with torch.no_grad():
        for c, name in enumerate(info.notions):
            x = to_input(torch.from_numpy(store.get(images)), torch.device('cpu'), False)
            emb = model.embednet.apply_mask(model.embednet.embed(x, c), torch.full((len(images),), c))[0]
            want[name] = slow_map(emb.numpy().astype(np.float64), [labels[name][i] for i in images])
    assert res['per_notion'] == pytest.approx(want, rel=1e-4)
    assert res['mAP'] == pytest.approx(np.mean(list(want.values())), rel=1e-4)


@pytest.mark.parametrize('variant', [[], ['--model', 'triplet'], ['--model', 'task']])
def test_test_reuses_the_evaluations_embeddings_and_embeds_only_the_rest(tmp_path, variant, monkeypatch):
    """--test's mAP and pictures need every test image under every notion; evaluate has embedded some of them (all,
    for one-embedding models; each notion's own, for task-specific networks). The merge equals embedding them all."""
    from csnlib import evaluate
    from csnlib.evaluate import embed_dataset
    info, rt, model, store = small_model(tmp_path, variant)
    rng = np.random.default_rng(0)
    trip = rng.choice(30, size=(30, 3))                       # (M, 3) image indices
    cond = np.repeat([0, 1], 15)                              # notion 0 uses some images, notion 1 others
    trip[cond == 1] += 10                                     # images 30..39 only in notion 1's triplets
    embedded = {}
    evaluate.evaluate(model, trip, cond, store, rt, info.notions, embeddings=embedded)
    images = np.unique(trip)
    calls = []
    real = evaluate.embed_images
    monkeypatch.setattr(evaluate, 'embed_images',
                        lambda m, imgs, *a, **k: calls.append(len(imgs)) or real(m, imgs, *a, **k))
    got, _ = embed_dataset(model, images, store, rt, 2, done=embedded)
    monkeypatch.setattr(evaluate, 'embed_images', real)
    want, _ = embed_dataset(model, images, store, rt, 2)
    assert got.shape == want.shape and np.allclose(got, want, atol=1e-5)
    if variant == ['--model', 'task']:  # each notion's network embeds only the images its triplets left out
        assert calls == [len(np.setdiff1d(images, trip[cond == c])) for c in (0, 1)] and all(calls)
    else:
        assert calls == []  # evaluate embedded every test image already


def test_nearest_matches_a_full_sort_over_100k_images():
    from csnlib.evaluate import subspace
    from csnlib.search import nearest
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((100_000, 64)).astype(np.float32)
    masks = np.abs(rng.standard_normal((4, 64))).astype(np.float32)
    space = subspace(emb, masks, 2)
    idx, dist = nearest(space, space[5], 10, exclude=5)
    full = np.linalg.norm(space.astype(np.float64) - space[5], axis=1)
    full[5] = np.inf
    assert idx.tolist() == np.argsort(full)[:10].tolist()
    np.testing.assert_allclose(dist, full[idx], rtol=1e-4)
    idx, dist = nearest(space[:3], space[0], 10, exclude=0)  # fewer candidates than k: all of them, nearest first
    assert sorted(idx.tolist()) == [1, 2] and dist[0] <= dist[1]


# ------------------------------------------------------------------------------------------- a trained model

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A CSN (fixed masks) trained two epochs on the shapes: colour is learnt first (about 98 % of its val triplets)."""
    root = tmp_path_factory.mktemp('retrieve')
    data = str(root / 'shapes')
    names, labels = make_dataset(data)
    run_main('--data', data, '--runs', root / 'runs', '--name', 'csn', '--epochs', 2, *FAST)
    return data, root / 'runs' / 'csn', names, labels


@pytest.mark.slow
def test_retrieval_by_colour_finds_the_same_colour_and_caches_the_embeddings(trained, tmp_path):
    data, run, names, labels = trained
    ckpt = run / 'model_best.pth.tar'
    p = retrieve('--resume', ckpt, '--data', data, '--query', 3, '--notion', 'colour', '--k', 5, subprocess_=True)
    assert 'embedding the 40 images' in p.stdout
    rows = neighbours(p.stdout)
    assert len(rows) == 5 and 3 not in [r[0] for r in rows]
    assert [r[1] for r in rows] == sorted(r[1] for r in rows)
    assert all(labels[i]['colour'] == labels[3]['colour'] == label for i, _, label in rows), p.stdout
    picture = run / 'retrieval' / 'colour_3.png'
    assert picture.exists() and picture.stat().st_size > 5000
    emb = np.load(run / 'embeddings.npy')
    assert emb.shape == (40, 64) and np.load(run / 'masks.npy').shape == (2, 64)
    assert (run / 'images.txt').read_text().split() == names
    meta = json.load(open(run / 'embeddings.json'))
    assert meta['checkpoint'] == 'model_best.pth.tar' and meta['embeddings_shape'] == [40, 64]

    # the cache holds the model's embeddings of every image
    from csnlib.builder import load_model
    from csnlib.evaluate import embed_images
    from csnlib.image_cache import ImageStore
    from triplet_image_loader import load_dataset_info
    model, _, rt = load_model(str(ckpt), data, 'cpu')
    want = embed_images(model, np.arange(40), ImageStore(load_dataset_info(data), 32), rt)
    np.testing.assert_allclose(emb, want.numpy(), rtol=1e-3, atol=1e-3)

    # a second query reuses them; by shape, from a path listed in filenames.json
    mtime = os.stat(run / 'embeddings.npy').st_mtime_ns
    p = retrieve('--resume', ckpt, '--data', data, '--query', names[3], '--notion', 'shape', '--k', 5,
                 '--out', tmp_path / 'shape.png')
    assert 'using cached embeddings' in p.stdout and os.stat(run / 'embeddings.npy').st_mtime_ns == mtime
    assert (tmp_path / 'shape.png').exists() and len(neighbours(p.stdout)) == 5

    # an image from outside the dataset, embedded on the fly
    outside = tmp_path / 'my_red_square.png'
    draw('red', 'square', np.random.default_rng(123)).save(outside)
    p = retrieve('--resume', ckpt, '--data', data, '--query', outside, '--notion', 'colour', '--k', 5)
    assert '(external)' in p.stdout
    assert [label for _, _, label in neighbours(p.stdout)] == ['red'] * 5, p.stdout

    # a changed checkpoint (new mtime) recomputes
    st = os.stat(ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    p = retrieve('--resume', ckpt, '--data', data)
    assert 'embedding the 40 images' in p.stdout and os.stat(run / 'embeddings.npy').st_mtime_ns != mtime


@pytest.mark.slow
@pytest.mark.parametrize('index', ['ivf', 'hnsw'])
def test_an_approximate_index_finds_the_exact_neighbours_of_a_small_gallery(trained, index):
    pytest.importorskip('faiss')  # the approximate indexes are faiss's (requirements-dev.txt installs faiss-cpu)
    data, run, _, _ = trained
    ask = ['--resume', run / 'model_best.pth.tar', '--data', data, '--query', 3, '--notion', 'colour', '--k', 5]
    exact = neighbours(retrieve(*ask).stdout)
    approx = neighbours(retrieve(*ask, '--index', index).stdout)
    assert [r[0] for r in approx] == [r[0] for r in exact]  # 40 images: every cell / node is searched


@pytest.mark.slow
def test_bad_query_and_notion_say_what_to_do(trained):
    data, run, _, _ = trained
    p = retrieve('--resume', run / 'model_best.pth.tar', '--data', data, '--query', 'nope.png', '--notion', 'colour',
                 check=False)
    assert p.returncode == 2 and 'not an image index' in p.stderr
    p = retrieve('--resume', run / 'model_best.pth.tar', '--data', data, '--query', 1, '--notion', 'size', check=False)
    assert p.returncode == 2 and 'unknown notion' in p.stderr and 'colour' in p.stderr


@pytest.mark.slow
def test_export_embeddings_is_reused_by_retrieve(trained, tmp_path):
    from csnlib.builder import load_model
    from csnlib.search import export_embeddings
    from triplet_image_loader import load_dataset_info
    data, run, _, _ = trained
    ckpt = str(run / 'checkpoint.pth.tar')
    model, _, rt = load_model(ckpt, data, 'cpu')
    emb, masks = export_embeddings(model, load_dataset_info(data), rt, str(run))
    assert emb.shape == (40, 64) and masks[0, :32].tolist() == [1.0] * 32 and masks[0, 32:].tolist() == [0.0] * 32
    p = retrieve('--resume', ckpt, '--data', data, '--query', 0, '--notion', 'colour', '--k', 3)
    assert 'using cached embeddings' in p.stdout


@pytest.mark.slow
def test_pictures_and_map_of_the_trained_model(trained, tmp_path):
    from csnlib.builder import load_model
    from csnlib.evaluate import embed_dataset
    from csnlib.image_cache import ImageStore
    from csnlib.pictures import write_pictures
    from csnlib.search import retrieval_map, test_images
    from triplet_image_loader import load_dataset_info, read_labels
    data, run, _, _ = trained
    model, _, rt = load_model(str(run / 'model_best.pth.tar'), data, 'cpu')
    info = load_dataset_info(data)
    store, labels = ImageStore(info, 32), read_labels(info)
    images = test_images(info, rt.args)
    assert images.tolist() == list(range(3, 40, 4))  # the test split of the shapes: every 4th image
    emb = embed_dataset(model, images, store, rt, 2)
    res = retrieval_map(model, info, images, labels, rt, emb=emb)
    assert res['per_notion']['colour'] > 0.9 and 0 < res['per_notion']['shape'] <= 1
    paths = write_pictures(model, info, store, labels, rt, str(tmp_path), emb=emb)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ['masks.png', 'retrieval_colour.png', 'retrieval_shape.png', 'tsne_colour.png', 'tsne_shape.png']
    from PIL import Image
    for p in paths:
        with Image.open(p) as im:
            assert im.size[0] > 300 and im.size[1] > 150
            assert len(set(np.asarray(im.convert('L')).ravel().tolist())) > 20  # not a blank canvas


# ------------------------------------------------------------------ the query and the notion, checked before embedding

@pytest.fixture
def untrained_checkpoint(tmp_path):
    """A CSN checkpoint of the shapes as main.py writes one, untrained, alone in its folder: (data, checkpoint path).
    Its run trained only notion 1 (shape), as `--conditions shape` does."""
    from csnlib.builder import build_model
    from csnlib.options import main_parser
    data = str(tmp_path / 'shapes')
    make_dataset(data)
    args = main_parser().parse_args(['--data', data, *FAST, '--conditions', 'shape'])
    torch.manual_seed(0)
    ckpt = {'args': {**vars(args), 'conditions': ['shape']}, 'state_dict': build_model(args, 2).state_dict(),
            'notions': ['colour', 'shape'], 'conditions': [1]}
    os.makedirs(tmp_path / 'run')
    path = tmp_path / 'run' / 'checkpoint.pth.tar'
    torch.save(ckpt, path)
    return data, path


@pytest.fixture
def no_embedding(monkeypatch):
    """Any embedding of an image fails the test."""
    import retrieve as r
    from csnlib import evaluate

    def embedded(*a, **k):
        raise AssertionError('an image was embedded before the command line was checked')
    monkeypatch.setattr(evaluate, 'embed_images', embedded)
    monkeypatch.setattr(r, 'export_embeddings', embedded)


def one_error_line(p):
    assert p.returncode == 2 and p.stdout == '', p
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in p.stderr, p.stderr
    return lines[0]


def test_a_bad_query_stops_before_any_embedding(untrained_checkpoint, no_embedding, tmp_path):
    data, ckpt = untrained_checkpoint
    not_an_image = tmp_path / 'notes.png'
    not_an_image.write_text('not a picture')
    for query, want in [(40, 'error: --query 40: no such image index; the dataset has images 0..39'),
                        (-1, 'error: --query -1: no such image index; the dataset has images 0..39'),
                        ('nope.png', "error: --query 'nope.png': not an image index (0..39), not a path listed in "
                                     f"{os.path.join(data, 'filenames.json')}, and no such image file"),
                        (tmp_path, f"error: --query '{tmp_path}': not an image index (0..39)")]:
        line = one_error_line(retrieve('--resume', ckpt, '--data', data, '--query', query, '--notion', 'shape',
                                       check=False))
        assert line.startswith(want), line
    line = one_error_line(retrieve('--resume', ckpt, '--data', data, '--query', not_an_image, '--notion', 'shape',
                                   check=False))
    assert line.startswith(f"error: --query '{not_an_image}': the file is not an image that PIL can read"), line
    line = one_error_line(retrieve('--resume', ckpt, '--data', data, '--query', 3, check=False))
    assert line == 'error: --query needs --notion, one of colour, shape'
    assert os.listdir(ckpt.parent) == ['checkpoint.pth.tar']  # no embeddings cache, no picture


def test_an_unknown_notion_is_named_by_notion_not_conditions(untrained_checkpoint, no_embedding):
    data, ckpt = untrained_checkpoint
    for notion in ['size', '2', '-1']:
        line = one_error_line(retrieve('--resume', ckpt, '--data', data, '--query', 3, '--notion', notion, check=False))
        assert line == f"error: --notion '{notion}': unknown notion; this dataset has 0=colour, 1=shape"
    # without --query too: a bad --notion is not silently ignored
    line = one_error_line(retrieve('--resume', ckpt, '--data', data, '--notion', 'size', check=False))
    assert '--notion' in line and '--conditions' not in line


@pytest.mark.parametrize('stored', ['conditions', 'args only'])
def test_a_notion_the_checkpoint_did_not_train_is_refused(untrained_checkpoint, no_embedding, stored):
    data, ckpt = untrained_checkpoint
    if stored == 'args only':  # a checkpoint of older code: only its args say which notions its run trained
        d = torch.load(ckpt, weights_only=True)
        del d['conditions']
        torch.save(d, ckpt)
    for notion in ['colour', '0']:
        line = one_error_line(retrieve('--resume', ckpt, '--data', data, '--query', 3, '--notion', notion, check=False))
        assert line == ('error: --notion colour: the checkpoint was not trained on it (its --conditions were shape), '
                        'so its mask or network is untrained; use one of these')


def test_a_trained_notion_and_a_valid_query_go_on_to_embed(untrained_checkpoint, no_embedding):
    """The same command line with good values passes the checks and reaches the embedding (which fails here)."""
    data, ckpt = untrained_checkpoint
    with pytest.raises(AssertionError, match='an image was embedded'):
        retrieve('--resume', ckpt, '--data', data, '--query', 39, '--notion', 'shape', check=False)


@pytest.mark.slow
def test_the_real_command_line_refuses_a_query_out_of_range_at_once(untrained_checkpoint):
    data, ckpt = untrained_checkpoint
    p = retrieve('--resume', ckpt, '--data', data, '--query', 99999999, '--notion', 'shape', check=False,
                 subprocess_=True)
    assert one_error_line(p) == 'error: --query 99999999: no such image index; the dataset has images 0..39'
    assert os.listdir(ckpt.parent) == ['checkpoint.pth.tar']


# ---------------------------------------------------------------- real-world inputs: bounds, bombs, names, files

def cli(*args):
    """retrieve.py ARGS in this process as its command line runs it (argparse's exit included): (status, out, err)."""
    import retrieve as r
    from conftest import in_process
    return in_process(r.main, args)


def huge_png(path, side=30000):
    """A valid 1-bit grey PNG of side x side pixels (about 110 KB), written row by row without decoding it whole."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    z, row, idat = zlib.compressobj(9), b'\0' * (1 + side // 8), []
    for _ in range(side):
        idat.append(z.compress(row))
    idat.append(z.flush())
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', side, side, 1, 0, 0, 0, 0))
                + chunk(b'IDAT', b''.join(idat)) + chunk(b'IEND', b''))
    return path


def test_k_is_bounded_by_the_picture_and_by_the_images_there_are(untrained_checkpoint, no_embedding):
    from conftest import error_line
    data, ckpt = untrained_checkpoint
    code, _, err = cli('--resume', ckpt, '--data', data, '--query', 3, '--notion', 'shape', '--k', 1000000000)
    assert code == 2 and 'argument --k: must be an integer from 1 to 100, got 1000000000' in err
    line = error_line(cli('--resume', ckpt, '--data', data, '--query', 3, '--notion', 'shape', '--k', 40))
    assert line == 'error: --k 40: the dataset has 39 other images to choose from; use --k 39 or fewer'
    assert os.listdir(ckpt.parent) == ['checkpoint.pth.tar']  # refused before embedding anything


def test_a_30000_pixel_png_as_query_is_one_line_naming_it(untrained_checkpoint, no_embedding, tmp_path):
    from conftest import error_line
    data, ckpt = untrained_checkpoint
    bomb = huge_png(tmp_path / 'huge.png')
    line = error_line(cli('--resume', ckpt, '--data', data, '--query', bomb, '--notion', 'shape'))
    assert line.startswith(f"error: --query '{bomb}': the image is too large to open safely (Image size (900000000 "
                           f"pixels) exceeds limit"), line


@pytest.mark.parametrize('script', ['retrieve.py', 'main.py --resume', 'main.py --test --resume'])
def test_a_0_byte_checkpoint_is_one_clear_line(tmp_path, script, shapes_data):
    from conftest import error_line
    empty = tmp_path / 'run' / 'checkpoint.pth.tar'
    empty.parent.mkdir()
    empty.write_bytes(b'')
    if script == 'retrieve.py':
        p = cli('--resume', empty, '--query', 0, '--notion', 'shape')
    else:
        p = run_main(*script.split()[1:], empty, '--data', shapes_data, '--runs', tmp_path / 'runs', *FAST, check=False)
    assert error_line(p) == (f'error: --resume {empty}: the file is empty (0 bytes), so a copy or download of it did '
                             f'not finish; copy it again or use another checkpoint')


def test_a_truncated_checkpoint_is_one_line_without_a_crash_in_the_handler(untrained_checkpoint, tmp_path):
    from conftest import error_line
    _, ckpt = untrained_checkpoint
    cut = tmp_path / 'cut.pth.tar'
    cut.write_bytes(ckpt.read_bytes()[:1000])
    line = error_line(cli('--resume', cut))
    assert line.startswith(f'error: --resume {cut}: refused to load it (') and 'weights_only=True' in line


@pytest.fixture
def fake_embeddings(monkeypatch):
    """retrieve.py's embedding of the dataset replaced by fixed random embeddings (the search and picture stay real)."""
    import retrieve as r
    calls = []

    def export(model, info, rt, out_dir, *a, **k):
        calls.append(out_dir)
        rng = np.random.default_rng(0)
        return rng.standard_normal((len(info.filenames), 64)).astype(np.float32), np.ones((2, 64), np.float32)
    monkeypatch.setattr(r, 'export_embeddings', export)
    return calls


@pytest.mark.parametrize('loader', ['dataset.json', 'past the data check'])
def test_a_notion_name_that_climbs_out_never_puts_the_picture_outside_the_run(untrained_checkpoint, fake_embeddings,
                                                                            tmp_path, loader, monkeypatch):
    import dataclasses

    import retrieve as r
    data, ckpt = untrained_checkpoint
    if loader == 'dataset.json':
        meta = json.load(open(os.path.join(data, 'dataset.json')))
        meta['notions'] = ['../../x', 'shape']
        json.dump(meta, open(os.path.join(data, 'dataset.json'), 'w'))
    else:  # the name reaches retrieve.py whatever the dataset loader checks: the picture's path is sanitised there
        real = r.load_dataset_info
        monkeypatch.setattr(r, 'load_dataset_info',
                            lambda root: dataclasses.replace(real(root), notions=['../../x', 'shape']))
    d = torch.load(ckpt, weights_only=True)
    d['notions'], d['conditions'] = ['../../x', 'shape'], [0, 1]
    torch.save(d, ckpt)
    before = {p for p in tmp_path.rglob('*')}
    code, out, err = cli('--resume', ckpt, '--data', data, '--query', 3, '--notion', '../../x', '--k', 3)
    new = {p for p in tmp_path.rglob('*')} - before
    assert all(str(p).startswith(str(ckpt.parent) + os.sep) for p in new), new  # nothing outside the run's folder
    assert code == 0 or loader == 'dataset.json', err
    if code == 0:  # sanitised: one picture under run/retrieval
        pictures = [p for p in new if p.suffix == '.png']
        assert [p.parent for p in pictures] == [ckpt.parent / 'retrieval'] and '..' not in pictures[0].name, pictures
        assert f'wrote {pictures[0]}' in out
    else:  # or refused as a name, with one line naming it
        from conftest import error_line
        assert '../../x' in error_line((code, out, err))


def test_safe_name_keeps_one_plain_file_name():
    from retrieve import safe_name
    for text in ['../x', '../../etc/passwd', '/abs', '..', '.hidden', 'a\\b', 'a\0b', '']:
        name = safe_name(text)
        assert name and '/' not in name and '\\' not in name and '\0' not in name and not name.startswith('.'), name
    assert (safe_name('../../x') == '_x' and safe_name('font') == 'font' and safe_name('größe') == 'größe'
            and safe_name('my glyph') == 'my_glyph')


@pytest.mark.slow
def test_nan_rows_in_the_cache_are_recomputed_and_every_answer_is_a_real_image(untrained_checkpoint, tmp_path):
    """A cache holding NaN rows (an old export of broken code) once answered index -1 at distance inf."""
    from csnlib.search import _array_sha256
    data, ckpt = untrained_checkpoint
    retrieve('--resume', ckpt, '--data', data)  # computes the cache
    run = ckpt.parent
    emb = np.load(run / 'embeddings.npy')
    emb[:20] = np.nan
    np.save(run / 'embeddings.npy', emb)
    meta = json.load(open(run / 'embeddings.json'))
    meta['embeddings_sha256'] = _array_sha256(emb)  # the stamp describes the bad array: only the values are wrong
    json.dump(meta, open(run / 'embeddings.json', 'w'))
    p = retrieve('--resume', ckpt, '--data', data, '--query', 25, '--notion', 'shape', '--k', 10,
                 '--out', tmp_path / 'p.png')
    assert '20 of its 40 images have non-finite embeddings' in p.stdout and 'embedding the 40 images' in p.stdout
    rows = neighbours(p.stdout)
    assert len(rows) == 10 and all(0 <= i < 40 and np.isfinite(d) for i, d, _ in rows), p.stdout
    assert np.isfinite(np.load(run / 'embeddings.npy')).all()


def test_export_onnx_onto_the_checkpoint_itself_is_one_line_before_loading_it(untrained_checkpoint, monkeypatch):
    import retrieve as r
    from conftest import error_line
    _, ckpt = untrained_checkpoint
    before = ckpt.read_bytes()
    monkeypatch.setattr(r, 'load_trained', lambda *a, **k: pytest.fail('the checkpoint was loaded before the check'))
    line = error_line(cli('--resume', ckpt, '--export-onnx', ckpt))
    assert line.startswith(f'error: --export-onnx {ckpt}: that is the checkpoint --resume {ckpt} it is made from')
    assert ckpt.read_bytes() == before and os.listdir(ckpt.parent) == ['checkpoint.pth.tar']
