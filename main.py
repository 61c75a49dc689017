"""Train and evaluate Conditional Similarity Networks (Veit, Belongie, Karaletsos, CVPR 2017) and the paper's baselines.

    python main.py --data data --name csn_learned --learned --num_traintriplets 200000
    python main.py --test --resume runs/csn_learned/model_best.pth.tar
    torchrun --nproc_per_node 4 main.py ...      (DistributedDataParallel; see the README)
"""
import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import random
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from csn import ConditionalSimNet, TaskSpecificNets, TripletEmbedNet
from Resnet_18 import EmbeddingNet
from triplet_image_loader import (DataError, ImageBatches, ImageStore, TripletBatches, build_image_cache,
                                  check_triplet_file, format_problems, load_dataset_info, load_image, load_triplets,
                                  parse_conditions)
from tripletnet import TripletNet, csn_loss, triplet_correct

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# flags that fix the model's shape: taken from a checkpoint, and must match it when given on the command line
MODEL_FLAGS = ('model', 'dim_embed', 'learned', 'prein')


class UserError(Exception):
    """A problem with the command line, the files or the environment; printed as one clear message."""


def build_parser():
    p = argparse.ArgumentParser(
        description='Conditional Similarity Networks: train (default) or --test. Flags of the original release keep '
                    'their meaning; underscores and hyphens are interchangeable (--embed_loss = --embed-loss).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    g = p.add_argument_group('training (flags of the original release)')
    a = g.add_argument
    a('--batch-size', '--batch_size', type=int, default=256,
      help='global batch size in triplets; under torchrun each of the N processes takes batch-size/N of it, so runs '
           'with any number of processes are comparable')
    a('--epochs', type=int, default=200, help='number of epochs to train')
    a('--start_epoch', '--start-epoch', type=int, default=1, help='epoch number to start from (a --resume overrides it)')
    a('--lr', type=float, default=5e-5, help='Adam learning rate; epoch e uses lr * 0.985^e')
    a('--seed', type=int, default=1, help='random seed (subsets, shuffling, flips, initialisation)')
    a('--no-cuda', '--no_cuda', action='store_true', default=False, help='use the CPU even when CUDA is available')
    a('--log-interval', '--log_interval', type=int, default=20, help='batches between progress-bar updates of loss and accuracy')
    a('--margin', type=float, default=0.2, help='margin of the ranking loss')
    a('--resume', default='', metavar='PATH',
      help='checkpoint to continue from. Restores the model, optimizer, grad scaler, epoch and step, best accuracy, '
           'args and RNG states, so the run goes on exactly where it stopped (also mid-epoch after Ctrl-C). '
           'With --test: the checkpoint to evaluate. "auto": RUNS/NAME/checkpoint.pth.tar if it exists, else start the '
           'run (with --test: RUNS/NAME/model_best.pth.tar), so the same command line starts, continues or finishes a run')
    a('--name', default='Conditional_Similarity_Network', help='name of the run: files go to RUNS/NAME')
    a('--embed_loss', '--embed-loss', type=float, default=5e-3, help='weight of the embedding L2 norm')
    a('--mask_loss', '--mask-loss', type=float, default=5e-4, help='weight of the mask L1 norm')
    a('--num_traintriplets', '--num-traintriplets', type=int, default=100000,
      help='training triplets in total over all the dataset\'s notions: each selected notion contributes N / (number of notions)')
    a('--dim_embed', '--dim-embed', type=int, default=64, help='embedding dimensions')
    a('--test', action='store_true', default=False, help='evaluate --resume on the test split and exit')
    a('--learned', action='store_true', default=False, help='learn the masks, from a random N(0.9, 0.7) start')
    a('--prein', action='store_true', default=False, help='learn the masks, from the disjoint blocks (0.1 elsewhere)')
    a('--visdom', action='store_true', default=False, help='plot to a visdom server (python -m visdom.server)')
    a('--conditions', nargs='*', default=None, metavar='NOTION',
      help='notions to use, by index or name (e.g. 0 1 or class heel); default: all of the dataset\'s')
    g = p.add_argument_group('data and model')
    a = g.add_argument
    a('--data', default='data', metavar='DIR', help='dataset folder (filenames.json, images, tripletlists/)')
    a('--model', choices=['csn', 'triplet', 'task'], default='csn',
      help='csn = Conditional Similarity Network; triplet = standard triplet network (no masks); '
           'task = a set of task-specific triplet networks (one per notion)')
    a('--no-pretrained', '--no_pretrained', action='store_true', default=False,
      help='start the backbone from random weights instead of ImageNet')
    a('--weights', default='', metavar='FILE', help='ImageNet weights: a torchvision resnet18 state dict file '
                                                     '(default: torch\'s cache, downloading if online)')
    a('--num_valtriplets', '--num-valtriplets', type=int, default=80000, help='validation triplets in total (as --num_traintriplets)')
    a('--num_testtriplets', '--num-testtriplets', type=int, default=160000, help='test triplets in total (as --num_traintriplets)')
    a('--image-size', '--image_size', type=int, default=112, help='images are resized and centre-cropped to this size')
    a('--hflip', choices=['auto', 'on', 'off'], default='auto',
      help='random horizontal mirroring of training images: auto = what the dataset says ("hflip" in its dataset.json; '
           'on when absent, as for Zappos; fonts are never mirrored: a mirrored b is a d)')
    a('--runs', default='runs', metavar='DIR', help='folder for the runs\' files')
    a('--check-data', '--check_data', action='store_true', default=False,
      help='check the dataset (triplet lines, indices, duplicates, images) and exit')
    a('--skip-bad-triplets', '--skip_bad_triplets', action='store_true', default=False,
      help='leave out bad triplet lines (reported) instead of refusing to start')
    a('--export-embeddings', '--export_embeddings', action='store_true', default=False,
      help='with --test: also write the embeddings of every image (embeddings.npy, masks.npy, images.txt) next to the checkpoint')
    a('--pictures', action=argparse.BooleanOptionalAction, default=True,
      help='with --test: write masks.png, t-SNE maps and retrieval grids per notion next to test_results.json')
    g = p.add_argument_group('speed')
    a = g.add_argument
    a('--device', choices=['auto', 'cpu', 'cuda', 'mps'], default='auto', help='auto = CUDA, then MPS, then CPU')
    a('--workers', type=int, default=None,
      help='DataLoader worker processes (default: 0 on the CPU with the image cache, else min(8, cores))')
    a('--amp', choices=['auto', 'off', 'bf16', 'fp16'], default='auto',
      help='mixed precision: auto = bf16 on CUDA and on CPUs with bf16 support, fp16 with a grad scaler on older GPUs')
    a('--channels-last', '--channels_last', dest='channels_last', action='store_true', default=True,
      help='channels_last memory format')
    a('--no-channels-last', '--no_channels_last', dest='channels_last', action='store_false', help='plain NCHW memory format')
    a('--three-forwards', '--three_forwards', action='store_true', default=False,
      help='embed anchors, fars and closes in three backbone calls, as the original did, instead of one (slower; '
           'BatchNorm then normalises each role on its own; for comparisons)')
    a('--compile', action='store_true', default=False, help='torch.compile the model')
    a('--keep-memory', '--keep_memory', action=argparse.BooleanOptionalAction, default=True,
      help='on the CPU (glibc): keep freed memory in the process for the next step instead of handing each large '
           'block back to the system, which costs a page fault per 4 KiB when it is used again; faster, and the '
           'resident memory stays at its peak')
    a('--cache', dest='cache', action='store_true', default=True,
      help='decode, resize and crop every image once into a uint8 file memory-mapped from --cache-dir')
    a('--no-cache', '--no_cache', dest='cache', action='store_false', help='decode images with PIL at every use')
    a('--cache-dir', '--cache_dir', default=None, metavar='DIR', help='where the image cache goes (default: DATA/cache)')
    a('--dist-timeout', '--dist_timeout', type=float, default=600,
      help='seconds a torchrun process waits for the others before failing the job')
    g = p.add_argument_group('live plots')
    a = g.add_argument
    a('--visdom-server', '--visdom_server', default='http://localhost', help='visdom server address')
    a('--visdom-port', '--visdom_port', type=int, default=8097, help='visdom server port')
    a('--visdom-env', '--visdom_env', default=None, help='visdom environment (default: the run\'s --name)')
    a('--tensorboard', action='store_true', default=False, help='write TensorBoard logs under RUNS/NAME/tensorboard')
    return p


def explicit_flags(parser, argv):
    """dests of the flags given on the command line (to tell 'left at default' from 'asked for')."""
    out = set()
    for tok in argv:
        if tok.startswith('--'):
            action = parser._option_string_actions.get(tok.split('=', 1)[0])
            if action is not None:
                out.add(action.dest)
    return out


# --------------------------------------------------------------------------------------------------- environment

def setup_distributed(args):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on CUDA, Gloo on the CPU."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank, local_rank = int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0'))
    if world > 1:
        use_cuda = args.device in ('auto', 'cuda') and not args.no_cuda and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group('nccl' if use_cuda else 'gloo',
                                timeout=datetime.timedelta(seconds=args.dist_timeout))
        if args.batch_size % world:
            raise UserError(f'--batch-size {args.batch_size} does not split evenly over {world} processes')
    return rank, world, local_rank


def choose_device(args, local_rank):
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


def cpu_has_bf16():
    try:
        with open('/proc/cpuinfo') as f:
            flags = f.read()
        return 'avx512_bf16' in flags or 'amx_bf16' in flags
    except OSError:
        return False


def choose_amp(args, device):
    """(autocast dtype or None, use a grad scaler)."""
    if args.amp == 'off' or device.type == 'mps':
        return None, False
    if device.type == 'cuda':
        if args.amp == 'fp16' or (args.amp == 'auto' and not torch.cuda.is_bf16_supported()):
            return torch.float16, True
        return torch.bfloat16, False
    if args.amp == 'fp16':
        raise UserError('--amp fp16 needs a CUDA device; use --amp bf16 or off on the CPU')
    if args.amp == 'auto' and not cpu_has_bf16():
        return None, False
    return torch.bfloat16, False


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


def choose_hflip(args, info):
    """(mirror training images?, why) from --hflip and the dataset's own say."""
    if args.hflip != 'auto':
        return args.hflip == 'on', f'--hflip {args.hflip}'
    has_meta = os.path.exists(os.path.join(info.root, 'dataset.json'))
    return info.hflip, ('dataset.json' if has_meta and 'hflip' in info.extra else 'default for a dataset without "hflip"')


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


# --------------------------------------------------------------------------------------------------------- model

def load_imagenet_weights(args):
    """A torchvision resnet18 state dict from --weights, or torch's cache/download; never a silent fallback."""
    remedy = ('pass --weights FILE (a torchvision resnet18 state dict, e.g. resnet18-f37072fd.pth fetched on a machine '
              'with internet) or --no-pretrained to start from random weights')
    if args.weights:
        if not os.path.exists(args.weights):
            raise UserError(f'--weights {args.weights}: file not found')
        try:
            sd = torch.load(args.weights, map_location='cpu', weights_only=True)
        except Exception as e:
            raise UserError(f'--weights {args.weights}: cannot load it as a state dict ({e})') from None
        return sd.get('state_dict', sd) if isinstance(sd, dict) else sd
    from torchvision.models import ResNet18_Weights
    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception as e:
        raise UserError(f'cannot get the ImageNet weights of resnet18 ({type(e).__name__}: {e}); {remedy}') from None


def build_model(args, n_notions):
    state = None if args.no_pretrained else load_imagenet_weights(args)

    def backbone():
        net = EmbeddingNet(args.dim_embed)
        if state is not None:
            try:
                net.load_backbone(state)
            except (KeyError, RuntimeError) as e:
                raise UserError(f'--weights {args.weights or "(ImageNet)"}: {e}') from None
        return net

    if args.model == 'csn':
        mask_type = 'prein' if args.prein else 'learned' if args.learned else 'fixed'
        if args.dim_embed < n_notions:
            raise UserError(f'--dim_embed {args.dim_embed} is smaller than the number of notions ({n_notions})')
        net = ConditionalSimNet(backbone(), n_notions, args.dim_embed, mask_type)
    elif args.model == 'triplet':
        net = TripletEmbedNet(backbone())
    else:
        net = TaskSpecificNets([backbone() for _ in range(n_notions)])
    return TripletNet(net, three_forwards=getattr(args, 'three_forwards', False))


def to_input(u8, device, channels_last, flip_gen=None):
    """uint8 images (N, S, S, 3) -> normalised float (N, 3, S, S) on the device; random horizontal flips if flip_gen."""
    x = u8.to(device, non_blocking=True).permute(0, 3, 1, 2)  # (N, 3, S, S), channels_last strides
    x = x.float() if channels_last else x.contiguous().float()
    if flip_gen is not None:
        flip = (torch.rand(x.shape[0], generator=flip_gen) < 0.5).to(device, non_blocking=True)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


# ----------------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def embed_images(model, images, store, args, device, amp_dtype, c=None, rank=0, world=1):
    """Embed each given image once (no flip): raw embeddings (len(images), D), float32, on the device.
    Under torchrun each process embeds a share and the shares are gathered."""
    images = np.asarray(images)
    batches = [np.arange(s, min(s + args.eval_batch_size, len(images))) for s in range(0, len(images), args.eval_batch_size)]
    mine = batches[rank::world]  # whole batches per process: each image is embedded in the same batch as in one process
    loader = make_loader(ImageBatches(images, store), [b.tolist() for b in mine], args, device)
    out = []
    for u8 in loader:
        x = to_input(u8, device, args.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out.append(model.embednet.embed(x, c).float())  # (b, D)
    if world > 1:
        # every process gets every batch back; batch i came from process i % world
        gathered = [None] * world
        dist.all_gather_object(gathered, [o.cpu() for o in out])
        out = [gathered[i % world][i // world].to(device) for i in range(len(batches))]
    emb = torch.cat(out) if out else torch.zeros(0, args.dim_embed, device=device)  # (len(images), D)
    return emb


@torch.no_grad()
def evaluate(model, triplets, conds, store, args, device, amp_dtype, notions, rank=0, world=1, desc='val',
             embeddings=None):
    """Embed each distinct image of the split once, then score every triplet from those embeddings.
    Returns {'accuracy', 'loss' (ranking loss only), 'per_notion' {name: acc}, 'triplets'}. embeddings: a dict to
    fill with {notion or None (one embedding for all): (sorted image indices, their raw embeddings (U, D))}."""
    model.eval()
    net = model.embednet
    correct = torch.zeros(len(triplets), dtype=torch.bool, device=device)
    losses = torch.zeros(len(triplets), device=device)
    groups = [(c, conds == c) for c in np.unique(conds)] if net.per_notion_backbone else [(None, np.ones(len(conds), bool))]
    for c, sel in groups:
        images = np.unique(triplets[sel])
        emb = embed_images(model, images, store, args, device, amp_dtype, c=None if c is None else int(c),
                           rank=rank, world=world)  # (U, D)
        if embeddings is not None:
            embeddings[c] = (images, emb)
        pos = torch.from_numpy(np.searchsorted(images, triplets[sel])).to(device)  # (M, 3) rows of emb
        cond = torch.from_numpy(conds[sel]).to(device)
        for start in range(0, len(pos), 65536):
            p, cc = pos[start:start + 65536], cond[start:start + 65536]
            ea, ef, ec = (net.apply_mask(emb[p[:, k]], cc)[0] for k in range(3))
            d_far = torch.nn.functional.pairwise_distance(ea, ef, 2)
            d_close = torch.nn.functional.pairwise_distance(ea, ec, 2)
            idx = torch.from_numpy(np.flatnonzero(sel)[start:start + 65536]).to(device)
            correct[idx] = triplet_correct(d_far, d_close)
            losses[idx] = torch.clamp(args.margin - (d_far - d_close), min=0)
    correct, losses = correct.cpu().numpy(), losses.cpu().numpy()
    per = {notions[c]: float(correct[conds == c].mean()) for c in np.unique(conds)}
    return {'accuracy': float(correct.mean()), 'loss': float(losses.mean()), 'per_notion': per, 'triplets': int(len(triplets))}


# ------------------------------------------------------------------------------------------------------ training

class SkipSampler(Sampler):
    """The first `skip` indices of a sampler left out: resuming mid-epoch continues the same order."""

    def __init__(self, sampler, skip=0):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        return it

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


def make_loader(dataset, batch_sampler, args, device):
    """Batches from the dataset; a worker process that dies is reported with the image it was reading."""
    workers = args.workers
    store = dataset.store
    if workers > 0 and store.tracker is None:
        from triplet_image_loader import ReadTracker
        store.tracker = ReadTracker(workers)
    loader = DataLoader(dataset, sampler=batch_sampler, batch_size=None, num_workers=workers,
                        pin_memory=device.type == 'cuda', prefetch_factor=4 if workers > 0 else None)
    try:
        yield from loader
    except RuntimeError as e:
        if 'DataLoader worker' not in str(e) or store.tracker is None:
            raise
        paths = [store.info.image_path(i) for i in store.tracker.reading()]
        raise UserError(f'a DataLoader worker died ({str(e).splitlines()[0]}) while reading '
                        f'{", ".join(paths) or "no image"}. Check that image, or run with --workers 0 to see the '
                        f'error in the main process') from None


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


class NonFiniteLoss(Exception):
    pass


def train_epoch(model, train_model, optimizer, scaler, data, args, device, amp_dtype, epoch, start_step, partial,
                stop, rank, world, is_main):
    """One pass over the training triplets (from start_step). Returns (sums dict, finished: bool).
    data: (triplets, notions, image store, mirror images at random)."""
    triplets, conds, store, hflip = data
    model.train()
    local_bs = args.batch_size // world
    sampler = DistributedSampler(range(len(triplets)), num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    loader = make_loader(TripletBatches(triplets, conds, store),
                         BatchSampler(SkipSampler(sampler, start_step * local_bs), local_bs, drop_last=False),
                         args, device)
    n_steps = math.ceil(len(sampler) / local_bs)
    sums = dict(partial) if partial else {'loss': 0.0, 'correct': 0, 'n': 0, 'emb_norm': 0.0, 'mask_norm': 0.0, 'steps': 0}
    bar = tqdm(total=n_steps, initial=start_step, desc=f'epoch {epoch} train', disable=not is_main, leave=False,
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
        sums['loss'] += total[0]; sums['correct'] += int(total[1]); sums['n'] += int(total[2])
        sums['emb_norm'] += total[3]; sums['mask_norm'] += total[4]; sums['steps'] = step
        pending.clear()
        if sums['n']:
            bar.set_postfix(loss=f'{sums["loss"] / sums["n"]:.4f}', acc=f'{sums["correct"] / sums["n"]:.3f}')
        return total[5] > 0

    finished = True
    for u8, c in loader:
        flips = step_generator(args.seed, epoch, step, rank) if hflip else None
        x = to_input(u8, device, args.channels_last, flips)  # (3B, 3, S, S)
        anchor, far, close = x.chunk(3)
        c = c.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            d_far, d_close, emb_norm, mask_norm = train_model(anchor, far, close, c)
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


def save_checkpoint(state, path):
    """Write to a temporary file in the same folder, then rename: a checkpoint file is always whole."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass
        raise UserError(f'cannot write checkpoint {path}: {e.strerror or e}. The previous checkpoint is intact; '
                        f'free space or fix the folder\'s permissions, then --resume it') from None


def load_checkpoint(path):
    if not os.path.exists(path):
        raise UserError(f'--resume {path}: no such checkpoint file')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0][:300]
        raise UserError(f'--resume {path}: refused to load it ({type(e).__name__}: {msg}). Checkpoints are loaded with '
                        f'weights_only=True, so files holding arbitrary Python objects are not executed.') from None


def merge_checkpoint_args(args, ckpt, explicit, path):
    """Rebuild args from the checkpoint's, keeping flags given on the command line; model flags must match."""
    stored = ckpt.get('args')
    if not isinstance(stored, dict) or 'state_dict' not in ckpt:
        raise UserError(f'--resume {path}: not a checkpoint of this code (no args/state_dict in it)')
    for k in MODEL_FLAGS:
        if k in explicit and k in stored and getattr(args, k) != stored[k]:
            raise UserError(f'--resume {path}: the checkpoint is a {describe(stored)} model, but the command line asks '
                            f'for --{k.replace("_", "-")} {getattr(args, k)}; drop the flag or use a matching checkpoint')
    keep = ('resume', 'test', 'export_embeddings', 'pictures', 'check_data', 'workers', 'eval_batch_size')  # this call's, not the run's
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in stored.items()
                                                  if k not in explicit and k in vars(args) and k not in keep}})


def describe(a):
    a = a if isinstance(a, dict) else vars(a)
    if a['model'] != 'csn':
        return f'--model {a["model"]}, {a["dim_embed"]}-d'
    return f'CSN ({"prein" if a.get("prein") else "learned" if a.get("learned") else "fixed"} masks), {a["dim_embed"]}-d'


def make_store(info, args, is_main, world, log):
    if not args.cache:
        from triplet_image_loader import missing_images
        missing = missing_images(info)
        if missing:
            raise DataError(f'{len(missing)} image(s) listed in {os.path.join(info.root, "filenames.json")} are missing, '
                            f'e.g. {missing[:3]}')
        return ImageStore(info, args.image_size)
    # the first process of each machine builds the cache (a shared folder is built once: the others find it done)
    local_main = int(os.environ.get('LOCAL_RANK', '0')) == 0
    quiet = (lambda *a, **k: None)
    path = build_image_cache(info, args.image_size, args.cache_dir, log=log if is_main else quiet) if local_main else None
    if world > 1:
        dist.barrier()
        if not local_main:
            path = build_image_cache(info, args.image_size, args.cache_dir, log=quiet)
    return ImageStore(info, args.image_size, path)


def check_data(info, conditions, args):
    """--check-data: every problem in the triplet files and images, with file and line; exit status 1 if any."""
    problems, used = [], set()
    for c in conditions:
        for split in ('train', 'val', 'test'):
            path = info.triplet_file(info.notions[c], split)
            if not os.path.exists(path):
                problems.append((path, 0, 'file not found'))
                continue
            t, _, bad = check_triplet_file(path, len(info.filenames))
            problems += bad
            used.update(np.unique(t).tolist())
            print(f'{path}: {len(t)} good triplets, {len(bad)} bad lines')
    names = os.path.join(info.root, 'filenames.json')
    for i in tqdm(sorted(used), desc='reading images', leave=False):
        try:
            load_image(info.image_path(i), 8)
        except DataError as e:
            problems.append((names, i + 1, str(e)))
    if problems:
        print(format_problems(problems, limit=len(problems)))
    print(f'{len(problems)} problem(s) found in {info.root} ({len(used)} images checked)')
    return 1 if problems else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args, explicit_flags(parser, argv))
    except (UserError, DataError) as e:
        msg = str(e)
        if 'Original Traceback' in msg:  # raised in a DataLoader worker: keep the message, not the worker's traceback
            msg = msg.strip().splitlines()[-1].split(': ', 1)[-1]
        print(f'error: {msg}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted; the last checkpoint is kept', file=sys.stderr)
        return 130
    except NonFiniteLoss as e:
        print(f'error: {e}. Training stopped; the last good checkpoint is kept. Try a lower --lr or --amp off.',
              file=sys.stderr)
        return 3
    except RuntimeError as e:
        if not (dist.is_initialized() and lost_peer(e)):
            raise
        print(f'error: rank {dist.get_rank()}: lost contact with the other processes ({str(e).strip().splitlines()[-1][:200]}): '
              f'one of them died or hung for longer than --dist-timeout {args.dist_timeout:g} s. The job stops; the '
              f'last checkpoint is kept, continue with --resume {os.path.join(args.runs, args.name, "checkpoint.pth.tar")}',
              file=sys.stderr)
        return 4
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def lost_peer(e):
    """Whether a collective failed because another process is gone or stuck (Gloo/NCCL timeouts, closed sockets)."""
    text = str(e).lower()
    return isinstance(e, getattr(dist, 'DistError', ())) or any(
        w in text for w in ('timed out', 'timeout', 'connection closed', 'connection reset', 'broken pipe', 'nccl'))


def run(args, explicit):
    if args.learned and args.prein:
        raise UserError('--learned and --prein are two different mask starts: pass one of them')
    if (args.learned or args.prein) and args.model != 'csn':
        raise UserError(f'--learned/--prein are CSN mask options; --model {args.model} has no masks')
    ckpt = None
    if args.resume == 'auto':
        found = os.path.join(run_dir_for(args), 'model_best.pth.tar' if args.test else 'checkpoint.pth.tar')
        if not os.path.exists(found) and args.test:
            raise UserError(f'--test --resume auto: there is no {found} (train the run --name {args.name} first, or '
                            f'give --resume PATH)')
        args.resume = found if os.path.exists(found) else ''
        if not args.resume and int(os.environ.get('RANK', 0)) == 0:
            print(f'--resume auto: no {found} yet, starting the run')
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        args = merge_checkpoint_args(args, ckpt, explicit, args.resume)
    elif args.test:
        raise UserError('--test needs --resume CHECKPOINT (e.g. runs/NAME/model_best.pth.tar)')

    rank, world, local_rank = setup_distributed(args)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    device = choose_device(args, local_rank)
    amp_dtype, use_scaler = choose_amp(args, device)
    malloc = keep_freed_memory(args, device)
    if args.workers is None:
        args.workers = 0 if (args.cache and device.type == 'cpu') else min(8, len(os.sched_getaffinity(0)))
    args.eval_batch_size = max(args.batch_size, 256)
    seed_everything(args.seed)

    info = load_dataset_info(args.data)
    conditions = parse_conditions(args.conditions, info.notions)
    if ckpt is not None and ckpt.get('notions') and ckpt['notions'] != info.notions:
        raise UserError(f'--resume {args.resume}: the checkpoint was trained on notions {ckpt["notions"]}, but '
                        f'{args.data} has {info.notions}')
    if args.check_data:
        return check_data(info, conditions, args) if is_main else 0

    hflip = choose_hflip(args, info)
    flip_note = '' if args.test else f', hflip {"on" if hflip[0] else "off"} ({hflip[1]})'
    log(f'device {device}{f" x{world} processes" if world > 1 else ""}, amp {amp_dtype and str(amp_dtype).replace("torch.", "") or "off"}'
        f'{" + grad scaler" if use_scaler else ""}, channels_last {args.channels_last}, compile {args.compile}, '
        f'image cache {"on" if args.cache else "off"}, workers {args.workers}'
        f'{f", malloc {malloc}" if device.type == "cpu" else ""}'
        f'{flip_note}')
    model = build_model(argparse.Namespace(**{**vars(args), 'no_pretrained': args.no_pretrained or ckpt is not None}),
                        len(info.notions))
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt['state_dict'])
        except RuntimeError as e:
            raise UserError(f'--resume {args.resume}: does not match a {describe(args)} model: {str(e).splitlines()[0]}') from None
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    if args.test:
        out_dir = run_dir_for(args) if 'name' in explicit else os.path.dirname(os.path.abspath(args.resume))
        return test(model, ckpt, info, conditions, args, device, amp_dtype, rank, world, is_main, log, out_dir)
    return train(model, ckpt, info, conditions, args, device, amp_dtype, use_scaler, rank, world, is_main, log,
                 hflip[0])


def run_dir_for(args):
    return os.path.join(args.runs, args.name)


def test(model, ckpt, info, conditions, args, device, amp_dtype, rank, world, is_main, log, out_dir):
    trip, cond = load_triplets(info, 'test', conditions, args.num_testtriplets, args.seed, args.skip_bad_triplets, log)
    store = make_store(info, args, is_main, world, log)
    t0 = time.time()
    embedded = {}
    res = evaluate(model, trip, cond, store, args, device, amp_dtype, info.notions, rank, world, desc='test',
                   embeddings=embedded)
    if not is_main:
        return 0
    res['checkpoint'] = args.resume
    res['epoch'] = ckpt.get('epoch')
    res['model'] = describe(args)
    res['seconds'] = round(time.time() - t0, 2)
    log(f'\ntest results of {args.resume} ({describe(args)}, {res["triplets"]} triplets, {res["seconds"]} s)')
    log(f'  {"notion":<12} accuracy')
    for n, acc in res['per_notion'].items():
        log(f'  {n:<12} {acc * 100:6.2f} %')
    log(f'  {"overall":<12} {res["accuracy"] * 100:6.2f} %')
    os.makedirs(out_dir, exist_ok=True)
    retrieval_and_pictures(res, model, info, trip, store, args, device, amp_dtype, log, out_dir, embedded)
    path = os.path.join(out_dir, 'test_results.json')
    with open(path, 'w') as f:
        json.dump(res, f, indent=2)
    log(f'wrote {path}')
    return 0


def retrieval_and_pictures(res, model, info, trip, store, args, device, amp_dtype, log, out_dir, embedded=None):
    """After --test: retrieval mAP per notion over the test images (datasets with labels), the pictures, and with
    --export-embeddings every image's embedding next to the checkpoint. Adds the mAP to res. embedded: what evaluate
    embedded ({None or notion: (image indices, raw embeddings)}), so those images are not embedded again."""
    import retrieve
    from triplet_image_loader import read_labels
    labels = read_labels(info)
    images = np.unique(trip)                                              # the test triplets' images
    emb = None
    if labels or args.pictures:
        emb = retrieve.embed_dataset(model, images, store, args, device, amp_dtype, len(info.notions), embedded)
    if labels:
        r = retrieve.retrieval_map(model, info, images, labels, args, device, amp_dtype, store, emb)
        res['mAP'], res['mAP_per_notion'] = r['mAP'], r['per_notion']
        log(f'  retrieval mAP over {len(images)} test images: '
            + ' '.join(f'{n} {v * 100:.1f}' for n, v in r['per_notion'].items() if v is not None)
            + f'  overall {r["mAP"] * 100:.2f} %')
    else:
        log(f'  no retrieval mAP: {info.root} has no labels.csv (the paper\'s Zappos triplets come without labels)')
    if args.pictures:
        retrieve.write_pictures(model, info, store, labels, args, device, amp_dtype, out_dir, images=images, emb=emb,
                                log=log)
    if args.export_embeddings:
        retrieve.export_embeddings(model, info, args, device, amp_dtype, os.path.dirname(os.path.abspath(args.resume)),
                                   store, log)


def train(model, ckpt, info, conditions, args, device, amp_dtype, use_scaler, rank, world, is_main, log, hflip):
    run_dir = run_dir_for(args)
    ckpt_path, best_path = os.path.join(run_dir, 'checkpoint.pth.tar'), os.path.join(run_dir, 'model_best.pth.tar')
    if ckpt is None and os.path.exists(ckpt_path):
        raise UserError(f'{run_dir} already holds a run; continue it with --resume {ckpt_path} (or --resume auto), '
                        f'or choose another --name')
    if ckpt is not None and is_main and os.path.isdir(run_dir):
        for f in os.listdir(run_dir):  # temporary files of checkpoint writes that a kill interrupted
            if '.pth.tar.tmp' in f:
                os.remove(os.path.join(run_dir, f))
    train_t, train_c = load_triplets(info, 'train', conditions, args.num_traintriplets, args.seed, args.skip_bad_triplets, log)
    val_t, val_c = load_triplets(info, 'val', conditions, args.num_valtriplets, args.seed, args.skip_bad_triplets, log)
    store = make_store(info, args, is_main, world, log)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    next_epoch, next_step, best_acc, best_epoch, partial = args.start_epoch, 0, 0.0, 0, None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
        next_epoch, next_step = ckpt['next_epoch'], ckpt['next_step']
        best_acc, best_epoch, partial = ckpt['best_acc'], ckpt['best_epoch'], ckpt.get('partial')
        set_rng_state(ckpt['rng'])
        log(f'resumed {args.resume}: epoch {next_epoch}, step {next_step}, best val accuracy {best_acc * 100:.2f} %')
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None,
            find_unused_parameters=args.model == 'task')
    if args.compile:
        train_model = torch.compile(train_model)
    logger = None
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, 'args.json'), 'w') as f:
            json.dump({**vars(args), 'hflip_applied': hflip}, f, indent=2)
        metrics_path = os.path.join(run_dir, 'metrics.jsonl')
        keep_metrics(metrics_path, next_epoch)
        logger = make_run_logger(args, info, run_dir)
        if logger is not None and ckpt is None:
            logger.log_triplets(store.get(val_t[:8][:, [0, 2, 1]].reshape(-1)).reshape(-1, 3, args.image_size, args.image_size, 3))
    log(f'{describe(args)} on {info.name}: notions {[info.notions[c] for c in conditions]}, {len(train_t)} train and '
        f'{len(val_t)} val triplets, batch {args.batch_size}, epochs {next_epoch}..{args.epochs}')
    stop = StopFlag()
    stop.install()

    def checkpoint_state(next_e, next_s, part):
        return {'epoch': next_e - 1 if next_s == 0 else next_e, 'next_epoch': next_e, 'next_step': next_s,
                'partial': part, 'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(),
                'scaler': scaler.state_dict() if use_scaler else None, 'best_acc': best_acc, 'best_epoch': best_epoch,
                'args': {k: v for k, v in vars(args).items() if not k.startswith('_')},
                'notions': list(info.notions), 'conditions': list(conditions), 'hflip_applied': hflip,
                'rng': rng_state()}

    for epoch in range(next_epoch, args.epochs + 1):
        lr = args.lr * (0.985 ** epoch)
        for group in optimizer.param_groups:
            group['lr'] = lr
        t0 = time.time()
        sums, finished = train_epoch(model, train_model, optimizer, scaler, (train_t, train_c, store, hflip), args, device,
                                     amp_dtype, epoch, next_step, partial, stop, rank, world, is_main)
        if not finished:
            if is_main:
                save_checkpoint(checkpoint_state(epoch, sums['steps'], sums), ckpt_path)
                log(f'stopped at epoch {epoch}, step {sums["steps"]}; continue with --resume {ckpt_path}')
            return 130
        next_step, partial = 0, None
        train_seconds = time.time() - t0
        val = evaluate(model, val_t, val_c, store, args, device, amp_dtype, info.notions, rank, world)
        is_best = val['accuracy'] > best_acc
        if is_best:
            best_acc, best_epoch = val['accuracy'], epoch
        steps = max(sums['steps'], 1)
        m = {'epoch': epoch, 'lr': lr, 'train_loss': sums['loss'] / max(sums['n'], 1),
             'train_acc': sums['correct'] / max(sums['n'], 1), 'val_loss': val['loss'], 'val_acc': val['accuracy'],
             'val_acc_per_notion': val['per_notion'], 'emb_norm': sums['emb_norm'] / steps,
             'mask_norm': sums['mask_norm'] / steps, 'seconds': round(time.time() - t0, 2),
             'triplets_per_s': round(sums['n'] / max(train_seconds, 1e-9), 1), 'best_acc': best_acc}
        if is_main:
            per = ' '.join(f'{k} {v * 100:.1f}' for k, v in val['per_notion'].items())
            log(f'epoch {epoch:3d}  lr {lr:.2e}  train loss {m["train_loss"]:.4f} acc {m["train_acc"] * 100:.2f}  '
                f'val acc {val["accuracy"] * 100:.2f} ({per})  {m["triplets_per_s"]:.0f} triplets/s  {m["seconds"]:.0f} s'
                f'{"  *best*" if is_best else ""}')
            with open(metrics_path, 'a') as f:
                f.write(json.dumps(m) + '\n')
            state = checkpoint_state(epoch + 1, 0, None)
            if is_best:
                save_checkpoint(state, best_path)
            save_checkpoint(state, ckpt_path)
            if logger is not None:
                logger.log_epoch(m)
                masks = model.embednet.mask_weights()
                logger.log_masks(epoch, None if masks is None else masks.detach().float().cpu().numpy())
    if is_main:
        log(f'done: best val accuracy {best_acc * 100:.2f} % at epoch {best_epoch}; test it with '
            f'python main.py --test --resume {best_path}')
        if logger is not None:
            log_val_embeddings(logger, model, info, val_t, store, args, device, amp_dtype)
            logger.close()
    return 0


def log_val_embeddings(logger, model, info, val_t, store, args, device, amp_dtype, n=500):
    """A sample of val images, their embeddings (masked per notion for a CSN) and labels for TensorBoard's projector."""
    from triplet_image_loader import read_labels
    images = np.unique(val_t)[:n]
    net = model.embednet
    emb = embed_images(model, images, store, args, device, amp_dtype, c=0 if net.per_notion_backbone else None)
    labels = read_labels(info) or {}
    logger.log_embeddings(emb.cpu().numpy(), {k: [v[i] for i in images] for k, v in labels.items()}, store.get(images))


def keep_metrics(path, next_epoch):
    """Drop metrics lines of epochs that will be trained again (a run killed between its log line and checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln)['epoch'] < next_epoch]
    with open(path, 'w') as f:
        f.writelines(lines)


def make_run_logger(args, info, run_dir):
    if not (args.visdom or args.tensorboard):
        return None
    from loggers import make_logger
    return make_logger(args, info.notions, run_dir)


if __name__ == '__main__':
    sys.exit(main())
