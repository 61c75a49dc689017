"""One process at a time writes a run folder: an exclusive lock on RUNS/NAME/.lock, held for the process's life, with
the holder's PID in the file so that a second process is refused with a message that names it. The kernel drops the
lock when its holder dies (kill -9 included), so a lock is never stale."""
import fcntl
import os

from csnlib.atomic import open_own
from csnlib.errors import UserError

LOCK_NAME = '.lock'


class RunInUse(UserError):
    """Another process holds the run folder's lock."""


class RunLock:
    """with RunLock(run_dir): ... (the folder is made if needed); RunInUse (a UserError) if another process holds it.
    name: the lock file (main.py's LOCK_NAME; reproduce.py holds its own while it trains and tests a run)."""

    def __init__(self, run_dir, what='writes', name=LOCK_NAME):
        self.run_dir, self.what, self.name, self.fd = run_dir, what, name, None

    def __enter__(self):
        path = os.path.join(self.run_dir, self.name)
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = open_own(path, os.O_RDWR | os.O_CREAT, 'lock file')  # a link planted there is refused, not followed
        except OSError as e:
            raise UserError(f'cannot lock the run folder {self.run_dir} ({e.strerror or e}): it must be a folder this '
                            f'user can write to; choose another --runs or --name, or fix its permissions') from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors='replace').strip() or 'unknown'
            os.close(fd)
            raise RunInUse(f'{self.run_dir} is in use: process {holder} {self.what} it now. Wait for it to finish, '
                            f'stop it, or choose another --name') from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing drops the lock; the file stays (removing it would race a process waiting on it)
        self.fd = None
        return False
