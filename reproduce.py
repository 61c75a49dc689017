"""Test the CSN paper's claims on a dataset: every model, every training budget, every seed, then one report.

    python reproduce.py --data data/fonts --budgets 1000 3000 10000 --seeds 1 2 3 4 5 --no-pretrained --image-size 32

First a learning-rate sweep on the validation split (every model at the middle budget, the first seed, each rate of
--sweep-lrs), then with --checks-at two checks of the protocol (task-specific networks trained alone, one backbone call
per step or three), then every model, budget and seed at the best common rate, each run through main.py (one process
each, as a user would) until its validation accuracy stops improving (--patience; --epochs is the cap; --seen N trains
every run on the same number of triplets instead), then `main.py --test` of its best checkpoint. Each finished run
leaves a small record, RESULTS/RUN.json (its args, per-epoch metrics, test results, stop reason, learned masks and
their start), from which the same folder gets: report.md (tables, the sweep, the claims with their confidence
intervals), reproduce.json, curve.png and masks.png. Run the same command again after an interruption, here or on
another machine: runs with a record are not trained again, a stopped run continues from its checkpoint. --report-only
writes the report from the records alone (no dataset or checkpoint needed). The statistics, the claims' rules and the
report's text are in csnlib/claims.py; this script trains, tests and keeps the records.
"""
import argparse
import collections
import contextlib
import ctypes
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np

from csnlib.atomic import atomic_open, open_append
from csnlib.claims import (
    LEAKY,
    MODELS,
    PAPER_MODELS,
    TITLE,
    claim_a,
    claim_b,
    claim_c,
    claim_d,
    claim_e,
    false_verdict_rate,
    lr_tag,
    machine_tag,
    markdown,
    mean_std,
    paired,
    successors_against_csn,
    summarise,
    sweep_markdown,
    verdict,
    write_curve,
    write_mask_figure,
)
from csnlib.errors import UserError, run_script
from csnlib.run_lock import RunInUse, RunLock

REPO = os.path.dirname(os.path.abspath(__file__))
# (short name, row of the table, main.py flags, the paper's Zappos50k triplet prediction error in %)
# main.py flags that change what a run learns: a run or record made with other values is not reused
SETTINGS = ('num_traintriplets', 'seed', 'dim_embed', 'batch_size', 'lr', 'margin', 'embed_loss', 'mask_loss',
            'image_size', 'conditions', 'no_pretrained', 'weights', 'num_valtriplets', 'hflip', 'three_forwards',
            'threads', 'conv_wgrad')
SET_HERE = ('--model', '--learned', '--prein', '--name', '--resume', '--test', '--runs', '--epochs', '--seed',
            '--num_traintriplets', '--num-traintriplets', '--pictures', '--no-pictures', '--patience')
SWEEP_LRS = [1e-4, 3e-4, 1e-3, 3e-3]
STUDY_LOCK = '.reproduce.lock'  # held by the reproduce.py that trains and tests a run (main.py holds its own)
WAIT_S = 30.0  # how often a copy that waits for the others' sweep runs looks again


def build_parser():
    from csnlib.options import nonneg_int, positive_float, positive_int
    p = argparse.ArgumentParser(
        description='Train and test the CSN paper\'s four models over training budgets and seeds and check the '
                    'paper\'s claims; other flags are passed on to main.py (e.g. --no-pretrained --image-size 64).',
        allow_abbrev=False)
    a = p.add_argument
    a('--data', default=None, metavar='DIR', help='dataset folder (needed unless --report-only) (default: none)')
    a('--budgets', '--num_traintriplets', '--num-traintriplets', dest='budgets', nargs='+', type=positive_int,
      default=None, metavar='N',
      help='training triplets in total over the notions, one study point each; the same triplets for every model '
           'at a budget (default: 100000; --report-only: the study\'s)')
    a('--seeds', '--seed', dest='seeds', nargs='+', type=nonneg_int, default=None, metavar='S',
      help='seeds: each model and budget is trained once per seed (subset, order, initialisation) (default: 1; '
           '--report-only: the study\'s)')
    a('--more-seeds', nargs='+', type=nonneg_int, default=[], metavar='S',
      help='seeds trained at the budgets of --more-seeds-at only, after the others (e.g. five seeds there, three '
           'elsewhere) (default: none)')
    a('--more-seeds-at', nargs='+', type=positive_int, default=None, metavar='N',
      help='the budgets that --more-seeds are trained at (default: the largest budget)')
    a('--order', choices=['seed', 'budget'], default='seed',
      help='the order the grid is trained in: seed = seed by seed, the largest budget first within a seed, so that a '
           'partial study spans the budgets; budget = budget by budget from the smallest, every seed of a budget '
           'before the next (to extend a finished study to larger budgets, each with its interval as soon as it is '
           'done) (default: seed)')
    a('--released-scenet-at', type=positive_int, default=None, metavar='N',
      help='also train SCE-Net with the released code\'s condition branch (on the triplet in role order, which reads '
           'the answer from the slot order) at budget N for the seeds trained there, to show how much the order gives '
           'it; never in the sweep or the claims (default: off)')
    a('--patience', type=nonneg_int, default=5,
      help='train each run until its validation accuracy has not improved for this many epochs (main.py --patience); '
           '0 trains every run for --epochs (default: 5)')
    a('--epochs', type=positive_int, default=100, help='the cap on every run\'s epochs (default: 100)')
    a('--seen', type=positive_int, default=None, metavar='N',
      help='equal compute instead of a plateau: train every run on about N triplets in all, a budget B for '
           'max(1, round(N / B)) epochs (default: off)')
    a('--sweep-lrs', nargs='+', type=positive_float, default=SWEEP_LRS, metavar='LR',
      help='learning rates of the sweep; the study uses the one with the best mean validation accuracy over the models '
           f'(default: {" ".join(map(str, SWEEP_LRS))}; skipped when --lr is passed on to main.py)')
    a('--rate', type=positive_float, default=None, metavar='LR',
      help='train the study at LR although the sweep\'s rule may pick another: the sweep still runs and the report '
           'shows both, so that a study whose rule changed its pick (e.g. once a model was found to read the answer) '
           'keeps its runs; check its verdicts at the other rate in a study of their own (--lr there) '
           '(default: the sweep\'s pick)')
    a('--sweep-budget', type=positive_int, default=None, metavar='N',
      help='the budget the sweep trains at (default: the middle of --budgets)')
    a('--sweep-only', action='store_true', help='stop after the sweep, with its report (default: off)')
    a('--runs', default='runs', metavar='DIR', help='folder of the runs (default: runs)')
    a('--results', default=None, metavar='DIR',
      help='folder of the runs\' records, meant to be committed (default: results/DATASET, e.g. results/fonts)')
    a('--prefix', default='repro', help='runs are named PREFIX_MODEL_nBUDGET_sSEED_lrLR (default: repro)')
    a('--models', nargs='+', default=None, choices=[m[0] for m in MODELS if m[0] not in LEAKY], metavar='MODEL',
      help='which models to run: triplet task csn_fixed csn_learned, and CSN\'s successors asen scenet (SCE-Net with '
           'its branch on pairs of images; the released branch: --released-scenet-at) (default: the paper\'s four)')
    a('--out-dir', default=None, metavar='DIR',
      help='report folder: report.md, reproduce.json, curve.png, masks.png (default: the --results folder, where they '
           'are committed beside the records they come from)')
    a('--report-only', action='store_true',
      help='train nothing: write the report from the records in --results alone (default: off)')
    a('--no-probe', action='store_true',
      help='leave out claim (e), the linear probes on frozen features (default: off)')
    a('--one-forward', action='store_true',
      help='train with one backbone call per step for anchors, fars and closes (main.py\'s default) instead of the '
           'original\'s three (default: three calls, passed on to main.py as --three-forwards)')
    a('--checks-at', type=positive_int, default=None, metavar='N',
      help='first check two choices of the protocol at N training triplets, over --seeds: the task-specific networks '
           'each trained alone on its notion\'s triplets with the full batch against their joint training, and the '
           'paper\'s models with the other forward arithmetic (one call or three) (default: off)')
    return p


# ------------------------------------------------------------------------------------------------------- the runs

def epochs_for(args, budget):
    return max(1, round(args.seen / budget)) if args.seen else args.epochs




def run_name(args, model, budget, seed, lr):
    return f'{args.prefix}_{model}_n{budget}_s{seed}_lr{lr_tag(lr)}'


def _mtime(path):
    return os.stat(path).st_mtime if os.path.exists(path) else None


def plan(run_dir, epochs):
    """What a run needs: 'train' (nothing there), 'resume' (stopped before `epochs` and not at a plateau), 'test'
    (trained, no up-to-date test results) or 'reuse'. Returns (action, the checkpoint's dict or None)."""
    from csnlib.checkpoint import load_checkpoint
    ckpt_path = os.path.join(run_dir, 'checkpoint.pth.tar')
    if not os.path.exists(ckpt_path):
        return 'train', None
    ckpt = load_checkpoint(ckpt_path)
    if ckpt['next_epoch'] <= epochs and ckpt.get('stopped') != 'plateau':
        return 'resume', ckpt
    best, results = (_mtime(os.path.join(run_dir, 'model_best.pth.tar')),
                     _mtime(os.path.join(run_dir, 'test_results.json')))
    return ('reuse' if results is not None and best is not None and results >= best else 'test'), ckpt


def check_settings(where, stored, wanted):
    """Refuse to reuse a run or record made with other settings than this study's."""
    diff = [f'--{k} {stored.get(k)!r} (asked: {v!r})' for k, v in wanted.items() if k in stored and stored[k] != v]
    if diff:
        raise UserError(f'{where} was trained with {", ".join(diff)}; use another --prefix, --runs or --results, or '
                        f'delete {where}')


def run_main(argv, log_path):
    """main.py ARGV in a child process, its output shown and kept in log_path. Returns (exit status, seconds).
    SIGINT and SIGTERM sent to this process are passed on to the child, which saves its mid-epoch checkpoint and exits;
    then this process stops too (KeyboardInterrupt: exit status 130)."""
    cmd = [sys.executable, os.path.join(REPO, 'main.py'), *argv]
    print(f'\n$ {shlex.join(cmd[1:])}', flush=True)
    t0 = time.time()
    received, proc = [], None

    def forward(signum, frame):
        received.append(signum)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signum)

    # the child has its own session, so a Ctrl-C at the terminal reaches it once, through this process
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with open_append(log_path, 'log') as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True,
                                    env={**os.environ, 'PYTHONUNBUFFERED': '1'},
                                    preexec_fn=functools.partial(die_with, os.getpid()))
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
            rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if received:
        print(f'reproduce.py: {signal.Signals(received[0]).name} passed on to main.py (exit status {rc}); run the same '
              f'command again to continue', file=sys.stderr)
        raise KeyboardInterrupt
    return rc, time.time() - t0


def die_with(parent):
    """In main.py's process before it starts (Linux): SIGTERM when reproduce.py dies, even by kill -9, so main.py
    saves a checkpoint and exits (a copy that remains takes the run over) instead of going on orphaned."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def main_settings(args, passthrough):
    """The main.py settings every run shares, as main.py parses them (the passed-through flags included), and whether
    --lr was passed on."""
    from csnlib import options
    for flag in SET_HERE:
        if any(t == flag or t.startswith(flag + '=') for t in passthrough):
            raise UserError(f'reproduce.py: {flag} is set by reproduce.py itself; leave it out')
    argv = ['--data', args.data or 'data', *passthrough]
    parser = options.main_parser()
    try:
        m = parser.parse_args(argv)
    except SystemExit:
        raise UserError(f'reproduce.py: main.py does not accept {shlex.join(passthrough)}') from None
    settings = {k: getattr(m, k) for k in SETTINGS if k not in ('num_traintriplets', 'seed')}
    return settings, 'lr' in options.explicit_flags(parser, passthrough)


def grid(args, lr):
    """The study's runs in the order they are trained: seed by seed, so a partial study already spans the budgets,
    the largest budget first (its first seed also writes the pictures); --more-seeds at --more-seeds-at only; the
    released SCE-Net (--released-scenet-at) after the others at its budget."""
    more_at = args.more_seeds_at or [max(args.budgets)]
    released = ['scenet_triplet'] if args.released_scenet_at else []
    models = lambda budget: ([m[0] for m in MODELS if m[0] in args.models]
                             + (released if budget == args.released_scenet_at else []))
    points = [(seed, budget) for seed in [*args.seeds, *args.more_seeds]
              for budget in sorted(args.budgets, reverse=True) if budget in more_at or seed in args.seeds]
    if getattr(args, 'order', 'seed') == 'budget':
        seeds = [*args.seeds, *args.more_seeds]
        points.sort(key=lambda p: (p[1], p[0] in args.more_seeds, seeds.index(p[0])))
    return [(model, budget, seed, lr) for seed, budget in points for model in models(budget)]


def sweep_grid(args):
    return [(model, args.sweep_budget, args.seeds[0], lr) for lr in args.sweep_lrs
            for model in [m[0] for m in MODELS if m[0] in args.models and m[0] not in LEAKY]]


# a check's run: its name, main.py flags added, flags passed on, settings, and how many times the study's epochs and
# patience it gets (the task-specific networks trained alone take a share of the steps per epoch)
Variant = collections.namedtuple('Variant', 'key flags passthrough settings scale')


def other_forwards(passthrough):
    """The flags passed on to main.py with the other forward arithmetic: one backbone call per step or three."""
    if '--three-forwards' in passthrough:
        return [t for t in passthrough if t != '--three-forwards'], 'one'
    return [*passthrough, '--three-forwards'], 'three'


def check_runs(args, passthrough, lr, notions):
    """The runs of --checks-at, seed by seed: (model, budget, seed, lr, Variant or None). The study's own runs at that
    budget (reused when it is one of --budgets) are compared with (1) the task-specific networks trained each alone,
    one run per notion on that notion's share of the budget (main.py --conditions NOTION: budget / notions triplets of
    it, the full batch) and (2) the paper's models with the other forward arithmetic."""
    b = args.checks_at
    other, word = other_forwards(passthrough)
    paper = [m for m in PAPER_MODELS if m in args.models]
    out = []
    wanted = main_settings(args, passthrough)[0]['conditions']  # a --conditions subset passed on, or None
    alone = without_conditions(passthrough)
    alone_notions = wanted or notions
    for seed in args.seeds:
        out += [(m, b, seed, lr, None) for m in paper]
        if 'task' in paper:
            for n in alone_notions:
                extra = ['--conditions', n]
                # the joint run's triplets of notion n (main.py draws every notion as the joint run does), a
                # len(alone_notions)-th of its steps per epoch: as many epochs more, for the cap and the patience alike
                out.append(('task', b, seed, lr, Variant(f'task-alone-{n}', extra, alone,
                                                         main_settings(args, [*alone, *extra])[0],
                                                         len(alone_notions))))
        out += [(m, b, seed, lr, Variant(f'{m}-{word}-forward', [], other, main_settings(args, other)[0], 1))
                for m in paper]
    return out


def without_conditions(passthrough):
    """The flags passed on to main.py less a --conditions subset (and its notions)."""
    out, skipping = [], False
    for t in passthrough:
        if t == '--conditions':
            skipping = True
        elif skipping and not t.startswith('-'):
            continue
        elif not t.startswith('--conditions='):
            skipping = False
            out.append(t)
    return out


def study_runs(args, passthrough, lr):
    """The checks' runs (--checks-at), then the grid's, each once: [(model, budget, seed, lr, pictures, Variant or
    None)]. The largest budget's first seed writes the pictures."""
    from triplet_image_loader import load_dataset_info
    top, first_seed = max(args.budgets), args.seeds[0]
    checks = check_runs(args, passthrough, lr, load_dataset_info(args.data).notions) if args.checks_at else []
    runs, where = [], {}
    for model, budget, seed, run_lr, variant in [*checks, *((*g, None) for g in grid(args, lr))]:
        name = run_name(args, variant.key if variant else model, budget, seed, run_lr)
        pictures = variant is None and budget == top and seed == first_seed
        if name in where:  # a check's run that is also the grid's
            i = where[name]
            runs[i] = (*runs[i][:4], runs[i][4] or pictures, runs[i][5])
        else:
            where[name] = len(runs)
            runs.append((model, budget, seed, run_lr, pictures, variant))
    return runs


def name_of(args, run):
    """The name of a run of study_runs."""
    m, b, s, lr, _, v = run
    return run_name(args, v.key if v else m, b, s, lr)


def train_runs(args, passthrough, settings, runs, say_busy=True):
    """Train and test the runs here, but those that another copy of the command holds: their names."""
    busy = []
    for m, b, s, lr, pictures, v in runs:
        if train_and_test(args, passthrough, settings, m, b, s, lr, pictures, v) == 'busy':
            busy.append(name_of(args, (m, b, s, lr, pictures, v)))
            if say_busy:
                print(f'{busy[-1]}: left to the copy of this command that is training it', flush=True)
    return busy


def checks_summary(args, passthrough, lr):
    """What --checks-at found, from the records: {'budget', 'task_alone': {...}, 'forwards': {...}} or None."""
    if not args.checks_at or lr is None:
        return None
    b, tag = args.checks_at, lr_tag(lr)
    rec = lambda key, seed: read_record(record_path(args, run_name(args, key, b, seed, lr)))
    out = {'budget': b, 'task_alone': None, 'forwards': {}}
    alone = {'seeds': [], 'values': [], 'joint': [], 'per_notion': []}
    for seed in args.seeds:
        joint = rec('task', seed)
        parts = [read_record(os.path.join(args.results, f)) for f in sorted(os.listdir(args.results))
                 if f.startswith(f'{args.prefix}_task-alone-') and f.endswith(f'_n{b}_s{seed}_lr{tag}.json')]
        if joint is None or len(parts) != len(joint['test']['per_notion']):
            continue
        n = sum(r['test']['triplets'] for r in parts)
        alone['seeds'].append(seed)
        alone['values'].append(sum(r['test']['accuracy'] * r['test']['triplets'] for r in parts) / n)
        alone['joint'].append(joint['test']['accuracy'])
        alone['per_notion'].append({k: v for r in parts for k, v in r['test']['per_notion'].items()})
        alone.setdefault('epochs_trained', []).append([r['epochs_trained'] for r in parts])
        alone.setdefault('stopped', []).append([r['stopped'] for r in parts])
    if alone['seeds']:
        pair = paired({'seeds': alone['seeds'], 'values': alone['values']},
                      {'seeds': alone['seeds'], 'values': alone['joint']})
        out['task_alone'] = {**alone, 'pair': pair, 'verdict': verdict(pair) if pair else 'inconclusive'}
    _, other = other_forwards(passthrough)
    for m in (m for m in PAPER_MODELS if m in args.models):
        seeds, this, that = [], [], []
        for seed in args.seeds:
            r0, r1 = rec(m, seed), rec(f'{m}-{other}-forward', seed)
            if r0 is not None and r1 is not None:
                seeds.append(seed), this.append(r0['test']['accuracy']), that.append(r1['test']['accuracy'])
        if seeds:
            pair = paired({'seeds': seeds, 'values': that}, {'seeds': seeds, 'values': this})
            out['forwards'][m] = {'seeds': seeds, 'study': this, 'other': that, 'pair': pair,
                                  'verdict': verdict(pair) if pair else 'inconclusive'}
    out['other_forwards'] = other
    return out if out['task_alone'] or out['forwards'] else None




def record_path(args, name):
    return os.path.join(args.results, f'{name}.json')


def read_record(path):
    """A run's record, or None when there is none (a half-written one cannot exist: records are written atomically)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'{path}: not a readable record ({e}); delete it to train the run again') from None


def record_done(rec, epochs):
    """A record finishes its run unless the run stopped at a smaller cap than this study's."""
    return not (rec['stopped'] in ('cap', 'seen') and rec['epochs_cap'] < epochs)


def recorded(args, name, wanted, epochs):
    """Is the run's record there (made with the study's settings) and finished?"""
    rec = read_record(record_path(args, name))
    if rec is not None:
        check_settings(record_path(args, name), rec['args'], wanted)
    return rec is not None and record_done(rec, epochs)


def train_and_test(args, passthrough, settings, model, budget, seed, lr, pictures, variant=None):
    """One run: nothing when its record is there, else train (or continue) and test it, then write its record.
    variant: a check's run of `model` (a Variant: its name, main.py flags added, flags passed on, settings).
    Returns 'recorded', 'done', or 'busy' when another reproduce.py holds the run (it is left to that process)."""
    if variant is not None:
        passthrough, settings = variant.passthrough, variant.settings
    name = run_name(args, variant.key if variant else model, budget, seed, lr)
    epochs = epochs_for(args, budget) * (variant.scale if variant else 1)
    wanted = {**settings, 'lr': lr, 'num_traintriplets': budget, 'seed': seed}
    if recorded(args, name, wanted, epochs):
        print(f'{name}: recorded, not trained again', flush=True)
        return 'recorded'
    run_dir = os.path.join(args.runs, name)
    with contextlib.ExitStack() as claim:
        try:  # several copies of the same command share the study: each run is trained by the one that claims it
            claim.enter_context(RunLock(run_dir, 'trains and tests it for reproduce.py', STUDY_LOCK))
        except RunInUse:
            return 'busy'
        if recorded(args, name, wanted, epochs):  # finished by another process since the look above
            print(f'{name}: recorded, not trained again', flush=True)
            return 'recorded'
        wait_for_main(run_dir, name)
        run_one(args, passthrough, model, budget, seed, lr, pictures, variant, name, epochs, wanted)
    return 'done'


def wait_for_main(run_dir, name):
    """Wait until no main.py holds the run folder: one that a killed copy of this command started saves its
    checkpoint and exits (die_with) before this copy continues the run."""
    said = False
    while True:
        try:
            with RunLock(run_dir, 'is looked at by reproduce.py'):
                return
        except RunInUse as e:
            if not said:
                print(f'{name}: waiting: {e}'.split('. Wait for it')[0] + ' (a main.py left by a copy of this command '
                      'that stopped saves its checkpoint and exits)', flush=True)
                said = True
            time.sleep(1)


def run_one(args, passthrough, model, budget, seed, lr, pictures, variant, name, epochs, wanted):
    """train_and_test's work on a run it holds: train or continue, test, write the record (and the probes)."""
    run_dir = os.path.join(args.runs, name)
    action, ckpt = plan(run_dir, epochs)
    if ckpt is not None:
        check_settings(run_dir, ckpt.get('args', {}), wanted)
    os.makedirs(run_dir, exist_ok=True)
    times_path = os.path.join(run_dir, 'reproduce_times.json')
    times = read_times(times_path) if action != 'train' else {'train_s': 0.0}
    log_path = os.path.join(run_dir, 'reproduce.log')
    said = dict(train='training', resume='resuming its checkpoint', test='testing its best checkpoint',
                reuse='finished, reused')[action]
    print(f'{name}: {said}', flush=True)
    flags = next(m[2] for m in MODELS if m[0] == model) + (variant.flags if variant else [])
    patience = 0 if args.seen else args.patience * (variant.scale if variant else 1)
    if action in ('train', 'resume'):
        common = ['--data', args.data, '--epochs', str(epochs), '--patience', str(patience), *passthrough]
        argv = (['--resume', os.path.join(run_dir, 'checkpoint.pth.tar'), *common] if action == 'resume' else
                ['--runs', args.runs, '--name', name, '--num_traintriplets', str(budget), '--seed', str(seed),
                 '--lr', str(lr), *flags, *common])
        rc, seconds = run_main(argv, log_path)
        times['train_s'] += seconds
        write_json(times_path, times)
        if rc == 130:
            raise KeyboardInterrupt
        if rc != 0:
            raise UserError(f'training {name} failed (exit status {rc}; see {log_path}). Run the same command again '
                            f'to continue from its last checkpoint.')
    if action != 'reuse':
        best = os.path.join(run_dir, 'model_best.pth.tar')
        if not os.path.exists(best):
            raise UserError(f'{run_dir} has no model_best.pth.tar: no epoch of {name} finished')
        rc, seconds = run_main(['--test', '--resume', best, '--data', args.data, *passthrough,
                                '--pictures' if pictures else '--no-pictures'], log_path)
        if rc != 0:
            raise UserError(f'testing {name} failed (exit status {rc}; see {log_path})')
        times['test_s'] = seconds
        write_json(times_path, times)
    rec = make_record(args, run_dir, variant.key if variant else model, budget, seed, lr, epochs, patience)
    write_json(record_path(args, name), rec)
    if budget == max(args.budgets) and variant is None and not args.no_probe:
        probe_record(args, rec)  # now, while its checkpoint is on this machine: the report reads it from the record
    print(f'{name}: record {record_path(args, name)}', flush=True)


def read_times(path):
    try:
        with open(path) as f:
            return {'train_s': 0.0, **json.load(f)}
    except (OSError, ValueError):
        return {'train_s': 0.0}


def write_json(path, obj, indent=None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent)
        f.write('\n')


def read_metrics(path):
    """metrics.jsonl's epochs; a partial last line (a kill mid-write) is left out."""
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    break
    return out


def make_record(args, run_dir, model, budget, seed, lr, epochs, patience):
    """What outlives the run folder: args, per-epoch metrics, test results (with the order check), stop reason, masks
    and their start, the dataset's name and fingerprint."""
    from csnlib import runtime
    from csnlib.checkpoint import load_checkpoint
    from triplet_image_loader import load_dataset_info
    ck = load_checkpoint(os.path.join(run_dir, 'checkpoint.pth.tar'))
    best = load_checkpoint(os.path.join(run_dir, 'model_best.pth.tar'))
    with open(os.path.join(run_dir, 'test_results.json')) as f:
        res = json.load(f)
    stopped = ck.get('stopped') or 'cap'
    if args.seen and stopped == 'cap':
        stopped = 'seen'
    masks = masks_of(best['state_dict'], best['args'])
    times = read_times(os.path.join(run_dir, 'reproduce_times.json'))
    return {'run': os.path.basename(run_dir), 'model': model, 'budget': budget, 'seed': seed, 'lr': lr,
            'args': {k: v for k, v in ck['args'].items() if isinstance(v, (str, int, float, bool, list, type(None)))},
            'notions': ck.get('notions'), 'metrics': read_metrics(os.path.join(run_dir, 'metrics.jsonl')),
            'test': {k: res.get(k) for k in ('accuracy', 'per_notion', 'triplets', 'mAP', 'mAP_per_notion',
                                              'pml_precision_at_1', 'pml_map_at_r', 'pml_precision_at_1_per_notion',
                                              'pml_map_at_r_per_notion', 'protocol_mAP', 'protocol_mAP_per_notion',
                                              'order_check')},
            'stopped': stopped, 'epochs_trained': ck['next_epoch'] - 1, 'best_epoch': ck['best_epoch'],
            'best_val_acc': ck['best_acc'], 'epochs_cap': epochs, 'patience': patience,
            'parameters': count_parameters(best['state_dict']), 'masks': masks,
            'masks_start': start_masks(ck['args'], len(ck.get('notions') or [])) if masks is not None else None,
            'train_s': round(times.get('train_s', 0.0), 1), 'test_s': round(times.get('test_s', 0.0), 1),
            'machine': runtime.machine_info(), 'dataset': dataset_tag(load_dataset_info(args.data))}


def dataset_tag(info):
    """What a record says of its data: the dataset's name, sizes and fingerprint (triplet_image_loader)."""
    from triplet_image_loader import dataset_fingerprint
    return {'name': info.name, 'images': len(info.filenames), 'sha256': dataset_fingerprint(info)}


def count_parameters(state_dict):
    """Weights of a model (BatchNorm running statistics left out)."""
    return int(sum(v.numel() for k, v in state_dict.items()
                   if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))))


def masks_of(state_dict, run_args):
    """The masks m_c as a (C, D) list, through ReLU where they are learned (CSN's --learned or --prein, SCE-Net's K
    masks); None for models without masks."""
    import torch
    w = state_dict.get('embednet.masks.weight')
    if w is None:
        return None
    learned = run_args.get('learned') or run_args.get('prein') or run_args.get('model') == 'scenet'
    return (torch.relu(w) if learned else w).float().tolist()


def start_masks(run_args, n_notions):
    """The masks a run started from, rebuilt as main.py builds its model: every seed drawn, then the model."""
    from csnlib.builder import build_model
    from csnlib.runtime import seed_everything
    ns = argparse.Namespace(**{'learned_rows': None, 'three_forwards': False, **run_args})
    seed_everything(run_args['seed'])
    model = build_model(ns, n_notions, pretrained=False)
    return masks_of(model.state_dict(), run_args)




# ----------------------------------------------------------------------------------------------------------- probes

NO_LABEL = 'no label for a probe in this dataset (fonts: the test families and the pitch; Zappos: the brand)'


def ensure_probes(args, rows, budget):
    """Claim (e)'s probes on every run at `budget` but the task-specific networks (a backbone per notion), and on a
    random backbone per seed: read from the records, computed and added to them where a checkpoint is there (a record's
    "probe" is {} where the dataset has no label to probe). Returns ({probe: {model: point}} or None, a note, the runs
    left out: no probe in their record and no checkpoint here to compute it)."""
    out, tasks, info, missing, rows_random = {}, None, None, [], {}
    for (model, _, _), r in sorted(rows.items()):
        if model != 'task' or r['budget'] != budget or 'subspaces' in r:
            continue
        probe_record(args, r)  # the task-specific networks' matrix, where their checkpoint is here
    runs = [(k, r) for k, r in sorted(rows.items()) if k[1] == budget and k[0] != 'task']
    for (model, _, seed), r in runs:
        stale = 'probe' not in r or (r['probe'] and 'pitch_splits' not in r['probe']) or (
            'subspaces' not in r and not model.startswith('scenet'))
        if stale and probe_record(args, r):
            pass  # probed here (again: with the splits and the matrix), while its checkpoint is on this machine
        elif 'probe' not in r:
            print(f'note: {r["run"]} has no probe in its record and its checkpoint is not here: claim (e) goes on '
                  f'without it (the report names it)', flush=True)
            missing.append(r['run'])
            continue
        for name, acc in r['probe'].items():
            out.setdefault(name, {}).setdefault(model, {})[seed] = acc
    if runs and all(r.get('probe') == {} for _, r in runs):
        return None, NO_LABEL, missing
    for seed in sorted({k[2] for k, _ in runs}) if out else []:
        rargs = runs[0][1]['args']
        name = untrained_name(args, seed, rargs)
        rec = read_record(record_path(args, name))
        if args.data is not None and (rec is None or 'pitch_splits' not in rec['probe'] or 'subspaces' not in rec):
            if tasks is None:
                info, tasks = probe_setup(args)
            from csnlib import probe
            # the untrained reference: a random backbone (the probes), and the fixed masks on it (the matrix's rows)
            fixed = {**rargs, 'model': 'csn', 'learned': False, 'prein': False}
            rec = {'run': name, 'seed': seed, 'image_size': rargs['image_size'], 'dim_embed': rargs['dim_embed'],
                   'probe': probe.probe_random_all(rargs, info, tasks, seed),
                   **({'subspaces': probe.random_notion_label_matrix(fixed, info, seed)}
                      if probe.matrix_task(info) is not None else {})}
            write_json(record_path(args, name), rec)
        if rec is None:
            continue
        rows_random[seed] = rec
        for pname, acc in rec['probe'].items():
            out.setdefault(pname, {}).setdefault('random', {})[seed] = acc
    if not out:
        return None, 'no probe: no record holds one, and no checkpoint or dataset is here to compute it', missing
    points = {pname: {m: probe_point(v) for m, v in per.items()} for pname, per in out.items()}
    return points, None, sorted(missing)


def untrained_name(args, seed, run_args):
    """The record of the untrained reference for a seed and a run's image size and embedding size."""
    return f'{args.prefix}_untrained_s{seed}_size{run_args["image_size"]}_d{run_args["dim_embed"]}'


def probe_point(by_seed):
    """{seed: accuracy, or a list of one accuracy per split} -> a point of the claims (values per seed: the mean over
    the splits; 'splits': each seed's list, where there are splits)."""
    seeds = sorted(by_seed)
    values = [float(np.mean(by_seed[s])) for s in seeds]
    point = {'seeds': seeds, 'values': values, **dict(zip(('mean', 'std'), mean_std(values))), 'n': len(seeds)}
    if all(isinstance(by_seed[s], list) for s in seeds):
        point['splits'] = [by_seed[s] for s in seeds]
    return point


def probe_record(args, rec):
    """Add to a run's record what its best checkpoint's probes give: claim (e)'s ("probe", {} where the dataset has
    no label to probe; not for the task-specific networks, a backbone per notion) and the notion x label matrix
    ("subspaces", where the dataset has labels for its notions; SCE-Net has none). False when its checkpoint or the
    dataset is not here."""
    best = os.path.join(args.runs, rec['run'], 'model_best.pth.tar')
    if args.data is None or not os.path.exists(best):
        return False
    from csnlib import probe
    from csnlib.checkpoint import load_checkpoint
    info, tasks = probe_setup(args)
    ckpt = load_checkpoint(best)
    if rec['model'] != 'task':
        rec['probe'] = probe.probe_checkpoint_all(ckpt, info, tasks) if tasks else {}
    if not rec['model'].startswith('scenet') and probe.matrix_task(info) is not None:
        rec['subspaces'] = probe.notion_label_matrix(ckpt, info)
    write_json(record_path(args, rec['run']), rec)
    return True


def probe_setup(args):
    from csnlib import probe
    from triplet_image_loader import load_dataset_info
    info = load_dataset_info(args.data)
    return info, probe.probe_tasks(info, n_splits=probe.PITCH_SPLITS)


# ----------------------------------------------------------------------------------------------------------- report

def collect(args, grid_runs):
    """The records of the grid's runs: {(model, budget, seed): record}."""
    rows = {}
    for model, budget, seed, lr in grid_runs:
        rec = read_record(record_path(args, run_name(args, model, budget, seed, lr)))
        if rec is not None and record_done(rec, epochs_for(args, budget)):
            rows[(model, budget, seed)] = rec
    return rows


def sweep_table(args):
    """The sweep's records: ({lr: {model: record}}, the chosen rate or None, why)."""
    if not args.sweep_lrs:
        return {}, None, 'no sweep'
    table = {}
    for model, budget, seed, lr in sweep_grid(args):
        rec = read_record(record_path(args, run_name(args, model, budget, seed, lr)))
        if rec is not None:
            table.setdefault(lr, {})[model] = rec
    swept = [m for m in (x[0] for x in MODELS) if m in args.models and m not in LEAKY]
    complete = {lr: per for lr, per in table.items() if all(m in per for m in swept)}
    if len(complete) < len(args.sweep_lrs):
        return table, None, f'the sweep is not finished ({len(complete)} of {len(args.sweep_lrs)} rates)'
    # a model that reads the answer from the slot order has a validation accuracy no other model can reach: no vote
    leaking = [m for m in swept if any(leaks(per[m]) for per in complete.values())]
    models = [m for m in swept if m not in leaking]
    score = {lr: float(np.mean([per[m]['best_val_acc'] for m in models])) for lr, per in complete.items()}
    best = max(score, key=score.get)
    own = {m: max(complete, key=lambda lr, m=m: complete[lr][m]['best_val_acc']) for m in models}
    why = (f'the best mean validation accuracy over the {len(models)} models ({score[best] * 100:.2f} %) at '
           f'{args.sweep_budget:,} triplets, seed {args.seeds[0]}; one rate for every model, so that no model is tuned '
           f'more than another; each model\'s own best: '
           + ', '.join(f'{TITLE[m]} {lr_tag(lr)}' for m, lr in own.items())
           + (f'; left out, as their order check fails: {", ".join(TITLE[m] for m in leaking)}' if leaking else ''))
    return table, best, why


def leaks(rec):
    """Does a record's test say that its model reads the answer from the slot order?"""
    return bool(((rec.get('test') or {}).get('order_check') or {}).get('leaks'))


def check_one_dataset(records):
    """Refuse to pool records of different datasets (their fingerprints differ); records made before fingerprints
    were recorded pass. Returns the fingerprint or None."""
    seen = collections.defaultdict(list)
    for r in records:
        if (r.get('dataset') or {}).get('sha256'):
            seen[r['dataset']['sha256']].append(r['run'])
    if len(seen) > 1:
        lines = '; '.join(f'{h[:12]}: {len(runs)} run(s), e.g. {runs[0]}' for h, runs in seen.items())
        raise UserError(f'the records in the results folder come from {len(seen)} different datasets ({lines}): a '
                        f'report pools one dataset\'s runs only; move the other records to their own --results folder')
    return next(iter(seen), None)




def subspace_summary(args, rows, budget):
    """What each notion's subspace holds at `budget`: {model: {'seeds', 'matrix': {row: {label: mean over the
    seeds}}}} from the records' "subspaces", with the untrained reference as model 'random' (fixed masks on a random
    backbone). None where no record has a matrix."""
    by_model = collections.defaultdict(list)
    for (m, b, s), r in sorted(rows.items()):
        if b == budget and r.get('subspaces'):
            by_model[m].append((s, r['subspaces']))
    if not by_model:
        return None
    seeds = sorted({s for runs in by_model.values() for s, _ in runs})
    for s in seeds:
        rargs = next(iter(rows.values()))['args']
        rec = read_record(record_path(args, untrained_name(args, s, rargs)))
        if rec and rec.get('subspaces'):
            by_model['random'].append((s, rec['subspaces']))
    mean = lambda xs: None if any(x is None for x in xs) else float(np.mean(xs))
    return {m: {'seeds': [s for s, _ in runs],
                'matrix': {row: {lab: mean([mx[row][lab] for _, mx in runs]) for lab in runs[0][1][row]}
                           for row in runs[0][1]}}
            for m, runs in by_model.items()}


def rests_on_cap(rows, keys):
    return any(rows[k]['stopped'] == 'cap' for k in keys if k in rows)


def report(args, passthrough, settings, lr, lr_choice, t_start):
    budgets = sorted(args.budgets)
    models = [m for m in (x[0] for x in MODELS)
              if m in args.models or (m == 'scenet_triplet' and args.released_scenet_at)]
    rows = collect(args, grid(args, lr)) if lr is not None else {}
    fingerprint = check_one_dataset(rows.values())
    summary = summarise(rows, models, budgets)
    top = max([b for b in budgets if any(b in summary.get(m, {}) for m in models)], default=budgets[-1])
    probes, probe_note, probe_missing = ((None, 'not run (--no-probe)', []) if args.no_probe else
                                         ensure_probes(args, rows, top))
    probe, claim_probe = None, None
    if probes:
        from csnlib.probe import PROBE_FOR_CLAIM
        claim_probe = PROBE_FOR_CLAIM if PROBE_FOR_CLAIM in probes else next(iter(probes))
        splits = probes.get(f'{claim_probe}_splits', {})
        if all(m in splits for m in ('triplet', 'csn_fixed', 'csn_learned') if m in probes[claim_probe]):
            claim_probe = f'{claim_probe}_splits'  # many family halvings, where every model's record has them
        probe = probes[claim_probe]
    claims, detail, cis, reason = {}, {}, {}, {}
    claims['a'], detail['a'], cis['a'] = claim_a(summary, top)
    claims['b'], detail['b'], cis['b'] = claim_b(summary, top)
    claims['c'], detail['c'], cis['c'] = claim_c(summary, budgets)
    claims['d'], detail['d'], masks, cis['d'], mask_extra = claim_d(rows, top)
    claims['e'], detail['e'], cis['e'] = claim_e(probe)
    have = [b for b in budgets if b in summary.get('csn_fixed', {}) and b in summary.get('csn_learned', {})]
    rests = {'a': [k for k in rows if k[1] == top], 'b': [k for k in rows if k[1] == top and k[0] != 'triplet'],
             'c': [k for k in rows if k[0] in ('csn_fixed', 'csn_learned') and have and k[1] in (have[0], have[-1])],
             'd': [k for k in rows if k[0] == 'csn_learned' and k[1] == top],
             'e': [k for k in rows if k[1] == top and k[0] != 'task']}
    for k in 'abcde':
        if cis[k] and rests_on_cap(rows, rests[k]):  # a claim with numbers behind it, one of them from a capped run
            claims[k], reason[k] = 'inconclusive', 'not converged'
    if mask_extra and mask_extra.get('reason'):
        reason['d'] = mask_extra['reason']
    out_dir = args.out_dir or args.results
    os.makedirs(out_dir, exist_ok=True)
    notions = next((r['notions'] for r in rows.values() if r.get('notions')), None) or []
    table, _, _ = sweep_table(args)
    probe_descriptions = {}
    if probes:
        from csnlib.probe import DESCRIPTIONS
        probe_descriptions = DESCRIPTIONS
    rep = {'command': args.command, 'data': args.data or args.study_data, 'dataset_sha256': fingerprint, 'top': top,
           'budgets': budgets, 'seeds': args.seeds + args.more_seeds,
           'epochs': {str(b): epochs_for(args, b) for b in budgets},
           'epochs_cap': args.epochs, 'patience': 0 if args.seen else args.patience, 'seen': args.seen,
           'settings': {**settings, 'lr': lr}, 'lr_choice': lr_choice, 'passed_to_main': passthrough,
           'sweep': {'budget': args.sweep_budget, 'seed': args.seeds[0], 'lrs': args.sweep_lrs, 'chosen': lr,
                     'models': [m for m in (x[0] for x in MODELS) if m in args.models],
                     'why': lr_choice,
                     'table': {str(k): {m: {f: r[f]
                                            for f in ('best_val_acc', 'epochs_trained', 'best_epoch', 'stopped')}
                                        for m, r in per.items()} for k, per in table.items()}},
           'models': {m: {str(b): v for b, v in d.items()} for m, d in summary.items()},
           'claims': claims, 'claims_detail': detail, 'claims_reason': reason, 'claims_ci': cis,
           'false_verdict_rate': false_verdict_rate(2), 'successors': successors_against_csn(summary, budgets),
           'masks': masks,
           'masks_start': mask_extra and mask_extra['masks_start'],
           'masks_change': mask_extra and mask_extra['masks_change'],
           'probe': probe, 'probes': {p: {'description': probe_descriptions.get(p, p), 'points': v}
                                      for p, v in (probes or {}).items()},
           'probe_task': probe_note or (probe_descriptions.get(claim_probe) if probes else None),
           'probe_missing': probe_missing,
           'subspaces': subspace_summary(args, rows, top),
           'runs': {r['run']: {k: v for k, v in r.items() if k not in ('masks', 'masks_start', 'metrics')}
                    for _, r in sorted(rows.items())},
           'runs_finished': len(rows), 'runs_planned': len(grid(args, lr)),
           'runs_without_dataset': sorted(r['run'] for r in rows.values()
                                          if not (r.get('dataset') or {}).get('sha256')),
           'wall_s': round(sum(r['train_s'] + r['test_s'] for r in rows.values()), 1),
           'machines': dict(collections.Counter(machine_tag(r.get('machine')) for _, r in sorted(rows.items()))),
           'this_call_s': round(time.time() - t_start, 1)}
    if summary:
        write_curve(summary, budgets, os.path.join(out_dir, 'curve.png'))
    rep['checks'] = checks_summary(args, passthrough, lr)
    rep['masks_figure'] = write_mask_figure(rows, top, notions, os.path.join(out_dir, 'masks.png'))
    write_json(os.path.join(out_dir, 'reproduce.json'), rep, indent=2)
    text = markdown(rep) if summary else ('\n'.join([f'# No finished run of the study yet on {rep["data"]}', '',
                                                     *sweep_markdown(rep)]) + '\n')
    with atomic_open(os.path.join(out_dir, 'report.md')) as f:
        f.write(text)
    print(f'\n{text}\nwrote {out_dir}/report.md, reproduce.json'
          f'{", curve.png" if summary else ""}{", masks.png" if rep["masks_figure"] else ""} '
          f'({rep["this_call_s"]:.0f} s)')
    return rep


def study_file(args):
    return os.path.join(args.results, 'study.json')


def interrupt(signum, frame):
    """SIGTERM between runs: stop as Ctrl-C does (every file is written whole or not at all)."""
    raise KeyboardInterrupt


def reproduce(args, passthrough):
    t_start = time.time()
    signal.signal(signal.SIGTERM, interrupt)
    settings, lr_given = main_settings(args, passthrough)
    if not args.report_only:
        write_json(study_file(args), {'command': args.command, 'data': args.data, 'budgets': args.budgets,
                                      'seeds': args.seeds, 'more_seeds': args.more_seeds,
                                      'more_seeds_at': args.more_seeds_at,
                                      'released_scenet_at': args.released_scenet_at, 'order': args.order,
                                      'rate': args.rate,
                                      'models': args.models,
                                      'prefix': args.prefix, 'sweep_lrs': args.sweep_lrs,
                                      'sweep_budget': args.sweep_budget, 'patience': args.patience,
                                      'epochs': args.epochs, 'seen': args.seen, 'checks_at': args.checks_at,
                                      'passed_to_main': passthrough,
                                      'lr_given': lr_given, 'lr': settings['lr'], 'settings': settings}, indent=2)
    if lr_given:
        lr, why = settings['lr'], 'passed to main.py (--lr), no sweep'
        args = argparse.Namespace(**{**vars(args), 'sweep_lrs': []})  # the report shows no sweep
    else:
        if not args.report_only:
            wait_for_sweep(args, passthrough, settings)
        _, lr, why = sweep_table(args)
        if args.rate is not None:
            if lr is None:
                why = f'set with --rate (the sweep is not finished: {why})'
            elif lr == args.rate:
                why = f'set with --rate, and the sweep\'s rule picks it too: {why}'
            else:
                why = f'set with --rate; the sweep\'s rule would pick {lr_tag(lr)}: {why}'
            lr = args.rate
    if not args.report_only and not args.sweep_only and lr is not None:
        runs = study_runs(args, passthrough, lr)
        busy = train_runs(args, passthrough, settings, runs)
        while busy:  # again: a copy that stopped meanwhile (killed: its lock is gone) left its run to this one
            again = train_runs(args, passthrough, settings, [r for r in runs if name_of(args, r) in busy], False)
            if again == busy:
                break
            busy = again
        if busy:  # held by a live process right now (its lock)
            print(f'reproduce.py: {len(busy)} run(s) are still being trained by other copies of this command '
                  f'({", ".join(busy[:3])}{", ..." if len(busy) > 3 else ""}); the report below leaves them out. The '
                  f'last copy to finish writes the whole one; if those copies stop first, run this command again to '
                  f'finish their runs', flush=True)
    report(args, passthrough, {**settings, 'lr': lr}, lr, why, t_start)
    return 0


def wait_for_sweep(args, passthrough, settings):
    """Train the sweep's runs that no other copy of the command holds, then wait for the others' (the rate is chosen
    from all of them), taking over any that a copy left unfinished."""
    sweep = [(m, b, s, lr, False, None) for m, b, s, lr in sweep_grid(args)]
    todo, said = sweep, None
    while busy := train_runs(args, passthrough, settings, todo, say_busy=False):
        if busy != said:
            print(f'reproduce.py: waiting for {len(busy)} sweep run(s) that other copies of this command are '
                  f'training ({", ".join(busy)}); the rate is chosen from all of them', flush=True)
            said = busy
        time.sleep(WAIT_S)
        todo = [r for r in sweep if run_name(args, r[0], r[1], r[2], r[3]) in busy]


def fill_from_study(d, passthrough):
    """--report-only: the grid, flags and main.py settings of the study that wrote d['results'] (study.json), where
    the command line does not give them, into d (the args being resolved). Returns the passed-through flags."""
    study = read_record(study_file(argparse.Namespace(**d)))
    if study is None:
        if d['budgets'] is None:
            raise UserError(f'--report-only: {study_file(argparse.Namespace(**d))} not found; give --results the '
                            f'study\'s records folder or the study\'s --budgets and --seeds')
        return passthrough
    for k in ('budgets', 'seeds', 'models', 'sweep_budget'):
        if d[k] is None:
            d[k] = study[k]
    d['more_seeds'] = d['more_seeds'] or study.get('more_seeds', [])
    d['more_seeds_at'] = d['more_seeds_at'] or study.get('more_seeds_at')
    d['released_scenet_at'] = d['released_scenet_at'] or study.get('released_scenet_at')
    d['rate'] = d['rate'] or study.get('rate')
    for k in ('patience', 'epochs', 'seen', 'sweep_lrs'):
        d[k] = study[k]
    d['checks_at'] = d['checks_at'] or study.get('checks_at')
    d['prefix'], d['command'] = study['prefix'], study.get('command', d['command'])
    d['study_data'] = study.get('data', d['results'])
    return passthrough or study['passed_to_main']


def resolve(parser, parsed, passthrough, argv):
    """The study's final args, once: the command line, then (--report-only) the recorded study's settings, then the
    defaults that depend on others (the sweep's budget, the records folder). (args, flags passed on to main.py)."""
    from csnlib.options import main_parser
    # main.py's flags are checked first, with its own ranges, not when the first run starts
    passed_on = main_parser()
    passed_on.error = lambda message: parser.error(f'{message} (passed on to main.py)')
    passed_on.parse_args(['--data', parsed.data or 'data', *passthrough])
    d = dict(vars(parsed), command=shlex.join(['python', 'reproduce.py', *argv]), study_data=parsed.results)
    if d['report_only']:
        if d['results'] is None and d['data'] is None:
            parser.error('--report-only needs --results DIR (the records, e.g. results/fonts) or --data')
        if d['results'] is None:
            d['results'] = default_results(d['data'])
        passthrough = fill_from_study(d, passthrough)
    elif d['data'] is None:
        parser.error('--data DIR is needed to train (or --report-only --results DIR)')
    forwards = [t for t in passthrough if t in ('--three-forwards', '--three_forwards')]
    if d['one_forward'] and forwards:
        parser.error(f'--one-forward and {forwards[0]} (passed on to main.py) contradict each other; give one')
    if not d['one_forward'] and not d['report_only']:
        # the original's arithmetic unless asked otherwise: its three backbone calls per step
        passthrough = [*[t for t in passthrough if t not in forwards], '--three-forwards']
    d['budgets'] = d['budgets'] or [100000]
    d['seeds'] = d['seeds'] if d['seeds'] is not None else [1]
    d['models'] = d['models'] or list(PAPER_MODELS)
    seeds = d['seeds'] + d['more_seeds']
    if len(set(d['budgets'])) != len(d['budgets']) or len(set(seeds)) != len(seeds):
        parser.error('--budgets and --seeds take distinct values')
    d['sweep_budget'] = d['sweep_budget'] or sorted(d['budgets'])[len(d['budgets']) // 2]
    if d['results'] is None:
        d['results'] = default_results(d['data'])
    return argparse.Namespace(**d), passthrough


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parsed, passthrough = parser.parse_known_args(argv)
    args, passthrough = resolve(parser, parsed, passthrough, argv)
    return reproduce(args, passthrough)




def default_results(data):
    """results/DATASET (the dataset's name in its dataset.json, e.g. fonts)."""
    from triplet_image_loader import load_dataset_info
    return os.path.join('results', load_dataset_info(data).name)


if __name__ == '__main__':
    sys.exit(run_script(main))
