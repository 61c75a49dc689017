"""Use a trained model: nearest images under one notion of similarity, retrieval mAP, and pictures of what it learned.

    python retrieve.py --resume runs/csn/model_best.pth.tar --data data/fonts --query 123 --notion character --k 10
    python retrieve.py --resume runs/csn/model_best.pth.tar --query Roboto/a.png --notion font   (a path in filenames.json)
    python retrieve.py --resume runs/csn/model_best.pth.tar --query ~/my_glyph.png --notion font  (any image file)
    python retrieve.py --resume runs/csn/model_best.pth.tar                  (only compute and cache the embeddings)

The embeddings of every image in filenames.json are computed once and cached next to the checkpoint:
  embeddings.npy  (N, D) raw embeddings f(x), or (C, N, D) for --model task (one network per notion)
  masks.npy       (C, D) the masks m_c (ones for models without masks)
  images.txt      filenames.json's paths: row i is image i
  embeddings.json the checkpoint's size and mtime (a changed checkpoint recomputes), the image list's hash, the shapes
Image i under notion c is  emb[i] * masks[c]  (emb[c, i] * masks[c] for task-specific networks), and the distance is
the Euclidean one the model was trained with.
"""
import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch

import main as csn_main
from triplet_image_loader import DataError, load_dataset_info, load_image, load_triplets, parse_conditions, read_labels

CACHE_FILES = ('embeddings.npy', 'masks.npy', 'images.txt')
STAMP = 'embeddings.json'


# ----------------------------------------------------------------------------------------------- embeddings

@torch.no_grad()
def embed_dataset(model, images, store, args, device, amp_dtype, n_notions, done=None):
    """Raw embeddings of `images` and the masks, float32 numpy: ((N, D), or (C, N, D) for per-notion nets;
    (C, D)). done: images already embedded, as main.evaluate gives them ({None or notion: (sorted image indices, raw
    embeddings)}, with `images` sorted); they are reused and only the other images are embedded."""
    model.eval()
    done = done or {}

    def embed(c):  # (N, D) under notion c's network (c None: the one embedding)
        new = lambda imgs: csn_main.embed_images(model, imgs, store, args, device, amp_dtype, c=c).cpu().numpy()
        if c not in done:
            return new(images)
        idx, have = done[c][0], done[c][1].cpu().numpy()
        rest = np.setdiff1d(images, idx)  # done's images are some of `images`, which are then sorted
        if not len(rest):
            return have
        order = np.argsort(np.concatenate([idx, rest]), kind='stable')
        return np.concatenate([have, new(rest)])[order]

    if model.embednet.per_notion_backbone:
        emb = np.stack([embed(c) for c in range(n_notions)])  # (C, N, D)
    else:
        emb = embed(None)  # (N, D)
    w = model.embednet.mask_weights()
    masks = np.ones((n_notions, emb.shape[-1]), np.float32) if w is None else w.detach().float().cpu().numpy()
    return emb, masks


def subspace(emb, masks, c):
    """The embeddings that notion c compares: (N, D)."""
    return (emb[c] if emb.ndim == 3 else emb) * masks[c]


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


def _write_atomic(path, write):
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w' if path.endswith(('.txt', '.json')) else 'wb') as f:
        write(f)
    os.replace(tmp, path)


def export_embeddings(model, info, args, device, amp_dtype, out_dir, store=None, log=print):
    """Embed every image of the dataset and write embeddings.npy, masks.npy, images.txt and embeddings.json to
    out_dir (the checkpoint's folder, where retrieve.py looks). args.resume names the checkpoint. Returns (emb, masks)."""
    t0 = time.time()
    store = store or csn_main.make_store(info, args, True, 1, log)
    emb, masks = embed_dataset(model, np.arange(len(info.filenames)), store, args, device, amp_dtype, len(info.notions))
    os.makedirs(out_dir, exist_ok=True)
    stamp_path = os.path.join(out_dir, STAMP)
    if os.path.exists(stamp_path):
        os.remove(stamp_path)  # the stamp goes last: files without it are never taken for a finished export
    _write_atomic(os.path.join(out_dir, 'embeddings.npy'), lambda f: np.save(f, emb))
    _write_atomic(os.path.join(out_dir, 'masks.npy'), lambda f: np.save(f, masks))
    _write_atomic(os.path.join(out_dir, 'images.txt'), lambda f: f.write('\n'.join(info.filenames) + '\n'))
    meta = {**_stamp(args.resume, info, args), 'data': os.path.abspath(info.root), 'notions': list(info.notions),
            'model': csn_main.describe(args), 'embeddings_shape': list(emb.shape), 'masks_shape': list(masks.shape),
            'layout': 'image i under notion c: emb[i] * masks[c] ((N, D) embeddings), emb[c, i] * masks[c] ((C, N, D))'}
    _write_atomic(stamp_path, lambda f: json.dump(meta, f, indent=2))
    log(f'wrote the embeddings of {len(info.filenames)} images {tuple(emb.shape)} and masks {tuple(masks.shape)} to '
        f'{out_dir} ({time.time() - t0:.1f} s)')
    return emb, masks


# ----------------------------------------------------------------------------------------------- search and mAP

def nearest(space, query, k, exclude=None):
    """The k rows of space (N, D) nearest to query (D,) by Euclidean distance, nearest first: (indices, distances)."""
    d = np.einsum('nd,nd->n', space, space) - 2 * (space @ query) + query @ query  # (N,) squared distances
    if exclude is not None:
        d[exclude] = np.inf
    k = min(k, len(d) - (0 if exclude is None else np.size(exclude)))
    top = np.argpartition(d, k - 1)[:k] if 0 < k < len(d) else np.arange(max(k, 0))
    top = top[np.lexsort((top, d[top]))]  # by distance, ties by index
    return top, np.sqrt(np.maximum(d[top], 0))


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


def retrieval_map(model, info, images, labels, args, device, amp_dtype, store=None, emb=None):
    """Per-notion retrieval mAP as in ASEN (AAAI 2020): queries and candidates are `images` (the test images), relevant
    = same label under the notion, a query is not its own candidate, unlabelled images are left out for that notion.
    emb: (emb, masks) of `images` from embed_dataset, to embed them only once. Returns {'mAP', 'per_notion'}."""
    images = np.asarray(images)
    if emb is None:
        store = store or csn_main.make_store(info, args, True, 1, print)
        emb = embed_dataset(model, images, store, args, device, amp_dtype, len(info.notions))
    per = notion_map(emb[0], emb[1], images, labels, info.notions, parse_conditions(args.conditions, info.notions))
    known = [v for v in per.values() if v is not None]
    return {'mAP': float(np.mean(known)) if known else None, 'per_notion': per}


# ----------------------------------------------------------------------------------------------------- pictures

def _plt():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_masks(masks, notions, path, title):
    """The masks as a heatmap: a row per notion, a column per embedding dimension."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, masks.shape[1] * 0.14 + 2), 0.45 * len(notions) + 1.6))
    im = ax.imshow(masks, aspect='auto', cmap='viridis', interpolation='nearest', vmin=0)
    ax.set_yticks(range(len(notions)), notions)
    ax.set_xlabel('embedding dimension')
    ax.set_title(title)
    fig.colorbar(im, ax=ax, pad=0.01, label='mask weight')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label_colours(labels):
    """A colour per label: tab10/tab20 when they are few, an even spread of hues when many."""
    plt = _plt()
    names = sorted(set(labels))
    if len(names) <= 10:
        cols = plt.get_cmap('tab10').colors
    elif len(names) <= 20:
        cols = plt.get_cmap('tab20').colors
    else:
        cols = plt.get_cmap('hsv')(np.random.RandomState(0).permutation(len(names)) / len(names))
    return {n: cols[i % len(cols)] for i, n in enumerate(names)}


def plot_tsne(points, thumbs, labels, path, title, max_thumbs=90):
    """A 2-D map: one point per image coloured by its label ('' = unknown, grey), with thumbnails of a spread-out
    subset drawn over it. points (N, 2), thumbs (N, S, S, 3) uint8, labels N str or None."""
    plt = _plt()
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    fig, ax = plt.subplots(figsize=(9, 8))
    if labels is not None:
        colours = _label_colours([l for l in labels if l])
        for name, col in colours.items():
            sel = np.array([l == name for l in labels])
            ax.scatter(points[sel, 0], points[sel, 1], s=14, color=col, label=name, alpha=0.8, linewidths=0)
        unknown = np.array([not l for l in labels])
        if unknown.any():
            ax.scatter(points[unknown, 0], points[unknown, 1], s=8, color='0.6', label='(unknown)', linewidths=0)
        if len(colours) <= 20:
            ax.legend(fontsize=7, markerscale=1.5, loc='best', framealpha=0.7)
    else:
        ax.scatter(points[:, 0], points[:, 1], s=8, color='0.5', linewidths=0)
    span = points.max(0) - points.min(0) + 1e-9
    placed = []  # greedy: thumbnails at least 6 % of the map apart
    for i in np.random.RandomState(0).permutation(len(points)):
        p = (points[i] - points.min(0)) / span
        if all(np.abs(p - q).max() > 0.06 for q in placed):
            placed.append(p)
            zoom = 22 / thumbs.shape[1]
            edge = colours[labels[i]] if labels is not None and labels[i] else '0.5'
            ax.add_artist(AnnotationBbox(OffsetImage(thumbs[i], zoom=zoom), points[i], frameon=True, pad=0.1,
                                         bboxprops={'edgecolor': edge, 'linewidth': 1.2}))
            if len(placed) >= max_thumbs:
                break
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_retrieval(rows, path, title):
    """A grid: a row per query, the query first, then its neighbours. rows: [(query_thumb, caption,
    [(thumb, caption, same_label or None)])]. Neighbours get a green frame when they share the query's label."""
    plt = _plt()
    cols = 1 + max(len(r[2]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.35 * cols, 1.6 * len(rows) + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis('off')
    for r, (q_img, q_cap, neigh) in enumerate(rows):
        cells = [(q_img, q_cap, None, True)] + [(im, cap, same, False) for im, cap, same in neigh]
        for k, (im, cap, same, is_query) in enumerate(cells):
            ax = axes[r, k]
            ax.imshow(im, interpolation='nearest')
            ax.set_xticks([]), ax.set_yticks([])
            ax.axis('on')
            colour = 'black' if is_query else {True: 'tab:green', False: 'tab:red', None: '0.6'}[same]
            for s in ax.spines.values():
                s.set_edgecolor(colour)
                s.set_linewidth(3 if is_query or same is not None else 1)
            ax.set_title(cap, fontsize=6.5, color=colour if not is_query else 'black',
                         fontweight='bold' if is_query else 'normal')
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(text, n=16):
    return text if len(text) <= n else text[:n - 1] + '…'


def write_pictures(model, info, store, labels, args, device, amp_dtype, out_dir, images=None, emb=None,
                   n_tsne=1000, n_queries=4, k=8, log=print):
    """masks.png (CSN only), tsne_<notion>.png and retrieval_<notion>.png over the test images (images: their indices,
    default the test split's; emb: their (emb, masks) from embed_dataset). Returns the paths written."""
    from sklearn.manifold import TSNE
    t0 = time.time()
    images = test_images(info, args, log) if images is None else np.asarray(images)
    if emb is None:
        emb = embed_dataset(model, images, store, args, device, amp_dtype, len(info.notions))
    emb, masks = emb
    os.makedirs(out_dir, exist_ok=True)
    paths, rng = [], np.random.RandomState(args.seed)
    if model.embednet.mask_weights() is not None:
        paths.append(os.path.join(out_dir, 'masks.png'))
        plot_masks(masks, info.notions, paths[-1], f'masks of {csn_main.describe(args)}')
    sample = np.sort(rng.choice(len(images), min(n_tsne, len(images)), replace=False))  # rows of emb
    thumbs = store.get(images[sample])  # (n, S, S, 3)
    for c in parse_conditions(args.conditions, info.notions):
        name = info.notions[c]
        lab = None if not labels or name not in labels else [labels[name][i] for i in images]
        space = subspace(emb, masks, c)  # (N, D)
        if len(sample) >= 5:
            pts = TSNE(2, perplexity=min(30.0, (len(sample) - 1) / 3), init='pca', random_state=args.seed,
                       n_jobs=1).fit_transform(space[sample].astype(np.float64))
            paths.append(os.path.join(out_dir, f'tsne_{name}.png'))
            plot_tsne(pts, thumbs, None if lab is None else [lab[i] for i in sample], paths[-1],
                      f'{name}: t-SNE of the masked embeddings of {len(sample)} test images')
        queries = rng.choice([i for i in range(len(images)) if lab is None or lab[i]] or [0],
                             min(n_queries, len(images)), replace=False)
        rows = []
        for q in queries:
            idx, dist = nearest(space, space[q], k, exclude=q)
            q_lab = lab[q] if lab else ''
            neigh = [(store.get(images[[j]])[0], f'{_short(lab[j]) if lab else images[j]}\n{d:.2f}',
                      (lab[j] == q_lab) if lab and q_lab and lab[j] else None) for j, d in zip(idx, dist)]
            rows.append((store.get(images[[q]])[0], f'query {images[q]}\n{_short(q_lab)}', neigh))
        paths.append(os.path.join(out_dir, f'retrieval_{name}.png'))
        plot_retrieval(rows, paths[-1], f'nearest test images by {name} ({csn_main.describe(args)}); '
                                        f'green = same {name}, red = different')
    log(f'wrote {len(paths)} pictures to {out_dir} ({time.time() - t0:.1f} s)')
    return paths


# -------------------------------------------------------------------------------------------------------- command

def build_parser():
    p = argparse.ArgumentParser(description='Nearest images of the dataset under one notion of similarity, from a '
                                            'trained checkpoint. Without --query: only compute and cache the embeddings.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a('--resume', required=True, metavar='CKPT', help='checkpoint of main.py (e.g. runs/NAME/model_best.pth.tar)')
    a('--data', default=None, metavar='DIR', help='dataset folder (default: the one the checkpoint was trained on)')
    a('--query', default=None, help='an image index (row of filenames.json), a path listed in filenames.json, or any '
                                    'image file')
    a('--notion', default=None, help='the notion of similarity, by name or index (e.g. character, font, 0)')
    a('--k', type=int, default=10, help='number of neighbours')
    a('--out', default=None, metavar='PNG', help='picture of the query and its neighbours (default: '
                                                 'retrieval/<notion>_<query>.png in the checkpoint\'s folder)')
    a('--recompute', action='store_true', default=False, help='embed the dataset again even when the cache is valid')
    a('--device', choices=['auto', 'cpu', 'cuda', 'mps'], default='auto', help='auto = CUDA, then MPS, then CPU')
    a('--amp', choices=['auto', 'off', 'bf16', 'fp16'], default=None,
      help='mixed precision for embedding (default: the checkpoint\'s setting)')
    a('--batch-size', '--batch_size', type=int, default=256, help='images per batch when embedding the dataset')
    return p


def load_model(ckpt_path, data=None, device='auto', amp=None, batch_size=256):
    """The checkpoint's model, ready to embed: (model, checkpoint, args as main.py would see them, device, autocast
    dtype). Images are embedded batch_size at a time, read in this process (workers 0)."""
    parser = csn_main.build_parser()
    argv = ['--resume', ckpt_path, '--device', device] + (['--data', data] if data else []) + (['--amp', amp] if amp else [])
    args = parser.parse_args(argv)
    ckpt = csn_main.load_checkpoint(ckpt_path)
    args = csn_main.merge_checkpoint_args(args, ckpt, csn_main.explicit_flags(parser, argv), ckpt_path)
    device = csn_main.choose_device(args, 0)
    amp_dtype, _ = csn_main.choose_amp(args, device)
    args.eval_batch_size, args.workers = batch_size, 0
    n_notions = len(ckpt.get('notions') or []) or ckpt['state_dict'].get('embednet.masks.weight', torch.zeros(0)).shape[0]
    model = csn_main.build_model(argparse.Namespace(**{**vars(args), 'no_pretrained': True}), n_notions)
    model.load_state_dict(ckpt['state_dict'])
    model.to(device).eval()
    return model, ckpt, args, device, amp_dtype


def resolve_query(query, info):
    """--query -> (image index or None, path of the image file)."""
    if query.isdigit():
        i = int(query)
        if i >= len(info.filenames):
            raise DataError(f'--query {i}: the dataset has images 0..{len(info.filenames) - 1}')
        return i, info.image_path(i)
    index = {name: i for i, name in enumerate(info.filenames)}
    if query in index:
        return index[query], info.image_path(index[query])
    path = os.path.expanduser(query)
    if os.path.isfile(path):
        rel = os.path.relpath(os.path.realpath(path), os.path.realpath(info.images_dir))
        return index.get(rel), path
    raise DataError(f'--query {query!r}: not an image index, not a path listed in '
                    f'{os.path.join(info.root, "filenames.json")}, and no such image file')


def run(a):
    t_start = time.time()
    model, ckpt, args, device, amp_dtype = load_model(a.resume, a.data, a.device, a.amp, a.batch_size)
    info = load_dataset_info(args.data)
    if ckpt.get('notions') and ckpt['notions'] != info.notions:
        raise DataError(f'--resume {a.resume} was trained on notions {ckpt["notions"]}, but {args.data} has {info.notions}')
    cache_dir = os.path.dirname(os.path.abspath(a.resume))
    cached = None if a.recompute else load_cached_embeddings(cache_dir, a.resume, info, args)
    if cached is not None:
        emb, masks = cached
        print(f'using cached embeddings {os.path.join(cache_dir, "embeddings.npy")} {tuple(emb.shape)}')
    else:
        csn_main.keep_freed_memory(args, device)  # the command line's process only: load_model leaves malloc alone
        print(f'embedding the {len(info.filenames)} images of {info.root} with {csn_main.describe(args)} on {device}')
        emb, masks = export_embeddings(model, info, args, device, amp_dtype, cache_dir)
    if a.query is None:
        return 0
    if a.notion is None:
        raise DataError(f'--query needs --notion, one of {", ".join(info.notions)}')
    c = parse_conditions([a.notion], info.notions)[0]
    name = info.notions[c]
    q_index, q_path = resolve_query(a.query, info)
    space = subspace(emb, masks, c)  # (N, D)
    if q_index is None:  # an image from outside the dataset: embed it now
        u8 = torch.from_numpy(load_image(q_path, args.image_size)[None].copy())  # (1, S, S, 3)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            raw = model.embednet.embed(csn_main.to_input(u8, device, args.channels_last), c).float()  # (1, D)
        q = raw[0].cpu().numpy() * masks[c]
    else:
        q = space[q_index]
    t0 = time.perf_counter()
    idx, dist = nearest(space, q, a.k, exclude=q_index)
    search_ms = (time.perf_counter() - t0) * 1e3
    labels = read_labels(info) or {}
    lab = labels.get(name)
    q_lab = lab[q_index] if lab and q_index is not None else ''
    print(f'query: {q_index if q_index is not None else "(external)"} {q_path}' + (f'  {name}={q_lab}' if q_lab else ''))
    print(f'{a.k} nearest of {len(space)} images by {name} ({csn_main.describe(args)}; search {search_ms:.1f} ms):')
    print(f'{"rank":>4} {"index":>7} {"distance":>9}  {name if lab else "":<16} path')
    for r, (j, d) in enumerate(zip(idx, dist), 1):
        print(f'{r:>4} {j:>7} {d:>9.4f}  {(lab[j] if lab else ""):<16} {info.filenames[j]}')
    size = max(args.image_size, 64)
    q_tag = str(q_index) if q_index is not None else os.path.splitext(os.path.basename(q_path))[0]
    out = a.out or os.path.join(cache_dir, 'retrieval', f'{name}_{q_tag}.png')
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    neigh = [(load_image(info.image_path(j), size), f'{j}' + (f'\n{_short(lab[j])}' if lab else '') + f'\n{d:.3f}',
              (lab[j] == q_lab) if lab and q_lab and lab[j] else None) for j, d in zip(idx, dist)]
    plot_retrieval([(load_image(q_path, size), f'query {q_tag}' + (f'\n{_short(q_lab)}' if q_lab else ''), neigh)], out,
                   f'{a.k} nearest by {name} ({csn_main.describe(args)})')
    print(f'wrote {out} ({time.time() - t_start:.1f} s in all)')
    return 0


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        return run(a)
    except (csn_main.UserError, DataError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
