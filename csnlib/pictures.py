"""Pictures of what a model learned: the masks, t-SNE maps and nearest-neighbour grids per notion (matplotlib, Agg)."""
import os
import time

import numpy as np

from csnlib.atomic import atomic_path
from csnlib.checkpoint import describe
from csnlib.evaluate import embed_dataset, subspace
from csnlib.search import nearest, test_images
from triplet_image_loader import parse_conditions


def _plt():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=110):
    """fig to path, whole or not at all (a temporary file renamed into place; the format from path's extension), or
    into a file object as PNG."""
    if not isinstance(path, (str, os.PathLike)):
        fig.savefig(path, dpi=dpi, format='png')
        return
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=os.path.splitext(path)[1].lstrip('.') or 'png')


def draw_masks(ax, masks, notions, title=None, vmin=None, xlabel=True, **colorbar):
    """The one mask heatmap (pictures, the study's figure, TensorBoard): masks (n_notions, D) on ax, a row per notion,
    a column per embedding dimension, with a colour bar (colorbar: its options)."""
    im = ax.imshow(np.asarray(masks), aspect='auto', cmap='viridis', interpolation='nearest', vmin=vmin)
    ax.set_yticks(range(len(notions)), notions)
    if xlabel:
        ax.set_xlabel('embedding dimension')
    if title:
        ax.set_title(title, fontsize=colorbar.pop('title_size', None))
    ax.figure.colorbar(im, ax=ax, **colorbar)
    return im


def plot_masks(masks, notions, path, title):
    """The masks as a heatmap: a row per notion, a column per embedding dimension."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, masks.shape[1] * 0.14 + 2), 0.45 * len(notions) + 1.6))
    draw_masks(ax, masks, notions, title, vmin=0, pad=0.01, label='mask weight')
    fig.tight_layout()
    save_figure(fig, path)
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
    save_figure(fig, path)
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
    save_figure(fig, path)
    plt.close(fig)


def short(text, n=16):
    return text if len(text) <= n else text[:n - 1] + '…'


def write_pictures(model, info, store, labels, rt, out_dir, images=None, emb=None, n_tsne=1000, n_queries=4, k=8,
                   log=print):
    """masks.png (CSN only), tsne_<notion>.png and retrieval_<notion>.png over the test images (images: their indices,
    default the test split's; emb: their (emb, masks) from embed_dataset). Returns the paths written."""
    from sklearn.manifold import TSNE
    t0, args = time.time(), rt.args
    images = test_images(info, args, log) if images is None else np.asarray(images)
    if emb is None:
        emb = embed_dataset(model, images, store, rt, len(info.notions))
    emb, masks = emb
    os.makedirs(out_dir, exist_ok=True)
    paths, rng = [], np.random.RandomState(args.seed)
    if model.embednet.mask_weights() is not None:
        paths.append(os.path.join(out_dir, 'masks.png'))
        plot_masks(masks, info.notions, paths[-1], f'masks of {describe(args)}')
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
            neigh = [(store.get(images[[j]])[0], f'{short(lab[j]) if lab else images[j]}\n{d:.2f}',
                      (lab[j] == q_lab) if lab and q_lab and lab[j] else None) for j, d in zip(idx, dist)]
            rows.append((store.get(images[[q]])[0], f'query {images[q]}\n{short(q_lab)}', neigh))
        paths.append(os.path.join(out_dir, f'retrieval_{name}.png'))
        plot_retrieval(rows, paths[-1], f'nearest test images by {name} ({describe(args)}); '
                                        f'green = same {name}, red = different')
    log(f'wrote {len(paths)} pictures to {out_dir} ({time.time() - t0:.1f} s)')
    return paths
