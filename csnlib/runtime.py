"""Where and how a run executes: processes (torchrun), device, mixed precision, memory, seeds and the stop flag.

`start(args)` builds one Runtime at the beginning of a command; it is passed around instead of its parts. args are
never changed: what is derived from them (workers, the evaluation batch, the checkpoint --resume auto found) lives here.
"""
import ctypes
import datetime
import os
import platform
import random
import signal
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from csnlib.options import UserError


class StopFlag:
    """First Ctrl-C: finish the current step, save a checkpoint, exit. Second: exit at once."""

    def __init__(self):
        self.requested = False

    def install(self):
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.requested = True
        print('\nstopping after this step and saving a checkpoint (press Ctrl-C again to exit at once)',
              file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Runtime:
    """The parsed args and what a command derived from them, built once."""
    args: object                      # the argparse Namespace, as parsed (and merged with a checkpoint's)
    device: torch.device
    amp_dtype: torch.dtype = None     # autocast dtype, None = full precision
    use_scaler: bool = False          # fp16 grad scaler
    rank: int = 0                     # this process under torchrun, and how many there are
    world: int = 1
    workers: int = 0                  # DataLoader worker processes
    eval_batch_size: int = 256        # images per batch when embedding
    resume: str = ''                  # the checkpoint this run continues or tests ('' = none)
    workers_note: str = ''            # why fewer workers than usual (shared memory), for the start line
    threads: int = None               # intra-op CPU threads in use (--threads, or torch's default)
    stop: StopFlag = field(default_factory=StopFlag)

    @property
    def is_main(self):
        return self.rank == 0

    def log(self, *a, **k):
        """print, in the first process only."""
        if self.is_main:
            print(*a, **k)


def start(args, resume=''):
    """Join torchrun's processes (if any), choose device and AMP, seed everything: the Runtime of main.py."""
    rank, world, local_rank = setup_distributed(args)
    device = choose_device(args, local_rank)
    amp_dtype, use_scaler = choose_amp(args, device)
    workers, note = args.workers, ''
    if workers is None:
        batch_bytes = 3 * (args.batch_size // world) * args.image_size ** 2 * 3  # a (3B, S, S, 3) uint8 batch
        workers, note = default_workers(args.cache, device.type, len(os.sched_getaffinity(0)),
                                        int(os.environ.get('LOCAL_WORLD_SIZE', '1')), batch_bytes, shm_free_bytes())
    threads = choose_threads(args, device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed image size: let cuDNN pick its fastest convolutions once
    seed_everything(args.seed)
    return Runtime(args, device, amp_dtype, use_scaler, rank, world, workers,
                   eval_batch_size(args.batch_size, args.image_size, device.type, workers), resume, workers_note=note,
                   threads=threads)


def choose_threads(args, device):
    """Intra-op CPU threads: --threads if given (torch.set_num_threads), else torch's default (its cores; torchrun
    sets OMP_NUM_THREADS=1 per process). Not chosen from the machine's load: the thread count changes the float
    rounding of oneDNN's convolutions, so the same command must get the same count to give the same bits. Returns
    the count in use."""
    n = getattr(args, 'threads', None)
    if n is not None and device.type == 'cpu':
        torch.set_num_threads(n)
    return torch.get_num_threads()


def eval_batch_size(batch_size, image_size, device_type, workers):
    """Images per batch when embedding: at least the training batch and 256; on the CPU reading the image cache in the
    process (no workers), about 4M pixels per batch at 64 px and below (4096 images at 32 px, 1024 at 64 px), where
    oneDNN's convolutions on tiny feature maps run 1.5 to 4 times as fast per image as at 256 (the README's speed
    section) and every image's embedding is the same bits at any batch size."""
    small = device_type == 'cpu' and workers == 0 and image_size <= 64
    return max(batch_size, 256, 4096 * 32 ** 2 // image_size ** 2 if small else 0)


PREFETCH = 4  # batches each DataLoader worker keeps ready (in shared memory)


def shm_free_bytes(path='/dev/shm'):
    """Free bytes of the shared memory that DataLoader workers hand batches over in (None if unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def default_workers(cache, device_type, cores, local_world, batch_bytes, shm_free):
    """(DataLoader workers per process, a note when shared memory limited them). 0 on the CPU with the image cache
    (reading the memory map in the process is faster than handing batches over); else the machine's cores shared by
    the processes torchrun starts on it (LOCAL_WORLD_SIZE), at most 8; and no more than half the free /dev/shm can hold
    at PREFETCH batches per worker (a container's 64 MB /dev/shm holds none at batch 256 and 112 px: then 0)."""
    if cache and device_type == 'cpu':
        return 0, ''
    workers = max(1, min(8, cores // max(local_world, 1)))
    if shm_free is not None and batch_bytes > 0:
        fit = int(shm_free // 2 // (PREFETCH * batch_bytes))
        if fit < workers:
            return fit, (f'{fit} workers: /dev/shm has {shm_free / 2**20:.0f} MB free, '
                         f'{PREFETCH * batch_bytes / 2**20:.0f} MB per worker '
                         f'(in docker give it more with --shm-size 2g, or set --workers)')
    return workers, ''


def setup_distributed(args):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on CUDA, Gloo on the CPU."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank, local_rank = int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0'))
    if world > 1:
        use_cuda = args.device in ('auto', 'cuda') and not args.no_cuda and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        backend = 'nccl' if use_cuda else 'gloo'
        for k, v in collective_error_env(backend).items():
            os.environ.setdefault(k, v)
        dist.init_process_group(backend,
                                timeout=datetime.timedelta(seconds=args.dist_timeout))
        if args.batch_size % world:
            raise UserError(f'--batch-size {args.batch_size} does not split evenly over {world} processes')
    return rank, world, local_rank


def collective_error_env(backend):
    """Environment that makes a failed or timed-out collective an exception in the main thread, as Gloo's are, so
    main.py can say which checkpoint to --resume (exit 4). NCCL's default is a watchdog thread that aborts the process
    at the timeout with no word; with blocking wait, wait() raises after --dist-timeout instead (and the watchdog's
    own error handling is off). Only the collectives whose result the host reads wait: main.py's log-interval sums and
    evaluation's gather; DDP's gradient all-reduce stays asynchronous."""
    if backend != 'nccl':
        return {}
    return {'TORCH_NCCL_BLOCKING_WAIT': '1', 'TORCH_NCCL_ASYNC_ERROR_HANDLING': '0'}


def lost_peer(e):
    """Whether a collective failed because another process is gone or stuck (Gloo/NCCL timeouts, closed sockets)."""
    text = str(e).lower()
    return isinstance(e, getattr(dist, 'DistError', ())) or any(
        w in text for w in ('timed out', 'timeout', 'connection closed', 'connection reset', 'broken pipe', 'nccl'))


def choose_device(args, local_rank=0):
    if args.no_cuda and args.device == 'cuda':
        raise UserError('--no-cuda and --device cuda contradict each other')
    want = 'cpu' if args.no_cuda else args.device
    if want == 'auto':
        want = 'cuda' if torch.cuda.is_available() else (
            'mps' if getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available() else 'cpu')
    if want == 'cuda':
        if not torch.cuda.is_available():
            raise UserError('--device cuda: no CUDA device is available (use --device cpu)')
        return torch.device('cuda', local_rank)
    if want == 'mps' and not torch.backends.mps.is_available():
        raise UserError('--device mps: MPS is not available (use --device cpu)')
    return torch.device(want)


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info():
    """The machine a run's figures came from: CPU, cores, bf16 units, the GPU if any, torch."""
    return {'cpu': cpu_name(), 'cores': os.cpu_count(), 'bf16': cpu_has_bf16(),
            'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, 'torch': torch.__version__}


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open('/proc/cpuinfo') as f:
            return set(next((line.split(':', 1)[1] for line in f if line.startswith('flags')), '').split())
    except OSError:
        return set()


def cpu_has_amx():
    """Whether the CPU has AMX tile units for bf16 (amx_bf16), where oneDNN's matrix products run several times
    faster than with avx512_bf16 alone."""
    return 'amx_bf16' in cpu_flags()


def cpu_has_bf16():
    return bool({'avx512_bf16', 'amx_bf16'} & cpu_flags())


def cuda_has_bf16(device):
    """Whether the GPU has bf16 units: compute capability 8.0 (Ampere) or later. torch.cuda.is_bf16_supported() also
    counts emulation, which T4 and V100 (7.x) have: bf16 there is slow, and fp16 with a grad scaler is their path."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def choose_amp(args, device):
    """(autocast dtype or None, use a grad scaler)."""
    if args.amp == 'off' or device.type == 'mps':
        return None, False
    if device.type == 'cuda':
        if args.amp == 'fp16' or (args.amp == 'auto' and not cuda_has_bf16(device)):
            return torch.float16, True
        return torch.bfloat16, False
    if args.amp == 'fp16':
        raise UserError('--amp fp16 needs a CUDA device; use --amp bf16 or off on the CPU')
    if args.amp == 'auto' and not cpu_has_bf16():
        return None, False
    return torch.bfloat16, False


def amp_note(amp_dtype, device):
    """What the start line adds after the AMP dtype when the device has no bf16 units and emulates it ('' otherwise)."""
    if amp_dtype != torch.bfloat16:
        return ''
    if device.type == 'cpu' and not cpu_has_bf16():
        return (' (emulated: this CPU has no avx512_bf16 or amx_bf16 units; bf16 trains several times slower than'
                ' fp32 here, and --amp off or auto is faster)')
    if device.type == 'cuda' and not cuda_has_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        return (f' (emulated: this GPU, compute capability {major}.{minor}, has no bf16 units; --amp auto picks fp16'
                ' with a grad scaler, which is faster)')
    return ''


def keep_freed_memory(args, device):
    """Tell glibc's malloc to keep freed memory: no mmap per large block, no trimming of the heap. Without it every
    activation over 32 MB is mmapped fresh and unmapped after use, so each training step page-faults all of them back
    in. Returns what was done, for the log line."""
    if not args.keep_memory or device.type != 'cpu':
        return 'system default'
    if platform.libc_ver()[0] != 'glibc':
        return 'system default (not glibc)'
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1) != 1:
        return 'system default (mallopt refused)'
    return 'keeps freed memory'


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    np_state = np.random.get_state()
    state = {'python': random.getstate(), 'torch': torch.get_rng_state(),
             'numpy': [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state['python']))
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
