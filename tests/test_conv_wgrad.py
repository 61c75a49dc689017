"""csnlib/conv_wgrad.py: the weight gradient as one matrix product against a loop over the kernel's offsets written out,
the swapped convolutions against nn.Conv2d in fp32 and under bf16 autocast, the rule, and main.py's use of it."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import FAST, run_main
from csnlib import conv_wgrad


def loop_weight_grad(gy, x, k, s, p):
    """gw[o, c, i, j] = sum over images n and output positions (h, w) of gy[n, o, h, w] * x_pad[n, c, h*s+i, w*s+j]."""
    xp = F.pad(x, (p, p, p, p)).double()
    n, o, ho, wo = gy.shape
    gw = torch.zeros(o, x.shape[1], k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(k):
            for h in range(ho):
                for w in range(wo):
                    gw[:, :, i, j] += gy[:, :, h, w].double().t() @ xp[:, :, h * s + i, w * s + j]
    return gw


@pytest.mark.parametrize('c,o,size,k,s,p', [(3, 8, 9, 3, 1, 1), (5, 4, 8, 3, 2, 1), (6, 7, 4, 1, 2, 0),
                                           (2, 3, 11, 7, 2, 3), (4, 4, 2, 3, 1, 1), (3, 5, 5, 2, 1, 0)])
def test_the_matrix_product_is_the_weight_gradient_written_out(c, o, size, k, s, p):
    torch.manual_seed(0)
    x = torch.randn(3, c, size, size)
    w = torch.randn(o, c, k, k, requires_grad=True)
    y = F.conv2d(x, w, stride=s, padding=p)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    for xx, gg in ((x, gy), (x.contiguous(memory_format=torch.channels_last),
                             gy.contiguous(memory_format=torch.channels_last))):
        mine = conv_wgrad.weight_grad(gg, xx, k, s, p)
        assert mine.shape == w.shape
        torch.testing.assert_close(mine.double(), loop_weight_grad(gy, x, k, s, p), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine, w.grad, rtol=1e-5, atol=1e-5)   # and autograd's own


def backbone_pair():
    from csnlib import options
    from csnlib.builder import build_model
    args = options.main_parser().parse_args(['--data', 'x', '--no-pretrained'])
    torch.manual_seed(1)
    plain = build_model(args, 4, pretrained=False).to(memory_format=torch.channels_last)
    swapped = copy.deepcopy(plain)
    return args, plain, swapped


def step(model, x, c, amp):
    model.train()
    model.zero_grad()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
        d_far, d_close, emb_norm, _ = model(x, c)
        loss = torch.relu(d_close - d_far + 0.2).float().mean() + 5e-3 * emb_norm
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('amp', [False, True])
def test_a_swapped_backbone_gives_nn_conv2d_s_loss_and_gradients(amp, monkeypatch):
    _, plain, swapped = backbone_pair()
    reference = copy.deepcopy(plain)                                     # fp32 and oneDNN: what both approximate
    n = conv_wgrad.install(swapped, (torch.bfloat16, torch.float32))
    assert n == sum(type(m) is nn.Conv2d for m in plain.modules()) > 10  # every convolution of the backbone fits
    assert list(swapped.state_dict()) == list(plain.state_dict())      # checkpoints do not change
    assert all(type(m) is not nn.Conv2d for m in swapped.modules())
    used = []
    apply = conv_wgrad._PatchGradConv.apply
    monkeypatch.setattr(conv_wgrad._PatchGradConv, 'apply', lambda *a: used.append(a[0].shape) or apply(*a))
    x = torch.randn(3 * 4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    c = torch.tensor([0, 1, 2, 3])
    loss0, g0 = step(plain, x, c, amp)
    loss1, g1 = step(swapped, x, c, amp)
    # at 32 px: layer2's maps are 4x4 and layer3's 2x2 (10 convolutions, downsamples included); layer1 (8x8) and the
    # stem (16x16) stay oneDNN's
    assert len(used) == 10 and all(s[-1] in (2, 4, 8) for s in used)  # their inputs: 8x8 (strided), 4x4, 2x2
    if not amp:  # fp32: the same arithmetic as oneDNN's kernels, to float rounding
        torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
        for k in g0:
            assert ((g0[k] - g1[k]).norm() / g0[k].norm().clamp_min(1e-12)).item() < 1e-5, k
    else:  # bf16 rounds every convolution's output to 2 ** -8, and oneDNN's kernels round differently per CPU (AMX
        # or AVX512-bf16): the product must be as close to the fp32 step as oneDNN's own bf16 step is
        loss32, g32 = step(reference, x, c, False)
        torch.testing.assert_close(loss0, loss32, rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(loss1, loss32, rtol=2e-2, atol=1e-3)
        for k in g0:
            err_onednn, err_product = (g0[k] - g32[k]).norm().item(), (g1[k] - g32[k]).norm().item()
            assert err_product <= 1.1 * err_onednn + 1e-3 * g32[k].norm().item(), k
            for g in (g0, g1):
                assert torch.isfinite(g[k]).all()
    swapped.eval()
    plain.eval()
    with torch.no_grad():
        # BatchNorm's running statistics came from the two forward passes, equal to float (fp32) or bf16 rounding
        torch.testing.assert_close(swapped.embednet.embed(x[:4], c), plain.embednet.embed(x[:4], c),
                                   **(dict(rtol=2e-2, atol=1e-3) if amp else dict(rtol=1e-4, atol=1e-5)))


def test_the_rule_and_what_falls_back():
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    assert conv_wgrad.dtypes_for('auto', cpu, amx=True) == (torch.bfloat16,)
    assert conv_wgrad.dtypes_for('auto', cpu, amx=False) == ()                # measured on AMX only
    assert conv_wgrad.dtypes_for('matmul', cpu) == (torch.bfloat16, torch.float32)
    assert conv_wgrad.dtypes_for('onednn', cpu) == () and conv_wgrad.dtypes_for('auto', cuda) == ()
    assert conv_wgrad.install(nn.Sequential(nn.Conv2d(3, 4, 3)), ()) == 0
    odd = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.Conv2d(4, 4, 3, groups=2, bias=False),
                        nn.Conv2d(4, 4, 3, dilation=2, bias=False), nn.Conv2d(4, 4, (1, 3), bias=False),
                        nn.Conv2d(4, 4, 3, padding='same', bias=False), nn.Conv2d(4, 4, 3, bias=False))
    assert conv_wgrad.install(odd, (torch.float32,)) == 1 and type(odd[5]) is conv_wgrad.PatchGradConv2d
    assert conv_wgrad.describe(()) == 'oneDNN'
    assert conv_wgrad.describe((torch.bfloat16,)) == 'one matmul on maps of 16 positions or fewer in bf16'


def test_large_maps_other_precisions_and_evaluation_stay_with_nn_conv2d(monkeypatch):
    used = []
    apply = conv_wgrad._PatchGradConv.apply
    monkeypatch.setattr(conv_wgrad._PatchGradConv, 'apply', lambda *a: used.append(1) or apply(*a))
    conv = conv_wgrad.PatchGradConv2d(nn.Conv2d(4, 4, 3, padding=1, bias=False), (torch.bfloat16,))
    conv(torch.randn(2, 4, 4, 4, requires_grad=True)).sum().backward()   # fp32, asked for bf16 only
    with torch.autocast('cpu', dtype=torch.bfloat16):
        conv(torch.randn(2, 4, 5, 5)).sum().backward()                  # 25 positions
        conv.eval()
        conv(torch.randn(2, 4, 4, 4))                                    # evaluation
        conv.train()
        with torch.no_grad():
            conv(torch.randn(2, 4, 4, 4))
        assert not used
        y = conv(torch.randn(2, 4, 4, 4))                                # 16 positions in bf16: the product
    assert used == [1] and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32


def test_main_says_its_choice_and_a_checkpoint_from_before_the_flag_resumes_with_onednn(shapes_data, tmp_path):
    from csnlib.checkpoint import load_checkpoint, merge_checkpoint_args, save_checkpoint
    runs = tmp_path / 'runs'
    out = run_main('--data', shapes_data, '--runs', runs, '--name', 'w', *FAST, '--amp', 'off',
                   '--conv-wgrad', 'matmul', '--epochs', 1).stdout
    assert 'conv weight gradients one matmul on maps of 16 positions or fewer in bf16 and fp32' in out
    ck_path = runs / 'w' / 'checkpoint.pth.tar'
    ck = load_checkpoint(ck_path)
    assert ck['args']['conv_wgrad'] == 'matmul'
    from csnlib import options
    args = options.main_parser().parse_args(['--data', str(shapes_data)])
    assert merge_checkpoint_args(args, ck, set(), ck_path).conv_wgrad == 'matmul'  # a resume keeps the run's
    del ck['args']['conv_wgrad']                                          # a checkpoint of the code before the flag
    assert merge_checkpoint_args(args, ck, set(), ck_path).conv_wgrad == 'onednn'
    assert merge_checkpoint_args(args, ck, {'conv_wgrad'}, ck_path).conv_wgrad == 'auto'
    save_checkpoint(ck, ck_path)
    out = run_main('--resume', ck_path, '--data', shapes_data, '--epochs', 2).stdout
    assert 'conv weight gradients oneDNN' in out
    assert json.loads((runs / 'w' / 'args.json').read_text())['conv_wgrad'] == 'onednn'


@pytest.mark.parametrize('size,stride', [(2, 1), (4, 2), (4, 1), (3, 1)])
def test_on_the_smallest_maps_the_forward_pass_is_the_product_too(size, stride):
    torch.manual_seed(2)
    plain = nn.Conv2d(6, 5, 3, stride=stride, padding=1, bias=False).to(memory_format=torch.channels_last)
    swapped = conv_wgrad.PatchGradConv2d(copy.deepcopy(plain), (torch.float32,))
    x = torch.randn(3, 6, size, size).contiguous(memory_format=torch.channels_last)
    x0, x1 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y0, y1 = plain(x0), swapped(x1)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    assert y1.is_contiguous(memory_format=torch.channels_last)         # as oneDNN's output, for the next layer
    gy = torch.randn_like(y0)
    (y0 * gy).sum().backward()
    (y1 * gy).sum().backward()
    torch.testing.assert_close(x1.grad, x0.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(swapped.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
