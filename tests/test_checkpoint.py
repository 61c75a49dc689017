"""csnlib/checkpoint.py and csnlib/builder.py: the ImageNet weights a model starts from, a checkpoint that is refused
rather than unpickled, and the flags that come back from a checkpoint (and those that never do)."""
import os
import pickle

import pytest
import torch

from conftest import FAST, error_line, run_main


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
    assert '--no-pretrained' in error_line(p, match='--weights'), p.stderr
    assert not (runs / 'offline').exists()
    run_main(*args, '--name', 'w', '--weights', weights, env=env)
    ck = torch.load(runs / 'w' / 'checkpoint.pth.tar', weights_only=True)
    assert ck['args']['weights'] == str(weights)
    # the backbone started from the file's weights: conv1 moved only a little from them in one epoch
    start = tv.state_dict()['conv1.weight']
    assert (ck['state_dict']['embednet.embeddingnet.conv1.weight'] - start).abs().max() < 0.05
    torch.save({'not': torch.zeros(1)}, tmp_path / 'bad.pth')
    p = run_main(*args, '--name', 'bad', '--weights', tmp_path / 'bad.pth', check=False)
    error_line(p, match='not a torchvision resnet18 state dict')


@pytest.mark.slow
def test_a_pickle_checkpoint_is_refused_not_executed(tmp_path):
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    path = tmp_path / 'evil.pth.tar'
    with open(path, 'wb') as f:
        pickle.dump({'state_dict': Evil(), 'args': {}}, f)
    error_line(run_main('--test', '--resume', path, check=False), match='weights_only')
    torch.save({'args': {}, 'state_dict': {}, 'x': Evil()}, path, _use_new_zipfile_serialization=True)
    error_line(run_main('--test', '--resume', path, check=False), match='refused to load it')
    assert not marker.exists()


def test_how_to_run_flags_never_come_back_from_a_checkpoint():
    from csnlib.checkpoint import HOW_TO_RUN, how_to_run_changes, merge_checkpoint_args
    from csnlib.options import main_parser
    parser = main_parser()
    stored = vars(parser.parse_args(['--device', 'cpu', '--no-cuda', '--amp', 'off', '--compile', '--workers', '3',
                                     '--no-channels-last', '--no-keep-memory', '--no-cache', '--cache-dir',
                                     '/elsewhere', '--dist-timeout', '5', '--three-forwards', '--hflip', 'off',
                                     '--lr', '0.01', '--learned', '--conditions', 'shape']))
    ckpt = {'args': stored, 'state_dict': {}}
    argv = ['--resume', 'ck.pth.tar']
    args = merge_checkpoint_args(parser.parse_args(argv), ckpt, {'resume'}, 'ck.pth.tar')
    defaults = parser.parse_args([])
    for k in HOW_TO_RUN:  # this machine's defaults, not the checkpoint's
        assert getattr(args, k) == getattr(defaults, k), k
    # what changes what is learned comes back
    assert (args.three_forwards and args.hflip == 'off' and args.lr == 0.01 and args.learned
            and args.conditions == ['shape'])
    changed = how_to_run_changes(args, ckpt, {'resume'})
    assert ('--device cpu -> auto' in changed and '--amp off -> auto' in changed
            and not any('workers' in c for c in changed))
    # given on this command line: kept, and not reported as a change
    argv = ['--resume', 'ck.pth.tar', '--amp', 'bf16']
    args = merge_checkpoint_args(parser.parse_args(argv), ckpt, {'resume', 'amp'}, 'ck.pth.tar')
    assert (args.amp == 'bf16'
            and not any(c.startswith('--amp') for c in how_to_run_changes(args, ckpt, {'resume', 'amp'})))
