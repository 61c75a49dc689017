"""Evaluation: embed each distinct image once, then score every triplet from those embeddings."""
import numpy as np
import torch
import torch.distributed as dist

from csnlib.loader import make_loader, to_input
from triplet_image_loader import ImageBatches
from tripletnet import masked_distances, ranking_loss, triplet_correct


@torch.no_grad()
def embed_images(model, images, store, rt, c=None, shared=False):
    """Embed each given image once (no flip): raw embeddings (len(images), D), float32, on the device.
    shared: under torchrun each process embeds a share and the shares are gathered."""
    rank, world = (rt.rank, rt.world) if shared else (0, 1)
    images, bs = np.asarray(images), rt.eval_batch_size
    batches = [np.arange(s, min(s + bs, len(images))) for s in range(0, len(images), bs)]
    mine = batches[rank::world]  # whole batches per process: each image is embedded in the same batch as in one process
    loader = make_loader(ImageBatches(images, store), [b.tolist() for b in mine], rt.workers, rt.device)
    out = []
    for u8 in loader:
        x = to_input(u8, rt.device, rt.args.channels_last)
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype is not None):
            out.append(model.embednet.embed(x, c).float())  # (b, D)
    if world > 1:
        # every process gets every batch back; batch i came from process i % world
        gathered = [None] * world
        dist.all_gather_object(gathered, [o.cpu() for o in out])
        out = [gathered[i % world][i // world].to(rt.device) for i in range(len(batches))]
    return torch.cat(out) if out else torch.zeros(0, rt.args.dim_embed, device=rt.device)  # (len(images), D)


@torch.no_grad()
def broadcast_buffers(model, rt):
    """Under torchrun, every process takes rank 0's buffers (BatchNorm's running statistics): each process updated its
    own in training, and the model evaluated must be the one rank 0 saves."""
    if rt.world > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)


ORDER_TOLERANCE = 0.01  # |excess| above this: the model's decision depends on which slot holds the close image


@torch.no_grad()
def evaluate(model, triplets, conds, store, rt, notions, embeddings=None, order_check=False):
    """Triplet accuracy and ranking loss of a split (triplets (M, 3), conds (M,)), each image embedded once (under
    torchrun a share per process, all with rank 0's model). Returns {'accuracy', 'loss' (ranking loss only),
    'per_notion' {name: acc}, 'triplets'}. embeddings: a dict to fill with {notion or None (one embedding for all):
    (sorted image indices, their raw embeddings (U, D))}. order_check: also score every triplet with far and close
    swapped in everything the model sees (res['order_check'], see order_summary)."""
    model.eval()
    broadcast_buffers(model, rt)
    net = model.embednet
    correct = torch.zeros(len(triplets), dtype=torch.bool, device=rt.device)
    swapped = torch.zeros(len(triplets), dtype=torch.bool, device=rt.device)
    losses = torch.zeros(len(triplets), device=rt.device)
    groups = ([(c, conds == c) for c in np.unique(conds)] if net.per_notion_backbone
              else [(None, np.ones(len(conds), bool))])
    for c, sel in groups:
        images = np.unique(triplets[sel])
        emb = embed_images(model, images, store, rt, c=None if c is None else int(c), shared=True)  # (U, D)
        if embeddings is not None:
            embeddings[c] = (images, emb)
        pos = torch.from_numpy(np.searchsorted(images, triplets[sel])).to(rt.device)  # (M, 3) rows of emb
        cond = torch.from_numpy(conds[sel]).to(rt.device)
        for start in range(0, len(pos), 65536):
            p, cc = pos[start:start + 65536], cond[start:start + 65536]
            d_far, d_close, _ = masked_distances(net, emb[p.T.reshape(-1)], cc)  # rows (3B,): anchors, fars, closes
            idx = torch.from_numpy(np.flatnonzero(sel)[start:start + 65536]).to(rt.device)
            correct[idx] = triplet_correct(d_far, d_close)
            losses[idx] = ranking_loss(d_far, d_close, rt.args.margin)
            if order_check:  # the same triplets written a c b: the close image in the far slot
                s_far, s_close, _ = masked_distances(net, emb[p[:, [0, 2, 1]].T.reshape(-1)], cc)
                swapped[idx] = triplet_correct(s_far, s_close)
    correct, losses = correct.cpu().numpy(), losses.cpu().numpy()
    per = {notions[c]: float(correct[conds == c].mean()) for c in np.unique(conds)}
    res = {'accuracy': float(correct.mean()), 'loss': float(losses.mean()), 'per_notion': per,
           'triplets': int(len(triplets))}
    if order_check:
        res['order_check'] = order_summary(correct, swapped.cpu().numpy(), conds, notions)
    return res


def order_summary(correct, swapped, conds, notions):
    """The order check from each triplet's two verdicts (M,) bool, as given and with far and close swapped:
    {'swapped_accuracy', 'excess' = accuracy + swapped_accuracy - 1, 'per_notion' {name: {...}}, 'leaks'}. A model
    whose decision does not depend on the slot order has an excess of 0, less its ties (a tie is wrong both ways)."""
    def one(sel):
        acc, sw = float(correct[sel].mean()), float(swapped[sel].mean())
        return {'swapped_accuracy': sw, 'excess': acc + sw - 1}
    out = one(np.ones(len(correct), bool))
    out['per_notion'] = {notions[c]: one(conds == c) for c in np.unique(conds)}
    out['leaks'] = bool(abs(out['excess']) > ORDER_TOLERANCE)
    return out


@torch.no_grad()
def embed_dataset(model, images, store, rt, n_notions, done=None):
    """Raw embeddings of `images` and the masks, float32 numpy: ((N, D), or (C, N, D) for per-notion nets;
    (C, D)). done: images already embedded, as evaluate gives them ({None or notion: (sorted image indices, raw
    embeddings)}, with `images` sorted); they are reused and only the other images are embedded."""
    model.eval()
    done = done or {}

    def embed(c):  # (N, D) under notion c's network (c None: the one embedding)
        def new(imgs):
            return embed_images(model, imgs, store, rt, c=c).cpu().numpy()
        if c not in done:
            return new(images)
        idx, have = done[c][0], done[c][1].cpu().numpy()
        rest = np.setdiff1d(images, idx)  # done's images are some of `images`, which are then sorted
        if not len(rest):
            return have
        order = np.argsort(np.concatenate([idx, rest]), kind='stable')
        return np.concatenate([have, new(rest)])[order]

    if model.embednet.per_notion_backbone:
        emb = np.stack([embed(c) for c in range(n_notions)])  # (C, N, D)
    else:
        emb = embed(None)  # (N, D)
    w = model.embednet.mask_weights()
    masks = np.ones((n_notions, emb.shape[-1]), np.float32) if w is None else w.detach().float().cpu().numpy()
    return emb, masks


def subspace(emb, masks, c):
    """The embeddings that notion c compares: (N, D)."""
    return (emb[c] if emb.ndim == 3 else emb) * masks[c]


def labelled_subspaces(emb, masks, images, labels, notions, conditions):
    """(notion, its embeddings (n, D), their labels (n,) str) for each notion in conditions that labels has, over
    `images` (N dataset indices; emb (N, D) or (C, N, D) their embeddings); images labelled '' (unknown) left out."""
    for c in (c for c in conditions if notions[c] in labels):
        lab = np.asarray(labels[notions[c]], dtype=object)[images]  # (N,)
        yield notions[c], subspace(emb, masks, c)[lab != ''], lab[lab != ''].astype(str)
