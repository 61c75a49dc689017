"""The training loop: one pass over the training triplets, each step one forward of the stacked (anchor, far, close)
batch, the CSN loss, one optimizer step; losses are checked and summed on the host every --log-interval steps, and
nothing else in a step waits for the device."""
import contextlib
import math
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DistributedSampler
from tqdm import tqdm

from csnlib.loader import SkipSampler, make_loader, to_input
from triplet_image_loader import TripletBatches
from tripletnet import csn_loss, triplet_correct


class NonFiniteLoss(Exception):
    """A step's loss is nan or inf: training stops, the last good checkpoint is kept."""


def make_optimizer(params, lr, device):
    """Adam; on CUDA and the CPU the fused kernel, one call per tensor instead of about ten small ops (on CUDA it also
    takes the grad scaler's inf check on the device: the unfused step under a grad scaler reads it on the host every
    step). The same update to float rounding; a checkpoint keeps the setting it was trained with."""
    return torch.optim.Adam(params, lr=lr, fused=True) if torch.device(device).type in ('cuda', 'cpu') else \
        torch.optim.Adam(params, lr=lr)


def stats_dtype(device):
    """The dtype of the per-step sums: float64, but float32 on MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == 'mps' else torch.float64


@contextlib.contextmanager
def host_read(device):
    """The log-interval read: the one place a step may wait for the device (lifts torch.cuda.set_sync_debug_mode,
    which bench.py --gpu-check sets around training steps to catch any other wait)."""
    if torch.device(device).type != 'cuda':
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def progress_on_terminal():
    """tqdm's bar on a terminal; plain lines every --log-interval steps when output goes to a file (a log stays
    readable and grep-able)."""
    return sys.stderr.isatty()


def train_epoch(model, train_model, optimizer, scaler, data, rt, epoch, start_step=0, partial=None, on_step=None):
    """One pass over the training triplets (from start_step). Returns (sums dict, finished: bool).
    data: (triplets, notions, image store, mirror images at random). on_step(step): called after each step (bench.py
    starts its clock there)."""
    triplets, conds, store, hflip = data
    args, device, rank, world, stop = rt.args, rt.device, rt.rank, rt.world, rt.stop
    model.train()
    local_bs = args.batch_size // world
    sampler = DistributedSampler(range(len(triplets)), num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    loader = make_loader(TripletBatches(triplets, conds, store),
                         BatchSampler(SkipSampler(sampler, start_step * local_bs), local_bs, drop_last=False),
                         rt.workers, device)
    n_steps = math.ceil(len(sampler) / local_bs)
    sums = dict(partial) if partial else {'loss': 0.0, 'correct': 0, 'n': 0, 'emb_norm': 0.0, 'mask_norm': 0.0,
                                          'steps': 0}
    terminal = progress_on_terminal()
    bar = tqdm(total=n_steps, initial=start_step, desc=f'epoch {epoch} train', disable=not rt.is_main or not terminal,
               leave=False, dynamic_ncols=True)
    dtype = stats_dtype(device)
    pending = []  # per-step (loss * B, correct, emb_norm, mask_norm) on the device, read every log-interval steps
    counts = []   # the steps' batch sizes B, on the host
    step, n_start, t_start = start_step, sums['n'], time.perf_counter()

    def sync():
        """Read the pending steps (one device sync), check them, and agree with the other processes on stopping."""
        with host_read(device):
            return read_pending()

    def read_pending():
        if not pending:
            w = torch.zeros(0, 4, device=device, dtype=dtype)
        else:
            w = torch.stack(pending)  # (steps, 4)
        bad = (~torch.isfinite(w[:, 0])).nonzero()
        s4 = w.sum(0) if len(w) else w.new_zeros(4)
        total = torch.cat([s4[:2], w.new_tensor([float(sum(counts))]), s4[2:],
                           w.new_tensor([float(stop.requested), float(bad[0, 0]) + 1 if len(bad) else 0.0])])
        if world > 1:
            dist.all_reduce(total)
        total = total.tolist()
        if len(bad) or not math.isfinite(total[0]):
            first = step - len(pending) + (int(bad[0, 0]) + 1 if len(bad) else 1)
            raise NonFiniteLoss(f'non-finite loss at epoch {epoch}, step {first} of {n_steps}')
        for k, v in zip(('loss', 'correct', 'n', 'emb_norm', 'mask_norm'), total[:5]):
            sums[k] += int(v) if k in ('correct', 'n') else v
        sums['steps'] = step
        pending.clear()
        counts.clear()
        if sums['n'] and terminal:
            bar.set_postfix(loss=f'{sums["loss"] / sums["n"]:.4f}', acc=f'{sums["correct"] / sums["n"]:.3f}')
        elif sums['n'] and step > start_step:
            rate = (sums['n'] - n_start) / max(time.perf_counter() - t_start, 1e-9)
            rt.log(f'epoch {epoch} step {step}/{n_steps}  loss {sums["loss"] / sums["n"]:.4f}  '
                   f'acc {sums["correct"] / sums["n"]:.3f}  {rate:.0f} triplets/s', flush=True)
        return total[5] > 0

    # the weights of the norm terms: ASEN's loss is the ranking loss alone (unit embeddings, no masks)
    norm_weights = (args.embed_loss, args.mask_loss) if getattr(model.embednet, 'norm_penalties', True) else (0.0, 0.0)
    finished = True
    for u8, c in loader:
        flips = step_generator(args.seed, epoch, step, rank) if hflip else None
        x = to_input(u8, device, args.channels_last, flips)  # (3B, 3, S, S)
        c = c.to(device, non_blocking=True)
        net = step_model(train_model, c.shape[0], local_bs)
        with torch.autocast(device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype is not None):
            d_far, d_close, emb_norm, mask_norm = net(x, c)
        loss = csn_loss(d_far, d_close, emb_norm, mask_norm, args.margin, *norm_weights)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        B = d_far.shape[0]
        pending.append(torch.stack([loss.detach() * B, triplet_correct(d_far, d_close).sum(),
                                    emb_norm.detach(), mask_norm.detach()]).to(dtype))
        counts.append(B)
        step += 1
        bar.update(1)
        if on_step is not None:
            on_step(step)
        # a single process may stop at any step; under torchrun the processes agree at the log-interval syncs
        if step % args.log_interval == 0 or step == n_steps or (world == 1 and stop.requested):
            if sync() and step < n_steps:
                finished = False
                break
    if pending:
        sync()
    bar.close()
    sums['steps'] = step
    return sums, finished


def step_model(train_model, batch, full_batch):
    """The model a step calls: train_model; for an epoch's last, smaller batch of a torch.compile'd model its eager
    module (DDP-wrapped if train_model is), the same arithmetic to float rounding. A new batch shape would compile the
    whole graph again, which takes as long as the first compile (minutes on a small CPU), for one step."""
    return getattr(train_model, '_orig_mod', train_model) if batch != full_batch else train_model


def step_generator(seed, epoch, step, rank):
    """The random flips of one training step depend only on (seed, epoch, step, rank): resuming replays them."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + step) * 1009 + rank)
