"""reproduce.py: what a run needs from the files it finds, and the four models end to end on the coloured shapes."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO

# main.py flags for a tiny budget: 64 training triplets (2 steps of 32), 40 val and 40 test triplets, 32 px images
TINY = ['--no-pretrained', '--image-size', '32', '--batch-size', '32', '--num_valtriplets', '40',
        '--num_testtriplets', '40', '--lr', '1e-3', '--log-interval', '1']


def reproduce(*args):
    p = subprocess.run([sys.executable, os.path.join(REPO, 'reproduce.py'), *map(str, args)], capture_output=True,
                       text=True, timeout=900, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    if p.returncode != 0:
        raise AssertionError(f'reproduce.py {args} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-3000:]}')
    return p


def launched(stdout):
    """The main.py command lines reproduce.py ran."""
    return [line[2:] for line in stdout.splitlines() if line.startswith('$ ')]


def test_plan_reads_the_run_folder(tmp_path):
    from reproduce import plan
    run = tmp_path / 'r'
    assert plan(str(run), 3)[0] == 'train'
    run.mkdir()
    torch.save({'next_epoch': 2, 'next_step': 5, 'args': {}}, run / 'checkpoint.pth.tar')  # stopped inside epoch 2
    assert plan(str(run), 3)[0] == 'resume' and plan(str(run), 2)[0] == 'resume'
    torch.save({'next_epoch': 4, 'next_step': 0, 'args': {}}, run / 'checkpoint.pth.tar')  # 3 epochs done
    torch.save({}, run / 'model_best.pth.tar')
    assert plan(str(run), 3)[0] == 'test' and plan(str(run), 4)[0] == 'resume'
    (run / 'test_results.json').write_text('{}')
    t = time.time()
    os.utime(run / 'model_best.pth.tar', (t - 10, t - 10))
    os.utime(run / 'test_results.json', (t, t))
    assert plan(str(run), 3)[0] == 'reuse'
    os.utime(run / 'model_best.pth.tar', (t + 5, t + 5))  # a newer best checkpoint than the results
    assert plan(str(run), 3)[0] == 'test'


def test_four_models_end_to_end_then_reused_then_one_retested_then_one_resumed(shapes_data, tmp_path):
    runs = tmp_path / 'runs'
    common = ['--data', shapes_data, '--runs', runs, '--num_traintriplets', 64, *TINY]
    p = reproduce(*common, '--epochs', 1)
    names = ['repro_triplet', 'repro_task', 'repro_csn_fixed', 'repro_csn_learned']
    cmds = launched(p.stdout)
    assert len(cmds) == 8 and sum('--test' in c for c in cmds) == 4
    assert '--model task' in cmds[2] and '--learned' in cmds[6] and all('--seed 1' in c for c in cmds[::2])
    rep = json.load(open(runs / 'reproduce.json'))
    assert [m['model'] for m in rep['models']] == ['triplet', 'task', 'csn_fixed', 'csn_learned']
    for m, name in zip(rep['models'], names):
        res = json.load(open(runs / name / 'test_results.json'))
        assert m['accuracy'] == res['accuracy'] and set(m['per_notion']) == {'colour', 'shape'}
        assert m['epochs'] == 1 and m['test_triplets'] == 40 and m['train_s'] > 0
        assert json.load(open(runs / name / 'args.json'))['num_traintriplets'] == 64
    table = (runs / 'reproduce.md').read_text()
    for title in ('standard triplet network', 'task-specific triplet networks', 'CSN, fixed disjoint masks',
                  'CSN, learned masks', '| colour | shape | overall |', '64 training triplets', 'Wall time'):
        assert title in table, table
    assert 'ordering' in rep['ordering']

    stamps = {n: os.stat(runs / n / 'test_results.json').st_mtime_ns for n in names}
    p = reproduce(*common, '--epochs', 1)
    assert launched(p.stdout) == [] and p.stdout.count('finished, reused') == 4
    assert {n: os.stat(runs / n / 'test_results.json').st_mtime_ns for n in names} == stamps

    os.remove(runs / 'repro_task' / 'test_results.json')
    p = reproduce(*common, '--epochs', 1)
    cmds = launched(p.stdout)
    assert len(cmds) == 1 and '--test' in cmds[0] and 'repro_task/model_best.pth.tar' in cmds[0]
    assert (runs / 'repro_task' / 'test_results.json').exists()
    assert all(os.stat(runs / n / 'test_results.json').st_mtime_ns == stamps[n] for n in names if n != 'repro_task')

    # a longer budget continues the run from its checkpoint: only the new epoch is trained
    p = reproduce(*common, '--epochs', 2, '--models', 'csn_fixed', '--out', tmp_path / 'two.md')
    cmds = launched(p.stdout)
    assert len(cmds) == 2 and '--resume' in cmds[0] and 'repro_csn_fixed/checkpoint.pth.tar' in cmds[0]
    with open(runs / 'repro_csn_fixed' / 'metrics.jsonl') as f:
        assert [json.loads(line)['epoch'] for line in f] == [1, 2]
    assert json.load(open(tmp_path / 'two.json'))['models'][0]['epochs'] == 2


def test_a_run_trained_with_other_settings_is_not_reused(shapes_data, tmp_path):
    runs = tmp_path / 'runs' / 'repro_triplet'
    runs.mkdir(parents=True)
    torch.save({'next_epoch': 2, 'next_step': 0, 'args': {'num_traintriplets': 999, 'seed': 1}},
               runs / 'checkpoint.pth.tar')
    p = subprocess.run([sys.executable, os.path.join(REPO, 'reproduce.py'), '--data', shapes_data, '--runs',
                        tmp_path / 'runs', '--epochs', '1', '--num_traintriplets', '64', *TINY],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and 'num_traintriplets 999' in p.stderr and 'another --prefix' in p.stderr
