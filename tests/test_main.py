"""main.py through its command line, as a user runs it: train, resume, test, every model, and every bad input (in this
process through main.main(argv), and through a new Python where only a process shows it: see conftest.run_main)."""
import json
import os
import sys

import pytest
import torch

from conftest import FAST, REPO, error_line, run_main


def metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_train_learns_then_resume_continues_and_test_writes_results(shapes_data, tmp_path):
    runs = tmp_path / 'runs'
    run_main('--data', shapes_data, '--runs', runs, '--name', 'csn', '--epochs', 4, *FAST, real=True)
    run = runs / 'csn'
    m = metrics(run)
    assert [x['epoch'] for x in m] == [1, 2, 3, 4]
    for key in ('epoch', 'lr', 'train_loss', 'train_acc', 'val_acc', 'val_acc_per_notion', 'emb_norm', 'mask_norm',
                'seconds'):
        assert key in m[-1]
    assert set(m[-1]['val_acc_per_notion']) == {'colour', 'shape'}
    assert m[1]['lr'] == pytest.approx(1e-3 * 0.985 ** 2)
    best = max(x['val_acc'] for x in m)
    assert best > 0.7, m  # chance is 0.5; reading the triplets backwards would give well under 0.5
    assert max(x['val_acc_per_notion']['colour'] for x in m) > 0.9
    args = json.load(open(run / 'args.json'))
    assert args['num_traintriplets'] == 240 and args['model'] == 'csn'

    p = run_main('--resume', run / 'checkpoint.pth.tar', '--epochs', 5)
    assert 'resumed' in p.stdout and 'epoch 5' in p.stdout
    assert [x['epoch'] for x in metrics(run)] == [1, 2, 3, 4, 5]
    ck = torch.load(run / 'checkpoint.pth.tar', weights_only=True)
    assert ck['epoch'] == 5 and ck['best_acc'] == pytest.approx(max(x['val_acc'] for x in metrics(run)))
    assert ck['notions'] == ['colour', 'shape'] and 'optimizer' in ck and 'rng' in ck

    p = run_main('--test', '--resume', run / 'model_best.pth.tar', real=True)
    res = json.load(open(run / 'test_results.json'))
    assert set(res) >= {'accuracy', 'per_notion', 'triplets', 'checkpoint'}
    assert 0 <= res['accuracy'] <= 1 and set(res['per_notion']) == {'colour', 'shape'} and res['triplets'] == 120
    assert res['per_notion']['colour'] > 0.8
    assert 'colour' in p.stdout and 'overall' in p.stdout


@pytest.mark.parametrize('variant', [['--model', 'triplet'], ['--model', 'task'], ['--learned'], ['--prein'],
                                     ['--conditions', 'shape'], ['--conditions', '0']])
@pytest.mark.slow
def test_every_model_and_mask_variant_trains_and_tests(shapes_data, tmp_path, variant):
    runs = tmp_path / 'runs'
    run_main('--data', shapes_data, '--runs', runs, '--name', 'v', '--epochs', 1, *FAST, *variant)
    run_main('--test', '--resume', runs / 'v' / 'model_best.pth.tar', '--no-pictures')  # pictures: test_matrix.py
    res = json.load(open(runs / 'v' / 'test_results.json'))
    expected = {'--conditions': {'shape'} if 'shape' in variant else {'colour'}}.get(variant[0], {'colour', 'shape'})
    assert set(res['per_notion']) == expected


@pytest.mark.slow
def test_same_seed_same_run_and_resume_is_exact(shapes_data, tmp_path):
    runs = tmp_path / 'runs'
    run_main('--data', shapes_data, '--runs', runs, '--name', 'a', '--epochs', 2, '--learned', *FAST)
    run_main('--data', shapes_data, '--runs', runs, '--name', 'b', '--epochs', 1, '--learned', *FAST)
    run_main('--resume', runs / 'b' / 'checkpoint.pth.tar', '--epochs', 2)
    ma, mb = metrics(runs / 'a'), metrics(runs / 'b')
    for x in (ma, mb):
        for line in x:
            line.pop('seconds'), line.pop('triplets_per_s')
    assert ma == mb
    sa = torch.load(runs / 'a' / 'checkpoint.pth.tar', weights_only=True)['state_dict']
    sb = torch.load(runs / 'b' / 'checkpoint.pth.tar', weights_only=True)['state_dict']
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_help_documents_every_flag_with_its_default():
    p = run_main('--help')
    for flag in ('--batch-size', '--epochs', '--start_epoch', '--lr', '--seed', '--no-cuda', '--log-interval',
                 '--margin', '--resume', '--name', '--embed_loss', '--mask_loss', '--num_traintriplets', '--dim_embed',
                 '--test', '--learned', '--prein', '--visdom', '--conditions', '--data', '--model', '--no-pretrained',
                 '--weights', '--num_valtriplets', '--num_testtriplets', '--image-size', '--workers', '--device',
                 '--runs'):
        assert flag in p.stdout, flag
    text = ' '.join(p.stdout.split())
    for default in ('(default: 256)', '(default: 5e-05)', '(default: 0.2)', '(default: Conditional_Similarity_Network)',
                    '(default: 0.005)', '(default: 100000)', '(default: 80000)', '(default: 160000)', '(default: 112)',
                    '(default: runs)', '(default: data)', '(default: csn)'):
        assert default in text, default


@pytest.mark.slow
def test_hyphenated_and_original_spellings_mean_the_same(shapes_data, tmp_path):
    runs = tmp_path / 'runs'
    run_main('--data', shapes_data, '--runs', runs, '--name', 'h', '--epochs', 1, *FAST, '--embed-loss', '0.01',
             '--mask_loss', '0.002', '--dim-embed', '32', '--start-epoch', '1', '--no_cuda')
    a = json.load(open(runs / 'h' / 'args.json'))
    assert a['embed_loss'] == 0.01 and a['mask_loss'] == 0.002 and a['dim_embed'] == 32 and a['no_cuda'] is True


@pytest.mark.slow
def test_bad_inputs_stop_with_one_clear_message_before_training(shapes_data, tmp_path):
    runs = tmp_path / 'runs'
    base = ['--runs', runs, '--epochs', 1, *FAST]
    error_line(run_main('--data', tmp_path / 'missing', '--name', 'x', *base, check=False), match='get_data.py')
    with open(os.path.join(shapes_data, 'tripletlists', 'shape_tripletlist_train.txt'), 'a') as f:
        f.write('1 2\n')
    error_line(run_main('--data', shapes_data, '--name', 'x', *base, check=False),
               match='shape_tripletlist_train.txt:121: malformed line')
    with open(os.path.join(shapes_data, 'tripletlists', 'shape_tripletlist_train.txt'), 'a') as f:
        f.write('1 2 4000\n')
    error_line(run_main('--data', shapes_data, '--name', 'x', *base, check=False),
               match='shape_tripletlist_train.txt:122: image index 4000')
    error_line(run_main('--data', shapes_data, '--name', 'x', *base, '--conditions', 'colour', 'heel', check=False),
               match="--conditions 'heel': unknown notion")
    assert not (runs / 'x').exists()  # nothing was written for the failed starts
    run_main('--data', shapes_data, '--name', 'y', *base, '--conditions', 'colour', '--skip-bad-triplets')
    os.remove(os.path.join(shapes_data, 'images', 'shapes', 'red_circle_3.png'))
    error_line(run_main('--data', shapes_data, '--name', 'z', *base, '--conditions', 'colour', '--cache-dir',
                        tmp_path / 'c2', check=False), match='red_circle_3.png')
    error_line(run_main('--data', shapes_data, '--name', 'z', *base, '--conditions', 'colour', '--no-cache',
                        check=False), match='red_circle_3.png')
    error_line(run_main('--test', '--resume', tmp_path / 'nope.pth.tar', check=False), match='no such checkpoint file')
    error_line(run_main('--resume', tmp_path / 'nope.pth.tar', check=False), match='no such checkpoint file')
    error_line(run_main('--test', '--resume', runs / 'y' / 'model_best.pth.tar', '--model', 'triplet', check=False),
               match='the checkpoint is a CSN (fixed masks), 64-d model')
    error_line(run_main('--test', '--resume', runs / 'y' / 'model_best.pth.tar', '--dim_embed', '32', check=False),
               match='--dim-embed 32')
    error_line(run_main('--learned', '--prein', check=False), match='--learned and --prein')


@pytest.mark.slow
def test_an_existing_run_is_never_overwritten(shapes_data, tmp_path):
    runs = tmp_path / 'runs'
    run_main('--data', shapes_data, '--runs', runs, '--name', 'r', '--epochs', 1, *FAST)
    before = {f: os.path.getmtime(runs / 'r' / f) for f in os.listdir(runs / 'r')}
    p = run_main('--data', shapes_data, '--runs', runs, '--name', 'r', '--epochs', 1, *FAST, check=False)
    error_line(p, match='already holds a run')
    assert '--resume' in p.stderr
    assert {f: os.path.getmtime(runs / 'r' / f) for f in os.listdir(runs / 'r')} == before


@pytest.mark.slow
def test_resume_auto_starts_continues_and_tests_a_run_with_one_command_line(shapes_data, tmp_path):
    runs = tmp_path / 'runs'
    same = ['--data', shapes_data, '--runs', runs, '--name', 'r', '--resume', 'auto', *FAST]
    error_line(run_main('--test', *same, check=False), match='--test --resume auto: there is no')
    assert not (runs / 'r').exists()
    p = run_main(*same, '--epochs', 1)
    assert 'no ' in p.stdout and 'starting the run' in p.stdout and 'epoch   1' in p.stdout
    p = run_main(*same, '--epochs', 2)  # the same line again: continues, does not refuse or start over
    assert f'resumed {runs / "r" / "checkpoint.pth.tar"}: epoch 2' in p.stdout and 'epoch   1' not in p.stdout
    assert [x['epoch'] for x in metrics(runs / 'r')] == [1, 2]
    p = run_main(*same, '--epochs', 2)  # finished: nothing more to train
    assert 'done' in p.stdout and [x['epoch'] for x in metrics(runs / 'r')] == [1, 2]
    run_main('--test', *same, '--no-pictures')
    res = json.load(open(runs / 'r' / 'test_results.json'))
    assert res['checkpoint'].endswith('model_best.pth.tar') and res['triplets'] == 120


@pytest.mark.parametrize('module, argv', [('csnlib.options', ['--marg', '0.3']),
                                          ('retrieve', ['--resume', 'x', '--quer', '1']),
                                          ('get_data', ['--datas', 'fonts']), ('bench', ['--dat', 'd'])])
def test_an_abbreviated_flag_is_refused_not_guessed(module, argv, capsys):
    """--marg 0.3 on a resumed run would otherwise be read as --margin without explicit_flags knowing it was given."""
    import importlib
    mod = importlib.import_module(module)
    parser = mod.main_parser() if module == 'csnlib.options' else mod.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert 'unrecognized arguments' in capsys.readouterr().err


def test_a_resumed_run_writes_in_its_checkpoints_folder_not_where_the_checkpoint_says(shapes_data, tmp_path):
    """A checkpoint copied from elsewhere (or doctored) names another run's folder and a dashboard in its args: the
    resume writes next to the checkpoint it was given and reports nowhere it was not told to; a partial last line of
    metrics.jsonl (a kill while it was written) is dropped with a warning."""
    import shutil
    runs = tmp_path / 'runs'
    run_main('--data', shapes_data, '--runs', runs, '--name', 'a', '--epochs', 1, *FAST)
    before = sorted(os.listdir(runs / 'a')), open(runs / 'a' / 'metrics.jsonl').read()
    (runs / 'b').mkdir()
    ck = torch.load(runs / 'a' / 'checkpoint.pth.tar', weights_only=True)
    ck['args'].update(runs=str(tmp_path / 'elsewhere'), name='victim', visdom=True, tensorboard=True,
                      visdom_server='http://192.0.2.1', visdom_port=9)
    torch.save(ck, runs / 'b' / 'checkpoint.pth.tar')
    shutil.copy(runs / 'a' / 'metrics.jsonl', runs / 'b' / 'metrics.jsonl')
    with open(runs / 'b' / 'metrics.jsonl', 'a') as f:
        f.write('{"epoch": 2, "lr": 0.0')  # cut short
    p = run_main('--resume', runs / 'b' / 'checkpoint.pth.tar', '--epochs', 2)
    assert f'{runs / "b" / "metrics.jsonl"}:2: dropped a partial last line' in p.stdout
    assert [x['epoch'] for x in metrics(runs / 'b')] == [1, 2]
    assert not (tmp_path / 'elsewhere').exists() and not (runs / 'b' / 'tensorboard').exists()
    saved = json.load(open(runs / 'b' / 'args.json'))
    assert saved['runs'] == str(runs) and saved['name'] == 'b' and saved['visdom'] is False
    assert (sorted(os.listdir(runs / 'a')), open(runs / 'a' / 'metrics.jsonl').read()) == before
    with open(runs / 'b' / 'metrics.jsonl', 'a') as f:  # a damaged line that is not the last: said, not guessed
        f.write('garbage\n{"epoch": 3}\n')
    error_line(run_main('--resume', runs / 'b' / 'checkpoint.pth.tar', '--epochs', 3, check=False),
               match='metrics.jsonl:3: not a JSON line')


@pytest.mark.slow
def test_a_second_process_on_the_same_run_folder_is_refused_with_the_holders_pid(shapes_data, tmp_path):
    import signal
    import subprocess
    import time
    runs = tmp_path / 'runs'
    cmd = [sys.executable, os.path.join(REPO, 'main.py'), '--data', shapes_data, '--runs', runs, '--name', 'r',
           '--epochs', 200, *FAST]
    first = subprocess.Popen([str(a) for a in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (runs / 'r' / '.lock').exists() or \
                (runs / 'r' / '.lock').read_text().strip() != str(first.pid):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        for argv in (['--data', shapes_data, '--runs', runs, '--name', 'r', '--epochs', 1, *FAST],
                     ['--resume', 'auto', '--data', shapes_data, '--runs', runs, '--name', 'r', '--epochs', 1, *FAST]):
            p = run_main(*argv, check=False)
            error_line(p, match=f'{runs / "r"} is in use: process {first.pid} trains it now')
            assert 'another --name' in p.stderr
        assert first.poll() is None  # the first run goes on, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_random_weights_at_the_fine_tuning_rate_get_one_line_naming_the_rate_to_try(shapes_data, tmp_path):
    """--no-pretrained with the default --lr (the paper's rate for fine-tuning ImageNet weights) says so in one line;
    another rate, or ImageNet weights, say nothing."""
    base = ['--data', shapes_data, '--runs', tmp_path, '--check-data']
    said = [line for line in run_main(*base, '--no-pretrained').stdout.splitlines() if '--lr' in line]
    assert len(said) == 1, said
    assert '5e-05' in said[0] and 'fine-tuning ImageNet weights' in said[0] and '--lr 0.003' in said[0]
    assert '--lr' not in run_main(*base, '--no-pretrained', '--lr', '3e-3').stdout
    assert '--lr' not in run_main(*base, '--weights', tmp_path / 'none.pth').stdout  # --check-data loads no weights
