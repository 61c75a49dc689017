"""Conditional Similarity Network: one shared embedding, one mask per notion of similarity, and the paper's
baselines."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ConditionalSimNet(nn.Module):
    """f(x) * m_c. Masks: fixed disjoint 0/1 blocks ('fixed'), learned from N(0.9, 0.7) ('learned'), or learned from
    the disjoint blocks with 0.1 elsewhere ('prein'). Learned masks go through ReLU. learned_rows: rows learned on top
    of fixed masks (main.py --add-notion); then every row goes through ReLU, which leaves the fixed 0/1
    rows as they are."""

    per_notion_backbone = False

    def __init__(self, embeddingnet, n_notions, dim_embed, mask_type='fixed', learned_rows=()):
        super().__init__()
        if mask_type not in ('fixed', 'learned', 'prein'):
            raise ValueError(f'unknown mask type {mask_type!r}')
        self.embeddingnet = embeddingnet
        self.mask_type = mask_type
        self.learned_rows = sorted(learned_rows)
        self.masks = nn.Embedding(n_notions, dim_embed)  # (n_notions, D)
        block = dim_embed // n_notions
        with torch.no_grad():
            if mask_type == 'learned':
                self.masks.weight.normal_(0.9, 0.7)
            else:
                fill = 0.1 if mask_type == 'prein' else 0.0
                self.masks.weight.fill_(fill)
                for i in range(n_notions):
                    self.masks.weight[i, i * block:(i + 1) * block] = 1.0
        self.masks.weight.requires_grad_(mask_type != 'fixed' or bool(self.learned_rows))

    def embed(self, x, c=None):
        return self.embeddingnet(x)  # (B, D)

    def mask_weights(self):
        w = self.masks.weight
        return F.relu(w) if self.mask_type != 'fixed' or self.learned_rows else w  # (n_notions, D)

    def apply_mask(self, emb, c):
        """Masked embedding and the per-sample L1 norm of the masks used: (B, D), (B,)."""
        m = self.mask_weights()[c]  # (B, D)
        return emb * m, m.abs().sum(1)


class TripletEmbedNet(nn.Module):
    """The standard triplet network of the paper's Table 1: one embedding for every notion, no masks."""

    per_notion_backbone = False

    def __init__(self, embeddingnet):
        super().__init__()
        self.embeddingnet = embeddingnet

    def embed(self, x, c=None):
        return self.embeddingnet(x)  # (B, D)

    def mask_weights(self):
        return None

    def apply_mask(self, emb, c):
        return emb, emb.new_zeros(emb.shape[0])


class TaskSpecificNets(nn.Module):
    """The paper's set of task-specific triplet networks: one backbone and embedding per notion, each trained only on
    its own notion's triplets."""

    per_notion_backbone = True

    def __init__(self, embeddingnets):
        super().__init__()
        self.nets = nn.ModuleList(embeddingnets)

    def embed(self, x, c):
        """Route each sample through its notion's network. c: int or (B,) tensor."""
        if isinstance(c, int):
            return self.nets[c](x)
        out = None
        for k in torch.unique(c).tolist():
            sel = (c == k).nonzero(as_tuple=True)[0]
            e = self.nets[k](x[sel])
            if out is None:
                out = e.new_zeros(x.shape[0], e.shape[1])
            out = out.index_copy(0, sel, e)
        return out  # (B, D)

    def mask_weights(self):
        return None

    def apply_mask(self, emb, c):
        return emb, emb.new_zeros(emb.shape[0])
