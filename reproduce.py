"""Test the CSN paper's claims on a dataset: every model, every training budget, every seed, then one report.

    python reproduce.py --data data/fonts --budgets 6000 24000 96000 --seeds 1 2 3 --seen 96000 \\
        --no-pretrained --image-size 64 --batch-size 64

Trains RUNS/PREFIX_MODEL_nBUDGET_sSEED through main.py (one process each, as a user would) for the standard triplet
network, the task-specific networks and the CSN with fixed and learned masks, tests each best checkpoint with
`main.py --test`, and writes RUNS/reproduce/: report.md (tables, error bars, the paper's claims checked one by one),
reproduce.json, curve.png (test error against training triplets) and masks.png. Every model at a budget gets the same
triplets, epochs and seed. Run the same command again after an interruption: finished runs are reused, a stopped run
continues from its checkpoint, a run without test results is only tested. --report-only writes the report from the runs
that are there.
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.abspath(__file__))
# (short name, row of the table, main.py flags, the paper's Zappos50k triplet prediction error in %)
MODELS = [('triplet', 'standard triplet network', ['--model', 'triplet'], 23.72),
          ('task', 'task-specific triplet networks', ['--model', 'task'], 11.35),
          ('csn_fixed', 'CSN, fixed disjoint masks', ['--model', 'csn'], 10.79),
          ('csn_learned', 'CSN, learned masks', ['--model', 'csn', '--learned'], 10.73)]
TITLE = {m[0]: m[1] for m in MODELS}
# main.py flags that change what a run learns: a finished run trained with other values is not reused
SETTINGS = ('num_traintriplets', 'seed', 'dim_embed', 'batch_size', 'lr', 'margin', 'embed_loss', 'mask_loss',
            'image_size', 'conditions', 'no_pretrained', 'weights', 'num_valtriplets', 'hflip')
SET_HERE = ('--model', '--learned', '--prein', '--name', '--resume', '--test', '--runs', '--epochs', '--seed',
            '--num_traintriplets', '--num-traintriplets', '--pictures', '--no-pictures')


def build_parser():
    from csnlib.options import nonneg_int, positive_int
    p = argparse.ArgumentParser(
        description='Train and test the CSN paper\'s four models over training budgets and seeds and check the paper\'s '
                    'claims; other flags are passed on to main.py (e.g. --no-pretrained --image-size 64).',
        allow_abbrev=False)
    a = p.add_argument
    a('--data', required=True, metavar='DIR', help='dataset folder')
    a('--budgets', '--num_traintriplets', '--num-traintriplets', dest='budgets', nargs='+', type=positive_int, default=[100000],
      metavar='N', help='training triplets in total over the notions, one study point each; the same triplets for '
                        'every model at a budget (default: 100000)')
    a('--seeds', '--seed', dest='seeds', nargs='+', type=nonneg_int, default=[1], metavar='S',
      help='seeds: each model and budget is trained once per seed (subset, order, initialisation) (default: 1)')
    a('--epochs', type=positive_int, default=10, help='epochs of each run, when --seen is not given (default: 10)')
    a('--seen', type=positive_int, default=None, metavar='N',
      help='train every run on about N triplets in all: a budget B gets max(1, round(N / B)) epochs, so budgets are '
           'compared at the same compute (default: off, --epochs for every budget)')
    a('--runs', default='runs', metavar='DIR', help='folder of the runs (default: runs)')
    a('--prefix', default='repro', help='runs are named PREFIX_MODEL_nBUDGET_sSEED (default: repro)')
    a('--models', nargs='+', default=[m[0] for m in MODELS], choices=[m[0] for m in MODELS], metavar='MODEL',
      help='which models to run: triplet task csn_fixed csn_learned (default: all four)')
    a('--out-dir', default=None, metavar='DIR', help='report folder (default: RUNS/reproduce)')
    a('--report-only', action='store_true', help='train nothing: write the report from the finished runs (default: off)')
    a('--no-probe', action='store_true', help='leave out claim (e), the linear probe on frozen features (default: off)')
    return p


def epochs_for(args, budget):
    return max(1, round(args.seen / budget)) if args.seen else args.epochs


def run_name(args, model, budget, seed):
    return f'{args.prefix}_{model}_n{budget}_s{seed}'


def _mtime(path):
    return os.stat(path).st_mtime if os.path.exists(path) else None


def plan(run_dir, epochs):
    """What a run needs: 'train' (nothing there), 'resume' (stopped before `epochs`), 'test' (trained, no up-to-date
    test results) or 'reuse'. Returns (action, the checkpoint's dict or None)."""
    ckpt_path = os.path.join(run_dir, 'checkpoint.pth.tar')
    if not os.path.exists(ckpt_path):
        return 'train', None
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    if ckpt['next_epoch'] <= epochs:
        return 'resume', ckpt
    best, results = _mtime(os.path.join(run_dir, 'model_best.pth.tar')), _mtime(os.path.join(run_dir, 'test_results.json'))
    return ('reuse' if results is not None and best is not None and results >= best else 'test'), ckpt


def check_settings(run_dir, ckpt, wanted):
    """Refuse to reuse a run trained with other settings than this study's."""
    stored = ckpt.get('args', {})
    diff = [f'--{k} {stored.get(k)!r} (asked: {v!r})' for k, v in wanted.items() if k in stored and stored[k] != v]
    if diff:
        raise SystemExit(f'reproduce.py: {run_dir} was trained with {", ".join(diff)}; use another --prefix or --runs, '
                         f'or delete {run_dir}')


def run_main(argv, log_path):
    """main.py ARGV in a child process, its output shown and kept in log_path. Returns (exit status, seconds)."""
    cmd = [sys.executable, os.path.join(REPO, 'main.py'), *argv]
    print(f'\n$ {shlex.join(cmd[1:])}', flush=True)
    t0 = time.time()
    # Ctrl-C reaches main.py too, which saves a checkpoint and exits; this process waits for it
    old = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        with open(log_path, 'a') as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            rc = proc.wait()
    finally:
        signal.signal(signal.SIGINT, old)
    return rc, time.time() - t0


def main_settings(args, passthrough):
    """The main.py settings every run shares, as main.py parses them (the passed-through flags included)."""
    sys.path.insert(0, REPO)
    from csnlib import options
    for flag in SET_HERE:
        if any(t == flag or t.startswith(flag + '=') for t in passthrough):
            raise SystemExit(f'reproduce.py: {flag} is set by reproduce.py itself; leave it out')
    argv = ['--data', args.data, *passthrough]
    try:
        m = options.main_parser().parse_args(argv)
    except SystemExit:
        raise SystemExit(f'reproduce.py: main.py does not accept {shlex.join(passthrough)}') from None
    return {k: getattr(m, k) for k in SETTINGS if k not in ('num_traintriplets', 'seed')}


def grid(args):
    """The study's runs in the order they are trained: seed by seed, so a partial study already spans the budgets,
    the largest budget first (its first seed also writes the pictures)."""
    return [(model, budget, seed) for seed in args.seeds for budget in sorted(args.budgets, reverse=True)
            for model in [m[0] for m in MODELS if m[0] in args.models]]


def train_and_test(args, passthrough, settings, model, budget, seed, pictures):
    name = run_name(args, model, budget, seed)
    run_dir = os.path.join(args.runs, name)
    epochs = epochs_for(args, budget)
    action, ckpt = plan(run_dir, epochs)
    if ckpt is not None:
        check_settings(run_dir, ckpt, {**settings, 'num_traintriplets': budget, 'seed': seed})
    os.makedirs(run_dir, exist_ok=True)
    times_path = os.path.join(run_dir, 'reproduce_times.json')
    times = json.load(open(times_path)) if os.path.exists(times_path) and action != 'train' else {'train_s': 0.0}
    log_path = os.path.join(run_dir, 'reproduce.log')
    said = dict(train='training', resume='resuming its checkpoint', test='testing its best checkpoint',
                reuse='finished, reused')[action]
    print(f'{name}: {said}', flush=True)
    flags = next(m[2] for m in MODELS if m[0] == model)
    if action in ('train', 'resume'):
        common = ['--data', args.data, '--epochs', str(epochs), *passthrough]
        argv = (['--resume', os.path.join(run_dir, 'checkpoint.pth.tar'), *common] if action == 'resume' else
                ['--runs', args.runs, '--name', name, '--num_traintriplets', str(budget), '--seed', str(seed), *flags,
                 *common])
        rc, seconds = run_main(argv, log_path)
        times['train_s'] += seconds
        json.dump(times, open(times_path, 'w'))
        if rc != 0:
            raise SystemExit(rc if rc == 130 else
                             f'reproduce.py: training {name} failed (exit status {rc}; see {log_path}). Run the same '
                             f'command again to continue from its last checkpoint.')
    if action != 'reuse':
        best = os.path.join(run_dir, 'model_best.pth.tar')
        if not os.path.exists(best):
            raise SystemExit(f'reproduce.py: {run_dir} has no model_best.pth.tar: no epoch of {name} finished')
        rc, seconds = run_main(['--test', '--resume', best, '--data', args.data, *passthrough,
                                '--pictures' if pictures else '--no-pictures'], log_path)
        if rc != 0:
            raise SystemExit(f'reproduce.py: testing {name} failed (exit status {rc}; see {log_path})')
        times['test_s'] = seconds
        json.dump(times, open(times_path, 'w'))


def collect(args, epochs_of):
    """Every finished run of the study: {(model, budget, seed): row}."""
    rows = {}
    for model, budget, seed in grid(args):
        run_dir = os.path.join(args.runs, run_name(args, model, budget, seed))
        res_path = os.path.join(run_dir, 'test_results.json')
        if plan(run_dir, epochs_of(budget))[0] != 'reuse':
            continue
        with open(res_path) as f:
            res = json.load(f)
        ck = torch.load(os.path.join(run_dir, 'checkpoint.pth.tar'), map_location='cpu', weights_only=True)
        times_path = os.path.join(run_dir, 'reproduce_times.json')
        times = json.load(open(times_path)) if os.path.exists(times_path) else {}
        rows[(model, budget, seed)] = {
            'run': run_dir, 'accuracy': res['accuracy'], 'per_notion': res['per_notion'], 'mAP': res.get('mAP'),
            'best_epoch': ck['best_epoch'], 'epochs': ck['next_epoch'] - 1, 'test_triplets': res['triplets'],
            'train_s': round(times.get('train_s', 0.0), 1), 'test_s': round(times.get('test_s', 0.0), 1),
            'parameters': count_parameters(ck['state_dict']), 'masks': masks_of(ck['state_dict'], ck['args'])}
    return rows


def count_parameters(state_dict):
    """Weights of a model (BatchNorm running statistics left out)."""
    return int(sum(v.numel() for k, v in state_dict.items()
                   if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))))


def masks_of(state_dict, run_args):
    """The masks m_c as a (C, D) list, through ReLU where they are learned; None for models without masks."""
    w = state_dict.get('embednet.masks.weight')
    if w is None:
        return None
    learned = run_args.get('learned') or run_args.get('prein')
    return (torch.relu(w) if learned else w).float().tolist()


# ------------------------------------------------------------------------------------------------------- statistics

def mean_std(xs):
    """Mean and sample standard deviation (0 for one value)."""
    xs = np.asarray(xs, dtype=float)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def summarise(rows, models, budgets):
    """{model: {budget: {seeds, accuracy, accuracy_mean, accuracy_std, per_notion_mean, mAP_mean}}} of what finished."""
    out = {}
    for model in models:
        for b in budgets:
            rs = sorted(((s, r) for (m, bb, s), r in rows.items() if m == model and bb == b), key=lambda t: t[0])
            if not rs:
                continue
            acc = [r['accuracy'] for _, r in rs]
            mu, sd = mean_std(acc)
            notions = list(rs[0][1]['per_notion'])
            maps = [r['mAP'] for _, r in rs if r.get('mAP') is not None]
            out.setdefault(model, {})[b] = {
                'seeds': [s for s, _ in rs], 'accuracy': acc, 'accuracy_mean': mu, 'accuracy_std': sd,
                'per_notion_mean': {n: float(np.mean([r['per_notion'][n] for _, r in rs])) for n in notions},
                'per_notion_std': {n: mean_std([r['per_notion'][n] for _, r in rs])[1] for n in notions},
                'mAP_mean': float(np.mean(maps)) if maps else None, 'mAP_std': mean_std(maps)[1] if maps else None,
                'parameters': rs[0][1]['parameters'], 'epochs': rs[0][1]['epochs']}
    return out


def compare(a, b):
    """Is A above B? 'holds' / 'does not hold' / 'inconclusive' by the rule of the report: a difference within one
    standard deviation (the larger of the two) is inconclusive, and so is anything from a single seed."""
    if a is None or b is None:
        return 'inconclusive', 'not run'
    d, sd = a['mean'] - b['mean'], max(a['std'], b['std'])
    if min(a['n'], b['n']) < 2:
        return 'inconclusive', f'difference {d * 100:+.2f} points from a single seed'
    word = 'inconclusive' if abs(d) <= sd else 'holds' if d > 0 else 'does not hold'
    return word, f'difference {d * 100:+.2f} points, one standard deviation {sd * 100:.2f}'


def point(summary, model, budget, key='accuracy'):
    s = summary.get(model, {}).get(budget)
    if s is None:
        return None
    return {'mean': s[f'{key}_mean'], 'std': s[f'{key}_std'], 'n': len(s['seeds'])}


def combine(words):
    """One verdict from several: all the same -> that one; otherwise inconclusive."""
    return words[0] if len(set(words)) == 1 else 'inconclusive'


def pct(p):
    return f'{p["mean"] * 100:.2f} ± {p["std"] * 100:.2f}' if p else 'not run'


def claim_a(summary, budget):
    """(a) the standard triplet network is the worst model."""
    t = point(summary, 'triplet', budget)
    others = [m for m in ('task', 'csn_fixed', 'csn_learned') if point(summary, m, budget)]
    if t is None or not others:
        return 'inconclusive', 'the standard triplet network or every other model is missing'
    results = [(m, *compare(point(summary, m, budget), t)) for m in others]
    text = '; '.join(f'{TITLE[m]} {pct(point(summary, m, budget))} vs {pct(t)} % ({why}): {w}' for m, w, why in results)
    return combine([w for _, w, _ in results]), text


def claim_b(summary, budget):
    """(b) a CSN is at least as good as the task-specific networks, with a quarter of their parameters."""
    task = point(summary, 'task', budget)
    csns = [m for m in ('csn_fixed', 'csn_learned') if point(summary, m, budget)]
    if task is None or not csns:
        return 'inconclusive', 'the task-specific networks or both CSNs are missing'
    results = []
    for m in csns:
        w, why = compare(point(summary, m, budget), task)
        if w == 'inconclusive' and 'single seed' not in why:
            w = 'holds'  # "at least as good": a tie within one standard deviation counts
        results.append((m, w, why))
    ratio = summary['task'][budget]['parameters'] / summary[csns[0]][budget]['parameters']
    text = ('; '.join(f'{TITLE[m]} {pct(point(summary, m, budget))} vs {pct(task)} % ({why}): {w}' for m, w, why in results)
            + f'; parameters: task-specific {summary["task"][budget]["parameters"]:,}, CSN '
              f'{summary[csns[0]][budget]["parameters"]:,} ({ratio:.2f}x)')
    return combine([w for _, w, _ in results]), text


def claim_c(summary, budgets):
    """(c) learned masks need more triplets than fixed ones and catch up with them or pass them as the budget grows."""
    have = [b for b in budgets if point(summary, 'csn_fixed', b) and point(summary, 'csn_learned', b)]
    if len(have) < 2:
        return 'inconclusive', 'needs both CSNs at two budgets or more'
    small, large = have[0], have[-1]
    w_small, why_small = compare(point(summary, 'csn_fixed', small), point(summary, 'csn_learned', small))
    w_large, why_large = compare(point(summary, 'csn_learned', large), point(summary, 'csn_fixed', large))
    gaps = ', '.join(f'{b:,}: {(summary["csn_learned"][b]["accuracy_mean"] - summary["csn_fixed"][b]["accuracy_mean"]) * 100:+.2f}'
                     for b in have)
    text = (f'learned minus fixed, by training triplets: {gaps} points; fewest triplets, fixed above learned: '
            f'{w_small} ({why_small}); most triplets, learned above fixed: {w_large} ({why_large})')
    if w_small == 'does not hold' or w_large == 'does not hold':
        return 'does not hold', text  # learned ahead with the fewest triplets, or still behind with the most
    if w_small == 'holds' and 'single seed' not in why_large:
        return 'holds', text  # behind with the fewest triplets, caught up (within one sd) or ahead with the most
    return 'inconclusive', text


def claim_d(rows, budget):
    """(d) learned masks are sparse and share dimensions between notions."""
    stats = [mask_stats(r['masks']) for (m, b, _), r in rows.items() if m == 'csn_learned' and b == budget]
    if not stats:
        return 'inconclusive', 'no CSN with learned masks at this budget', None
    sparse = mean_std([s['sparse'] for s in stats])
    shared = mean_std([s['overlap'] for s in stats])
    fixed = f'(fixed disjoint masks: {1 - 1 / len(stats[0]["active"]):.2f} under, overlap 0)'
    text = (f'fraction of mask weights under 0.1 of their row\'s maximum {sparse[0]:.2f} ± {sparse[1]:.2f}; overlap '
            f'(Jaccard of the dimensions at or above 0.1 of the maximum) between notions {shared[0]:.2f} ± {shared[1]:.2f} '
            f'{fixed}; rule: sparse = at least half the weights under, shared = overlap above 0.05')
    words = ['holds' if s['sparse'] >= 0.5 and s['overlap'] > 0.05 else 'does not hold' for s in stats]
    return combine(words), text, {'sparse': sparse, 'overlap': shared, 'per_seed': stats}


def mask_stats(masks):
    m = np.asarray(masks, dtype=float)  # (C, D)
    active = m >= 0.1 * m.max(1, keepdims=True)  # (C, D)
    pairs = [(i, j) for i in range(len(m)) for j in range(i + 1, len(m))]
    overlap = [(active[i] & active[j]).sum() / max((active[i] | active[j]).sum(), 1) for i, j in pairs]
    return {'sparse': float(1 - active.mean()), 'overlap': float(np.mean(overlap)) if overlap else 0.0,
            'active': active.sum(1).tolist()}


def claim_e(probe):
    """(e) the CSN's features make better off-the-shelf features than the standard triplet network's."""
    if not probe:
        return 'inconclusive', 'the probe was not run'
    t = probe.get('triplet')
    csns = [m for m in ('csn_fixed', 'csn_learned') if m in probe]
    if t is None or not csns:
        return 'inconclusive', 'the standard triplet network or both CSNs are missing'
    results = [(m, *compare(probe[m], t)) for m in csns]
    text = '; '.join(f'{TITLE[m]} {pct(probe[m])} vs {pct(t)} % ({why}): {w}' for m, w, why in results)
    return combine([w for _, w, _ in results]), text + untrained(probe.get('random'), [t, *(probe[m] for m in csns)])


def untrained(random, trained):
    """Where the randomly initialised backbone's probe lies against the trained ones' (by the mean)."""
    if not random:
        return ''
    above = sum(random['mean'] > t['mean'] for t in trained)
    if above == 0:
        where = 'below every trained backbone'
    elif above == len(trained):
        where = 'above every trained backbone: triplet training made these features worse'
    else:
        where = 'between the trained backbones'
    return f'; randomly initialised backbone (untrained) {pct(random)} %, {where}'


# ----------------------------------------------------------------------------------------------------------- report

def run_probe(args, rows, budget):
    """Claim (e): the linear probe on each run's frozen backbone at `budget`, and on a random backbone per seed."""
    from csnlib import probe
    from triplet_image_loader import load_dataset_info
    info = load_dataset_info(args.data)
    task = probe.probe_task(info)
    if task is None:
        return None, 'no label for a probe in this dataset (fonts: the test families; Zappos: the brand)'
    acc = {}
    for (model, b, seed), r in sorted(rows.items()):
        if b == budget and model != 'task':
            ck = torch.load(os.path.join(r['run'], 'model_best.pth.tar'), map_location='cpu', weights_only=True)
            acc.setdefault(model, []).append(probe.probe_checkpoint(ck, info, task))
    seeds = sorted({s for (_, b, s) in rows if b == budget})
    if seeds:
        any_run = next(r for (_, b, _), r in rows.items() if b == budget)
        ck = torch.load(os.path.join(any_run['run'], 'model_best.pth.tar'), map_location='cpu', weights_only=True)
        acc['random'] = [probe.probe_random(ck['args'], info, task, seed) for seed in seeds]
    out = {m: dict(zip(('mean', 'std'), mean_std(v)), n=len(v), values=v) for m, v in acc.items()}
    return out, task['description']


def write_curve(summary, budgets, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for model, title, _, _ in MODELS:
        pts = [(b, summary[model][b]) for b in budgets if b in summary.get(model, {})]
        if not pts:
            continue
        x = np.array([b for b, _ in pts])
        err = np.array([(1 - s['accuracy_mean']) * 100 for _, s in pts])
        sd = np.array([s['accuracy_std'] * 100 for _, s in pts])
        ax.plot(x, err, marker='o', label=title)
        ax.fill_between(x, err - sd, err + sd, alpha=0.2)
    ax.set_xscale('log')
    ax.set_xlabel('training triplets (unique, over all notions)')
    ax.set_ylabel('test triplet error (%)')
    ax.set_title('error against training triplets (band: ± one sd over seeds)')
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_mask_figure(rows, budget, notions, path):
    """The learned masks of every seed at `budget` beside the fixed disjoint ones, one heat map each."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    found = sorted(((m, s), r['masks']) for (m, b, s), r in rows.items() if b == budget and r['masks'] is not None)
    if not found:
        return False
    fig, axes = plt.subplots(len(found), 1, figsize=(8, 1.0 + 0.45 * len(notions) * len(found)), squeeze=False)
    for ax, ((model, seed), masks) in zip(axes[:, 0], found):
        m = np.asarray(masks)
        im = ax.imshow(m, aspect='auto', cmap='viridis', interpolation='nearest')
        ax.set_yticks(range(len(notions)), notions)
        ax.set_title(f'{TITLE[model]}, seed {seed}', fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.02)
    axes[-1, 0].set_xlabel('embedding dimension')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def pm(mean, std, n):
    """'mean ± sd' in %, or the mean alone from a single seed (no spread to give)."""
    return f'{mean * 100:.2f}' if n < 2 else f'{mean * 100:.2f} ± {std * 100:.2f}'


def markdown(rep):
    budgets = rep['budgets']
    top = str(budgets[-1])
    models = [m for m in (x[0] for x in MODELS) if top in rep['models'].get(m, {})]
    notions = list(rep['models'][models[0]][top]['per_notion_mean']) if models else []
    s = rep['settings']
    L = [f'# The CSN paper\'s claims on {rep["data"]}', '',
         f'Triplet prediction accuracy (%) on the test triplets, from each run\'s best checkpoint (by validation '
         f'accuracy): mean ± standard deviation over the seeds of the last column (asked for: '
         f'{", ".join(map(str, rep["seeds"]))}; a single seed gives no spread). '
         f'{int(top):,} training triplets. The paper\'s error is on Zappos50k (64-d, 200k triplets), for the ordering only.',
         '', '| model | ' + ' | '.join(notions) + ' | overall | error | mAP | paper error (Zappos50k) | seeds |',
         '|---|' + '---:|' * (len(notions) + 5)]
    for m in models:
        d = rep['models'][m][top]
        k = len(d['seeds'])
        mp = pm(d['mAP_mean'], d['mAP_std'], k) if d.get('mAP_mean') is not None else ''
        L.append(f'| {TITLE[m]} | ' + ' | '.join(pm(d['per_notion_mean'][n], d['per_notion_std'][n], k) for n in notions)
                 + f' | **{pm(d["accuracy_mean"], d["accuracy_std"], k)}** | '
                   f'{(1 - d["accuracy_mean"]) * 100:.2f} | {mp} | {dict((x[0], x[3]) for x in MODELS)[m]:.2f} | '
                   f'{", ".join(map(str, d["seeds"]))} |')
    L += ['', 'Test error (%) against training triplets (mean ± sd over seeds; the number of seeds in brackets):', '',
          '| model | ' + ' | '.join(f'{b:,} ({rep["epochs"][str(b)]} ep.)' for b in budgets) + ' |',
          '|---|' + '---:|' * len(budgets)]
    for m, title, _, _ in MODELS:
        if m not in rep['models']:
            continue
        cells = []
        for b in budgets:
            d = rep['models'][m].get(str(b))
            cells.append(f'{pm(1 - d["accuracy_mean"], d["accuracy_std"], len(d["seeds"]))} ({len(d["seeds"])})'
                         if d else '')
        L.append(f'| {title} | ' + ' | '.join(cells) + ' |')
    L += ['', '![error against training triplets](curve.png)', '', '## The claims', '',
          'Rule: a difference within one standard deviation over seeds (the larger of the two models\') is '
          '"inconclusive", and so is a difference from a single seed. Nothing was tuned per model.', '']
    names = {'a': 'the standard triplet network is the worst model',
             'b': 'a CSN is at least as good as the task-specific networks, with a quarter of their parameters',
             'c': 'learned masks need more triplets than fixed ones and catch up with them or pass them as the budget grows',
             'd': 'learned masks are sparse and share dimensions between notions',
             'e': 'the CSN\'s features are better off-the-shelf features than the standard triplet network\'s'}
    for k in 'abcde':
        L.append(f'- **({k}) {names[k]}: {rep["claims"][k]}.** {rep["claims_detail"][k]}.')
    if rep.get('probe_task'):
        L += ['', f'Probe of claim (e): {rep["probe_task"]}.']
    if rep.get('masks_figure'):
        L += ['', '![masks](masks.png)']
    L += ['', f'Command: `{rep["command"]}`', '',
          f'Settings (the same for every model): {s["dim_embed"]}-d embedding, batch {s["batch_size"]}, lr {s["lr"]}, '
          f'margin {s["margin"]}, image size {s["image_size"]}, backbone '
          f'{"random init" if s["no_pretrained"] else "ImageNet ResNet-18"}, horizontal flips {s["hflip"]}'
          + (f'; main.py flags: `{shlex.join(rep["passed_to_main"])}`' if rep['passed_to_main'] else '') + '.', '',
          f'Runs finished: {rep["runs_finished"]} of {rep["runs_planned"]}; training and testing took '
          f'{rep["wall_s"] / 3600:.2f} h of this machine in all (as run, summed over runs).', '']
    return '\n'.join(L)


def report(args, passthrough, settings, t_start):
    budgets = sorted(args.budgets)
    models = [m for m in (x[0] for x in MODELS) if m in args.models]
    rows = collect(args, lambda b: epochs_for(args, b))
    summary = summarise(rows, models, budgets)
    top = max([b for b in budgets if any(b in summary.get(m, {}) for m in models)], default=budgets[-1])
    probe, probe_task = (None, 'not run (--no-probe)') if args.no_probe else run_probe(args, rows, top)
    claims, detail = {}, {}
    claims['a'], detail['a'] = claim_a(summary, top)
    claims['b'], detail['b'] = claim_b(summary, top)
    claims['c'], detail['c'] = claim_c(summary, budgets)
    claims['d'], detail['d'], masks = claim_d(rows, top)
    claims['e'], detail['e'] = claim_e(probe)
    out_dir = args.out_dir or os.path.join(args.runs, 'reproduce')
    os.makedirs(out_dir, exist_ok=True)
    from triplet_image_loader import load_dataset_info
    notions = load_dataset_info(args.data).notions
    rep = {'command': shlex.join(['python', 'reproduce.py', *sys.argv[1:]]), 'data': args.data, 'budgets': budgets,
           'seeds': args.seeds, 'epochs': {str(b): epochs_for(args, b) for b in budgets}, 'settings': settings,
           'passed_to_main': passthrough,
           'models': {m: {str(b): v for b, v in d.items()} for m, d in summary.items()},
           'claims': claims, 'claims_detail': detail, 'masks': masks, 'probe': probe, 'probe_task': probe_task,
           'runs': {run_name(args, *k): v | {'masks': None} for k, v in sorted(rows.items())},
           'runs_finished': len(rows), 'runs_planned': len(grid(args)),
           'wall_s': round(sum(r['train_s'] + r['test_s'] for r in rows.values()), 1),
           'this_call_s': round(time.time() - t_start, 1)}
    if summary:
        write_curve(summary, budgets, os.path.join(out_dir, 'curve.png'))
    rep['masks_figure'] = write_mask_figure(rows, top, notions, os.path.join(out_dir, 'masks.png'))
    with open(os.path.join(out_dir, 'reproduce.json'), 'w') as f:
        json.dump(rep, f, indent=2)
    text = markdown(rep) if summary else f'# No finished run yet in {args.runs}\n'
    with open(os.path.join(out_dir, 'report.md'), 'w') as f:
        f.write(text)
    print(f'\n{text}\nwrote {out_dir}/report.md, reproduce.json, curve.png'
          f'{", masks.png" if rep["masks_figure"] else ""} ({rep["this_call_s"]:.0f} s)')
    return rep


def reproduce(args, passthrough):
    t_start = time.time()
    settings = main_settings(args, passthrough)
    if not args.report_only:
        top = max(args.budgets)
        first_seed = args.seeds[0]
        for model, budget, seed in grid(args):
            train_and_test(args, passthrough, settings, model, budget, seed, budget == top and seed == first_seed)
    report(args, passthrough, settings, t_start)
    return 0


def main(argv=None):
    from csnlib.options import main_parser
    parser = build_parser()
    args, passthrough = parser.parse_known_args(argv)
    if len(set(args.budgets)) != len(args.budgets) or len(set(args.seeds)) != len(args.seeds):
        parser.error('--budgets and --seeds take distinct values')
    # main.py's flags are checked now, with its own ranges, not when the first run starts
    passed_on = main_parser()
    passed_on.error = lambda message: parser.error(f'{message} (passed on to main.py)')
    passed_on.parse_args(['--data', args.data, *passthrough])
    return reproduce(args, passthrough)


if __name__ == '__main__':
    sys.exit(main())
