"""The original release's training and test loops, re-created as bench.py's point of comparison: its transforms, its
TripletImageLoader (each image decoded with PIL per triplet), its CS_Tripletnet (three backbone calls per step) and
its per-step host reads. tests/test_bench.py checks that it computes the same loss and gradients as tripletnet.py."""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from triplet_image_loader import IMAGENET_MEAN, IMAGENET_STD, DataError


def original_transform(size, train):
    """The release's torchvision transforms (Resize, CenterCrop, RandomHorizontalFlip for training, ToTensor,
    Normalize)."""
    from torchvision import transforms as T
    flip = [T.RandomHorizontalFlip()] if train else []
    return T.Compose([T.Resize(size), T.CenterCrop(size), *flip, T.ToTensor(),
                      T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])


class OriginalTriplets(Dataset):
    """The release's TripletImageLoader: per triplet, check the three files exist, decode each with PIL, transform."""

    def __init__(self, info, triplets, conds, transform):
        self.root, self.filenames, self.transform = info.images_dir, info.filenames, transform
        self.triplets = [(str(a), str(b), str(c), int(k)) for (a, b, c), k in zip(triplets, conds)]  # as read from text

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, index):
        *ids, c = self.triplets[index]
        paths = [os.path.join(self.root, self.filenames[int(i)]) for i in ids]
        if not all(os.path.exists(p) for p in paths):
            raise DataError(f'image of triplet {ids} not found')
        img1, img2, img3 = (self.transform(Image.open(p).convert('RGB')) for p in paths)  # (3, S, S) each
        return img1, img2, img3, c


def original_loader(dataset, batch_size, device):
    """The release's DataLoader: shuffled, and `num_workers: 4, pin_memory: True` only on CUDA (else no workers)."""
    kwargs = {'num_workers': 4, 'pin_memory': True} if device.type == 'cuda' else {}
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, **kwargs)


class OriginalTripletnet(nn.Module):
    """The release's CS_Tripletnet around its ConditionalSimNet: the backbone runs once per image of the triplet.
    Shares the backbone and masks of one of this repo's ConditionalSimNet."""

    def __init__(self, csn):
        super().__init__()
        self.csn = csn

    def embed(self, x, c):
        """The release's ConditionalSimNet.forward: masked embedding, ||mask||_1, ||f(x)||_2, ||masked||_2."""
        embedded_x = self.csn.embeddingnet(x)  # (B, D)
        mask = self.csn.masks(c)  # (B, D)
        if self.csn.mask_type != 'fixed':
            mask = F.relu(mask)
        masked = embedded_x * mask
        return masked, mask.norm(1), embedded_x.norm(2), masked.norm(2)

    def forward(self, x, y, z, c):
        ex, mx, nx, tx = self.embed(x, c)
        ey, my, ny, ty = self.embed(y, c)
        ez, mz, nz, tz = self.embed(z, c)
        mask_norm, embed_norm, mask_embed_norm = (mx + my + mz) / 3, (nx + ny + nz) / 3, (tx + ty + tz) / 3
        return F.pairwise_distance(ex, ey, 2), F.pairwise_distance(ex, ez, 2), mask_norm, embed_norm, mask_embed_norm


def original_loss(tnet, criterion, batch, args, device):
    """The release's train() step up to the loss, with its per-step reads of the loss and accuracy.
    (loss, dista, distb)."""
    data1, data2, data3, c = (t.to(device) for t in batch)
    dista, distb, mask_norm, embed_norm, _ = tnet(data1, data2, data3, c)
    target = torch.ones_like(dista)  # 1: dista should be larger than distb
    loss_triplet = criterion(dista, distb, target)
    loss_embedd = embed_norm / np.sqrt(data1.size(0))
    loss_mask = mask_norm / data1.size(0)
    loss = loss_triplet + args.embed_loss * loss_embedd + args.mask_loss * loss_mask
    (dista - distb > 0).cpu().float().mean().item(), loss_triplet.item(), loss_embedd.item(), loss_mask.item()
    return loss, dista, distb


def original_train(tnet, optimizer, loader, args, device, on_step=None):
    criterion = nn.MarginRankingLoss(margin=args.margin)
    tnet.train()
    for step, batch in enumerate(loader, 1):
        loss, _, _ = original_loss(tnet, criterion, batch, args, device)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step)


def original_eval(tnet, loader, args, device, n_notions, on_step=None):
    """The release's test(): every triplet's three images decoded and embedded; like the release, without no_grad."""
    criterion = nn.MarginRankingLoss(margin=args.margin)
    tnet.eval()
    for step, (data1, data2, data3, c) in enumerate(loader, 1):
        data1, data2, data3, c = data1.to(device), data2.to(device), data3.to(device), c.to(device)
        dista, distb, _, _, _ = tnet(data1, data2, data3, c)
        criterion(dista, distb, torch.ones_like(dista)).item()
        right = (dista - distb > 0).cpu()
        for k in range(n_notions):  # its per-notion accuracies
            (right & (c.cpu() == k)).sum().item()
        if on_step is not None:
            on_step(step)
