"""Checkpoints (write whole or not at all, load safely, take a run's flags back) and the model that flags describe."""
import argparse
import os

import torch

from csn import ConditionalSimNet, TaskSpecificNets, TripletEmbedNet
from csnlib.atomic import atomic_open
from csnlib.options import UserError, explicit_flags, main_parser
from csnlib.runtime import Runtime, choose_amp, choose_device
from Resnet_18 import EmbeddingNet
from triplet_image_loader import parse_conditions
from tripletnet import TripletNet

# flags that fix the model's shape: taken from a checkpoint, and must match it when given on the command line
MODEL_FLAGS = ('model', 'dim_embed', 'learned', 'prein')
# how to run: the current machine's business (a run started on the CPU continues on a GPU, a checkpoint from a GPU
# tests on a laptop); never taken from the checkpoint's run. Flags that change what is learned (--three-forwards,
# --hflip, the model's shape, the data) do come back.
HOW_TO_RUN = ('device', 'no_cuda', 'amp', 'compile', 'workers', 'channels_last', 'keep_memory', 'cache', 'cache_dir',
              'dist_timeout')
# flags of this call, never taken from the checkpoint's run
THIS_CALL = ('resume', 'test', 'export_embeddings', 'pictures', 'check_data') + HOW_TO_RUN
# not flags: what a run recorded about its model in its args (--add-notion's mask rows learned on fixed masks)
RECORDED = ('learned_rows',)


def save_checkpoint(state, path):
    """Write to a temporary file in the same folder, then rename: a checkpoint file is always whole."""
    try:
        with atomic_open(path, 'wb') as f:
            torch.save(state, f)
    except OSError as e:
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
    """New args from the checkpoint's, keeping flags given on the command line; model flags must match."""
    stored = ckpt.get('args')
    if not isinstance(stored, dict) or 'state_dict' not in ckpt:
        raise UserError(f'--resume {path}: not a checkpoint of this code (no args/state_dict in it)')
    for k in MODEL_FLAGS:
        if k in explicit and k in stored and getattr(args, k) != stored[k]:
            raise UserError(f'--resume {path}: the checkpoint is a {describe(stored)} model, but the command line asks '
                            f'for --{k.replace("_", "-")} {getattr(args, k)}; drop the flag or use a matching checkpoint')
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in stored.items()
                                                  if k not in explicit and (k in vars(args) or k in RECORDED)
                                                  and k not in THIS_CALL}})


def how_to_run_changes(args, ckpt, explicit):
    """'--flag stored -> now' for each how-to-run flag left at its default that differs from the checkpoint's run."""
    stored = ckpt.get('args') or {}
    return [f'--{k.replace("_", "-")} {stored[k]} -> {getattr(args, k)}' for k in HOW_TO_RUN
            if k in stored and k not in explicit and stored[k] != getattr(args, k) and k != 'workers']


def describe(a):
    a = a if isinstance(a, dict) else vars(a)
    if a['model'] != 'csn':
        return f'--model {a["model"]}, {a["dim_embed"]}-d'
    return f'CSN ({"prein" if a.get("prein") else "learned" if a.get("learned") else "fixed"} masks), {a["dim_embed"]}-d'


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


def build_model(args, n_notions, pretrained=None):
    """The TripletNet that args describe; the backbone from ImageNet unless --no-pretrained (or pretrained=False)."""
    pretrained = not args.no_pretrained if pretrained is None else pretrained
    state = load_imagenet_weights(args) if pretrained else None

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
        net = ConditionalSimNet(backbone(), n_notions, args.dim_embed, mask_type, getattr(args, 'learned_rows', None) or ())
    elif args.model == 'triplet':
        net = TripletEmbedNet(backbone())
    else:
        net = TaskSpecificNets([backbone() for _ in range(n_notions)])
    return TripletNet(net, three_forwards=getattr(args, 'three_forwards', False))


def load_model(ckpt_path, data=None, device='auto', amp=None, batch_size=256):
    """The checkpoint's model, ready to embed: (model, checkpoint, Runtime with args as main.py would see them).
    Images are embedded batch_size at a time, read in this process (workers 0)."""
    parser = main_parser()
    argv = ['--resume', ckpt_path, '--device', device] + (['--data', data] if data else []) + (['--amp', amp] if amp else [])
    ckpt = load_checkpoint(ckpt_path)
    args = merge_checkpoint_args(parser.parse_args(argv), ckpt, explicit_flags(parser, argv), ckpt_path)
    device = choose_device(args)
    amp_dtype, _ = choose_amp(args, device)
    rt = Runtime(args, device, amp_dtype, workers=0, eval_batch_size=batch_size, resume=ckpt_path)
    n_notions = len(ckpt.get('notions') or []) or ckpt['state_dict'].get('embednet.masks.weight', torch.zeros(0)).shape[0]
    model = build_model(args, n_notions, pretrained=False)
    model.load_state_dict(ckpt['state_dict'])
    model.to(device).eval()
    return model, ckpt, rt


def trained_conditions(ckpt, notions):
    """Indices of the notions a checkpoint was trained on (a checkpoint of older code: the notions its run's
    --conditions selected, all of them by default)."""
    if ckpt.get('conditions') is not None:
        return [int(c) for c in ckpt['conditions']]
    return parse_conditions((ckpt.get('args') or {}).get('conditions'), notions)
