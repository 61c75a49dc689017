"""scenet.py: SCE-Net's condition weights and distances against a written-out loop over triplets and masks, its loss
(CSN's terms) against a hand computation, the notion label unused, and a tiny run through main.py with what it
refuses (retrieval by notion, ONNX, --export-embeddings, --add-notion)."""
import copy
import functools
import json
import math

import pytest
import torch

from conftest import FAST, in_process, run_main
from Resnet_18 import EmbeddingNet
from scenet import SCENet
from triplet_image_loader import UserError
from tripletnet import TripletNet, csn_loss, masked_distances

SMALL = ['--dim_embed', '16', '--num_traintriplets', '96', '--num_valtriplets', '32', '--num_testtriplets', '48']


def tiny(n_masks=3, dim=8, seed=0, branch='pair'):
    """A fresh copy of one seeded SCE-Net in eval mode."""
    return copy.deepcopy(_built(n_masks, dim, seed, branch))


@functools.lru_cache
def _built(n_masks, dim, seed, branch='pair'):
    torch.manual_seed(seed)
    net = SCENet(EmbeddingNet(dim), n_masks, dim, branch=branch).eval()
    with torch.no_grad():
        net.fc2.weight.mul_(10)  # weights far from uniform
    return net


def weights_of(net, *fs):
    """The branch's weights (K,) over the masks for the raw embeddings (D,) it sees, written out."""
    unit = [f / math.sqrt(sum(float(v) ** 2 for v in f)) for f in fs]
    h = torch.relu(net.fc1.weight @ torch.cat(unit) + net.fc1.bias)
    logits = [float(net.fc2.weight[k] @ h + net.fc2.bias[k]) for k in range(len(net.fc2.bias))]
    return torch.tensor([math.exp(v) / sum(math.exp(u) for u in logits) for v in logits])


def distance(net, w, fa, fy):
    """||e_w(a) - e_w(y)|| with e_w(z) = sum_k w_k * (f(z) * m_k) / ||f(z) * m_k||, written out."""
    masks = torch.relu(net.masks.weight)

    def e(f):
        out = 0
        for k, m in enumerate(masks):
            fm = f * m
            out = out + w[k] * fm / fm.norm()
        return out
    return float((e(fa) - e(fy)).norm())


def reference(net, fa, ff, fc):
    """SCE-Net's equations for one triplet of raw embeddings (D,): (weights for d_far (K,), for d_close (K,), d_far,
    d_close). The pair branch weighs each distance from its own pair; the released branch once from all three."""
    if net.branch == 'pair':
        w_far, w_close = weights_of(net, fa, ff), weights_of(net, fa, fc)
    else:
        w_far = w_close = weights_of(net, fa, ff, fc)
    return w_far, w_close, distance(net, w_far, fa, ff), distance(net, w_close, fa, fc)


@torch.no_grad()
@pytest.mark.parametrize('branch', ['pair', 'triplet'])
def test_weights_and_distances_match_a_written_out_loop(branch):
    net = tiny(branch=branch)
    B = 4
    emb = torch.randn(3 * B, 8)
    fa, ff, fc = emb.chunk(3)
    w = net.condition_weights(fa, ff) if branch == 'pair' else net.condition_weights(fa, ff, fc)
    assert w.shape == (B, 3)
    torch.testing.assert_close(w.sum(1), torch.ones(B))
    assert float(w.max()) > 0.5  # not uniform: the test would pass constant weights otherwise
    d_far, d_close, mask_l1 = masked_distances(net, emb, torch.zeros(B, dtype=torch.long))
    for i in range(B):
        want_far_w, _, want_far, want_close = reference(net, fa[i], ff[i], fc[i])
        torch.testing.assert_close(w[i], want_far_w.float(), atol=1e-6, rtol=1e-5)
        assert abs(float(d_far[i]) - want_far) < 1e-5 and abs(float(d_close[i]) - want_close) < 1e-5
    masks = torch.relu(net.masks.weight)
    assert (net.masks.weight < 0).any()  # N(0.9, 0.7): ReLU matters
    torch.testing.assert_close(mask_l1, torch.full((3 * B,), float(masks.abs().sum(1).mean())))


@torch.no_grad()
def test_the_pair_branch_cannot_see_the_slot_order_and_the_released_one_can():
    """Far and close swapped: the pair branch's two distances swap exactly; the released branch's do not (its weights
    depend on which slot holds which image)."""
    B = 64
    emb = torch.randn(3 * B, 8)
    fa, ff, fc = emb.chunk(3)
    swapped = torch.cat([fa, fc, ff])
    c = torch.zeros(B, dtype=torch.long)
    pair = tiny(branch='pair')
    d_far, d_close, _ = masked_distances(pair, emb, c)
    s_far, s_close, _ = masked_distances(pair, swapped, c)
    assert torch.equal(s_far, d_close) and torch.equal(s_close, d_far)
    released = tiny(branch='triplet')
    d_far, d_close, _ = masked_distances(released, emb, c)
    s_far, s_close, _ = masked_distances(released, swapped, c)
    assert not torch.allclose(s_far, d_close, atol=1e-4)


@torch.no_grad()
def test_the_notion_label_is_not_used():
    net = tiny()
    model = TripletNet(net).eval()
    x = torch.randn(6, 3, 32, 32)
    a = model(x, torch.tensor([0, 0]))
    b = model(x, torch.tensor([2, 1]))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    emb = net.embed(x)
    torch.testing.assert_close(net.embed(x, torch.tensor([1] * 6)), emb)
    # a triplet's distances come from its three images only: permuting the triplets permutes the distances
    perm = torch.tensor([1, 0])
    rows = torch.cat([perm, perm + 2, perm + 4])
    d = masked_distances(net, emb[rows], torch.tensor([0, 1]))
    full = masked_distances(net, emb, torch.tensor([1, 0]))
    torch.testing.assert_close(d[0], full[0][perm])
    torch.testing.assert_close(d[1], full[1][perm])


def test_loss_is_csns_against_a_hand_computation_and_backward_reaches_every_part():
    net = tiny()
    model = TripletNet(net).train()
    B, margin = 4, 0.2
    x = torch.randn(3 * B, 3, 32, 32)
    c = torch.zeros(B, dtype=torch.long)
    d_far, d_close, emb_norm, mask_norm = model(x, c)
    raw = net.embed(x).detach()  # the same batch in train mode: the same BatchNorm statistics
    fro = sum(float(part.norm()) for part in raw.chunk(3)) / 3  # Frobenius norm of each image's (B, D), averaged
    # SCE-Net: sum over the batch of the mean mask L1
    l1 = float(torch.relu(net.masks.weight.detach()).abs().sum(1).mean()) * B
    rank = sum(max(0.0, margin - (float(d_far[i].detach()) - float(d_close[i].detach()))) for i in range(B)) / B
    want = rank + 5e-3 * fro / math.sqrt(B) + 5e-4 * l1 / B
    assert net.norm_penalties is True
    loss = csn_loss(d_far, d_close, emb_norm, mask_norm, margin, 5e-3, 5e-4)
    assert abs(float(loss.detach()) - want) < 1e-5
    loss.backward()
    for p in (net.masks.weight, net.fc1.weight, net.fc2.weight, net.embeddingnet.fc.weight,
              net.embeddingnet.conv1.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_deterministic_and_what_has_no_meaning_is_refused():
    x = torch.randn(6, 3, 32, 32)
    a, b = tiny(seed=2), _built.__wrapped__(3, 8, 2, 'pair')
    with torch.no_grad():
        assert all(torch.equal(u, v) for u, v in zip(TripletNet(a)(x, torch.tensor([0, 1])),
                                                      TripletNet(b)(x, torch.tensor([0, 1]))))
    assert a.mask_weights() is None and a.concept_masks().shape == (3, 8)
    with pytest.raises(UserError, match='no embedding per notion'):
        a.apply_mask(torch.zeros(2, 8), torch.tensor([0, 1]))
    pytest.importorskip('onnx')
    import warnings

    from csnlib.onnx_export import MaskedEmbedder
    with pytest.raises(UserError, match='ONNX'), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(MaskedEmbedder(a).eval(), (x[:2], torch.tensor([0, 1])), '/dev/null', dynamo=False)


@pytest.mark.slow
def test_main_trains_resumes_and_tests_scenet_and_refuses_retrieval_by_notion(shapes_data, tmp_path):
    import hubconf
    import main
    import retrieve
    from conftest import error_line
    from csnlib.builder import load_model
    runs = tmp_path / 'runs'
    base = ['--data', shapes_data, '--runs', runs, '--name', 'sce', *FAST, *SMALL, '--model', 'scenet']
    run_main(*base, '--epochs', '1')
    ckpt = runs / 'sce' / 'checkpoint.pth.tar'
    out = run_main(*base, '--epochs', '2', '--resume', ckpt).stdout
    metrics = [json.loads(ln) for ln in open(runs / 'sce' / 'metrics.jsonl')]
    assert [m['epoch'] for m in metrics] == [1, 2] and 'resumed' in out and all(m['mask_norm'] > 0 for m in metrics)
    best = runs / 'sce' / 'model_best.pth.tar'
    out = run_main('--test', '--resume', best).stdout  # pictures on: skipped with the reason
    res = json.load(open(runs / 'sce' / 'test_results.json'))
    assert set(res['per_notion']) == {'colour', 'shape'} and 'mAP' not in res and 'no embedding per notion' in out
    assert not (runs / 'sce' / 'retrieval_shape.png').exists()
    model, _, _ = load_model(str(best), shapes_data, 'cpu')
    assert type(model.embednet).__name__ == 'SCENet'
    trained = hubconf.csn(checkpoint=str(best))
    x = torch.randn(2, 3, 32, 32)
    assert trained.embed(x).shape == (2, 16)  # the raw embedding f(x) is there
    with pytest.raises(UserError, match='no embedding'):
        trained.distance(x[:1], x[1:], 'shape')
    with pytest.raises(UserError, match='no embedding'):
        trained.nearest(torch.zeros(1, 16), torch.zeros(5, 16), 'shape')
    assert 'no embedding per notion' in error_line(in_process(retrieve.main, ['--resume', best, '--query', 0,
                                                                              '--notion', 'shape']))
    assert '--export-embeddings' in error_line(in_process(main.main, ['--test', '--resume', best,
                                                                      '--export-embeddings']))
    assert '--add-notion' in error_line(in_process(main.main, ['--resume', best, '--add-notion', 'colour',
                                                               '--runs', runs]))
