"""csnlib/probe.py: the pitch probe over many family halvings (claim (e)) and the notion x label matrix (what each
notion's subspace holds), on fonts-like data built here: conftest's coloured shapes, with families, characters, a
split and a pitch written into labels.csv."""
import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from conftest import FAST, make_dataset
from csn import ConditionalSimNet
from csnlib import probe
from csnlib.checkpoint import load_checkpoint
from Resnet_18 import EmbeddingNet
from triplet_image_loader import DataError, load_dataset_info
from tripletnet import TripletNet


def fonts_like(root, per_kind=12, character=True):
    """Shapes whose families are colour + k // 2 (4 glyphs each: 2 shapes x 2 copies), the shape as the character,
    family 0 of each colour in train, 1 in val, the rest in test; red families fixed pitch, blue proportional, and
    the last red family mixed (its odd copies proportional). Returns the dataset's info."""
    names, _ = make_dataset(str(root), per_kind=per_kind, triplets=(32, 16, 24))
    lines = []
    for name in names:
        colour, shape, k = os.path.basename(name)[:-4].split('_')
        f = int(k) // 2
        split = 'train' if f == 0 else 'val' if f == 1 else 'test'
        pitch = 'fixed' if colour == 'red' else 'proportional'
        if colour == 'red' and f == per_kind // 2 - 1 and int(k) % 2:
            pitch = 'proportional'
        char = f'{shape},' if character else ''
        lines.append(f'{name},{colour},{shape},{colour}{f},{char}{split},{pitch}\n')
    with open(os.path.join(root, 'labels.csv'), 'w') as fh:
        fh.write('image,colour,shape,font,' + ('character,' if character else '') + 'split,pitch\n')
        fh.writelines(lines)
    return load_dataset_info(str(root))


def rows_of(info):
    import csv
    with open(info.labels_file) as f:
        return list(csv.DictReader(f))


def slow_balanced_probe(x, y, fit, score):
    """A logistic regression on standardised features, fitted on fit and scored on score, by a loop over classes."""
    with threadpool_limits(1):
        scaler = StandardScaler().fit(x[fit])
        clf = LogisticRegression(max_iter=2000, C=1.0, class_weight='balanced').fit(scaler.transform(x[fit]), y[fit])
        pred = clf.predict(scaler.transform(x[score]))
    per_class = []
    for v in sorted(set(y[score])):
        hits = [p == v for p, t in zip(pred, y[score]) if t == v]
        per_class.append(sum(hits) / len(hits))
    return sum(per_class) / len(per_class)


def test_pitch_splits_halve_each_pitch_s_families_and_leave_mixed_families_out(tmp_path):
    info = fonts_like(tmp_path / 'fonts')
    t = probe.pitch_splits_task(info, n_splits=20)
    rows = rows_of(info)
    fams = np.array([rows[i]['font'] for i in t['images']])
    # the mixed family (red5: fixed and proportional faces) is out, named, and counted in no class; train is out
    assert t['mixed'] == ['red5'] and 'red5' not in fams and not {'red0', 'blue0'} & set(fams)
    assert t['families'] == {'fixed': 4, 'proportional': 5}
    assert '4 fixed and 5 proportional families' in t['description'] and '(red5)' in t['description']
    assert len(t['images']) == 9 * 4 and t['fits'].shape == (20, 36)
    pitch_of = {f: p for f, p in zip(fams, t['labels'])}
    for fit in t['fits']:
        fitted, scored = set(fams[fit]), set(fams[~fit])
        assert not fitted & scored                                      # no family on both sides
        for p, n in t['families'].items():                              # each pitch halved, the fit rounded up
            assert sum(pitch_of[f] == p for f in fitted) == (n + 1) // 2
            assert sum(pitch_of[f] == p for f in scored) == n // 2
    assert len({fit.tobytes() for fit in t['fits']}) > 5                 # the splits differ ...
    assert (probe.pitch_splits_task(info, n_splits=20)['fits'] == t['fits']).all()  # ... and are seeded
    # split s as written out: each pitch's sorted families shuffled by one default_rng(s), the first half fitted
    rng = np.random.default_rng(3)
    fitted = set()
    for p in ('fixed', 'proportional'):
        order = list(rng.permutation(sorted({f for f in fams if pitch_of[f] == p})))
        fitted |= set(order[:(len(order) + 1) // 2])
    assert set(fams[t['fits'][3]]) == fitted
    # the one fixed halving of old records is left as it was, and the splits come only when asked for
    assert set(probe.probe_tasks(info)) == {'pitch', 'family'}
    old = probe.probe_tasks(info)['pitch']
    assert 'red5' in {rows[i]['font'] for i in old['images']} and 'fits' not in old
    assert set(probe.probe_tasks(info, n_splits=3)) == {'pitch', 'family', 'pitch_splits'}


def test_pitch_splits_need_two_families_of_each_pitch(tmp_path):
    info = fonts_like(tmp_path / 'fonts', per_kind=6)                  # val/test: red1, red2 (mixed), blue1, blue2
    assert probe.pitch_splits_task(info) is None                       # one unmixed fixed family: nothing to halve


@pytest.mark.slow
def test_pitch_splits_accuracies_against_a_written_out_loop(tmp_path):
    info = fonts_like(tmp_path / 'fonts', per_kind=16)
    tasks = probe.probe_tasks(info, n_splits=6)
    got = probe.probe_random_all({'dim_embed': 16, 'image_size': 32}, info, tasks, 5)
    assert isinstance(got['pitch'], float) and len(got['pitch_splits']) == 6
    torch.manual_seed(5)
    net = EmbeddingNet(16)
    rows = rows_of(info)
    images = [i for i, r in enumerate(rows) if r['split'] in ('val', 'test')]
    mixed = {r['font'] for r in rows if r['split'] != 'train' and r['pitch'] == 'proportional'
             and r['colour'] == 'red'}
    images = np.array([i for i in images if rows[i]['font'] not in mixed])
    x = probe.pooled_features(net, info, images, 32)
    y = np.array([rows[i]['pitch'] for i in images])
    fams = [rows[i]['font'] for i in images]
    for s in range(6):
        rng = np.random.default_rng(s)
        fitted = set()
        for p in ('fixed', 'proportional'):
            order = list(rng.permutation(sorted({f for f, v in zip(fams, y) if v == p})))
            fitted |= set(order[:(len(order) + 1) // 2])
        fit = np.array([f in fitted for f in fams])
        assert got['pitch_splits'][s] == pytest.approx(slow_balanced_probe(x, y, fit, ~fit), abs=1e-9)
    # the pitch here is the colour, which shows in any backbone: every split finds it
    assert min(got['pitch_splits']) > 0.9


def test_matrix_splits_are_family_disjoint_and_the_font_label_splits_by_character(tmp_path):
    info = fonts_like(tmp_path / 'fonts')
    info = dataclasses.replace(info, notions=['colour', 'shape', 'font'])   # a family notion, as on Fonts
    t = probe.matrix_task(info, n_splits=8)
    rows = rows_of(info)
    assert all(rows[i]['split'] == 'test' for i in t['images']) and len(t['images']) == 8 * 4
    fams = np.array([rows[i]['font'] for i in t['images']])
    chars = np.array([rows[i]['character'] for i in t['images']])
    assert set(t['labels']) == {'colour', 'shape', 'font'}
    for n in ('colour', 'shape'):
        for fit, score in zip(t['fits'][n], t['scores'][n]):
            assert not fit[score].any() and not set(fams[fit]) & set(fams[score])   # no family on both sides
            assert len(set(fams[fit])) == 4                                         # half of the 8 families
            assert set(t['labels'][n][score]) <= set(t['labels'][n][fit])            # only classes the fit saw
    for fit, score in zip(t['fits']['font'], t['scores']['font']):
        assert not set(chars[fit]) & set(chars[score])                             # by character instead
        assert set(fams[fit]) == set(fams[score]) == set(fams)                     # every family on both sides
    assert 'font label on a split of each family\'s glyphs by character' in t['description']
    assert '8 families' in t['description'] and 'split seeds 0 to 7' in t['description']
    # without a character column the font label cannot be split: left out, and said
    bare = fonts_like(tmp_path / 'bare', character=False)
    t = probe.matrix_task(dataclasses.replace(bare, notions=['colour', 'shape', 'font']), n_splits=2)
    assert set(t['labels']) == {'colour', 'shape'} and 'font label is left out' in t['description']


class ColourAndNoise(nn.Module):
    """A backbone whose first half holds the colour (sign of red minus blue) and whose second half holds noise that
    depends on the image but on no label."""

    def __init__(self, dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer('proj', torch.randn(3 * 32 * 32, dim // 2, generator=g))
        self.half = dim // 2

    def forward(self, x):  # (B, 3, 32, 32)
        colour = torch.sign(x[:, 0].mean((1, 2)) - x[:, 2].mean((1, 2)))[:, None].expand(-1, self.half)  # (B, D/2)
        noise = torch.sin(50.0 * (x.flatten(1) @ self.proj))  # (B, D/2)
        return torch.cat([colour, noise], 1)  # (B, D)


def test_a_subspace_that_holds_one_label_predicts_it_and_not_the_others(tmp_path):
    info = fonts_like(tmp_path / 'fonts', per_kind=24)                  # 20 test families of 4 glyphs
    task = probe.matrix_task(info, n_splits=5)
    model = TripletNet(ConditionalSimNet(ColourAndNoise(8), 2, 8, 'fixed'))  # colour's mask: the colour dims
    m = probe.model_matrix(model, 32, info, {'colour': 0, 'shape': 1}, task)
    assert set(m) == {'colour', 'shape'} and all(set(r) == {'colour', 'shape'} for r in m.values())
    assert m['colour']['colour'] == pytest.approx(1.0)                  # the subspace that holds the colour
    assert m['shape']['colour'] < 0.75 and m['shape']['shape'] < 0.75   # noise: about chance (0.5)
    assert m['colour']['shape'] < 0.75
    # against the computation written out: the features by hand, each split's families halved, the mean over splits
    rows = rows_of(info)
    x = next(probe.image_batches(info, task['images'], 32, batch=len(task['images'])))
    with torch.no_grad():
        raw = ColourAndNoise(8)(x).numpy()  # (N, 8)
    fams = [rows[i]['font'] for i in task['images']]
    for r, dims in (('colour', slice(0, 4)), ('shape', slice(4, 8))):
        feats = raw * 0
        feats[:, dims] = raw[:, dims]                                   # the fixed mask: that notion's block
        for n in ('colour', 'shape'):
            y = np.array([rows[i][n] for i in task['images']])
            accs = []
            for s in range(5):
                order = list(np.random.default_rng(s).permutation(sorted(set(fams))))
                fitted = set(order[:(len(order) + 1) // 2])
                fit = np.array([f in fitted for f in fams])
                score = ~fit & np.isin(y, y[fit])
                if len(set(y[fit])) > 1:
                    accs.append(slow_balanced_probe(feats, y, fit, score))
            assert m[r][n] == pytest.approx(sum(accs) / len(accs), abs=1e-9), (r, n)
    knn = probe.model_matrix(model, 32, info, {'colour': 0, 'shape': 1}, task, kind='knn')
    assert knn['colour']['colour'] == pytest.approx(1.0) and knn['shape']['colour'] < 0.75


def test_the_linear_probe_reads_a_dimension_a_mask_scales_down_and_the_knn_probe_weighs_it_as_the_distance(tmp_path):
    info = fonts_like(tmp_path / 'fonts', per_kind=24)
    task = probe.matrix_task(info, n_splits=5)
    model = TripletNet(ConditionalSimNet(ColourAndNoise(8), 2, 8, 'learned'))
    with torch.no_grad():                                               # shape's mask keeps the colour at 1/1000
        model.embednet.masks.weight.copy_(torch.tensor([[1.0] * 4 + [0.0] * 4, [1e-3] * 4 + [1.0] * 4]))
    rows = {'colour': 0, 'shape': 1}
    linear = probe.model_matrix(model, 32, info, rows, task)
    knn = probe.model_matrix(model, 32, info, rows, task, kind='knn')
    assert linear['shape']['colour'] == pytest.approx(1.0)              # standardised: the scale is gone
    assert knn['shape']['colour'] < 0.75 and knn['colour']['colour'] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="probe kind 'svm'"):
        probe.model_matrix(model, 32, info, rows, task, kind='svm')


@pytest.mark.slow
def test_subspaces_as_each_model_compares_them(tmp_path):
    from csnlib.builder import build_model
    from csnlib.options import main_parser
    info = fonts_like(tmp_path / 'fonts', per_kind=6)
    images = np.arange(8)
    x = next(probe.image_batches(info, images, 32))
    for flags in (['--learned'], ['--model', 'asen'], ['--model', 'task'], ['--model', 'scenet']):
        torch.manual_seed(0)
        model = build_model(main_parser().parse_args(['--no-pretrained', '--dim_embed', '8', *flags]), 2).eval()
        net = model.embednet
        if flags == ['--learned']:
            with torch.no_grad():
                net.masks.weight[0, :3] = -1.0                              # below zero: ReLU'd to 0
        rows = probe.matrix_rows(model, ['colour', 'shape'], [0, 1])
        emb = probe.subspace_embeddings(model, info, images, 32, rows)
        with torch.no_grad():
            if flags == ['--learned']:
                want = {n: net.embed(x) * torch.relu(net.masks.weight[c]) for n, c in (('colour', 0), ('shape', 1))}
                assert (emb['colour'][:, :3] == 0).all() and (emb['shape'][:, :3] != 0).any()
            elif flags == ['--model', 'scenet']:
                assert set(rows) == {'mask 1', 'mask 2'}
                want = {f'mask {k + 1}': net.embed(x) * torch.relu(net.masks.weight[k]) for k in range(2)}
            else:                                                           # notion c's network, ASEN's embed(x, c)
                want = {'colour': net.embed(x, 0), 'shape': net.embed(x, 1)}
                assert not np.allclose(emb['colour'], emb['shape'])
        assert set(emb) == set(want)
        for r in want:
            assert np.allclose(emb[r], want[r].numpy(), atol=1e-5), (flags, r)


VARIANTS = {'csn_fixed': [], 'csn_learned': ['--learned'], 'triplet': ['--model', 'triplet'],
            'task': ['--model', 'task'], 'asen': ['--model', 'asen'], 'scenet': ['--model', 'scenet']}


@pytest.fixture(scope='module')
def fonts_runs(tmp_path_factory, trained_run):
    root = tmp_path_factory.mktemp('probe') / 'fonts'
    info = fonts_like(root, per_kind=8)
    runs = {v: trained_run(*FAST, '--num_traintriplets', 32, '--num_valtriplets', 16, '--num_testtriplets', 24,
                           '--epochs', 1, '--dim_embed', 16, *flags, data=str(root), name=v).run
            for v, flags in VARIANTS.items()}
    return info, runs


@pytest.mark.slow
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_the_matrix_of_a_trained_run_and_of_a_random_model_of_its_shape(fonts_runs, variant):
    info, runs = fonts_runs
    ckpt = load_checkpoint(os.path.join(runs[variant], 'model_best.pth.tar'))
    task = probe.matrix_task(info, n_splits=2)
    m = probe.notion_label_matrix(ckpt, info, task)
    rows = {'triplet': {'all'}, 'scenet': {'mask 1', 'mask 2'}}.get(variant, {'colour', 'shape'})
    assert set(m) == rows
    for row in m.values():
        assert set(row) == {'colour', 'shape'}
        assert all(a is None or 0.0 <= a <= 1.0 for a in row.values()) and any(a is not None for a in row.values())
    r = probe.random_notion_label_matrix(ckpt['args'], info, 0, task)
    assert set(r) == rows
    other = dataclasses.replace(info, notions=['shape', 'colour'])
    with pytest.raises(DataError, match=r"trained on notions \['colour', 'shape'\], but .* has \['shape', 'colour'\]"):
        probe.notion_label_matrix(ckpt, other, task)
