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

from conftest import REPO, error_line, in_process

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
    torch.save({'next_epoch': 4, 'next_step': 0, 'args': {}, 'stopped': 'plateau'}, run / 'checkpoint.pth.tar')
    assert plan(str(run), 10)[0] == 'test'                              # stopped at a plateau: not trained on


@pytest.mark.slow
def test_the_study_end_to_end_then_reused_then_one_retested_then_one_resumed(shapes_data, tmp_path, monkeypatch):
    runs, results = tmp_path / 'runs', tmp_path / 'results'
    common = ['--data', shapes_data, '--runs', runs, '--results', results, '--budgets', 64, 32, '--seeds', 1, 2,
              '--seen', 64, *TINY]
    p = reproduce(*common, monkeypatch=monkeypatch)
    cmds = launched(p.stdout)
    assert len(cmds) == 32 and sum('--test' in c for c in cmds) == 16
    train = [c for c in cmds if '--test' not in c]
    # seed by seed, the largest budget first, the four models at each: the same triplets, epochs and seed for every
    # model at a budget; --lr passed on: no sweep, every run at that rate
    assert ['--seed 1' in c for c in train] == [True] * 8 + [False] * 8
    assert all('--num_traintriplets 64 ' in c and '--epochs 1' in c for c in train[:4])
    assert all('--num_traintriplets 32 ' in c and '--epochs 2' in c for c in train[4:8])
    assert all('--patience 0' in c and '--lr 0.001' in c for c in train)  # --seen: equal compute, no plateau rule
    assert '--model task' in train[1] and '--learned' in train[3]
    pictures = [c for c in cmds if '--test' in c and '--pictures' in c.split()]
    assert len(pictures) == 4 and all('_n64_s1_lr1e-3/' in c for c in pictures)  # the largest budget's first seed
    rep = json.load(open(results / 'reproduce.json'))
    assert set(rep['models']) == {'triplet', 'task', 'csn_fixed', 'csn_learned'}
    for model, per_budget in rep['models'].items():
        assert set(per_budget) == {'32', '64'}
        for b, d in per_budget.items():
            name = f'repro_{model}_n{b}_s{{}}_lr1e-3'
            accs = [json.load(open(runs / name.format(s) / 'test_results.json'))['accuracy'] for s in (1, 2)]
            assert d['seeds'] == [1, 2] and d['accuracy'] == accs
            assert d['accuracy_mean'] == pytest.approx(np.mean(accs))
            assert d['accuracy_std'] == pytest.approx(np.std(accs, ddof=1))
            assert set(d['per_notion_mean']) == {'colour', 'shape'}
            assert d['stopped'] == ['seen', 'seen'] and d['epochs_trained'] == [64 // int(b)] * 2
            for s_, best in zip((1, 2), d['best_epoch']):                # the record says what the run did
                rec = json.load(open(results / f'{name.format(s_)}.json'))
                metrics = [json.loads(x) for x in open(runs / name.format(s_) / 'metrics.jsonl')]
                assert rec['metrics'] == metrics and rec['test']['accuracy'] == accs[s_ - 1]
                assert best == max(metrics, key=lambda m: m['val_acc'])['epoch']
                assert (rec['masks'] is None) == (model in ('triplet', 'task'))
                machine = rec['machine']                                   # which machine gave the figure
                assert machine['cores'] == os.cpu_count() and machine['torch'] == torch.__version__
                assert machine['cpu'] and isinstance(machine['bf16'], bool)
            learned = model == 'csn_learned'
            assert (d['masks_start'] is not None) == learned and (d['masks_change'] is not None) == learned
    assert set(rep['claims']) == set('abcde') and set(rep['claims_ci']) == set('abcde')
    assert all(v in ('holds', 'does not hold', 'inconclusive') for v in rep['claims'].values())
    for entry in rep['claims_ci']['a']:                                # in points, from the per-seed accuracies
        a, b = (rep['models'][m]['64']['accuracy'] for m in entry['models'])
        assert entry['difference'] == pytest.approx(100 * (np.mean(a) - np.mean(b)))
        assert entry['ci95'][0] <= entry['difference'] <= entry['ci95'][1]
    assert rep['claims']['e'] == 'inconclusive' and 'no label for a probe' in rep['probe_task']
    assert rep['masks']['per_seed'] and len(rep['masks']['per_seed']) == 2
    assert len(rep['masks_start']['per_seed']) == 2 and len(rep['masks_change']) == 2
    ratio = rep['models']['task']['64']['parameters'] / rep['models']['csn_fixed']['64']['parameters']
    assert 1.9 < ratio < 2.1                                            # two notions: two backbones against one
    for f in ('report.md', 'curve.png', 'masks.png'):
        assert os.path.getsize(results / f) > 500
    text = (results / 'report.md').read_text()
    for s_ in ('standard triplet network', 'CSN, learned masks', '| colour | shape | overall |', '(a) the standard',
               '(e) the CSN', 'Runs finished: 16 of 16', '| 1, 2 |', ' ± ', '95 % CI', 'seen, seen',
               'false verdict 5%'):
        assert s_ in text, text
    from csnlib.claims import machine_tag
    assert f"the runs' machines: {machine_tag(machine)} (16 runs)." in text

    # a fresh clone: the records alone rebuild the same report, with no dataset, run or checkpoint
    clone = tmp_path / 'clone'
    clone.mkdir()
    os.rename(results, clone / 'results')
    p = reproduce('--report-only', '--results', clone / 'results', '--out-dir', clone / 'report',
                  monkeypatch=monkeypatch)
    assert launched(p.stdout) == []
    assert (clone / 'report' / 'report.md').read_text() == text
    assert all(os.path.getsize(clone / 'report' / f) > 500 for f in ('curve.png', 'masks.png'))
    # a record that lost its probe, with no checkpoint here to compute it: named, not silently left out
    path = clone / 'results' / 'repro_csn_fixed_n64_s2_lr1e-3.json'
    kept = path.read_text()
    rec = json.loads(kept)
    del rec['probe']
    path.write_text(json.dumps(rec))
    p = reproduce('--report-only', '--results', clone / 'results', '--out-dir', clone / 'report2',
                  monkeypatch=monkeypatch)
    assert json.load(open(clone / 'report2' / 'reproduce.json'))['probe_missing'] == ['repro_csn_fixed_n64_s2_lr1e-3']
    assert 'left out of claim (e): repro_csn_fixed_n64_s2_lr1e-3.' in (clone / 'report2' / 'report.md').read_text()
    assert 'repro_csn_fixed_n64_s2_lr1e-3 has no probe' in p.stdout
    path.write_text(kept)
    os.rename(clone / 'results', results)

    # the same command again: the recorded runs are not trained again, even with their run folders gone (a study
    # continued on another machine)
    name = 'repro_task_n32_s2_lr1e-3'
    os.rename(runs, tmp_path / 'runs_aside')
    p = reproduce(*common, monkeypatch=monkeypatch)
    assert launched(p.stdout) == [] and p.stdout.count('recorded, not trained again') == 16
    assert not runs.exists()  # every run recorded: nothing written under --runs (the report goes to --results)
    os.rename(tmp_path / 'runs_aside', runs)
    stamps = {d: os.stat(runs / d / 'test_results.json').st_mtime_ns
              for d in os.listdir(runs) if d.startswith('repro_')}
    # a run without a record or test results is only tested
    os.remove(results / f'{name}.json')
    os.remove(runs / name / 'test_results.json')
    p = reproduce(*common, monkeypatch=monkeypatch)
    cmds = launched(p.stdout)
    assert len(cmds) == 1 and '--test' in cmds[0] and f'{name}/model_best.pth.tar' in cmds[0]
    assert all(os.stat(runs / d / 'test_results.json').st_mtime_ns == t for d, t in stamps.items() if d != name)
    assert (results / f'{name}.json').exists()

    # more compute for the same budgets: every run continues from its checkpoint, only the new epochs are trained
    p = reproduce('--data', shapes_data, '--runs', runs, '--results', results, '--budgets', 64, 32, '--seeds', 1,
                  '--seen', 128, *TINY, '--models', 'csn_fixed', monkeypatch=monkeypatch)
    cmds = launched(p.stdout)
    assert len(cmds) == 4 and all('--resume' in c for c in cmds[::2])
    assert 'repro_csn_fixed_n64_s1_lr1e-3/checkpoint.pth.tar' in cmds[0]
    assert 'repro_csn_fixed_n32_s1_lr1e-3/checkpoint.pth.tar' in cmds[2]
    with open(runs / 'repro_csn_fixed_n32_s1_lr1e-3' / 'metrics.jsonl') as f:
        assert [json.loads(line)['epoch'] for line in f] == [1, 2, 3, 4]
    assert json.load(open(results / 'repro_csn_fixed_n32_s1_lr1e-3.json'))['epochs_trained'] == 4


@pytest.mark.slow
def test_the_sweep_picks_the_best_common_rate_and_runs_train_until_plateau(shapes_data, tmp_path, monkeypatch):
    """Two rates for two models at the larger budget, until plateau (patience 1, cap 2); then the study at the chosen
    rate, reusing the sweep's runs at that rate."""
    runs, results = tmp_path / 'runs', tmp_path / 'results'
    tiny = [f for f in TINY if f not in ('--lr', '1e-3')]
    p = reproduce('--data', shapes_data, '--runs', runs, '--results', results, '--budgets', 64, 32, '--seeds', 1,
                  '--models', 'triplet', 'csn_fixed', '--sweep-lrs', 1e-3, 3e-3, '--sweep-budget', 64, '--patience', 1,
                  '--epochs', 2, '--no-probe', *tiny, monkeypatch=monkeypatch)
    train = [c for c in launched(p.stdout) if '--test' not in c]
    assert len(train) == 6 and all('--patience 1' in c and '--epochs 2' in c for c in train)
    assert [c.split('--lr ')[1].split()[0] for c in train[:4]] == ['0.001', '0.001', '0.003', '0.003']
    recs = {f[:-5]: json.load(open(results / f)) for f in os.listdir(results) if f.startswith('repro_')}
    assert len(recs) == 6
    for r in recs.values():                                            # the stop reason follows the plateau rule
        assert r['stopped'] in ('plateau', 'cap') and r['epochs_trained'] == len(r['metrics'])
        assert (r['stopped'] == 'plateau') == (r['epochs_trained'] - r['best_epoch'] >= 1)
        assert (r['metrics'][-1]['stopped'] == r['stopped']
                and r['best_val_acc'] == max(m['val_acc'] for m in r['metrics']))
    mean = {lr: np.mean([recs[f'repro_{m}_n64_s1_lr{lr}']['best_val_acc'] for m in ('triplet', 'csn_fixed')])
            for lr in ('1e-3', '3e-3')}
    chosen = max(mean, key=mean.get)
    assert (all(f'--lr {float(chosen)}' in c for c in train[4:])
            and all('--num_traintriplets 32 ' in c for c in train[4:]))
    rep = json.load(open(results / 'reproduce.json'))
    assert rep['settings']['lr'] == float(chosen) and rep['sweep']['chosen'] == float(chosen)
    text = (results / 'report.md').read_text()
    assert f'The study uses lr {chosen}' in text and '| 1e-3 |' in text and '| 3e-3 |' in text
    assert f'{mean[chosen] * 100:.2f} |' in text


@pytest.mark.slow
def test_masks_that_did_not_move_match_their_rebuilt_start(shapes_data, tmp_path, monkeypatch):
    """A learned-mask run at a learning rate too small to move anything: its record's trained masks are the start
    rebuilt from the seed, and claim (d) says the masks did not train."""
    runs, results = tmp_path / 'runs', tmp_path / 'results'
    tiny = [f for f in TINY if f not in ('--lr', '1e-3')]
    reproduce('--data', shapes_data, '--runs', runs, '--results', results, '--budgets', 32, '--seeds', 1, 2, '--epochs',
              1, '--models', 'csn_learned', '--no-probe', *tiny, '--lr', '1e-9', monkeypatch=monkeypatch)
    for seed in (1, 2):
        rec = json.load(open(results / f'repro_csn_learned_n32_s{seed}_lr1e-9.json'))
        trained, start = np.array(rec['masks']), np.array(rec['masks_start'])
        assert trained.shape == (2, 64) and np.abs(trained - start).max() < 1e-5
    assert not np.allclose(json.load(open(results / 'repro_csn_learned_n32_s1_lr1e-9.json'))['masks_start'],
                           json.load(open(results / 'repro_csn_learned_n32_s2_lr1e-9.json'))['masks_start'])
    rep = json.load(open(results / 'reproduce.json'))
    assert rep['claims']['d'] == 'inconclusive' and rep['claims_reason']['d'] == 'the masks did not train'
    assert rep['masks_change'][0]['mean_abs_change'] < 1e-5
    assert 'inconclusive: the masks did not train' in (results / 'report.md').read_text()


@pytest.mark.slow
def test_the_real_command_line_trains_and_tests_in_child_processes(shapes_data, tmp_path):
    """The path the study above replaces: reproduce.py in a new Python, main.py in child processes, output kept."""
    runs = tmp_path / 'runs'
    p = reproduce('--data', shapes_data, '--runs', runs, '--results', tmp_path / 'results', '--budgets', 32, '--seeds',
                  1, '--epochs', 1, '--models', 'csn_fixed', '--no-probe', *TINY)
    cmds = launched(p.stdout)
    assert len(cmds) == 2 and all(c.startswith(os.path.join(REPO, 'main.py') + ' ') for c in cmds), cmds
    run = runs / 'repro_csn_fixed_n32_s1_lr1e-3'
    res = json.load(open(run / 'test_results.json'))
    assert set(res['per_notion']) == {'colour', 'shape'}
    log = (run / 'reproduce.log').read_text()
    assert 'epoch   1' in log and 'test results of' in log  # the children's output, shown and kept
    assert 'Runs finished: 1 of 1' in ((tmp_path / 'results') / 'report.md').read_text()
    assert json.load(open(tmp_path / 'results' / 'repro_csn_fixed_n32_s1_lr1e-3.json'))['stopped'] == 'cap'


def test_a_run_trained_with_other_settings_is_not_reused(shapes_data, tmp_path):
    runs = tmp_path / 'runs' / 'repro_triplet_n64_s1_lr1e-3'
    runs.mkdir(parents=True)
    torch.save({'next_epoch': 2, 'next_step': 0, 'args': {'num_traintriplets': 999, 'seed': 1}},
               runs / 'checkpoint.pth.tar')
    p = subprocess.run([sys.executable, os.path.join(REPO, 'reproduce.py'), '--data', shapes_data, '--runs',
                        tmp_path / 'runs', '--results', tmp_path / 'results', '--epochs', '1', '--budgets', '64',
                        '--models', 'triplet', *TINY], capture_output=True, text=True, timeout=300)
    line = error_line(p)                                                 # exit status 2, one line, no traceback
    assert 'num_traintriplets 999' in line and 'another --prefix' in line
    # a record made with other settings is refused the same way
    (tmp_path / 'results').mkdir(exist_ok=True)
    (tmp_path / 'results' / 'repro_triplet_n64_s1_lr1e-3.json').write_text(json.dumps(
        {'args': {'num_traintriplets': 64, 'seed': 1, 'image_size': 64}, 'stopped': 'plateau', 'epochs_cap': 1}))
    import reproduce as rp
    line = error_line(in_process(rp.main, ['--data', shapes_data, '--runs', tmp_path / 'runs', '--results',
                                           tmp_path / 'results', '--epochs', '1', '--budgets', '64', '--models',
                                           'triplet', *TINY]))
    assert 'repro_triplet_n64_s1_lr1e-3.json was trained with --image_size 64 (asked: 32)' in line
    line = error_line(in_process(rp.main, ['--report-only', '--results', tmp_path / 'nothing']))
    assert 'study.json not found' in line
    line = error_line(in_process(rp.main, ['--data', shapes_data, '--results', tmp_path / 'r', '--name', 'x']))
    assert '--name is set by reproduce.py itself' in line


def test_signals_reach_main_and_its_mid_epoch_checkpoint(shapes_data, tmp_path):
    """SIGTERM to reproduce.py (what a scheduler sends) is passed on to main.py, which saves its checkpoint and exits;
    reproduce.py then exits 130 and leaves no process behind."""
    import signal
    cmd = [sys.executable, os.path.join(REPO, 'reproduce.py'), '--data', shapes_data, '--runs', tmp_path / 'runs',
           '--results', tmp_path / 'results', '--budgets', '640', '--epochs', '50', '--patience', '0', '--models',
           'csn_fixed', '--no-probe', *TINY]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    for line in proc.stdout:                                            # wait until main.py is training
        if line.startswith('epoch 1 step'):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and 'SIGTERM passed on to main.py' in err, (out, err)
    ck = torch.load(tmp_path / 'runs' / 'repro_csn_fixed_n640_s1_lr1e-3' / 'checkpoint.pth.tar', weights_only=True)
    assert ck['stopped'] == 'interrupted' and ck['next_epoch'] == 1 and ck['next_step'] > 0
    assert 'stopped: interrupted at epoch 1' in out
    assert not (tmp_path / 'results' / 'repro_csn_fixed_n640_s1_lr1e-3.json').exists()


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

    # the pitch probe: families of glyphs, each of one pitch (here the colour, which shows); fitted on half of the
    # families of each pitch, scored on the others by balanced accuracy
    with open(info.labels_file, 'w') as f:
        f.write('image,character,font,split,pitch\n' + ''.join(
            f'{r[0]},{r[2]},{r[1]}{i % 6},{"val" if i % 3 else "train"},'
            f'{"fixed" if r[1] == "red" else "proportional"}\n'
            for i, r in enumerate(rows)))
    info = load_dataset_info(shapes_data)
    tasks = probe.probe_tasks(info)
    assert set(tasks) == {'pitch'}                                      # no test split: no family probe
    t = tasks['pitch']
    fams = np.array([f'{rows[i][1]}{i % 6}' for i in t['images']])
    assert t['balanced'] and not set(fams[t['fit']]) & set(fams[~t['fit']])   # no family on both sides
    assert set(t['labels'][t['fit']]) == set(t['labels'][~t['fit']]) == {'fixed', 'proportional'}
    feats = probe.pooled_features(net, info, t['images'], 32)
    assert probe.linear_probe(feats, t['labels'], t['fit'], balanced=True) > 0.9
    acc = probe.probe_all(net, 32, info, tasks)
    assert acc['pitch'] == pytest.approx(probe.linear_probe(feats, t['labels'], t['fit'], balanced=True))
    one = np.array(['a'] * 30 + ['b'] * 10)                             # balanced accuracy: the mean of per-class
    fit = np.r_[np.ones(15, bool), np.zeros(15, bool), np.ones(5, bool), np.zeros(5, bool)]
    x = np.r_[np.zeros(30), np.ones(10)][:, None] + np.r_[np.zeros(30), np.zeros(5), np.zeros(5) - 1][:, None]
    # class b's scored half looks like class a: per-class accuracy 1 and 0, balanced 0.5, plain 0.75
    assert probe.linear_probe(x, one, fit, balanced=True) == pytest.approx(0.5)
    assert probe.linear_probe(x, one, fit) == pytest.approx(0.75)


def test_the_paper_s_four_models_by_default_and_csn_s_successors_on_request(tmp_path):
    import reproduce as rp
    parser = rp.build_parser()
    argv = ['--data', str(tmp_path), '--results', str(tmp_path / 'r')]
    args, passthrough = rp.resolve(parser, *parser.parse_known_args(argv), argv)
    # the original's arithmetic unless asked otherwise: three backbone calls per step
    assert args.models == ['triplet', 'task', 'csn_fixed', 'csn_learned'] and passthrough == ['--three-forwards']
    argv += ['--models', 'csn_fixed', 'asen', 'scenet', '--lr', '1e-3']
    args, passthrough = rp.resolve(parser, *parser.parse_known_args(argv), argv)
    assert args.models == ['csn_fixed', 'asen', 'scenet'] and passthrough == ['--lr', '1e-3', '--three-forwards']
    args, passthrough = rp.resolve(parser, *parser.parse_known_args(argv + ['--three-forwards']), argv)
    assert passthrough == ['--lr', '1e-3', '--three-forwards']                       # not twice
    args, passthrough = rp.resolve(parser, *parser.parse_known_args(argv + ['--one-forward']), argv)
    assert passthrough == ['--lr', '1e-3']
    code, _, err = in_process(rp.main, [*argv, '--one-forward', '--three-forwards'])   # a usage error
    assert code == 2 and '--one-forward and --three-forwards (passed on to main.py) contradict' in err
    from csnlib.claims import MODELS, paper_error
    flags = {m[0]: m[2] for m in MODELS}
    assert flags['asen'] == ['--model', 'asen'] and flags['scenet'] == ['--model', 'scenet', '--scenet-branch', 'pair']
    assert paper_error('asen') == '—' and paper_error('csn_fixed') == '10.79'


def test_the_checks_list_each_notion_alone_and_the_other_arithmetic_on_every_kind_of_study(shapes_data):
    import reproduce as rp
    parser = rp.build_parser()
    for extra, alone in (([], ['colour', 'shape']), (['--conditions', 'shape'], ['shape'])):
        argv = ['--data', shapes_data, '--budgets', '64', '--seeds', '1', '2', '--checks-at', '32', *extra]
        args, passthrough = rp.resolve(parser, *parser.parse_known_args(argv), argv)
        runs = rp.check_runs(args, passthrough, 1e-3, ['colour', 'shape'])
        names = [rp.run_name(args, v.key if v else m, b, s, lr) for m, b, s, lr, v in runs]
        assert len(names) == len(set(names)) == 2 * (4 + len(alone) + 4)
        assert all(b == 32 for _, b, _, _, _ in runs) and [s for _, _, s, _, _ in runs][::len(runs) // 2] == [1, 2]
        variants = [v for *_, v in runs if v]
        tasks = [v for v in variants if v.key.startswith('task-alone-')]
        assert [v.key[len('task-alone-'):] for v in tasks[:len(alone)]] == alone
        for v, n in zip(tasks, alone * 2):            # the notion alone, whatever subset the study was given
            assert v.flags == ['--conditions', n] and v.settings['conditions'] == [n]
            assert '--conditions' not in v.passthrough and v.settings['three_forwards']
        others = [v for v in variants if v.key.endswith('-one-forward')]
        assert len(others) == 8 and all('--three-forwards' not in v.passthrough and not v.settings['three_forwards']
                                        for v in others)
    argv = ['--data', shapes_data, '--one-forward', '--checks-at', '32', '--models', 'csn_fixed']
    args, passthrough = rp.resolve(parser, *parser.parse_known_args(argv), argv)
    runs = rp.check_runs(args, passthrough, 1e-3, ['colour', 'shape'])
    assert [v.key for *_, v in runs if v] == ['csn_fixed-three-forward']       # no task model: no alone runs
    assert rp.without_conditions(['--a', '--conditions', 'x', 'y', '--b', '--conditions=z', 'w']) == ['--a', '--b',
                                                                                                      'w']


@pytest.mark.slow
def test_the_checks_train_the_alone_and_other_arithmetic_runs_and_compare_them_paired(shapes_data, tmp_path,
                                                                                       monkeypatch):
    runs, results = tmp_path / 'runs', tmp_path / 'results'
    p = reproduce('--data', shapes_data, '--runs', runs, '--results', results, '--budgets', 64, '--seeds', 1, 2,
                  '--epochs', 1, '--models', 'task', '--checks-at', 64, '--no-probe', *TINY,
                  monkeypatch=monkeypatch)
    cmds = [c for c in launched(p.stdout) if '--test' not in c]
    assert len(cmds) == 8                     # per seed: the study's run, 2 notions alone, the other arithmetic
    alone = [c for c in cmds if '--name repro_task-alone-' in c]
    assert len(alone) == 4 and all('--conditions' in c and '--three-forwards' in c for c in alone)
    one = [c for c in cmds if '-one-forward_' in c]
    assert len(one) == 2 and all('--three-forwards' not in c for c in one)
    names = [c.split('--name ')[1].split()[0] for c in cmds]
    assert len(set(names)) == 8 and 'recorded, not trained again' not in p.stdout  # the study's runs at 64: once
    rep = json.load(open(results / 'reproduce.json'))
    t = rep['checks']['task_alone']
    for i, seed in enumerate((1, 2)):
        parts = [json.load(open(results / f'repro_task-alone-{n}_n64_s{seed}_lr1e-3.json'))['test'] for n in
                 ('colour', 'shape')]
        assert set(parts[0]['per_notion']) == {'colour'} and set(parts[1]['per_notion']) == {'shape'}
        want = sum(x['accuracy'] * x['triplets'] for x in parts) / sum(x['triplets'] for x in parts)
        assert t['values'][i] == pytest.approx(want)
        assert t['joint'][i] == json.load(open(results / f'repro_task_n64_s{seed}_lr1e-3.json'))['test']['accuracy']
    d = np.array(t['values']) - np.array(t['joint'])
    assert t['pair']['difference'] == pytest.approx(d.mean()) and t['seeds'] == [1, 2]
    f = rep['checks']['forwards']['task']
    assert rep['checks']['other_forwards'] == 'one' and f['seeds'] == [1, 2]
    assert f['other'][0] == json.load(open(results / 'repro_task-one-forward_n64_s1_lr1e-3.json'))['test']['accuracy']
    text = (results / 'report.md').read_text()
    assert 'Checks of the protocol at 64 training triplets' in text and 'Alone minus joint:' in text
    assert '| task-specific triplet networks | 1, 2 |' in text
    # a fresh clone rebuilds the same section from the records alone
    p = reproduce('--report-only', '--results', results, '--out-dir', tmp_path / 'again', monkeypatch=monkeypatch)
    assert json.load(open(tmp_path / 'again' / 'reproduce.json'))['checks'] == rep['checks']


@pytest.mark.slow
def test_copies_of_the_command_share_the_study_run_by_run(shapes_data, tmp_path, monkeypatch):
    """A run that another copy of the command holds is left to it (and out of this copy's report); the sweep waits
    for the other copies' runs, and takes over one that a copy left unfinished."""
    import types

    import reproduce as rp
    from csnlib.run_lock import RunLock
    runs, results = tmp_path / 'runs', tmp_path / 'results'
    common = ['--data', shapes_data, '--runs', runs, '--results', results, '--budgets', 32, '--seeds', 1,
              '--epochs', 1, '--models', 'triplet', 'csn_fixed', '--no-probe', *TINY]
    with RunLock(str(runs / 'repro_triplet_n32_s1_lr1e-3'), 'trains', rp.STUDY_LOCK):  # another copy holds it
        p = reproduce(*common, monkeypatch=monkeypatch)
    assert [c.split('--name ')[1].split()[0] for c in launched(p.stdout) if '--name' in c] == [
        'repro_csn_fixed_n32_s1_lr1e-3']
    assert 'repro_triplet_n32_s1_lr1e-3: left to the copy of this command that is training it' in p.stdout
    assert 'still being trained by other copies' in p.stdout
    assert 'Runs finished: 1 of 2' in (results / 'report.md').read_text()
    p = reproduce(*common, monkeypatch=monkeypatch)                      # released: trained here, the other reused
    assert len([c for c in launched(p.stdout) if '--name' in c]) == 1
    assert 'Runs finished: 2 of 2' in (results / 'report.md').read_text()

    # a run left to another copy that records it before this copy ends is not called "still being trained"
    record = results / 'repro_triplet_n32_s1_lr1e-3.json'
    kept = record.read_text()
    record.unlink()
    train_and_test = rp.train_and_test

    def other_copy_finishes(*a, **kw):
        out = train_and_test(*a, **kw)
        if out == 'busy':
            record.write_text(kept)                                     # the other copy writes its record
        return out
    monkeypatch.setattr(rp, 'train_and_test', other_copy_finishes)
    with RunLock(str(runs / 'repro_triplet_n32_s1_lr1e-3'), 'trains', rp.STUDY_LOCK):
        p = reproduce(*common, monkeypatch=monkeypatch)
    monkeypatch.setattr(rp, 'train_and_test', train_and_test)
    assert 'repro_triplet_n32_s1_lr1e-3: left to the copy' in p.stdout and 'still being trained' not in p.stdout
    assert 'Runs finished: 2 of 2' in (results / 'report.md').read_text()

    # the sweep: one of its runs is held when this copy gets to it, and released without a record while it waits
    held = RunLock(str(runs / 'repro_csn_fixed_n64_s1_lr3e-3'), 'trains', rp.STUDY_LOCK).__enter__()
    waits = []

    def sleep(seconds):                                                  # the other copy stops while this one waits
        waits.append(seconds)
        if held.fd is not None:
            held.__exit__(None, None, None)
    monkeypatch.setattr(rp, 'time', types.SimpleNamespace(time=time.time, sleep=sleep))
    tiny = [f for f in TINY if f not in ('--lr', '1e-3')]
    p = reproduce('--data', shapes_data, '--runs', runs, '--results', tmp_path / 'sweep', '--budgets', 64,
                  '--seeds', 1, '--epochs', 1, '--models', 'triplet', 'csn_fixed', '--sweep-lrs', 1e-3, 3e-3,
                  '--sweep-only', '--no-probe', *tiny, monkeypatch=monkeypatch)
    assert waits == [rp.WAIT_S]
    assert 'waiting for 1 sweep run(s) that other copies of this command are training (repro_csn_fixed_n64_s1_lr3e-3)' \
        in p.stdout
    names = [c.split('--name ')[1].split()[0] for c in launched(p.stdout) if '--name' in c]
    assert names[-1] == 'repro_csn_fixed_n64_s1_lr3e-3' and len(names) == 4   # taken over once it was free
    assert json.load(open((tmp_path / 'sweep') / 'reproduce.json'))['sweep']['chosen'] in (1e-3, 3e-3)


@pytest.mark.slow
def test_csn_and_its_successors_side_by_side_on_a_dataset_in_asens_layout(tmp_path, monkeypatch):
    """The same protocol on the fashion benchmarks' layout: every model's row, its parameters, and ASEN's protocol
    mAP where the model has an embedding per notion (SCE-Net has none)."""
    import get_data
    from conftest import make_asen_layout
    make_asen_layout(str(tmp_path / 'asen'))
    data = tmp_path / 'data'
    assert in_process(get_data.main, ['--dataset', 'asen', '--from', tmp_path / 'asen', '--out', data,
                                      '--train-triplets', 40, '--val-triplets', 12, '--test-triplets', 12])[0] == 0
    runs, results = tmp_path / 'runs', tmp_path / 'results'
    tiny = [f for f in TINY if f not in ('--num_valtriplets', '40', '--num_testtriplets')]
    reproduce('--data', data, '--runs', runs, '--results', results, '--budgets', 32, '--seeds', 1, 2, '--epochs', 1,
              '--models', 'csn_fixed', 'asen', 'scenet', '--no-probe', *tiny, '--num_valtriplets', 12,
              '--num_testtriplets', 12, monkeypatch=monkeypatch)
    rep = json.load(open(results / 'reproduce.json'))
    assert set(rep['models']) == {'csn_fixed', 'asen', 'scenet'}
    for m in ('csn_fixed', 'asen'):
        d = rep['models'][m]['32']
        protocol = [json.load(open(results / f'repro_{m}_n32_s{s}_lr1e-3.json'))['test']['protocol_mAP']
                    for s in (1, 2)]
        assert all(0 < v <= 1 for v in protocol) and d['protocol_mAP_mean'] == pytest.approx(np.mean(protocol))
    assert rep['models']['scenet']['32']['protocol_mAP_mean'] is None
    rec = json.load(open(results / 'repro_scenet_n32_s1_lr1e-3.json'))  # SCE-Net's K masks as it uses them: ReLU
    weights = torch.load(runs / 'repro_scenet_n32_s1_lr1e-3' / 'model_best.pth.tar',
                         weights_only=False)['state_dict']['embednet.masks.weight']
    assert (weights < 0).any() and np.allclose(rec['masks'], torch.relu(weights).float().numpy(), atol=1e-6)
    assert np.min(rec['masks_start']) == 0 and np.min(rec['masks']) == 0
    standing = {tuple(e['models']): e for e in rep['successors']}         # where they stand against CSN, paired
    assert set(standing) == {('asen', 'csn_fixed'), ('scenet', 'csn_fixed')}
    assert all(e['n'] == 2 and e['budget'] == 32 for e in standing.values())
    params = {m: rep['models'][m]['32']['parameters'] for m in rep['models']}
    assert params['asen'] > params['csn_fixed'] and params['scenet'] > params['csn_fixed']
    text = (results / 'report.md').read_text()
    assert '| protocol mAP | parameters |' in text and f'{params["asen"]:,}' in text
    assert 'ASEN (attention conditioned on the notion)' in text and 'SCE-Net (masks weighed per pair of images)' in text
    assert '| SCE-Net (masks weighed per pair of images) minus CSN, fixed disjoint masks | ' in text


def test_the_committed_study_report_is_the_one_its_records_give(tmp_path):
    """results/fonts/report.md and reproduce.json are generated: rebuilt from the committed records alone they come out
    the same (the time the call took aside), so a record added without its report, or a report edited by hand, fails."""
    import shutil

    import reproduce as rp
    committed = os.path.join(REPO, 'results', 'fonts')
    for f in os.listdir(committed):
        if f.endswith('.json') and f != 'reproduce.json':
            shutil.copy(os.path.join(committed, f), tmp_path / f)
    code, out, err = in_process(rp.main, ['--report-only', '--results', tmp_path], escape_fails=True)
    assert code == 0, err
    with open(os.path.join(committed, 'report.md')) as f:
        want = f.read()
    assert (tmp_path / 'report.md').read_text() == want, ('results/fonts/report.md is not what its records give: run '
                                                          'python reproduce.py --report-only --results results/fonts')
    got, kept = (json.load(open(p)) for p in (tmp_path / 'reproduce.json', os.path.join(committed, 'reproduce.json')))
    assert {k: v for k, v in got.items() if k != 'this_call_s'} == {k: v for k, v in kept.items() if k != 'this_call_s'}
    assert (tmp_path / 'curve.png').exists() == ('curve.png' in os.listdir(committed))


def test_the_grid_trains_more_seeds_where_asked_the_released_sce_net_at_its_budget_and_in_either_order():
    import argparse

    import reproduce as rp
    a = argparse.Namespace(budgets=[600, 2000, 6000, 20000], seeds=[1, 2], more_seeds=[3], more_seeds_at=[600, 20000],
                           released_scenet_at=2000, models=['csn_fixed', 'scenet'], order='seed')
    by_seed = [(m, b, s) for m, b, s, _ in rp.grid(a, 1e-3)]
    assert by_seed[:2] == [('csn_fixed', 20000, 1), ('scenet', 20000, 1)]  # seed by seed, the largest budget first
    assert {(b, s) for _, b, s in by_seed if s == 3} == {(600, 3), (20000, 3)}  # --more-seeds at --more-seeds-at only
    assert {(b, s) for m, b, s in by_seed if m == 'scenet_triplet'} == {(2000, 1), (2000, 2)}
    assert len(by_seed) == len(set(by_seed)) == 2 * 4 * 2 + 2 * 2 + 2
    by_budget = [(m, b, s) for m, b, s, _ in rp.grid(argparse.Namespace(**{**vars(a), 'order': 'budget'}), 1e-3)]
    assert sorted(by_budget) == sorted(by_seed)
    assert [b for _, b, _ in by_budget] == sorted(b for _, b, _ in by_budget)  # every seed of a budget before the next
    assert [s for _, b, s in by_budget if b == 600] == [1, 1, 2, 2, 3, 3]
    sweep = rp.sweep_grid(argparse.Namespace(**{**vars(a), 'sweep_budget': 2000, 'sweep_lrs': [1e-3]}))
    assert [m for m, _, _, _ in sweep] == ['csn_fixed', 'scenet']  # the released branch never votes on the rate


def test_a_model_whose_order_check_fails_has_no_vote_on_the_rate_and_two_datasets_are_not_pooled(tmp_path):
    import argparse

    import reproduce as rp
    from csnlib.errors import UserError
    a = argparse.Namespace(results=str(tmp_path), prefix='repro', sweep_lrs=[1e-3, 3e-3], sweep_budget=100, seeds=[1],
                           models=['csn_fixed', 'scenet'])
    acc = {('csn_fixed', 1e-3): 0.70, ('csn_fixed', 3e-3): 0.72, ('scenet', 1e-3): 0.95, ('scenet', 3e-3): 0.60}
    for (m, lr), v in acc.items():
        leak = {'order_check': {'leaks': m == 'scenet'}}
        rp.write_json(rp.record_path(a, rp.run_name(a, m, 100, 1, lr)),
                      {'best_val_acc': v, 'test': leak, 'epochs_trained': 5, 'best_epoch': 1, 'stopped': 'plateau'})
    _, best, why = rp.sweep_table(a)
    assert best == 3e-3 and 'left out, as their order check fails' in why  # with SCE-Net's vote: 1e-3
    recs = [{'run': 'x', 'dataset': {'sha256': 'a' * 64}}, {'run': 'y'}, {'run': 'z', 'dataset': {'sha256': 'b' * 64}}]
    assert rp.check_one_dataset(recs[:2]) == 'a' * 64
    with pytest.raises(UserError, match='2 different datasets'):
        rp.check_one_dataset(recs)


def test_rate_keeps_the_study_s_rate_and_the_report_says_what_the_sweep_s_rule_would_pick(tmp_path):
    import reproduce as rp
    results = tmp_path / 'results'
    a = rp.argparse.Namespace(results=str(results), prefix='repro', sweep_lrs=[1e-3, 3e-3], sweep_budget=100, seeds=[1],
                              models=['csn_fixed'])
    for lr, v in ((1e-3, 0.7), (3e-3, 0.6)):
        rp.write_json(rp.record_path(a, rp.run_name(a, 'csn_fixed', 100, 1, lr)),
                      {'best_val_acc': v, 'test': {}, 'epochs_trained': 5, 'best_epoch': 1, 'stopped': 'plateau'})
    rp.write_json(str(results / 'study.json'), {
        'command': 'python reproduce.py ...', 'data': 'd', 'budgets': [200], 'seeds': [1], 'more_seeds': [],
        'models': ['csn_fixed'], 'prefix': 'repro', 'sweep_lrs': [1e-3, 3e-3], 'sweep_budget': 100, 'patience': 4,
        'epochs': 10, 'seen': None, 'checks_at': None, 'passed_to_main': [], 'rate': 3e-3})
    code, out, err = in_process(rp.main, ['--report-only', '--results', results], escape_fails=True)
    rep = json.load(open(results / 'reproduce.json'))
    assert code == 0 and rep['sweep']['chosen'] == 3e-3 and "the sweep's rule would pick 1e-3" in rep['lr_choice']
