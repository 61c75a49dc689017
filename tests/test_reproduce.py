"""reproduce.py: what a run needs from the files it finds, and the four models end to end on the coloured shapes."""
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, in_process

# main.py flags for a tiny budget: 64 training triplets (2 steps of 32), 40 val and 40 test triplets, 32 px images
TINY = ['--no-pretrained', '--image-size', '32', '--batch-size', '32', '--num_valtriplets', '40',
        '--num_testtriplets', '40', '--lr', '1e-3', '--log-interval', '1']


def reproduce(*args, monkeypatch=None):
    """reproduce.py ARGS through a new Python and its main.py children, or, given monkeypatch, in this process with each
    main.py run in this process too (the same code, without starting Python and torch again for each of its runs)."""
    if monkeypatch is None:
        p = subprocess.run([sys.executable, os.path.join(REPO, 'reproduce.py'), *map(str, args)], capture_output=True,
                           text=True, timeout=900, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    else:
        import main
        import reproduce as rp

        def run_main_here(argv, log_path):  # reproduce.run_main without the child process: same line, log, status
            print(f'\n$ {shlex.join(["main.py", *argv])}', flush=True)
            t0 = time.time()
            code, out, err = in_process(main.main, argv)
            sys.stdout.write(out)
            sys.stderr.write(err)
            with open(log_path, 'a') as log:
                log.write(out)
            return code, time.time() - t0
        monkeypatch.setattr(rp, 'run_main', run_main_here)
        p = subprocess.CompletedProcess(['reproduce.py', *args], *in_process(rp.main, args))
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


@pytest.mark.slow
def test_the_study_end_to_end_then_reused_then_one_retested_then_one_resumed(shapes_data, tmp_path, monkeypatch):
    runs = tmp_path / 'runs'
    common = ['--data', shapes_data, '--runs', runs, '--budgets', 64, 32, '--seeds', 1, 2, '--seen', 64, *TINY]
    p = reproduce(*common, monkeypatch=monkeypatch)
    cmds = launched(p.stdout)
    assert len(cmds) == 32 and sum('--test' in c for c in cmds) == 16
    train = [c for c in cmds if '--test' not in c]
    # seed by seed, the largest budget first, the four models at each: the same triplets, epochs and seed for every
    # model at a budget
    assert ['--seed 1' in c for c in train] == [True] * 8 + [False] * 8
    assert all('--num_traintriplets 64 ' in c and '--epochs 1' in c for c in train[:4])
    assert all('--num_traintriplets 32 ' in c and '--epochs 2' in c for c in train[4:8])
    assert '--model task' in train[1] and '--learned' in train[3]
    pictures = [c for c in cmds if '--test' in c and '--pictures' in c.split()]
    assert len(pictures) == 4 and all('_n64_s1/' in c for c in pictures)  # the largest budget's first seed only
    rep = json.load(open(runs / 'reproduce' / 'reproduce.json'))
    assert set(rep['models']) == {'triplet', 'task', 'csn_fixed', 'csn_learned'}
    for model, per_budget in rep['models'].items():
        assert set(per_budget) == {'32', '64'}
        for b, d in per_budget.items():
            accs = [json.load(open(runs / f'repro_{model}_n{b}_s{s}' / 'test_results.json'))['accuracy'] for s in (1, 2)]
            assert d['seeds'] == [1, 2] and d['accuracy'] == accs
            assert d['accuracy_mean'] == pytest.approx(np.mean(accs))
            assert d['accuracy_std'] == pytest.approx(np.std(accs, ddof=1))
            assert set(d['per_notion_mean']) == {'colour', 'shape'}
    assert set(rep['claims']) == set('abcde')
    assert all(v in ('holds', 'does not hold', 'inconclusive') for v in rep['claims'].values())
    assert rep['claims']['e'] == 'inconclusive' and 'no label for a probe' in rep['probe_task']
    assert rep['masks']['per_seed'] and len(rep['masks']['per_seed']) == 2
    ratio = rep['models']['task']['64']['parameters'] / rep['models']['csn_fixed']['64']['parameters']
    assert 1.9 < ratio < 2.1                                            # two notions: two backbones against one
    for f in ('report.md', 'curve.png', 'masks.png'):
        assert os.path.getsize(runs / 'reproduce' / f) > 500
    text = (runs / 'reproduce' / 'report.md').read_text()
    for s in ('standard triplet network', 'CSN, learned masks', '| colour | shape | overall |', '(a) the standard',
              '(e) the CSN', 'Runs finished: 16 of 16', '| 1, 2 |', ' ± '):
        assert s in text, text

    name = 'repro_task_n32_s2'
    stamps = {d: os.stat(runs / d / 'test_results.json').st_mtime_ns for d in os.listdir(runs) if d.startswith('repro_')}
    p = reproduce(*common, monkeypatch=monkeypatch)
    assert launched(p.stdout) == [] and p.stdout.count('finished, reused') == 16
    os.remove(runs / name / 'test_results.json')
    p = reproduce(*common, monkeypatch=monkeypatch)
    cmds = launched(p.stdout)
    assert len(cmds) == 1 and '--test' in cmds[0] and f'{name}/model_best.pth.tar' in cmds[0]
    assert all(os.stat(runs / d / 'test_results.json').st_mtime_ns == t for d, t in stamps.items() if d != name)

    # more compute for the same budgets: every run continues from its checkpoint, only the new epochs are trained
    p = reproduce('--data', shapes_data, '--runs', runs, '--budgets', 64, 32, '--seeds', 1, '--seen', 128, *TINY,
                  '--models', 'csn_fixed', monkeypatch=monkeypatch)
    cmds = launched(p.stdout)
    assert len(cmds) == 4 and all('--resume' in c for c in cmds[::2])
    assert 'repro_csn_fixed_n64_s1/checkpoint.pth.tar' in cmds[0] and 'repro_csn_fixed_n32_s1/checkpoint.pth.tar' in cmds[2]
    with open(runs / 'repro_csn_fixed_n32_s1' / 'metrics.jsonl') as f:
        assert [json.loads(line)['epoch'] for line in f] == [1, 2, 3, 4]


@pytest.mark.slow
def test_the_real_command_line_trains_and_tests_in_child_processes(shapes_data, tmp_path):
    """The path the study above replaces: reproduce.py in a new Python, main.py in child processes, output kept."""
    runs = tmp_path / 'runs'
    p = reproduce('--data', shapes_data, '--runs', runs, '--budgets', 32, '--seeds', 1, '--epochs', 1, '--models',
                  'csn_fixed', '--no-probe', *TINY)
    cmds = launched(p.stdout)
    assert len(cmds) == 2 and all(c.startswith(os.path.join(REPO, 'main.py') + ' ') for c in cmds), cmds
    run = runs / 'repro_csn_fixed_n32_s1'
    res = json.load(open(run / 'test_results.json'))
    assert set(res['per_notion']) == {'colour', 'shape'}
    log = (run / 'reproduce.log').read_text()
    assert 'epoch   1' in log and 'test results of' in log  # the children's output, shown and kept
    assert 'Runs finished: 1 of 1' in (runs / 'reproduce' / 'report.md').read_text()


def test_a_run_trained_with_other_settings_is_not_reused(shapes_data, tmp_path):
    runs = tmp_path / 'runs' / 'repro_triplet_n64_s1'
    runs.mkdir(parents=True)
    torch.save({'next_epoch': 2, 'next_step': 0, 'args': {'num_traintriplets': 999, 'seed': 1}},
               runs / 'checkpoint.pth.tar')
    p = subprocess.run([sys.executable, os.path.join(REPO, 'reproduce.py'), '--data', shapes_data, '--runs',
                        tmp_path / 'runs', '--epochs', '1', '--budgets', '64', '--models', 'triplet', *TINY],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and 'num_traintriplets 999' in p.stderr and 'another --prefix' in p.stderr


def summary_of(**models):
    """{model: {budget: accuracies over seeds}} -> what reproduce.summarise gives."""
    from reproduce import mean_std
    out = {}
    for m, per in models.items():
        for b, accs in per.items():
            mu, sd = mean_std(accs)
            out.setdefault(m, {})[b] = {'seeds': list(range(1, len(accs) + 1)), 'accuracy_mean': mu, 'accuracy_std': sd,
                                        'parameters': 4_000_000 if m == 'task' else 1_000_000}
    return out


def test_claims_follow_the_one_standard_deviation_rule():
    from reproduce import claim_a, claim_b, claim_c, claim_e, compare, mean_std
    p = lambda accs: dict(zip(('mean', 'std'), mean_std(accs)), n=len(accs))
    assert compare(p([0.80, 0.82, 0.81]), p([0.70, 0.71, 0.69]))[0] == 'holds'
    assert compare(p([0.70, 0.71, 0.69]), p([0.80, 0.82, 0.81]))[0] == 'does not hold'
    assert compare(p([0.80, 0.70, 0.75]), p([0.74, 0.73, 0.75]))[0] == 'inconclusive'      # within one sd
    assert compare(p([0.90]), p([0.50]))[0] == 'inconclusive'                              # one seed: no error bar
    worst = summary_of(triplet={9: [0.60, 0.61, 0.62]}, task={9: [0.80, 0.81, 0.79]},
                       csn_fixed={9: [0.82, 0.80, 0.81]}, csn_learned={9: [0.81, 0.80, 0.83]})
    assert claim_a(worst, 9)[0] == 'holds' and claim_b(worst, 9)[0] == 'holds'   # CSN ties task within one sd
    assert '4.00x' in claim_b(worst, 9)[1]
    not_worst = summary_of(triplet={9: [0.90, 0.91, 0.92]}, task={9: [0.80, 0.81, 0.79]},
                           csn_fixed={9: [0.82, 0.80, 0.81]})
    assert claim_a(not_worst, 9)[0] == 'does not hold'
    below = summary_of(task={9: [0.90, 0.91, 0.92]}, csn_fixed={9: [0.80, 0.81, 0.79]}, csn_learned={9: [0.8, 0.8, 0.81]})
    assert claim_b(below, 9)[0] == 'does not hold'
    mixed = summary_of(task={9: [0.80, 0.81, 0.79]}, csn_fixed={9: [0.90, 0.91, 0.92]}, csn_learned={9: [0.7, 0.71, 0.72]})
    assert claim_b(mixed, 9)[0] == 'inconclusive'                       # the two CSNs disagree
    catch_up = summary_of(csn_fixed={1: [0.70, 0.71, 0.72], 2: [0.80, 0.81, 0.79]},
                          csn_learned={1: [0.60, 0.61, 0.62], 2: [0.80, 0.82, 0.81]})
    assert claim_c(catch_up, [1, 2])[0] == 'holds'
    never = summary_of(csn_fixed={1: [0.70, 0.71, 0.72], 2: [0.80, 0.81, 0.79]},
                       csn_learned={1: [0.60, 0.61, 0.62], 2: [0.70, 0.71, 0.69]})
    assert claim_c(never, [1, 2])[0] == 'does not hold'
    ahead_early = summary_of(csn_fixed={1: [0.60, 0.61, 0.62], 2: [0.80, 0.81, 0.79]},
                             csn_learned={1: [0.70, 0.71, 0.72], 2: [0.80, 0.82, 0.81]})
    assert claim_c(ahead_early, [1, 2])[0] == 'does not hold'
    assert claim_c(catch_up, [1])[0] == 'inconclusive'
    probe = {'triplet': p([0.3, 0.31, 0.29]), 'csn_fixed': p([0.5, 0.52, 0.51]), 'csn_learned': p([0.45, 0.5, 0.48]),
             'random': p([0.1, 0.1, 0.1])}
    assert claim_e(probe)[0] == 'holds' and 'untrained) 10.00 ± 0.00 %, below every trained' in claim_e(probe)[1]
    probe['random'] = p([0.6, 0.6, 0.6])                                 # as on Fonts at a small budget
    assert 'above every trained backbone' in claim_e(probe)[1]
    probe['random'] = p([0.4, 0.4, 0.4])
    assert 'between the trained backbones' in claim_e(probe)[1]
    assert 'untrained' not in claim_e({k: v for k, v in probe.items() if k != 'random'})[1]
    assert claim_e(None)[0] == 'inconclusive'


def test_mask_stats_tell_disjoint_from_shared_masks():
    from reproduce import claim_d, mask_stats
    disjoint = np.kron(np.eye(4), np.ones(16))                          # the fixed masks: (4, 64)
    s = mask_stats(disjoint)
    assert s['sparse'] == pytest.approx(0.75) and s['overlap'] == 0 and s['active'] == [16] * 4
    shared = np.tile(np.r_[np.ones(8), np.zeros(56)], (4, 1))           # every notion on the same 8 dimensions
    s = mask_stats(shared)
    assert s['sparse'] == pytest.approx(56 / 64) and s['overlap'] == pytest.approx(1.0)
    rows = {('csn_learned', 9, 1): {'masks': shared.tolist()}, ('csn_learned', 9, 2): {'masks': shared.tolist()}}
    assert claim_d(rows, 9)[0] == 'holds'
    rows = {('csn_learned', 9, 1): {'masks': disjoint.tolist()}}
    assert claim_d(rows, 9)[0] == 'does not hold'                       # sparse, but nothing shared


def test_probe_reads_features_of_the_trained_backbone_and_learns_a_visible_label(shapes_data):
    from csn import ConditionalSimNet
    from csnlib import probe
    from Resnet_18 import EmbeddingNet
    from triplet_image_loader import load_dataset_info
    from tripletnet import TripletNet
    info = load_dataset_info(shapes_data)
    names = info.filenames
    with open(info.labels_file) as f:
        rows = [line.strip().split(',') for line in f][1:]
    # pretend the colour is the font family and the shape the character: a fonts-style labels.csv
    with open(info.labels_file, 'w') as f:
        f.write('image,character,font,split\n' + ''.join(f'{r[0]},{r[2]},{r[1]},{"test" if i % 2 else "train"}\n'
                                                          for i, r in enumerate(rows)))
    info = load_dataset_info(shapes_data)
    task = probe.probe_task(info)
    assert len(task['images']) == len(names) // 2 and 0 < task['fit'].sum() < len(task['images'])
    assert set(task['labels']) == {'red', 'blue'} and 'font family' in task['description']
    torch.manual_seed(0)
    model = TripletNet(ConditionalSimNet(EmbeddingNet(16), 2, 16))
    model.eval()
    net = probe.backbone(model.state_dict()).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(net(x), model.embednet.embed(x), atol=1e-5)   # the checkpoint's own backbone
    feats = probe.pooled_features(net, info, task['images'], 32)
    assert feats.shape == (len(task['images']), 256)
    assert probe.linear_probe(feats, task['labels'], task['fit']) > 0.9       # colour shows in any backbone's features
    shuffled = np.random.default_rng(0).permutation(task['labels'])
    assert probe.linear_probe(feats, shuffled, task['fit']) < 0.8             # labels unrelated to the images
    assert probe.probe_task(load_dataset_info(shapes_data)) is not None
