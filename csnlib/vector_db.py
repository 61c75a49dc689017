"""A mask model's catalogue in LanceDB, an embedded vector database (pip install lancedb; optional): one row per image
with its augmented vector v(x) = [f(x); |m_u f(x)|^2] (csnlib.catalogue), and one row per notion with its mask, so
that the database alone answers any notion by inner product (LanceDB's 'dot' distance is 1 - <u, v>):

    db = lancedb.connect(uri)
    n = db.open_table('notions').search().where("name = 'font'").to_list()[0]            # its mask and slot
    u = np.concatenate([2 * np.square(n['mask']) * f_q, -np.eye(n['slots'])[n['slot']]])   # u(q, c)
    hits = db.open_table('images').search(u).distance_type('dot').limit(10).to_list()
    d = sqrt(|m_c f(q)|^2 - 1 + hit['_distance'])                                          # the masked distance
"""
import numpy as np

from csnlib.catalogue import augmented_vectors, query_vectors
from triplet_image_loader import UserError, notion_index

IMAGES, NOTIONS = 'images', 'notions'  # the tables


def import_lancedb():
    """(lancedb, pyarrow), or a UserError saying how to install them."""
    try:
        import lancedb
        import pyarrow
    except ImportError:
        raise UserError('exporting to a vector database needs LanceDB: pip install lancedb (requirements-dev.txt '
                        'has it)') from None
    return lancedb, pyarrow


def _mode(db, table):
    """'overwrite' for a table that is there, else 'create' (LanceDB warns when it overwrites nothing)."""
    try:
        db.open_table(table)
    except ValueError:  # not found
        return 'create'
    return 'overwrite'


def export_catalogue(uri, emb, masks, paths, notions, conditions=None, **connect):
    """Write the catalogue to the LanceDB database at uri (a folder; s3://... or gs://... for object storage;
    db://NAME for LanceDB Cloud, with api_key= or LANCEDB_API_KEY; connect: more lancedb.connect arguments): table
    'images' (id, path, vector v(x) (D + U) float32) and table 'notions' (name, notion, slot, slots, mask (D,) float32,
    trained), both replaced. emb: raw embeddings (N, D) of a mask model; masks (C, D); paths (N,); conditions: the
    trained notions (default all). Returns the connection."""
    lancedb, pa = import_lancedb()
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2:
        raise UserError(f'the vector database export needs one embedding per image (N, D), not {emb.shape}: '
                        f'task-specific networks and ASEN embed each image once per notion')
    if len(paths) != len(emb):
        raise UserError(f'the vector database export: {len(paths)} paths for {len(emb)} embeddings')
    v, slots = augmented_vectors(emb, masks)  # (N, D + U), (C,)
    masks = np.asarray(masks, dtype=np.float32)
    conditions = set(range(len(masks)) if conditions is None else conditions)

    def vectors(a):  # (R, W) -> a fixed-size list column of float32
        return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a, np.float32).reshape(-1)), a.shape[1])

    try:
        db = lancedb.connect(uri, **connect)
        db.create_table(IMAGES, pa.table({'id': pa.array(np.arange(len(v), dtype=np.int64)),
                                          'path': pa.array([str(p) for p in paths]), 'vector': vectors(v)}),
                        mode=_mode(db, IMAGES))
        db.create_table(NOTIONS, pa.table({'name': pa.array([str(n) for n in notions]),
                                           'notion': pa.array(np.arange(len(masks), dtype=np.int64)),
                                           'slot': pa.array(slots), 'slots': pa.array([v.shape[1] - emb.shape[1]] *
                                                                                      len(masks), pa.int64()),
                                           'mask': vectors(masks),
                                           'trained': pa.array([c in conditions for c in range(len(masks))])}),
                        mode=_mode(db, NOTIONS))
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f'cannot write the vector database at {uri} ({type(e).__name__}: {e})') from None
    return db


def search_catalogue(db, raw_queries, k, notion):
    """The k nearest images of each raw query f(q) (Q, D) under notion (name or index), asked of the database itself
    (LanceDB's flat search, exact): (ids (Q, k) int64, paths, masked distances (Q, k) float32), nearest first."""
    rows = db.open_table(NOTIONS).to_arrow().to_pylist()
    rows.sort(key=lambda r: r['notion'])
    names = [r['name'] for r in rows]
    c = notion_index(notion, names, [r['notion'] for r in rows if r['trained']], flag='notion',
                     owner='this catalogue')
    masks = np.array([r['mask'] for r in rows], np.float32)  # (C, D)
    slots = np.array([r['slot'] for r in rows], np.int64)  # (C,)
    q = np.atleast_2d(np.asarray(raw_queries, dtype=np.float32))  # (Q, D)
    u = query_vectors(q, masks, slots, c)  # (Q, D + U)
    norm = ((q.astype(np.float64) * masks[c]) ** 2).sum(1)  # (Q,) |m_c f(q)|^2
    table = db.open_table(IMAGES)
    ids, paths, dist = [], [], []
    for x, n2 in zip(u, norm):
        # LanceDB's flat search; its 'dot' distance is 1 - <u, v>
        hits = table.search(x).distance_type('dot').limit(k).select(['id', 'path', '_distance']).to_list()
        ids.append([h['id'] for h in hits])
        paths.append([h['path'] for h in hits])
        dist.append([np.sqrt(max(n2 - 1 + h['_distance'], 0.0)) for h in hits])
    return np.array(ids, np.int64), paths, np.array(dist, np.float32)
