"""Retrieval with a trained model: nearest neighbours under a notion, retrieval mAP, and the embeddings of a whole
dataset cached next to its checkpoint.

The cache (written by export_embeddings, read by load_cached_embeddings):
  embeddings.npy  (N, D) raw embeddings f(x), or (C, N, D) for --model task (one network per notion)
  masks.npy       (C, D) the masks m_c (ones for models without masks)
  images.txt      filenames.json's paths: row i is image i
  embeddings.json the stamp, written last: what the arrays were computed from (the checkpoint's name, size, mtime_ns
                  and SHA-256; the data folder's real path; a SHA-256 of the image list and of every image's size and
                  mtime_ns; the image size) and the arrays' own shapes and SHA-256
Image i under notion c is  emb[i] * masks[c]  (emb[c, i] * masks[c] for task-specific networks), and the distance is
the Euclidean one the model was trained with. A cache whose stamp does not match this checkpoint and these images, or
whose arrays are not the ones stamped, of the wrong shape or not finite, is not used (with a note) but computed again.
"""
import hashlib
import json
import math
import os
import time

import numpy as np
import torch

from csnlib.atomic import atomic_open
from csnlib.checkpoint import describe
from csnlib.digest import file_sha256
from csnlib.errors import CheckpointError
from csnlib.evaluate import embed_dataset, labelled_subspaces
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


EXACT_EXTRA = 16  # candidates beyond k that exact search re-ranks: ties and near-ties at the k-th place are decided
# in float64, ties by index (neither faiss's float32 scores nor numpy's argpartition order them)
PQ_MIN_ROWS = 39 * 16  # 'pq4' codes need this many rows to train their 16 levels per dimension without faiss's warning


def _check_positive(name, value):
    """value as an int >= 1, else a UserError naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f'Index: {name} must be a positive integer, not {value!r}')
    return int(value)


class Index:
    """k-nearest-neighbour search over the rows of space (N, D) by Euclidean distance. kind 'exact': faiss's
    IndexFlatL2 when faiss is installed, else numpy (the same neighbours). kind 'ivf' (faiss): inverted lists over
    nlist k-means cells (default sqrt(N), at most N/39), of which the nprobe nearest are searched (default 128); their
    rows are held as `codes` 'pq4' (default from PQ_MIN_ROWS rows: one 4-bit product-quantizer code per dimension,
    scanned with faiss's fast-scan, IndexIVFPQFastScan, an eighth of the floats' memory) or 'flat' (the floats,
    IndexIVFFlat). kind 'hnsw' (faiss's IndexHNSWFlat): a graph with m links per node (default 32), built keeping
    ef_construction candidates (default 80) and searched keeping ef_search (default 192). An approximate index
    proposes `rerank` candidates per query (default 64, at least k), which are ranked again by their exact distance:
    every kind returns true distances, sorted. For a notion, space and queries are the masked embeddings f(x) * m_c,
    so learned (non-binary) masks weigh the dimensions as the model's distance does."""

    def __init__(self, space, kind='exact', use_faiss=None, nlist=None, nprobe=128, codes=None, m=32,
                 ef_construction=80, ef_search=192, rerank=64):
        if kind not in ('exact', 'ivf', 'hnsw'):
            raise UserError(f'unknown index {kind!r}: use exact, ivf or hnsw')
        if codes not in (None, 'pq4', 'flat'):
            raise UserError(f'Index: unknown codes {codes!r}: use pq4 or flat')
        self.nprobe, self.ef_search = _check_positive('nprobe', nprobe), _check_positive('ef_search', ef_search)
        self.rerank, m = _check_positive('rerank', rerank), _check_positive('m', m)
        ef_construction = _check_positive('ef_construction', ef_construction)
        faiss = faiss_or_none() if use_faiss is not False else None
        if use_faiss and faiss is None or kind != 'exact' and faiss is None:
            raise UserError(f'index {kind!r} needs faiss: pip install faiss-cpu')
        self.space = np.ascontiguousarray(space, dtype=np.float32)  # (N, D)
        self.kind, self.faiss = kind, faiss
        n, d = self.space.shape
        if nlist is not None and _check_positive('nlist', nlist) > max(1, n // 39):
            raise UserError(f'Index: nlist {nlist} is over N/39 = {n // 39} for {n} rows (k-means needs 39 points '
                            f'per cell): leave it out for sqrt(N), or pass a smaller one')
        if codes == 'pq4' and n < PQ_MIN_ROWS:
            raise UserError(f"Index: codes 'pq4' needs at least {PQ_MIN_ROWS} rows to train, not {n}: use codes "
                            f"'flat' or leave it out")
        self.codes = codes or ('pq4' if n >= PQ_MIN_ROWS else 'flat') if kind == 'ivf' else None
        if faiss is None:
            self.sq = np.einsum('nd,nd->n', self.space, self.space)  # (N,) squared norms
            return
        if kind == 'exact':
            self.index = faiss.IndexFlatL2(d)
        elif kind == 'hnsw':
            self.index = faiss.IndexHNSWFlat(d, m)
            self.index.hnsw.efConstruction = ef_construction
        else:
            self.nlist = nlist or max(1, min(math.isqrt(n), n // 39))  # sqrt(N) cells, each trained on >= 39 points
            quantizer = faiss.IndexFlatL2(d)
            self.index = (faiss.IndexIVFPQFastScan(quantizer, d, self.nlist, d, 4) if self.codes == 'pq4'
                          else faiss.IndexIVFFlat(quantizer, d, self.nlist))
            sample = np.random.default_rng(0).choice(n, min(n, max(64 * self.nlist, 4096)), replace=False)
            sample = self.space[np.sort(sample)]  # (S, D)
            faiss.Clustering(d, self.nlist, self.index.cp).train(sample, quantizer)  # the cells, on every thread
            # then the codes' d small k-means (16 levels each) on one: their OpenMP barriers stall on busy cores
            # (45 s instead of 1 s for 5,000 rows with another job on the second core)
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            try:
                self.index.train(sample)  # the cells are trained already: only the codes
            finally:
                faiss.omp_set_num_threads(threads)
        self.index.add(self.space)

    def __len__(self):
        return len(self.space)

    def search(self, queries, k, exclude=None):
        """The k nearest rows of each query (Q, D), nearest first (ties by index): (indices (Q, k) int64, distances
        (Q, k) float32). exclude: one row index per query (Q,) to leave out (the query itself), or None. k is
        capped at the rows there are; an approximate index may find fewer (index -1, distance inf)."""
        q, ex, k, kk = query_batch(queries, exclude, len(self), k)  # kk: one more, to drop the excluded row
        if k <= 0:
            return np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)
        if self.faiss is not None:
            if self.kind == 'ivf':
                self.index.nprobe = self.nprobe
            elif self.kind == 'hnsw':
                self.index.hnsw.efSearch = self.ef_search
            idx = self.index.search(q, min(kk + EXACT_EXTRA, len(self)) if self.kind == 'exact'
                                    else max(kk, self.rerank))[1]  # (Q, candidates)
        else:
            idx = self._numpy_search(q, min(kk + EXACT_EXTRA, len(self)))[1]
        # the candidates' distances again, directly: |a|^2 - 2ab + |b|^2 loses digits for close pairs, and an
        # approximate index's are estimates (ivf's 4-bit codes): this ranks its candidates by the exact distance
        return rank_candidates(idx, ((self.space[idx] - q[:, None]) ** 2).sum(2, dtype=np.float64), k, ex)

    def _numpy_search(self, q, k, chunk=1 << 25):
        """Exact search in numpy, queries in chunks of about `chunk` distances: ((Q, k) squared distances, indices)."""
        out_d, out_i = [], []
        step = max(1, chunk // max(len(self), 1))
        for s in range(0, len(q), step):
            qq = q[s:s + step]
            d = self.sq[None] - 2 * (qq @ self.space.T) + np.einsum('qd,qd->q', qq, qq)[:, None]  # (q, N)
            top = (np.argpartition(d, k - 1, axis=1)[:, :k] if k < d.shape[1]
                   else np.tile(np.arange(d.shape[1]), (len(qq), 1)))
            out_i.append(top)
            out_d.append(np.take_along_axis(d, top, 1))
        return np.concatenate(out_d), np.concatenate(out_i)


def query_batch(queries, exclude, n, k):
    """(queries (Q, D) float32, exclude (Q,) int64 or None, k capped at the rows there are, k + 1 with exclude)."""
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)  # (Q, D)
    ex = None if exclude is None else np.broadcast_to(np.asarray(exclude, dtype=np.int64).reshape(-1), (len(q),))
    k = min(k, n - (ex is not None))
    return q, ex, k, k + (ex is not None)


def rank_candidates(idx, d2, k, ex):
    """Candidates idx (Q, R) with their exact squared distances d2 (Q, R) float64 -> the k nearest (indices (Q, k)
    int64, distances (Q, k) float32), ties by index; index -1 (fewer found) ranks last at inf, and so does the excluded
    row of each query (ex (Q,) or None), which is then dropped."""
    d2 = np.where(idx < 0, np.inf, d2)
    order = np.lexsort((idx, d2), axis=1)  # by distance, ties by index
    idx, d2 = np.take_along_axis(idx, order, 1), np.take_along_axis(d2, order, 1)
    if ex is not None:  # the excluded row goes last
        keep = np.argsort(idx == ex[:, None], axis=1, kind='stable')
        idx, d2 = np.take_along_axis(idx, keep, 1), np.take_along_axis(d2, keep, 1)
    idx, d2 = idx[:, :k], d2[:, :k]  # (Q, k) the k nearest candidates
    return idx.astype(np.int64), np.sqrt(np.maximum(d2, 0)).astype(np.float32)


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


def protocol_map(per_notion, similarity='dot'):
    """ASEN's retrieval mAP (Ma et al., AAAI 2020; their mean_average_precision, with a stable sort). per_notion:
    {notion: (query embeddings (Q, D), query values (Q,), candidate embeddings (N, D), candidate values (N,))}, all
    under that notion. Each query ranks every candidate of its notion, by dot product (similarity 'dot', largest
    first) or by Euclidean distance ('euclidean', smallest first), ties in candidate order; relevant = same value; AP
    over the whole ranking, 0 for a query with no relevant candidate. Returns {'mAP': the mean AP over all queries
    (each notion weighted by its queries), 'per_notion': {notion: mean AP over its queries}, 'queries': {notion: Q}}."""
    if similarity not in ('dot', 'euclidean'):
        raise UserError(f'protocol_map: unknown similarity {similarity!r}: use dot or euclidean')
    per, counts, total = {}, {}, 0.0
    for name, (q, q_val, cand, c_val) in per_notion.items():
        q = torch.as_tensor(np.asarray(q, dtype=np.float32))  # (Q, D)
        cand = torch.as_tensor(np.asarray(cand, dtype=np.float32))  # (N, D)
        _, codes = np.unique(np.concatenate([np.asarray(q_val).reshape(-1), np.asarray(c_val).reshape(-1)]).astype(str),
                             return_inverse=True)
        q_code, c_code = torch.from_numpy(codes[:len(q)]), torch.from_numpy(codes[len(q):])
        if similarity == 'dot':
            key = -(q @ cand.T)  # (Q, N): smaller ranks first
        else:
            key = (q * q).sum(1)[:, None] + (cand * cand).sum(1)[None, :] - 2 * q @ cand.T  # (Q, N) squared distances
        order = torch.sort(key, dim=1, stable=True).indices  # (Q, N)
        rel = (c_code[order] == q_code[:, None]).double()  # (Q, N) relevant at each rank
        ranks = torch.arange(1, len(cand) + 1, dtype=torch.float64)
        ap = (rel.cumsum(1) / ranks * rel).sum(1) / rel.sum(1).clamp(min=1)  # (Q,), 0 without a relevant candidate
        per[name], counts[name] = float(ap.mean()) if len(q) else float('nan'), len(q)
        total += float(ap.sum())
    n = sum(counts.values())
    return {'mAP': total / n if n else float('nan'), 'per_notion': per, 'queries': counts}


def notion_map(emb, masks, images, labels, notions, conditions):
    """{notion: mAP or None} over `images` (rows of emb); images with an unknown ('') label are left out."""
    per = {}
    for name, space, lab in labelled_subspaces(emb, masks, images, labels, notions, conditions):
        m = mean_average_precision(space, lab)
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

CACHE_VERSION = 3  # embeddings.json's layout; a cache of another version is computed again


def _array_sha256(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _images_stamp(info):
    """What the embeddings were computed from on the data side: the folder, the image list, each image's size, mtime_ns,
    ctime_ns and inode (a file replaced by another of the same size and mtime still changes its ctime or inode, as the
    image cache's stamp has it; a missing image stamps as -1)."""
    h = hashlib.sha256()
    for i, name in enumerate(info.filenames):
        try:
            st = os.stat(info.image_path(i))
            stats = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        except OSError:
            stats = (-1,) * 4
        h.update('\0'.join(map(str, (name, *stats))).encode('utf-8', 'surrogateescape') + b'\n')
    names = hashlib.sha256('\n'.join(info.filenames).encode('utf-8', 'surrogateescape')).hexdigest()
    return {'data': os.path.realpath(info.root), 'images_dir': os.path.realpath(info.images_dir),
            'images': len(info.filenames), 'filenames_sha256': names, 'image_stats_sha256': h.hexdigest()}


def _checkpoint_stamp(checkpoint, digest=True):
    st = os.stat(checkpoint)
    out = {'checkpoint': os.path.basename(checkpoint), 'checkpoint_size': st.st_size,
           'checkpoint_mtime_ns': st.st_mtime_ns}
    return {**out, 'checkpoint_sha256': file_sha256(checkpoint)} if digest else out


def _stale(meta, checkpoint, info, args):
    """Why a stamp does not describe embeddings of this checkpoint and these images, or None when it does."""
    if not isinstance(meta, dict) or meta.get('cache_version') != CACHE_VERSION:
        return 'it was written by older code (no stamp of the images it embedded)'
    cheap = _checkpoint_stamp(checkpoint, digest=False)
    if meta.get('checkpoint') != cheap['checkpoint']:
        return f'it was computed from {meta.get("checkpoint")!r}, not {cheap["checkpoint"]!r}'
    if any(meta.get(k) != v for k, v in cheap.items()) or meta.get('checkpoint_sha256') != file_sha256(checkpoint):
        return f'the checkpoint {checkpoint} changed since (size, modification time or content)'
    now = _images_stamp(info)
    if meta.get('data') != now['data'] or meta.get('images_dir') != now['images_dir']:
        return f'it was computed from the images of {meta.get("data")}, not {now["data"]}'
    if meta.get('images') != now['images'] or meta.get('filenames_sha256') != now['filenames_sha256']:
        return f'the image list {os.path.join(info.root, "filenames.json")} changed since'
    if meta.get('image_stats_sha256') != now['image_stats_sha256']:
        return f'an image under {info.images_dir} changed since (its size, modification time, or the file itself)'
    if meta.get('image_size') != args.image_size:
        return f'it was computed at --image-size {meta.get("image_size")}, not {args.image_size}'
    return None


def _bad_arrays(emb, masks, meta, info, args):
    """Why the loaded arrays are not the ones stamped or cannot be searched, or None."""
    if _array_sha256(emb) != meta.get('embeddings_sha256') or _array_sha256(masks) != meta.get('masks_sha256'):
        return 'embeddings.npy or masks.npy is not the file its stamp describes (rewritten since?)'
    n, c, d = len(info.filenames), len(info.notions), getattr(args, 'dim_embed', None)
    want = (c, n, d) if getattr(args, 'model', None) == 'task' else (n, d)
    if emb.shape != want or masks.shape != (c, d) or emb.dtype.kind != 'f' or masks.dtype.kind != 'f':
        return (f'embeddings.npy is {emb.dtype} {tuple(emb.shape)} and masks.npy {masks.dtype} {tuple(masks.shape)}, '
                f'not float {want} and {(c, d)}')
    rows = int((~np.isfinite(emb.reshape(-1, n, d)).all((0, 2))).sum())  # images with a non-finite embedding
    if rows or not np.isfinite(masks).all():
        return (f'{rows} of its {n} images have non-finite embeddings (NaN or inf)' if rows
                else 'its masks are not finite')
    return None


def load_cached_embeddings(out_dir, checkpoint, info, args, log=print):
    """(emb, masks) from out_dir when its stamp says they were computed from this very checkpoint (name, size, mtime
    and content) and these images (the folder, the list, each image's size and mtime), and the arrays are the ones
    stamped, of the right shape and finite; else None, with a note saying why when a cache was there."""
    stamp = os.path.join(out_dir, STAMP)
    if not os.path.exists(stamp):
        if os.path.exists(os.path.join(out_dir, 'embeddings.npy')):
            log(f'note: {out_dir} holds embeddings.npy without its {STAMP} (an export that did not finish); they are '
                f'computed again')
        return None
    try:
        with open(stamp, encoding='utf-8') as f:
            meta = json.load(f)
        why = _stale(meta, checkpoint, info, args)
        if why is None:
            emb = np.load(os.path.join(out_dir, 'embeddings.npy'), allow_pickle=False)
            masks = np.load(os.path.join(out_dir, 'masks.npy'), allow_pickle=False)
            why = _bad_arrays(emb, masks, meta, info, args)
    except (OSError, ValueError, EOFError) as e:
        why = f'it cannot be read ({type(e).__name__}: {e})'
    if why is not None:
        log(f'note: the cached embeddings in {out_dir} are not used: {why}; they are computed again')
        return None
    return emb, masks


def export_embeddings(model, info, rt, out_dir, store=None, log=print):
    """Embed every image of the dataset and write embeddings.npy, masks.npy, images.txt and embeddings.json to
    out_dir (the checkpoint's folder, where retrieve.py looks). rt.resume names the checkpoint. Returns (emb, masks)."""
    if not getattr(model.embednet, 'per_notion_embedding', True):  # SCE-Net: its masks are weighed per triplet
        raise UserError(f'{rt.resume}: SCE-Net (--model scenet) weighs its masks per triplet and has no embedding per '
                        f'notion, so its embeddings cannot be exported or searched by notion (retrieve.py, '
                        f'--export-embeddings); evaluate it with main.py --test')
    t0, args = time.time(), rt.args
    store = store or make_store(info, rt)
    ckpt_stamp, images_stamp = _checkpoint_stamp(rt.resume), _images_stamp(info)  # as they were when embedded
    emb, masks = embed_dataset(model, np.arange(len(info.filenames)), store, rt, len(info.notions))
    if not (np.isfinite(emb).all() and np.isfinite(masks).all()):
        rows = np.flatnonzero(~np.isfinite(emb).reshape(-1, len(info.filenames), emb.shape[-1]).all((0, 2)))
        raise CheckpointError(f'{rt.resume}: the model gives non-finite embeddings (NaN or inf) for {len(rows)} of '
                              f'{len(info.filenames)} images '
                              f'(first: {info.filenames[rows[0]] if len(rows) else "the masks"}'
                              f'); its weights are broken: use another checkpoint')
    meta = {'cache_version': CACHE_VERSION, **ckpt_stamp, **images_stamp, 'image_size': args.image_size,
            'notions': list(info.notions), 'model': describe(args), 'embeddings_shape': list(emb.shape),
            'masks_shape': list(masks.shape), 'embeddings_sha256': _array_sha256(emb),
            'masks_sha256': _array_sha256(masks),
            'layout': 'image i under notion c: emb[i] * masks[c] ((N, D) embeddings), emb[c, i] * masks[c] ((C, N, D))'}
    stamp_path = os.path.join(out_dir, STAMP)
    try:
        os.makedirs(out_dir, exist_ok=True)
        try:
            os.remove(stamp_path)  # the stamp goes last: files without it are never taken for a finished export
        except FileNotFoundError:
            pass
        with atomic_open(os.path.join(out_dir, 'embeddings.npy'), 'wb') as f:
            np.save(f, emb)
        with atomic_open(os.path.join(out_dir, 'masks.npy'), 'wb') as f:
            np.save(f, masks)
        with atomic_open(os.path.join(out_dir, 'images.txt'), encoding='utf-8', errors='surrogateescape') as f:
            f.write('\n'.join(info.filenames) + '\n')
        with atomic_open(stamp_path, encoding='utf-8') as f:
            json.dump(meta, f, indent=2)
    except OSError as e:
        log(f'WARNING: cannot cache the embeddings in {out_dir} ({e.strerror or e}); they are used now and computed '
            f'again next time')
        return emb, masks
    log(f'wrote the embeddings of {len(info.filenames)} images {tuple(emb.shape)} and masks {tuple(masks.shape)} to '
        f'{out_dir} ({time.time() - t0:.1f} s)')
    return emb, masks


class _CountingStore:
    """An image store that moves a progress bar by the images it hands out (embedding in this process, workers 0)."""

    def __init__(self, store, bar):
        self.store, self.bar = store, bar

    def __getattr__(self, name):  # info, size, tracker, ... of the store it wraps
        if name == 'store':
            raise AttributeError(name)
        return getattr(self.store, name)

    def get(self, idx):
        out = self.store.get(idx)
        self.bar.update(len(idx))
        return out


def dataset_embeddings(model, info, rt, recompute=False, log=print):
    """(emb, masks) of every image of the dataset for the checkpoint rt.resume: from the cache next to it when that
    was computed from this checkpoint file and image list, else embedded (a tqdm bar on a terminal) and cached there."""
    from tqdm import tqdm
    cache_dir = os.path.dirname(os.path.abspath(rt.resume))
    cached = None if recompute else load_cached_embeddings(cache_dir, rt.resume, info, rt.args, log=log)
    if cached is not None:
        log(f'using cached embeddings {os.path.join(cache_dir, "embeddings.npy")} {tuple(cached[0].shape)}')
        return cached
    log(f'embedding the {len(info.filenames)} images of {info.root} with {describe(rt.args)} on {rt.device}')
    n = len(info.filenames) * (len(info.notions) if model.embednet.per_notion_backbone else 1)
    with tqdm(total=n, desc='embedding', unit='image', disable=None) as bar:
        return export_embeddings(model, info, rt, cache_dir, _CountingStore(make_store(info, rt), bar),
                                 log if bar.disable else bar.write)  # lines above the bar, not through it
