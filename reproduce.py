"""Reproduce Table 1 of the CSN paper: the four models trained on the same triplets, budget and seed, then tested.

    python reproduce.py --data data/fonts --epochs 10 --num_traintriplets 20000 [main.py flags, e.g. --no-pretrained]

Runs RUNS/PREFIX_triplet, _task, _csn_fixed and _csn_learned through main.py (one process each, as a user would), tests
each best checkpoint with `main.py --test`, and writes RUNS/reproduce.md (model x notion accuracy) and reproduce.json.
Run it again after an interruption: finished runs are reused (test_results.json newer than model_best.pth.tar), a
stopped run continues from its checkpoint.pth.tar, a run whose test results are missing is only tested.
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.abspath(__file__))
# (short name, row of the table, main.py flags, the paper's Zappos50k triplet prediction error in %)
MODELS = [('triplet', 'standard triplet network', ['--model', 'triplet'], 23.72),
          ('task', 'task-specific triplet networks', ['--model', 'task'], 11.35),
          ('csn_fixed', 'CSN, fixed disjoint masks', ['--model', 'csn'], 10.79),
          ('csn_learned', 'CSN, learned masks', ['--model', 'csn', '--learned'], 10.73)]
# main.py flags that change what a run learns: a finished run trained with other values is not reused
SETTINGS = ('num_traintriplets', 'seed', 'dim_embed', 'batch_size', 'lr', 'margin', 'embed_loss', 'mask_loss',
            'image_size', 'conditions', 'no_pretrained', 'weights', 'num_valtriplets')


def build_parser():
    p = argparse.ArgumentParser(
        description='Train and test the four models of the CSN paper\'s Table 1 with the same data, budget and seed; '
                    'other flags are passed on to main.py (e.g. --no-pretrained --image-size 64 --workers 0).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a('--data', required=True, metavar='DIR', help='dataset folder')
    a('--epochs', type=int, default=10, help='epochs of each run')
    a('--num_traintriplets', '--num-traintriplets', type=int, default=100000,
      help='training triplets in total over the notions (the same ones for every model)')
    a('--seed', type=int, default=1, help='random seed of every run')
    a('--runs', default='runs', metavar='DIR', help='folder of the runs')
    a('--prefix', default='repro', help='runs are named PREFIX_triplet, PREFIX_task, PREFIX_csn_fixed, PREFIX_csn_learned')
    a('--models', nargs='*', default=[m[0] for m in MODELS], choices=[m[0] for m in MODELS], metavar='MODEL',
      help='which of the models to run: triplet task csn_fixed csn_learned')
    a('--out', default=None, metavar='MD', help='the table (default: RUNS/reproduce.md; the JSON goes next to it)')
    return p


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
    """Refuse to reuse a run trained with other settings than this reproduction's."""
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
    import main as csn_main
    parser = csn_main.build_parser()
    argv = ['--data', args.data, '--epochs', str(args.epochs), '--num_traintriplets', str(args.num_traintriplets),
            '--seed', str(args.seed), *passthrough]
    try:
        m = parser.parse_args(argv)
    except SystemExit:
        raise SystemExit(f'reproduce.py: main.py does not accept {shlex.join(passthrough)}') from None
    for flag in ('--model', '--learned', '--prein', '--name', '--resume', '--test', '--runs'):
        if flag in passthrough:
            raise SystemExit(f'reproduce.py: {flag} is set by reproduce.py itself; leave it out')
    return {k: getattr(m, k) for k in SETTINGS}


def reproduce(args, passthrough):
    t_start = time.time()
    settings = main_settings(args, passthrough)
    rows = []
    for short, title, flags, paper_error in [m for m in MODELS if m[0] in args.models]:
        name = f'{args.prefix}_{short}'
        run_dir = os.path.join(args.runs, name)
        action, ckpt = plan(run_dir, args.epochs)
        if ckpt is not None:
            check_settings(run_dir, ckpt, settings)
        os.makedirs(run_dir, exist_ok=True)
        times_path = os.path.join(run_dir, 'reproduce_times.json')
        times = json.load(open(times_path)) if os.path.exists(times_path) and action != 'train' else {'train_s': 0.0}
        log_path = os.path.join(run_dir, 'reproduce.log')
        print(f'{name}: {dict(train="training", resume="resuming its checkpoint", test="testing its best checkpoint", reuse="finished, reused")[action]}',
              flush=True)
        if action in ('train', 'resume'):
            common = ['--data', args.data, '--epochs', str(args.epochs), *passthrough]
            argv = (['--resume', os.path.join(run_dir, 'checkpoint.pth.tar'), *common] if action == 'resume' else
                    ['--runs', args.runs, '--name', name, '--num_traintriplets', str(args.num_traintriplets),
                     '--seed', str(args.seed), *flags, *common])
            rc, seconds = run_main(argv, log_path)
            times['train_s'] += seconds
            json.dump(times, open(times_path, 'w'))
            if rc != 0:
                raise SystemExit(rc if rc == 130 else
                                 f'reproduce.py: training {name} failed (exit status {rc}; see {log_path}). Run the '
                                 f'same command again to continue from its last checkpoint.')
        if action != 'reuse':
            best = os.path.join(run_dir, 'model_best.pth.tar')
            if not os.path.exists(best):
                raise SystemExit(f'reproduce.py: {run_dir} has no model_best.pth.tar: no epoch of {name} finished')
            rc, seconds = run_main(['--test', '--resume', best, '--data', args.data, *passthrough], log_path)
            if rc != 0:
                raise SystemExit(f'reproduce.py: testing {name} failed (exit status {rc}; see {log_path})')
            times['test_s'] = seconds
            json.dump(times, open(times_path, 'w'))
        with open(os.path.join(run_dir, 'test_results.json')) as f:
            res = json.load(f)
        ck = torch.load(os.path.join(run_dir, 'checkpoint.pth.tar'), map_location='cpu', weights_only=True)
        rows.append({'model': short, 'title': title, 'run': run_dir, 'accuracy': res['accuracy'],
                     'per_notion': res['per_notion'], 'mAP': res.get('mAP'), 'mAP_per_notion': res.get('mAP_per_notion'),
                     'best_epoch': ck['best_epoch'], 'epochs': ck['next_epoch'] - 1, 'test_triplets': res['triplets'],
                     'train_s': round(times.get('train_s', 0.0), 1), 'test_s': round(times.get('test_s', 0.0), 1),
                     'paper_error': paper_error})
    out = args.out or os.path.join(args.runs, 'reproduce.md')
    report = {'command': shlex.join(['python', 'reproduce.py', *sys.argv[1:]]), 'data': args.data,
              'epochs': args.epochs, 'settings': settings, 'passed_to_main': passthrough, 'models': rows,
              'wall_s': round(sum(r['train_s'] + r['test_s'] for r in rows), 1),
              'this_call_s': round(time.time() - t_start, 1), 'ordering': ordering(rows)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(os.path.splitext(out)[0] + '.json', 'w') as f:
        json.dump(report, f, indent=2)
    with open(out, 'w') as f:
        f.write(markdown(report))
    print(f'\n{markdown(report)}\nwrote {out} and {os.path.splitext(out)[0]}.json ({report["this_call_s"]:.0f} s)')
    return 0


def ordering(rows):
    """One sentence comparing the overall accuracies with the paper's ordering learned >= fixed > task > standard."""
    acc = {r['model']: r['accuracy'] for r in rows}
    if len(acc) < 4:
        return ''
    order = sorted(acc, key=lambda k: -acc[k])
    ok = acc['csn_learned'] >= acc['csn_fixed'] > acc['task'] > acc['triplet']
    pretty = ' > '.join(f'{k} {acc[k] * 100:.2f}' for k in order)
    return (f'Overall accuracy orders the models {pretty} %: '
            f'{"the paper" + chr(39) + "s ordering (learned >= fixed > task-specific > standard) holds" if ok else "this differs from the paper" + chr(39) + "s ordering (learned >= fixed > task-specific > standard)"}.')


def markdown(rep):
    rows = rep['models']
    notions = list(rows[0]['per_notion']) if rows else []
    s = rep['settings']
    lines = [f'# Table 1 reproduced on {rep["data"]}', '',
             'Triplet prediction accuracy (%) on the test triplets of each notion, from each run\'s best checkpoint '
             '(by validation accuracy). The paper\'s error is on Zappos50k (64-d, 200k triplets), for the ordering only.',
             '', '| model | ' + ' | '.join(notions) + ' | overall | error | paper error (Zappos50k) |',
             '|---|' + '---:|' * (len(notions) + 3)]
    for r in rows:
        lines.append(f'| {r["title"]} | ' + ' | '.join(f'{r["per_notion"][n] * 100:.2f}' for n in notions) +
                     f' | **{r["accuracy"] * 100:.2f}** | {(1 - r["accuracy"]) * 100:.2f} | {r["paper_error"]:.2f} |')
    if any(r.get('mAP') is not None for r in rows):
        lines += ['', 'Retrieval mAP (%) over the test images, as in ASEN (AAAI 2020): relevant = same label under the '
                      'notion.', '', '| model | ' + ' | '.join(notions) + ' | mean |', '|---|' + '---:|' * (len(notions) + 1)]
        for r in rows:
            per = r.get('mAP_per_notion') or {}
            cells = [f'{per[n] * 100:.2f}' if per.get(n) is not None else '' for n in notions]
            lines.append(f'| {r["title"]} | ' + ' | '.join(cells) +
                         (f' | **{r["mAP"] * 100:.2f}** |' if r.get('mAP') is not None else ' | |'))
    if rep['ordering']:
        lines += ['', rep['ordering']]
    lines += ['', f'Command: `{rep["command"]}`', '',
              f'Settings (the same for every model): {rep["epochs"]} epochs, {s["num_traintriplets"]} training triplets, '
              f'seed {s["seed"]}, {s["dim_embed"]}-d embedding, batch {s["batch_size"]}, lr {s["lr"]}, margin {s["margin"]}, '
              f'image size {s["image_size"]}, backbone {"random init" if s["no_pretrained"] else "ImageNet ResNet-18"}'
              + (f'; main.py flags: `{shlex.join(rep["passed_to_main"])}`' if rep['passed_to_main'] else '') + '.', '',
              '| model | run | best epoch | test triplets | train (s) | test (s) |', '|---|---|---:|---:|---:|---:|']
    for r in rows:
        lines.append(f'| {r["title"]} | `{r["run"]}` | {r["best_epoch"]} of {r["epochs"]} | {r["test_triplets"]} | '
                     f'{r["train_s"]:.0f} | {r["test_s"]:.0f} |')
    lines += ['', f'Wall time of the four runs: {rep["wall_s"] / 60:.1f} min (training and testing, as run).', '']
    return '\n'.join(lines)


def main(argv=None):
    args, passthrough = build_parser().parse_known_args(argv)
    return reproduce(args, passthrough)


if __name__ == '__main__':
    sys.exit(main())
