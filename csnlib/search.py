"""Retrieval with a trained model: nearest neighbours under a notion, retrieval mAP, and the embeddings of a whole
dataset cached next to its checkpoint.

The cache (written by export_embeddings, read by load_cached_embeddings):
  embeddings.npy  (N, D) raw embeddings f(x), or (C, N, D) for --model task (one network per notion)
  masks.npy       (C, D) the masks m_c (ones for models without masks)
  images.txt      filenames.json's paths: row i is image i
  embeddings.json the checkpoint's size and mtime (a changed checkpoint recomputes), the image list's hash, the shapes
Image i under notion c is  emb[i] * masks[c]  (emb[c, i] * masks[c] for task-specific networks), and the distance is
the Euclidean one the model was trained with.
"""
import hashlib
import json
import os
import time

import numpy as np
import torch

from csnlib.atomic import atomic_open
from csnlib.checkpoint import describe
from csnlib.evaluate import embed_dataset, subspace
from csnlib.image_cache import make_store
from csnlib.options import UserError
from triplet_image_loader import load_triplets, parse_conditions

STAMP = 'embeddings.json'


# ----------------------------------------------------------------------------------------------- search and mAP

def faiss_or_none():
    """The faiss module when it is installed (pip install faiss-cpu), else None."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


class Index:
    """k-nearest-neighbour search over the rows of space (N, D) by Euclidean distance. kind 'exact': faiss's
    IndexFlatL2 when faiss is installed, else numpy (the same neighbours); 'ivf' (inverted lists over nlist k-means
    cells, nprobe of them searched) and 'hnsw' (a graph with m links per node, ef_search candidates kept) are faiss's
    approximate indexes for large galleries. For a notion, space and queries are the masked embeddings f(x) * m_c,
    so learned (non-binary) masks weigh the dimensions as the model's distance does."""

    def __init__(self, space, kind='exact', use_faiss=None, nlist=None, nprobe=16, m=16, ef_search=128):
        if kind not in ('exact', 'ivf', 'hnsw'):
            raise UserError(f'unknown index {kind!r}: use exact, ivf or hnsw')
        faiss = faiss_or_none() if use_faiss is not False else None
        if use_faiss and faiss is None or kind != 'exact' and faiss is None:
            raise UserError(f'index {kind!r} needs faiss: pip install faiss-cpu')
        self.space = np.ascontiguousarray(space, dtype=np.float32)  # (N, D)
        self.kind, self.faiss, self.nprobe, self.ef_search = kind, faiss, nprobe, ef_search
        n, d = self.space.shape
        if faiss is None:
            self.sq = np.einsum('nd,nd->n', self.space, self.space)  # (N,) squared norms
            return
        if kind == 'exact':
            self.index = faiss.IndexFlatL2(d)
        elif kind == 'hnsw':
            self.index = faiss.IndexHNSWFlat(d, m)
        else:
            nlist = nlist or max(1, min(int(n ** 0.5), n // 64))  # sqrt(N) cells, each trained on >= 64 points
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
            sample = np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False)
            self.index.train(self.space[np.sort(sample)])
        self.index.add(self.space)

    def __len__(self):
        return len(self.space)

    def search(self, queries, k, exclude=None):
        """The k nearest rows of each query (Q, D), nearest first (ties by index): (indices (Q, k) int64, distances
        (Q, k) float32). exclude: one row index per query (Q,) to leave out (the query itself), or None. k is
        capped at the rows there are; an approximate index may find fewer (index -1, distance inf)."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)  # (Q, D)
        ex = None if exclude is None else np.broadcast_to(np.asarray(exclude, dtype=np.int64).reshape(-1), (len(q),))
        k = min(k, len(self) - (ex is not None))
        if k <= 0:
            return np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)
        kk = k + (ex is not None)  # one more, to drop the excluded row
        if self.faiss is not None:
            if self.kind == 'ivf':
                self.index.nprobe = self.nprobe
            elif self.kind == 'hnsw':
                self.index.hnsw.efSearch = self.ef_search
            idx = self.index.search(q, kk)[1]  # (Q, kk)
        else:
            idx = self._numpy_search(q, kk)[1]
        # the candidates' distances again, directly: |a|^2 - 2ab + |b|^2 loses digits for close pairs
        d2 = ((self.space[idx] - q[:, None]) ** 2).sum(2, dtype=np.float64)  # (Q, kk)
        d2[idx < 0] = np.inf  # fewer found (approximate indexes)
        order = np.lexsort((idx, d2), axis=1)  # by distance, ties by index
        idx, d2 = np.take_along_axis(idx, order, 1), np.take_along_axis(d2, order, 1)
        if ex is not None:  # the first k rows that are not excluded
            keep = np.argsort(idx == ex[:, None], axis=1, kind='stable')[:, :k]
            idx, d2 = np.take_along_axis(idx, keep, 1), np.take_along_axis(d2, keep, 1)
        return idx.astype(np.int64), np.sqrt(np.maximum(d2, 0)).astype(np.float32)

    def _numpy_search(self, q, k, chunk=1 << 25):
        """Exact search in numpy, queries in chunks of about `chunk` distances: ((Q, k) squared distances, indices)."""
        out_d, out_i = [], []
        step = max(1, chunk // max(len(self), 1))
        for s in range(0, len(q), step):
            qq = q[s:s + step]
            d = self.sq[None] - 2 * (qq @ self.space.T) + np.einsum('qd,qd->q', qq, qq)[:, None]  # (q, N)
            top = np.argpartition(d, k - 1, axis=1)[:, :k] if k < d.shape[1] else np.tile(np.arange(d.shape[1]), (len(qq), 1))
            out_i.append(top)
            out_d.append(np.take_along_axis(d, top, 1))
        return np.concatenate(out_d), np.concatenate(out_i)


def nearest(space, query, k, exclude=None, kind='exact'):
    """The k rows of space (N, D) nearest to query (D,) by Euclidean distance, nearest first: (indices, distances).
    faiss when installed (see Index)."""
    idx, dist = Index(space, kind).search(query[None], k, exclude)
    return idx[0], dist[0]


def average_precisions(space, labels, chunk=256):
    """Retrieval AP of each row as a query against all the other rows, ranked by Euclidean distance (ties by index);
    relevant = same label. (N,) float64; nan for a query whose label no other row has (its AP is undefined)."""
    x = torch.from_numpy(np.asarray(space, dtype=np.float32))  # (N, D)
    _, codes = np.unique(np.asarray(labels), return_inverse=True)
    codes = torch.from_numpy(codes.reshape(-1))
    n = len(x)
    sq = (x * x).sum(1)
    ranks = torch.arange(1, n + 1, dtype=torch.float32)
    out = np.full(n, np.nan)
    for s in range(0, n, chunk):
        q = torch.arange(s, min(s + chunk, n))
        d = sq[q, None] + sq[None, :] - 2 * x[q] @ x.T  # (Q, N) squared distances
        d[torch.arange(len(q)), q] = float('inf')  # the query is not its own candidate: ranked last, never relevant
        order = torch.sort(d, dim=1, stable=True).indices  # (Q, N)
        rel = (codes[order] == codes[q, None]) & (order != q[:, None])  # (Q, N) relevant at each rank
        n_rel = rel.sum(1)
        ap = (rel.cumsum(1) / ranks * rel).sum(1) / n_rel.clamp(min=1)  # mean precision at the relevant ranks
        out[s:s + len(q)] = torch.where(n_rel > 0, ap, float('nan')).numpy()
    return out


def mean_average_precision(space, labels):
    """mAP over the queries that have at least one relevant candidate (nan when none has)."""
    ap = average_precisions(space, labels)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float('nan')


def notion_map(emb, masks, images, labels, notions, conditions):
    """{notion: mAP or None} over `images` (rows of emb); images with an unknown ('') label are left out."""
    per = {}
    for c in conditions:
        name = notions[c]
        if name not in labels:
            continue
        lab = np.asarray(labels[name], dtype=object)[images]
        known = lab != ''
        m = mean_average_precision(subspace(emb, masks, c)[known], lab[known].astype(str))
        per[name] = None if np.isnan(m) else m
    return per


def test_images(info, args, log=print):
    """The distinct images of the test split's triplets (the selected notions), sorted."""
    conditions = parse_conditions(args.conditions, info.notions)
    trip, _ = load_triplets(info, 'test', conditions, args.num_testtriplets, args.seed, args.skip_bad_triplets, log)
    return np.unique(trip)


def retrieval_map(model, info, images, labels, rt, store=None, emb=None):
    """Per-notion retrieval mAP as in ASEN (AAAI 2020): queries and candidates are `images` (the test images), relevant
    = same label under the notion, a query is not its own candidate, unlabelled images are left out for that notion.
    emb: (emb, masks) of `images` from embed_dataset, to embed them only once. Returns {'mAP', 'per_notion'}."""
    images = np.asarray(images)
    if emb is None:
        store = store or make_store(info, rt)
        emb = embed_dataset(model, images, store, rt, len(info.notions))
    per = notion_map(emb[0], emb[1], images, labels, info.notions, parse_conditions(rt.args.conditions, info.notions))
    known = [v for v in per.values() if v is not None]
    return {'mAP': float(np.mean(known)) if known else None, 'per_notion': per}


# ----------------------------------------------------------------------------------------------- the cache

def _stamp(checkpoint, info, args):
    st = os.stat(checkpoint)
    names = hashlib.sha1('\n'.join(info.filenames).encode()).hexdigest()
    return {'checkpoint': os.path.basename(checkpoint), 'checkpoint_size': st.st_size,
            'checkpoint_mtime_ns': st.st_mtime_ns, 'images': len(info.filenames), 'filenames_sha1': names,
            'image_size': args.image_size}


def load_cached_embeddings(out_dir, checkpoint, info, args):
    """(emb, masks) from out_dir when they were computed from this very checkpoint file and image list, else None."""
    try:
        with open(os.path.join(out_dir, STAMP)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if {k: meta.get(k) for k in _stamp(checkpoint, info, args)} != _stamp(checkpoint, info, args):
        return None
    try:
        emb, masks = np.load(os.path.join(out_dir, 'embeddings.npy')), np.load(os.path.join(out_dir, 'masks.npy'))
    except (OSError, ValueError):
        return None
    return (emb, masks) if emb.shape[-2] == len(info.filenames) and masks.shape[0] == len(info.notions) else None


def export_embeddings(model, info, rt, out_dir, store=None, log=print):
    """Embed every image of the dataset and write embeddings.npy, masks.npy, images.txt and embeddings.json to
    out_dir (the checkpoint's folder, where retrieve.py looks). rt.resume names the checkpoint. Returns (emb, masks)."""
    t0, args = time.time(), rt.args
    store = store or make_store(info, rt)
    emb, masks = embed_dataset(model, np.arange(len(info.filenames)), store, rt, len(info.notions))
    os.makedirs(out_dir, exist_ok=True)
    stamp_path = os.path.join(out_dir, STAMP)
    if os.path.exists(stamp_path):
        os.remove(stamp_path)  # the stamp goes last: files without it are never taken for a finished export
    with atomic_open(os.path.join(out_dir, 'embeddings.npy'), 'wb') as f:
        np.save(f, emb)
    with atomic_open(os.path.join(out_dir, 'masks.npy'), 'wb') as f:
        np.save(f, masks)
    with atomic_open(os.path.join(out_dir, 'images.txt')) as f:
        f.write('\n'.join(info.filenames) + '\n')
    meta = {**_stamp(rt.resume, info, args), 'data': os.path.abspath(info.root), 'notions': list(info.notions),
            'model': describe(args), 'embeddings_shape': list(emb.shape), 'masks_shape': list(masks.shape),
            'layout': 'image i under notion c: emb[i] * masks[c] ((N, D) embeddings), emb[c, i] * masks[c] ((C, N, D))'}
    with atomic_open(stamp_path) as f:
        json.dump(meta, f, indent=2)
    log(f'wrote the embeddings of {len(info.filenames)} images {tuple(emb.shape)} and masks {tuple(masks.shape)} to '
        f'{out_dir} ({time.time() - t0:.1f} s)')
    return emb, masks
