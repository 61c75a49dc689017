"""The training loop: one pass over the training triplets, each step one forward of the stacked (anchor, far, close)
batch, the CSN loss, one optimizer step; losses are checked and summed on the host every --log-interval steps."""
import math

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DistributedSampler
from tqdm import tqdm

from triplet_image_loader import SkipSampler, TripletBatches, make_loader, to_input
from tripletnet import csn_loss, triplet_correct


class NonFiniteLoss(Exception):
    """A step's loss is nan or inf: training stops, the last good checkpoint is kept."""


def train_epoch(model, train_model, optimizer, scaler, data, rt, epoch, start_step=0, partial=None):
    """One pass over the training triplets (from start_step). Returns (sums dict, finished: bool).
    data: (triplets, notions, image store, mirror images at random)."""
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
    sums = dict(partial) if partial else {'loss': 0.0, 'correct': 0, 'n': 0, 'emb_norm': 0.0, 'mask_norm': 0.0, 'steps': 0}
    bar = tqdm(total=n_steps, initial=start_step, desc=f'epoch {epoch} train', disable=not rt.is_main, leave=False,
               dynamic_ncols=True)
    pending = []  # per-step (loss, correct, n, emb_norm, mask_norm) on the device, read every log-interval steps
    step = start_step

    def sync():
        """Read the pending steps (one device sync), check them, and agree with the other processes on stopping."""
        if not pending:
            w = torch.zeros(0, 5, device=device, dtype=torch.float64)
        else:
            w = torch.stack(pending)  # (steps, 5)
        bad = (~torch.isfinite(w[:, 0])).nonzero()
        total = torch.cat([w.sum(0) if len(w) else w.new_zeros(5),
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
        if sums['n']:
            bar.set_postfix(loss=f'{sums["loss"] / sums["n"]:.4f}', acc=f'{sums["correct"] / sums["n"]:.3f}')
        return total[5] > 0

    finished = True
    for u8, c in loader:
        flips = step_generator(args.seed, epoch, step, rank) if hflip else None
        x = to_input(u8, device, args.channels_last, flips)  # (3B, 3, S, S)
        c = c.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype is not None):
            d_far, d_close, emb_norm, mask_norm = train_model(x, c)
        loss = csn_loss(d_far, d_close, emb_norm, mask_norm, args.margin, args.embed_loss, args.mask_loss)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        B = d_far.shape[0]
        pending.append(torch.stack([loss.detach() * B, triplet_correct(d_far, d_close).sum(), torch.tensor(B, device=device),
                                    emb_norm.detach(), mask_norm.detach()]).double())
        step += 1
        bar.update(1)
        # a single process may stop at any step; under torchrun the processes agree at the log-interval syncs
        if step % args.log_interval == 0 or step == n_steps or (world == 1 and stop.requested):
            if sync() and step < n_steps:
                finished = False
                break
    sync()
    bar.close()
    sums['steps'] = step
    return sums, finished


def step_generator(seed, epoch, step, rank):
    """The random flips of one training step depend only on (seed, epoch, step, rank): resuming replays them."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + step) * 1009 + rank)
