"""SCE-Net, Similarity Condition Embedding (Tan et al., ICCV 2019): CSN's backbone and learned masks, with the mask to
use predicted from the triplet itself, so the notion label is never an input.

For a triplet (anchor a, far f, close x) with raw embeddings f(.) (B, D) and K learned masks m_k = relu(M_k) (K, D):

    weights   w = softmax(fc2(relu(fc1([g(a), g(f), g(x)]))))   (B, K), sums to 1;  g(y) = f(y) / ||f(y)||
    embedding e(y) = sum_k w_k * normalize(f(y) * m_k)            (B, D), one per image of the triplet
    distances d_far = ||e(a) - e(f)||_2,  d_close = ||e(a) - e(x)||_2

and the loss is CSN's: the margin ranking loss plus its embedding-norm and mask-norm terms (the mask norm averaged over
the K masks). K is the number of the dataset's notions, as the paper's Zappos runs use.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from triplet_image_loader import UserError

NO_NOTION = ('SCE-Net (--model scenet) weighs its masks per triplet, from the three images, and has no embedding per '
             'notion: it compares triplets (main.py --test reports their accuracy), it cannot {what}')


class SCENet(nn.Module):
    """embed(x) is the raw embedding f(x) (B, D) whatever the notion; triplet_distances compares a triplet."""

    per_notion_backbone = False
    per_notion_embedding = False  # no retrieval, ONNX or pictures by notion
    norm_penalties = True

    def __init__(self, embeddingnet, n_masks, dim_embed, hidden=32):
        super().__init__()
        self.embeddingnet = embeddingnet
        self.masks = nn.Embedding(n_masks, dim_embed)  # (K, D)
        with torch.no_grad():
            self.masks.weight.normal_(0.9, 0.7)
        self.fc1 = nn.Linear(3 * dim_embed, hidden)  # the condition branch
        self.fc2 = nn.Linear(hidden, n_masks)

    def embed(self, x, c=None):  # (B, 3, H, W); c is not used
        if torch.onnx.is_in_onnx_export():
            raise UserError(NO_NOTION.format(what='be exported as ONNX (images and notions in, embeddings out)'))
        return self.embeddingnet(x)  # (B, D)

    def condition_weights(self, emb):
        """Raw embeddings (3B, D) of anchors, fars, closes -> the triplets' weights over the masks (B, K)."""
        g = F.normalize(emb.float(), dim=1)  # (3B, D)
        feat = torch.cat(g.chunk(3), 1)  # (B, 3D)
        return F.softmax(self.fc2(F.relu(self.fc1(feat))).float(), 1)  # (B, K)

    def triplet_distances(self, emb, c=None):
        """Raw embeddings (3B, D) -> d_far, d_close (B,), and the mean L1 norm of the masks for each image (3B,)."""
        B = emb.shape[0] // 3
        w = self.condition_weights(emb)  # (B, K)
        m = F.relu(self.masks.weight).float()  # (K, D)
        masked = F.normalize(emb.float()[:, None, :] * m[None], dim=2)  # (3B, K, D)
        e = (masked.view(3, B, *m.shape) * w[None, :, :, None]).sum(2)  # (3, B, D)
        mask_l1 = m.abs().sum(1).mean().expand(emb.shape[0])  # (3B,)
        return F.pairwise_distance(e[0], e[1], 2), F.pairwise_distance(e[0], e[2], 2), mask_l1

    def concept_masks(self):
        """The K learned masks relu(M) (K, D) (not one per notion)."""
        return F.relu(self.masks.weight)

    def mask_weights(self):
        """None: no mask belongs to a notion (concept_masks are the K masks)."""
        return None

    def apply_mask(self, emb, c):
        raise UserError(NO_NOTION.format(what='embed an image under a notion (retrieval by notion)'))
