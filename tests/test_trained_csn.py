"""trained.py and hubconf.py: torch.hub loading, the transform, embeddings equal to main.py's export, masked distances
against tripletnet's, nearest neighbours against a full sort, and the errors for notions the model does not have."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, REPO, draw, make_dataset, run_main, save_checkpoint


def hub_load(ckpt):
    return torch.hub.load(REPO, 'csn', source='local', checkpoint=ckpt)


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [draw(['red', 'blue'][i % 2], ['circle', 'square'][i // 2 % 2], rng) for i in range(n)]


VARIANTS = [['--learned'], ['--model', 'task'], [], ['--model', 'triplet']]


def test_torch_hub_load_gives_an_eval_model_on_the_cpu(tmp_path):
    model = hub_load(save_checkpoint(tmp_path / 'csn.pth', ['--learned']))
    assert type(model).__name__ == 'TrainedCSN'
    assert not model.training and not any(m.training for m in model.modules())
    assert model.notions == ['colour', 'shape'] and model.image_size == 32 and model.device == torch.device('cpu')
    assert model.embed(torch.stack([model.transform(im) for im in images(3)])).shape == (3, 64)
    with pytest.raises(ValueError, match='checkpoint=PATH'):
        torch.hub.load(REPO, 'csn', source='local')


def test_transform_prepares_images_as_the_test_path_does(tmp_path):
    from csnlib.loader import to_input
    from triplet_image_loader import load_image
    model = hub_load(save_checkpoint(tmp_path / 'csn.pth', []))
    im = images(1)[0].convert('L')  # grey and not square: converted to RGB, resized and centre-cropped
    im.save(tmp_path / 'a.png')
    want = to_input(torch.from_numpy(load_image(tmp_path / 'a.png', 32)[None].copy()), torch.device('cpu'), False)[0]
    assert want.shape == (3, 32, 32)
    assert torch.equal(model.transform(Image.open(tmp_path / 'a.png')), want)
    assert torch.equal(model.transform(str(tmp_path / 'a.png')), want)


@pytest.mark.parametrize('variant', VARIANTS)
def test_distance_is_tripletnets_masked_distance(tmp_path, variant):
    from tripletnet import masked_distances
    model = hub_load(save_checkpoint(tmp_path / 'm.pth', variant))
    x = torch.stack([model.transform(im) for im in images(8)])
    a, b = x[:4], x[4:]
    for c, name in enumerate(model.notions):
        raw = torch.cat([model.net.embed(t, c) for t in (a, b, b)])  # (3B, D): anchors, fars, closes
        want, _, _ = masked_distances(model.net, raw, torch.full((4,), c))
        torch.testing.assert_close(model.distance(a, b, name), want)
        torch.testing.assert_close(model.distance(a, b, c), want)
        masked = model.embed(x, name)
        w = model.net.mask_weights()  # relu(mask) for learned masks, None without masks
        if variant != ['--model', 'task']:  # one embedding, masked
            torch.testing.assert_close(masked, model.embed(x) * (1 if w is None else w[c]))
        else:  # each notion's own network
            torch.testing.assert_close(masked, model.net.nets[c](x))
            torch.testing.assert_close(model.embed(x)[c], masked)
    if variant == ['--learned']:
        m = model.net.mask_weights()
        assert (m == 0).any() and ((m > 0) & (m != 1)).any()  # learned masks: zeros and non-binary weights


@pytest.mark.parametrize('variant', [['--learned'], ['--model', 'task']])
def test_nearest_agrees_with_a_full_sort_in_numpy(tmp_path, variant):
    model = hub_load(save_checkpoint(tmp_path / 'm.pth', variant))
    x = torch.stack([model.transform(im) for im in images(24)])
    gallery = model.embed(x).numpy()  # (N, D), or (C, N, D) for task-specific networks
    masks = model.masks().numpy()
    q = x[:3]
    for c in range(2):
        space = (gallery[c] if gallery.ndim == 3 else gallery) * masks[c]  # (N, D)
        qe = model.embed(q, c).numpy().astype(np.float64)
        full = np.linalg.norm(space[None].astype(np.float64) - qe[:, None], axis=2)  # (Q, N)
        idx, dist = model.nearest(q, gallery, model.notions[c], k=5)
        assert idx.shape == dist.shape == (3, 5)
        assert idx.tolist() == np.argsort(full, axis=1, kind='stable')[:, :5].tolist()
        np.testing.assert_allclose(dist.numpy(), np.take_along_axis(full, idx.numpy(), 1), rtol=1e-4, atol=1e-4)
        raw_q = model.embed(q, c) if gallery.ndim == 3 else model.embed(q)  # raw embeddings as queries: same answer
        assert model.nearest(raw_q, gallery, c, k=5)[0].tolist() == idx.tolist()
        # an index to query many times
        index = model.index(gallery, c)
        assert index.search(model.embed(q, c).numpy(), 5)[0].tolist() == idx.tolist()


def test_unknown_and_untrained_notions_are_refused(tmp_path):
    model = hub_load(save_checkpoint(tmp_path / 'm.pth', ['--learned'], conditions=[1]))  # trained on shape only
    x = torch.stack([model.transform(im) for im in images(2)])
    model.embed(x, 'shape')
    for bad, msg in [('size', "notion 'size': unknown notion; this model has 0=colour, 1=shape"),
                     (2, 'notion 2: unknown notion'), (-1, 'notion -1: unknown notion'),
                     ('colour', 'notion colour: the checkpoint was not trained on it '
                                '.*were shape.*its mask is untrained'),
                     (0, 'notion colour: the checkpoint was not trained on it')]:
        with pytest.raises(ValueError, match=msg):
            model.embed(x, bad)
    with pytest.raises(ValueError, match='not trained'):
        model.distance(x, x, 'colour')
    with pytest.raises(ValueError, match='not trained'):
        model.nearest(x, model.embed(x).numpy(), 0)
    with pytest.raises(ValueError, match=r'expected images \(B, 3, S, S\)'):
        model.embed(torch.zeros(2, 32, 32))
    task = hub_load(save_checkpoint(tmp_path / 't.pth', ['--model', 'task'], conditions=[0]))
    with pytest.raises(ValueError,
                       match='notion shape: the checkpoint was not trained on it.*its network is untrained'):
        task.embed(x, 'shape')


@pytest.mark.slow
@pytest.mark.parametrize('variant', [['--learned'], ['--model', 'task']])
def test_embeddings_equal_those_main_py_exports(tmp_path, variant):
    """Train one epoch, export with main.py --test --export-embeddings (float32), embed every image through the API."""
    data = str(tmp_path / 'shapes')
    names, _ = make_dataset(data)
    run_main('--data', data, '--runs', tmp_path / 'runs', '--name', 'm', '--epochs', 1, *FAST, *variant)
    ckpt = str(tmp_path / 'runs' / 'm' / 'model_best.pth.tar')
    run_main('--test', '--resume', ckpt, '--data', data, '--export-embeddings', '--amp', 'off', '--no-pictures')
    exported = np.load(tmp_path / 'runs' / 'm' / 'embeddings.npy')
    model = hub_load(ckpt)
    x = torch.stack([model.transform(os.path.join(data, 'images', n)) for n in names])
    got = model.embed(x).numpy()
    assert got.shape == exported.shape == ((2, 40, 64) if variant == ['--model', 'task'] else (40, 64))
    np.testing.assert_allclose(got, exported, rtol=1e-4, atol=1e-5)
    masks = np.load(tmp_path / 'runs' / 'm' / 'masks.npy')
    for c in range(2):
        want = (exported[c] if exported.ndim == 3 else exported) * masks[c]
        np.testing.assert_allclose(model.embed(x, c).numpy(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('content', [b'', b'PK\x03\x04 a zip cut short'])
def test_an_empty_or_truncated_checkpoint_is_one_clear_error_from_the_hub(tmp_path, content):
    from csnlib.errors import CheckpointError
    bad = tmp_path / 'bad.pth.tar'
    bad.write_bytes(content)
    want = 'the file is empty \\(0 bytes\\)' if not content else 'refused to load it \\('
    with pytest.raises(CheckpointError, match=f'^--resume {bad}: {want}'):
        hub_load(str(bad))
    with pytest.raises(CheckpointError, match='a folder, not a checkpoint file'):
        hub_load(str(tmp_path))
