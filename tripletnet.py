"""Masked triplet distances and the CSN loss: d(x, y | c) = ||f(x) * m_c - f(y) * m_c||_2."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class TripletNet(nn.Module):
    """Embeds a stacked (anchor, far, close) batch in one forward pass; returns the masked distances and the norms."""

    def __init__(self, embednet, three_forwards=False):
        super().__init__()
        self.embednet = embednet  # a ConditionalSimNet, TripletEmbedNet or TaskSpecificNets
        self.three_forwards = three_forwards  # the original's three backbone calls (BatchNorm statistics per role)

    def train(self, mode=True):
        """BatchNorm layers whose weights are frozen (main.py --add-notion) stay in eval mode: their statistics too."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.requires_grad:
                m.eval()
        return self

    def forward(self, x, c):  # images (3B, 3, H, W): anchors, fars, closes; c (B,)
        B = c.shape[0]
        if self.three_forwards:
            emb = torch.cat([self.embednet.embed(part, c) for part in x.chunk(3)])  # (3B, D)
        else:
            emb = self.embednet.embed(x, c.repeat(3))  # (3B, D)
        d_far, d_close, mask_l1 = masked_distances(self.embednet, emb, c)
        # the original's norms: Frobenius norm of each image's (B, D) raw embeddings and L1 norm of its (B, D) masks,
        # averaged over the three images
        emb_norm = emb.float().view(3, B, -1).norm(dim=(1, 2)).mean()
        mask_norm = mask_l1.float().view(3, B).sum(1).mean()
        return d_far, d_close, emb_norm, mask_norm


def masked_distances(embednet, emb, c):
    """Raw embeddings (3B, D) of anchors, fars, closes and notions c (B,) -> d_far, d_close (B,) under c's masks, and
    the L1 norm of each image's mask (3B,)."""
    if hasattr(embednet, 'triplet_distances'):  # ASEN (1 - dot product), SCE-Net (masks weighed per triplet)
        return embednet.triplet_distances(emb, c)
    masked, mask_l1 = embednet.apply_mask(emb, c.repeat(3))  # (3B, D), (3B,)
    ea, ef, ec = masked.float().chunk(3)  # (B, D) each
    return F.pairwise_distance(ea, ef, 2), F.pairwise_distance(ea, ec, 2), mask_l1


def ranking_loss(d_far, d_close, margin):
    """Per-triplet margin ranking loss max(0, margin - (d_far - d_close)): (B,)."""
    return F.margin_ranking_loss(d_far, d_close, torch.ones_like(d_far), margin=margin, reduction='none')


def csn_loss(d_far, d_close, emb_norm, mask_norm, margin, embed_loss, mask_loss):
    """Margin ranking loss on d_far > d_close + embed_loss * ||f||_F / sqrt(B) + mask_loss * ||m||_1 / B."""
    B = d_far.shape[0]
    return ranking_loss(d_far, d_close, margin).mean() + embed_loss * emb_norm / B ** 0.5 + mask_loss * mask_norm / B


@torch.no_grad()
def triplet_correct(d_far, d_close):
    """A triplet is right when the anchor is farther from 'far' than from 'close': (B,) bool."""
    return d_far > d_close
