"""One error model for every script: the user's mistakes raise UserError (or a subclass), library code never exits
the process, and run_script turns them into one line `error: ...` and exit status 2.

    UserError            the root (defined in triplet_image_loader.py, the lowest file that raises one)
      DataError          a dataset file: the message names the file and line
      GetDataError       a dataset builder's input or download (get_data.py)
      CheckpointError    a checkpoint that cannot be used as asked

Other exit statuses stay what they mean: 130 interrupted, 3 a non-finite loss, 4 a lost torchrun peer (main.py).
Anything else is a bug and keeps its traceback.
"""
import sys

from triplet_image_loader import DataError, UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

__all__ = ['UserError', 'DataError', 'GetDataError', 'CheckpointError', 'run_script', 'message_of',
           'EXIT_USER_ERROR', 'EXIT_INTERRUPTED']


class GetDataError(UserError):
    """A dataset builder's input (a folder, a CSV, an archive) or download is wrong; the message says what to do."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or of another kind than asked."""


def message_of(e):
    """The one line to print for a UserError: a DataLoader worker's re-raise keeps the message, not its traceback."""
    msg = str(e)
    if 'Original Traceback' in msg:
        msg = msg.strip().splitlines()[-1].split(': ', 1)[-1]
    return msg


def run_script(main, argv=None, interrupted='interrupted'):
    """Call main(argv) and return the process's exit status: main's own (None is 0), 2 with `error: ...` on stderr for
    a UserError, 130 with `interrupted` on stderr for Ctrl-C."""
    try:
        rc = main(argv)
    except UserError as e:
        print(f'error: {message_of(e)}', file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if rc is None else rc
