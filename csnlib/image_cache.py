"""The images of a dataset decoded once: a (N, S, S, 3) uint8 file memory-mapped from disk, built under a
lock and renamed into place when whole, and the store that reads images by index from it (or from the files).

The file is a 4096-byte header (a magic line, then JSON: shape, dtype, a digest of the source files' names, sizes,
mtimes and ctimes in ns, and the SHA-256 of all its pixels, computed once when it is built) followed by the pixels. A
file that does not match (its header, its length, or any byte of its pixels) is rebuilt; a reader holds its file open
(and a shared flock on it), so a rebuild never takes a file from under it."""
import errno
import fcntl
import hashlib
import json
import mmap
import os
import re
import shutil
import tempfile
import weakref
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

import numpy as np
import torch.distributed as dist
from torch.utils.data import get_worker_info

from csnlib.atomic import NEW_FILE, atomic_path, open_own
from triplet_image_loader import DataError, UserError, load_image, missing_images

HEADER = 4096                                           # bytes before the pixels: a page, so rows stay aligned
MAGIC = b'CSN-IMAGE-CACHE 3\n'
BLOCK = 1 << 23                                         # bytes read at a time for the pixels' digest


class CacheMismatch(Exception):
    """A cache file that cannot be used as it is; the message says why."""


def _sources_digest(info, size):
    """sha256 of what the pixels come from: the size, the images folder, each image's name, size, mtime and ctime (ns;
    a file replaced or rewritten under the same size and mtime still changes its ctime) and inode."""
    h = hashlib.sha256(f'v2 {size} {info.images_dir}\n'.encode('utf-8', 'surrogateescape'))
    for i, name in enumerate(info.filenames):
        path = info.image_path(i)  # DataError for a path outside the images folder
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DataError(f'image not found: {path} (listed in '
                            f'{os.path.join(info.root, "filenames.json")})') from None
        h.update(f'{name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n'.encode(
            'utf-8', 'surrogateescape'))  # a name of latin-1 bytes (os.listdir's surrogates) is hashed as its bytes
    return h.hexdigest()


def _pixels_digest(fd, nbytes):
    """SHA-256 of the nbytes of pixels after the header of the open file fd: every byte the cache serves."""
    h = hashlib.sha256()
    for start in range(HEADER, HEADER + nbytes, BLOCK):
        h.update(os.pread(fd, min(BLOCK, HEADER + nbytes - start), start))
    return h.hexdigest()


def _pixels(fd, n, size):
    """The (n, S, S, 3) uint8 pixels of an open cache file, memory-mapped read-only."""
    count = n * size * size * 3
    mm = mmap.mmap(fd, HEADER + count, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, np.uint8, count, HEADER).reshape(n, size, size, 3)


def check_cache(fd, n, size, sources=None):
    """Raise CacheMismatch unless the open file fd is a whole cache of n images at size px (and, given sources, of
    those source files): its header, its length, and the digest of all its pixels."""
    head = os.pread(fd, HEADER, 0)
    if not head.startswith(MAGIC):
        raise CacheMismatch('it has no image-cache header (random bytes, or a file of older code)')
    try:
        meta = json.loads(head[len(MAGIC):].decode().strip())
        shape, dtype, digest, pixels = meta['shape'], meta['dtype'], meta['sources'], meta['pixels']
    except (ValueError, KeyError, TypeError):
        raise CacheMismatch('its header is damaged') from None
    if shape != [n, size, size, 3] or dtype != 'uint8':
        raise CacheMismatch(f'it holds {dtype} {shape}, not uint8 {[n, size, size, 3]}')
    if sources is not None and digest != sources:
        raise CacheMismatch('it was built from other image files')
    have, want = os.fstat(fd).st_size, HEADER + n * size * size * 3
    if have != want:
        raise CacheMismatch(f'it is {"truncated" if have < want else "too long"} ({have} bytes, not {want})')
    if _pixels_digest(fd, want - HEADER) != pixels:
        raise CacheMismatch('its pixels are not those it was built with (damaged or overwritten)')


def _write_rows(fd, offset, data):
    """os.pwrite all of data at offset (a full disk: OSError ENOSPC, never the SIGBUS of a write through a memory
    map)."""
    view = memoryview(data)
    while view:
        k = os.pwrite(fd, view, offset)
        view, offset = view[k:], offset + k


def _decode_chunk(job):
    """Decode the images of one chunk and write their rows into the cache file being built: how many."""
    paths, size, out_path, start = job
    fd = os.open(out_path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        rows = np.stack([load_image(p, size) for p in paths])  # (K, S, S, 3)
        _write_rows(fd, HEADER + start * size * size * 3, rows.tobytes())
    finally:
        os.close(fd)
    return len(paths)


def _reserve(fd, nbytes):
    """Allocate the file's blocks now, so a full disk says so before minutes of decoding (ENOSPC); filesystems that
    cannot allocate ahead leave the file sparse (a full disk is then met by a write, as an OSError all the same)."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, nbytes)


class CacheWriteError(UserError):
    """The image cache cannot be written (a full disk, a quota); nothing is kept."""


def _decode_all(jobs, workers, bar):
    """Run _decode_chunk over jobs, in worker processes when there are several. A worker that dies (killed, out of
    memory) fails the build with a DataError naming the images it had, never a wait without end."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            bar.update(_decode_chunk(job))
        return
    with ProcessPoolExecutor(workers, mp_context=get_context('fork')) as pool:
        futures = {pool.submit(_decode_chunk, job): job for job in jobs}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    bar.update(f.result())
        except BrokenProcessPool:
            unfinished = [futures[f][0] for f in futures if not f.done() or f.exception() is not None]
            raise DataError(f'a worker process decoding images for the image cache died (killed, or out of memory) '
                            f'with one of {sum(map(len, unfinished))} images in hand (the first: {unfinished[0][0]}); '
                            f'nothing was kept. Check the images (main.py --check-data --no-cache), or run with '
                            f'--no-cache') from None
        finally:
            for f in futures:
                f.cancel()


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(cache_dir, size, log):
    """Temporary files of builds at this size whose process is dead (a killed build); called under the build lock."""
    for f in os.listdir(cache_dir):
        m = re.fullmatch(rf'images_{size}px_[0-9a-f]+\.u8\.tmp(\d+)(\.[0-9a-f]+)?', f)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            os.remove(os.path.join(cache_dir, f))
            log(f'note: removed {os.path.join(cache_dir, f)}, left by a build that was killed')


def _remove_unused(cache_dir, size, keep, log):
    """Caches of other versions of the images at this size, except those a running process still reads (it holds a
    shared flock on its file; those go at a later build)."""
    for f in os.listdir(cache_dir):
        if not (f.startswith(f'images_{size}px_') and f.endswith('.u8')) or f == keep:
            continue
        path = os.path.join(cache_dir, f)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.remove(path)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            log(f'note: kept {path}, an older cache that a running process still reads; a later build removes it')
        finally:
            os.close(fd)


def _usable(path, n, size, sources):
    """None when path is a cache that matches, else why not ('' when there is no file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return ''
    try:
        check_cache(fd, n, size, sources)
        return None
    except CacheMismatch as e:
        return str(e)
    finally:
        os.close(fd)


def build_image_cache(info, size, cache_dir=None, workers=None, log=print):
    """Path of a (N, S, S, 3) uint8 file holding every image of filenames.json, decoded once.

    Rebuilt when the list, the files (size, mtime, ctime), the size or the file itself (header, length, the digest of
    its pixels) do not match; two processes building it at once take turns on a lock, and the file appears only when
    whole (written under a temporary name, then renamed; a killed build's temporary file goes at the next build). A full
    disk is a CacheWriteError (a UserError) that leaves nothing behind."""
    cache_dir = cache_dir or os.path.join(info.root, 'cache')
    try:
        os.makedirs(cache_dir, exist_ok=True)
        probe = os.path.join(cache_dir, f'.write-test-{os.getpid()}')
        os.close(os.open(probe, NEW_FILE, 0o600))  # never a link planted under this name
        os.remove(probe)
    except OSError:
        fallback = os.path.join(os.path.expanduser('~'), '.cache', 'csn',
                                hashlib.sha1(os.path.abspath(info.root).encode()).hexdigest()[:12])
        log(f'note: cannot write the image cache under {cache_dir}; using {fallback} (set --cache-dir to choose)')
        cache_dir = fallback
        os.makedirs(cache_dir, exist_ok=True)
    sources = _sources_digest(info, size)
    n = len(info.filenames)
    path = os.path.join(cache_dir, f'images_{size}px_{sources[:16]}.u8')
    if _usable(path, n, size, sources) is None:
        return path
    # read-only is enough to flock (a lock file of another user's build); a link there is refused, never truncated
    lock = open_own(os.path.join(cache_dir, f'images_{size}px.lock'), os.O_RDONLY | os.O_CREAT, 'lock file')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(info, size, cache_dir, path, sources, workers, log)
    finally:
        os.close(lock)


def _build_locked(info, size, cache_dir, path, sources, workers, log):
    """build_image_cache's work under its lock: the path, checked or built."""
    n = len(info.filenames)
    _remove_stale(cache_dir, size, log)
    why = _usable(path, n, size, sources)
    if why is None:  # another process built it while we waited
        return path
    if why:
        log(f'note: the image cache {path} does not match ({why}); building it again')
    paths = [info.image_path(i) for i in range(n)]
    step = 256
    workers = workers or min(len(os.sched_getaffinity(0)), 8)
    from tqdm import tqdm
    nbytes = n * size * size * 3
    try:
        with atomic_path(path) as tmp:
            fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                _reserve(fd, HEADER + nbytes)
                jobs = [(paths[s:s + step], size, tmp, s) for s in range(0, n, step)]
                with tqdm(total=n, desc=f'caching {n} images at {size}px', unit='img', leave=False,
                          disable=None) as bar:
                    _decode_all(jobs, workers, bar)
                meta = {'shape': [n, size, size, 3], 'dtype': 'uint8', 'sources': sources,
                        'pixels': _pixels_digest(fd, nbytes)}
                head = MAGIC + json.dumps(meta).encode()
                _write_rows(fd, 0, head + b' ' * (HEADER - 1 - len(head)) + b'\n')
            finally:
                os.close(fd)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        free = shutil.disk_usage(cache_dir).free
        raise CacheWriteError(f'cannot build the image cache in {cache_dir} ({e.strerror}): it needs '
                              f'{(HEADER + nbytes) / 2**20:.0f} MiB and the disk has {free / 2**20:.0f} MiB free; '
                              f'nothing was kept (no partial file). Free space, give --cache-dir a folder on '
                              f'another disk, or run with --no-cache') from None
    _remove_unused(cache_dir, size, os.path.basename(path), log)
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
    """uint8 (S, S, 3) images by index: from the memory-mapped cache, or decoded with PIL on every call.

    With a cache, the store opens the file when made (checking its header, length and sampled rows) and keeps it open
    with a shared flock, so a rebuild by another process never takes it away; a DataLoader worker reads that same
    file (inherited, or through /proc/PID/fd), never whatever has its name now."""

    def __init__(self, info, size, cache_path=None):
        self.info, self.size, self.cache_path = info, size, cache_path
        self._arr = None
        self._fd = None
        self._src = None  # (pid, fd, st_dev, st_ino) of the file the process that made the store opened
        self.tracker = None  # a ReadTracker while DataLoader workers read from this store
        if cache_path is not None:
            fd = os.open(cache_path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                check_cache(fd, len(info.filenames), size)
            except CacheMismatch as e:
                os.close(fd)
                raise DataError(f'{cache_path}: not a usable image cache of {len(info.filenames)} images at {size}px '
                                f'({e}); delete it, and main.py builds it again') from None
            except BaseException:
                os.close(fd)
                raise
            st = os.fstat(fd)
            self._fd, self._src = fd, (os.getpid(), fd, st.st_dev, st.st_ino)
            weakref.finalize(self, os.close, fd)

    def __getstate__(self):  # a spawned DataLoader worker opens the same file itself (fd: see _reopen)
        return {**self.__dict__, '_arr': None, '_fd': None}

    def _reopen(self):
        """In a process this store was sent to: the file its maker holds open, through /proc, or by its name while
        that is still the same file; DataError when it is gone."""
        pid, fd, dev, ino = self._src
        for p in (f'/proc/{pid}/fd/{fd}', self.cache_path):
            try:
                mine = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            st = os.fstat(mine)
            if (st.st_dev, st.st_ino) == (dev, ino):
                return mine
            os.close(mine)
        raise DataError(f'the image cache {self.cache_path} was replaced or deleted while this run read it; run '
                        f'again (it is built anew), or with --no-cache')

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
            if self._fd is None:
                self._fd = self._reopen()
                weakref.finalize(self, os.close, self._fd)
            self._arr = _pixels(self._fd, len(self.info.filenames), self.size)
        return np.ascontiguousarray(self._arr[idx])


def make_store(info, rt):
    """The images of a run (Runtime rt): from the uint8 cache (--cache, built once per machine) or decoded by PIL."""
    args = rt.args
    if not args.cache:
        missing = missing_images(info)
        if missing:
            raise DataError(f'{len(missing)} image(s) listed in {os.path.join(info.root, "filenames.json")} '
                            f'are missing, e.g. {missing[:3]}')
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
