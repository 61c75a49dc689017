"""csnlib/train_loop.py: a training epoch (the mirrored images a dataset allows, the log lines off a terminal, the
per-step sums) and what a GPU step must not do, counted on the CPU."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import FAST, error_line, run_main


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
    assert {None: 'hflip off (dataset.json)', 'on': 'hflip on (--hflip on)',
            'off': 'hflip off (--hflip off)'}[hflip] in out
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
    error_line(p, match='"hflip" must be true or false')


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


# ---- the GPU, MPS and torchrun paths, checked on the CPU (no GPU has run this code: see docs/distributed.md) -------

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


def adam_steps(optimizer_for, steps=6, resume_at=None):
    """A small conv net trained `steps` Adam steps in bf16 autocast on fixed data: its parameters, and (resume_at) the
    same run stopped there, its state dicts saved and loaded into a new net and optimizer, and continued."""
    import copy

    import torch.nn as nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    opt = optimizer_for(net.parameters())
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(5, 3, 8, 8, generator=g) for _ in range(steps)]
    for i, x in enumerate(data):
        if i == resume_at:
            saved = copy.deepcopy((net.state_dict(), opt.state_dict()))
            net = copy.deepcopy(net)
            net.load_state_dict(saved[0])
            opt = optimizer_for(net.parameters())
            opt.load_state_dict(saved[1])
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = net(x).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return [p.detach() for p in net.parameters()]


def test_the_cpu_optimizer_is_fused_adam_and_updates_as_the_per_tensor_loop_does():
    from csnlib.train_loop import make_optimizer
    opt = make_optimizer([torch.zeros(2, requires_grad=True)], 1e-3, 'cpu')
    assert isinstance(opt, torch.optim.Adam) and opt.defaults['fused'] is True
    fused = adam_steps(lambda ps: make_optimizer(ps, 1e-2, torch.device('cpu')))
    loop = adam_steps(lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False))
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    resumed = adam_steps(lambda ps: make_optimizer(ps, 1e-2, 'cpu'), resume_at=3)
    assert all(torch.equal(a, b) for a, b in zip(fused, resumed))  # a resumed run is the same run, bit for bit


class Compiled(torch.nn.Module):
    """Stands in for what torch.compile returns (an OptimizedModule: a wrapper with the eager module as _orig_mod)
    and records the batch sizes it is called with; compiling the real thing takes minutes on a small CPU."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod, self.batches = module, []

    def forward(self, x, c):
        self.batches.append(len(c))
        return self._orig_mod(x, c)


def test_a_compiled_model_leaves_the_epochs_last_smaller_batch_to_its_eager_module(shapes_data):
    from csnlib import train_loop as training
    from csnlib.builder import build_model
    from csnlib.image_cache import ImageStore
    from csnlib.options import main_parser
    from csnlib.runtime import Runtime
    from triplet_image_loader import load_dataset_info, load_triplets
    args = main_parser().parse_args(['--no-pretrained', '--image-size', '32', '--batch-size', '4', '--dim_embed', '8',
                                     '--amp', 'off'])
    info = load_dataset_info(shapes_data)
    trip, cond = load_triplets(info, 'train', [0, 1], 10, seed=1)
    model = build_model(args, 2)
    eager = []
    model.register_forward_pre_hook(lambda m, inp: eager.append(len(inp[1])))
    compiled = Compiled(model)
    optimizer = training.make_optimizer(model.parameters(), 1e-3, 'cpu')
    sums, finished = training.train_epoch(model, compiled, optimizer, torch.amp.GradScaler('cpu', enabled=False),
                                          (trip, cond, ImageStore(info, 32), False), Runtime(args, torch.device('cpu')),
                                          1)
    assert finished and sums['n'] == 10
    assert compiled.batches == [4, 4] and eager == [4, 4, 2]  # the last batch of 2: eager, no new shape compiled
    assert training.step_model(model, 2, 4) is model  # a model that is not compiled takes every batch itself
