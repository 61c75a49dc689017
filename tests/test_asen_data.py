"""csnlib/asen_data.py and search.protocol_map: a tiny dataset in ASEN's layout made here, converted by
get_data.py --dataset asen into the layout main.py reads; triplets drawn as ASEN draws them; ASEN's mAP against a
brute-force loop written as their evaluation computes it."""
import csv
import json
import os

import numpy as np
import pytest

import get_data
from conftest import ATTRS, FAST, VALUES, error_line, in_process, make_asen_layout, run_main
from csnlib import asen_data
from csnlib.search import protocol_map
from triplet_image_loader import load_dataset_info, load_triplets, read_labels


def convert(src, out, *more):
    return in_process(get_data.main, ['--dataset', 'asen', '--from', src, '--out', out, '--train-triplets', 40,
                                      '--val-triplets', 12, '--test-triplets', 12, *more])


def test_converts_asens_layout_into_this_repositorys(tmp_path):
    lists = make_asen_layout(str(tmp_path / 'asen'))
    code, out, err = convert(str(tmp_path / 'asen'), str(tmp_path / 'out'))
    assert code == 0, err
    info = load_dataset_info(str(tmp_path / 'out'))
    assert info.notions == ATTRS and info.extra['values'] == VALUES
    paths = [p for s in ('train', 'valid', 'test') for p, _, _ in lists[s]]
    assert info.filenames == paths and os.path.isfile(info.image_path(len(paths) - 1))
    labels = read_labels(info)
    rows = list(csv.DictReader(open(tmp_path / 'out' / 'labels.csv')))
    n_train = len(lists['train'])
    for g, (p, c, s) in enumerate(lists['train']):  # label_train.txt: both attributes
        assert labels['colour'][g] == c and labels['shape'][g] == s and rows[g]['split'] == 'train'
    for i, (p, c, s) in enumerate(lists['test']):  # query/candidate lists: one attribute each
        g = 2 * n_train + i
        assert rows[g]['split'] == 'test'
        assert (labels['colour'][g], labels['shape'][g]) == ((c, '') if i // 4 % 2 == 0 else ('', s))
    split_of = {g: r['split'] for g, r in enumerate(rows)}
    for c, notion in enumerate(ATTRS):
        for split in ('train', 'val', 'test'):
            t, _ = load_triplets(info, split, [c], 10 ** 6, 0)
            assert len(t) == (40 if split == 'train' else 12)
            for a, f, cl in t:
                assert labels[notion][a] == labels[notion][cl] != labels[notion][f] != ''
                assert split_of[a] == split_of[f] == split_of[cl] == split
    prot = asen_data.read_protocol(info, 'test')
    q, qv, cand, cv = prot['shape']
    assert len(q) == 4 and len(cand) == 4
    for g, v in zip(np.concatenate([q, cand]), np.concatenate([qv, cv])):
        assert labels['shape'][g] == VALUES['shape'][v]


def test_name_picks_one_dataset_of_several_in_meta_json(tmp_path):
    """--from DIR --name NAME (any key of meta.json) or --from DIR/NAME; a missing or unknown NAME is named with the
    flag and the keys there."""
    src = tmp_path / 'asen'
    make_asen_layout(str(src), name='DARN', per_kind=2, extra_datasets=('FashionAI', 'DeepFashion'))
    code, _, err = convert(src, tmp_path / 'none')
    assert error_line((code, '', err), alone=True) == (
        f'error: {src}/meta.json describes 3 datasets (DARN, FashionAI, DeepFashion): pass --name NAME with one of '
        f'them (or --from {src}/NAME)')
    code, _, err = convert(src, tmp_path / 'none', '--name', 'Zappos')
    assert error_line((code, '', err), alone=True) == (
        f'error: --name Zappos: {src}/meta.json has no dataset \'Zappos\'; it has DARN, FashionAI, DeepFashion (pass '
        f'--name with one of them)')
    code, _, err = convert(src / 'Zappos', tmp_path / 'none')  # DIR/NAME names it too
    assert 'error: --from ' in err and "has no dataset 'Zappos'" in err and 'DARN, FashionAI, DeepFashion' in err
    code, _, err = convert(src / 'DARN', tmp_path / 'none', '--name', 'FashionAI')
    assert "is dataset 'DARN' but --name says 'FashionAI'" in error_line((code, '', err), alone=True)
    code, _, err = convert(src, tmp_path / 'none', '--name', 'FashionAI')  # a key of meta.json without its folder
    assert 'FashionAI/filenames_train.txt not found' in error_line((code, '', err), alone=True)
    code, _, err = in_process(get_data.main, ['--dataset', 'fonts', '--name', 'DARN', '--out', tmp_path / 'none'])
    assert '--name DARN: --name picks a dataset of ASEN\'s meta.json, for --dataset asen only' in error_line(
        (code, '', err), alone=True)
    assert not os.path.exists(tmp_path / 'none')
    by_name, by_dir = tmp_path / 'by_name', tmp_path / 'by_dir'
    for args in ((src, by_name, '--name', 'DARN'), (src / 'DARN', by_dir)):
        code, _, err = convert(*args)
        assert code == 0, (args, err)
    assert load_dataset_info(str(by_name)).filenames == load_dataset_info(str(by_dir)).filenames
    for f in ('labels.csv', 'tripletlists/shape_tripletlist_train.txt', 'protocol/query_test.txt'):
        assert open(by_name / f).read() == open(by_dir / f).read(), f


def test_help_names_the_name_flag_and_its_default(capsys):
    with pytest.raises(SystemExit):
        get_data.build_parser().parse_args(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert '--name NAME which dataset of DIR/meta.json to convert' in text
    assert 'FashionAI, DARN, DeepFashion' in text and '(default: the only one, when meta.json has one)' in text


def test_bad_input_is_named_with_file_and_line(tmp_path):
    make_asen_layout(str(tmp_path / 'asen'))
    with open(tmp_path / 'asen' / 'Tiny' / 'query_test.txt', 'a') as f:
        f.write('0 5 1\n')
    code, _, err = convert(str(tmp_path / 'asen'), str(tmp_path / 'out'))
    assert code == 2 and 'query_test.txt:9:' in err and 'attribute 5' in err
    os.remove(tmp_path / 'asen' / 'Tiny' / 'label_train.txt')
    code, _, err = convert(str(tmp_path / 'asen'), str(tmp_path / 'out'))
    assert code == 2 and 'label_train.txt not found' in err
    code, _, err = in_process(get_data.main, ['--dataset', 'asen', '--out', str(tmp_path / 'o')])
    assert code == 2 and '--from' in err
    assert not os.path.exists(tmp_path / 'out')


def test_triplets_are_drawn_as_asen_draws_them_a_value_first():
    """ASEN picks the value at random, then the images: a rare value anchors as many triplets as a common one."""
    rng = np.random.default_rng(0)
    images = np.arange(44)
    values = np.array([0] * 40 + [1] * 4)
    t = asen_data.draw_triplets(images, values, 400, rng)
    assert len(t) == 400 and len({tuple(r) for r in t.tolist()}) == 400
    anchor_v, far_v, close_v = values[t[:, 0]], values[t[:, 1]], values[t[:, 2]]
    assert (anchor_v == close_v).all() and (anchor_v != far_v).all() and (t[:, 0] != t[:, 2]).all()
    assert 0.4 < (anchor_v == 1).mean() < 0.6  # drawn by image it would be 4/44
    assert len(asen_data.draw_triplets(images[:3], np.zeros(3), 5, rng)) == 0  # one value: no far image


def brute_force_map(per_notion, similarity):
    """ASEN's main.mean_average_precision and APScorer, written out: a loop per query, a stable ranking."""
    total, n, per = 0.0, 0, {}
    for name, (q, qv, c, cv) in per_notion.items():
        aps = []
        for i in range(len(q)):
            if similarity == 'dot':
                score = [-sum(float(a) * float(b) for a, b in zip(q[i], c[j])) for j in range(len(c))]
            else:
                score = [sum((float(a) - float(b)) ** 2 for a, b in zip(q[i], c[j])) for j in range(len(c))]
            ranked = sorted(range(len(c)), key=lambda j: score[j])  # Python's sort is stable: ties by index
            labels = [1 if cv[j] == qv[i] else 0 for j in ranked]
            rel, ap = 0, 0.0
            for k, lab in enumerate(labels):
                if lab:
                    rel += 1
                    ap += rel / (k + 1)
            aps.append(ap / sum(labels) if sum(labels) else 0.0)
        per[name] = sum(aps) / len(aps)
        total, n = total + sum(aps), n + len(aps)
    return total / n, per


@pytest.mark.parametrize('similarity', ['dot', 'euclidean'])
def test_protocol_map_equals_a_brute_force_loop(similarity):
    rng = np.random.default_rng(1)
    per = {'a': (rng.normal(size=(7, 5)), rng.integers(0, 3, 7), rng.normal(size=(20, 5)), rng.integers(0, 3, 20)),
           'b': (rng.normal(size=(3, 5)), rng.integers(0, 2, 3), rng.normal(size=(9, 5)), rng.integers(0, 2, 9)),
           # ties: integer embeddings, identical candidates; a value no candidate has (AP 0, still counted)
           'c': (np.array([[1., 0.], [0., 1.], [1., 1.]]), np.array([0, 1, 9]),
                 np.array([[1., 0.], [1., 0.], [0., 1.], [1., 0.]]), np.array([1, 0, 1, 0]))}
    got = protocol_map(per, similarity)
    want, want_per = brute_force_map(per, similarity)
    assert got['queries'] == {'a': 7, 'b': 3, 'c': 3}
    assert abs(got['mAP'] - want) < 1e-9
    assert all(abs(got['per_notion'][k] - want_per[k]) < 1e-9 for k in per)
    assert abs(got['mAP'] - sum(want_per[k] * got['queries'][k] for k in per) / 13) < 1e-9  # weighted by queries


def test_protocol_map_on_a_hand_made_ranking():
    # one query, candidates ranked [rel, not, rel, not] by the dot product: AP = (1/1 + 2/3) / 2
    q, cand = np.array([[1.0, 0.0]]), np.array([[0.9, 0], [0.8, 0], [0.7, 0], [0.6, 0]])
    got = protocol_map({'x': (q, np.array([1]), cand, np.array([1, 0, 1, 0]))})
    assert abs(got['mAP'] - (1 + 2 / 3) / 2) < 1e-12
    # Euclidean: the nearest first; identical distances keep the candidates' order (stable sort)
    got = protocol_map({'x': (q, np.array([1]), np.array([[0, 1.0], [0, -1.0]]), np.array([0, 1]))}, 'euclidean')
    assert abs(got['mAP'] - 0.5) < 1e-12


@pytest.mark.slow
def test_a_converted_dataset_trains_asen_and_gives_the_protocols_map(tmp_path):
    from csnlib.builder import load_model
    make_asen_layout(str(tmp_path / 'asen'))
    assert convert(str(tmp_path / 'asen'), str(tmp_path / 'out'))[0] == 0
    runs = tmp_path / 'runs'
    run_main('--data', tmp_path / 'out', '--runs', runs, '--name', 'a', *FAST, '--model', 'asen', '--dim_embed', '16',
             '--num_traintriplets', '64', '--num_valtriplets', '24', '--epochs', '1')
    model, _, rt = load_model(str(runs / 'a' / 'model_best.pth.tar'), str(tmp_path / 'out'), 'cpu')
    res = asen_data.protocol_results(model, load_dataset_info(str(tmp_path / 'out')), rt, 'test')
    assert set(res['per_notion']) == set(ATTRS) and res['queries'] == {'colour': 4, 'shape': 4}
    assert all(0 < v <= 1 for v in res['per_notion'].values())
    p = run_main('--test', '--resume', runs / 'a' / 'model_best.pth.tar', '--no-pictures')  # main.py --test too
    test = json.load(open(runs / 'a' / 'test_results.json'))
    assert test['protocol_mAP'] == pytest.approx(res['mAP']) and set(test['protocol_mAP_per_notion']) == set(ATTRS)
    # one unit in test_results.json: every figure a fraction, printed as a percentage
    figures = [test[k] for k in ('accuracy', 'mAP', 'protocol_mAP', 'pml_precision_at_1', 'pml_map_at_r') if k in test]
    figures += [v for k in test if k.endswith('per_notion') for v in test[k].values() if v is not None]
    assert len(figures) >= 9 and all(0 <= v <= 1 for v in figures)
    for key in ('protocol_mAP', 'mAP'):
        assert f'overall {test[key] * 100:.2f} %' in p.stdout, key
