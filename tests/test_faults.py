"""Never lose a run: kills, Ctrl-C, non-finite losses, disk errors, bad data and dying workers (one test per row of
the fault table of docs/reliability.md). Faults are injected by a small wrapper that patches
main.py's functions in the child."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import FAST, REPO

pytestmark = pytest.mark.slow  # every test here runs main.py in child processes

# Runs main.main(argv) after patching: FAULT is 'kill_step N', 'sigint_step N [N ...]' (one SIGINT per N), 'nan_step N',
# 'kill_in_save N' (SIGKILL half-way through the Nth checkpoint write), 'save_error N ERRNO', 'kill_image PATH',
# 'save_full N K' (the disk fills up after K bytes of the Nth checkpoint, in torch's own writer), 'cache_full' (the
# image cache's first rows meet a full disk).
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
    if fault[0] == 'save_full' and calls['save'] == int(fault[1]):  # the disk fills up after K bytes
        if hasattr(f, 'f'):  # the file object under save_checkpoint's wrapper: the disk is below both
            f.f = Full(f.f, int(fault[2]))
            return real_save(obj, f, *a, **k)
        return real_save(obj, Full(f, int(fault[2])), *a, **k)
    return real_save(obj, f, *a, **k)
class Full:
    def __init__(self, f, room):
        self.f, self.room = f, room
    def write(self, b):
        if len(b) > self.room:
            self.f.write(bytes(b)[:self.room]); self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)
    def flush(self):
        self.f.flush()
def load_image(path, size):
    if fault[0] == 'kill_image' and path.endswith(fault[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_load(path, size)
def no_room(fd, offset, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
if fault:
    training.csn_loss, torch.save, image_cache.load_image = loss, save, load_image
if fault and fault[0] == 'cache_full':  # a disk that cannot allocate ahead and fills up on the first rows written
    image_cache._reserve, image_cache._write_rows = (lambda fd, n: os.ftruncate(fd, n)), no_room
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


# ------------------------------------------------------------------------------------------------- hardening
# Files written through links or to places the data chooses, runs mixed or lost, inputs that eat the machine, and the
# tracebacks where one line is due: one test per row of the fault table (NOTES_DOCS.md).

def victim(tmp_path):
    """A file of the user's that a planted link points at: its content must survive."""
    path = tmp_path / 'precious.txt'
    path.write_text('keep me\n')
    return path


def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_kept(tmp_path):
    from conftest import make_dataset
    from csnlib.errors import UserError
    from csnlib.image_cache import build_image_cache
    from csnlib.run_lock import RunLock
    from triplet_image_loader import load_dataset_info
    target = victim(tmp_path)
    run_dir = tmp_path / 'runs' / 'x'
    os.makedirs(run_dir)
    os.symlink(target, run_dir / '.lock')
    with pytest.raises(UserError, match=r'\.lock is a symbolic link .*not followed: remove the link'):
        RunLock(str(run_dir)).__enter__()
    make_dataset(str(tmp_path / 'data'))
    os.makedirs(tmp_path / 'data' / 'cache')
    os.symlink(target, tmp_path / 'data' / 'cache' / 'images_16px.lock')
    with pytest.raises(UserError, match=r'images_16px\.lock is a symbolic link'):
        build_image_cache(load_dataset_info(str(tmp_path / 'data')), 16, workers=1, log=lambda *a: None)
    assert target.read_text() == 'keep me\n'


def test_a_link_planted_under_a_temporary_files_old_name_is_never_written_through(tmp_path):
    from csnlib.atomic import atomic_open, open_append
    from csnlib.checkpoint import save_checkpoint
    from csnlib.errors import UserError
    target = victim(tmp_path)
    ckpt = tmp_path / 'checkpoint.pth.tar'
    os.symlink(target, f'{ckpt}.tmp{os.getpid()}')      # the name a checkpoint's temporary file had: PATH.tmpPID
    os.symlink(target, tmp_path / f'args.json.tmp{os.getpid()}')
    save_checkpoint({'w': torch.zeros(3)}, str(ckpt))
    with atomic_open(str(tmp_path / 'args.json')) as f:
        f.write('{}')
    assert target.read_text() == 'keep me\n'
    assert not os.path.islink(ckpt) and torch.equal(torch.load(ckpt, weights_only=True)['w'], torch.zeros(3))
    assert not os.path.islink(tmp_path / 'args.json')
    os.symlink(target, tmp_path / 'metrics.jsonl')        # a file the code appends to
    with pytest.raises(UserError, match='metrics.jsonl is a symbolic link'):
        open_append(str(tmp_path / 'metrics.jsonl'))
    assert target.read_text() == 'keep me\n'


def test_a_dataset_name_that_climbs_out_never_chooses_where_reproduce_writes(tmp_path, monkeypatch):
    import reproduce
    from conftest import error_line, in_process, make_dataset
    data = tmp_path / 'a' / 'b' / 'data'
    make_dataset(str(data))
    meta = json.loads((data / 'dataset.json').read_text())
    (data / 'dataset.json').write_text(json.dumps({**meta, 'name': '../../../x'}))
    cwd = tmp_path / 'a' / 'b' / 'c'
    os.makedirs(cwd)
    monkeypatch.chdir(cwd)

    def no_training(argv, log_path):
        raise reproduce.UserError('no training in this test')
    monkeypatch.setattr(reproduce, 'run_main', no_training)
    line = error_line(in_process(reproduce.main, ['--data', data, '--budgets', 32, '--no-probe']))
    assert '"name" \'../../../x\' is not a plain name' in line
    assert [str(p) for p in tmp_path.rglob('study.json')] == []


def test_add_notion_with_a_name_that_climbs_out_is_refused(trained_run, tmp_path):
    import shutil

    from conftest import error_line, run_main
    r = trained_run('--epochs', 1, *FAST, name='base')
    data = tmp_path / 'a' / 'b' / 'data'
    shutil.copytree(r.data, data)
    for split in ('train', 'val'):                       # tripletlists/../../../x_tripletlist_SPLIT.txt
        shutil.copy(data / 'tripletlists' / f'colour_tripletlist_{split}.txt',
                    tmp_path / 'a' / f'x_tripletlist_{split}.txt')
    runs = tmp_path / 'r1' / 'r2' / 'runs'
    p = run_main('--resume', r.run / 'checkpoint.pth.tar', '--data', data, '--runs', runs, '--add-notion', '../../../x',
                 '--epochs', 1, check=False)
    assert '--add-notion \'../../../x\': not a notion name (it holds a "/")' in error_line(p)
    assert not os.path.exists(tmp_path / 'r1' / 'r2' / 'x') and not os.path.exists(runs)


def test_export_onnx_onto_a_checkpoint_it_does_not_read_is_refused(tmp_path):
    import retrieve
    from conftest import error_line, in_process, save_checkpoint
    best = save_checkpoint(tmp_path / 'model_best.pth.tar', ['--learned'])
    other = save_checkpoint(tmp_path / 'checkpoint.pth.tar', ['--learned'])
    before = open(other, 'rb').read()
    line = error_line(in_process(retrieve.main, ['--resume', best, '--export-onnx', other, '--device', 'cpu']))
    assert 'a file that is not an ONNX model is there' in line and 'model_best.onnx' in line
    assert open(other, 'rb').read() == before


def test_resuming_into_a_folder_that_holds_another_run_is_refused(trained_run):
    from conftest import error_line, run_main
    base = trained_run('--epochs', 1, *FAST, name='base')
    c5 = trained_run('--epochs', 1, '--seed', 5, *FAST, name='c5')
    kept = {f: open(c5.run / f, 'rb').read() for f in ('checkpoint.pth.tar', 'metrics.jsonl')}
    p = run_main('--resume', base.run / 'checkpoint.pth.tar', '--runs', c5.run.parent, '--name', 'c5', '--epochs', 2,
                 check=False)
    line = error_line(p)
    assert f'into {c5.run}: that folder holds another run' in line and 'Leave out --name' in line
    assert {f: open(c5.run / f, 'rb').read() for f in kept} == kept


FAKE_MAIN = r"""
import os, signal, sys, time
out = os.environ['FAKE_OUT']
def term(signum, frame):
    open(os.path.join(out, 'saved'), 'w').write('checkpoint saved on SIGTERM\n')
    sys.exit(130)
signal.signal(signal.SIGTERM, term)
open(os.path.join(out, 'started'), 'w').write(str(os.getpid()))
for _ in range(600):
    time.sleep(0.1)
"""


def test_main_py_saves_and_exits_when_its_reproduce_py_is_killed(tmp_path):
    """reproduce.py killed with kill -9: its main.py gets SIGTERM (its Ctrl-C: finish the step, save, exit), instead of
    training on orphaned and dying at its next line of output with nothing saved."""
    (tmp_path / 'main.py').write_text(FAKE_MAIN)
    code = (f'import sys; sys.path.insert(0, {REPO!r}); import reproduce; reproduce.REPO = {str(tmp_path)!r}; '
            f'reproduce.run_main([], {str(tmp_path / "log")!r})')
    parent = subprocess.Popen([sys.executable, '-c', code],
                              env={**os.environ, 'FAKE_OUT': str(tmp_path)}, stdout=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if (tmp_path / 'started').exists() and (tmp_path / 'started').read_text():
                break
            parent.poll()
            assert parent.returncode is None
            time.sleep(0.1)
        child = int((tmp_path / 'started').read_text())
        parent.kill()
        parent.wait()
        for _ in range(300):
            if (tmp_path / 'saved').exists():
                break
            time.sleep(0.1)
        assert (tmp_path / 'saved').exists()
    finally:
        parent.kill()
    for _ in range(300):                                  # and it exits
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail('main.py was left running')


def test_a_run_left_by_a_copy_that_stopped_is_taken_over_by_a_copy_that_remains(shapes_data, tmp_path, monkeypatch):
    """Two copies share a study; one holds a run and is killed while the other trains: the other takes the run over
    (once the killed copy's main.py has saved and exited) and reports the whole study, not 'still being trained'."""
    import types

    from test_reproduce import TINY, launched
    from test_reproduce import reproduce as run_reproduce

    import reproduce as rp
    from csnlib.run_lock import LOCK_NAME, RunLock
    runs, results = tmp_path / 'runs', tmp_path / 'results'
    held = str(runs / 'repro_triplet_n32_s1_lr1e-3')
    other_copy = RunLock(held, 'trains and tests it for reproduce.py', rp.STUDY_LOCK).__enter__()
    its_main = RunLock(held, 'trains').__enter__()      # the killed copy's main.py, still saving its checkpoint
    train_and_test, sleeps = rp.train_and_test, []

    def other_copy_dies(*a, **kw):
        out = train_and_test(*a, **kw)
        if out == 'done' and other_copy.fd is not None:  # killed while this copy trained a run: its lock goes
            other_copy.__exit__(None, None, None)
        return out

    def sleep(seconds):                                  # the orphaned main.py saves and exits meanwhile
        sleeps.append(seconds)
        if its_main.fd is not None:
            its_main.__exit__(None, None, None)
    monkeypatch.setattr(rp, 'train_and_test', other_copy_dies)
    monkeypatch.setattr(rp, 'time', types.SimpleNamespace(time=time.time, sleep=sleep))
    p = run_reproduce('--data', shapes_data, '--runs', runs, '--results', results, '--budgets', 32, '--seeds', 1,
                      '--epochs', 1, '--models', 'triplet', 'csn_fixed', '--no-probe', *TINY, monkeypatch=monkeypatch)
    names = [c.split('--name ')[1].split()[0] for c in launched(p.stdout) if '--name' in c]
    assert names == ['repro_csn_fixed_n32_s1_lr1e-3', 'repro_triplet_n32_s1_lr1e-3'], p.stdout
    assert 'repro_triplet_n32_s1_lr1e-3: left to the copy of this command that is training it' in p.stdout
    assert f'repro_triplet_n32_s1_lr1e-3: waiting: {held} is in use: process' in p.stdout and sleeps == [1]
    assert 'still being trained' not in p.stdout
    assert 'Runs finished: 2 of 2' in (results / 'report.md').read_text()
    assert LOCK_NAME == '.lock'


def test_a_full_disk_in_torchs_checkpoint_writer_is_one_line_and_keeps_the_previous(data_and_reference):
    args, runs, _ = data_and_reference
    p = run([*args, '--name', 'full'], fault='save_full 3 1000')  # epoch 2's first write: 1000 bytes, then no room
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr
    assert 'cannot write checkpoint' in p.stderr and 'No space left on device' in p.stderr
    assert 'previous checkpoint is intact' in p.stderr
    assert torch.load(runs / 'full' / 'checkpoint.pth.tar', weights_only=True)['next_epoch'] == 2
    assert not [f for f in os.listdir(runs / 'full') if '.tmp' in f]


def test_a_full_disk_while_the_image_cache_is_built_is_one_line_and_leaves_nothing(tmp_path):
    from conftest import error_line, make_dataset
    make_dataset(str(tmp_path / 'data'))
    p = run(['--data', tmp_path / 'data', '--runs', tmp_path / 'runs', '--name', 'x', '--epochs', 1, *FAST],
            fault='cache_full')
    line = error_line(p)
    assert 'cannot build the image cache in' in line and 'No space left on device' in line
    assert 'nothing was kept (no partial file)' in line and '--no-cache' in line
    assert os.listdir(tmp_path / 'data' / 'cache') == ['images_32px.lock']


def test_an_image_cache_worker_that_dies_fails_the_build_instead_of_hanging_it(tmp_path):
    from conftest import make_dataset
    make_dataset(str(tmp_path / 'data'), per_kind=80)   # 320 images: two chunks of 256, two worker processes
    code = f"""
import os, signal, sys
sys.path.insert(0, {REPO!r})
from csnlib import image_cache
from triplet_image_loader import load_dataset_info
real = image_cache.load_image
def load_image(path, size):
    if path.endswith('blue_square_70.png'):
        os.kill(os.getpid(), signal.SIGKILL)             # the worker dies (as of SIGBUS, or the OOM killer)
    return real(path, size)
image_cache.load_image = load_image
try:
    image_cache.build_image_cache(load_dataset_info({str(tmp_path / 'data')!r}), 16, workers=2, log=print)
except image_cache.DataError as e:
    print('error:', e)
"""
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert 'error: a worker process decoding images for the image cache died' in p.stdout, p.stdout + p.stderr
    assert 'nothing was kept' in p.stdout
    assert [f for f in os.listdir(tmp_path / 'data' / 'cache') if '.tmp' in f or f.endswith('.u8')] == []


def long_png(path, width=1, height=100000):
    """A PNG of a few hundred bytes whose pixel count passes PIL's limit: 1 x 100,000 px."""
    from PIL import Image
    Image.new('RGB', (width, height), (200, 30, 30)).save(path, optimize=True)
    return str(path)


def test_a_long_thin_image_is_refused_from_its_header_by_retrieve_and_wherever_images_enter(trained_run, tmp_path):
    import retrieve
    from conftest import error_line, in_process
    from triplet_image_loader import DataError, load_image
    r = trained_run('--epochs', 1, *FAST, name='base')
    png = long_png(tmp_path / 'long.png')
    assert os.path.getsize(png) < 2000
    line = error_line(in_process(retrieve.main, ['--resume', r.run / 'model_best.pth.tar', '--query', png,
                                                 '--notion', 'colour', '--device', 'cpu']))
    assert 'the image is 1 x 100000 px, a side over 16,384 px; refused before decoding' in line
    for w, h in ((40, 2000), (9000, 9000)):              # 50 times as long as wide; 81 million pixels
        with pytest.raises(DataError, match='refused before decoding'):
            load_image(long_png(tmp_path / f'{w}x{h}.png', w, h), 32)


def test_the_image_cache_notices_any_row_damaged_not_only_a_sample(tmp_path):
    import numpy as np

    from conftest import make_dataset
    from csnlib.image_cache import HEADER, ImageStore, build_image_cache
    from triplet_image_loader import DataError, load_dataset_info
    make_dataset(str(tmp_path / 'data'), per_kind=30)
    info = load_dataset_info(str(tmp_path / 'data'))
    n, row = len(info.filenames), 16 * 16 * 3
    path = build_image_cache(info, 16, workers=1, log=lambda *a: None)
    sampled = set(np.linspace(0, n - 1, 64).round().astype(int).tolist())  # the 64 rows a sample digest covered
    noise = np.random.default_rng(0).integers(0, 256, row, dtype=np.uint8).tobytes()
    with open(path, 'r+b') as f:                         # every other row not in that sample: noise, header kept
        for i in range(1, n, 2):
            if i not in sampled:
                f.seek(HEADER + i * row)
                f.write(noise)
    with pytest.raises(DataError, match='its pixels are not those it was built with'):
        ImageStore(info, 16, path)
    said = []
    assert build_image_cache(info, 16, workers=1, log=said.append) == path
    assert said[0] == f'note: the image cache {path} does not match (its pixels are not those it was built with ' \
                      f'(damaged or overwritten)); building it again'
    assert np.array_equal(ImageStore(info, 16, path).get(np.arange(n)), ImageStore(info, 16).get(np.arange(n)))


def test_the_embeddings_cache_notices_an_image_replaced_by_one_of_the_same_size_and_mtime(tmp_path):
    import io

    from PIL import Image

    import retrieve
    from conftest import in_process, make_dataset, save_checkpoint
    make_dataset(str(tmp_path / 'data'))
    os.makedirs(tmp_path / 'run')
    ckpt = save_checkpoint(tmp_path / 'run' / 'model_best.pth.tar', ['--learned'])
    argv = ['--resume', ckpt, '--data', tmp_path / 'data', '--device', 'cpu']
    assert in_process(retrieve.main, argv)[0] == 0
    assert 'using cached embeddings' in in_process(retrieve.main, argv)[1]
    target = tmp_path / 'data' / 'images' / 'shapes' / 'red_circle_3.png'
    st = os.stat(target)
    buf = io.BytesIO()
    Image.new('RGB', (48, 40), (0, 255, 0)).save(buf, 'PNG')
    assert len(buf.getvalue()) <= st.st_size
    target.write_bytes(buf.getvalue() + bytes(st.st_size - len(buf.getvalue())))  # PIL ignores what follows IEND
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(target).st_size, os.stat(target).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    code, out, err = in_process(retrieve.main, argv)
    assert code == 0 and 'the cached embeddings' in out + err and 'an image under' in out + err, out + err
    assert 'using cached embeddings' not in out


def read_only(monkeypatch, folder):
    """Writes under folder fail as on a read-only filesystem (EROFS; as root, permission bits do not stop a write)."""
    import builtins
    import errno
    folder = os.path.realpath(folder)
    real_open, real_builtin_open, real_makedirs = os.open, builtins.open, os.makedirs

    def inside(path):
        return os.path.realpath(os.fspath(path)).startswith(folder)

    def deny(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def os_open(path, flags, *a, **k):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            deny(path)
        return real_open(path, flags, *a, **k)

    def builtin_open(path, mode='r', *a, **k):
        if isinstance(path, (str, os.PathLike)) and inside(path) and any(c in mode for c in 'wax+'):
            deny(path)
        return real_builtin_open(path, mode, *a, **k)

    def makedirs(path, *a, **k):
        if inside(path) and not os.path.isdir(path):
            deny(path)
        return real_makedirs(path, *a, **k)
    monkeypatch.setattr(os, 'open', os_open)
    monkeypatch.setattr(builtins, 'open', builtin_open)
    monkeypatch.setattr(os, 'makedirs', makedirs)


def test_a_read_only_run_folder_is_one_line_in_test_resume_auto_and_retrieve(trained_run, tmp_path, monkeypatch):
    import shutil

    import retrieve
    from conftest import error_line, in_process, run_main
    r = trained_run('--epochs', 1, *FAST, name='base')
    ro = tmp_path / 'runs' / 'base'
    shutil.copytree(r.run, ro)
    shutil.copytree(os.path.join(r.data, 'cache'), tmp_path / 'cache')  # the image cache is not what this is about
    read_only(monkeypatch, tmp_path / 'runs')
    cache = ['--cache-dir', tmp_path / 'cache']
    line = error_line(run_main('--test', '--resume', ro / 'model_best.pth.tar', '--data', r.data, *cache, check=False))
    assert f'cannot lock the run folder {ro} (Read-only file system)' in line
    line = error_line(run_main('--resume', 'auto', '--runs', tmp_path / 'runs', '--name', 'base', '--data', r.data,
                               '--epochs', 2, *cache, check=False))
    assert f'cannot lock the run folder {ro} (Read-only file system)' in line
    code, out, err = in_process(retrieve.main, ['--resume', ro / 'model_best.pth.tar', '--query', 3, '--notion',
                                                'colour', '--device', 'cpu'])
    assert 'WARNING: cannot cache the embeddings' in out
    assert f'cannot write the picture {ro / "retrieval"}' in error_line((code, out, err))


def test_a_checkpoint_whose_weights_do_not_fit_its_args_is_one_line_in_retrieve_and_the_hub(tmp_path):
    import retrieve
    from conftest import error_line, in_process, save_checkpoint
    from csnlib.errors import CheckpointError
    from csnlib.trained_csn import TrainedCSN
    path = save_checkpoint(tmp_path / 'model_best.pth.tar', ['--learned'])
    ckpt = torch.load(path, weights_only=True)
    ckpt['state_dict']['embednet.masks.weight'] = torch.ones(2, 32)  # masks of 32 dimensions, a 64-d embedding
    torch.save(ckpt, path)
    line = error_line(in_process(retrieve.main, ['--resume', path, '--device', 'cpu']))
    assert 'its weights do not fit the CSN (learned masks), 64-d model its args describe' in line
    assert 'embednet.masks.weight' in line
    with pytest.raises(CheckpointError, match='do not fit'):
        TrainedCSN.load(path)


def test_a_checkpoint_without_its_training_state_cannot_be_resumed_one_line(shapes_data, tmp_path):
    from conftest import error_line, run_main, save_checkpoint
    path = save_checkpoint(tmp_path / 'model.pth.tar', ['--learned'])  # a model, no optimizer, epoch or RNG states
    line = error_line(run_main('--resume', path, '--data', shapes_data, '--runs', tmp_path / 'runs', '--name', 'z',
                               '--epochs', 2, check=False))
    assert 'the checkpoint has no optimizer, next_epoch, next_step, best_acc, best_epoch, rng' in line
    assert not os.path.exists(tmp_path / 'runs' / 'z')


@pytest.mark.parametrize('bad', ['{}', '[1]', '{"epoch": "2"}'])
def test_metrics_lines_that_are_json_but_not_records_are_one_line_on_resume(trained_run, tmp_path, bad):
    import shutil

    from conftest import error_line, run_main
    r = trained_run('--epochs', 1, *FAST, name='base')
    shutil.copytree(r.run, tmp_path / 'base')
    with open(tmp_path / 'base' / 'metrics.jsonl', 'a') as f:
        f.write(bad + '\n{"epoch": 1}\n')
    line = error_line(run_main('--resume', 'auto', '--runs', tmp_path, '--name', 'base', '--data', r.data,
                               '--epochs', 2, check=False))
    assert f'metrics.jsonl:2: not an epoch\'s record ({bad!r}' in line


def test_asen_lists_with_a_superscript_digit_or_latin1_bytes_are_named_with_file_and_line(tmp_path):
    import get_data
    from conftest import error_line, in_process, make_asen_layout

    def convert():
        return in_process(get_data.main, ['--dataset', 'asen', '--from', tmp_path / 'asen', '--out', tmp_path / 'out',
                                          '--train-triplets', 40, '--val-triplets', 12, '--test-triplets', 12])
    make_asen_layout(str(tmp_path / 'asen'))
    labels = tmp_path / 'asen' / 'Tiny' / 'label_train.txt'
    kept = labels.read_bytes()
    labels.write_bytes(kept + '0 0 \u00b2\n'.encode())
    line = error_line(convert())
    assert 'label_train.txt:17: expected "img attr val [attr val ...]" as indices (ASCII digits)' in line
    labels.write_bytes(kept)
    names = tmp_path / 'asen' / 'Tiny' / 'filenames_train.txt'
    names.write_bytes(names.read_bytes() + b'img/caf\xe9.png\n')
    assert 'filenames_train.txt:17: not UTF-8 text (byte 0xe9' in error_line(convert())


def test_a_data_folder_whose_name_has_a_latin1_byte_trains(tmp_path):
    from conftest import make_dataset
    data = os.path.join(os.fsencode(tmp_path), b'd\xe9ta')  # not UTF-8: os.fsdecode gives a surrogate
    make_dataset(os.fsdecode(data))
    argv = ['--data', os.fsdecode(data), '--runs', tmp_path / 'runs', '--name', 'x', '--epochs', 1, *FAST]
    p = subprocess.run([sys.executable, os.path.join(REPO, 'main.py'), *map(str, argv)], capture_output=True,
                       timeout=600)
    err = p.stderr.decode(errors='replace')
    assert p.returncode == 0 and 'Traceback' not in err, err[-3000:]
    assert os.path.exists(tmp_path / 'runs' / 'x' / 'model_best.pth.tar')


@pytest.mark.parametrize('flag, value', [('--image-size', 100000), ('--dim_embed', 1000000000), ('--workers', 1000),
                                         ('--threads', 1000)])
def test_sizes_beyond_what_the_machine_holds_are_refused_at_parse_time(flag, value):
    from conftest import in_process
    from main import main
    code, _, err = in_process(main, [flag, value, '--check-data'])
    assert code == 2 and f'argument {flag}' in err and f'got {value}' in err and 'Traceback' not in err


@pytest.mark.parametrize('key, value', [('image_size', 100000), ('dim_embed', 1000000000), ('threads', 1000),
                                        ('image_size', '32'), ('model', 'evil')])
def test_a_crafted_checkpoints_args_are_held_to_the_flags_ranges(shapes_data, tmp_path, key, value):
    import retrieve
    from conftest import error_line, in_process, run_main, save_checkpoint
    path = save_checkpoint(tmp_path / 'model_best.pth.tar', ['--learned'])
    ckpt = torch.load(path, weights_only=True)
    ckpt['args'][key] = value
    torch.save(ckpt, path)
    want = f'its args hold --{key.replace("_", "-" if key == "image_size" else "_")} {value!r}'
    assert want in error_line(in_process(retrieve.main, ['--resume', path, '--data', shapes_data, '--device', 'cpu']))
    assert want in error_line(run_main('--test', '--resume', path, '--data', shapes_data, check=False))


def test_the_demo_refuses_bad_index_text_long_images_large_uploads_and_an_ipv6_host_and_escapes_its_card(tmp_path,
                                                                                                       monkeypatch):
    import requests

    import demo
    from conftest import error_line, in_process, make_dataset, save_checkpoint
    make_dataset(str(tmp_path / 'data'))
    os.makedirs(tmp_path / 'run')
    ckpt = save_checkpoint(tmp_path / 'run' / 'model_best.pth.tar', ['--learned'])
    (tmp_path / 'run' / 'test_results.json').write_text(json.dumps({
        'checkpoint': '<b>x</b>.pth.tar', 'triplets': '<i>many</i>', 'accuracy': 0.5,
        'per_notion': {'colour': 0.6, '<img src=http://example.com/x.png>': 0.7, 'shape': '<script>'}}))
    line = error_line(in_process(demo.main, ['--resume', ckpt, '--host', '::1']))
    assert '--host ::1: an IPv6 address' in line and '127.0.0.1' in line
    a = demo.build_parser().parse_args(['--resume', ckpt, '--data', str(tmp_path / 'data'), '--device', 'cpu'])
    m = demo.load_demo(a)
    for text in ('\u00b2', '9' * 5001):  # a digit to str.isdigit; more digits than int() converts
        with pytest.raises(demo.UserError, match='neither an image index'):
            m.query_of_name(text)
    with pytest.raises(demo.UserError, match='long.png: the image is 1 x 100000 px, a side over 16,384 px'):
        m.query_of_upload(long_png(tmp_path / 'long.png'))
    card = m.card()
    assert '<img' not in card and '<b>' not in card and '<script>' not in card and '&lt;img src=' in card
    assert '| colour | 60.00 % |' in card
    page = demo.build_page(m, a)
    monkeypatch.setattr(type(page), 'block_thread', lambda self: None)
    port = demo.socket.socket()
    port.bind(('127.0.0.1', 0))
    a.port = port.getsockname()[1]
    port.close()
    demo.serve(page, m, a)
    try:
        url = f'http://127.0.0.1:{a.port}/gradio_api/upload'
        big = requests.post(url, files={'files': ('big.png', b'\0' * (21 * 2**20))}, timeout=60)
        small = requests.post(url, files={'files': ('small.png', b'\0' * 1000)}, timeout=60)
    finally:
        page.close()
    assert big.status_code == 413 and 'maximum allowed size' in big.text and small.status_code == 200
