"""The model that a run's flags describe: CSN (fixed, learned or prein masks), the standard triplet network or the
task-specific networks, on the ResNet-18 backbone, from ImageNet weights or random; and a checkpoint's model, ready
to embed."""
import os

import torch

from asen import ASEN
from csn import ConditionalSimNet, TaskSpecificNets, TripletEmbedNet
from csnlib import conv_wgrad
from csnlib.checkpoint import describe, load_checkpoint, merge_checkpoint_args
from csnlib.errors import CheckpointError, UserError
from csnlib.options import explicit_flags, main_parser
from csnlib.runtime import Runtime, choose_amp, choose_device
from Resnet_18 import EmbeddingNet
from scenet import SCENet
from tripletnet import TripletNet


def place(model, args, device, wgrad_dtypes=()):
    """model on device as a run uses it: channels_last if asked, and for training in wgrad_dtypes (conv_wgrad.dtypes_for
    of --conv-wgrad) the convolutions that take their weight gradient from one matrix product on small maps."""
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    conv_wgrad.install(model, wgrad_dtypes)


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
        net = ConditionalSimNet(backbone(), n_notions, args.dim_embed, mask_type,
                                getattr(args, 'learned_rows', None) or ())
    elif args.model == 'triplet':
        net = TripletEmbedNet(backbone())
    elif args.model in ('asen', 'scenet'):
        refuse_successor_flags(args)
        net = (ASEN(backbone(), n_notions) if args.model == 'asen' else
               SCENet(backbone(), n_notions, args.dim_embed, branch=getattr(args, 'scenet_branch', 'pair')))
    else:
        net = TaskSpecificNets([backbone() for _ in range(n_notions)])
    return TripletNet(net, three_forwards=getattr(args, 'three_forwards', False))


def refuse_successor_flags(args):
    """What ASEN and SCE-Net cannot do, refused before anything runs."""
    if getattr(args, 'add_notion', None):
        raise UserError(f'--add-notion: --model {args.model} conditions shared layers on the notion (ASEN\'s '
                        f'attention, SCE-Net\'s mask weights), so a new notion would change the old ones\' distances; '
                        f'add it to a CSN (--model csn) or task-specific networks (--model task), or train a new model')
    if args.model == 'scenet' and getattr(args, 'export_embeddings', False):
        raise UserError('--export-embeddings: SCE-Net (--model scenet) weighs its masks per triplet and has no '
                        'embedding per notion to export or retrieve with; leave the flag out')


def load_model(ckpt_path, data=None, device='auto', amp=None, batch_size=256):
    """The checkpoint's model, ready to embed: (model, checkpoint, Runtime with args as main.py would see them).
    Images are embedded batch_size at a time, read in this process (workers 0)."""
    parser = main_parser()
    argv = (['--resume', ckpt_path, '--device', device] + (['--data', data] if data else [])
            + (['--amp', amp] if amp else []))
    ckpt = load_checkpoint(ckpt_path)
    args = merge_checkpoint_args(parser.parse_args(argv), ckpt, explicit_flags(parser, argv), ckpt_path)
    device = choose_device(args)
    amp_dtype, _ = choose_amp(args, device)
    rt = Runtime(args, device, amp_dtype, workers=0, eval_batch_size=batch_size, resume=ckpt_path)
    n_notions = (len(ckpt.get('notions') or [])
                 or ckpt['state_dict'].get('embednet.masks.weight', torch.zeros(0)).shape[0])
    model = build_model(args, n_notions, pretrained=False)
    try:
        model.load_state_dict(ckpt['state_dict'])
    except (RuntimeError, TypeError, AttributeError) as e:  # shapes that are not its args' (masks of another D)
        why = (str(e).strip().splitlines() or [''])[-1].strip()[:200]
        raise CheckpointError(f'--resume {ckpt_path}: its weights do not fit the {describe(args)} model its args '
                              f'describe ({why}); the checkpoint is damaged or was not written by main.py') from None
    model.to(device).eval()
    return model, ckpt, rt
