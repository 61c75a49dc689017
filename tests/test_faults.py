"""Never lose a run: kills, Ctrl-C, non-finite losses, disk errors, bad data and dying workers (one test per row of
the fault table of docs/reliability.md). Faults are injected by a small wrapper that patches
main.py's functions in the child."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import FAST, REPO

pytestmark = pytest.mark.slow  # every test here runs main.py in child processes

# Runs main.main(argv) after patching: FAULT is 'kill_step N', 'sigint_step N [N ...]' (one SIGINT per N), 'nan_step N',
# 'kill_in_save N' (SIGKILL half-way through the Nth checkpoint write), 'save_error N ERRNO', 'kill_image PATH'.
WRAPPER = r"""
import errno
import io
import os
import signal
import sys
sys.path.insert(0, {repo!r})
import main
import torch
from csnlib import train_loop as training
from csnlib import image_cache
fault = os.environ.get('FAULT', '').split()
calls = {{'loss': 0, 'save': 0}}
real_loss, real_save, real_load = training.csn_loss, torch.save, image_cache.load_image
def loss(*a, **k):
    calls['loss'] += 1
    n = calls['loss']
    if fault[0] == 'kill_step' and n == int(fault[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    if fault[0] == 'sigint_step':
        for _ in range([int(x) for x in fault[1:]].count(n)):
            os.kill(os.getpid(), signal.SIGINT)
    out = real_loss(*a, **k)
    return out * float('nan') if fault[0] == 'nan_step' and n == int(fault[1]) else out
def save(obj, f, *a, **k):
    calls['save'] += 1
    if fault[0] == 'kill_in_save' and calls['save'] == int(fault[1]):
        buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
        f.write(data[:len(data) // 2]); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    if fault[0] == 'save_error' and calls['save'] == int(fault[1]):
        f.write(b'partial'); raise OSError(int(fault[2]), os.strerror(int(fault[2])))
    return real_save(obj, f, *a, **k)
def load_image(path, size):
    if fault[0] == 'kill_image' and path.endswith(fault[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_load(path, size)
if fault:
    training.csn_loss, torch.save, image_cache.load_image = loss, save, load_image
from csnlib.errors import run_script
sys.exit(run_script(main.main, sys.argv[1:]))
""".format(repo=REPO)


def run(args, fault=''):
    return subprocess.run([sys.executable, '-c', WRAPPER, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'FAULT': fault, 'PYTHONUNBUFFERED': '1'})


def final(run_dir):
    """What a run ends with: its metrics (without timings) and its weights."""
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        lines = [json.loads(line) for line in f]
    for line in lines:
        line.pop('seconds'), line.pop('triplets_per_s')
    sd = torch.load(os.path.join(run_dir, 'checkpoint.pth.tar'), weights_only=True)['state_dict']
    return lines, sd


def same(a, b):
    assert a[0] == b[0]
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.fixture(scope='module')
def data_and_reference(tmp_path_factory):
    """A dataset and the same 3-epoch run never interrupted (8 steps an epoch)."""
    from conftest import make_dataset
    root = tmp_path_factory.mktemp('faults')
    make_dataset(str(root / 'data'))
    args = ['--data', root / 'data', '--runs', root / 'runs', '--epochs', 3, '--learned', *FAST]
    p = run([*args, '--name', 'reference'])
    assert p.returncode == 0, p.stderr
    return args, root / 'runs', final(root / 'runs' / 'reference')


def test_sigkill_mid_epoch_and_mid_checkpoint_write_then_resume_gives_the_same_run(data_and_reference):
    args, runs, reference = data_and_reference
    p = run([*args, '--name', 'killed'], fault='kill_step 12')  # epoch 2, step 4
    assert p.returncode == -signal.SIGKILL
    ck = runs / 'killed' / 'checkpoint.pth.tar'
    assert torch.load(ck, weights_only=True)['next_epoch'] == 2
    # the 2nd checkpoint write of the resumed run (model_best or checkpoint of epoch 2) is killed half-way
    p = run(['--resume', ck], fault='kill_in_save 2')
    assert p.returncode == -signal.SIGKILL
    state = torch.load(ck, weights_only=True)  # whole: the half-written file never replaced it
    assert state['next_epoch'] in (2, 3)
    assert [f for f in os.listdir(runs / 'killed') if '.tmp' in f]  # the half-written temporary file
    p = run(['--resume', ck])
    assert p.returncode == 0, p.stderr
    assert not [f for f in os.listdir(runs / 'killed') if '.tmp' in f]  # cleaned up by the resume
    same(final(runs / 'killed'), reference)
    for name in ('checkpoint.pth.tar', 'model_best.pth.tar'):
        torch.load(runs / 'killed' / name, weights_only=True)


def test_ctrl_c_saves_a_mid_epoch_checkpoint_that_resumes_exactly(data_and_reference):
    args, runs, reference = data_and_reference
    p = run([*args, '--name', 'sigint'], fault='sigint_step 11')  # epoch 2, step 3
    assert p.returncode == 130, p.stderr
    assert 'press Ctrl-C again' in p.stderr and 'Traceback' not in p.stderr
    state = torch.load(runs / 'sigint' / 'checkpoint.pth.tar', weights_only=True)
    assert (state['next_epoch'], state['next_step']) == (2, 3)
    p = run(['--resume', runs / 'sigint' / 'checkpoint.pth.tar'])
    assert p.returncode == 0 and 'epoch 2, step 3' in p.stdout, p.stdout + p.stderr
    same(final(runs / 'sigint'), reference)


def test_a_second_ctrl_c_exits_at_once_keeping_the_last_checkpoint(data_and_reference):
    args, runs, _ = data_and_reference
    p = run([*args, '--name', 'twice'], fault='sigint_step 11 11')  # two Ctrl-C within one step
    assert p.returncode == 130 and 'interrupted' in p.stderr and 'Traceback' not in p.stderr, p.stderr
    state = torch.load(runs / 'twice' / 'checkpoint.pth.tar', weights_only=True)
    assert (state['next_epoch'], state['next_step']) == (2, 0)  # epoch 1's checkpoint, untouched


def test_a_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_good_checkpoint(data_and_reference):
    args, runs, reference = data_and_reference
    p = run([*args, '--name', 'nan'], fault='nan_step 13')  # epoch 2, step 5
    assert p.returncode == 3 and 'non-finite loss at epoch 2, step 5 of 8' in p.stderr, p.stderr
    for name in ('checkpoint.pth.tar', 'model_best.pth.tar'):
        state = torch.load(runs / 'nan' / name, weights_only=True)
        assert state['next_epoch'] == 2
        assert all(torch.isfinite(v).all() for v in state['state_dict'].values() if v.is_floating_point())
    first_epoch, _ = final(runs / 'nan')
    assert first_epoch == reference[0][:1]


@pytest.mark.parametrize('err', [28, 30, 13])  # ENOSPC (full disk), EROFS (read-only), EACCES
def test_a_checkpoint_that_cannot_be_written_stops_clearly_and_keeps_the_previous(data_and_reference, err):
    args, runs, _ = data_and_reference
    name = f'disk{err}'
    p = run([*args, '--name', name], fault=f'save_error 3 {err}')  # epoch 2's first write
    assert p.returncode == 2 and 'cannot write' in p.stderr and 'previous checkpoint is intact' in p.stderr, p.stderr
    assert os.strerror(err) in p.stderr and 'Traceback' not in p.stderr
    assert torch.load(runs / name / 'checkpoint.pth.tar', weights_only=True)['next_epoch'] == 2
    assert not [f for f in os.listdir(runs / name) if '.tmp' in f]


def test_check_data_reports_every_problem_with_file_and_line(tmp_path):
    from conftest import make_dataset
    root = tmp_path / 'd'
    make_dataset(str(root))
    tl = root / 'tripletlists'
    with open(tl / 'colour_tripletlist_val.txt', 'a') as f:
        f.write('1 2\n0 1 9999\n5 5 6\n')
    with open(tl / 'shape_tripletlist_test.txt', 'a') as f:
        first = open(tl / 'shape_tripletlist_test.txt').readline()
        f.write(first)
    os.remove(root / 'images' / 'shapes' / 'blue_square_9.png')
    with open(root / 'images' / 'shapes' / 'red_square_2.png', 'w') as f:
        f.write('not a png')
    p = subprocess.run([sys.executable, os.path.join(REPO, 'main.py'), '--data', root, '--check-data'],
                       capture_output=True, text=True, timeout=600)
    out = p.stdout
    assert p.returncode == 1, out + p.stderr
    assert 'colour_tripletlist_val.txt:61: malformed line' in out
    assert 'colour_tripletlist_val.txt:62: image index 9999 is outside filenames.json' in out
    assert 'colour_tripletlist_val.txt:63: triplet' in out and 'same image twice' in out
    assert 'shape_tripletlist_test.txt:61: duplicate of line 1' in out
    assert 'image not found' in out and 'blue_square_9.png' in out
    assert 'cannot read image' in out and 'red_square_2.png' in out
    assert '6 problem(s) found' in out
    # training refuses on the same errors, and --skip-bad-triplets skips the bad lines, saying how many
    base = ['--data', root, '--runs', tmp_path / 'runs', '--epochs', 1, *FAST, '--conditions', 'shape']
    p = run([*base, '--name', 'x'])
    assert p.returncode == 2 and 'shape_tripletlist_test.txt' not in p.stderr  # train/val only at training time
    assert 'blue_square_9.png' in p.stderr  # the missing image stops the cache build


def test_a_dataloader_worker_that_dies_names_the_image(data_and_reference, tmp_path):
    args, runs, _ = data_and_reference
    target = 'red_circle_2.png'
    p = run([*args, '--name', 'worker', '--no-cache', '--workers', '1'], fault=f'kill_image {target}')
    assert p.returncode == 2, p.stderr
    assert 'DataLoader worker' in p.stderr and target in p.stderr and 'Traceback' not in p.stderr, p.stderr


def test_check_data_names_an_image_path_outside_the_images_folder_even_on_a_line_no_triplet_uses(tmp_path):
    from conftest import make_dataset, run_main
    root = tmp_path / 'data'
    make_dataset(str(root))
    (tmp_path / 'secret.png').write_bytes(b'not for the dataset')
    with open(root / 'filenames.json', 'a') as f:
        f.write('../../secret.png\nshapes/../../../secret.png\n')  # lines 41 and 42: no triplet names them
    p = run_main('--data', root, '--check-data', check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    for line in (41, 42):
        assert (f'(line {line} of {root / "filenames.json"})' in p.stdout
                and 'every image must be a file inside' in p.stdout)
    assert '2 problem(s) found' in p.stdout
