"""Atomic writes: a file or folder appears whole under its name, or not at all (never half-written after a kill).
Files are created exclusively and without following symbolic links: a link planted under a name the code writes is
never written through."""
import os
import secrets
import shutil
import stat
from contextlib import contextmanager

from csnlib.errors import UserError

NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class NotAFile(UserError):
    """A symbolic link (or a folder, a device) where the code reads or writes a regular file of its own."""


def create_temp(path):
    """(fd, name) of a new empty file next to path, named PATH.tmpPID.RANDOM (the PID tells a killed writer's leftovers
    from a running one's), created with O_EXCL | O_NOFOLLOW: never an existing file or a link planted there."""
    while True:
        tmp = f'{path}.tmp{os.getpid()}.{secrets.token_hex(4)}'
        try:
            return os.open(tmp, NEW_FILE, 0o666), tmp
        except FileExistsError:
            continue


def open_own(path, flags, what='file'):
    """os.open(path, flags | O_NOFOLLOW | O_CLOEXEC, 0o666) of a regular file; NotAFile (a UserError) for a symbolic
    link or anything else that is not a regular file there."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError:
        if os.path.islink(path):
            raise NotAFile(f'{path} is a symbolic link (to {os.readlink(path)}), not the {what} this code writes '
                           f'there; it is not followed: remove the link') from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotAFile(f'{path} is not a regular file (a folder or a device), not the {what} this code writes there; '
                       f'remove it')
    return fd


def open_append(path, what='file', **kwargs):
    """open(path, 'a') without following a link (NotAFile for one)."""
    return os.fdopen(open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, what), 'a', **kwargs)


@contextmanager
def atomic_path(path):
    """A new temporary file in path's folder to write to (by name); when the block ends well it is synced and renamed
    to path, else removed. Readers see the old file or the whole new one."""
    fd, tmp = create_temp(path)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


@contextmanager
def atomic_open(path, mode='w', **kwargs):
    """open(path, mode) through a new temporary file renamed into place: `with atomic_open(p, 'wb') as f: ...`."""
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def replace_tree(src, dest):
    """Move src to dest, replacing a file or folder there (a folder is moved aside first, then removed)."""
    if os.path.isdir(dest) and not os.path.islink(dest):
        old = f'{dest}.old-{os.getpid()}'
        os.replace(dest, old)
        os.replace(src, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)
