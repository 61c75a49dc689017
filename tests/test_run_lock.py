"""csnlib/run_lock.py: one process at a time writes a run folder; the holder is named; a dead holder frees it."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from csnlib.errors import UserError
from csnlib.run_lock import LOCK_NAME, RunLock

HOLD = ('import sys, time; sys.path.insert(0, sys.argv[1]); from csnlib.run_lock import RunLock\n'
        'with RunLock(sys.argv[2]):\n    print("held", flush=True); time.sleep(60)')


def test_a_second_holder_is_refused_with_the_first_ones_pid_and_a_dead_holder_frees_the_folder(tmp_path):
    run_dir = tmp_path / 'runs' / 'x'
    holder = subprocess.Popen([sys.executable, '-c', HOLD, REPO, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(UserError,
                           match=rf'{run_dir} is in use: process {holder.pid} trains it now.*another --name'):
            with RunLock(str(run_dir), 'trains'):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(str(run_dir)):  # the kernel dropped the dead holder's lock
        assert open(run_dir / LOCK_NAME).read().strip() == str(os.getpid())


def test_the_lock_is_released_on_exit_and_on_an_exception(tmp_path):
    with pytest.raises(ValueError):
        with RunLock(str(tmp_path / 'r')):
            raise ValueError('inside')
    t0 = time.time()
    with RunLock(str(tmp_path / 'r')):
        with RunLock(str(tmp_path / 'other')):  # another folder is another lock
            pass
    assert time.time() - t0 < 5
