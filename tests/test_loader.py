"""Reading the CSN dataset layout: triplet order, subsets, bad lines, and the image cache."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_dataset
from csnlib.image_cache import ImageStore, build_image_cache
from triplet_image_loader import (
    DataError,
    TripletBatches,
    load_dataset_info,
    load_image,
    load_triplets,
    parse_conditions,
    read_labels,
)


def write(path, text):
    with open(path, 'w') as f:
        f.write(text)


def test_triplet_lines_are_anchor_far_close(shapes_data):
    """`a b c` means a is more similar to c than to b: batches come out as [anchors, fars, closes]."""
    info = load_dataset_info(shapes_data)
    write(info.triplet_file('colour', 'train'), '0 21 1\n')  # 0 and 1 are red circles, 21 is blue
    trip, cond = load_triplets(info, 'train', [0], 2, seed=0)
    assert trip.tolist() == [[0, 21, 1]] and cond.tolist() == [0]
    store = ImageStore(info, 16)
    imgs, c = TripletBatches(trip, cond, store)[[0]]
    assert imgs.shape == (3, 16, 16, 3)
    red = lambda im: im[..., 0].astype(int).sum() > im[..., 2].astype(int).sum()
    assert red(imgs[0].numpy()) and not red(imgs[1].numpy()) and red(imgs[2].numpy())


def test_zappos_layout_without_dataset_json(tmp_path):
    root = tmp_path / 'zap'
    (root / 'ut-zap50k-images' / 'Shoes').mkdir(parents=True)
    write(root / 'filenames.json', 'Shoes/a.jpg\nShoes/b.jpg\n')
    info = load_dataset_info(str(root))
    assert info.notions == ['class', 'closure', 'gender', 'heel']
    assert info.images_dir.endswith('ut-zap50k-images') and info.filenames == ['Shoes/a.jpg', 'Shoes/b.jpg']
    assert info.triplet_file('heel', 'val').endswith(os.path.join('tripletlists', 'heel_tripletlist_val.txt'))


def test_subset_sizes_are_per_notion_and_seeded(tmp_path):
    root = str(tmp_path / 'd')
    make_dataset(root, triplets=(120, 60, 60))
    info = load_dataset_info(root)
    trip, cond = load_triplets(info, 'train', [0, 1], 100, seed=3)
    assert len(trip) == 100 and (cond == 0).sum() == 50 and (cond == 1).sum() == 50  # N / (number of notions) each
    trip1, cond1 = load_triplets(info, 'train', [1], 100, seed=3)
    assert len(trip1) == 50 and set(cond1.tolist()) == {1}
    again, _ = load_triplets(info, 'train', [0, 1], 100, seed=3)
    other, _ = load_triplets(info, 'train', [0, 1], 100, seed=4)
    assert np.array_equal(trip, again) and not np.array_equal(trip, other)
    logs = []
    small, _ = load_triplets(info, 'val', [0], 1000, seed=0, log=logs.append)  # more than there are: all, with a note
    assert len(small) == 60 and 'fewer than the 500 asked for' in logs[0]


def test_conditions_by_index_or_name():
    notions = ['class', 'closure', 'gender', 'heel']
    assert parse_conditions(None, notions) == [0, 1, 2, 3]
    assert parse_conditions(['2'], notions) == [2]
    assert parse_conditions(['heel', '0'], notions) == [0, 3]
    assert parse_conditions(['class,gender'], notions) == [0, 2]
    with pytest.raises(DataError, match=r"--conditions: unknown notion 'colour'.*0=class"):
        parse_conditions(['colour'], notions)
    with pytest.raises(DataError, match="unknown notion '4'"):
        parse_conditions(['4'], notions)


@pytest.mark.parametrize('line,message', [
    ('0 1\n', 'malformed line'), ('0 x 2\n', 'malformed line'), ('0 1 999\n', 'outside filenames.json'),
    ('3 3 4\n', 'same image twice'), ('0 20 1\n', 'duplicate of line 1'),
])
def test_bad_triplet_lines_name_file_and_line(shapes_data, line, message):
    info = load_dataset_info(shapes_data)
    path = info.triplet_file('shape', 'val')
    write(path, '0 20 1\n' + line)
    with pytest.raises(DataError) as e:
        load_triplets(info, 'val', [1], 100, seed=0)
    assert f'{path}:2: ' in str(e.value) or f'{path}:3: ' in str(e.value)
    assert message in str(e.value) and '--skip-bad-triplets' in str(e.value)
    logs = []
    trip, _ = load_triplets(info, 'val', [1], 100, seed=0, skip_bad=True, log=logs.append)
    assert trip.tolist() == [[0, 20, 1]] and 'left out 1 bad triplet line' in logs[-1]


def test_missing_folder_and_files_say_how_to_get_data(tmp_path):
    with pytest.raises(DataError, match='does not exist.*get_data.py'):
        load_dataset_info(str(tmp_path / 'nope'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError, match='filenames.json not found'):
        load_dataset_info(str(tmp_path / 'empty'))
    root = tmp_path / 'd'
    make_dataset(str(root))
    os.remove(root / 'tripletlists' / 'shape_tripletlist_test.txt')
    info = load_dataset_info(str(root))
    with pytest.raises(DataError, match='shape_tripletlist_test.txt not found'):
        load_triplets(info, 'test', [0, 1], 100, seed=0)
    write(root / 'dataset.json', '{"images": "images"}')
    with pytest.raises(DataError, match="dataset.json: missing key 'notions'"):
        load_dataset_info(str(root))


def test_labels_csv(shapes_data):
    info = load_dataset_info(shapes_data)
    labels = read_labels(info)
    assert labels['colour'][0] == 'red' and labels['shape'][0] == 'circle' and len(labels['shape']) == 40


def test_cache_holds_the_same_pixels_as_decoding(shapes_data):
    info = load_dataset_info(shapes_data)
    path = build_image_cache(info, 24, log=lambda *a: None)
    cached, plain = ImageStore(info, 24, path), ImageStore(info, 24)
    idx = np.array([5, 0, 39, 5])
    assert np.array_equal(cached.get(idx), plain.get(idx))
    assert cached.get(idx).shape == (4, 24, 24, 3)
    # torchvision's Resize(24) + CenterCrop(24) on the PIL image, as the original
    from torchvision import transforms
    t = transforms.Compose([transforms.Resize(24), transforms.CenterCrop(24)])
    with Image.open(info.image_path(5)) as im:
        assert np.array_equal(np.asarray(t(im.convert('RGB'))), cached.get(np.array([5]))[0])


@pytest.mark.slow
def test_cache_is_reused_and_rebuilt_when_an_image_or_the_size_changes(shapes_data):
    info = load_dataset_info(shapes_data)
    quiet = lambda *a: None
    p1 = build_image_cache(info, 16, log=quiet)
    mtime = os.path.getmtime(p1)
    assert build_image_cache(info, 16, log=quiet) == p1 and os.path.getmtime(p1) == mtime
    assert build_image_cache(info, 20, log=quiet) != p1
    Image.new('RGB', (30, 30), (0, 255, 0)).save(info.image_path(3))  # the file changes: a new cache
    p2 = build_image_cache(info, 16, log=quiet)
    assert p2 != p1 and not os.path.exists(p1)
    assert (ImageStore(info, 16, p2).get(np.array([3]))[0, ..., 1] == 255).all()


@pytest.mark.slow
def test_two_processes_building_the_cache_at_once_agree(shapes_data):
    code = ('import sys; sys.path.insert(0, %r); from triplet_image_loader import load_dataset_info; '
            'from csnlib.image_cache import build_image_cache; '
            'print(build_image_cache(load_dataset_info(%r), 28, workers=1, log=lambda *a: None))') % (REPO, shapes_data)
    procs = [subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    info = load_dataset_info(shapes_data)
    assert np.array_equal(ImageStore(info, 28, outs[0]).get(np.arange(40)), ImageStore(info, 28).get(np.arange(40)))
    assert [f for f in os.listdir(os.path.dirname(outs[0])) if '.tmp' in f] == []


def test_missing_and_unreadable_images_are_named(shapes_data):
    info = load_dataset_info(shapes_data)
    os.remove(info.image_path(7))
    with pytest.raises(DataError, match=f'image not found: {info.image_path(7)}'):
        build_image_cache(info, 16, log=lambda *a: None)
    write(info.image_path(7), 'not an image')
    with pytest.raises(DataError, match=f'cannot read image {info.image_path(7)}'):
        load_image(info.image_path(7), 16)


def test_read_only_data_folder_puts_the_cache_elsewhere(shapes_data, tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    info = load_dataset_info(shapes_data)
    logs = []
    blocked = tmp_path / 'blocked'
    write(blocked, 'a file, so no folder can be made here')
    path = build_image_cache(info, 16, cache_dir=str(blocked / 'cache'), log=logs.append)
    assert path.startswith(str(tmp_path / 'home' / '.cache' / 'csn')) and 'cannot write the image cache' in logs[0]


# ---- DataLoader workers and shared memory ------------------------------------------------------------------------

MB = 2 ** 20


@pytest.mark.parametrize('cache, device, cores, local_world, shm_mb, expected', [
    (True, 'cpu', 16, 1, 8000, 0),        # the memory-mapped cache read in the process
    (False, 'cpu', 16, 1, 8000, 8),       # PIL decoding: at most 8
    (True, 'cuda', 16, 1, 8000, 8),
    (True, 'cuda', 16, 4, 8000, 4),       # torchrun with 4 processes on the machine share its 16 cores
    (True, 'cuda', 16, 8, 8000, 2),
    (True, 'cuda', 4, 8, 8000, 1),        # never 0 for want of cores
    (True, 'cuda', 16, 1, 1700, 7),       # half of 1700 MB holds 7 workers x 4 batches of 28.9 MB
    (True, 'cuda', 16, 1, 64, 0),         # docker's default 64 MB /dev/shm: no worker, no bus error
    (True, 'cuda', 16, 1, None, 8),       # /dev/shm unknown
])
def test_workers_are_sized_by_the_cores_the_processes_of_a_machine_share_and_by_shared_memory(
        cache, device, cores, local_world, shm_mb, expected):
    from csnlib.runtime import PREFETCH, default_workers
    batch = 3 * 256 * 112 * 112 * 3  # batch 256 at 112 px: 28.9 MB
    workers, note = default_workers(cache, device, cores, local_world, batch, None if shm_mb is None else shm_mb * MB)
    assert workers == expected
    if shm_mb is not None and workers:
        assert workers * PREFETCH * batch <= shm_mb * MB / 2  # what the workers keep ready fits in half of /dev/shm
    assert bool(note) == (not (cache and device == 'cpu') and workers < min(8, max(1, cores // local_world)))
    if note:
        assert '--shm-size' in note and '--workers' in note


@pytest.mark.parametrize('text, shm', [
    ('DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that dataloader\'s workers are out of '
     'shared memory. Please try to raise your shared memory limit.', True),
    ('Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n  ...\n'
     'RuntimeError: unable to write to file </torch_123_456_0>: No space left on device (28)', True),
    ('unable to allocate shared memory(shm) for file </torch_1_2>: Resource temporarily unavailable (11)', True),
    ('DataLoader worker (pid(s) 4242) exited unexpectedly', False),
    ('DataLoader worker (pid 4242) is killed by signal: Segmentation fault.', False),
    ('cannot read image data/images/a.png: cannot identify image file', False),
])
def test_a_shared_memory_failure_is_told_apart_from_a_bad_image(text, shm):
    from csnlib.loader import shared_memory_failure
    assert shared_memory_failure(text) == shm


class NoShm(TripletBatches):
    def __getitem__(self, pos):
        raise RuntimeError('unable to write to file </torch_1_2_3>: No space left on device (28)')


def test_a_worker_that_cannot_write_to_shared_memory_says_how_to_give_it_more(shapes_data):
    import torch

    from csnlib.loader import make_loader
    info = load_dataset_info(shapes_data)
    trip, cond = load_triplets(info, 'train', [0, 1], 8, seed=1)
    loader = make_loader(NoShm(trip, cond, ImageStore(info, 32)), [[0, 1]], 1, torch.device('cpu'))
    with pytest.raises(DataError) as e:
        next(loader)
    msg = str(e.value)
    assert 'shared memory' in msg and '--shm-size' in msg and '--workers' in msg and 'Not a bad image' in msg
    assert 'Traceback' not in msg and 'No space left on device' in msg
