"""Reading the CSN dataset layout: triplet order, subsets, bad lines, and the image cache."""
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_dataset
from csnlib.image_cache import HEADER, MAGIC, ImageStore, build_image_cache
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
    with pytest.raises(DataError, match=r"--conditions 'colour': unknown notion; this dataset has 0=class"):
        parse_conditions(['colour'], notions)
    with pytest.raises(DataError, match="--conditions '4': unknown notion"):
        parse_conditions(['4'], notions)


@pytest.mark.parametrize('line,message', [
    ('0 1\n', 'malformed line'), ('0 x 2\n', 'malformed line'), ('0 1 999\n', 'outside filenames.json'),
    ('3 3 4\n', 'same image twice'), ('0 20 1\n', 'duplicate of line 1'),
    ('--5 1 2\n', 'malformed line'), ('0 \u0663 2\n', 'malformed line'), ('0 \u00b2 2\n', 'malformed line'),
    ('-5 1 2\n', 'image index -5 is outside'), ('0 1 2 3\n', 'malformed line'),
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
    ('DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that dataloader\'s workers are out '
     'of shared memory. Please try to raise your shared memory limit.', True),
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


# ---- data files that are wrong in other ways: one line naming the file and line ---------------------------------

def test_bytes_that_are_not_utf8_in_a_triplet_list_make_a_malformed_line(shapes_data):
    info = load_dataset_info(shapes_data)
    path = info.triplet_file('shape', 'val')
    with open(path, 'wb') as f:
        f.write(b'0 20 1\n1 \xff\xfe 2\n')
    with pytest.raises(DataError, match=re.escape(f'{path}:2: malformed line')):
        load_triplets(info, 'val', [1], 100, seed=0)


@pytest.mark.parametrize('content, message', [
    (b'shapes/red_circle_0.png\nshapes/caf\xe9.png\n', ':2: not UTF-8 text (byte 0xe9'),
    (b'shapes/red_circle_0.png\nshapes/a\x00b.png\n', ':2: a NUL byte inside the image path'),
    (b'shapes/red_circle_0.png\n\nshapes/red_circle_1.png\n', ':2: empty line'),
])
def test_filenames_json_that_is_not_one_utf8_path_a_line_names_the_line(shapes_data, content, message):
    with open(os.path.join(shapes_data, 'filenames.json'), 'wb') as f:
        f.write(content)
    with pytest.raises(DataError, match=re.escape(os.path.join(shapes_data, 'filenames.json') + message)):
        load_dataset_info(shapes_data)


@pytest.mark.parametrize('meta, message', [
    ('["images", "notions"]', 'expected a JSON object'),
    ('{"images": "images", "notions": "colour"}', '"notions": expected a non-empty list of notion names'),
    ('{"images": "images", "notions": []}', '"notions": expected a non-empty list'),
    ('{"images": "images", "notions": ["colour", 3]}', 'notion name 3: 3 is not a string'),
    ('{"images": "images", "notions": ["colour", "colour"]}', "notion name 'colour' is given twice"),
    ('{"images": "images", "notions": ["colour", "../../x"]}', 'notion name \'../../x\': it holds a "/"'),
    ('{"images": "images", "notions": ["colour", ".."]}', 'notion name \'..\': it holds ".."'),
    ('{"images": "images", "notions": ["colour", ""]}', "notion name '': it is empty"),
    ('{"images": "images", "notions": ["colour", "a\\\\b"]}', 'it holds a "\\"'),
    ('{"images": 5, "notions": ["colour"]}', '"images" must be the name of the images folder (a string), not 5'),
    ('{"images": "/etc", "notions": ["colour"]}', '"images" \'/etc\' is absolute: the images folder must lie inside'),
    ('{"images": "../elsewhere", "notions": ["colour"]}', '"images" \'../elsewhere\' climbs out with ".."'),
    ('{"images": "images", "notions": ["colour"], "labels": 7}', '"labels" must be a string, not 7'),
    ('{"images": "images", "notions": ["colour"], "labels": "../../x.csv"}', '"labels" \'../../x.csv\' climbs out'),
    ('{"images": "images", "notions": ["colour"], "hflip": "yes"}', '"hflip" must be true or false'),
    ('{"images": "images", "notions": ["colour"], "name": ["x"]}', '"name" must be a string'),
])
def test_dataset_json_of_the_wrong_types_or_with_names_that_leave_the_folder(shapes_data, meta, message):
    write(os.path.join(shapes_data, 'dataset.json'), meta)
    with pytest.raises(DataError) as e:
        load_dataset_info(shapes_data)
    assert str(e.value).startswith(os.path.join(shapes_data, 'dataset.json') + ': ') and message in str(e.value)


def test_dataset_json_that_is_not_utf8_names_the_file(shapes_data):
    with open(os.path.join(shapes_data, 'dataset.json'), 'wb') as f:
        f.write(b'{"images": "images", "notions": ["col\xe9ur"]}')
    with pytest.raises(DataError, match=re.escape(os.path.join(shapes_data, 'dataset.json')) + r':1: not UTF-8'):
        load_dataset_info(shapes_data)


def escape_images(root, tmp_path):
    """Lines 1-3 of filenames.json pointed out of the images folder: '..', an absolute path, a link inside images/
    to a file outside. Returns their image indices."""
    Image.new('RGB', (20, 20), (9, 9, 9)).save(tmp_path / 'secret.png')
    Image.new('RGB', (20, 20), (9, 9, 9)).save(os.path.join(root, 'outside.png'))
    os.symlink(tmp_path / 'secret.png', os.path.join(root, 'images', 'shapes', 'link.png'))
    path = os.path.join(root, 'filenames.json')
    names = open(path).read().splitlines()
    names[:3] = ['../outside.png', str(tmp_path / 'secret.png'), 'shapes/link.png']
    write(path, '\n'.join(names) + '\n')
    return [0, 1, 2]


def test_image_paths_must_resolve_inside_the_images_folder(shapes_data, tmp_path):
    bad = escape_images(shapes_data, tmp_path)
    info = load_dataset_info(shapes_data)
    names = os.path.join(shapes_data, 'filenames.json')
    for i, why in zip(bad, ('climbs out with ".."', 'is absolute', 'resolves to ' + str(tmp_path / 'secret.png'))):
        with pytest.raises(DataError) as e:
            info.image_path(i)
        assert str(e.value).startswith(f'image path {info.filenames[i]!r} (line {i + 1} of {names}) {why}')
    assert info.image_path(3).endswith('shapes/red_circle_3.png')
    with pytest.raises(DataError, match=r"'../outside.png' \(line 1 of"):  # training stops before reading any
        build_image_cache(info, 16, log=lambda *a: None)
    with pytest.raises(DataError, match=r"'../outside.png' \(line 1 of"):
        ImageStore(info, 16).get(np.array([0]))


def test_check_data_reports_image_paths_outside_the_images_folder(shapes_data, tmp_path):
    from conftest import run_main
    from triplet_image_loader import check_triplet_file
    info = load_dataset_info(shapes_data)
    used = set()
    for n in info.notions:
        for s in ('train', 'val', 'test'):
            used |= set(check_triplet_file(info.triplet_file(n, s), 40)[0].ravel().tolist())
    bad = escape_images(shapes_data, tmp_path)
    assert set(bad) <= used
    p = run_main('--data', shapes_data, '--check-data', check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    names = os.path.join(shapes_data, 'filenames.json')
    for i in bad:
        assert f'{names}:{i + 1}: image path ' in p.stdout
    assert 'climbs out with ".."' in p.stdout and 'is absolute' in p.stdout and 'a symbolic link' in p.stdout
    assert '3 problem(s) found' in p.stdout


def huge_png(path, w=30000, h=30000):
    """A small PNG file whose header says w x h pixels (PIL refuses it before decoding: a decompression bomb)."""
    import struct
    import zlib
    buf = io.BytesIO()
    Image.new('RGB', (1, 1)).save(buf, 'PNG')
    data = bytearray(buf.getvalue())
    ihdr = data.index(b'IHDR')
    data[ihdr + 4:ihdr + 12] = struct.pack('>II', w, h)
    data[ihdr + 17:ihdr + 21] = struct.pack('>I', zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    with open(path, 'wb') as f:
        f.write(bytes(data))


def test_a_30000_px_png_names_the_image_instead_of_a_traceback(shapes_data):
    info = load_dataset_info(shapes_data)
    huge_png(info.image_path(6))
    with pytest.raises(DataError, match=re.escape(f'cannot read image {info.image_path(6)}: Image size (900000000 '
                                                  f'pixels) exceeds limit') + '.*Shrink the image'):
        load_image(info.image_path(6), 16)
    with pytest.raises(DataError, match=re.escape(f'cannot read image {info.image_path(6)}')):
        build_image_cache(info, 16, workers=1, log=lambda *a: None)


def test_labels_csv_is_checked_against_filenames_json(shapes_data):
    info = load_dataset_info(shapes_data)
    path = os.path.join(shapes_data, 'labels.csv')
    lines = open(path).read().splitlines()
    write(path, '\n'.join([lines[0], lines[2], lines[1]] + lines[3:]) + '\n')   # two rows swapped
    with pytest.raises(DataError, match=re.escape(f"{path}:2: image '{info.filenames[1]}', but line 1 of "
                                                  f"filenames.json is '{info.filenames[0]}'")):
        read_labels(info)
    write(path, '\n'.join(['image,colour'] + [ln.rsplit(',', 1)[0] for ln in lines[1:]]) + '\n')   # no shape column
    said = []
    labels = read_labels(info, log=said.append)
    assert list(labels) == ['colour'] and labels['colour'][0] == 'red'
    assert said == [f'note: {path} has no column for notion(s) shape (columns: image, colour): no retrieval mAP for it']
    with open(path, 'wb') as f:
        f.write(('image,colour,shape\n' + '\n'.join(lines[1:])).encode().replace(b'red', b'r\xe9d', 1))
    with pytest.raises(DataError, match=re.escape(path) + r':2: not UTF-8'):
        read_labels(info)
    write(path, '\n'.join(lines[:1] + [',red,circle'] + lines[2:]) + '\n')      # an image column: each row must match
    with pytest.raises(DataError, match=r"labels.csv:2: image '', but line 1"):
        read_labels(info)


# ---- the image cache is checked before it is trusted ---------------------------------------------------------------

def fresh(info, size=16):
    return ImageStore(info, size).get(np.arange(len(info.filenames)))


@pytest.mark.parametrize('damage, note', [
    ('random', 'it has no image-cache header (random bytes, or a file of older code)'),
    ('truncated', 'it is truncated'),
    ('pixels', 'its pixels are not those it was built with (damaged or overwritten)'),
    ('header', 'its header is damaged'),
])
def test_a_cache_that_does_not_match_is_rebuilt_with_a_note(shapes_data, damage, note):
    info = load_dataset_info(shapes_data)
    said = []
    path = build_image_cache(info, 16, workers=1, log=said.append)
    size = os.path.getsize(path)
    assert size == HEADER + 40 * 16 * 16 * 3
    if damage == 'random':
        data = os.urandom(size)
    else:
        data = bytearray(open(path, 'rb').read())
        if damage == 'truncated':
            data = data[:size // 2]
        elif damage == 'pixels':
            data[HEADER:HEADER + 100] = bytes(255 - b for b in data[HEADER:HEADER + 100])   # row 0 is sampled
        else:
            data[len(MAGIC):len(MAGIC) + 5] = b'!!!!!'
    with open(path, 'wb') as f:
        f.write(bytes(data))
    with pytest.raises(DataError, match=re.escape(f'{path}: not a usable image cache') + '.*delete it'):
        ImageStore(info, 16, path)                                  # never read as it is
    said.clear()
    assert build_image_cache(info, 16, workers=1, log=said.append) == path
    assert (said[0] == f'note: the image cache {path} does not match ({note}); building it again'
            if damage != 'truncated'
            else said[0].startswith(f'note: the image cache {path} does not match (it is truncated ('))
    assert np.array_equal(ImageStore(info, 16, path).get(np.arange(40)), fresh(info))


def test_an_image_replaced_with_the_same_size_and_mtime_gets_a_new_cache(shapes_data):
    info = load_dataset_info(shapes_data)
    p1 = build_image_cache(info, 16, workers=1, log=lambda *a: None)
    target = info.image_path(3)
    st = os.stat(target)
    buf = io.BytesIO()
    Image.new('RGB', (48, 40), (0, 255, 0)).save(buf, 'PNG')
    data = buf.getvalue()
    assert len(data) <= st.st_size
    with open(target, 'wb') as f:
        f.write(data + bytes(st.st_size - len(data)))                # PIL ignores what follows IEND
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(target).st_size, os.stat(target).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    p2 = build_image_cache(info, 16, workers=1, log=lambda *a: None)
    assert p2 != p1 and (ImageStore(info, 16, p2).get(np.array([3]))[0, ..., 1] == 255).all()


def test_a_rebuild_never_takes_a_cache_from_a_process_that_reads_it(shapes_data):
    import gc
    import pickle
    info = load_dataset_info(shapes_data)
    quiet = lambda *a: None  # noqa: E731
    p1 = build_image_cache(info, 16, workers=1, log=quiet)
    old = fresh(info)
    reader = ImageStore(info, 16, p1)                                 # a run reading p1
    worker = pickle.loads(pickle.dumps(reader))                       # what a spawned DataLoader worker gets
    Image.new('RGB', (30, 30), (0, 255, 0)).save(info.image_path(3))  # the images change; another process rebuilds
    said = []
    p2 = build_image_cache(info, 16, workers=1, log=said.append)
    assert p2 != p1 and os.path.exists(p1)
    assert f'note: kept {p1}, an older cache that a running process still reads; a later build removes it' in said
    assert np.array_equal(reader.get(np.arange(40)), old) and np.array_equal(worker.get(np.arange(40)), old)
    os.remove(p1)                                                     # even when its name is gone
    with open(p1, 'wb') as f:                                         # or names another file now
        f.write(os.urandom(HEADER + 40 * 16 * 16 * 3))
    late = pickle.loads(pickle.dumps(reader))                         # a worker started after that (validation)
    assert np.array_equal(late.get(np.arange(40)), old)
    del reader, worker, late
    gc.collect()
    Image.new('RGB', (30, 30), (0, 0, 255)).save(info.image_path(3))
    p3 = build_image_cache(info, 16, workers=1, log=quiet)
    assert sorted(f for f in os.listdir(os.path.dirname(p3)) if f.endswith('.u8')) == [os.path.basename(p3)]


def test_a_dataloader_worker_reads_the_cache_its_run_opened_even_when_its_name_is_gone(shapes_data):
    import torch

    from triplet_image_loader import ImageBatches
    info = load_dataset_info(shapes_data)
    path = build_image_cache(info, 16, workers=1, log=lambda *a: None)
    store = ImageStore(info, 16, path)
    os.remove(path)
    loader = torch.utils.data.DataLoader(ImageBatches(np.arange(40), store), sampler=[[0, 5, 39]], batch_size=None,
                                         num_workers=1)
    assert np.array_equal(next(iter(loader)).numpy(), fresh(info)[[0, 5, 39]])


def test_a_killed_build_leaves_nothing_behind(shapes_data):
    info = load_dataset_info(shapes_data)
    path = build_image_cache(info, 16, workers=1, log=lambda *a: None)
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    stale = f'{path}.tmp{dead.pid}'                                   # what atomic_path leaves when killed
    alive = f'{path}.tmp{os.getppid()}'                               # a build still running elsewhere
    for p in (stale, alive):
        with open(p, 'wb') as f:
            f.write(b'\0' * 1000)
    os.remove(path)
    said = []
    assert build_image_cache(info, 16, workers=1, log=said.append) == path
    assert not os.path.exists(stale) and os.path.exists(alive)
    assert f'note: removed {stale}, left by a build that was killed' in said
    os.remove(alive)


def test_a_build_interrupted_inside_leaves_no_temporary_file(shapes_data, monkeypatch):
    from csnlib import image_cache
    info = load_dataset_info(shapes_data)

    def fail(path, size):
        raise KeyboardInterrupt
    monkeypatch.setattr(image_cache, 'load_image', fail)
    with pytest.raises(KeyboardInterrupt):
        build_image_cache(info, 16, workers=1, log=lambda *a: None)
    assert [f for f in os.listdir(os.path.join(shapes_data, 'cache')) if '.tmp' in f or f.endswith('.u8')] == []
