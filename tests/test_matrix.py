"""Every feature on every kind of dataset: the paper's release format (no dataset.json, no labels.csv) and a labelled
dataset; each --model and mask type, a --conditions subset, --tensorboard, --test with pictures and
--export-embeddings, and retrieve.py. Each combination works or stops with one clear message (exit 2, no traceback).

main.py and retrieve.py run in this process through their main(argv) (the same code as the command line, without
starting Python and torch again for each of the ~40 calls); one trained run per (dataset, model) is shared by the tests
(conftest's trained_run), on conftest's FAST flags with fewer triplets (these datasets have few) and one epoch.
--visdom with a server up is covered in test_loggers.py (test_main_with_visdom_plots_every_epoch_...), not here.
"""
import json
import os

import pytest

import main
import retrieve
from conftest import FAST, error_line, in_process, make_dataset
from csnlib.synthetic import make_zappos_like

pytestmark = pytest.mark.slow

VARIANTS = {'csn': [], 'learned': ['--learned'], 'prein': ['--prein'], 'triplet': ['--model', 'triplet'],
            'task': ['--model', 'task'], 'asen': ['--model', 'asen'], 'scenet': ['--model', 'scenet']}
NOTIONS = {'release': ['class', 'closure', 'gender', 'heel'], 'labelled': ['colour', 'shape']}


def ok(entry, argv):
    code, out, err = in_process(entry, argv, escape_fails=True)
    assert code == 0, f'{argv} exited {code}\n{out[-2000:]}\n{err[-2000:]}'
    return out


def refused(entry, argv, *words):
    """Stops with exit 2 and one line 'error: ...' naming each of words."""
    line = error_line(in_process(entry, argv, escape_fails=True), alone=True)
    assert all(w in line for w in words), line
    return line


@pytest.fixture(scope='module')
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp('matrix')
    release, labelled = root / 'release', root / 'labelled'
    # Zappos layout, no dataset.json, no labels
    make_zappos_like(str(release), n_images=64, seed=0, log=lambda *a: None)
    make_dataset(str(labelled), per_kind=6, triplets=(32, 16, 24))
    assert not (release / 'dataset.json').exists() and not (release / 'labels.csv').exists()
    return {'release': str(release), 'labelled': str(labelled), 'runs': str(root / 'runs')}


@pytest.fixture(scope='module')
def trained(datasets, trained_run):
    """(dataset, variant) -> the run's folder, trained once with --tensorboard on first use."""
    def get(dataset, variant, extra=()):
        name = f'{dataset}_{variant}' + ''.join(f'_{e}' for e in extra if not e.startswith('-'))
        return trained_run(*FAST, '--num_traintriplets', 32, '--num_valtriplets', 16, '--num_testtriplets', 24,
                           '--epochs', 1, *VARIANTS[variant], '--tensorboard', *extra, data=datasets[dataset],
                           name=name).run
    return get


CASES = [(d, v) for d in NOTIONS for v in VARIANTS]


@pytest.mark.parametrize('dataset, variant', CASES)
def test_trains_with_tensorboard_including_the_projector(trained, dataset, variant):
    run = trained(dataset, variant)
    assert os.path.exists(os.path.join(run, 'model_best.pth.tar'))
    tb = os.path.join(run, 'tensorboard')
    assert any(f.startswith('events.out') for f in os.listdir(tb))
    proj = os.path.join(tb, '00000', 'val_embedding')
    assert os.path.exists(os.path.join(proj, 'tensors.tsv'))
    meta = open(os.path.join(proj, 'metadata.tsv')).read().splitlines()
    assert meta[0] == ('colour\tshape' if dataset == 'labelled' else meta[0])
    if dataset == 'release':  # no labels: the file names name the points
        assert meta[0].endswith('.jpg')


# ASEN's pictures and export: on the labelled set only (on the release set's four notions they cost 25 s more)
@pytest.mark.parametrize('dataset, variant', [c for c in CASES if c != ('release', 'asen')])
def test_test_with_pictures_and_exported_embeddings(trained, datasets, dataset, variant):
    run = trained(dataset, variant)
    if variant == 'scenet':  # masks weighed per pair: no embedding per notion to retrieve, picture or export
        refused(main.main, ['--test', '--resume', os.path.join(run, 'model_best.pth.tar'), '--export-embeddings'],
                '--export-embeddings', 'SCE-Net')
        out = ok(main.main, ['--test', '--resume', os.path.join(run, 'model_best.pth.tar')])
        res = json.load(open(os.path.join(run, 'test_results.json')))
        assert set(res['per_notion']) == set(NOTIONS[dataset]) and 'mAP' not in res
        assert 'no embedding per notion' in out and not any(f.endswith('.png') for f in os.listdir(run))
        return
    out = ok(main.main, ['--test', '--resume', os.path.join(run, 'model_best.pth.tar'), '--export-embeddings'])
    res = json.load(open(os.path.join(run, 'test_results.json')))
    assert set(res['per_notion']) == set(NOTIONS[dataset])
    assert ('mAP' in res) == (dataset == 'labelled')
    if dataset == 'release':
        assert 'no retrieval mAP' in out
    files = os.listdir(run)
    assert ('masks.png' in files) == (variant in ('csn', 'learned', 'prein'))
    assert {f'retrieval_{n}.png' for n in NOTIONS[dataset]} <= set(files)
    assert {'embeddings.npy', 'masks.npy', 'images.txt'} <= set(files)


@pytest.mark.parametrize('dataset, variant', CASES)
def test_retrieve_finds_neighbours_under_each_trained_notion(trained, dataset, variant):
    run = trained(dataset, variant)
    notion = NOTIONS[dataset][-1]
    png = os.path.join(run, 'neighbours.png')
    if variant == 'scenet':
        refused(retrieve.main, ['--resume', os.path.join(run, 'model_best.pth.tar'), '--query', 0, '--notion', notion],
                'no embedding per notion')
        return
    out = ok(retrieve.main, ['--resume', os.path.join(run, 'model_best.pth.tar'), '--query', 0, '--notion', notion,
                             '--k', 3, '--out', png])
    assert os.path.exists(png) and '3 nearest' in out


@pytest.mark.parametrize('dataset', list(NOTIONS))
def test_a_conditions_subset_is_tested_on_its_own_notions_only(trained, dataset):
    trained_notion, other = NOTIONS[dataset][-1], NOTIONS[dataset][0]
    run = trained(dataset, 'csn', ['--conditions', trained_notion])
    ckpt = os.path.join(run, 'model_best.pth.tar')
    out = ok(main.main, ['--test', '--resume', ckpt, '--no-pictures'])
    res = json.load(open(os.path.join(run, 'test_results.json')))
    assert set(res['per_notion']) == {trained_notion} and 'trained on' in out
    # asking for every notion: the trained one is evaluated, and the others are named as left out
    out = ok(main.main, ['--test', '--resume', ckpt, '--no-pictures', '--conditions', *NOTIONS[dataset]])
    res = json.load(open(os.path.join(run, 'test_results.json')))
    assert set(res['per_notion']) == {trained_notion} and other in out and 'not [' in out
    if dataset == 'labelled':
        assert set(k for k, v in res['mAP_per_notion'].items() if v is not None) == {trained_notion}
    # only an untrained notion: refused
    refused(main.main, ['--test', '--resume', ckpt, '--no-pictures', '--conditions', other], other, 'untrained')


@pytest.mark.parametrize('dataset', list(NOTIONS))
def test_what_cannot_be_done_stops_with_one_clear_message(datasets, dataset):
    data, runs = datasets[dataset], datasets['runs']
    base = ['--data', data, '--runs', runs, '--name', f'{dataset}_refused', *FAST, '--epochs', 1]
    refused(main.main, [*base, '--model', 'triplet', '--learned'], '--learned')
    refused(main.main, [*base, '--learned', '--prein'], '--learned', '--prein')
    refused(main.main, [*base, '--conditions', 'no_such_notion'], 'no_such_notion')
    refused(main.main, ['--data', data, '--test'], '--test', '--resume')
    assert not os.path.exists(os.path.join(runs, f'{dataset}_refused'))
