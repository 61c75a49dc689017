"""What no CPU test can show, on a machine with CUDA: the first thing to run on a GPU machine (about two minutes, on a
temporary synthetic dataset). Skipped without CUDA; CI has none.

    .venv/bin/python -m pytest -m gpu -v tests/test_gpu.py        # or: python bench.py --gpu-check

It checks the device and the AMP chosen, training steps under torch.cuda.set_sync_debug_mode('error') (any wait for
the GPU other than the log-interval read fails, naming the line), main.py trained for an epoch (under torchrun with
NCCL over every GPU when there are several), resumed and tested, and the bench figures with the GPU busy share."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from csnlib import runtime
from csnlib.builder import build_model
from csnlib.image_cache import ImageStore, build_image_cache
from csnlib.options import main_parser
from csnlib.synthetic import make_zappos_like
from csnlib.train_loop import make_optimizer, train_epoch
from triplet_image_loader import load_dataset_info, load_triplets

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason=f'needs a CUDA GPU; torch {torch.__version__} '
                                 f'sees none ({"a CPU-only build" if not torch.version.cuda else "check nvidia-smi"})')]
SEED = 1


@pytest.fixture(scope='module')
def gpu_data(tmp_path_factory):
    data = str(tmp_path_factory.mktemp('gpu') / 'zappos')
    make_zappos_like(data, 400, SEED, log=lambda *a: None)
    return data


@pytest.fixture(scope='module')
def rt(gpu_data):
    args = main_parser().parse_args(['--data', gpu_data, '--no-pretrained', '--image-size', '64', '--batch-size', '32',
                                     '--device', 'cuda', '--log-interval', '1000', '--seed', str(SEED)])
    return runtime.start(args)


def test_device_and_amp(rt):
    d = rt.device
    print(f'{torch.cuda.device_count()} x {torch.cuda.get_device_name(d)}, compute capability '
          f'{torch.cuda.get_device_capability(d)}, torch {torch.__version__} (CUDA {torch.version.cuda}); --amp auto '
          f'-> {str(rt.amp_dtype).replace("torch.", "") if rt.amp_dtype else "off"}'
          f'{" + grad scaler" if rt.use_scaler else ""}')
    assert d.type == 'cuda'
    want = torch.bfloat16 if torch.cuda.get_device_capability(d) >= (8, 0) else torch.float16
    assert rt.amp_dtype == want and rt.use_scaler == (want == torch.float16)


def test_training_steps_wait_for_the_gpu_only_at_the_log_interval_read(rt, warmup=3, steps=10):
    """After a warm-up, training steps under sync debug mode 'error': any host-device synchronisation other than the
    log-interval read raises, naming where."""
    args, device = rt.args, rt.device
    info = load_dataset_info(args.data)
    trip, cond = load_triplets(info, 'train', list(range(len(info.notions))), 10 ** 9, args.seed, log=lambda *a: None)
    B = args.batch_size
    assert len(trip) >= (warmup + steps) * B
    model = build_model(args, len(info.notions)).to(device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], args.lr, device)
    scaler = torch.amp.GradScaler('cuda', enabled=rt.use_scaler)
    store = ImageStore(info, args.image_size, build_image_cache(info, args.image_size, log=lambda *a: None))
    part = lambda a, b: (trip[a * B:b * B], cond[a * B:b * B], store, True)
    train_epoch(model, model, optimizer, scaler, part(0, warmup), rt, 1)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode('error')
    try:
        sums, _ = train_epoch(model, model, optimizer, scaler, part(warmup, warmup + steps), rt, 2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert sums['n'] == steps * B and torch.isfinite(torch.tensor(sums['loss']))


def test_main_py_trains_resumes_and_tests_on_every_gpu(gpu_data, tmp_path):
    """main.py as a user runs it (torchrun over every GPU when there are several): 1 epoch, --resume to 2, --test."""
    n_gpu, runs = torch.cuda.device_count(), str(tmp_path / 'runs')
    launch = [sys.executable, os.path.join(REPO, 'main.py')]
    if n_gpu > 1:
        launch[1:1] = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(n_gpu)]
    common = ['--image-size', '64', '--num_valtriplets', '256', '--num_testtriplets', '256', '--device', 'cuda']
    ckpt, best = os.path.join(runs, 'gpu', 'checkpoint.pth.tar'), os.path.join(runs, 'gpu', 'model_best.pth.tar')
    for argv in (['--data', gpu_data, '--runs', runs, '--name', 'gpu', '--no-pretrained', '--epochs', '1',
                  '--batch-size', str(32 * n_gpu), '--num_traintriplets', '1024', *common],
                 ['--resume', ckpt, '--epochs', '2'], ['--test', '--resume', best, '--no-pictures']):
        p = subprocess.run(launch + argv, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, f'{" ".join(argv)} exited {p.returncode}:\n{p.stdout[-1500:]}\n{p.stderr[-3000:]}'
    with open(os.path.join(runs, 'gpu', 'metrics.jsonl')) as f:
        assert [json.loads(line)['epoch'] for line in f] == [1, 2]
    res = json.load(open(os.path.join(runs, 'gpu', 'test_results.json')))
    print(f'test accuracy {res["accuracy"] * 100:.1f} %')
    assert 0 < res['accuracy'] <= 1


def test_bench_figures_on_the_gpu(gpu_data):
    p = subprocess.run([sys.executable, os.path.join(REPO, 'bench.py'), '--data', gpu_data, '--device', 'cuda',
                        '--repeats', '1', '--impls', 'original', 'repo', '--seed', str(SEED)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-1500:] + p.stderr[-3000:]
    print(p.stdout)
    figs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{')]
    assert {f['impl'] for f in figs} == {'original', 'repo'} and all(f['device'].startswith('cuda') for f in figs)
