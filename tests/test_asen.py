"""asen.py: ASEN's embedding against a written-out loop over positions and channels, its attention weights, its loss
(the ranking loss on dot products) against a loop over triplets, and a tiny run through main.py, resume, --test,
retrieve.py, the hub and refusals."""
import copy
import functools
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from asen import ASEN
from conftest import FAST, REPO, in_process, run_main
from Resnet_18 import EmbeddingNet
from tripletnet import TripletNet, csn_loss, masked_distances, ranking_loss, triplet_correct

SMALL = ['--dim_embed', '16', '--num_traintriplets', '96', '--num_valtriplets', '32', '--num_testtriplets', '48']


def tiny(n_notions=3, dim=8, seed=0):
    """A fresh copy of one seeded ASEN in eval mode (building a ResNet takes seconds on a busy CPU)."""
    return copy.deepcopy(_built(n_notions, dim, seed))


@functools.lru_cache
def _built(n_notions, dim, seed):
    torch.manual_seed(seed)
    net = ASEN(EmbeddingNet(dim), n_notions).eval()
    with torch.no_grad():  # weights big enough that the attention is far from uniform
        for p in (net.conv_att.weight, net.attr_spatial.weight, net.attr_channel.weight):
            p.mul_(8)
    return net


def reference(net, x, c):
    """ASEN's equations for one image x (3, H, W) under notion c, position by position and channel by channel."""
    V = net.embeddingnet.feature_map(x[None])[0]  # (C, H', W')
    C, H, W = V.shape
    q = torch.tanh(net.attr_spatial.weight[:, c])  # W_s a_c  (C/2,)
    w1, b1 = net.conv_img.weight[:, :, 0, 0], net.conv_img.bias  # (C/2, C), (C/2,)
    w2, b2 = net.conv_att.weight[0, :, 0, 0], net.conv_att.bias[0]  # (C/2,), ()
    scores = []
    for i in range(H):
        for j in range(W):
            s = torch.tanh(w1 @ V[:, i, j] + b1) * q
            scores.append(torch.tanh((w2 * s).sum() + b2))
    e = [math.exp(float(s)) for s in scores]
    alpha = [v / sum(e) for v in e]
    v = sum(alpha[i * W + j] * V[:, i, j] for i in range(H) for j in range(W))  # (C,)
    attr = torch.relu(net.attr_channel.weight[:, c])  # (C,)
    h = torch.relu(net.fc1.weight @ torch.cat([v, attr]) + net.fc1.bias)
    beta = torch.tensor([1 / (1 + math.exp(-float(net.fc2.weight[k] @ h + net.fc2.bias[k]))) for k in range(C)])
    out = net.embeddingnet.fc.weight @ (v * beta) + net.embeddingnet.fc.bias
    return out / out.norm(), torch.tensor(alpha), beta  # (D,), (H'W',), (C,)


@torch.no_grad()
def test_embedding_matches_the_written_out_attention_and_is_unit_length():
    net = tiny()
    x = torch.randn(3, 3, 64, 64)  # 4 x 4 positions after layer3
    c = torch.tensor([0, 2, 1])
    got = net.embed(x, c)
    assert got.shape == (3, 8)
    for b in range(3):
        want, alpha, beta = reference(net, x[b], int(c[b]))
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-4)
        fmap = net.embeddingnet.feature_map(x[b:b + 1])
        a = net.one_hot(c[b:b + 1], fmap)
        att = net.spatial_attention(fmap, a)[0]  # (16,)
        assert att.shape == (16,) and abs(float(att.sum()) - 1) < 1e-6 and (att > 0).all()
        torch.testing.assert_close(att, alpha.float(), atol=1e-6, rtol=1e-5)
        assert float(att.max() / att.min()) > 1.5  # not uniform (tanh keeps the scores in [-1, 1])
        v = (fmap.flatten(2) * att[None, None]).sum(2)
        ch = net.channel_attention(v, a)[0]
        assert ((ch > 0) & (ch < 1)).all()
        torch.testing.assert_close(ch, beta.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3))


@torch.no_grad()
def test_the_notion_conditions_the_embedding_and_an_int_is_the_same_as_a_tensor():
    net = tiny()
    x = torch.randn(2, 3, 32, 32)
    e0, e1 = net.embed(x, 0), net.embed(x, 1)
    assert (e0 - e1).abs().max() > 1e-3
    torch.testing.assert_close(net.embed(x, torch.tensor([0, 0])), e0)
    mixed = net.embed(x, torch.tensor([1, 0]))
    torch.testing.assert_close(mixed, torch.stack([e1[0], e0[1]]))
    views = net.nets  # one view per notion, no weights of its own
    assert len(views) == 3 and views[0].fc is net.embeddingnet.fc and not list(views[0].parameters())
    torch.testing.assert_close(views[1](x), e1)


def test_loss_is_the_ranking_loss_on_dot_products_against_a_loop_and_backward_runs():
    net = tiny()
    model = TripletNet(net).train()
    B, margin = 4, 0.2
    x = torch.randn(3 * B, 3, 32, 32)
    c = torch.tensor([0, 1, 2, 1])
    d_far, d_close, emb_norm, mask_norm = model(x, c)
    emb = net.embed(x, c.repeat(3))  # train mode, the same batch: the same BatchNorm statistics
    ea, ef, ec = emb.detach().chunk(3)
    want = sum(max(0.0, float(ea[i] @ ef[i]) - float(ea[i] @ ec[i]) + margin) for i in range(B)) / B
    assert float(mask_norm) == 0.0
    # train_loop.py: norm_penalties False -> csn_loss with zero weights = the ranking loss alone
    assert net.norm_penalties is False
    loss = csn_loss(d_far, d_close, emb_norm, mask_norm, margin, 0.0, 0.0)
    assert abs(float(loss.detach()) - want) < 1e-5
    right = [float(ea[i] @ ec[i]) > float(ea[i] @ ef[i]) for i in range(B)]
    assert triplet_correct(d_far, d_close).tolist() == right
    loss.backward()
    for p in (net.attr_spatial.weight, net.conv_att.weight, net.fc2.weight, net.embeddingnet.fc.weight,
              net.embeddingnet.conv1.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@torch.no_grad()
def test_evaluation_from_embeddings_made_once_per_notion_equals_the_forward_pass():
    """evaluate.py embeds each image once per notion and scores triplets through masked_distances."""
    net = tiny()
    model = TripletNet(net).eval()
    x = torch.randn(9, 3, 32, 32)
    c = torch.tensor([2, 0, 2])
    d_far, d_close, _, _ = model(x, c)
    per = {k: net.embed(x, k) for k in range(3)}  # (9, D) under each notion
    emb = torch.stack([per[int(c[i % 3])][i] for i in range(9)])
    got = masked_distances(net, emb, c)
    torch.testing.assert_close(got[0], d_far)
    torch.testing.assert_close(got[1], d_close)
    # and the Euclidean ranking the search index uses is the dot product's: ||a - b||^2 = 2 (1 - a.b)
    a, b = per[0][0], per[0][1]
    assert abs(float((a - b).norm() ** 2) - 2 * (1 - float(a @ b))) < 1e-5
    assert torch.equal(ranking_loss(d_far, d_close, 0.2), F.relu(0.2 - (d_far - d_close)))


def test_same_seed_same_model_and_outputs():
    x = torch.randn(2, 3, 32, 32)
    a, b = tiny(seed=3), _built.__wrapped__(3, 8, 3)  # built twice from the seed
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(a.embed(x, 1), b.embed(x, 1)) and torch.equal(a.embed(x, 1), a.embed(x, 1))


@pytest.mark.slow
def test_main_trains_resumes_tests_and_serves_asen(shapes_data, tmp_path):
    import hubconf
    import retrieve
    from csnlib.builder import load_model
    runs = tmp_path / 'runs'
    base = ['--data', shapes_data, '--runs', runs, '--name', 'asen', *FAST, *SMALL, '--model', 'asen',
            '--no-pictures']
    out = run_main(*base, '--epochs', '1').stdout
    assert '--model asen, 16-d' in out
    ckpt = runs / 'asen' / 'checkpoint.pth.tar'
    out = run_main(*base, '--epochs', '2', '--resume', ckpt).stdout  # goes on from epoch 2
    metrics = [json.loads(ln) for ln in open(runs / 'asen' / 'metrics.jsonl')]
    assert [m['epoch'] for m in metrics] == [1, 2] and 'resumed' in out
    assert all(m['mask_norm'] == 0 and 0 < m['emb_norm'] <= 32 ** 0.5 * 1.01 for m in metrics)  # unit embeddings
    best = runs / 'asen' / 'model_best.pth.tar'
    run_main('--test', '--resume', best)
    res = json.load(open(runs / 'asen' / 'test_results.json'))
    assert set(res['per_notion']) == {'colour', 'shape'} and 0 <= res['accuracy'] <= 1
    assert set(res['mAP_per_notion']) == {'colour', 'shape'}  # retrieval per notion: embeddings under each notion
    # load_model, the hub and retrieve.py
    model, _, _ = load_model(str(best), shapes_data, 'cpu')
    assert type(model.embednet).__name__ == 'ASEN'
    trained = hubconf.csn(checkpoint=str(best))
    x = torch.randn(2, 3, 32, 32)
    assert trained.embed(x).shape == (2, 2, 16)  # (notions, B, D)
    torch.testing.assert_close(trained.embed(x, 'shape'), trained.embed(x)[1])
    assert trained.distance(x[:1], x[1:], 'colour').shape == (1,)
    code, out, err = in_process(retrieve.main, ['--resume', best, '--query', 0, '--notion', 'shape', '--k', 3,
                                                '--out', tmp_path / 'n.png'])
    assert code == 0 and '3 nearest' in out, err
    # refused: teaching ASEN a notion
    code, _, err = in_process(__import__('main').main, ['--resume', best, '--add-notion', 'colour', '--runs', runs])
    assert code == 2 and '--add-notion' in err and 'Traceback' not in err
    assert os.path.exists(os.path.join(REPO, 'asen.py'))
