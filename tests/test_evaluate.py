"""csnlib/evaluate.py: the test accuracy, each image embedded once, against the original's per-triplet scoring."""
import numpy as np
import pytest
import torch


def test_evaluation_embeds_each_image_once_and_matches_per_triplet_scoring(shapes_data):
    from csnlib.builder import build_model
    from csnlib.evaluate import evaluate
    from csnlib.image_cache import ImageStore
    from csnlib.loader import to_input
    from csnlib.options import main_parser
    from csnlib.runtime import Runtime
    from triplet_image_loader import load_dataset_info, load_triplets
    torch.manual_seed(0)
    args = main_parser().parse_args(['--no-pretrained', '--image-size', '32', '--learned'])
    rt = Runtime(args, torch.device('cpu'), workers=0, eval_batch_size=16)
    info = load_dataset_info(shapes_data)
    model = build_model(args, 2).eval()
    store = ImageStore(info, 32)
    trip, cond = load_triplets(info, 'test', [0, 1], 120, seed=1)
    res = evaluate(model, trip, cond, store, rt, info.notions)
    correct = []
    with torch.no_grad():  # the original's way: every triplet through the network on its own
        for (a, f, c), k in zip(trip, cond):
            x = to_input(torch.from_numpy(store.get(np.array([a, f, c]))), torch.device('cpu'), False)
            d_far, d_close, _, _ = model(x, torch.tensor([k]))
            correct.append(bool(d_far > d_close))
    assert res['accuracy'] == pytest.approx(np.mean(correct))
    for n, k in (('colour', 0), ('shape', 1)):
        assert res['per_notion'][n] == pytest.approx(np.mean([ok for ok, c in zip(correct, cond) if c == k]))


def test_one_large_embedding_batch_gives_the_same_embeddings_and_accuracy_as_small_ones(shapes_data):
    from csnlib.builder import build_model
    from csnlib.evaluate import embed_images, evaluate
    from csnlib.image_cache import ImageStore
    from csnlib.options import main_parser
    from csnlib.runtime import Runtime
    from triplet_image_loader import load_dataset_info, load_triplets
    torch.manual_seed(0)
    args = main_parser().parse_args(['--no-pretrained', '--image-size', '32', '--learned', '--amp', 'bf16'])
    info = load_dataset_info(shapes_data)
    model = build_model(args, 2).eval().to(memory_format=torch.channels_last)
    store = ImageStore(info, 32)
    trip, cond = load_triplets(info, 'test', [0, 1], 120, seed=1)
    images = np.unique(trip)
    out = {}
    for bs in (7, 4096):  # batches of 7 images, and all of them in one batch (the CPU's choice at 32 px)
        rt = Runtime(args, torch.device('cpu'), torch.bfloat16, workers=0, eval_batch_size=bs)
        out[bs] = embed_images(model, images, store, rt), evaluate(model, trip, cond, store, rt, info.notions)
    torch.testing.assert_close(out[4096][0], out[7][0], rtol=1e-2, atol=1e-2)  # bf16: batching may round otherwise
    assert abs(out[4096][1]['accuracy'] - out[7][1]['accuracy']) <= 1 / len(trip)  # at most one triplet's rounding


@pytest.mark.parametrize('per_notion', [False, True])
def test_labelled_subspaces_mask_each_notion_and_leave_out_unknown_labels(per_notion):
    from csnlib.evaluate import labelled_subspaces
    rng = np.random.default_rng(0)
    images = np.array([1, 3, 4])  # dataset indices; the embeddings' rows are these images
    emb = rng.normal(size=(2, 3, 4) if per_notion else (3, 4)).astype(np.float32)  # (C, N, D) or (N, D)
    masks = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], np.float32)  # (C, D)
    labels = {'colour': ['a', 'b', 'c', '', 'e'], 'shape': ['p', 'q', 'r', 's', 't']}
    got = list(labelled_subspaces(emb, masks, images, labels, ['colour', 'shape', 'size'], [1, 0, 2]))
    assert [(name, lab.tolist()) for name, _, lab in got] == [('shape', ['q', 's', 't']), ('colour', ['b', 'e'])]
    rows = lambda c: emb[c] if per_notion else emb
    assert np.array_equal(got[0][1], rows(1) * masks[1])
    assert np.array_equal(got[1][1], rows(0)[[0, 2]] * masks[0])  # image 3 has no colour


class SlotReader(torch.nn.Module):
    """A model built to leak: it compares by distance, but adds `bias` to whatever sits in the far slot, so it can
    call a triplet right from the slot order alone."""

    per_notion_backbone = False

    def __init__(self, bias):
        super().__init__()
        self.bias = bias
        self.fc = torch.nn.Linear(3 * 32 * 32, 8)

    def embed(self, x, c=None):  # (B, 3, H, W) -> (B, 8)
        return self.fc(x.flatten(1))

    def triplet_distances(self, emb, c=None):
        a, f, x = emb.chunk(3)
        return (a - f).norm(dim=1) + self.bias, (a - x).norm(dim=1), torch.zeros(len(emb))


@pytest.mark.parametrize('variant', ['csn', 'learned', 'triplet', 'task', 'asen', 'scenet', 'leak', 'scenet_released'])
def test_the_order_check_is_zero_for_every_model_that_cannot_see_the_slots_and_not_for_one_that_can(shapes_data,
                                                                                                    variant):
    """Swapping far and close in everything the model sees: accuracy + swapped accuracy = 100 % for an order-free
    model (ties aside); a model that reads the slots (the released SCE-Net's branch at random weights far from
    uniform, or one built to) is caught."""
    from csnlib.builder import build_model
    from csnlib.evaluate import evaluate
    from csnlib.image_cache import ImageStore
    from csnlib.options import main_parser
    from csnlib.runtime import Runtime
    from triplet_image_loader import load_dataset_info, load_triplets
    from tripletnet import TripletNet
    torch.manual_seed(0)
    flags = {'csn': [], 'learned': ['--learned'], 'triplet': ['--model', 'triplet'], 'task': ['--model', 'task'],
             'asen': ['--model', 'asen'], 'scenet': ['--model', 'scenet'], 'leak': [],
             'scenet_released': ['--model', 'scenet', '--scenet-branch', 'triplet']}[variant]
    args = main_parser().parse_args(['--no-pretrained', '--image-size', '32', *flags])
    rt = Runtime(args, torch.device('cpu'), workers=0, eval_batch_size=64)
    info = load_dataset_info(shapes_data)
    model = TripletNet(SlotReader(10.0)) if variant == 'leak' else build_model(args, 2)
    if variant == 'scenet_released':
        with torch.no_grad():
            model.embednet.fc2.weight.mul_(30)  # a branch whose weights move with the images, as a trained one's do
    model.eval()
    trip, cond = load_triplets(info, 'test', [0, 1], 120, seed=1)
    res = evaluate(model, trip, cond, ImageStore(info, 32), rt, info.notions, order_check=True)
    oc = res['order_check']
    assert set(oc['per_notion']) == {'colour', 'shape'}
    assert oc['excess'] == pytest.approx(res['accuracy'] + oc['swapped_accuracy'] - 1)
    if variant == 'leak':
        assert res['accuracy'] == 1.0 and oc['swapped_accuracy'] == 1.0 and oc['excess'] == 1.0 and oc['leaks']
    elif variant == 'scenet_released':
        assert oc['excess'] != 0
    else:
        assert oc['excess'] == 0 and not oc['leaks']
        assert all(v['excess'] == 0 for v in oc['per_notion'].values())
