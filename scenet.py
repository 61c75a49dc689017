"""SCE-Net, Similarity Condition Embedding (Tan et al., ICCV 2019): CSN's backbone and learned masks, with the mask to
use predicted from the images compared, so the notion label is never an input.

For an anchor a compared with an image y (raw embeddings f(.) (B, D)) and K learned masks m_k = relu(M_k) (K, D):

    weights   w(a, y) = softmax(fc2(relu(fc1([g(a), g(y)]))))          (B, K), sums to 1;  g(y) = f(y) / ||f(y)||
    embedding e_w(z)  = sum_k w_k * normalize(f(z) * m_k)               (B, D)
    distance  d(a, y) = ||e_w(a) - e_w(y)||_2 with w = w(a, y)

so d_far = d(a, far) and d_close = d(a, close) each have their own weights, computed from the pair they compare (the
paper's figure draws the branch on a pair of images). The loss is CSN's: the margin ranking loss plus its
embedding-norm and mask-norm terms (the mask norm averaged over the K masks). K is the number of the dataset's notions.

branch='triplet' is the released code's branch (its tripletnet.py): one weight vector per triplet from
fc1([g(a), g(far), g(close)]), shared by both distances. It sees the three images in role order, so it can learn which
slot holds the close image and pick the mask under which that image looks closer: it reads the answer (main.py
--test's order check shows it). It is kept only to measure that; the pair branch cannot see the slot order, since each
distance depends on its own pair alone.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from triplet_image_loader import UserError

NO_NOTION = ('SCE-Net (--model scenet) weighs its masks per pair of images, from the images themselves, and has no '
             'embedding per notion: it compares triplets (main.py --test reports their accuracy), it cannot {what}')
BRANCHES = ('pair', 'triplet')


class SCENet(nn.Module):
    """embed(x) is the raw embedding f(x) (B, D) whatever the notion; triplet_distances compares a triplet."""

    per_notion_backbone = False
    per_notion_embedding = False  # no retrieval, ONNX or pictures by notion
    norm_penalties = True

    def __init__(self, embeddingnet, n_masks, dim_embed, hidden=32, branch='pair'):
        super().__init__()
        if branch not in BRANCHES:
            raise ValueError(f'branch {branch!r}: one of {BRANCHES}')
        self.branch = branch
        self.embeddingnet = embeddingnet
        self.masks = nn.Embedding(n_masks, dim_embed)  # (K, D)
        with torch.no_grad():
            self.masks.weight.normal_(0.9, 0.7)
        self.fc1 = nn.Linear((2 if branch == 'pair' else 3) * dim_embed, hidden)  # the condition branch
        self.fc2 = nn.Linear(hidden, n_masks)

    def embed(self, x, c=None):  # (B, 3, H, W); c is not used
        if torch.onnx.is_in_onnx_export():
            raise UserError(NO_NOTION.format(what='be exported as ONNX (images and notions in, embeddings out)'))
        return self.embeddingnet(x)  # (B, D)

    def condition_weights(self, *embs):
        """Raw embeddings (B, D) of the images the branch sees (anchor and one image; or anchor, far, close) ->
        weights over the masks (B, K)."""
        feat = torch.cat([F.normalize(e.float(), dim=1) for e in embs], 1)  # (B, 2D) or (B, 3D)
        return F.softmax(self.fc2(F.relu(self.fc1(feat))).float(), 1)  # (B, K)

    def triplet_distances(self, emb, c=None):
        """Raw embeddings (3B, D) of anchors, fars, closes -> d_far, d_close (B,), and the mean L1 norm of the masks
        for each image (3B,)."""
        ea, ef, ec = emb.float().chunk(3)  # (B, D) each
        m = F.relu(self.masks.weight).float()  # (K, D)
        unit = lambda e: F.normalize(e[:, None, :] * m[None], dim=2)  # (B, K, D): each masked embedding, unit length
        mix = lambda w, u: (w[:, :, None] * u).sum(1)  # (B, K), (B, K, D) -> (B, D)
        ua, uf, uc = unit(ea), unit(ef), unit(ec)
        if self.branch == 'pair':
            w_far, w_close = self.condition_weights(ea, ef), self.condition_weights(ea, ec)  # (B, K) each
        else:
            w_far = w_close = self.condition_weights(ea, ef, ec)  # (B, K): the released code's, one per triplet
        d_far = F.pairwise_distance(mix(w_far, ua), mix(w_far, uf), 2)
        d_close = F.pairwise_distance(mix(w_close, ua), mix(w_close, uc), 2)
        mask_l1 = m.abs().sum(1).mean().expand(emb.shape[0])  # (3B,)
        return d_far, d_close, mask_l1

    def concept_masks(self):
        """The K learned masks relu(M) (K, D) (not one per notion)."""
        return F.relu(self.masks.weight)

    def mask_weights(self):
        """None: no mask belongs to a notion (concept_masks are the K masks)."""
        return None

    def apply_mask(self, emb, c):
        raise UserError(NO_NOTION.format(what='embed an image under a notion (retrieval by notion)'))
