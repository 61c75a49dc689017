"""Training and evaluation speed of this repo's default path against a re-creation of the original release's loop.

    python bench.py --make-data /tmp/zappos_synth --images 2000      # a Zappos-format dataset, offline
    python bench.py --data /tmp/zappos_synth --batch-size 64 --image-size 112 --steps 5

Both are measured in one run, on the same data, triplets and machine. Every figure comes from its own fresh process
(so its peak RSS is its own), the figures take turns round by round (so a busy machine slows them alike), warm-up
steps are left out, and the median of --repeats rounds is reported. Prints a table, then one JSON line per figure.
"""
import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import torch

from csnlib import conv_wgrad, runtime
from csnlib.builder import build_model, place
from csnlib.errors import UserError, run_script
from csnlib.evaluate import evaluate
from csnlib.image_cache import ImageStore, build_image_cache
from csnlib.options import add_device_flag, int_range, main_parser, nonneg_int, positive_int
from csnlib.original_loop import (
    OriginalTripletnet,
    OriginalTriplets,
    original_eval,
    original_loader,
    original_train,
    original_transform,
)
from csnlib.synthetic import make_zappos_like
from csnlib.train_loop import make_optimizer, train_epoch
from triplet_image_loader import (
    DataError,
    choose_hflip,
    load_dataset_info,
    load_triplets,
)
from tripletnet import csn_loss

FIGURES = [('original', 'train'), ('baseline', 'train'), ('repo', 'train'),
           ('original', 'eval'), ('baseline', 'eval'), ('repo', 'eval')]
RESULT_TAG = 'BENCH_RESULT '


# ------------------------------------------------------------------------------------- a Zappos-format dataset


# ------------------------------------------------------------------- the original release's loop, re-created


# ------------------------------------------------------------------------------------------------ measurement

def impl_flags(opts, impl):
    """(main.py flags of this repo's path for impl, the bench flag they came from)."""
    return (opts.baseline_flags, '--baseline-flags') if impl == 'baseline' else (opts.repo_flags, '--repo-flags')


def repo_args(opts, impl='repo'):
    """main.py's own defaults, with the bench's data, batch size, image size and device, plus --repo-flags (impl
    baseline: --baseline-flags)."""
    flags, flag_name = impl_flags(opts, impl)
    argv = ['--data', opts.data, '--batch-size', str(opts.batch_size), '--image-size', str(opts.image_size),
            '--device', opts.device, '--seed', str(opts.seed), '--no-pretrained', *shlex.split(flags)]
    try:
        return main_parser().parse_args(argv)
    except SystemExit:
        raise UserError(f'{flag_name} {flags!r}: not flags of main.py (see python main.py --help)') from None


def peak_rss_mb():
    """Peak resident memory of this process (DataLoader workers not included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_seconds():
    """CPU time (user + system) of this process's threads so far; DataLoader workers not included."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


NVML_HINT = 'the GPU busy share needs nvidia-ml-py (pip install nvidia-ml-py; requirements-dev.txt has it)'


class GpuBusy:
    """Mean NVML utilisation (share of time a kernel ran) sampled every 50 ms while timing; None when unavailable,
    and then `error` says why (most often: nvidia-ml-py is not installed)."""

    def __init__(self, device):
        self.device, self.samples, self._stop, self.error = device, [], threading.Event(), None

    def start(self):
        if self.device.type == 'cuda':
            try:
                import pynvml  # noqa: F401  (nvidia-ml-py, which torch.cuda.utilization needs)
                torch.cuda.utilization(self.device)
            except ImportError:
                self.error = NVML_HINT
                return self
            except Exception as e:
                self.error = f'NVML cannot read the GPU\'s utilisation ({type(e).__name__}: {str(e)[:200]})'
                return self
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            self.samples.append(torch.cuda.utilization(self.device))

    def stop(self):
        self._stop.set()

    __enter__ = start

    def __exit__(self, *exc):
        self.stop()

    def mean(self):
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure(opts, impl, mode):
    """One figure in this process: build, warm up, time opts.steps batches (repo eval: the whole test split)."""
    args = repo_args(opts, impl)
    rt = runtime.start(args)  # device, AMP, workers and seed as main.py chooses them
    device = rt.device
    info = load_dataset_info(args.data)
    conditions = list(range(len(info.notions)))
    quiet = lambda *a, **k: None
    B, W, N = args.batch_size, opts.warmup, opts.steps
    model = build_model(args, len(info.notions)).to(device)
    if args.model != 'csn':
        raise UserError('the original release has only the CSN model: leave --model out of --repo-flags')
    base_rss = peak_rss_mb()
    split = 'train' if mode == 'train' else 'test'
    trip, cond = load_triplets(info, split, conditions, 10 ** 9, args.seed, log=quiet)  # the whole split, shuffled
    if mode == 'train' and len(trip) < (W + N) * B:
        raise DataError(f'{args.data}: {len(trip)} training triplets, fewer than (--warmup + --steps) x --batch-size = '
                        f'{(W + N) * B}; make a larger set with get_data.py --dataset synthetic --synthetic-images N')
    warm, timed = slice(0, W * B), slice(W * B, (W + N) * B)
    settings = {'batch_size': B, 'image_size': args.image_size, 'threads': torch.get_num_threads(),
                'cores': len(os.sched_getaffinity(0))}
    gpu = GpuBusy(device)

    if impl == 'original':
        run = original_runner(args, info, model, trip, cond, mode, device, settings)
    else:
        run, timed = repo_runner(args, rt, info, model, trip, cond, mode, settings, opts, impl, timed)
    clock = {}

    def start_clock(step):
        if step == W:
            sync(device)
            gpu.start()
            clock.update(t0=time.perf_counter(), c0=cpu_seconds())

    if impl == 'repo' and mode == 'eval' or impl == 'baseline' and mode == 'eval':
        # the whole evaluation, as main.py runs it after every epoch (starting its DataLoader workers included)
        run(warm)
        start_clock(W)
        run(timed)
    else:
        # warm-up and timed steps in one pass over one DataLoader: the clock starts after step W, so starting the
        # DataLoader's workers and the first steps (cuDNN's search with cudnn.benchmark) are not timed
        if W == 0:
            start_clock(0)
        run(slice(0, (W + N) * B), start_clock)
    sync(device)
    seconds, cpu_s = time.perf_counter() - clock['t0'], cpu_seconds() - clock['c0']
    gpu.stop()
    n = len(trip[timed])
    if mode == 'eval':
        settings.update(eval_triplets=n, eval_images=int(len(np.unique(trip[timed]))))
    out = {'seconds': seconds, 'cpu_seconds': cpu_s, 'triplets': n, 'peak_rss_mb': round(peak_rss_mb(), 1),
           'base_rss_mb': round(base_rss, 1), 'gpu_busy_pct': gpu.mean(),
           **({'gpu_busy_error': gpu.error} if gpu.error else {}), 'device': device.type,
           'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else runtime.cpu_name(),
           'settings': settings}
    if device.type == 'cuda':
        out['peak_gpu_mb'] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return out


def original_runner(args, info, model, trip, cond, mode, device, settings):
    """The original release's loop on this model's backbone and masks: run(triplet slice, on_step) and its settings."""
    B = args.batch_size
    settings.update(amp='off', channels_last=False, forwards_per_step=3, decode='PIL per triplet',
                    workers=4 if device.type == 'cuda' else 0, pin_memory=device.type == 'cuda', grad_in_eval=True)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # as the release sets it
    tnet = OriginalTripletnet(model.embednet)

    def loader(sl):
        dataset = OriginalTriplets(info, trip[sl], cond[sl], original_transform(args.image_size, mode == 'train'))
        return original_loader(dataset, B, device)

    if mode == 'train':
        optimizer = torch.optim.Adam([p for p in tnet.parameters() if p.requires_grad], lr=args.lr)

        def run(sl, on_step=None):
            original_train(tnet, optimizer, loader(sl), args, device, on_step)
    else:
        def run(sl, on_step=None):
            original_eval(tnet, loader(sl), args, device, len(info.notions), on_step)
    return run


def repo_runner(args, rt, info, model, trip, cond, mode, settings, opts, impl, timed):
    """This repo's path as main.py runs it (uint8 cache, one forward, AMP as chosen): (run, the timed slice; eval
    times the whole test split, as its embed-once speed depends on the triplets per image)."""
    device = rt.device
    malloc = runtime.keep_freed_memory(args, device)
    settings.update(amp=str(rt.amp_dtype).replace('torch.', '') if rt.amp_dtype else 'off', grad_scaler=rt.use_scaler,
                    channels_last=args.channels_last, compile=args.compile,
                    forwards_per_step=3 if args.three_forwards else 1, decode='uint8 cache' if args.cache else 'PIL',
                    workers=rt.workers, pin_memory=device.type == 'cuda', malloc=malloc,
                    flags=impl_flags(opts, impl)[0])
    wgrad_dtypes = conv_wgrad.dtypes_for(args.conv_wgrad, device) if mode == 'train' else ()
    place(model, args, device, wgrad_dtypes)
    settings.update(conv_wgrad=conv_wgrad.describe(wgrad_dtypes))
    quiet = lambda *a, **k: None
    store = ImageStore(info, args.image_size, build_image_cache(info, args.image_size, args.cache_dir, log=quiet))
    if mode == 'eval':
        def run(sl, on_step=None):
            evaluate(model, trip[sl], cond[sl], store, rt, info.notions)
        return run, slice(0, len(trip))
    hflip = choose_hflip(args, info)[0]  # as main.py mirrors this dataset's training images
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], args.lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=rt.use_scaler)
    train_model = torch.compile(model) if args.compile else model

    def run(sl, on_step=None):
        train_epoch(model, train_model, optimizer, scaler, (trip[sl], cond[sl], store, hflip), rt, 1, on_step=on_step)
    return run, timed


def run_child(opts, impl, mode):
    cmd = [sys.executable, os.path.abspath(__file__), '--child', f'{impl}:{mode}', '--data', opts.data,
           '--batch-size', str(opts.batch_size), '--image-size', str(opts.image_size), '--steps', str(opts.steps),
           '--warmup', str(opts.warmup), '--device', opts.device, '--seed', str(opts.seed),
           f'--repo-flags={opts.repo_flags}']
    if opts.baseline_flags is not None:
        cmd.append(f'--baseline-flags={opts.baseline_flags}')
    load = os.getloadavg()[0]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f'{impl} {mode} failed (exit {p.returncode}):\n{p.stderr[-3000:]}')
    res = json.loads(lines[-1][len(RESULT_TAG):])
    res['load_avg_1min'] = load
    return res


def summarise(impl, mode, runs, opts):
    rates = [r['triplets'] / r['seconds'] for r in runs]
    last = runs[-1]
    per_cpu_s = [r['triplets'] / r['cpu_seconds'] for r in runs]
    return {'impl': impl, 'mode': mode, 'triplets_per_s': round(statistics.median(rates), 2),
            'runs_triplets_per_s': [round(x, 2) for x in rates], 'triplets_timed': last['triplets'],
            'triplets_per_cpu_s': round(statistics.median(per_cpu_s), 2),
            'peak_rss_mb': max(r['peak_rss_mb'] for r in runs), 'base_rss_mb': last['base_rss_mb'],
            'gpu_busy_pct': last['gpu_busy_pct'],
            **({'peak_gpu_mb': last['peak_gpu_mb']} if 'peak_gpu_mb' in last else {}),
            **({'gpu_busy_error': last['gpu_busy_error']} if 'gpu_busy_error' in last else {}),
            'device': last['device'], 'device_name': last['device_name'],
            'load_avg_1min': [round(r['load_avg_1min'], 2) for r in runs],
            'settings': {**last['settings'], 'steps': opts.steps, 'warmup': opts.warmup, 'repeats': opts.repeats,
                         'torch': torch.__version__}}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    a = p.add_argument
    a('--data', default=None, metavar='DIR', help='dataset folder in the CSN layout (required unless --make-data)')
    a('--make-data', default=None, metavar='DIR', help='write a Zappos-format synthetic dataset to DIR and exit')
    a('--images', type=int_range(32), default=2000, help='with --make-data: number of images')
    a('--batch-size', type=positive_int, default=64, help='triplets per step, for both implementations')
    a('--image-size', type=positive_int, default=112, help='images are resized and centre-cropped to this size')
    a('--steps', type=positive_int, default=5, help='timed steps per round (training, and the original\'s evaluation)')
    a('--warmup', type=nonneg_int, default=2, help='untimed steps before timing')
    a('--repeats', type=positive_int, default=3, help='rounds; the median is reported')
    add_device_flag(p, ('auto', 'cpu', 'cuda'), 'auto = CUDA when available, else the CPU')
    a('--seed', type=nonneg_int, default=1, help='random seed (triplet order, flips, initialisation)')
    a('--repo-flags', default='', metavar='"FLAGS"',
      help='extra main.py flags for this repo\'s path, e.g. --repo-flags="--amp off --no-channels-last" '
           '(default: main.py\'s defaults)')
    a('--baseline-flags', default=None, metavar='"FLAGS"',
      help='also measure this repo\'s path with these main.py flags instead of --repo-flags (impl "baseline") and '
           'print repo / baseline: a before/after figure for one setting in one run, e.g. '
           '--baseline-flags="--no-keep-memory" (with "=", as the value starts with --)')
    a('--impls', nargs='+', choices=['original', 'repo', 'baseline'], default=['original', 'repo', 'baseline'],
      help='implementations to measure (baseline only with --baseline-flags)')
    a('--modes', nargs='+', choices=['train', 'eval'], default=['train', 'eval'], help='what to measure')
    a('--peak', action='store_true', help='only time a 4096 x 4096 matrix product in bf16 and fp32 (the device\'s '
                                          'practical peak, to compare the training GFLOP/s with)')
    a('--search', nargs='*', type=positive_int, default=None, metavar='N',
      help='only time the search: queries/s and recall@10 of the exact, ivf and hnsw indexes over N random 64-d '
           'embeddings, for each N given (default: 100000 1000000 10000000; faiss-cpu, numpy for exact without it)')
    a('--search-indexes', nargs='+', choices=SEARCH_INDEXES, default=list(SEARCH_INDEXES), metavar='INDEX',
      help='with --search: which indexes to time, of ' + ', '.join(SEARCH_INDEXES) + ' (numpy: the exact search '
           'without faiss; notions: one index per notion against one index for every notion, side by side); recall '
           'is always against exact search (default: all of them)')
    a('--search-notions', type=positive_int, default=4, metavar='C',
      help='with --search: the notions (learned masks) of the side-by-side table (default: 4)')
    a('--gpu-check', action='store_true', help='the first command on a GPU machine: runs the GPU checks of '
                                               'tests/test_gpu.py (pytest -m gpu; exit 2 without CUDA)')
    a('--child', default=None, help=argparse.SUPPRESS)  # impl:mode, run by the parent in a fresh process
    return p


def print_table(figs, header):
    print(header)
    print(f'{"impl":<9} {"mode":<6} {"triplets/s":>11}  {"rounds":<24} {"GFLOP/s":>8} {"peak RSS MB":>11}  settings')
    for f in figs:
        s = f['settings']
        what = (f'{s["forwards_per_step"]} fwd/step, amp {s["amp"]}, channels_last {s["channels_last"]}, '
                f'{s["decode"]}, workers {s["workers"]}')
        if s.get('malloc'):
            what += f', malloc {s["malloc"]}'
        if s.get('conv_wgrad'):
            what += f', conv weight gradients {s["conv_wgrad"]}'
        if s.get('flags'):
            what += f', flags: {s["flags"]}'
        if 'eval_triplets' in s:
            what += f', {s["eval_triplets"]} triplets over {s["eval_images"]} images'
        gflops = f'{f["gflop_per_s"]:,.0f}' if 'gflop_per_s' in f else ''
        print(f'{f["impl"]:<9} {f["mode"]:<6} {f["triplets_per_s"]:>11.1f}  '
              f'{" ".join(f"{x:.1f}" for x in f["runs_triplets_per_s"]):<24} {gflops:>8} '
              f'{f["peak_rss_mb"]:>11.0f}  {what}')


def run_bench(opts):
    info = load_dataset_info(opts.data)
    args = repo_args(opts)
    if args.cache:
        t0 = time.perf_counter()
        build_image_cache(info, args.image_size, args.cache_dir)  # once, before the timed processes start
        cache_s = time.perf_counter() - t0
    if opts.baseline_flags is not None:
        repo_args(opts, 'baseline')  # bad flags fail here, not in every child
    figures = [(i, m) for i, m in FIGURES if i in opts.impls and m in opts.modes
               and (i != 'baseline' or opts.baseline_flags is not None)]
    runs = {f: [] for f in figures}
    load_start = os.getloadavg()
    for r in range(opts.repeats):
        for impl, mode in (figures if r % 2 == 0 else figures[::-1]):  # alternate the order between rounds
            runs[(impl, mode)].append(run_child(opts, impl, mode))
            print(f'round {r + 1}/{opts.repeats}: {impl} {mode} '
                  f'{runs[(impl, mode)][-1]["triplets"] / runs[(impl, mode)][-1]["seconds"]:.1f} triplets/s',
                  flush=True)
    figs = [summarise(i, m, runs[(i, m)], opts) for i, m in figures]
    gflop = train_gflop_per_triplet(opts) if 'train' in opts.modes else None
    for f in figs:
        if f['mode'] == 'train':
            f['gflop_per_triplet'] = float(f'{gflop:.4g}')
            f['gflop_per_s'] = float(f'{gflop * f["triplets_per_s"]:.4g}')  # 4 significant digits, however slow
    f0 = figs[0]
    header = (f'\n{opts.data}: {len(info.filenames)} images, batch {opts.batch_size}, {opts.image_size} px, '
              f'{f0["device"]} ({f0["device_name"]}, {f0["settings"]["cores"]} cores, '
              f'{f0["settings"]["threads"]} threads), '
              f'torch {torch.__version__}; median of {opts.repeats} rounds of {opts.steps} steps after {opts.warmup} '
              f'warm-up; load average {load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end'
              + (f'; image cache ready in {cache_s:.1f} s (built once, reused)' if args.cache else '')
              + (f'; a training step costs {gflop:.2f} GFLOP per triplet (GFLOP/s below = that x triplets/s; '
                 f'python bench.py --peak gives the device\'s matrix-product peak)' if gflop else ''))
    print_table(figs, header)
    for f in figs:
        if f['device'] == 'cuda':
            print(f'GPU busy share, {f["impl"]} {f["mode"]}: '
                  + (f'{f["gpu_busy_pct"]} %' if f['gpu_busy_pct'] is not None
                     else f'unknown: {f.get("gpu_busy_error", "no samples")}'))
    by = {(f['impl'], f['mode']): f['triplets_per_s'] for f in figs}
    ratios = {(m, other): round(by[('repo', m)] / by[(other, m)], 2) for other in ('original', 'baseline')
              for m in opts.modes if ('repo', m) in by and (other, m) in by}
    for (m, other), x in ratios.items():
        print(f'repo / {other}, {m}: {x:.2f}x' + (f' (baseline: {opts.baseline_flags})' if other == 'baseline' else ''))
    for f in figs:
        f['repo_over_original'] = ratios.get((f['mode'], 'original'))
        if opts.baseline_flags is not None:
            f['repo_over_baseline'] = ratios.get((f['mode'], 'baseline'))
        print(json.dumps(f))
    return 0


def train_gflop_per_triplet(opts, n=4):
    """Floating-point operations of one training step per triplet (forward and backward, torch's FLOP counter over
    the convolutions and matrix products; the same for both implementations), from a step of n triplets on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode
    info = load_dataset_info(opts.data)
    args = repo_args(opts)
    model = build_model(args, len(info.notions))
    x = torch.zeros(3 * n, 3, args.image_size, args.image_size)  # (3n, 3, S, S)
    with FlopCounterMode(display=False) as counter:
        d_far, d_close, emb_norm, mask_norm = model(x, torch.zeros(n, dtype=torch.long))
        csn_loss(d_far, d_close, emb_norm, mask_norm, args.margin, args.embed_loss, args.mask_loss).backward()
    return counter.get_total_flops() / n / 1e9


def peak_speed(device, n=4096, repeats=5):
    """GFLOP/s of an n x n matrix product in bf16 and fp32: about the most the device's units give this library. A CPU
    without bf16 units gets None for bf16: its emulated product runs at under 1 GFLOP/s (minutes at n = 4096)."""
    emulated = device.type == 'cpu' and not runtime.cpu_has_bf16()
    out = {'bfloat16': None} if emulated else {}
    for dtype in (torch.float32,) if emulated else (torch.bfloat16, torch.float32):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        times = []
        for r in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            times.append(time.perf_counter() - t0)
        out[str(dtype).replace('torch.', '')] = round(2 * n ** 3 / statistics.median(times[1:]) / 1e9, 1)
    fig = {'mode': 'peak', 'matmul_n': n, 'gflop_per_s': out, 'device': device.type,
           'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else runtime.cpu_name(),
           'threads': torch.get_num_threads()}
    print(f'{n} x {n} matrix product on {fig["device_name"]}: '
          + ', '.join(f'{k} {v:,.0f} GFLOP/s' if v is not None else f'{k} not timed (no bf16 units: emulated)'
                      for k, v in out.items()))
    print(json.dumps(fig))
    return 0


SEARCH_INDEXES = ('exact', 'numpy', 'ivf', 'hnsw', 'notions')


def search_speed(sizes=(100_000, 1_000_000, 10_000_000), dim=64, k=10, queries=1000, min_s=3.0, build_budget_s=400,
                 indexes=SEARCH_INDEXES, notions=4):
    """Queries per second and recall@k against exact search of csnlib.search.Index over random dim-d embeddings
    under a learned (non-binary) mask: exact (faiss, and numpy as without faiss), ivf and hnsw, each at its former
    settings (ivf: float codes, hnsw: m 16, ef_construction 40) and at its defaults, two search settings each.
    A size whose arrays would not fit in the available memory is skipped, and so are approximate indexes whose build
    would take longer than build_budget_s (estimated from the previous size's: as N^1.5 for IVF's sqrt(N) cells, as
    N log N for HNSW's graph). `indexes`: the names of those to time; recall is against exact search either way.
    'notions': side by side, `notions` learned masks ReLU(N(0.9, 0.7)) (as a learned CSN starts them) served by one
    index per notion (csnlib.search.Index over f(x) * m_c, exact and ivf at its defaults) and by one index for every
    notion (csnlib.catalogue.CatalogueIndex over f(x), exact, ivf at its defaults, and ivf with shared cells at three
    nprobe), each query asking notion i % C;
    with the bytes each holds (its arrays and faiss's serialized index) and its build time (all C for per notion)."""
    import inspect
    import math

    from csnlib.search import Index, faiss_or_none

    def available_bytes():
        with open('/proc/meminfo') as f:
            return int(next(line for line in f if line.startswith('MemAvailable')).split()[1]) * 1024

    def timed(search, q):  # queries/s over batches of 100 (at least min_s seconds or all queries), ms of a single query
        t0, done, out = time.perf_counter(), 0, []
        while done < len(q) and (done == 0 or time.perf_counter() - t0 < min_s):
            out.append(search(q[done:done + 100]))
            done += len(out[-1])
        qps = done / (time.perf_counter() - t0)
        single, t0 = [], time.perf_counter()  # the median of 10 to 100 single queries, as many as fit in min_s
        while len(single) < min(100, len(q)) and (len(single) < 10 or time.perf_counter() - t0 < min_s):
            t1 = time.perf_counter()
            search(q[len(single):len(single) + 1])
            single.append(time.perf_counter() - t1)
        return np.concatenate(out), qps, statistics.median(single) * 1e3

    faiss = faiss_or_none()
    if faiss is None:
        print('faiss is not installed (pip install faiss-cpu): only the numpy search is timed')
    rng = np.random.default_rng(0)
    mask = np.abs(rng.standard_normal(dim)).astype(np.float32)  # (D,) a learned mask: weights, not 0/1
    # name, kind, options, what the options say, search setting, its values (the default marked in the table)
    kinds = [('numpy', 'exact', {'use_faiss': False}, '', None, [None])]
    if faiss is not None:
        kinds = [('exact', 'exact', {}, '', None, [None]), *kinds,
                 ('ivf', 'ivf', {'codes': 'flat'}, 'flat codes', 'nprobe', [16, 64]),  # the former default
                 ('ivf', 'ivf', {}, 'pq4 codes', 'nprobe', [64, 128]),
                 ('hnsw', 'hnsw', {'m': 16, 'ef_construction': 40}, 'm 16 efc 40', 'ef_search', [64, 256]),  # former
                 ('hnsw', 'hnsw', {}, 'm 32 efc 80', 'ef_search', [128, 192, 256])]
    kinds = [kd for kd in kinds if kd[0] in indexes]
    defaults = inspect.signature(Index).parameters
    rows, build_s = [], {}

    def every_notion(n):
        """The side-by-side rows at n images: one index per notion against one index for every notion."""
        from csnlib.catalogue import CatalogueIndex, PerNotionIndex
        need = (2 * notions + 3) * n * dim * 4  # the raw embeddings, C masked copies and faiss's, one index's
        if need > 0.8 * available_bytes():
            print(f'{n:>10,} every notion skipped: needs about {need / 2**30:.1f} GiB')
            return []
        print(f'{"images":>10} {"index":<10} {"setting (" + str(notions) + " notions)":<28} {"build s":>8} '
              f'{"memory MB":>9} {"queries/s":>10} {"ms/query":>9} {"recall@" + str(k):>9}')
        emb = rng.standard_normal((n, dim), dtype=np.float32)  # (N, D) raw embeddings
        masks = np.maximum(rng.normal(0.9, 0.7, (notions, dim)), 0).astype(np.float32)  # (C, D)
        q = rng.standard_normal((queries, dim), dtype=np.float32)  # (Q, D) raw queries; query i asks notion i % C
        per = [q[c::notions] for c in range(notions)]
        truth, out = None, []
        setups = [('per-notion', 'exact', {}, None, [None]), ('one', 'exact', {}, None, [None])]
        if faiss is not None:
            setups += [('per-notion', 'ivf', {}, None, [None]), ('one', 'ivf', {}, None, [None]),
                       ('one', 'ivf', {'cells': 'shared'}, 'nprobe', [128, 256, 512])]
        for name, kind, opts, param, values in setups:
            t0 = time.perf_counter()
            index = (PerNotionIndex(emb, masks, kind, **opts) if name == 'per-notion'
                     else CatalogueIndex(emb, masks, kind, **opts))
            build = time.perf_counter() - t0
            held = index.nbytes()
            for v in values:
                if param:
                    setattr(index, param, v)
                found, qps, ms = zip(*[timed(lambda x, c=c: index.search(x, k, c)[0], per[c][:max(1, len(per[c]))])
                                       for c in range(notions)])
                truth = truth or found  # the first row is exact
                recall = np.mean([len(set(a) & set(b)) / k for f, t in zip(found, truth) for a, b in zip(f, t)])
                setting = (kind + (', shared cells' if opts else '') + (f', nprobe {v}' if param else '')
                           + (' (defaults)' if kind == 'ivf' and not opts else ''))
                fig = {'impl': 'repo', 'mode': 'search-notions', 'images': n, 'dim': dim, 'notions': notions, 'k': k,
                       'index': name, 'setting': setting, 'build_s': round(build, 2),
                       'memory_mb': round(held / 2 ** 20, 3), 'queries_per_s': round(float(np.mean(qps)), 1),
                       'ms_per_query': round(float(np.median(ms)), 3), f'recall_at_{k}': round(float(recall), 4),
                       'queries': int(sum(len(f) for f in found)), 'peak_rss_mb': round(peak_rss_mb()),
                       'cpu': runtime.cpu_name()}
                out.append(fig)
                print(f'{n:>10,} {name:<10} {setting:<28} {build:>8.1f} {held / 2 ** 20:>9,.0f} '
                      f'{fig["queries_per_s"]:>10,.0f} {fig["ms_per_query"]:>9.2f} {recall:>9.3f}', flush=True)
            index = None  # free it before the next one is built
        return out
    print(f'{"images":>10} {"index":<6} {"setting":<32} {"build s":>8} {"queries/s":>10} {"ms/query":>9} '
          f'{"recall@" + str(k):>9}')
    for n in sizes:
        need = 3 * n * dim * 4  # the masked embeddings, faiss's copy, the approximate index's copy
        if need > 0.8 * available_bytes():
            print(f'{n:>10,} skipped: needs about {need / 2**30:.1f} GiB, '
                  f'{available_bytes() / 2**30:.1f} GiB available')
            continue
        space = rng.standard_normal((n, dim), dtype=np.float32)  # (N, D) raw embeddings
        space *= mask  # (N, D) the notion's subspace f(x) * m_c
        q = rng.standard_normal((queries, dim), dtype=np.float32) * mask  # (Q, D) new images' masked embeddings
        truth = None  # the exact neighbours: the first index's when it is exact, else computed here untimed
        if kinds and kinds[0][1] != 'exact':
            truth = Index(space, 'exact').search(q, k)[0]
        for name, kind, opts, about, param, values in kinds:
            key = f'{name} {about}'
            grow = n / max(build_s.get(key + '_n', n), 1)  # over the last size built
            est = build_s.get(key, 0) * (grow * math.log(n) / math.log(max(n / grow, 2)) if kind == 'hnsw'
                                         else grow ** 1.5)
            if kind != 'exact' and est > build_budget_s:
                print(f'{n:>10,} {name:<6} {about} skipped: building it would take about {est:.0f} s '
                      f'(over {build_budget_s} s)')
                continue
            t0 = time.perf_counter()
            index = Index(space, kind, **opts)
            build = time.perf_counter() - t0
            build_s[key], build_s[key + '_n'] = build, n
            for v in values:
                if param:
                    setattr(index, param, v)
                found, qps, ms = timed(lambda x: index.search(x, k)[0], q)
                if truth is None:
                    truth = found
                m = min(len(found), len(truth))
                recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found[:m], truth[:m])])
                setting = ', '.join(s for s in (about, param and f'{param} {v}' + (
                    ' (default)' if not opts and defaults[param].default == v else '')) if s)
                fig = {'impl': 'repo', 'mode': 'search', 'images': n, 'dim': dim, 'k': k, 'index': name,
                       'setting': setting, 'build_s': round(build, 2),
                       'queries_per_s': round(qps, 1), 'ms_per_query': round(ms, 3),
                       f'recall_at_{k}': round(float(recall), 4), 'queries': int(len(found)),
                       'peak_rss_mb': round(peak_rss_mb()), 'cpu': runtime.cpu_name()}
                rows.append(fig)
                print(f'{n:>10,} {name:<6} {setting:<32} {build:>8.1f} {qps:>10,.0f} {ms:>9.2f} {recall:>9.3f}',
                      flush=True)
            index = None  # free it before the next one is built
        space = None
        if 'notions' in indexes and notions:
            rows += every_notion(n)
    for fig in rows:
        print(json.dumps(fig))
    return 0


# ------------------------------------------------------------------------------------------------- --gpu-check

def gpu_check():
    """--gpu-check: the GPU checks of tests/test_gpu.py (pytest -m gpu), which measure nothing; their exit status."""
    if not torch.cuda.is_available():
        raise UserError(f'--gpu-check needs a CUDA GPU, and torch {torch.__version__} sees none ('
                        + (f'built for CUDA {torch.version.cuda}: check the driver, nvidia-smi and CUDA_VISIBLE_DEVICES'
                           if torch.version.cuda else 'a CPU-only build of torch: install a CUDA build') + ')')
    tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tests', 'test_gpu.py')
    return subprocess.run([sys.executable, '-m', 'pytest', '-m', 'gpu', '-v', '-s', tests]).returncode


def main(argv=None):
    opts = build_parser().parse_args(argv)
    if opts.gpu_check:
        return gpu_check()
    if opts.search is not None:
        return search_speed(*([tuple(opts.search)] if opts.search else []), indexes=opts.search_indexes,
                            notions=opts.search_notions)
    if opts.peak:
        return peak_speed(runtime.choose_device(argparse.Namespace(no_cuda=False, device=opts.device)))
    if opts.make_data:
        make_zappos_like(opts.make_data, opts.images, opts.seed)
        print(f'next: python bench.py --data {opts.make_data}')
        return 0
    if not opts.data:
        raise UserError('--data DIR is required (or --make-data DIR to write a synthetic Zappos-format set)')
    if opts.child:
        impl, mode = opts.child.split(':')
        print(RESULT_TAG + json.dumps(measure(opts, impl, mode)), flush=True)
        return 0
    return run_bench(opts)


if __name__ == '__main__':
    sys.exit(run_script(main))
