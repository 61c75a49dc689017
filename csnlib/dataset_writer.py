"""What every dataset builder writes (get_data.py's fonts and your own images, zappos.py's metadata triplets): triplets
drawn from labels, the split of images into train/val/test, the layout main.py reads, and a staging folder that
becomes the dataset only when whole."""
import csv
import json
import os
import shutil

import numpy as np

from csnlib.atomic import replace_tree
from csnlib.errors import GetDataError  # noqa: F401  (re-exported: the builders raise it)
from triplet_image_loader import SPLITS

# ------------------------------------------------------------------------------------------------- triplets

def sample_triplets(codes, n, rng, max_rounds=50):
    """Up to n distinct triplets (anchor, far, close) of image indices: anchor and close share a label, far has
    another one. codes: (N,) int label code per image, -1 = unknown or not in this split. Returns (m, 3) int64,
    m < n only when the images do not allow n distinct triplets (or a very skewed split makes them rare)."""
    codes = np.asarray(codes)
    known = np.flatnonzero(codes >= 0)
    if len(known) == 0:
        return np.zeros((0, 3), np.int64)
    values, inverse, counts = np.unique(codes[known], return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind='stable')
    members = known[order]                                              # images grouped by label
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    anchors = known[counts[inverse] >= 2]                               # an anchor needs a close partner
    if len(values) < 2 or len(anchors) == 0:
        return np.zeros((0, 3), np.int64)
    n_all = len(codes)
    seen, out = set(), []
    for _ in range(max_rounds):
        need = n - len(out)
        if need <= 0:
            break
        m = need + need // 4 + 16
        a = anchors[rng.integers(0, len(anchors), m)]
        la = np.searchsorted(values, codes[a])
        k = rng.integers(0, counts[la] - 1)                             # another member of a's label
        c = members[start[la] + k]
        c = np.where(c == a, members[start[la] + counts[la] - 1], c)    # skip a: the last member stands in for it
        f = known[rng.integers(0, len(known), m)]
        ok = codes[f] != codes[a]
        for t in np.stack([a[ok], f[ok], c[ok]], 1):
            key = (int(t[0]) * n_all + int(t[1])) * n_all + int(t[2])
            if key not in seen:
                seen.add(key)
                out.append(t)
                if len(out) == n:
                    break
    return np.array(out, np.int64).reshape(-1, 3)


def write_triplets(out, notion, split, triplets):
    os.makedirs(os.path.join(out, 'tripletlists'), exist_ok=True)
    with open(os.path.join(out, 'tripletlists', f'{notion}_tripletlist_{split}.txt'), 'w') as f:
        f.writelines(f'{a} {b} {c}\n' for a, b, c in triplets)


def label_codes(values):
    """Strings ('' = unknown) -> (codes (N,) int, -1 for unknown; sorted distinct values)."""
    values = np.asarray(values, dtype=object)
    names = sorted({v for v in values if v != ''})
    index = {v: i for i, v in enumerate(names)}
    return np.array([index.get(v, -1) for v in values], np.int64), names


def write_all_triplets(out, notions, labels, split_of, sizes, seed, log):
    """Per notion and split, triplets among that split's images. labels {notion: N strings}, split_of (N,) split names,
    sizes {split: triplets per notion}. Returns {notion: {split: count}}; says where fewer could be drawn."""
    rng = np.random.default_rng(seed)
    split_of = np.asarray(split_of)
    counts = {}
    for notion in notions:
        codes, _ = label_codes(labels[notion])
        counts[notion] = {}
        for split in SPLITS:
            sel = np.where(split_of == split, codes, -1)
            trip = sample_triplets(sel, sizes[split], rng)
            if len(trip) < sizes[split]:
                log(f'note: {notion}/{split}: only {len(trip)} distinct triplets of the {sizes[split]} asked for '
                    f'({(sel >= 0).sum()} labelled images, {len(set(sel[sel >= 0]))} labels)')
            if len(trip) == 0:
                raise GetDataError(f'{notion}/{split}: no triplet can be drawn (a split needs two labels and a label '
                                   f'with two images); use more images or other split fractions (--split)')
            write_triplets(out, notion, split, trip)
            counts[notion][split] = len(trip)
    return counts


def write_layout(out, name, images, filenames, notions, labels, split_of, hflip, extra=None):
    """filenames.json (plain text, one path per line), labels.csv (image, notions..., split) and dataset.json.
    hflip: whether a horizontally mirrored image keeps all its labels (main.py --hflip auto follows it)."""
    with open(os.path.join(out, 'filenames.json'), 'w') as f:
        f.writelines(p + '\n' for p in filenames)
    with open(os.path.join(out, 'labels.csv'), 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['image'] + list(notions) + ['split'])
        for i, p in enumerate(filenames):
            w.writerow([p] + [labels[n][i] for n in notions] + [split_of[i]])
    meta = {'name': name, 'images': images, 'notions': list(notions), 'labels': 'labels.csv', 'hflip': bool(hflip)}
    meta.update(extra or {})
    with open(os.path.join(out, 'dataset.json'), 'w') as f:
        json.dump(meta, f, indent=1)


def split_groups(groups, fractions, seed):
    """Assign each distinct group (a font family, an image) to train/val/test in a seeded order: (N,) split names."""
    groups = np.asarray(groups, dtype=object)
    names = sorted(set(groups))
    np.random.default_rng(seed).shuffle(names)
    share = np.asarray(fractions) / np.sum(fractions) * len(names)
    n_val, n_test = (int(round(x)) for x in share[1:])
    if len(names) >= 6:                                                 # two groups at least, so a split has two labels
        n_val, n_test = (max(n, 2) if f > 0 else 0 for n, f in zip((n_val, n_test), fractions[1:]))
    bounds = [len(names) - n_val - n_test, len(names) - n_test]
    which = {}
    for i, g in enumerate(names):
        which[g] = SPLITS[0] if i < bounds[0] else SPLITS[1] if i < bounds[1] else SPLITS[2]
    return np.array([which[g] for g in groups], dtype=object)


def balanced_split(groups, labels, fractions, seed, tries=200):
    """split_groups, redrawn (seeds seed, seed+1, ...) until every split holds two values of every notion in labels
    ({notion: value per item}) where the data allows it; the first draw when no draw does."""
    first = None
    for t in range(tries):
        split = split_groups(groups, fractions, seed + t)
        first = split if first is None else first
        if all(len({v for v, s in zip(vals, split) if s == sp}) >= 2 for vals in labels.values()
               for sp, f in zip(SPLITS, fractions) if f > 0):
            return split
    return first


def parse_split(text):
    try:
        parts = [float(x) for x in text.split(',')]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 0 or parts[0] <= 0 or sum(parts) <= 0:
        raise GetDataError(f'--split {text!r}: expected three fractions train,val,test such as 0.7,0.15,0.15')
    return parts


# ------------------------------------------------------------------------------------------ building a folder

class Staging:
    """Build into OUT.partial-PID and move it to OUT only when whole, so an interrupted build never looks done."""

    def __init__(self, out, force):
        self.out, self.force = os.path.abspath(out), force
        self.tmp = f'{self.out}.partial-{os.getpid()}'

    def __enter__(self):
        parent = os.path.dirname(self.out)
        os.makedirs(parent, exist_ok=True)
        for f in os.listdir(parent):                                    # leftovers of killed builds
            if f.startswith(os.path.basename(self.out) + '.partial-'):
                shutil.rmtree(os.path.join(parent, f), ignore_errors=True)
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, kind, value, tb):
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        replace_tree(self.tmp, self.out)
        return False
