"""main.py --add-notion NAME: teach a trained model one more notion from NAME's triplets, keeping what it learned.

CSN: one new mask row, learned through ReLU; the backbone (in eval mode, so BatchNorm's statistics stay) and the other
rows are frozen, so the old notions' distances do not change at all. Task-specific networks: one new network, the others
untouched. The standard triplet network has one embedding for every notion: nothing to add without changing the others.
"""
import argparse
import dataclasses
import os

import torch

from csnlib.builder import build_model
from csnlib.checkpoint import trained_conditions
from csnlib.options import UserError
from triplet_image_loader import name_problem

MASK_LR = 1e-2  # --lr of a new mask row unless given: one row of D weights learns in a few hundred steps


def prepare(args, ckpt, info, explicit, resume):
    """The run that teaches args.add_notion: (args, checkpoint to load, info with the model's notions, the notion's
    index, fresh). fresh: a new run from a trained model (a new mask row or network in the checkpoint's state);
    otherwise the checkpoint is a run teaching this notion, which goes on."""
    name = args.add_notion
    why = name_problem(name)
    if why:  # the name becomes a folder (RUNS/NAME+NOTION) and file names (tripletlists/NOTION_tripletlist_*.txt)
        raise UserError(f'--add-notion {name!r}: not a notion name ({why}); a notion name is a plain name without '
                        f'"/", "\\" or ".."')
    if ckpt is None:
        raise UserError(f'--add-notion {name} needs --resume CHECKPOINT: the trained model to teach')
    if args.model == 'triplet':
        raise UserError(f'--add-notion: {resume} is a standard triplet network: one embedding serves every notion, so '
                        f'it cannot learn {name} without changing the distances of the others; add it to a CSN '
                        f'(--model csn) or a set of task-specific networks (--model task)')
    notions = ckpt.get('notions')
    if not notions:
        raise UserError(f'--add-notion: {resume} does not name its notions (a checkpoint of older code); '
                        f'test or train it once more with this code, or train a new model')
    trained = trained_conditions(ckpt, notions)
    fresh = (ckpt.get('args') or {}).get('add_notion') != name
    info = dataclasses.replace(info, notions=list(notions) + ([] if name in notions else [name]))
    k = info.notions.index(name)
    if fresh and k in trained:
        raise UserError(f'--add-notion {name}: the notion exists already: {resume} was trained on '
                        f'{[notions[c] for c in trained]}; give a notion it was not trained on')
    if fresh and 'conditions' in explicit:
        raise UserError(f'--conditions does not go with --add-notion: the run trains {name} only and keeps the '
                        f'notions {resume} was trained on')
    for split in ('train', 'val'):
        path = info.triplet_file(name, split)
        if not os.path.exists(path):
            raise UserError(f'--add-notion {name}: {args.data} has no {split} triplets for {name} ({path} not found); '
                            f'the triplet lists of a notion are tripletlists/{name}_tripletlist_{{train,val,test}}.txt')
    if not fresh:
        return args, ckpt, info, k, False

    csn_fixed = args.model == 'csn' and not (args.learned or args.prein)
    learned_rows = sorted({*(getattr(args, 'learned_rows', None) or ()), k}) if csn_fixed else None
    args = argparse.Namespace(**{
        **vars(args), 'conditions': [info.notions[c] for c in sorted({*trained, k})], 'learned_rows': learned_rows,
        'name': args.name if 'name' in explicit else f'{args.name}+{name}', 'start_epoch': 1,
        'lr': MASK_LR if args.model == 'csn' and 'lr' not in explicit else args.lr})
    model = build_model(args, len(info.notions), pretrained=args.model == 'task' and not args.no_pretrained)
    state, old = model.state_dict(), ckpt['state_dict']
    if args.model == 'task':  # the new network starts as build_model makes one; the others are the checkpoint's
        state.update({key: v for key, v in old.items() if not key.startswith(f'embednet.nets.{k}.')})
    else:  # the checkpoint's rows, and the new one from the learned masks' start N(0.9, 0.7)
        w = old['embednet.masks.weight']  # (old notions, D)
        row = torch.empty(1, w.shape[1], dtype=w.dtype).normal_(0.9, 0.7,
                                                                generator=torch.Generator().manual_seed(args.seed))
        state.update(old)
        state['embednet.masks.weight'] = torch.cat([w[:k], row, w[k + 1:]])  # (notions, D)
    ckpt = {**ckpt, 'state_dict': state, 'notions': list(info.notions), 'conditions': sorted({*trained, k})}
    return args, ckpt, info, k, True


def freeze(model, k):
    """Train only notion k: its mask row (CSN) or its network (task). The rest keeps its values bit for bit: no
    gradients for the backbone (whose BatchNorm TripletNet.train then keeps in eval mode), zero gradients for the other
    mask rows (Adam never moves a weight whose gradients were all zero)."""
    model.requires_grad_(False)
    net = model.embednet
    if net.per_notion_backbone:
        net.nets[k].requires_grad_(True)
        return
    w = net.masks.weight
    w.requires_grad_(True)
    others = torch.ones(len(w), 1, dtype=torch.bool, device=w.device)  # (notions, 1)
    others[k] = False
    w.register_hook(lambda g: g.masked_fill(others, 0.0))
