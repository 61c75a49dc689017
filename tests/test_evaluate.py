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
