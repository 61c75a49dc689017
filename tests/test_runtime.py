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
def test_the_start_line_says_what_was_chosen_for_memory(shapes_data, tmp_path):
    p = run_main('--data', shapes_data, '--runs', tmp_path, '--name', 'a', '--epochs', 1, '--device', 'cpu', *FAST)
    assert 'malloc keeps freed memory' in p.stdout
    assert 'workers 0, embedding batch 4096' in p.stdout  # 32 px on the CPU from the cache: runtime.eval_batch_size
    p = run_main('--data', shapes_data, '--runs', tmp_path, '--name', 'b', '--epochs', 1, '--device', 'cpu',
                 '--no-keep-memory', *FAST)
    assert 'malloc system default' in p.stdout


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
