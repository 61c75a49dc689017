"""main.py through its command line, as a user runs it: train, resume, test, every model, and every bad input (in this
process through main.main(argv), and through a new Python where only a process shows it: see conftest.run_main)."""
import argparse
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from conftest import FAST, REPO, run_main


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
    for key in ('epoch', 'lr', 'train_loss', 'train_acc', 'val_acc', 'val_acc_per_notion', 'emb_norm', 'mask_norm', 'seconds'):
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


def test_evaluation_embeds_each_image_once_and_matches_per_triplet_scoring(shapes_data):
    from csnlib.builder import build_model
    from csnlib.evaluate import evaluate
    from csnlib.image_cache import ImageStore
    from csnlib.loader import to_input
    from csnlib.options import main_parser
    from csnlib.runtime import Runtime
    from triplet_image_loader import load_dataset_info, load_triplets
    torch.manual_seed(0)
    args = main_parser().parse_args(['--no-pretrained', '--image-size', '32', '--learned'])
    rt = Runtime(args, torch.device('cpu'), workers=0, eval_batch_size=16)
    info = load_dataset_info(shapes_data)
    model = build_model(args, 2).eval()
    store = ImageStore(info, 32)
    trip, cond = load_triplets(info, 'test', [0, 1], 120, seed=1)
    res = evaluate(model, trip, cond, store, rt, info.notions)
    correct = []
    with torch.no_grad():  # the original's way: every triplet through the network on its own
        for (a, f, c), k in zip(trip, cond):
            x = to_input(torch.from_numpy(store.get(np.array([a, f, c]))), torch.device('cpu'), False)
            d_far, d_close, _, _ = model(x, torch.tensor([k]))
            correct.append(bool(d_far > d_close))
    assert res['accuracy'] == pytest.approx(np.mean(correct))
    for n, k in (('colour', 0), ('shape', 1)):
        assert res['per_notion'][n] == pytest.approx(np.mean([ok for ok, c in zip(correct, cond) if c == k]))


@pytest.mark.slow
def test_help_documents_every_flag_with_its_default():
    p = run_main('--help')
    for flag in ('--batch-size', '--epochs', '--start_epoch', '--lr', '--seed', '--no-cuda', '--log-interval', '--margin',
                 '--resume', '--name', '--embed_loss', '--mask_loss', '--num_traintriplets', '--dim_embed', '--test',
                 '--learned', '--prein', '--visdom', '--conditions', '--data', '--model', '--no-pretrained', '--weights',
                 '--num_valtriplets', '--num_testtriplets', '--image-size', '--workers', '--device', '--runs'):
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
def test_pretrained_weights_from_file_or_a_clear_error(shapes_data, tmp_path):
    from torchvision.models import resnet18
    weights = tmp_path / 'resnet18.pth'
    tv = resnet18(weights=None)
    torch.save(tv.state_dict(), weights)
    runs = tmp_path / 'runs'
    args = ['--data', shapes_data, '--runs', runs, '--epochs', 1, *[a for a in FAST if a != '--no-pretrained']]
    # offline, nothing in torch's cache: an error naming both remedies, and no run folder
    env = {'TORCH_HOME': str(tmp_path / 'torch_home'), 'https_proxy': 'http://127.0.0.1:9', 'HTTPS_PROXY': 'http://127.0.0.1:9'}
    p = run_main(*args, '--name', 'offline', check=False, env=env)
    assert p.returncode == 2 and '--weights' in p.stderr and '--no-pretrained' in p.stderr, p.stderr
    assert 'Traceback' not in p.stderr and not (runs / 'offline').exists()
    run_main(*args, '--name', 'w', '--weights', weights, env=env)
    ck = torch.load(runs / 'w' / 'checkpoint.pth.tar', weights_only=True)
    assert ck['args']['weights'] == str(weights)
    # the backbone started from the file's weights: conv1 moved only a little from them in one epoch
    start = tv.state_dict()['conv1.weight']
    assert (ck['state_dict']['embednet.embeddingnet.conv1.weight'] - start).abs().max() < 0.05
    torch.save({'not': torch.zeros(1)}, tmp_path / 'bad.pth')
    p = run_main(*args, '--name', 'bad', '--weights', tmp_path / 'bad.pth', check=False)
    assert p.returncode == 2 and 'not a torchvision resnet18 state dict' in p.stderr


def expect_error(*args, match, **kw):
    p = run_main(*args, check=False, **kw)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert match in p.stderr, p.stderr
    assert 'Traceback' not in p.stderr
    return p


@pytest.mark.slow
def test_bad_inputs_stop_with_one_clear_message_before_training(shapes_data, tmp_path):
    runs = tmp_path / 'runs'
    base = ['--runs', runs, '--epochs', 1, *FAST]
    expect_error('--data', tmp_path / 'missing', '--name', 'x', *base, match='get_data.py')
    with open(os.path.join(shapes_data, 'tripletlists', 'shape_tripletlist_train.txt'), 'a') as f:
        f.write('1 2\n')
    expect_error('--data', shapes_data, '--name', 'x', *base, match='shape_tripletlist_train.txt:121: malformed line')
    with open(os.path.join(shapes_data, 'tripletlists', 'shape_tripletlist_train.txt'), 'a') as f:
        f.write('1 2 4000\n')
    expect_error('--data', shapes_data, '--name', 'x', *base, match='shape_tripletlist_train.txt:122: image index 4000')
    expect_error('--data', shapes_data, '--name', 'x', *base, '--conditions', 'colour', 'heel', match="--conditions 'heel': unknown notion")
    assert not (runs / 'x').exists()  # nothing was written for the failed starts
    run_main('--data', shapes_data, '--name', 'y', *base, '--conditions', 'colour', '--skip-bad-triplets')
    os.remove(os.path.join(shapes_data, 'images', 'shapes', 'red_circle_3.png'))
    expect_error('--data', shapes_data, '--name', 'z', *base, '--conditions', 'colour', '--cache-dir', tmp_path / 'c2',
                 match='red_circle_3.png')
    expect_error('--data', shapes_data, '--name', 'z', *base, '--conditions', 'colour', '--no-cache',
                 match='red_circle_3.png')
    expect_error('--test', '--resume', tmp_path / 'nope.pth.tar', match='no such checkpoint file')
    expect_error('--resume', tmp_path / 'nope.pth.tar', match='no such checkpoint file')
    expect_error('--test', '--resume', runs / 'y' / 'model_best.pth.tar', '--model', 'triplet',
                 match='the checkpoint is a CSN (fixed masks), 64-d model')
    expect_error('--test', '--resume', runs / 'y' / 'model_best.pth.tar', '--dim_embed', '32', match='--dim-embed 32')
    expect_error('--learned', '--prein', match='--learned and --prein')


@pytest.mark.slow
def test_an_existing_run_is_never_overwritten(shapes_data, tmp_path):
    runs = tmp_path / 'runs'
    run_main('--data', shapes_data, '--runs', runs, '--name', 'r', '--epochs', 1, *FAST)
    before = {f: os.path.getmtime(runs / 'r' / f) for f in os.listdir(runs / 'r')}
    p = expect_error('--data', shapes_data, '--runs', runs, '--name', 'r', '--epochs', 1, *FAST, match='already holds a run')
    assert '--resume' in p.stderr
    assert {f: os.path.getmtime(runs / 'r' / f) for f in os.listdir(runs / 'r')} == before


@pytest.mark.slow
def test_resume_auto_starts_continues_and_tests_a_run_with_one_command_line(shapes_data, tmp_path):
    runs = tmp_path / 'runs'
    same = ['--data', shapes_data, '--runs', runs, '--name', 'r', '--resume', 'auto', *FAST]
    p = expect_error('--test', *same, match='--test --resume auto: there is no')
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


@pytest.mark.slow
def test_a_pickle_checkpoint_is_refused_not_executed(tmp_path):
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    path = tmp_path / 'evil.pth.tar'
    with open(path, 'wb') as f:
        pickle.dump({'state_dict': Evil(), 'args': {}}, f)
    expect_error('--test', '--resume', path, match='weights_only')
    torch.save({'args': {}, 'state_dict': {}, 'x': Evil()}, path, _use_new_zipfile_serialization=True)
    expect_error('--test', '--resume', path, match='refused to load it')
    assert not marker.exists()


FAULTS_AFTER_FREE = """
import argparse
import resource
import sys
import torch
sys.path.insert(0, sys.argv[2])
import main, runtime  # a training process: everything main.py loads is loaded (in a bare interpreter glibc's free
# chunk does not fit torch's next aligned 64 MiB request, the heap grows instead and every block is faulted in anew)
print(runtime.keep_freed_memory(argparse.Namespace(keep_memory=sys.argv[1] == 'on'), torch.device('cpu')))
torch.ones(64 << 20, dtype=torch.uint8)  # a 64 MiB block, used and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(64 << 20, dtype=torch.uint8)  # as a training step's activations: the same sizes, again and again
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
def test_keep_memory_reuses_freed_blocks_instead_of_faulting_them_in_again():
    import subprocess
    import sys
    out = {}
    for mode in ('on', 'off'):
        p = subprocess.run([sys.executable, '-c', FAULTS_AFTER_FREE, mode, REPO], capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr
        what, faults = p.stdout.split('\n')[:2]
        out[mode] = (what, int(faults))
    assert out['on'][0] == 'keeps freed memory' and out['off'][0] == 'system default'
    assert out['off'][1] >= 4 * out['on'][1] + 100, out  # without it each reuse faults the block in again


@pytest.mark.slow
def test_the_start_line_says_what_was_chosen_for_memory(shapes_data, tmp_path):
    p = run_main('--data', shapes_data, '--runs', tmp_path, '--name', 'a', '--epochs', 1, '--device', 'cpu', *FAST)
    assert 'malloc keeps freed memory' in p.stdout
    p = run_main('--data', shapes_data, '--runs', tmp_path, '--name', 'b', '--epochs', 1, '--device', 'cpu',
                 '--no-keep-memory', *FAST)
    assert 'malloc system default' in p.stdout


def mark_left_right(root):
    """Paint every image white in its left quarter and black in its right one: a mirror shows at a glance."""
    from PIL import Image
    with open(os.path.join(root, 'filenames.json')) as f:
        names = [n.strip() for n in f if n.strip()]
    for n in names:
        path = os.path.join(root, 'images', n)
        a = np.asarray(Image.open(path).convert('RGB')).copy()
        q = a.shape[1] // 4
        a[:, :q], a[:, -q:] = 255, 0
        Image.fromarray(a).save(path)


@pytest.mark.slow
@pytest.mark.parametrize('hflip, mirrored', [(None, False), ('on', True), ('off', False)])
def test_a_dataset_that_says_hflip_false_never_sees_a_mirrored_image(shapes_data, tmp_path, monkeypatch, capsys,
                                                                     hflip, mirrored):
    import main
    from csnlib import train_loop as training
    mark_left_right(shapes_data)
    meta_path = os.path.join(shapes_data, 'dataset.json')
    meta = json.load(open(meta_path))
    json.dump({**meta, 'hflip': False}, open(meta_path, 'w'))
    seen = []
    real = training.to_input

    def spy(*a, **k):
        x = real(*a, **k)  # (N, 3, S, S)
        seen.append((x[..., :2].mean((1, 2, 3)) - x[..., -2:].mean((1, 2, 3))).detach())  # > 0: white side on the left
        return x
    monkeypatch.setattr(training, 'to_input', spy)
    argv = ['--data', shapes_data, '--runs', str(tmp_path / 'runs'), '--name', 'f', '--epochs', '2', *FAST]
    assert main.main(argv + (['--hflip', hflip] if hflip else [])) == 0
    side = torch.cat(seen)
    assert len(side) >= 2 * 240 * 3                                      # every training image went through the spy
    assert bool((side < 0).any()) == mirrored and bool((side > 0).any())
    out = capsys.readouterr().out
    assert {None: 'hflip off (dataset.json)', 'on': 'hflip on (--hflip on)', 'off': 'hflip off (--hflip off)'}[hflip] in out
    run = tmp_path / 'runs' / 'f'
    assert json.load(open(run / 'args.json'))['hflip_applied'] is mirrored
    assert torch.load(run / 'checkpoint.pth.tar', weights_only=True)['hflip_applied'] is mirrored


@pytest.mark.slow
def test_a_dataset_without_hflip_is_mirrored_as_the_original_did(shapes_data, tmp_path):
    p = run_main('--data', shapes_data, '--runs', tmp_path / 'runs', '--name', 'z', '--epochs', 1, *FAST)
    assert 'hflip on (default for a dataset without "hflip")' in p.stdout
    json.dump({**json.load(open(os.path.join(shapes_data, 'dataset.json'))), 'hflip': 'no'},
              open(os.path.join(shapes_data, 'dataset.json'), 'w'))
    p = run_main('--data', shapes_data, '--runs', tmp_path / 'runs', '--name', 'y', '--epochs', 1, *FAST, check=False)
    assert p.returncode == 2 and '"hflip" must be true or false' in p.stderr and 'Traceback' not in p.stderr


@pytest.mark.parametrize('module, argv', [('csnlib.options', ['--marg', '0.3']), ('retrieve', ['--resume', 'x', '--quer', '1']),
                                          ('get_data', ['--datas', 'fonts']), ('bench', ['--dat', 'd'])])
def test_an_abbreviated_flag_is_refused_not_guessed(module, argv, capsys):
    """--marg 0.3 on a resumed run would otherwise be read as --margin without explicit_flags knowing it was given."""
    import importlib
    mod = importlib.import_module(module)
    parser = mod.main_parser() if module == 'csnlib.options' else mod.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert 'unrecognized arguments' in capsys.readouterr().err


# ---- the GPU, MPS and torchrun paths, checked on the CPU (no GPU has run this code: see the README) ---------------

@pytest.mark.parametrize('capability, amp, expected', [((7, 5), 'auto', (torch.float16, True)),    # T4
                                                       ((7, 0), 'auto', (torch.float16, True)),    # V100
                                                       ((8, 0), 'auto', (torch.bfloat16, False)),  # A100
                                                       ((9, 0), 'auto', (torch.bfloat16, False)),  # H100
                                                       ((9, 0), 'fp16', (torch.float16, True)),
                                                       ((7, 5), 'bf16', (torch.bfloat16, False)),
                                                       ((8, 6), 'off', (None, False))])
def test_amp_auto_on_cuda_follows_the_compute_capability_not_emulated_bf16(monkeypatch, capability, amp, expected):
    from csnlib import runtime
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)  # recent torch: True on a T4 too
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    args = argparse.Namespace(amp=amp)
    assert runtime.choose_amp(args, torch.device('cuda', 0)) == expected


@pytest.mark.parametrize('device, units, amp, emulated', [('cpu', False, torch.bfloat16, True),
                                                          ('cpu', True, torch.bfloat16, False),
                                                          ('cpu', False, None, False),
                                                          ('cuda', False, torch.bfloat16, True),   # --amp bf16 on a T4
                                                          ('cuda', True, torch.bfloat16, False),
                                                          ('cuda', False, torch.float16, False)])
def test_the_start_line_says_when_bf16_is_emulated(monkeypatch, device, units, amp, emulated):
    from csnlib import runtime
    monkeypatch.setattr(runtime, 'cpu_has_bf16', lambda: units)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (9, 0) if units else (7, 5))
    note = runtime.amp_note(amp, torch.device(device, 0) if device == 'cuda' else torch.device(device))
    assert ('emulated' in note) == emulated
    if emulated:
        assert ('--amp off' in note) == (device == 'cpu') and ('7.5' in note) == (device == 'cuda')


def test_a_run_asking_for_bf16_on_a_cpu_without_bf16_units_is_told_so(shapes_data, tmp_path, monkeypatch, capsys):
    import main
    from csnlib import runtime
    monkeypatch.setattr(runtime, 'cpu_has_bf16', lambda: False)
    argv = ['--data', shapes_data, '--runs', str(tmp_path / 'runs'), '--name', 'b', '--epochs', '1', *FAST]
    assert main.main(argv + ['--amp', 'bf16', '--num_traintriplets', '64']) == 0
    start = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('device cpu'))
    assert start.startswith('device cpu, amp bfloat16 (emulated: this CPU has no avx512_bf16') and '--amp off' in start


def test_the_per_step_sums_are_float32_on_mps_which_has_no_float64():
    from csnlib.train_loop import stats_dtype
    assert stats_dtype(torch.device('mps')) == torch.float32
    assert stats_dtype('mps') == torch.float32
    assert stats_dtype(torch.device('cpu')) == torch.float64 and stats_dtype(torch.device('cuda', 1)) == torch.float64


class HostTraffic(torch.overrides.TorchFunctionMode):
    """Records, outside training.host_read (the log-interval read), every tensor built from Python data (on a GPU: a
    host-to-device copy that blocks) and every read of a tensor's value on the host (on a GPU: a sync). The old
    to_input (mean and std built per call) and torch.tensor(B, device=device) per step fail it."""
    BUILD = {torch.tensor, torch.as_tensor, torch.Tensor.new_tensor, torch.scalar_tensor}
    READ = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.nonzero,
            torch.nonzero, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__}

    def __init__(self):
        super().__init__()
        self.reading, self.seen = False, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        caller = sys._getframe(1).f_code.co_filename
        # the DataLoader's and samplers' own tensors (seeds, shuffled orders) live on the host whatever the device
        if not self.reading and (func in self.BUILD or func in self.READ) and 'torch/utils/data' not in caller:
            self.seen.append(f'{getattr(func, "__qualname__", func)} in {os.path.basename(caller)}')
        return func(*args, **(kwargs or {}))


def test_a_training_step_builds_no_tensor_from_python_numbers_and_reads_nothing_back(shapes_data, monkeypatch):
    """What a GPU step must not do (it would make the host wait for the device), counted on the CPU. The optimizer
    and scaler are those of the fp16 GPU path: fused Adam (make_optimizer on CUDA) and an enabled grad scaler."""
    import contextlib

    from csnlib import train_loop as training
    from csnlib.builder import build_model
    from csnlib.image_cache import ImageStore
    from csnlib.options import main_parser
    from csnlib.runtime import Runtime
    from triplet_image_loader import load_dataset_info, load_triplets
    args = main_parser().parse_args(['--no-pretrained', '--image-size', '32', '--batch-size', '4', '--dim_embed', '8',
                                     '--log-interval', '3', '--amp', 'off'])
    rt = Runtime(args, torch.device('cpu'), workers=0)
    info = load_dataset_info(shapes_data)
    trip, cond = load_triplets(info, 'train', [0, 1], 16, seed=1)
    model = build_model(args, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler('cpu', enabled=True)
    data = (trip, cond, ImageStore(info, 32), True)
    mode = HostTraffic()

    @contextlib.contextmanager
    def host_read(device):
        mode.reading = True
        yield
        mode.reading = False

    monkeypatch.setattr(training, 'host_read', host_read)
    training.train_epoch(model, model, optimizer, scaler, data, rt, 1)  # warm-up: constants built once per device
    reads = []
    monkeypatch.setattr(training, 'host_read', lambda device: (reads.append(1), host_read(device))[1])
    with mode:
        sums, finished = training.train_epoch(model, model, optimizer, scaler, data, rt, 2)
    assert finished and sums['steps'] == 4 and sums['n'] == 16
    assert mode.seen == [], f'per-step host traffic: {mode.seen}'
    assert len(reads) == 2  # steps 3 and 4 (the last): the log-interval reads only


def test_how_to_run_flags_never_come_back_from_a_checkpoint():
    from csnlib.checkpoint import HOW_TO_RUN, how_to_run_changes, merge_checkpoint_args
    from csnlib.options import main_parser
    parser = main_parser()
    stored = vars(parser.parse_args(['--device', 'cpu', '--no-cuda', '--amp', 'off', '--compile', '--workers', '3',
                                     '--no-channels-last', '--no-keep-memory', '--no-cache', '--cache-dir', '/elsewhere',
                                     '--dist-timeout', '5', '--three-forwards', '--hflip', 'off', '--lr', '0.01',
                                     '--learned', '--conditions', 'shape']))
    ckpt = {'args': stored, 'state_dict': {}}
    argv = ['--resume', 'ck.pth.tar']
    args = merge_checkpoint_args(parser.parse_args(argv), ckpt, {'resume'}, 'ck.pth.tar')
    defaults = parser.parse_args([])
    for k in HOW_TO_RUN:  # this machine's defaults, not the checkpoint's
        assert getattr(args, k) == getattr(defaults, k), k
    # what changes what is learned comes back
    assert args.three_forwards and args.hflip == 'off' and args.lr == 0.01 and args.learned and args.conditions == ['shape']
    changed = how_to_run_changes(args, ckpt, {'resume'})
    assert '--device cpu -> auto' in changed and '--amp off -> auto' in changed and not any('workers' in c for c in changed)
    # given on this command line: kept, and not reported as a change
    argv = ['--resume', 'ck.pth.tar', '--amp', 'bf16']
    args = merge_checkpoint_args(parser.parse_args(argv), ckpt, {'resume', 'amp'}, 'ck.pth.tar')
    assert args.amp == 'bf16' and not any(c.startswith('--amp') for c in how_to_run_changes(args, ckpt, {'resume', 'amp'}))


def test_under_torchrun_nccl_collectives_fail_as_exceptions_and_gloo_is_left_alone():
    from csnlib.runtime import collective_error_env
    assert collective_error_env('nccl') == {'TORCH_NCCL_BLOCKING_WAIT': '1', 'TORCH_NCCL_ASYNC_ERROR_HANDLING': '0'}
    assert collective_error_env('gloo') == {}


def test_setup_distributed_sets_the_nccl_environment_before_joining(monkeypatch):
    from csnlib import runtime
    seen = {}
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.delenv('TORCH_NCCL_BLOCKING_WAIT', raising=False)
    monkeypatch.setenv('TORCH_NCCL_ASYNC_ERROR_HANDLING', '3')  # what a user set stays
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda i: None)
    monkeypatch.setattr(runtime.dist, 'init_process_group', lambda backend, **k: seen.update(
        backend=backend, wait=os.environ.get('TORCH_NCCL_BLOCKING_WAIT'), handling=os.environ['TORCH_NCCL_ASYNC_ERROR_HANDLING']))
    args = argparse.Namespace(device='auto', no_cuda=False, dist_timeout=60, batch_size=4)
    runtime.setup_distributed(args)
    assert seen == {'backend': 'nccl', 'wait': '1', 'handling': '3'}
    monkeypatch.delenv('TORCH_NCCL_BLOCKING_WAIT')
    runtime.setup_distributed(argparse.Namespace(**{**vars(args), 'device': 'cpu'}))
    assert seen['backend'] == 'gloo' and seen['wait'] is None


@pytest.mark.slow
def test_a_log_off_a_terminal_has_one_plain_line_per_log_interval_and_no_bar(shapes_data, tmp_path):
    # run_main captures stdout and stderr: not a terminal, as a cluster job's log or nohup
    p = run_main('--data', shapes_data, '--runs', tmp_path / 'runs', '--name', 'log', '--epochs', 2, *FAST, real=True)
    out = p.stdout + p.stderr
    assert '\r' not in out and '\x1b' not in out and 'it/s' not in out
    steps = 240 // 32 + 1  # 8 steps of batch 32; lines at steps 2, 4, 6 and 8 (--log-interval 2)
    for epoch in (1, 2):
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith(f'epoch {epoch} step ')]
        assert [ln.split()[3] for ln in lines] == [f'{s}/{steps}' for s in (2, 4, 6, 8)], p.stdout
        assert all(' loss ' in ln and ' acc ' in ln and ln.endswith('triplets/s') for ln in lines)
    assert len([ln for ln in p.stdout.splitlines() if ln.startswith('epoch   ')]) == 2  # the epoch summaries


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
    p = expect_error('--resume', runs / 'b' / 'checkpoint.pth.tar', '--epochs', 3, match='metrics.jsonl:3: not a JSON line')


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
            p = expect_error(*argv, match=f'{runs / "r"} is in use: process {first.pid} trains it now')
            assert 'another --name' in p.stderr
        assert first.poll() is None  # the first run goes on, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
