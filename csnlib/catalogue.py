"""One index for every notion of a mask model (CSN fixed, learned, prein; the standard triplet network): one stored
vector per image answers the masked-distance search of any notion, exactly.

For a mask model, d(q, x | c)^2 = |m_c f(q)|^2 - 2 <m_c^2 f(q), f(x)> + |m_c f(x)|^2. So store, once per image,
    v(x)    = [f(x); |m_1 f(x)|^2, ..., |m_C f(x)|^2]                 (D + C numbers)
and ask notion c with
    u(q, c) = [2 m_c^2 f(q); 0, ..., -1 at slot c, ..., 0]
then <u, v> = |m_c f(q)|^2 - d(q, x | c)^2: the largest inner products are the nearest images under notion c, and
d^2 = |m_c f(q)|^2 - <u, v>. It holds for any mask values (negative ones too: only m_c^2 enters), and for any linear
map W_c in place of the diagonal m_c (2 W_c^T W_c f(q) and |W_c f(x)|^2). It breaks where the embedding itself
depends on the notion: task-specific networks and ASEN give one f_c(x) per notion (no shared f(x) to store once), and
SCE-Net weighs its masks per triplet (no fixed metric per notion): those keep one index per notion (PerNotionIndex).
Notions whose masks are equal share one slot (the standard triplet network: one slot for every notion).

The score loses digits for close pairs (|m_c f(q)|^2 minus a number of the same size), so every kind re-ranks its
candidates by the masked distance computed directly from f(x), in float64, ties by index, as csnlib.search.Index does.
"""
import math

import numpy as np

from csnlib.search import EXACT_EXTRA, PQ_MIN_ROWS, Index, faiss_or_none, query_batch, rank_candidates
from triplet_image_loader import UserError, notion_index


def _positive(name, value):
    """value as an int >= 1, else a UserError naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f'CatalogueIndex: {name} must be a positive integer, not {value!r}')
    return int(value)


def mask_slots(masks):
    """The distinct mask rows and each notion's slot among them: ((U, D) float32, (C,) int64)."""
    rows, slot = np.unique(np.asarray(masks, dtype=np.float32), axis=0, return_inverse=True)
    return np.ascontiguousarray(rows), slot.reshape(-1).astype(np.int64)


def augmented_vectors(emb, masks):
    """v(x) = [f(x); |m_u f(x)|^2 for each distinct mask u]: (N, D + U) float32, and the notions' slots (C,)."""
    rows, slot = mask_slots(masks)
    emb = np.asarray(emb, dtype=np.float32)  # (N, D)
    sq = np.stack([np.einsum('nd,nd->n', emb * m, emb * m, dtype=np.float64) for m in rows], 1)  # (N, U)
    return np.ascontiguousarray(np.concatenate([emb, sq.astype(np.float32)], 1)), slot


def query_vectors(queries, masks, slots, c):
    """u(q, c) = [2 m_c^2 f(q); -1 at notion c's slot]: (Q, D + U) float32, for raw queries f(q) (Q, D)."""
    q = np.asarray(queries, dtype=np.float32)  # (Q, D)
    e = np.zeros((len(q), int(slots.max()) + 1), np.float32)  # (Q, U)
    e[:, slots[c]] = -1
    return np.ascontiguousarray(np.concatenate([2 * q * masks[c] ** 2, e], 1))


class CatalogueIndex:
    """k-nearest-neighbour search under any notion of a mask model from one index over the raw embeddings (N, D) and
    the masks (C, D): search(raw_queries, k, notion) returns what csnlib.search.Index over f(x) * m_c returns.
    kind 'exact': every inner product <u, v> (faiss's IndexFlatIP when faiss is installed, else numpy), the k + 16
    best re-ranked. kind 'ivf' (faiss) proposes `rerank` candidates (default 64), ranked by the true distance, from
    nlist k-means cells (default sqrt(N), at most N/39) whose rows are 4-bit codes ('pq4', default from 624 rows) or
    floats ('flat'). cells 'notion' (the default): each distinct mask its own cells and codes of f(x) * m_u (as
    csnlib.search.Index's ivf, nprobe default 128), beside the one copy of f(x) that re-ranks: routing as good as one
    index per notion, for about 40 bytes more per image and notion (64-d). cells 'shared': one partition of f(x)
    scaled by the notions' mean metric sqrt(mean_c m_c^2), holding the augmented vectors v(x); a query of notion c
    goes to the nprobe cells (default 256) whose centres are nearest under m_c (faiss's inverted file over v(x) with an
    inner-product quantizer): the least memory, but one partition routes every notion less well (see NOTES_DOCS.md's
    table). notions: their names (default '0', '1', ...); resolve: name or index -> index, refusing the notions that
    may not be searched (default: any of them)."""

    def __init__(self, emb, masks, kind='exact', notions=None, resolve=None, use_faiss=None, nlist=None, nprobe=None,
                 codes=None, rerank=64, cells='notion'):
        emb, masks = np.asarray(emb, dtype=np.float32), np.asarray(masks, dtype=np.float32)
        if emb.ndim != 2 or masks.ndim != 2 or emb.shape[1] != masks.shape[1]:
            raise UserError(f'CatalogueIndex: expected raw embeddings (N, D) and masks (C, D), got {emb.shape} and '
                            f'{masks.shape}; task-specific networks and ASEN ((C, N, D)) keep one index per notion '
                            f'(PerNotionIndex)')
        if kind not in ('exact', 'ivf'):
            raise UserError(f'CatalogueIndex: unknown index {kind!r}: use exact or ivf (hnsw: one index per notion, '
                            f'csnlib.search.Index)')
        if codes not in (None, 'pq4', 'flat'):
            raise UserError(f'CatalogueIndex: unknown codes {codes!r}: use pq4 or flat')
        if cells not in ('shared', 'notion'):
            raise UserError(f'CatalogueIndex: unknown cells {cells!r}: use shared or notion')
        self.cells = cells
        nprobe = (256 if cells == 'shared' else 128) if nprobe is None else nprobe
        self.nprobe, self.rerank = _positive('nprobe', nprobe), _positive('rerank', rerank)
        faiss = faiss_or_none() if use_faiss is not False else None
        if use_faiss and faiss is None or kind != 'exact' and faiss is None:
            raise UserError(f'index {kind!r} needs faiss: pip install faiss-cpu')
        n, d = emb.shape
        if nlist is not None and _positive('nlist', nlist) > max(1, n // 39):
            raise UserError(f'CatalogueIndex: nlist {nlist} is over N/39 = {n // 39} for {n} rows (k-means needs 39 '
                            f'points per cell): leave it out for sqrt(N), or pass a smaller one')
        self.kind, self.faiss, self.masks = kind, faiss, masks
        self.notions = [str(x) for x in notions] if notions is not None else [str(i) for i in range(len(masks))]
        self.resolve = resolve or (lambda c: notion_index(c, self.notions, flag='notion', owner='this index'))
        v, self.slots = augmented_vectors(emb, masks)  # (N, D + U), (C,)
        self.dim = d
        if faiss is not None and kind == 'exact':
            self.index = faiss.IndexFlatIP(v.shape[1])
            self.index.add(v)
            v = faiss.rev_swig_ptr(self.index.get_xb(), v.size).reshape(v.shape)  # faiss's copy: no second one
        self.vectors = v  # (N, D + U): f(x) and the squared masked norms, stored once
        if kind == 'ivf' and cells == 'notion':
            self._build_notion_cells(nlist, codes)
        elif kind == 'ivf':
            self._build_ivf(faiss, nlist, codes)

    def _build_notion_cells(self, nlist, codes):
        """cells 'notion': each distinct mask's own cells and 4-bit codes of f(x) * m_u (csnlib.search.Index's ivf,
        without its floats): routing as good as one index per notion; the floats f(x) stay stored once."""
        self.ivfs = []
        for m in mask_slots(self.masks)[0]:
            one = Index(self.vectors[:, :self.dim] * m, 'ivf', nlist=nlist, codes=codes)
            self.ivfs.append(one.index)  # faiss's index alone: the masked floats go
        self.nlist, self.codes = one.nlist, one.codes

    def _build_ivf(self, faiss, nlist, codes):
        """The inverted file over the augmented vectors, f(x) scaled by the notions' mean metric and the norms by a
        small factor (see the class)."""
        n, d, v = len(self), self.dim, self.vectors
        rows = mask_slots(self.masks)[0]  # (U, D)
        scale = np.sqrt((rows ** 2).mean(0))  # (D,) the notions' mean metric
        self.inv_scale = np.where(scale > 0, 1 / np.where(scale > 0, scale, 1), 0).astype(np.float32)  # (D,)
        w = v[:, :d] * scale  # (N, D)
        # the norms' columns times alpha (and the query's -1 times 1 / alpha: <u, v> is the same) weigh next to nothing
        # in the L2 distance that assigns images to cells, so cells are by f(x) alone, and centres and residuals keep
        # the norms' columns: the codes hold the residuals, as csnlib.search.Index's do
        self.alpha = float(1e-3 * np.sqrt((w ** 2).mean() + 1e-30) / max(float(v[:, d:].mean()), 1e-30))
        scaled = np.concatenate([w, v[:, d:] * self.alpha], 1).astype(np.float32)  # (N, D + U)
        width = scaled.shape[1]
        self.nlist = nlist or max(1, min(math.isqrt(n), n // 39))
        self.codes = codes or ('pq4' if n >= PQ_MIN_ROWS else 'flat')
        sample = np.sort(np.random.default_rng(0).choice(n, min(n, max(64 * self.nlist, 4096)), replace=False))
        cells = faiss.IndexFlatL2(d)
        faiss.Clustering(d, self.nlist, faiss.ClusteringParameters()).train(scaled[sample, :d], cells)
        centres = faiss.rev_swig_ptr(cells.get_xb(), self.nlist * d).reshape(self.nlist, d)  # (nlist, D)
        raw = centres * self.inv_scale  # (nlist, D) the centres in f's own units
        norms = np.stack([((raw * m) ** 2).sum(1) for m in rows], 1) * self.alpha  # (nlist, U)
        centres = np.concatenate([centres, norms], 1).astype(np.float32)  # (nlist, D + U)
        assign = faiss.IndexFlatL2(width)  # adding: the nearest centre
        assign.add(centres)
        # searching: <u, centre> = |m_c q|^2 - d(q, centre | c)^2, the nearest cells under notion c first
        route = faiss.IndexFlatIP(width)
        route.add(centres)
        metric = faiss.METRIC_INNER_PRODUCT
        self.ivf = (faiss.IndexIVFPQFastScan(assign, width, self.nlist, width, 4, metric) if self.codes == 'pq4'
                    else faiss.IndexIVFFlat(assign, width, self.nlist, metric))
        self.ivf.by_residual = self.codes == 'pq4'  # 4-bit codes of the residuals to the cell's centre
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # the codes' small k-means: OpenMP barriers stall on busy cores (see Index)
        try:
            self.ivf.train(scaled[sample])  # the cells are there already: only the codes
        finally:
            faiss.omp_set_num_threads(threads)
        self.ivf.add(scaled)
        self.ivf.quantizer = route
        self._quantizers = (assign, route)  # faiss does not own them: keep them alive

    def __len__(self):
        return len(self.vectors)

    def row(self, i, notion=None):
        """The raw embedding f(x) of stored image i (D,): a query for any notion."""
        return self.vectors[i, :self.dim]

    def search(self, queries, k, notion, exclude=None):
        """The k nearest images of each raw query f(q) (Q, D) under notion (name or index), nearest first, with the
        true masked distances: (indices (Q, k) int64, distances (Q, k) float32). exclude: one row per query to leave
        out, or None. As csnlib.search.Index.search over f(x) * m_c."""
        c = self.resolve(notion)
        q, ex, k, kk = query_batch(queries, exclude, len(self), k)
        if q.shape[1] != self.dim:
            raise UserError(f'CatalogueIndex.search: queries of {q.shape[1]} dimensions, the index holds '
                            f'{self.dim}: pass raw embeddings f(q) (Q, {self.dim})')
        if k <= 0:
            return np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)
        u = query_vectors(q, self.masks, self.slots, c)  # (Q, D + U)
        if self.kind == 'ivf' and self.cells == 'notion':
            ivf = self.ivfs[self.slots[c]]
            ivf.nprobe = min(self.nprobe, self.nlist)
            idx = ivf.search(q * self.masks[c], max(kk, self.rerank))[1]  # (Q, R)
        elif self.kind == 'ivf':
            u[:, :self.dim] *= self.inv_scale  # the stored f(x) and norms are scaled: <u, v> stays the same
            u[:, self.dim:] /= self.alpha
            self.ivf.nprobe = min(self.nprobe, self.nlist)
            idx = self.ivf.search(u, max(kk, self.rerank))[1]  # (Q, R)
        elif self.faiss is not None:
            idx = self.index.search(u, min(kk + EXACT_EXTRA, len(self)))[1]  # (Q, R)
        else:
            idx = self._numpy_search(u, min(kk + EXACT_EXTRA, len(self)))
        m = self.masks[c]
        f = self.vectors[np.maximum(idx, 0), :self.dim] * m  # (Q, R, D) f(x) * m_c, as Index holds it
        d2 = ((f - (q * m)[:, None]) ** 2).sum(2, dtype=np.float64)  # (Q, R) the true distances, as Index's
        return rank_candidates(idx, d2, k, ex)

    def _numpy_search(self, u, r, chunk=1 << 25):
        """The r largest <u, v> of each query (Q, D + U): indices (Q, r), in chunks of about `chunk` scores."""
        out = []
        step = max(1, chunk // max(len(self), 1))
        for s in range(0, len(u), step):
            score = u[s:s + step] @ self.vectors.T  # (q, N)
            out.append(np.argpartition(-score, r - 1, axis=1)[:, :r] if r < score.shape[1]
                       else np.tile(np.arange(score.shape[1]), (len(score), 1)))
        return np.concatenate(out)

    def nbytes(self):
        """Bytes held: the augmented vectors and, for ivf, faiss's codes and lists."""
        ivfs = (self.ivfs if self.cells == 'notion' else [self.ivf]) if self.kind == 'ivf' else []
        extra = sum(len(self.faiss.serialize_index(ivf)) for ivf in ivfs)
        return self.vectors.nbytes + extra


class PerNotionIndex:
    """One csnlib.search.Index per notion, over f_c(x) * m_c, behind CatalogueIndex's interface: for task-specific
    networks and ASEN (embeddings (C, N, D): one per notion), and for any kind (hnsw). conditions: the notions to
    index (default all)."""

    def __init__(self, emb, masks, kind='exact', notions=None, resolve=None, conditions=None, **options):
        self.emb, self.masks = np.asarray(emb, dtype=np.float32), np.asarray(masks, dtype=np.float32)
        self.notions = [str(x) for x in notions] if notions is not None else [str(i) for i in range(len(masks))]
        self.resolve = resolve or (lambda c: notion_index(c, self.notions, flag='notion', owner='this index'))
        self.kind, self.dim = kind, self.emb.shape[-1]
        conditions = range(len(self.masks)) if conditions is None else conditions
        self.indexes = {c: Index(self._raw(c) * self.masks[c], kind, **options) for c in conditions}
        self.faiss = next(iter(self.indexes.values())).faiss if self.indexes else faiss_or_none()

    def _raw(self, c):
        return self.emb[c] if self.emb.ndim == 3 else self.emb  # (N, D)

    def __len__(self):
        return self.emb.shape[-2]

    def row(self, i, notion):
        """The raw embedding of stored image i under notion (D,) (its own network's for task-specific networks)."""
        return self._raw(self.resolve(notion))[i]

    def search(self, queries, k, notion, exclude=None):
        """As CatalogueIndex.search; queries are raw embeddings under the notion (its network's f_c(q))."""
        c = self.resolve(notion)
        if c not in self.indexes:
            raise UserError(f'notion {self.notions[c]}: not indexed here (indexed: '
                            f'{", ".join(self.notions[i] for i in self.indexes)})')
        return self.indexes[c].search(np.atleast_2d(np.asarray(queries, dtype=np.float32)) * self.masks[c], k, exclude)

    def nbytes(self):
        """Bytes held: each notion's masked copy and faiss's index."""
        return sum(ix.space.nbytes + (len(ix.faiss.serialize_index(ix.index)) if ix.faiss else 0)
                   for ix in self.indexes.values())


def notion_index_for(emb, masks, kind='exact', notions=None, resolve=None, conditions=None, **options):
    """The index that serves every notion: one CatalogueIndex for raw embeddings (N, D) of a mask model (kinds exact
    and ivf), else one index per notion (embeddings (C, N, D) of task-specific networks or ASEN, or kind hnsw)."""
    emb = np.asarray(emb)
    if emb.ndim == 2 and kind in ('exact', 'ivf'):
        return CatalogueIndex(emb, masks, kind, notions, resolve, **options)
    return PerNotionIndex(emb, masks, kind, notions, resolve, conditions, **options)
