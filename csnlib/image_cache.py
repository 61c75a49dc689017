"""The images of a dataset decoded once: a (N, S, S, 3) uint8 file memory-mapped from disk, built under a
lock and renamed into place when whole, and the store that reads images by index from it (or from the files)."""
import fcntl
import hashlib
import os
import tempfile
import weakref
from multiprocessing import get_context

import numpy as np
import torch.distributed as dist
from torch.utils.data import get_worker_info

from csnlib.atomic import atomic_path
from triplet_image_loader import DataError, load_image, missing_images


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
