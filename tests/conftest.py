"""What the tests share: tiny datasets built in the test (coloured shapes whose notions, colour and shape, can be seen
in the pixels), the tiny-run flags (FAST), main.py as a user runs it (run_main, in_process), the one line a user
error prints (error_line), a dataset in ASEN's layout (make_asen_layout), checkpoints untrained (checkpoint_of,
save_checkpoint) and trained (the trained_run fixture), and headless Chromium (chromium_path, CHROMIUM_FLAGS)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {'red': (220, 40, 40), 'blue': (40, 60, 220)}
SHAPES = ('circle', 'square')


def draw(colour, shape, rng, size=40):
    im = Image.new('RGB', (size + 8, size), (235, 235, 235))  # not square: exercises resize + centre crop
    d = ImageDraw.Draw(im)
    r = rng.integers(size // 5, size // 3)
    cx, cy = rng.integers(r + 4, size + 4 - r), rng.integers(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    (d.ellipse if shape == 'circle' else d.rectangle)(box, fill=COLOURS[colour])
    return im


def make_dataset(root, per_kind=10, triplets=(120, 60, 60), seed=0, with_meta=True):
    """Images of every (colour, shape), split by image; notions 'colour' and 'shape' in dataset.json.
    Triplet lines are `anchor far close`: anchor and close share the notion's label."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, 'images', 'shapes'), exist_ok=True)
    names, labels = [], []
    for colour in COLOURS:
        for shape in SHAPES:
            for k in range(per_kind):
                name = f'shapes/{colour}_{shape}_{k}.png'
                draw(colour, shape, rng).save(os.path.join(root, 'images', name))
                names.append(name)
                labels.append({'colour': colour, 'shape': shape})
    with open(os.path.join(root, 'filenames.json'), 'w') as f:
        f.write('\n'.join(names) + '\n')
    if with_meta:
        with open(os.path.join(root, 'dataset.json'), 'w') as f:
            json.dump({'name': 'shapes', 'images': 'images', 'notions': ['colour', 'shape'], 'labels': 'labels.csv'}, f)
        with open(os.path.join(root, 'labels.csv'), 'w') as f:
            f.write('image,colour,shape\n'
                    + ''.join(f'{n},{l["colour"]},{l["shape"]}\n' for n, l in zip(names, labels)))
    idx = np.arange(len(names))
    split_of = idx % 4  # 0,1 train; 2 val; 3 test
    pools = {'train': idx[split_of < 2], 'val': idx[split_of == 2], 'test': idx[split_of == 3]}
    os.makedirs(os.path.join(root, 'tripletlists'), exist_ok=True)
    for notion in ('colour', 'shape'):
        for split, n in zip(('train', 'val', 'test'), triplets):
            pool, seen, lines = pools[split], set(), []
            while len(lines) < n:
                a, b, c = rng.choice(pool, 3, replace=False)
                la, lb, lc = (labels[i][notion] for i in (a, b, c))
                if la == lc and la != lb and (a, b, c) not in seen:
                    seen.add((a, b, c))
                    lines.append(f'{a} {b} {c}\n')
            with open(os.path.join(root, 'tripletlists', f'{notion}_tripletlist_{split}.txt'), 'w') as f:
                f.writelines(lines)
    return names, labels


@pytest.fixture
def shapes_data(tmp_path):
    root = tmp_path / 'shapes'
    make_dataset(str(root))
    return str(root)


ATTRS = ['colour', 'shape']  # make_asen_layout's attributes and values
VALUES = {'colour': ['red', 'blue'], 'shape': ['circle', 'square']}


def make_asen_layout(root, name='Tiny', per_kind=4, seed=0, extra_datasets=()):
    """DIR/meta.json and DIR/NAME/ with images, filenames_{train,valid,test}.txt, label_train.txt and the
    query/candidate lists (valid/test images labelled under one attribute each, as FashionAI's are)."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, name)
    os.makedirs(os.path.join(base, 'img'), exist_ok=True)
    kinds = [(c, s) for c in VALUES['colour'] for s in VALUES['shape']]
    lists = {}
    for split in ('train', 'valid', 'test'):
        rows = []
        for k in range(per_kind):
            for c, s in kinds:
                p = f'img/{split}_{c}_{s}_{k}.png'
                draw(c, s, rng).save(os.path.join(base, p))
                rows.append((p, c, s))
        lists[split] = rows
        with open(os.path.join(base, f'filenames_{split}.txt'), 'w') as f:
            f.writelines(p + '\n' for p, _, _ in rows)
    with open(os.path.join(base, 'label_train.txt'), 'w') as f:
        for i, (_, c, s) in enumerate(lists['train']):
            f.write(f'{i} 0 {VALUES["colour"].index(c)} 1 {VALUES["shape"].index(s)}\n')
    for split in ('valid', 'test'):
        q, cand = [], []
        for i, (_, c, s) in enumerate(lists[split]):
            k = i // len(kinds)
            a = k % 2  # each image labelled under one attribute: copies 0, 2 colour, copies 1, 3 shape
            line = f'{i} {a} {VALUES[ATTRS[a]].index(c if a == 0 else s)}\n'
            (q if k < 2 else cand).append(line)
        for kind, lines in (('query', q), ('candidate', cand)):
            with open(os.path.join(base, f'{kind}_{split}.txt'), 'w') as f:
                f.writelines(lines)
    meta = {n: {'ATTRIBUTES': ATTRS, 'ATTRIBUTES_NUM': {a: 2 for a in ATTRS}, 'ATTRIBUTES_VALUES': VALUES}
            for n in (name, *extra_datasets)}
    with open(os.path.join(root, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return lists


def in_process(entry, argv, escape_fails=False):
    """entry(argv), a script's main(), as its command line runs it (through csnlib.errors.run_script, as every
    script's `sys.exit(run_script(main))` does) but in this process: (exit status, stdout, stderr).
    What escapes is what a process would show: SystemExit's status, or a traceback on stderr and status 1; with
    escape_fails, anything that escapes fails the test instead (a user would have seen a traceback)."""
    import contextlib
    import io
    import signal
    import traceback

    from csnlib.errors import run_script
    argv = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # main.py installs its Ctrl-C flag
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = run_script(entry, argv)
            except SystemExit as e:
                if escape_fails:
                    raise
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except Exception:
                if escape_fails:
                    raise
                traceback.print_exc()
                code = 1
    except BaseException:
        if not escape_fails:
            raise
        pytest.fail(f'{entry.__module__} {argv} raised:\n{traceback.format_exc()}\n{err.getvalue()[-2000:]}')
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    if code is None and not escape_fails:
        code = 0  # what the script's sys.exit(main()) makes of None
    return code, out.getvalue(), err.getvalue()


def error_line(p, match=None, alone=False):
    """The user error a script printed, from a CompletedProcess (or (status, stdout, stderr)) of a script that failed
    as a user error must: exit status 2, no traceback, `error: ...` last on stderr (with alone: the only line there).
    Returns that line; with match, the message from its `error: ` line to the end (a DataError lists its bad lines
    under it), which must contain match."""
    code, _, err = (p.returncode, p.stdout, p.stderr) if hasattr(p, 'returncode') else p
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and 'Traceback' not in err, (code, err)
    if match is None:
        assert lines and lines[-1].startswith('error: '), err
        start = len(lines) - 1
    else:
        start = max((i for i, ln in enumerate(lines) if ln.startswith('error: ')), default=None)
        assert start is not None, err
    message = '\n'.join(lines[start:])
    assert match is None or match in message, (match, err)
    assert not alone or len(lines) == 1, err
    return message


def run_main(*args, cwd=None, check=True, timeout=600, env=None, real=False):
    """python main.py ARGS as a user runs it; returns a CompletedProcess. It runs main.main(ARGS) in this process (the
    command line's own code, without starting Python and importing torch again: seconds a call), or, with real=True
    or a cwd or env of its own, main.py in a new Python, for what only a process shows (a terminal, signals, the
    environment it starts with)."""
    argv = [str(a) for a in args]
    if real or cwd is not None or env is not None:
        cmd = [sys.executable, os.path.join(REPO, 'main.py'), *argv]
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})})
    else:
        import main
        cmd = ['main.py', *argv]
        p = subprocess.CompletedProcess(cmd, *in_process(main.main, argv))
    if check and p.returncode != 0:
        raise AssertionError(f'{cmd} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}')
    return p


# small and fast: 32 px, random init, batch 32
FAST = ['--no-pretrained', '--image-size', '32', '--batch-size', '32', '--num_traintriplets', '240',
        '--num_valtriplets', '120', '--num_testtriplets', '120', '--lr', '1e-3', '--log-interval', '2']


def checkpoint_of(args, notions=('colour', 'shape'), conditions=(0, 1)):
    """An untrained model of args (main.py's parsed flags) as main.py saves a checkpoint's model parts: the dict."""
    import torch

    from csnlib.builder import build_model
    torch.manual_seed(0)
    return {'args': dict(vars(args)), 'state_dict': build_model(args, len(notions)).state_dict(),
            'notions': list(notions), 'conditions': list(conditions)}


def save_checkpoint(path, variant, notions=('colour', 'shape'), conditions=(0, 1)):
    """An untrained 32-px model of main.py's flags + variant, saved as main.py saves a checkpoint's model parts."""
    import torch

    from csnlib.options import main_parser
    args = main_parser().parse_args(['--no-pretrained', '--image-size', '32', *variant])
    ckpt = checkpoint_of(args, notions, conditions)
    if variant == ['--learned']:  # some weights below zero: ReLU'd to 0, the rest non-binary
        ckpt['state_dict']['embednet.masks.weight'][:, :8] = -1.0
    torch.save({**ckpt, 'epoch': 1}, path)
    return str(path)


class Run(NamedTuple):
    """A trained run: its data folder, its run folder (checkpoint.pth.tar, model_best.pth.tar, metrics.jsonl, ...) and,
    on the fixture's own shapes, make_dataset's image names and labels (None on a dataset of the caller's)."""
    data: str
    run: Path
    names: list = None
    labels: list = None


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
    """trained_run(*flags, data=None, name=None) -> the Run of `main.py --data DATA --runs RUNS --name NAME FLAGS`,
    trained in this process the first time a test module asks for these flags and kept for its other tests. DATA is a
    coloured-shapes dataset of the fixture's own (make_dataset's defaults) unless data names another; anything but exit
    status 0 fails the test that asked, a traceback that escapes included. Each test module gets its own runs (the
    tests write into them: embeddings caches, pictures, test results)."""
    import main
    root = tmp_path_factory.mktemp('trained')
    done, shapes = {}, {}

    def train(*flags, data=None, name=None):
        flags = [str(f) for f in flags]
        key = (data, name, tuple(flags))
        if key not in done:
            if data is None and not shapes:
                shapes['data'] = str(root / 'shapes')
                shapes['names'], shapes['labels'] = make_dataset(shapes['data'])
            run = root / 'runs' / (name or f'run{len(done)}')
            argv = ['--data', data or shapes['data'], '--runs', str(run.parent), '--name', run.name, *flags]
            code, out, err = in_process(main.main, argv, escape_fails=True)
            assert code == 0, f'main.py {argv} exited {code}\n{out[-2000:]}\n{err[-2000:]}'
            done[key] = Run(data, run) if data else Run(shapes['data'], run, shapes['names'], shapes['labels'])
        return done[key]
    return train


# headless Chromium (test_loggers.py's dashboard, test_demo.py's page): no sandbox, nothing fetched on its own
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync', '--no-first-run']


def chromium_path():
    for path in (os.environ.get('CHROMIUM'), shutil.which('chromium'), shutil.which('chromium-browser'),
                 '/usr/bin/chromium'):
        if path and os.path.exists(path):
            return path
    return None


def pytest_collection_modifyitems(items):
    """reproduce.py's and setup.sh's tests run whole scripts: slow (their files are edited elsewhere, so marked
    here)."""
    for item in items:
        if item.path.name in ('test_reproduce.py', 'test_setup.py'):
            item.add_marker(pytest.mark.slow)
