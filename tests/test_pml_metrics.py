"""csnlib/pml_metrics.py: pytorch-metric-learning's precision@1 and MAP@R per notion, checked against loops written out
here; the repository's retrieval mAP (csnlib.search) is the library's mean_average_precision, and MAP@R is not it."""
import json

import numpy as np
import pytest

from conftest import run_main, save_checkpoint
from csnlib import pml_metrics
from csnlib.search import average_precisions, mean_average_precision

needs_pml = pytest.mark.skipif(pml_metrics.pml_or_none() is None,
                               reason='pytorch-metric-learning is not installed (pip install pytorch-metric-learning)')


def random_set(n=60, d=8, classes=4, seed=0):
    """Random embeddings (distances without ties) and labels, one of them ('lone') on a single row."""
    rng = np.random.default_rng(seed)
    space = rng.normal(size=(n, d))
    labels = rng.choice([f'c{i}' for i in range(classes)], n).astype(object)
    labels[5] = 'lone'
    return space.astype(np.float32), labels


def ranking(space, q):
    """The other rows, nearest to row q first, by a distance computed one pair at a time."""
    x = space.astype(np.float64)
    dist = {j: float(np.sqrt(((x[q] - x[j]) ** 2).sum())) for j in range(len(x)) if j != q}
    return sorted(dist, key=dist.get)


def slow_figures(space, labels):
    """precision@1, MAP@R and mAP (AP over the whole ranking) by a loop over the queries that have a relevant row."""
    p1, map_r, ap = [], [], []
    for q in range(len(space)):
        rel = [labels[j] == labels[q] for j in ranking(space, q)]
        r = sum(rel)
        if r == 0:
            continue  # a lone label: no relevant row, left out
        p1.append(float(rel[0]))
        hits, at_r, full = 0, 0.0, 0.0
        for k, is_rel in enumerate(rel, 1):
            if is_rel:
                hits += 1
                full += hits / k
                at_r += hits / k if k <= r else 0.0
        map_r.append(at_r / r)
        ap.append(full / r)
    return np.mean(p1), np.mean(map_r), np.mean(ap)


@needs_pml
@pytest.mark.parametrize('seed, chunk', [(0, 1024), (1, 1024), (0, 7)])
def test_precision_at_1_and_map_at_r_match_a_loop(seed, chunk):
    space, labels = random_set(seed=seed)
    got = pml_metrics.accuracies(space, labels, chunk=chunk)  # chunk 7: queries in 9 chunks, the lone one in one
    p1, map_r, _ = slow_figures(space, labels)
    assert got['precision_at_1'] == pytest.approx(p1, abs=1e-9)
    assert got['mean_average_precision_at_r'] == pytest.approx(map_r, abs=1e-6)


@needs_pml
@pytest.mark.parametrize('seed', [0, 1])
def test_repository_map_is_the_librarys_mean_average_precision_and_not_map_at_r(seed):
    space, labels = random_set(seed=seed)
    ours = mean_average_precision(space, labels)
    assert np.isnan(average_precisions(space, labels)[5])  # the lone label's query is left out by both
    got = pml_metrics.accuracies(space, labels, include=('mean_average_precision', 'mean_average_precision_at_r'),
                                 k=None, chunk=16)
    assert got['mean_average_precision'] == pytest.approx(ours, abs=1e-6)
    assert got['mean_average_precision'] == pytest.approx(slow_figures(space, labels)[2], abs=1e-6)
    # MAP@R counts only the relevant rows within the first R ranks: below the mAP wherever some come later
    assert got['mean_average_precision_at_r'] < ours - 0.05


@needs_pml
def test_separated_classes_score_one_and_a_set_without_relevant_rows_is_nan():
    labels = np.repeat(['a', 'b', 'c'], 5)
    space = np.eye(3, dtype=np.float32)[np.repeat(np.arange(3), 5)] * 10 + np.random.default_rng(0).normal(
        scale=0.1, size=(15, 3)).astype(np.float32)
    got = pml_metrics.accuracies(space, labels)
    assert got == {'precision_at_1': 1.0, 'mean_average_precision_at_r': 1.0}
    got = pml_metrics.accuracies(space[:3], ['x', 'y', 'z'])
    assert np.isnan(got['precision_at_1']) and np.isnan(got['mean_average_precision_at_r'])


@needs_pml
def test_notion_accuracies_use_each_notions_mask_and_leave_out_unknown_labels():
    rng = np.random.default_rng(2)
    images = np.arange(0, 60, 2)  # dataset indices
    emb = rng.normal(size=(30, 6)).astype(np.float32)  # (N, D): row i is image images[i]
    masks = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=np.float32)  # (C, D)
    lab = {'colour': list(rng.choice(['red', 'blue', 'green'], 60)), 'shape': list(rng.choice(['o', 'x'], 60))}
    lab['colour'][4] = lab['colour'][10] = ''  # unknown: left out under colour only
    got = pml_metrics.notion_accuracies(emb, masks, images, lab, ['colour', 'shape', 'size'], [0, 1, 2])
    want = {}
    for c, name in enumerate(['colour', 'shape']):
        keep = [r for r, i in enumerate(images) if lab[name][i] != '']
        want[name] = slow_figures(emb[keep] * masks[c], [lab[name][images[r]] for r in keep])
    assert set(got['precision_at_1_per_notion']) == {'colour', 'shape'}  # 'size' has no labels
    for name in want:
        assert got['precision_at_1_per_notion'][name] == pytest.approx(want[name][0], abs=1e-9)
        assert got['map_at_r_per_notion'][name] == pytest.approx(want[name][1], abs=1e-6)
    assert got['precision_at_1'] == pytest.approx(np.mean([w[0] for w in want.values()]), abs=1e-9)
    assert got['map_at_r'] == pytest.approx(np.mean([w[1] for w in want.values()]), abs=1e-6)
    # under the other notion's mask the figures differ: the mask is applied
    wrong = slow_figures(emb * masks[1], [lab['colour'][i] for i in images])
    assert got['map_at_r_per_notion']['colour'] != pytest.approx(wrong[1], abs=1e-6)


@needs_pml
@pytest.mark.slow
def test_test_reports_them_in_test_results_json(shapes_data, tmp_path):
    ckpt = save_checkpoint(tmp_path / 'm.pth.tar', ['--data', shapes_data])
    p = run_main('--test', '--resume', ckpt, '--no-pictures')
    res = json.load(open(tmp_path / 'test_results.json'))
    for key in ('precision_at_1', 'map_at_r'):
        per = res[f'pml_{key}_per_notion']
        assert set(per) == {'colour', 'shape'} and all(0 <= v <= 1 for v in per.values())
        assert res[f'pml_{key}'] == pytest.approx(np.mean(list(per.values())))
    assert 'precision@1 (pytorch-metric-learning): colour' in p.stdout and 'MAP@R (pytorch-metric-learning)' in p.stdout
    assert res['pml_map_at_r'] <= res['mAP'] + 1e-6  # MAP@R never exceeds the AP over the whole ranking


@pytest.mark.slow
def test_without_the_library_test_says_so_in_one_line(shapes_data, tmp_path, monkeypatch):
    import main
    monkeypatch.setattr(main, 'pml_or_none', lambda: None)
    ckpt = save_checkpoint(tmp_path / 'm.pth.tar', ['--data', shapes_data])
    p = run_main('--test', '--resume', ckpt, '--no-pictures')
    said = [ln for ln in p.stdout.splitlines() if 'pytorch-metric-learning' in ln]
    assert said == ['  no precision@1 or MAP@R: pytorch-metric-learning is not installed '
                    '(pip install pytorch-metric-learning to have them)']
    res = json.load(open(tmp_path / 'test_results.json'))
    assert 'mAP' in res and not any(k.startswith('pml_') for k in res)
