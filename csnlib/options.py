"""The command line of main.py, and what every script's command line shares: the flags, and
the argparse types that check a number's range at parse time (positive_int, nonneg_int, positive_float, nonneg_float,
int_range, port)."""
import argparse
import math

from csnlib.errors import UserError  # noqa: F401  (re-exported: the scripts' parsers raise it)

FINE_TUNING_LR = 5e-5  # the original's --lr default, the paper's rate for fine-tuning ImageNet weights
SCRATCH_LR = 3e-3      # the best rate from random weights in the Fonts study's sweep (docs/study.md)


class Bounded:
    """An argparse `type=` that parses an int or a float and checks low <= x (low < x if low_open) and x <= high, so a
    bad value stops argparse with `error: argument --FLAG: must be an integer >= 1, got 0` (exit 2). The bounds are
    attributes, for the tests that walk every flag."""

    def __init__(self, kind, low, high=None, low_open=False):
        self.kind, self.low, self.high, self.low_open = kind, low, high, low_open
        self.__name__ = self.describe()  # argparse names the type in some messages

    def describe(self):
        what = 'an integer' if self.kind is int else 'a number'
        if self.high is not None:
            return f'{what} from {self.low} to {self.high}'
        return f'{what} {">" if self.low_open else ">="} {self.low:g}'

    def __call__(self, text):
        try:
            x = self.kind(text)
        except ValueError:
            x = None
        ok = x is not None and math.isfinite(x) and (x > self.low if self.low_open else x >= self.low) and (
            self.high is None or x <= self.high)
        if not ok:
            shown = text if text and text == text.strip() else repr(text)
            raise argparse.ArgumentTypeError(f'must be {self.describe()}, got {shown}')
        return x

    def __repr__(self):
        return f'<{self.describe()}>'


def int_range(low, high=None):
    """An integer from low to high (no upper bound when high is None)."""
    return Bounded(int, low, high)


positive_int = int_range(1)
nonneg_int = int_range(0)
positive_float = Bounded(float, 0, low_open=True)
nonneg_float = Bounded(float, 0)
port = int_range(1, 65535)
# the largest values a run may ask for: beyond them memory or the process table gives out deep inside (a 1e9-d
# embedding layer, 100,000-px images, a thousand worker processes); a checkpoint's args are held to the same ranges
MAX_IMAGE_SIZE, MAX_DIM_EMBED, MAX_WORKERS, MAX_THREADS = 1024, 4096, 64, 512


def add_device_flag(group, choices=('auto', 'cpu', 'cuda', 'mps'), help='auto = CUDA, then MPS, then CPU'):
    group.add_argument('--device', choices=list(choices), default='auto', help=help)


def main_parser():
    """main.py's command line."""
    p = argparse.ArgumentParser(
        description='Conditional Similarity Networks: train (default) or --test. Flags of the original release keep '
                    'their meaning; underscores and hyphens are interchangeable (--embed_loss = --embed-loss).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    g = p.add_argument_group('training (flags of the original release)')
    a = g.add_argument
    a('--batch-size', '--batch_size', type=positive_int, default=256,
      help='global batch size in triplets; under torchrun each of the N processes takes batch-size/N of it, so runs '
           'with any number of processes are comparable')
    a('--epochs', type=positive_int, default=200, help='number of epochs to train')
    a('--patience', type=nonneg_int, default=0,
      help='stop when the validation accuracy has not improved for this many epochs (--epochs stays the cap; the best '
           'checkpoint is kept); 0 = off')
    a('--start_epoch', '--start-epoch', type=positive_int, default=1,
      help='epoch number to start from (a --resume overrides it)')
    a('--lr', type=positive_float, default=FINE_TUNING_LR,
      help=f'Adam learning rate; epoch e uses lr * 0.985^e. The default fits ImageNet weights; from random weights '
           f'(--no-pretrained) try {SCRATCH_LR:g}')
    a('--seed', type=nonneg_int, default=1, help='random seed (subsets, shuffling, flips, initialisation)')
    a('--no-cuda', '--no_cuda', action='store_true', default=False, help='use the CPU even when CUDA is available')
    a('--log-interval', '--log_interval', type=positive_int, default=20,
      help='batches between progress-bar updates of loss and accuracy')
    a('--margin', type=nonneg_float, default=0.2, help='margin of the ranking loss')
    a('--resume', default='', metavar='PATH',
      help='checkpoint to continue from. Restores the model, optimizer, grad scaler, epoch and step, best accuracy, '
           'args and RNG states, so the run goes on exactly where it stopped (also mid-epoch after Ctrl-C). With '
           '--test: the checkpoint to evaluate. "auto": RUNS/NAME/checkpoint.pth.tar if it exists, else start the run '
           '(with --test: RUNS/NAME/model_best.pth.tar), so the same command line starts, continues or finishes a run')
    a('--name', default='Conditional_Similarity_Network', help='name of the run: files go to RUNS/NAME')
    a('--embed_loss', '--embed-loss', type=nonneg_float, default=5e-3, help='weight of the embedding L2 norm')
    a('--mask_loss', '--mask-loss', type=nonneg_float, default=5e-4, help='weight of the mask L1 norm')
    a('--num_traintriplets', '--num-traintriplets', type=positive_int, default=100000,
      help='training triplets in total over all the dataset\'s notions: each selected notion contributes N / '
           '(number of notions)')
    a('--dim_embed', '--dim-embed', type=int_range(1, MAX_DIM_EMBED), default=64, help='embedding dimensions')
    a('--test', action='store_true', default=False, help='evaluate --resume on the test split and exit')
    a('--learned', action='store_true', default=False, help='learn the masks, from a random N(0.9, 0.7) start')
    a('--prein', action='store_true', default=False, help='learn the masks, from the disjoint blocks (0.1 elsewhere)')
    a('--visdom', action='store_true', default=False, help='plot to a visdom server (python -m visdom.server)')
    a('--conditions', nargs='*', default=None, metavar='NOTION',
      help='notions to use, by index or name (e.g. 0 1 or class heel); default: all of the dataset\'s')
    a('--add-notion', '--add_notion', default=None, metavar='NAME',
      help='teach the --resume checkpoint the notion NAME from the --data folder\'s NAME triplet lists, everything it '
           'learned frozen: a CSN learns one new mask row (its old notions\' distances stay bit for bit), '
           'task-specific networks one new network; the standard triplet network is refused. NAME: a new notion, or '
           'one of the checkpoint\'s it was not trained on. --num_traintriplets counts NAME\'s triplets; --lr defaults '
           'to 1e-2 for a CSN\'s mask row (the checkpoint\'s for a network), --epochs to the checkpoint\'s; the run '
           'goes to RUNS/NAME_OF_RUN+NAME unless --name is given. None: train as usual')
    g = p.add_argument_group('data and model')
    a = g.add_argument
    a('--data', default='data', metavar='DIR', help='dataset folder (filenames.json, images, tripletlists/)')
    a('--model', choices=['csn', 'triplet', 'task', 'asen', 'scenet'], default='csn',
      help='csn = Conditional Similarity Network; triplet = standard triplet network (no masks); '
           'task = a set of task-specific triplet networks (one per notion); asen = ASEN (AAAI 2020: attention '
           'conditioned on the notion, unit embeddings, ranking loss on dot products; asen.py); scenet = SCE-Net '
           '(ICCV 2019: CSN masks weighed per pair of images, no notion input; scenet.py)')
    a('--scenet-branch', '--scenet_branch', choices=['pair', 'triplet'], default='pair',
      help='--model scenet only: what its condition branch sees. pair = the anchor and the image it is compared with, '
           'each distance with its own mask weights (the paper\'s figure; cannot see which slot holds the close '
           'image); '
           'triplet = the released code\'s branch on (anchor, far, close) in role order, one weight vector for both '
           'distances: it reads the answer from the slot order (main.py --test\'s order check shows how much), kept to '
           'measure that (default: pair)')
    a('--no-pretrained', '--no_pretrained', action='store_true', default=False,
      help='start the backbone from random weights instead of ImageNet')
    a('--weights', default='', metavar='FILE', help='ImageNet weights: a torchvision resnet18 state dict file '
                                                     '(default: torch\'s cache, downloading if online)')
    a('--num_valtriplets', '--num-valtriplets', type=positive_int, default=80000,
      help='validation triplets in total (as --num_traintriplets)')
    a('--num_testtriplets', '--num-testtriplets', type=positive_int, default=160000,
      help='test triplets in total (as --num_traintriplets)')
    a('--image-size', '--image_size', type=int_range(1, MAX_IMAGE_SIZE), default=112,
      help='images are resized and centre-cropped to this size')
    a('--hflip', choices=['auto', 'on', 'off'], default='auto',
      help='random horizontal mirroring of training images: auto = what the dataset says ("hflip" in its dataset.json; '
           'on when absent, as for Zappos; fonts are never mirrored: a mirrored b is a d)')
    a('--runs', default='runs', metavar='DIR', help='folder for the runs\' files')
    a('--check-data', '--check_data', action='store_true', default=False,
      help='check the dataset (triplet lines, indices, duplicates, images) and exit')
    a('--skip-bad-triplets', '--skip_bad_triplets', action='store_true', default=False,
      help='leave out bad triplet lines (reported) instead of refusing to start')
    a('--export-embeddings', '--export_embeddings', action='store_true', default=False,
      help='with --test: also write the embeddings of every image (embeddings.npy, masks.npy, images.txt) next to the '
           'checkpoint')
    a('--pictures', action=argparse.BooleanOptionalAction, default=True,
      help='with --test: write masks.png, t-SNE maps and retrieval grids per notion next to test_results.json')
    g = p.add_argument_group('speed')
    a = g.add_argument
    add_device_flag(g)
    a('--workers', type=int_range(0, MAX_WORKERS), default=None,
      help='DataLoader worker processes (default: 0 on the CPU with the image cache, else min(8, cores))')
    a('--threads', type=int_range(1, MAX_THREADS), default=None,
      help='CPU threads for the arithmetic (torch.set_num_threads). Default: torch\'s, one per core this process may '
           'use. On cores that other processes keep busy, 1 trains several times as fast (the README\'s speed '
           'section). Training\'s float rounding depends on it, so a run and its resume keep one value (a --resume '
           'takes the checkpoint\'s)')
    a('--amp', choices=['auto', 'off', 'bf16', 'fp16'], default='auto',
      help='mixed precision: auto = bf16 on CUDA and on CPUs with bf16 support, fp16 with a grad scaler on older GPUs')
    a('--channels-last', '--channels_last', dest='channels_last', action='store_true', default=True,
      help='channels_last memory format')
    a('--no-channels-last', '--no_channels_last', dest='channels_last', action='store_false',
      help='plain NCHW memory format')
    a('--conv-wgrad', '--conv_wgrad', choices=['auto', 'onednn', 'matmul'], default='auto',
      help='how a training step on the CPU takes a convolution\'s weight gradient on small maps (4x4 output positions '
           'or fewer, as at 32 and 64 px): onednn = oneDNN\'s kernel; matmul = one matrix product over the input\'s '
           'patches (and on 2x2 maps the forward pass too), in bf16 and fp32; auto = matmul in bf16 on a CPU with AMX, '
           'oneDNN elsewhere (in fp32 the product gained little; without AMX it was not measured). The same '
           'gradient to float rounding; a --resume takes the checkpoint\'s (default: auto)')
    a('--three-forwards', '--three_forwards', action='store_true', default=False,
      help='embed anchors, fars and closes in three backbone calls, as the original did, instead of one '
           '(BatchNorm then normalises each role on its own; what that costs or gains: see the README) (default: off)')
    a('--compile', action='store_true', default=False, help='torch.compile the model')
    a('--keep-memory', '--keep_memory', action=argparse.BooleanOptionalAction, default=True,
      help='on the CPU (glibc): keep freed memory in the process for the next step instead of handing each large '
           'block back to the system, which costs a page fault per 4 KiB when it is used again; faster, and the '
           'resident memory stays at its peak')
    a('--cache', dest='cache', action='store_true', default=True,
      help='decode, resize and crop every image once into a uint8 file memory-mapped from --cache-dir')
    a('--no-cache', '--no_cache', dest='cache', action='store_false', help='decode images with PIL at every use')
    a('--cache-dir', '--cache_dir', default=None, metavar='DIR',
      help='where the image cache goes (default: DATA/cache)')
    a('--dist-timeout', '--dist_timeout', type=positive_float, default=600,
      help='seconds a torchrun process waits for the others before failing the job')
    g = p.add_argument_group('live plots')
    a = g.add_argument
    a('--visdom-server', '--visdom_server', default='http://localhost', help='visdom server address')
    a('--visdom-port', '--visdom_port', type=port, default=8097, help='visdom server port')
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
