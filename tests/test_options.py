"""Every numeric flag of the five scripts is checked at parse time: a value out of its range stops argparse with the
usage and one `PROG: error: argument --FLAG: must be ...` line, exit 2, before anything is imported or written."""
import argparse
import importlib
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from csnlib import options
from csnlib.options import Bounded

SCRIPTS = ['main.py', 'retrieve.py', 'reproduce.py', 'get_data.py', 'bench.py']
REQUIRED = {'retrieve.py': ['--resume', 'x.pth.tar'], 'reproduce.py': ['--data', 'd']}  # to parse a valid value


def parser_of(script):
    if script == 'main.py':
        return options.main_parser()
    return importlib.import_module(script[:-3]).build_parser()


def numeric_flags(script):
    """(action, its Bounded type) of every flag that takes a number; fails on a number flag without a range."""
    out, unchecked = [], []
    for action in parser_of(script)._actions:
        if not action.option_strings or action.type is None and not (
                isinstance(action.default, (int, float)) and not isinstance(action.default, bool)):
            continue
        if isinstance(action.type, Bounded):
            out.append(action)
        elif action.type in (int, float, None):  # None: a number default parsed as text
            unchecked.append(action.option_strings[0])
    assert not unchecked, f'{script}: numeric flags without a range check (use options.positive_int etc.): {unchecked}'
    return out


def in_range(t, x):
    """The range written out again, from the type's bounds."""
    return (x > t.low if t.low_open else x >= t.low) and (t.high is None or x <= t.high)


def expected_error(prog, action, value):
    t = action.type
    what = 'an integer' if t.kind is int else 'a number'
    bound = f'from {t.low} to {t.high}' if t.high is not None else f'{">" if t.low_open else ">="} {t.low:g}'
    return f'{prog}: error: argument {"/".join(action.option_strings)}: must be {what} {bound}, got {value}'


def check_stderr(err, prog, action, value):
    """argparse's pair, exactly: the usage (first line `usage: PROG ...`, continuation lines indented), then one error
    line naming the flag and its range, and nothing else."""
    lines = err.rstrip('\n').split('\n')
    assert lines[0].startswith(f'usage: {prog} '), err
    assert all(line.startswith(' ') for line in lines[1:-1]), err
    assert lines[-1] == expected_error(prog, action, value), err
    assert 'Traceback' not in err


def values_for(t):
    """0, a negative value, a non-number, and the bounds: (text, number or None)."""
    vals = [('0', 0), ('-1', -1), ('abc', None), ('', None), (str(t.low), t.low)]
    if t.kind is int:
        vals += [(str(t.low - 1), t.low - 1), ('1.5', None)]
    else:
        vals += [('nan', None), ('inf', None), ('1e-9', 1e-9)]
    if t.high is not None:
        vals += [(str(t.high), t.high), (str(t.high + 1), t.high + 1)]
    return vals


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_numeric_flag_rejects_values_out_of_its_range(script, capsys):
    flags = numeric_flags(script)
    assert len(flags) >= 2  # the walk found the flags
    prog = parser_of(script).prog
    checked = 0
    for action in flags:
        t = action.type
        for text, x in values_for(t):
            for opt in action.option_strings:  # every spelling of the flag
                argv = [f'{opt}={text}'] if text.startswith('-') or not text else [opt, text]
                if x is not None and in_range(t, x):
                    ns = parser_of(script).parse_known_args(REQUIRED.get(script, []) + argv)[0]
                    got = getattr(ns, action.dest)
                    got = got[0] if isinstance(got, list) else got  # nargs='+'
                    assert got == x and isinstance(got, t.kind), (script, argv, got)
                    continue
                with pytest.raises(SystemExit) as e:
                    parser_of(script).parse_args(argv)
                assert e.value.code == 2
                out, err = capsys.readouterr()
                assert out == ''
                check_stderr(err, prog, action, text if text and text == text.strip() else repr(text))
                checked += 1
    assert checked >= 3 * len(flags)


def test_the_ranges_of_main_py_flags_the_issue_names():
    want = {'--batch-size': (1, False), '--epochs': (1, False), '--start_epoch': (1, False), '--lr': (0, True),
            '--margin': (0, False), '--embed_loss': (0, False), '--mask_loss': (0, False), '--workers': (0, False),
            '--num_traintriplets': (1, False), '--num_valtriplets': (1, False), '--num_testtriplets': (1, False),
            '--dim_embed': (1, False), '--image-size': (1, False), '--log-interval': (1, False), '--seed': (0, False),
            '--dist-timeout': (0, True), '--visdom-port': (1, False), '--patience': (0, False), '--threads': (1, False)}
    got = {a.option_strings[0]: (a.type.low, a.type.low_open) for a in numeric_flags('main.py')}
    assert got == want
    assert options.port.high == 65535


def test_valid_values_parse_to_numbers():
    args = options.main_parser().parse_args(['--workers', '0', '--seed', '0', '--margin', '0', '--lr', '1e-4',
                                            '--visdom-port', '65535', '--batch-size', '3'])
    assert (args.workers, args.seed, args.margin, args.lr, args.visdom_port, args.batch_size) == \
        (0, 0, 0.0, 1e-4, 65535, 3)
    assert isinstance(args.batch_size, int) and isinstance(args.margin, float)


def test_get_data_split_is_checked_at_parse_time(capsys):
    import get_data
    assert get_data.build_parser().parse_args(['--split', '0.8,0.1,0.1']).split == '0.8,0.1,0.1'
    for bad in ['0.5,0.5', '0,0.5,0.5', 'a,b,c', '0.7,-0.1,0.4']:
        with pytest.raises(SystemExit) as e:
            get_data.build_parser().parse_args(['--split', bad])
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f'{get_data.build_parser().prog}: error: argument --split: expected three fractions train,val,test such as '
            f'0.7,0.15,0.15 (train > 0, none < 0), got {bad!r}')


def test_reproduce_checks_the_flags_it_passes_on_to_main_py(capsys, tmp_path, monkeypatch):
    import reproduce
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reproduce, 'reproduce', lambda *a: pytest.fail('reproduce() ran'))
    for argv, line in [(['--lr', '-1'], 'argument --lr: must be a number > 0, got -1 (passed on to main.py)'),
                       (['--batch-size', '0'], 'argument --batch-size/--batch_size: must be an integer >= 1, got 0 '
                                               '(passed on to main.py)'),
                       (['--seeds', '1', '1'], '--budgets and --seeds take distinct values')]:
        with pytest.raises(SystemExit) as e:
            reproduce.main(['--data', 'd', *argv])
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == f'{reproduce.build_parser().prog}: error: {line}'
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize('script', SCRIPTS)
def test_the_real_command_line_stops_the_same_way_and_writes_nothing(script, tmp_path):
    """Two real runs per script (first and last numeric flag, a negative value and a non-number), side by side."""
    flags = numeric_flags(script)
    cases = [(flags[0], '-3'), (flags[-1], 'ten')]
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, script), action.option_strings[-1], value],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for action, value in cases]
    for (action, value), p in zip(cases, procs):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 2, err
        assert out == ''
        check_stderr(err, script, action, value)
        assert re.search(re.escape(action.option_strings[-1]), err.splitlines()[-1])
    assert os.listdir(tmp_path) == []


def test_bounded_types_name_themselves_in_argparse_messages():
    p = argparse.ArgumentParser(prog='x')
    p.add_argument('--n', type=options.int_range(2, 5))
    assert p.parse_args(['--n', '5']).n == 5
    with pytest.raises(SystemExit):
        p.parse_args(['--n', '6'])
    assert repr(options.positive_float) == '<a number > 0>'
