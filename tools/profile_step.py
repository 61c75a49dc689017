"""Where a training step's time goes: the step of csnlib/train_loop.py cut into its phases (gathering the batch from
the uint8 cache, to_input, forward, loss, backward, optimizer, the per-step bookkeeping), each timed on the host, then
torch.profiler's per-op self CPU time with each op's FLOPs, for every image size, batch size and AMP setting given.

    python tools/profile_step.py --data data/fonts --image-size 32 64 --batch-size 64 256 --amp bf16 off

On the CPU every op is synchronous, so a phase's wall time is its own. One process, configurations one after another:
on a loaded machine read the shares, not the absolute times. --flags adds main.py flags (e.g. "--no-channels-last",
or "--compile": the model is then torch.compile'd as main.py does it, and the first warm-up step compiles it).
"""
import argparse
import os
import shlex
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: csnlib
from csnlib import conv_wgrad, runtime  # noqa: E402
from csnlib.builder import build_model, place  # noqa: E402
from csnlib.errors import run_script  # noqa: E402
from csnlib.image_cache import ImageStore, build_image_cache  # noqa: E402
from csnlib.loader import to_input  # noqa: E402
from csnlib.options import main_parser, nonneg_int, positive_int  # noqa: E402
from csnlib.train_loop import make_optimizer, stats_dtype, step_generator  # noqa: E402
from triplet_image_loader import TripletBatches, choose_hflip, load_dataset_info, load_triplets  # noqa: E402
from tripletnet import csn_loss, triplet_correct  # noqa: E402

PHASES = ('gather', 'to_input', 'forward', 'loss', 'backward', 'optimizer', 'bookkeeping')


def setup(opts, size, batch, amp):
    """The model, optimizer, store and triplets as main.py builds them for these settings."""
    args = main_parser().parse_args(['--data', opts.data, '--image-size', str(size), '--batch-size', str(batch),
                                     '--amp', amp, '--no-pretrained', '--seed', '1', *shlex.split(opts.flags)])
    rt = runtime.start(args)
    runtime.keep_freed_memory(args, rt.device)
    info = load_dataset_info(args.data)
    model = build_model(args, len(info.notions))
    place(model, args, rt.device, conv_wgrad.dtypes_for(args.conv_wgrad, rt.device))
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], args.lr, rt.device)
    store = ImageStore(info, size, build_image_cache(info, size, args.cache_dir, log=lambda *a, **k: None))
    n = (opts.warmup + 2 * opts.steps) * batch
    trip, cond = load_triplets(info, 'train', list(range(len(info.notions))), n, args.seed, log=lambda *a, **k: None)
    net = torch.compile(model) if args.compile else model  # as main.py trains it
    return args, rt, net, optimizer, TripletBatches(trip, cond, store), choose_hflip(args, info)[0]


def step(args, rt, model, optimizer, batches, hflip, i, times):
    """One step of train_epoch's loop, phase by phase; adds each phase's seconds to times."""
    clock = [time.perf_counter()]

    def lap(name):
        clock.append(time.perf_counter())
        times[name] = times.get(name, 0.0) + clock[-1] - clock[-2]

    B = args.batch_size
    u8, c = batches[list(range(i * B, (i + 1) * B))]  # (3B, S, S, 3) uint8, (B,)
    lap('gather')
    x = to_input(u8, rt.device, args.channels_last, step_generator(args.seed, 1, i, 0) if hflip else None)
    lap('to_input')
    with torch.autocast(rt.device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype is not None):
        d_far, d_close, emb_norm, mask_norm = model(x, c)
    lap('forward')
    loss = csn_loss(d_far, d_close, emb_norm, mask_norm, args.margin, args.embed_loss, args.mask_loss)
    lap('loss')
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    lap('backward')
    optimizer.step()
    lap('optimizer')
    torch.stack([loss.detach() * B, triplet_correct(d_far, d_close).sum(), emb_norm.detach(),
                 mask_norm.detach()]).to(stats_dtype(rt.device))
    lap('bookkeeping')


def profile_one(opts, size, batch, amp):
    args, rt, model, optimizer, batches, hflip = setup(opts, size, batch, amp)
    model.train()
    times = {}
    for i in range(opts.warmup):
        step(args, rt, model, optimizer, batches, hflip, i, {})
    walls, cpu0 = [], time.process_time()
    for i in range(opts.warmup, opts.warmup + opts.steps):
        t0 = time.perf_counter()
        step(args, rt, model, optimizer, batches, hflip, i, times)
        walls.append(time.perf_counter() - t0)
    cpu_ms = (time.process_time() - cpu0) / opts.steps * 1e3
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for i in range(opts.warmup + opts.steps, opts.warmup + 2 * opts.steps):
            step(args, rt, model, optimizer, batches, hflip, i, {})
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total_us = sum(e.self_cpu_time_total for e in ops)
    amp_name = str(rt.amp_dtype).replace('torch.', '') if rt.amp_dtype else 'fp32'
    ms = statistics.median(walls) * 1e3
    share = {k: times[k] / sum(times.values()) for k in PHASES}
    print(f'\n{size} px, batch {batch}, {amp_name}: {ms:.1f} ms/step (median of {opts.steps}), '
          f'{cpu_ms:.0f} CPU ms/step, '
          f'{batch / ms * 1e3:.0f} triplets/s, {batch / cpu_ms * 1e3:.0f} per CPU-second, '
          f'threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}; '
          + ', '.join(f'{k} {100 * v:.1f} %' for k, v in share.items()))
    print(f'  {"op":<44} {"self CPU %":>10} {"calls/step":>10} {"GFLOP/s":>8}')
    for e in ops[:opts.top]:
        gflops = f'{e.flops / e.self_cpu_time_total / 1e3:.0f}' if e.flops and e.self_cpu_time_total else ''
        print(f'  {e.key[:44]:<44} {100 * e.self_cpu_time_total / total_us:>10.1f} {e.count / opts.steps:>10.0f} '
              f'{gflops:>8}')
    flops = sum(e.flops for e in ops if e.flops)
    print(f'  profiled ops: {len(ops)} kinds, {sum(e.count for e in ops) / opts.steps:.0f} calls/step; '
          f'{flops / opts.steps / batch / 1e9:.3f} GFLOP/triplet counted, '
          f'{flops / total_us / 1e3:.0f} GFLOP/s over all self CPU time')
    return {'size': size, 'batch': batch, 'amp': amp_name, 'ms_per_step': ms, 'cpu_ms': cpu_ms, 'share': share}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--data', required=True, metavar='DIR', help='dataset folder in the CSN layout')
    p.add_argument('--image-size', type=positive_int, nargs='+', default=[32, 64], help='image sizes to profile')
    p.add_argument('--batch-size', type=positive_int, nargs='+', default=[64, 256], help='batch sizes to profile')
    p.add_argument('--amp', nargs='+', choices=['bf16', 'off'], default=['bf16', 'off'], help='AMP settings to profile')
    p.add_argument('--steps', type=positive_int, default=5, help='timed steps, then as many profiled steps')
    p.add_argument('--warmup', type=nonneg_int, default=2, help='untimed steps first')
    p.add_argument('--top', type=positive_int, default=12, help='ops listed per configuration')
    p.add_argument('--flags', default='', help='extra main.py flags (default: none, main.py\'s defaults)')
    opts = p.parse_args(argv)
    rows = [profile_one(opts, s, b, a) for s in opts.image_size for b in opts.batch_size for a in opts.amp]
    print(f'\n| size | batch | amp | ms/step | CPU ms/step | {" | ".join(PHASES)} |')
    print('| ---: | ---: | --- | ---: | ---: |' + ' ---: |' * len(PHASES))
    for r in rows:
        print(f'| {r["size"]} | {r["batch"]} | {r["amp"]} | {r["ms_per_step"]:.0f} | {r["cpu_ms"]:.0f} | '
              + ' | '.join(f'{100 * r["share"][k]:.1f} %' for k in PHASES) + ' |')
    return 0


if __name__ == '__main__':
    sys.exit(run_script(main))
