"""Datasets in the CSN release's layout: filenames.json, an images folder and tripletlists/<notion>_tripletlist_<split>.txt.

Each triplet line is `a b c`: image a (anchor) is more similar to image c (close) than to image b (far).
Images are decoded, resized and centre-cropped once into a uint8 cache memory-mapped from disk; random flips and
normalisation happen later on tensors (to_input). make_store and make_loader give a command its images.
"""
import csv
import fcntl
import hashlib
import json
import os
import tempfile
import weakref
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from csnlib.atomic import atomic_path

ZAPPOS_NOTIONS = ['class', 'closure', 'gender', 'heel']
ZAPPOS_IMAGES = 'ut-zap50k-images'
SPLITS = ('train', 'val', 'test')
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GET_DATA_HINT = ('get it with `python get_data.py` (Zappos50k), `python get_data.py --dataset fonts --out DIR` '
                 '(offline) or `python get_data.py --dataset attributes ...` (your own images); see the README')


class DataError(ValueError):
    """Bad dataset input; the message names the file (and line) and what to do."""


@dataclass
class DatasetInfo:
    root: str
    name: str
    images_dir: str
    notions: list
    filenames: list
    labels_file: str = None
    extra: dict = field(default_factory=dict)

    def image_path(self, i):
        return os.path.join(self.images_dir, self.filenames[i])

    @property
    def hflip(self):
        """Whether a horizontal mirror keeps every label (dataset.json "hflip"; true when absent, as for shoes)."""
        return self.extra.get('hflip', True)

    def triplet_file(self, notion, split):
        return os.path.join(self.root, 'tripletlists', f'{notion}_tripletlist_{split}.txt')


def load_dataset_info(root):
    """Read DIR/dataset.json (or the Zappos defaults when it is absent) and DIR/filenames.json."""
    if not os.path.isdir(root):
        raise DataError(f'data folder {root!r} does not exist: {GET_DATA_HINT}, or point --data at it')
    meta_path = os.path.join(root, 'dataset.json')
    meta = {'name': 'zappos50k', 'images': ZAPPOS_IMAGES, 'notions': ZAPPOS_NOTIONS}
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f'{meta_path}: not valid JSON ({e})') from None
        for key in ('images', 'notions'):
            if key not in meta:
                raise DataError(f'{meta_path}: missing key {key!r} (expected {{"name", "images", "notions", "labels"}})')
        if not meta['notions'] or len(set(meta['notions'])) != len(meta['notions']):
            raise DataError(f'{meta_path}: "notions" must be a non-empty list of distinct names')
        if not isinstance(meta.get('hflip', True), bool):
            raise DataError(f'{meta_path}: "hflip" must be true or false (whether a mirrored image keeps its labels), '
                            f'not {meta["hflip"]!r}')
    names_path = os.path.join(root, 'filenames.json')
    if not os.path.exists(names_path):
        raise DataError(f'{names_path} not found: {root!r} is not a dataset folder; {GET_DATA_HINT}')
    with open(names_path) as f:  # plain text despite the name: one image path per line
        filenames = [line.strip() for line in f]
    while filenames and not filenames[-1]:
        filenames.pop()
    for i, name in enumerate(filenames):
        if not name:
            raise DataError(f'{names_path}:{i + 1}: empty line (line i+1 is image i)')
    images_dir = os.path.join(root, meta['images'])
    if not os.path.isdir(images_dir):
        raise DataError(f'images folder {images_dir!r} not found (named by {meta_path if os.path.exists(meta_path) else "the Zappos default"}); {GET_DATA_HINT}')
    labels = os.path.join(root, meta['labels']) if meta.get('labels') else None
    return DatasetInfo(root, meta.get('name', os.path.basename(os.path.abspath(root))), images_dir,
                       list(meta['notions']), filenames, labels, meta)


def parse_conditions(values, notions):
    """--conditions accepts notion indices or names; returns sorted unique indices."""
    if not values:
        return list(range(len(notions)))
    out = []
    for v in values:
        for part in str(v).split(','):
            part = part.strip()
            if not part:
                continue
            if part.isdigit() and int(part) < len(notions):
                out.append(int(part))
            elif part in notions:
                out.append(notions.index(part))
            else:
                known = ', '.join(f'{i}={n}' for i, n in enumerate(notions))
                raise DataError(f'--conditions: unknown notion {part!r}; this dataset has {known}')
    return sorted(set(out))


def check_triplet_file(path, n_images):
    """Parse a triplet list. Returns (triplets (M, 3) int64, line numbers (M,), problems [(path, line, message)])."""
    if not os.path.exists(path):
        raise DataError(f'{path} not found: the dataset has no triplets for this notion and split; {GET_DATA_HINT}')
    rows, lines, problems, seen = [], [], [], {}
    with open(path) as f:
        for ln, text in enumerate(f, 1):
            parts = text.split()
            if not parts:
                continue
            if len(parts) != 3 or not all(p.lstrip('-').isdigit() for p in parts):
                problems.append((path, ln, f'malformed line {text.strip()[:60]!r} (expected three image indices "a b c")'))
                continue
            t = tuple(int(p) for p in parts)
            bad = [x for x in t if not 0 <= x < n_images]
            if bad:
                problems.append((path, ln, f'image index {bad[0]} is outside filenames.json (0..{n_images - 1})'))
            elif len(set(t)) < 3:
                problems.append((path, ln, f'triplet {text.strip()!r} uses the same image twice'))
            elif t in seen:
                problems.append((path, ln, f'duplicate of line {seen[t]}'))
            else:
                seen[t] = ln
                rows.append(t)
                lines.append(ln)
    return np.array(rows, dtype=np.int64).reshape(-1, 3), np.array(lines, dtype=np.int64), problems


def format_problems(problems, limit=20):
    head = [f'{p}:{ln}: {msg}' for p, ln, msg in problems[:limit]]
    more = len(problems) - limit
    return '\n'.join(head + ([f'... and {more} more'] if more > 0 else []))


def load_triplets(info, split, conditions, n_total, seed, skip_bad=False, log=print):
    """The seeded subset of a split: each selected notion contributes n_total / (number of notions) triplets.

    Returns (triplets (M, 3) as (anchor, far, close), notion index (M,)), shuffled."""
    per_notion = n_total // len(info.notions)
    rng = np.random.RandomState(seed + SPLITS.index(split))
    trip, cond, problems = [], [], []
    for c in conditions:
        t, _, bad = check_triplet_file(info.triplet_file(info.notions[c], split), len(info.filenames))
        problems += bad
        if len(t) > per_notion:
            t = t[np.sort(rng.choice(len(t), per_notion, replace=False))]
        elif len(t) < per_notion:
            log(f'note: {info.triplet_file(info.notions[c], split)} has {len(t)} usable triplets, fewer than the '
                f'{per_notion} asked for; using all of them')
        trip.append(t)
        cond.append(np.full(len(t), c, dtype=np.int64))
    if problems:
        if not skip_bad:
            raise DataError(f'{len(problems)} bad triplet line(s) in the {split} split:\n{format_problems(problems)}\n'
                            f'Fix the files, or pass --skip-bad-triplets to leave these lines out.')
        log(f'--skip-bad-triplets: left out {len(problems)} bad triplet line(s) of the {split} split')
    trip, cond = np.concatenate(trip), np.concatenate(cond)
    if len(trip) == 0:
        raise DataError(f'the {split} split has no triplets for the selected notions')
    order = rng.permutation(len(trip))
    return trip[order], cond[order]


def read_labels(info):
    """labels.csv (image,<notion>...) in filenames.json order -> {notion: list of str ('' = unknown)}, or None."""
    if not info.labels_file or not os.path.exists(info.labels_file):
        return None
    with open(info.labels_file, newline='') as f:
        rows = list(csv.DictReader(f))
    if len(rows) != len(info.filenames):
        raise DataError(f'{info.labels_file}: {len(rows)} rows, but filenames.json lists {len(info.filenames)} images')
    return {n: [r.get(n) or '' for r in rows] for n in info.notions if rows and n in rows[0]}


# ---------------------------------------------------------------------------------------------------------- images

def load_image(path, size):
    """Decode, resize the shorter side to `size`, centre-crop size x size, RGB: (S, S, 3) uint8.
    The same transform as the original's Resize(112) + CenterCrop(112), done on the PIL image."""
    from torchvision.transforms import functional as TF
    try:
        with Image.open(path) as im:
            im = im.convert('RGB')
            im = TF.center_crop(TF.resize(im, size), size)
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f'image not found: {path}') from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f'cannot read image {path}: {e}') from None


def _cache_key(info, size):
    h = hashlib.sha1(f'v1 {size} {info.images_dir}\n'.encode())
    for name in info.filenames:
        try:
            st = os.stat(os.path.join(info.images_dir, name))
        except FileNotFoundError:
            raise DataError(f'image not found: {os.path.join(info.images_dir, name)} (listed in '
                            f'{os.path.join(info.root, "filenames.json")})') from None
        h.update(f'{name}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
    return h.hexdigest()[:16]


def _decode_chunk(job):
    paths, size, out_path, start = job
    arr = np.memmap(out_path, dtype=np.uint8, mode='r+')
    arr = arr.reshape(-1, size, size, 3)
    for i, p in enumerate(paths):
        arr[start + i] = load_image(p, size)
    arr.flush()
    return len(paths)


def build_image_cache(info, size, cache_dir=None, workers=None, log=print):
    """Path of a (N, S, S, 3) uint8 file holding every image of filenames.json, decoded once.

    Rebuilt when the list, the files (size, mtime) or the size change; two processes building it at once take turns
    on a lock, and the file appears only when whole (written under a temporary name, then renamed)."""
    cache_dir = cache_dir or os.path.join(info.root, 'cache')
    try:
        os.makedirs(cache_dir, exist_ok=True)
        probe = os.path.join(cache_dir, f'.write-test-{os.getpid()}')
        open(probe, 'w').close()
        os.remove(probe)
    except OSError:
        fallback = os.path.join(os.path.expanduser('~'), '.cache', 'csn',
                                hashlib.sha1(os.path.abspath(info.root).encode()).hexdigest()[:12])
        log(f'note: cannot write the image cache under {cache_dir}; using {fallback} (set --cache-dir to choose)')
        cache_dir = fallback
        os.makedirs(cache_dir, exist_ok=True)
    key = _cache_key(info, size)
    path = os.path.join(cache_dir, f'images_{size}px_{key}.u8')
    if os.path.exists(path):
        return path
    with open(os.path.join(cache_dir, f'images_{size}px.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path):  # another process built it while we waited
            return path
        n = len(info.filenames)
        paths = [info.image_path(i) for i in range(n)]
        step = 256
        workers = workers or min(len(os.sched_getaffinity(0)), 8)
        from tqdm import tqdm
        with atomic_path(path) as tmp:
            np.memmap(tmp, dtype=np.uint8, mode='w+', shape=(n, size, size, 3)).flush()
            jobs = [(paths[s:s + step], size, tmp, s) for s in range(0, n, step)]
            with tqdm(total=n, desc=f'caching {n} images at {size}px', unit='img', leave=False, disable=None) as bar:
                if workers > 1 and len(jobs) > 1:
                    with get_context('fork').Pool(workers) as pool:
                        for k in pool.imap_unordered(_decode_chunk, jobs):
                            bar.update(k)
                else:
                    for job in jobs:
                        bar.update(_decode_chunk(job))
        for old in os.listdir(cache_dir):  # drop caches of older versions of the images at this size
            if old.startswith(f'images_{size}px_') and old.endswith('.u8') and old != os.path.basename(path):
                os.remove(os.path.join(cache_dir, old))
        log(f'cached {n} images at {size}px in {path} ({os.path.getsize(path) / 2**20:.0f} MiB)')
    return path


class ReadTracker:
    """Which image each DataLoader worker is reading, in a small shared file, so that a worker that dies is named."""

    def __init__(self, n_workers):
        fd, self.path = tempfile.mkstemp(prefix='csn-reading-', suffix='.i64')
        os.close(fd)
        np.memmap(self.path, dtype=np.int64, mode='w+', shape=(n_workers,))[:] = -1
        self._arr = None
        weakref.finalize(self, _remove, self.path, os.getpid())

    def __getstate__(self):
        return {**self.__dict__, '_arr': None}

    def mark(self, i):
        w = get_worker_info()
        if w is not None:
            if self._arr is None:
                self._arr = np.memmap(self.path, dtype=np.int64, mode='r+')
            self._arr[w.id] = i

    def reading(self):
        return [int(i) for i in np.memmap(self.path, dtype=np.int64, mode='r') if i >= 0]


def _remove(path, pid):
    if os.getpid() == pid and os.path.exists(path):
        os.remove(path)


class ImageStore:
    """uint8 (S, S, 3) images by index: from the memory-mapped cache, or decoded with PIL on every call."""

    def __init__(self, info, size, cache_path=None):
        self.info, self.size, self.cache_path = info, size, cache_path
        self._arr = None
        self.tracker = None  # a ReadTracker while DataLoader workers read from this store

    def __getstate__(self):  # DataLoader workers reopen the memory map themselves
        return {**self.__dict__, '_arr': None}

    def get(self, idx):  # idx: (K,) int array -> (K, S, S, 3) uint8
        if self.cache_path is None:
            out = []
            for i in idx:
                if self.tracker is not None:
                    self.tracker.mark(int(i))
                out.append(load_image(self.info.image_path(int(i)), self.size))
            return np.stack(out)
        if self.tracker is not None and len(idx):
            self.tracker.mark(int(idx[0]))
        if self._arr is None:
            self._arr = np.memmap(self.cache_path, dtype=np.uint8, mode='r').reshape(-1, self.size, self.size, 3)
        return np.ascontiguousarray(self._arr[idx])


class TripletBatches(Dataset):
    """Indexed by a list of triplet positions (use with a BatchSampler and batch_size=None): returns the batch's
    images (3B, S, S, 3) uint8 stacked as [anchors, fars, closes], and the notions (B,)."""

    def __init__(self, triplets, conditions, store):
        self.triplets, self.conditions, self.store = triplets, conditions, store

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, pos):
        t = self.triplets[np.asarray(pos)]  # (B, 3)
        imgs = self.store.get(t.T.reshape(-1))  # (3B, S, S, 3)
        return torch.from_numpy(imgs), torch.from_numpy(self.conditions[np.asarray(pos)])


class ImageBatches(Dataset):
    """Indexed by a list of image indices: (K, S, S, 3) uint8. Used to embed each distinct image once."""

    def __init__(self, images, store):
        self.images, self.store = np.asarray(images), store

    def __len__(self):
        return len(self.images)

    def __getitem__(self, pos):
        return torch.from_numpy(self.store.get(self.images[np.asarray(pos)]))


def missing_images(info):
    """Paths listed in filenames.json that are not files."""
    return [info.image_path(i) for i in range(len(info.filenames)) if not os.path.isfile(info.image_path(i))]



# ------------------------------------------------------------------------------------------ images for a command

def choose_hflip(args, info):
    """(mirror training images?, why) from --hflip and the dataset's own say."""
    if args.hflip != 'auto':
        return args.hflip == 'on', f'--hflip {args.hflip}'
    has_meta = os.path.exists(os.path.join(info.root, 'dataset.json'))
    return info.hflip, ('dataset.json' if has_meta and 'hflip' in info.extra else 'default for a dataset without "hflip"')


def make_store(info, rt):
    """The images of a run (Runtime rt): from the uint8 cache (--cache, built once per machine) or decoded by PIL."""
    args = rt.args
    if not args.cache:
        missing = missing_images(info)
        if missing:
            raise DataError(f'{len(missing)} image(s) listed in {os.path.join(info.root, "filenames.json")} are missing, '
                            f'e.g. {missing[:3]}')
        return ImageStore(info, args.image_size)
    # the first process of each machine builds the cache (a shared folder is built once: the others find it done)
    local_main = int(os.environ.get('LOCAL_RANK', '0')) == 0
    quiet = (lambda *a, **k: None)
    path = build_image_cache(info, args.image_size, args.cache_dir, log=rt.log) if local_main else None
    if rt.world > 1:
        dist.barrier()
        if not local_main:
            path = build_image_cache(info, args.image_size, args.cache_dir, log=quiet)
    return ImageStore(info, args.image_size, path)


class SkipSampler(Sampler):
    """The first `skip` indices of a sampler left out: resuming mid-epoch continues the same order."""

    def __init__(self, sampler, skip=0):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        return it

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


def make_loader(dataset, batch_sampler, workers, device):
    """Batches from the dataset; a worker process that dies is reported with the image it was reading, or as a lack of
    shared memory when that is what killed it."""
    store = dataset.store
    if workers > 0 and store.tracker is None:
        store.tracker = ReadTracker(workers)
    loader = DataLoader(dataset, sampler=batch_sampler, batch_size=None, num_workers=workers,
                        pin_memory=device.type == 'cuda', prefetch_factor=4 if workers > 0 else None)
    try:
        yield from loader
    except RuntimeError as e:
        if 'DataLoader worker' not in str(e) or store.tracker is None:
            raise
        if shared_memory_failure(str(e)):
            raise DataError(shm_message(str(e), workers)) from None
        paths = [store.info.image_path(i) for i in store.tracker.reading()]
        raise DataError(f'a DataLoader worker died ({str(e).splitlines()[0]}) while reading '
                        f'{", ".join(paths) or "no image"}. Check that image, or run with --workers 0 to see the '
                        f'error in the main process') from None


def shared_memory_failure(text):
    """Whether a DataLoader error means the workers ran out of shared memory (/dev/shm) rather than a bad image: a
    bus error when a worker touches shared memory that is not there, or a failed write of a batch into it."""
    t = text.lower()
    return any(w in t for w in ('bus error', 'shared memory', 'shm', 'no space left on device'))


def shm_message(text, workers, shm='/dev/shm'):
    try:
        st = os.statvfs(shm)
        size = f' ({st.f_bavail * st.f_frsize / 2**20:.0f} MB free of {st.f_blocks * st.f_frsize / 2**20:.0f} MB)'
    except OSError:
        size = ''
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1].strip()[:200]
    return (f'the {workers} DataLoader workers ran out of shared memory in {shm}{size}: {last}. Not a bad image: in '
            f'docker give the container more (docker run --shm-size 2g, or --ipc host), or use fewer --workers '
            f'(--workers 0 reads in the main process and needs none)')


_NORM = {}  # device -> (mean, std) (1, 3, 1, 1), built once: a new tensor per call is a host-to-device copy per step


def normalisation(device):
    device = torch.device(device)
    if device not in _NORM:
        _NORM[device] = (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
                         torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))
    return _NORM[device]


def to_input(u8, device, channels_last, flip_gen=None):
    """uint8 images (N, S, S, 3) -> normalised float (N, 3, S, S) on the device; random horizontal flips if flip_gen.
    Nothing here waits for the device: the flips are drawn on the host and copied from pinned memory."""
    x = u8.to(device, non_blocking=True).permute(0, 3, 1, 2)  # (N, 3, S, S), channels_last strides
    x = x.float() if channels_last else x.contiguous().float()
    if flip_gen is not None:
        flip = torch.rand(x.shape[0], generator=flip_gen) < 0.5  # (N,) on the host
        if x.device.type == 'cuda':
            flip = flip.pin_memory()
        flip = flip.to(x.device, non_blocking=True)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    mean, std = normalisation(x.device)
    return (x / 255.0 - mean) / std
