"""A trained model of main.py in Python: images in, embeddings, masked distances and nearest neighbours out.

    model = TrainedCSN.load('runs/csn/model_best.pth.tar')       # or torch.hub.load(REPO, 'csn', checkpoint=...)
    x = torch.stack([model.transform(Image.open(p)) for p in paths])   # (B, 3, S, S)
    model.distance(x[:1], x[1:], 'font')                               # (B - 1,) distances under the notion 'font'
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from csnlib.builder import load_model
from csnlib.catalogue import notion_index_for
from csnlib.checkpoint import trained_conditions
from csnlib.loader import to_input
from csnlib.search import Index
from triplet_image_loader import DataError, check_image_size, load_image, notion_index


class Transform:
    """PIL image (or image file) -> normalised float tensor (3, S, S), exactly as the test path prepares images:
    RGB, shorter side resized to S, centre crop S x S, uint8, then ImageNet normalisation (to_input)."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        if isinstance(image, Image.Image):
            from torchvision.transforms import functional as TF
            check_image_size(image, 'transform')  # before it is decoded (a lazily loaded file) or resized
            image = TF.center_crop(TF.resize(image.convert('RGB'), self.size), self.size)
            u8 = np.asarray(image, dtype=np.uint8)  # (S, S, 3)
        else:
            u8 = load_image(image, self.size)  # a path
        return to_input(torch.from_numpy(u8.copy())[None], torch.device('cpu'), False)[0]  # (3, S, S)

    def __repr__(self):
        return f'Transform(size={self.size}: RGB, resize shorter side, centre crop, ImageNet normalisation)'


class TrainedCSN(nn.Module):
    """A checkpoint's model, in eval mode: `notions` (names, in index order), `image_size`, `transform`, `embed`,
    `distance`, `nearest` and `index`. Notions go by name or index; the ones the checkpoint was not trained on are
    refused. Task-specific networks route each notion to its own network."""

    def __init__(self, model, notions, conditions, image_size, amp_dtype=None):
        super().__init__()
        self.model = model.eval()  # the TripletNet of main.py
        self.notions = list(notions)
        self.conditions = sorted(int(c) for c in conditions)  # the notions it was trained on
        self.image_size = image_size
        self.transform = Transform(image_size)
        self.amp_dtype = amp_dtype  # autocast dtype (None: float32)
        self.eval()

    @classmethod
    def load(cls, checkpoint, device='cpu'):
        """From a checkpoint of main.py, in float32 on the device."""
        return load_trained(checkpoint, device)[0]

    @property
    def net(self):
        return self.model.embednet  # ConditionalSimNet, TripletEmbedNet or TaskSpecificNets

    @property
    def device(self):
        return next(self.parameters()).device

    def notion_index(self, notion):
        """A notion's index from its name or index; unknown and untrained notions raise ValueError (DataError)."""
        c = notion_index(notion, self.notions, flag='notion', owner='this model')
        if not getattr(self.net, 'per_notion_embedding', True):  # SCE-Net: its masks are weighed per triplet
            raise DataError(f'notion {notion!r}: this model (SCE-Net) weighs its masks per triplet and has no '
                            f'embedding per notion to embed, compare or search with; use a CSN, ASEN or '
                            f'task-specific networks')
        return notion_index(c, self.notions, self.conditions, flag='notion',
                            what='network' if self.net.per_notion_backbone else 'mask')

    def masks(self):
        """The masks m_c (C, D), float32; ones for models without masks."""
        w = self.net.mask_weights()
        if w is None:
            return torch.ones(len(self.notions), self.net_dim(), device=self.device)
        return w.detach().float()

    def net_dim(self):
        nets = self.net.nets if self.net.per_notion_backbone else [self.net.embeddingnet]
        return nets[0].fc.out_features

    @torch.no_grad()
    def embed(self, x, notion=None):
        """Images (B, 3, S, S) (or one (3, S, S)) as `transform` gives them -> raw embeddings f(x) (B, D), float32;
        task-specific networks: (C, B, D), one per notion, as embeddings.npy holds them. With a notion: the masked
        embeddings f(x) * m_c (B, D) (task-specific networks: that notion's network)."""
        x = x.to(self.device)
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f'embed: expected images (B, 3, S, S) as model.transform gives them, got {tuple(x.shape)}')
        if notion is None and self.net.per_notion_backbone:
            return torch.stack([self._raw(x, c) for c in range(len(self.notions))])  # (C, B, D)
        if notion is None:
            return self._raw(x, None)  # (B, D)
        c = self.notion_index(notion)
        return self.net.apply_mask(self._raw(x, c), torch.full((x.shape[0],), c, device=self.device))[0]  # (B, D)

    def _raw(self, x, c):
        with torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return self.net.embed(x, c).float()  # (B, D)

    @torch.no_grad()
    def distance(self, x, y, notion):
        """Masked distances d(x, y | c) = ||f(x) m_c - f(y) m_c||_2 between images x and y (B, 3, S, S): (B,).
        The same distance as training's (tripletnet.masked_distances)."""
        return F.pairwise_distance(self.embed(x, notion), self.embed(y, notion), 2)  # (B,)

    def index(self, gallery_embeddings, notion=None, kind='exact', **options):
        """A search index over the gallery, to query many times. Without a notion: one index for every trained notion
        (csnlib.catalogue: for a mask model one CatalogueIndex over f(x), kinds 'exact' and 'ivf'; for task-specific
        networks, ASEN or kind 'hnsw' one Index per notion), queried with index.search(model.embed(images), k,
        notion=...). With a notion: that notion's csnlib.search.Index over f(x) * m_c ('exact', or faiss's 'ivf',
        whose defaults reach recall@10 0.98 over 1M rows, or 'hnsw'), queried with index.search(model.embed(images,
        notion), k). Options such as nprobe, codes, rerank, ef_search go to the index. gallery_embeddings: raw
        embeddings (N, D) as `embed(images)` or embeddings.npy give them ((C, N, D) for task-specific networks, or,
        with a notion, that notion's (N, D))."""
        g = torch.as_tensor(gallery_embeddings).float()
        if notion is None:
            if not getattr(self.net, 'per_notion_embedding', True):
                self.notion_index(self.conditions[0])  # SCE-Net: refused, with the reason
            return notion_index_for(g.cpu().numpy(), self.masks().cpu().numpy(), kind, self.notions, self.notion_index,
                                    self.conditions, **options)
        c = self.notion_index(notion)
        g = g[c] if g.ndim == 3 else g  # (N, D)
        return Index((g * self.masks()[c].cpu()).numpy(), kind, **options)  # search on f(x) * m_c

    def nearest(self, query, gallery_embeddings, notion, k=10, kind='exact', **options):
        """The k nearest gallery items of each query under a notion, nearest first: (indices (Q, k) int64,
        distances (Q, k) float32). query: images (Q, 3, S, S), or raw embeddings (Q, D) / (D,) (task-specific
        networks: that notion's network's). gallery_embeddings: as for `index`."""
        c = self.notion_index(notion)
        query = torch.as_tensor(query)
        if query.ndim == 4:
            q = self.embed(query, c).cpu()  # (Q, D), masked
        else:
            q = query.float().reshape(-1, query.shape[-1]).cpu() * self.masks()[c].cpu()  # (Q, D)
        idx, dist = self.index(gallery_embeddings, c, kind, **options).search(q.numpy(), k)
        return torch.from_numpy(idx), torch.from_numpy(dist)


def load_trained(checkpoint, device='cpu', amp='off', data=None, batch_size=256):
    """(TrainedCSN, checkpoint dict, Runtime) for scripts that also embed datasets (retrieve.py). amp 'off' computes in
    float32, None takes the checkpoint's setting; data and batch_size go to the Runtime (see checkpoint.load_model)."""
    tnet, ckpt, rt = load_model(checkpoint, data, device, amp, batch_size)
    net = tnet.embednet
    n = (len(net.nets) if net.per_notion_backbone else
         net.masks.num_embeddings if net.mask_weights() is not None else len(ckpt.get('notions') or []))
    notions = ckpt.get('notions') or [str(i) for i in range(n)]
    return TrainedCSN(tnet, notions, trained_conditions(ckpt, notions), rt.args.image_size, rt.amp_dtype), ckpt, rt


def check_notions(ckpt, info, checkpoint):
    """Refuse a dataset whose notions are not the checkpoint's, in the same order (its masks would mean others)."""
    if ckpt.get('notions') and ckpt['notions'] != info.notions:
        raise DataError(f'--resume {checkpoint} was trained on notions {ckpt["notions"]}, but {info.root} has '
                        f'{info.notions}: pass the --data folder it was trained on')
