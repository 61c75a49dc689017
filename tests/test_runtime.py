"""csnlib/runtime.py: what a run is set up with (the precision, the allocator, the torchrun environment) and the
start line that says so; the GPU and torchrun paths checked on the CPU."""
import argparse
import os

import pytest
import torch

from conftest import FAST, REPO, run_main

FAULTS_AFTER_FREE = """
import argparse
import resource
import sys
import torch
sys.path.insert(0, sys.argv[2])
import main, csnlib.runtime as runtime  # a training process: everything main.py loads is loaded (in a bare
# interpreter glibc's free chunk does not fit torch's next aligned 64 MiB request, the heap grows instead and every
# block is faulted in anew)
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
def test_the_start_line_says_what_was_chosen_for_memory_and_threads(shapes_data, tmp_path):
    p = run_main('--data', shapes_data, '--runs', tmp_path, '--name', 'a', '--epochs', 1, '--device', 'cpu', *FAST)
    assert 'malloc keeps freed memory' in p.stdout
    assert 'workers 0, embedding batch 4096' in p.stdout  # 32 px on the CPU from the cache: runtime.eval_batch_size
    assert f'threads {torch.get_num_threads()}' in p.stdout  # torch's default, as in this process
    p = run_main('--data', shapes_data, '--runs', tmp_path, '--name', 'b', '--epochs', 1, '--device', 'cpu',
                 '--no-keep-memory', '--threads', 1, *FAST)
    assert 'malloc system default, threads 1' in p.stdout


# ---- the GPU, MPS and torchrun paths, checked on the CPU (no GPU has run this code: see docs/distributed.md) -------

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


@pytest.mark.parametrize('units, amp, size, expected', [(True, 'auto', 32, torch.bfloat16),  # measured: faster
                                                       (True, 'auto', 64, torch.bfloat16),
                                                       (True, 'auto', 112, torch.bfloat16),
                                                       (False, 'auto', 32, None),   # emulated bf16: fp32
                                                       (False, 'auto', 112, None),
                                                       (True, 'off', 32, None),
                                                       (False, 'bf16', 64, torch.bfloat16)])  # asked for: emulated
def test_amp_auto_on_the_cpu_is_bf16_at_every_image_size_where_the_cpu_has_bf16_units(monkeypatch, units, amp, size,
                                                                                       expected):
    from csnlib import runtime
    monkeypatch.setattr(runtime, 'cpu_has_bf16', lambda: units)
    args = argparse.Namespace(amp=amp, image_size=size)
    assert runtime.choose_amp(args, torch.device('cpu')) == (expected, False)


def test_the_path_amp_auto_picks_on_a_bf16_cpu_computes_the_fp32_loss_to_bf16_rounding(monkeypatch):
    """What --amp auto and the defaults pick at 32 px on a CPU with bf16 units (bf16 autocast, channels_last) against
    plain fp32 NCHW on a batch of 16 triplets: channels_last alone gives the fp32 figures to float rounding, bf16 the
    same loss, distances and gradients to bf16's rounding (8 bits of mantissa: distances within 5 % here)."""
    from csnlib import runtime
    from csnlib.builder import build_model
    from csnlib.loader import to_input
    from csnlib.options import main_parser
    from tripletnet import csn_loss
    monkeypatch.setattr(runtime, 'cpu_has_bf16', lambda: True)
    args = main_parser().parse_args(['--no-pretrained', '--image-size', '32', '--dim_embed', '8'])
    amp_dtype, _ = runtime.choose_amp(args, torch.device('cpu'))
    assert amp_dtype == torch.bfloat16 and args.channels_last
    torch.manual_seed(0)
    model = build_model(args, 2)
    u8 = torch.randint(0, 256, (3 * 16, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    c = torch.arange(16) % 2  # (16,)
    out = {}
    for name, dtype, channels_last in (('fp32', None, False), ('fp32 channels_last', None, True),
                                       ('auto', amp_dtype, True)):
        model.zero_grad(set_to_none=True)
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with torch.autocast('cpu', dtype=dtype, enabled=dtype is not None):
            d_far, d_close, emb_norm, mask_norm = model(to_input(u8, 'cpu', channels_last), c)
        loss = csn_loss(d_far, d_close, emb_norm, mask_norm, 0.2, 5e-3, 5e-4)
        loss.backward()
        out[name] = (loss.detach(), torch.cat([d_far, d_close]).detach().float(),
                     torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    (loss32, d32, g32), (loss_cl, d_cl, g_cl), (loss_bf, d_bf, g_bf) = out.values()
    assert loss32.dtype == loss_bf.dtype == torch.float32
    torch.testing.assert_close(loss_cl, loss32, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_cl, d32, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_cl, g32, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(loss_bf, loss32, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(d_bf, d32, rtol=5e-2, atol=1e-2)
    assert torch.nn.functional.cosine_similarity(g_bf, g32, dim=0) > 0.95  # all the model's gradients
    assert torch.nn.functional.cosine_similarity(g_cl, g32, dim=0) > 0.9999


def test_threads_set_torchs_count_and_a_resumed_run_keeps_the_checkpoints(monkeypatch):
    """The thread count changes oneDNN's float rounding, so a resume that took a new count would not be exact."""
    from csnlib import runtime
    from csnlib.checkpoint import merge_checkpoint_args
    from csnlib.options import main_parser
    before = torch.get_num_threads()
    try:
        args = main_parser().parse_args(['--threads', '1'])
        assert runtime.choose_threads(args, torch.device('cpu')) == 1 == torch.get_num_threads()
        ckpt = {'args': vars(args), 'state_dict': {}}
        resumed = merge_checkpoint_args(main_parser().parse_args(['--resume', 'x']), ckpt, {'resume'}, 'x')
        assert resumed.threads == 1
        torch.set_num_threads(before)
        default = main_parser().parse_args([])
        assert default.threads is None and runtime.choose_threads(default, torch.device('cpu')) == before
    finally:
        torch.set_num_threads(before)


def test_a_run_asking_for_bf16_on_a_cpu_without_bf16_units_is_told_so(shapes_data, tmp_path, monkeypatch, capsys):
    import main
    from csnlib import runtime
    monkeypatch.setattr(runtime, 'cpu_has_bf16', lambda: False)
    argv = ['--data', shapes_data, '--runs', str(tmp_path / 'runs'), '--name', 'b', '--epochs', '1', *FAST]
    assert main.main(argv + ['--amp', 'bf16', '--num_traintriplets', '64']) == 0
    start = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('device cpu'))
    assert start.startswith('device cpu, amp bfloat16 (emulated: this CPU has no avx512_bf16') and '--amp off' in start


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
        backend=backend, wait=os.environ.get('TORCH_NCCL_BLOCKING_WAIT'),
        handling=os.environ['TORCH_NCCL_ASYNC_ERROR_HANDLING']))
    args = argparse.Namespace(device='auto', no_cuda=False, dist_timeout=60, batch_size=4)
    runtime.setup_distributed(args)
    assert seen == {'backend': 'nccl', 'wait': '1', 'handling': '3'}
    monkeypatch.delenv('TORCH_NCCL_BLOCKING_WAIT')
    runtime.setup_distributed(argparse.Namespace(**{**vars(args), 'device': 'cpu'}))
    assert seen['backend'] == 'gloo' and seen['wait'] is None


@pytest.mark.parametrize('device, workers, size, batch, expected', [
    ('cpu', 0, 32, 64, 4096), ('cpu', 0, 64, 64, 1024), ('cpu', 0, 112, 64, 256), ('cpu', 0, 64, 2048, 2048),
    ('cpu', 2, 32, 64, 256), ('cuda', 0, 32, 64, 256)])
def test_the_embedding_batch_is_larger_on_the_cpu_for_small_images_read_in_the_process(device, workers, size, batch,
                                                                                       expected):
    from csnlib.runtime import eval_batch_size
    assert eval_batch_size(batch, size, device, workers) == expected
