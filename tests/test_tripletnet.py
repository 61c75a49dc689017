"""The masked distance, the loss and the masks against slow reference loops written out here."""
import math

import pytest
import torch

from csn import ConditionalSimNet, TaskSpecificNets, TripletEmbedNet
from Resnet_18 import EmbeddingNet
from tripletnet import TripletNet, csn_loss, triplet_correct


class Linear(torch.nn.Module):
    """A stand-in backbone: flatten + linear, so the references below stay readable."""

    def __init__(self, d_in=12, d=8):
        super().__init__()
        self.fc = torch.nn.Linear(d_in, d)

    def forward(self, x):
        return self.fc(x.flatten(1))


def reference(net, anchor, far, close, c, margin, embed_loss, mask_loss):
    """The loss written out triplet by triplet, as in the paper and the original code."""
    B = anchor.shape[0]
    masks = net.mask_weights()
    total, correct, emb_sq, mask_l1 = 0.0, 0, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    for i in range(B):
        e = [net.embeddingnet(img[i:i + 1])[0] for img in (anchor, far, close)]
        m = masks[c[i]]
        d_far = math.sqrt(sum(((e[0][k] - e[1][k]) * m[k]) ** 2 for k in range(len(m))))
        d_close = math.sqrt(sum(((e[0][k] - e[2][k]) * m[k]) ** 2 for k in range(len(m))))
        total += max(0.0, -(d_far - d_close) + margin)
        correct += d_far > d_close
        for j in range(3):
            emb_sq[j] += float((e[j] ** 2).sum())
            mask_l1[j] += float(m.abs().sum())
    emb_norm = sum(math.sqrt(s) for s in emb_sq) / 3
    mask_norm = sum(mask_l1) / 3
    return total / B + embed_loss * emb_norm / math.sqrt(B) + mask_loss * mask_norm / B, correct / B


@pytest.mark.parametrize('mask_type', ['fixed', 'learned', 'prein'])
def test_loss_and_accuracy_match_reference_loop(mask_type):
    torch.manual_seed(0)
    net = ConditionalSimNet(Linear(), 4, 8, mask_type)
    model = TripletNet(net).double()
    B = 7
    anchor, far, close = (torch.randn(B, 3, 2, 2, dtype=torch.double) for _ in range(3))
    c = torch.tensor([0, 1, 2, 3, 3, 1, 0])
    d_far, d_close, emb_norm, mask_norm = model(torch.cat([anchor, far, close]), c)
    loss = csn_loss(d_far, d_close, emb_norm, mask_norm, 0.2, 5e-3, 5e-4)
    acc = triplet_correct(d_far, d_close).double().mean()
    with torch.no_grad():
        ref_loss, ref_acc = reference(net, anchor, far, close, c, 0.2, 5e-3, 5e-4)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    assert acc.item() == pytest.approx(ref_acc)


def test_loss_is_zero_when_every_triplet_is_right_by_the_margin():
    d_far, d_close = torch.tensor([2.0, 3.0]), torch.tensor([0.5, 1.0])
    assert csn_loss(d_far, d_close, torch.tensor(0.0), torch.tensor(0.0), 0.2, 5e-3, 5e-4).item() == 0
    # inside the margin: loss margin - (d_far - d_close)
    loss = csn_loss(torch.tensor([1.0]), torch.tensor([0.9]), torch.tensor(0.0), torch.tensor(0.0), 0.2, 0, 0)
    assert loss.item() == pytest.approx(0.1)
    assert triplet_correct(torch.tensor([1.0, 0.5]), torch.tensor([0.5, 1.0])).tolist() == [True, False]


def test_fixed_masks_are_disjoint_blocks_and_get_no_gradient():
    net = ConditionalSimNet(Linear(), 4, 8, 'fixed')
    w = net.masks.weight
    assert torch.equal(w, torch.tensor([[1., 1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0],
                                        [0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1]]))
    model = TripletNet(net)
    x = torch.randn(3, 3, 2, 2)
    out = model(torch.cat([x, x.flip(0), x.roll(1, 0)]), torch.tensor([0, 1, 2]))
    csn_loss(*out, 0.2, 5e-3, 5e-4).backward()
    assert w.grad is None and not w.requires_grad
    assert net.embeddingnet.fc.weight.grad is not None


@pytest.mark.parametrize('mask_type', ['learned', 'prein'])
def test_learned_masks_get_gradient_only_for_the_notions_used(mask_type):
    torch.manual_seed(1)
    net = ConditionalSimNet(Linear(), 4, 8, mask_type)
    model = TripletNet(net)
    x = torch.randn(4, 3, 2, 2)
    out = model(torch.cat([x, torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)]), torch.tensor([1, 1, 3, 3]))
    csn_loss(*out, 0.2, 5e-3, 5e-4).backward()
    g = net.masks.weight.grad
    assert g[[0, 2]].abs().sum() == 0 and g[1].abs().sum() > 0 and g[3].abs().sum() > 0


def test_mask_initialisations():
    torch.manual_seed(0)
    learned = ConditionalSimNet(Linear(), 4, 64, 'learned').masks.weight
    assert abs(learned.mean().item() - 0.9) < 0.15 and abs(learned.std().item() - 0.7) < 0.15
    prein = ConditionalSimNet(Linear(), 4, 64, 'prein').masks.weight.detach()
    assert torch.all(prein[0, :16] == 1) and torch.allclose(prein[0, 16:], torch.tensor(0.1))
    relu = ConditionalSimNet(Linear(), 4, 64, 'learned')
    assert (relu.mask_weights() >= 0).all() and (relu.masks.weight < 0).any()


def test_triplet_baseline_has_no_masks():
    torch.manual_seed(0)
    net = TripletEmbedNet(Linear())
    x, y, z = (torch.randn(5, 3, 2, 2) for _ in range(3))
    d_far, d_close, _, mask_norm = TripletNet(net)(torch.cat([x, y, z]), torch.tensor([0, 1, 2, 3, 0]))
    assert mask_norm.item() == 0
    assert torch.allclose(d_far, (net.embeddingnet(x) - net.embeddingnet(y)).norm(dim=1), atol=1e-5)


def test_task_specific_nets_route_each_notion_to_its_own_network():
    torch.manual_seed(0)
    nets = TaskSpecificNets([Linear(), Linear(), Linear()])
    x = torch.randn(6, 3, 2, 2)
    c = torch.tensor([2, 0, 1, 2, 0, 0])
    out = nets.embed(x, c)
    for i in range(6):
        assert torch.allclose(out[i], nets.nets[c[i]](x[i:i + 1])[0], atol=1e-6)
    model = TripletNet(nets)
    csn_loss(*model(torch.cat([x, x.roll(1, 0), x.roll(2, 0)]), torch.tensor([0, 0, 0, 0, 0, 0])),
             0.2, 5e-3, 5e-4).backward()
    assert nets.nets[0].fc.weight.grad is not None  # trained only on its own notion's triplets
    assert nets.nets[1].fc.weight.grad is None and nets.nets[2].fc.weight.grad is None


def test_one_forward_equals_three_separate_forwards():
    """TripletNet embeds anchor, far and close in one call; in eval mode (no batch statistics) it must give the same
    distances as three calls, as in the original."""
    torch.manual_seed(0)
    net = ConditionalSimNet(EmbeddingNet(16), 4, 16, 'learned').eval()
    model = TripletNet(net).eval()
    a, f, c_ = (torch.randn(3, 3, 32, 32) for _ in range(3))
    cond = torch.tensor([0, 3, 1])
    with torch.no_grad():
        d_far, d_close, _, _ = model(torch.cat([a, f, c_]), cond)
        ea, ef, ec = (net.apply_mask(net.embed(t), cond)[0] for t in (a, f, c_))
    assert torch.allclose(d_far, torch.nn.functional.pairwise_distance(ea, ef), atol=1e-4)
    assert torch.allclose(d_close, torch.nn.functional.pairwise_distance(ea, ec), atol=1e-4)
    three = TripletNet(net, three_forwards=True).eval()                  # main.py --three-forwards
    with torch.no_grad():
        out1, out3 = model(torch.cat([a, f, c_]), cond), three(torch.cat([a, f, c_]), cond)
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(out1, out3))
    model.train(), three.train()                                          # batch statistics: over 3B or over each B
    with torch.no_grad():
        assert not torch.allclose(model(torch.cat([a, f, c_]), cond)[0], three(torch.cat([a, f, c_]), cond)[0],
                                  atol=1e-4)


def test_backbone_is_resnet18_up_to_layer3_and_loads_torchvision_weights():
    from torchvision.models import resnet18
    tv = resnet18(weights=None)
    net = EmbeddingNet(64)
    net.load_backbone(tv.state_dict())
    assert torch.equal(net.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)
    assert not hasattr(net, 'layer4') and net.fc.in_features == 256
    x = torch.randn(2, 3, 112, 112)
    tv.eval()
    net.eval()
    with torch.no_grad():
        feats = tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))))  # (2, 256, 7, 7)
        assert torch.allclose(net(x), net.fc(feats.mean((2, 3))), atol=1e-5)
    with pytest.raises(KeyError, match='not a torchvision resnet18'):
        net.load_backbone({'conv1.weight': tv.conv1.weight})
