"""Atomic writes: a file or folder appears whole under its name, or not at all (never half-written after a kill)."""
import os
import shutil
from contextlib import contextmanager


@contextmanager
def atomic_path(path):
    """A temporary name in path's folder to write to; when the block ends well it is synced and renamed to path,
    else removed. Readers see the old file or the whole new one."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass
        raise


@contextmanager
def atomic_open(path, mode='w', **kwargs):
    """open(path, mode) through atomic_path: `with atomic_open(p, 'wb') as f: f.write(...)`."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def replace_tree(src, dest):
    """Move src to dest, replacing a file or folder there (a folder is moved aside first, then removed)."""
    if os.path.isdir(dest) and not os.path.islink(dest):
        old = f'{dest}.old-{os.getpid()}'
        os.replace(dest, old)
        os.replace(src, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)
