"""torchrun --nproc_per_node 2 on the CPU (Gloo): training, one set of run files, and the same test accuracy."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import FAST, REPO, run_main

pytestmark = pytest.mark.slow  # every test here runs main.py in child processes

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']


def torchrun(*args, check=True):
    p = subprocess.run([*TORCHRUN, os.path.join(REPO, 'main.py'), *map(str, args)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'})
    if check and p.returncode != 0:
        raise AssertionError(f'torchrun exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}')
    return p


def test_torchrun_trains_writes_one_run_and_tests_like_one_process(shapes_data, tmp_path):
    runs = tmp_path / 'runs'
    p = torchrun('--data', shapes_data, '--runs', runs, '--name', 'ddp', '--epochs', 2, *FAST)
    assert p.stdout.count('done: best val accuracy') == 1  # only rank 0 prints
    assert sorted(os.listdir(runs)) == ['ddp']
    assert sorted(os.listdir(runs / 'ddp')) == ['.lock', 'args.json', 'checkpoint.pth.tar', 'metrics.jsonl',
                                                'model_best.pth.tar']  # .lock: rank 0 held the folder (run_lock.py)
    with open(runs / 'ddp' / 'metrics.jsonl') as f:
        assert [json.loads(line)['epoch'] for line in f] == [1, 2]
    ck = torch.load(runs / 'ddp' / 'checkpoint.pth.tar', weights_only=True)
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in ck['state_dict'])

    # the DDP checkpoint in one process, and under torchrun: the same accuracy
    best = runs / 'ddp' / 'model_best.pth.tar'
    run_main('--test', '--resume', best, '--no-pictures')
    single = json.load(open(runs / 'ddp' / 'test_results.json'))
    os.remove(runs / 'ddp' / 'test_results.json')
    torchrun('--test', '--resume', best, '--no-pictures')
    multi = json.load(open(runs / 'ddp' / 'test_results.json'))
    assert multi['accuracy'] == single['accuracy'] and multi['per_notion'] == single['per_notion']

    # --resume under torchrun continues the run
    p = torchrun('--resume', runs / 'ddp' / 'checkpoint.pth.tar', '--epochs', 3)
    with open(runs / 'ddp' / 'metrics.jsonl') as f:
        assert [json.loads(line)['epoch'] for line in f] == [1, 2, 3]


@pytest.mark.parametrize('model', ['asen', 'scenet'])
def test_csns_successors_train_under_torchrun_and_validate_as_one_process_does(shapes_data, tmp_path, model):
    """One tiny torchrun run of each successor: one set of run files, an unwrapped checkpoint, and the validation
    accuracy that the two processes computed together (each embedding a share) is the one a single process computes
    from the saved model."""
    from csnlib.builder import load_model
    from csnlib.evaluate import evaluate
    from csnlib.image_cache import ImageStore
    from triplet_image_loader import load_dataset_info, load_triplets
    runs = tmp_path / 'runs'
    p = torchrun('--data', shapes_data, '--runs', runs, '--name', model, '--model', model, '--epochs', 1, *FAST)
    assert p.stdout.count('done: best val accuracy') == 1
    assert sorted(os.listdir(runs / model)) == ['.lock', 'args.json', 'checkpoint.pth.tar', 'metrics.jsonl',
                                                'model_best.pth.tar']
    with open(runs / model / 'metrics.jsonl') as f:
        (m,) = [json.loads(line) for line in f]
    best = runs / model / 'model_best.pth.tar'
    net, ckpt, rt = load_model(str(best), shapes_data, 'cpu')  # fails on a module. or _orig_mod. prefix
    assert ckpt['args']['model'] == model and m['epoch'] == 1 and m['train_loss'] == m['train_loss']  # not nan
    info = load_dataset_info(shapes_data)
    val_t, val_c = load_triplets(info, 'val', [0, 1], rt.args.num_valtriplets, rt.args.seed)
    res = evaluate(net, val_t, val_c, ImageStore(info, 32), rt, info.notions)
    assert res['accuracy'] == pytest.approx(m['val_acc'], abs=1e-9)
    assert res['per_notion'] == pytest.approx(m['val_acc_per_notion'], abs=1e-9)


def test_a_single_process_checkpoint_resumes_under_torchrun(shapes_data, tmp_path):
    runs = tmp_path / 'runs'
    run_main('--data', shapes_data, '--runs', runs, '--name', 'one', '--epochs', 1, '--model', 'task', *FAST)
    torchrun('--resume', runs / 'one' / 'checkpoint.pth.tar', '--epochs', 2)
    with open(runs / 'one' / 'metrics.jsonl') as f:
        assert [json.loads(line)['epoch'] for line in f] == [1, 2]


def test_batch_size_must_split_over_the_processes(shapes_data, tmp_path):
    p = torchrun('--data', shapes_data, '--runs', tmp_path / 'runs', '--name', 'odd', '--epochs', 1, *FAST,
                 '--batch-size', '33', check=False)
    assert p.returncode != 0 and 'does not split evenly over 2 processes' in p.stderr + p.stdout


HANG = r"""
import os
import sys
import time
sys.path.insert(0, {repo!r})
import main
from csnlib import train_loop as training
real_loss, calls = training.csn_loss, [0]
def loss(*a, **k):
    calls[0] += 1
    if os.environ.get('RANK') == '1' and calls[0] == 3:
        time.sleep(3600)  # this rank hangs: the other one must not wait for ever
    return real_loss(*a, **k)
training.csn_loss = loss
from csnlib.errors import run_script
sys.exit(run_script(main.main, sys.argv[1:]))
"""


BUFFERS = r"""
import json
import os
import sys
sys.path.insert(0, {repo!r})
from csnlib import evaluate
import main
from csnlib import train_loop as training
out, rank = {out!r}, os.environ['RANK']

def sums(model):
    return [float(b.double().sum()) for b in model.buffers()]

real_train, real_embed = training.train_epoch, evaluate.embed_images
def train_epoch(model, *a, **k):
    r = real_train(model, *a, **k)
    json.dump(sums(model), open(os.path.join(out, f'trained_{{rank}}.json'), 'w'))
    return r
def embed_images(model, *a, **k):
    path = os.path.join(out, f'evaluated_{{rank}}.json')
    if not os.path.exists(path):
        json.dump(sums(model), open(path, 'w'))
    return real_embed(model, *a, **k)
main.train_epoch, evaluate.embed_images = train_epoch, embed_images
from csnlib.errors import run_script
sys.exit(run_script(main.main, sys.argv[1:]))
"""


def test_every_process_evaluates_with_rank_0s_batchnorm_statistics(shapes_data, tmp_path):
    """Each process updates BatchNorm's running statistics from its own share of a batch; the validation accuracy that
    picks model_best must be that of rank 0's model, which is the one saved."""
    script = tmp_path / 'buffers.py'
    script.write_text(BUFFERS.format(repo=REPO, out=str(tmp_path)))
    args = ['--data', shapes_data, '--runs', tmp_path / 'runs', '--name', 'bn', '--epochs', 1, *FAST]
    p = subprocess.run([*TORCHRUN, str(script), *map(str, args)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stderr[-3000:]
    trained = [json.load(open(tmp_path / f'trained_{r}.json')) for r in (0, 1)]
    evaluated = [json.load(open(tmp_path / f'evaluated_{r}.json')) for r in (0, 1)]
    assert trained[0] != trained[1]  # the processes' own statistics differ after training
    assert evaluated[0] == evaluated[1] == trained[0]
    saved = torch.load(tmp_path / 'runs' / 'bn' / 'checkpoint.pth.tar', weights_only=True)['state_dict']
    model_buffers = [k for k in saved if 'running_' in k or 'num_batches_tracked' in k]
    assert len(model_buffers) == len(trained[0])


def test_a_rank_that_hangs_takes_the_job_down_with_a_clear_message(shapes_data, tmp_path):
    script = tmp_path / 'hang.py'
    script.write_text(HANG.format(repo=REPO))
    args = ['--data', shapes_data, '--runs', tmp_path / 'runs', '--name', 'hang', '--epochs', 2,
            '--dist-timeout', 15, *FAST]
    p = subprocess.run([*TORCHRUN, str(script), *map(str, args)], capture_output=True, text=True,
                       timeout=240, env={**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'})
    assert p.returncode != 0
    assert 'lost contact with the other processes' in p.stderr, p.stderr[-3000:]
    assert '--dist-timeout' in p.stderr
