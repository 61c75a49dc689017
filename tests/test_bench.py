"""bench.py: its synthetic Zappos-format data, its figures through the command line, and its re-creation of the original
release's loop computing the same loss as this repo's TripletNet."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

import bench
import get_data
from conftest import REPO, error_line, in_process
from csnlib import original_loop, runtime
from csnlib.builder import build_model
from csnlib.image_cache import ImageStore, build_image_cache
from csnlib.loader import to_input
from csnlib.options import main_parser
from triplet_image_loader import TripletBatches, load_dataset_info, load_triplets
from tripletnet import csn_loss

CPU = torch.device('cpu')
ALL = [0, 1, 2, 3]


def run_bench(*args):
    p = subprocess.run([sys.executable, os.path.join(REPO, 'bench.py'), *map(str, args)], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, f'bench.py {args} exited {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}'
    return p


@pytest.fixture(scope='module')
def zappos(tmp_path_factory):
    root = tmp_path_factory.mktemp('bench') / 'zappos'
    assert in_process(get_data.main, ['--dataset', 'synthetic', '--synthetic-images', 48, '--out', root])[0] == 0
    return str(root)


def test_make_data_still_writes_the_synthetic_dataset(zappos, tmp_path):
    """bench.py --make-data DIR, the older spelling of get_data.py --dataset synthetic: the same images and lists."""
    code, out, _ = in_process(bench.main, ['--make-data', tmp_path / 'z', '--images', 48])
    assert code == 0 and 'next: python bench.py --data' in out
    for name in ('filenames.json', 'tripletlists/heel_tripletlist_test.txt'):
        assert (tmp_path / 'z' / name).read_bytes() == open(os.path.join(zappos, name), 'rb').read()


@pytest.mark.slow
def test_bench_prints_a_json_line_per_figure_of_both_implementations(zappos):
    p = run_bench('--data', zappos, '--batch-size', 4, '--image-size', 32, '--steps', 1, '--warmup', 1,
                  '--repeats', 1, '--device', 'cpu')
    figs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{')]
    assert sorted((f['impl'], f['mode']) for f in figs) == [('original', 'eval'), ('original', 'train'),
                                                             ('repo', 'eval'), ('repo', 'train')]
    for f in figs:
        assert f['triplets_per_s'] > 0 and f['peak_rss_mb'] > 0 and f['device'] == 'cpu'
        assert f['settings']['batch_size'] == 4 and f['settings']['image_size'] == 32
        assert f['repo_over_original'] == pytest.approx(
            next(g['triplets_per_s'] for g in figs if g['impl'] == 'repo' and g['mode'] == f['mode'])
            / next(g['triplets_per_s'] for g in figs if g['impl'] == 'original' and g['mode'] == f['mode']), rel=0.01)
    by = {(f['impl'], f['mode']): f for f in figs}
    assert (by['original', 'train']['settings']['forwards_per_step'] == 3
            and by['original', 'train']['settings']['amp'] == 'off')
    assert by['repo', 'train']['settings']['forwards_per_step'] == 1
    assert by['original', 'train']['triplets_timed'] == 4  # --steps x --batch-size, after the warm-up
    assert by['repo', 'eval']['settings']['eval_triplets'] == 36  # the whole test split
    assert 'repo / original, train' in p.stdout and 'repo / original, eval' in p.stdout
    for impl in ('original', 'repo'):  # the training GFLOP/s: the step's FLOPs per triplet x triplets/s
        f = by[impl, 'train']
        assert f['gflop_per_s'] == pytest.approx(f['gflop_per_triplet'] * f['triplets_per_s'], rel=0.01)
    assert 'gflop_per_s' not in by['repo', 'eval']


def test_training_flops_per_triplet_are_three_forwards_of_every_conv_and_linear_less_conv1s_input_gradient(zappos):
    """Counted by hand from the layer shapes: forward 2 x outputs x fan-in per layer; backward twice that (input and
    weight gradients), except that the image needs no gradient."""
    from Resnet_18 import EmbeddingNet
    net, flops = EmbeddingNet(64), {}
    for name, mod in net.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            mod.register_forward_hook(lambda m, i, o, name=name: flops.__setitem__(
                name, 2 * o.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1]))
        elif isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(lambda m, i, o, name=name: flops.__setitem__(name, 2 * o.numel() * m.in_features))
    net(torch.zeros(1, 3, 48, 48))
    per_image = 3 * sum(flops.values()) - flops['conv1']
    opts = bench.build_parser().parse_args(['--data', zappos, '--image-size', '48'])
    assert bench.train_gflop_per_triplet(opts) == pytest.approx(3 * per_image / 1e9, rel=1e-9)


@pytest.mark.slow
def test_peak_times_a_matrix_product_in_both_precisions():
    p = run_bench('--peak', '--device', 'cpu')
    fig = json.loads(p.stdout.splitlines()[-1])
    assert fig['mode'] == 'peak' and fig['device'] == 'cpu' and fig['matmul_n'] == 4096
    assert set(fig['gflop_per_s']) == {'bfloat16', 'float32'} and fig['gflop_per_s']['float32'] > 0
    if runtime.cpu_has_bf16():
        assert fig['gflop_per_s']['bfloat16'] > 0
    else:  # emulated bf16 is not timed (under 1 GFLOP/s: minutes at n = 4096), and the line says why
        assert fig['gflop_per_s']['bfloat16'] is None and 'bfloat16 not timed (no bf16 units' in p.stdout


@pytest.mark.slow
@pytest.mark.parametrize('masks', [[], ['--learned'], ['--prein']])
def test_original_loop_computes_the_same_loss_and_gradients_as_tripletnet(zappos, masks):
    """Same 8 triplets, fp32, no flips, BatchNorm in eval mode: the original's three forwards on PIL-decoded images
    against one forward of this repo's TripletNet on the uint8 cache. (In training mode they differ on purpose:
    BatchNorm's batch statistics are over the 3B images of one forward here, over each B in the original.)"""
    torch.manual_seed(0)
    args = main_parser().parse_args(['--no-pretrained', '--image-size', '32', *masks])
    info = load_dataset_info(zappos)
    trip, cond = load_triplets(info, 'train', ALL, 10 ** 9, seed=0)
    trip, cond = trip[:8], cond[:8]
    model = build_model(args, 4).eval()
    if masks == ['--learned']:
        assert (model.embednet.masks.weight < 0).any()  # the ReLU of learned masks matters here

    dataset = original_loop.OriginalTriplets(info, trip, cond, original_loop.original_transform(32, train=False))
    batch = default_collate([dataset[i] for i in range(8)])  # in order (the original's loader shuffles)
    loss_o, dista, distb = original_loop.original_loss(original_loop.OriginalTripletnet(model.embednet),
                                               torch.nn.MarginRankingLoss(margin=args.margin), batch, args, CPU)
    loss_o.backward()
    grads_o = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    store = ImageStore(info, 32, build_image_cache(info, 32, log=lambda *a: None))
    u8, c = TripletBatches(trip, cond, store)[np.arange(8)]
    x = to_input(u8, CPU, channels_last=False)  # (24, 3, 32, 32), no flips
    torch.testing.assert_close(x, torch.cat(batch[:3]), atol=1e-6, rtol=0)  # the cache decodes as the original did
    d_far, d_close, emb_norm, mask_norm = model(x, c)
    loss_r = csn_loss(d_far, d_close, emb_norm, mask_norm, args.margin, args.embed_loss, args.mask_loss)
    loss_r.backward()

    torch.testing.assert_close(d_far, dista, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_close, distb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_r, loss_o, rtol=1e-5, atol=1e-6)
    assert loss_r > args.margin / 2  # a loss with the regularisers in it, not a trivially zero one
    grads_r = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads_r.keys() == grads_o.keys() and ('embednet.masks.weight' in grads_r) == bool(masks)
    for n in grads_r:
        torch.testing.assert_close(grads_r[n], grads_o[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.slow
def test_baseline_flags_measure_a_second_setting_of_this_repo_in_the_same_run(zappos):
    p = run_bench('--data', zappos, '--batch-size', 4, '--image-size', 32, '--steps', 1, '--warmup', 1,
                  '--repeats', 1, '--device', 'cpu', '--modes', 'train', '--impls', 'repo', 'baseline',
                  '--baseline-flags=--three-forwards --no-keep-memory --conv-wgrad matmul')
    by = {f['impl']: f for f in (json.loads(line) for line in p.stdout.splitlines() if line.startswith('{'))}
    import torch

    from csnlib import conv_wgrad  # what each trained with, as main.py says
    assert by['baseline']['settings']['conv_wgrad'] == conv_wgrad.describe((torch.bfloat16, torch.float32))
    assert by['repo']['settings']['conv_wgrad'] == conv_wgrad.describe(conv_wgrad.dtypes_for('auto',
                                                                                             torch.device('cpu')))
    assert sorted(by) == ['baseline', 'repo']
    assert by['baseline']['settings']['forwards_per_step'] == 3 and by['repo']['settings']['forwards_per_step'] == 1
    assert by['baseline']['settings']['malloc'] == 'system default'
    assert by['repo']['settings']['malloc'] == 'keeps freed memory'
    assert by['repo']['repo_over_baseline'] == pytest.approx(
        by['repo']['triplets_per_s'] / by['baseline']['triplets_per_s'], rel=0.01)
    assert 'repo / baseline, train' in p.stdout and '--three-forwards --no-keep-memory' in p.stdout
    assert 'conv weight gradients one matmul on maps of 16 positions or fewer in bf16 and fp32' in p.stdout


@pytest.mark.slow
def test_bad_baseline_flags_are_named_before_anything_runs(zappos):
    p = subprocess.run([sys.executable, os.path.join(REPO, 'bench.py'), '--data', zappos,
                        '--baseline-flags=--no-such-flag'],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "--baseline-flags '--no-such-flag'" in p.stderr and 'round' not in p.stdout


def test_gpu_busy_share_says_nvidia_ml_py_is_missing_instead_of_staying_empty(monkeypatch):
    monkeypatch.setitem(sys.modules, 'pynvml', None)  # import pynvml -> ImportError, as where nothing installed it
    busy = bench.GpuBusy(torch.device('cuda', 0)).start()
    busy.stop()
    assert busy.mean() is None and busy.error == bench.NVML_HINT and 'nvidia-ml-py' in busy.error
    with open(os.path.join(REPO, 'requirements-dev.txt')) as f:
        assert 'nvidia-ml-py' in f.read().split()


def test_gpu_busy_share_reports_an_nvml_failure(monkeypatch):
    monkeypatch.setitem(sys.modules, 'pynvml', object())
    monkeypatch.setattr(torch.cuda, 'utilization', lambda device=None: (_ for _ in ()).throw(RuntimeError('NVML: no')))
    busy = bench.GpuBusy(torch.device('cuda', 0)).start()
    assert busy.mean() is None and 'NVML: no' in busy.error
    assert bench.GpuBusy(CPU).start().error is None  # the CPU has no busy share to report


def test_gpu_check_without_cuda_says_so_and_exits_2(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    line = error_line(in_process(bench.main, ['--gpu-check']))
    assert line.startswith('error: --gpu-check needs a CUDA GPU') and torch.__version__ in line
