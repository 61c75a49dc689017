"""Checkpoints: written whole or not at all, loaded safely (weights only), a run's flags taken back on --resume, and
the notions a checkpoint was trained on. The model they describe is built by csnlib/builder.py."""
import argparse
import os
import shutil

import torch

from csnlib.atomic import atomic_open
from csnlib.errors import CheckpointError, UserError
from triplet_image_loader import parse_conditions

# flags that fix the model's shape: taken from a checkpoint, and must match it when given on the command line
MODEL_FLAGS = ('model', 'dim_embed', 'learned', 'prein', 'scenet_branch')
# how to run: the current machine's business (a run started on the CPU continues on a GPU, a checkpoint from a GPU
# tests on a laptop); never taken from the checkpoint's run. Flags that change what is learned (--three-forwards,
# --hflip, the model's shape, the data) do come back.
HOW_TO_RUN = ('device', 'no_cuda', 'amp', 'compile', 'workers', 'channels_last', 'keep_memory', 'cache', 'cache_dir',
              'dist_timeout')
# where this call writes and reports: never the checkpoint's (a resumed run goes on in its checkpoint's folder, see
# main.resolve; a checkpoint from elsewhere must not choose which folder is overwritten or which server hears of it)
WHERE_TO_WRITE = ('runs', 'name', 'visdom', 'visdom_server', 'visdom_port', 'visdom_env', 'tensorboard')
# flags of this call, never taken from the checkpoint's run
THIS_CALL = ('resume', 'test', 'export_embeddings', 'pictures', 'check_data') + HOW_TO_RUN + WHERE_TO_WRITE
# not flags: what a run recorded about its model in its args (--add-notion's mask rows learned on fixed masks)
RECORDED = ('learned_rows',)
# flags added since: the value that gives a checkpoint made before them its own arithmetic when it is resumed
BEFORE_THE_FLAG = {'conv_wgrad': 'onednn', 'scenet_branch': 'triplet'}  # SCE-Net had the released branch only


class _Recording:
    """A file object that keeps the OSError its writes met: torch's writer turns a full disk into a RuntimeError
    ("unexpected pos") that no longer says why."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()

    def __getattr__(self, name):  # fileno, tell, ...: the file's own
        return getattr(self.f, name)


def save_checkpoint(state, path):
    """Write to a temporary file in the same folder, then rename: a checkpoint file is always whole. A write that
    fails (a full disk, a read-only folder) is a UserError saying that the previous checkpoint is kept."""
    rec = None
    try:
        with atomic_open(path, 'wb') as f:
            rec = _Recording(f)
            torch.save(state, rec)
    except (OSError, RuntimeError) as e:
        cause = rec.error if rec is not None and rec.error is not None else e
        if isinstance(cause, RuntimeError) and not ('inline_container' in str(e) or 'PytorchStreamWriter' in str(e)):
            raise  # not a write that failed
        why = (cause.strerror or str(cause)) if isinstance(cause, OSError) else \
            f'torch\'s writer failed: {str(cause).strip().splitlines()[0][:120]}'
        raise UserError(f'cannot write checkpoint {path}: {why}{free_space(path)}. The previous '
                        f'checkpoint is intact and no partial file is left; free space or fix the folder\'s '
                        f'permissions, then --resume it') from None


def free_space(path):
    """' (N MiB free there)' for the disk of path's folder, '' when that cannot be read."""
    try:
        return f' ({shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20:.0f} MiB free there)'
    except OSError:
        return ''


def load_checkpoint(path):
    if not os.path.exists(path):
        raise CheckpointError(f'--resume {path}: no such checkpoint file')
    if os.path.isdir(path):
        raise CheckpointError(f'--resume {path}: a folder, not a checkpoint file; name the file (e.g. '
                              f'{os.path.join(path, "model_best.pth.tar")})')
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'--resume {path}: the file is empty (0 bytes), so a copy or download of it did not '
                              f'finish; copy it again or use another checkpoint')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        msg = (str(e).strip().splitlines() or [''])[0][:300] or 'no message; the file is truncated or not a checkpoint'
        raise CheckpointError(f'--resume {path}: refused to load it ({type(e).__name__}: {msg}). Checkpoints are '
                              f'loaded with weights_only=True, so files holding arbitrary Python '
                              f'objects are not executed.') from None


def merge_checkpoint_args(args, ckpt, explicit, path):
    """New args from the checkpoint's, keeping flags given on the command line; model flags must match, and the values
    taken from the checkpoint must be what main.py's command line accepts."""
    stored = ckpt.get('args')
    if not isinstance(stored, dict) or 'state_dict' not in ckpt:
        raise CheckpointError(f'--resume {path}: not a checkpoint of this code (no args/state_dict in it)')
    check_stored_args(stored, path, explicit)
    for k in MODEL_FLAGS:
        if k in explicit and k in stored and getattr(args, k) != stored[k]:
            raise CheckpointError(f'--resume {path}: the checkpoint is a {describe(stored)} model, but the command '
                                  f'line asks for --{k.replace("_", "-")} {getattr(args, k)}; drop the flag or use a '
                                  f'matching checkpoint')
    stored = {**BEFORE_THE_FLAG, **stored}
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in stored.items()
                                                  if k not in explicit and (k in vars(args) or k in RECORDED)
                                                  and k not in THIS_CALL}})


def check_stored_args(stored, path, explicit=()):
    """CheckpointError when a value of the checkpoint's args that a run would take is not one main.py's command line
    accepts: a number out of its flag's range (options.Bounded), of another type, or a choice it does not offer."""
    from csnlib.options import Bounded, main_parser
    for action in main_parser()._actions:
        k = action.dest
        if k not in stored or k in THIS_CALL or k in explicit or stored[k] is None and action.default is None:
            continue
        v, t = stored[k], action.type
        if isinstance(t, Bounded):
            kinds = (int,) if t.kind is int else (int, float)
            ok = isinstance(v, kinds) and not isinstance(v, bool)
            try:
                ok = ok and t(str(v)) == v
            except argparse.ArgumentTypeError:
                ok = False
            if not ok:
                raise CheckpointError(f'--resume {path}: its args hold {action.option_strings[0]} {v!r}, which main.py '
                                      f'refuses (it must be {t.describe()}): the checkpoint is damaged or was not '
                                      f'written by main.py; use another one')
        elif action.choices is not None and v not in action.choices:
            raise CheckpointError(f'--resume {path}: its args hold {action.option_strings[0]} {v!r}, not one of '
                                  f'{", ".join(map(str, action.choices))}: the checkpoint is damaged or was not '
                                  f'written by main.py; use another one')


def how_to_run_changes(args, ckpt, explicit):
    """'--flag stored -> now' for each how-to-run flag left at its default that differs from the checkpoint's run."""
    stored = ckpt.get('args') or {}
    return [f'--{k.replace("_", "-")} {stored[k]} -> {getattr(args, k)}' for k in HOW_TO_RUN
            if k in stored and k not in explicit and stored[k] != getattr(args, k) and k != 'workers']


def describe(a):
    a = a if isinstance(a, dict) else vars(a)
    if a['model'] == 'scenet':
        return f'--model scenet ({a.get("scenet_branch", "triplet")} branch), {a["dim_embed"]}-d'
    if a['model'] != 'csn':
        return f'--model {a["model"]}, {a["dim_embed"]}-d'
    return (f'CSN ({"prein" if a.get("prein") else "learned" if a.get("learned") else "fixed"} masks), '
            f'{a["dim_embed"]}-d')


def trained_conditions(ckpt, notions):
    """Indices of the notions a checkpoint was trained on (a checkpoint of older code: the notions its run's
    --conditions selected, all of them by default)."""
    if ckpt.get('conditions') is not None:
        return [int(c) for c in ckpt['conditions']]
    return parse_conditions((ckpt.get('args') or {}).get('conditions'), notions)
