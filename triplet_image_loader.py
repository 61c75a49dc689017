"""Datasets in the CSN release's layout: filenames.json, an images folder and tripletlists/<notion>_tripletlist_<split>.txt.

Each triplet line is `a b c`: image a (anchor) is more similar to image c (close) than to image b (far).
load_image decodes, resizes and centre-crops an image to (S, S, 3) uint8; TripletBatches and ImageBatches are the
datasets of a split's triplets and of its images. The uint8 cache they read from is csnlib/image_cache.py, the
DataLoader and the device input (flips, normalisation) csnlib/loader.py.
"""
import csv
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

ZAPPOS_NOTIONS = ['class', 'closure', 'gender', 'heel']
ZAPPOS_IMAGES = 'ut-zap50k-images'
SPLITS = ('train', 'val', 'test')
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GET_DATA_HINT = ('get it with `python get_data.py` (Zappos50k), `python get_data.py --dataset fonts --out DIR` '
                 '(offline) or `python get_data.py --dataset attributes ...` (your own images); see the README')


class UserError(Exception):
    """The root of the user's mistakes (a bad flag, bad data, a bad checkpoint, the environment): every script prints it
    as one line `error: ...` and exits 2 (csnlib/errors.py). Defined here, in the lowest file that raises one, so that
    the method files import nothing of the package."""


class DataError(UserError, ValueError):
    """Bad dataset input; the message names the file (and line) and what to do."""


@dataclass
class DatasetInfo:
    root: str
    name: str
    images_dir: str
    notions: list
    filenames: list
    labels_file: str = None
    extra: dict = field(default_factory=dict)

    def image_path(self, i):
        return os.path.join(self.images_dir, self.filenames[i])

    @property
    def hflip(self):
        """Whether a horizontal mirror keeps every label (dataset.json "hflip"; true when absent, as for shoes)."""
        return self.extra.get('hflip', True)

    def triplet_file(self, notion, split):
        return os.path.join(self.root, 'tripletlists', f'{notion}_tripletlist_{split}.txt')


def load_dataset_info(root):
    """Read DIR/dataset.json (or the Zappos defaults when it is absent) and DIR/filenames.json."""
    if not os.path.isdir(root):
        raise DataError(f'data folder {root!r} does not exist: {GET_DATA_HINT}, or point --data at it')
    meta_path = os.path.join(root, 'dataset.json')
    meta = {'name': 'zappos50k', 'images': ZAPPOS_IMAGES, 'notions': ZAPPOS_NOTIONS}
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f'{meta_path}: not valid JSON ({e})') from None
        for key in ('images', 'notions'):
            if key not in meta:
                raise DataError(f'{meta_path}: missing key {key!r} (expected {{"name", "images", "notions", "labels"}})')
        if not meta['notions'] or len(set(meta['notions'])) != len(meta['notions']):
            raise DataError(f'{meta_path}: "notions" must be a non-empty list of distinct names')
        if not isinstance(meta.get('hflip', True), bool):
            raise DataError(f'{meta_path}: "hflip" must be true or false (whether a mirrored image keeps its labels), '
                            f'not {meta["hflip"]!r}')
    names_path = os.path.join(root, 'filenames.json')
    if not os.path.exists(names_path):
        raise DataError(f'{names_path} not found: {root!r} is not a dataset folder; {GET_DATA_HINT}')
    with open(names_path) as f:  # plain text despite the name: one image path per line
        filenames = [line.strip() for line in f]
    while filenames and not filenames[-1]:
        filenames.pop()
    for i, name in enumerate(filenames):
        if not name:
            raise DataError(f'{names_path}:{i + 1}: empty line (line i+1 is image i)')
    images_dir = os.path.join(root, meta['images'])
    if not os.path.isdir(images_dir):
        raise DataError(f'images folder {images_dir!r} not found (named by {meta_path if os.path.exists(meta_path) else "the Zappos default"}); {GET_DATA_HINT}')
    labels = os.path.join(root, meta['labels']) if meta.get('labels') else None
    return DatasetInfo(root, meta.get('name', os.path.basename(os.path.abspath(root))), images_dir,
                       list(meta['notions']), filenames, labels, meta)


def parse_conditions(values, notions):
    """--conditions accepts notion indices or names; returns sorted unique indices."""
    if not values:
        return list(range(len(notions)))
    out = []
    for v in values:
        for part in str(v).split(','):
            part = part.strip()
            if not part:
                continue
            if part.isdigit() and int(part) < len(notions):
                out.append(int(part))
            elif part in notions:
                out.append(notions.index(part))
            else:
                known = ', '.join(f'{i}={n}' for i, n in enumerate(notions))
                raise DataError(f'--conditions: unknown notion {part!r}; this dataset has {known}')
    return sorted(set(out))


def check_triplet_file(path, n_images):
    """Parse a triplet list. Returns (triplets (M, 3) int64, line numbers (M,), problems [(path, line, message)])."""
    if not os.path.exists(path):
        raise DataError(f'{path} not found: the dataset has no triplets for this notion and split; {GET_DATA_HINT}')
    rows, lines, problems, seen = [], [], [], {}
    with open(path) as f:
        for ln, text in enumerate(f, 1):
            parts = text.split()
            if not parts:
                continue
            if len(parts) != 3 or not all(p.lstrip('-').isdigit() for p in parts):
                problems.append((path, ln, f'malformed line {text.strip()[:60]!r} (expected three image indices "a b c")'))
                continue
            t = tuple(int(p) for p in parts)
            bad = [x for x in t if not 0 <= x < n_images]
            if bad:
                problems.append((path, ln, f'image index {bad[0]} is outside filenames.json (0..{n_images - 1})'))
            elif len(set(t)) < 3:
                problems.append((path, ln, f'triplet {text.strip()!r} uses the same image twice'))
            elif t in seen:
                problems.append((path, ln, f'duplicate of line {seen[t]}'))
            else:
                seen[t] = ln
                rows.append(t)
                lines.append(ln)
    return np.array(rows, dtype=np.int64).reshape(-1, 3), np.array(lines, dtype=np.int64), problems


def format_problems(problems, limit=20):
    head = [f'{p}:{ln}: {msg}' for p, ln, msg in problems[:limit]]
    more = len(problems) - limit
    return '\n'.join(head + ([f'... and {more} more'] if more > 0 else []))


def load_triplets(info, split, conditions, n_total, seed, skip_bad=False, log=print):
    """The seeded subset of a split: each selected notion contributes n_total / (number of notions) triplets.

    Returns (triplets (M, 3) as (anchor, far, close), notion index (M,)), shuffled."""
    per_notion = n_total // len(info.notions)
    rng = np.random.RandomState(seed + SPLITS.index(split))
    trip, cond, problems = [], [], []
    for c in conditions:
        t, _, bad = check_triplet_file(info.triplet_file(info.notions[c], split), len(info.filenames))
        problems += bad
        if len(t) > per_notion:
            t = t[np.sort(rng.choice(len(t), per_notion, replace=False))]
        elif len(t) < per_notion:
            log(f'note: {info.triplet_file(info.notions[c], split)} has {len(t)} usable triplets, fewer than the '
                f'{per_notion} asked for; using all of them')
        trip.append(t)
        cond.append(np.full(len(t), c, dtype=np.int64))
    if problems:
        if not skip_bad:
            raise DataError(f'{len(problems)} bad triplet line(s) in the {split} split:\n{format_problems(problems)}\n'
                            f'Fix the files, or pass --skip-bad-triplets to leave these lines out.')
        log(f'--skip-bad-triplets: left out {len(problems)} bad triplet line(s) of the {split} split')
    trip, cond = np.concatenate(trip), np.concatenate(cond)
    if len(trip) == 0:
        raise DataError(f'the {split} split has no triplets for the selected notions')
    order = rng.permutation(len(trip))
    return trip[order], cond[order]


def read_labels(info):
    """labels.csv (image,<notion>...) in filenames.json order -> {notion: list of str ('' = unknown)}, or None."""
    if not info.labels_file or not os.path.exists(info.labels_file):
        return None
    with open(info.labels_file, newline='') as f:
        rows = list(csv.DictReader(f))
    if len(rows) != len(info.filenames):
        raise DataError(f'{info.labels_file}: {len(rows)} rows, but filenames.json lists {len(info.filenames)} images')
    return {n: [r.get(n) or '' for r in rows] for n in info.notions if rows and n in rows[0]}


# ---------------------------------------------------------------------------------------------------------- images

def load_image(path, size):
    """Decode, resize the shorter side to `size`, centre-crop size x size, RGB: (S, S, 3) uint8.
    The same transform as the original's Resize(112) + CenterCrop(112), done on the PIL image."""
    from torchvision.transforms import functional as TF
    try:
        with Image.open(path) as im:
            im = im.convert('RGB')
            im = TF.center_crop(TF.resize(im, size), size)
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f'image not found: {path}') from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f'cannot read image {path}: {e}') from None


class TripletBatches(Dataset):
    """Indexed by a list of triplet positions (use with a BatchSampler and batch_size=None): returns the batch's
    images (3B, S, S, 3) uint8 stacked as [anchors, fars, closes], and the notions (B,)."""

    def __init__(self, triplets, conditions, store):
        self.triplets, self.conditions, self.store = triplets, conditions, store

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, pos):
        t = self.triplets[np.asarray(pos)]  # (B, 3)
        imgs = self.store.get(t.T.reshape(-1))  # (3B, S, S, 3)
        return torch.from_numpy(imgs), torch.from_numpy(self.conditions[np.asarray(pos)])


class ImageBatches(Dataset):
    """Indexed by a list of image indices: (K, S, S, 3) uint8. Used to embed each distinct image once."""

    def __init__(self, images, store):
        self.images, self.store = np.asarray(images), store

    def __len__(self):
        return len(self.images)

    def __getitem__(self, pos):
        return torch.from_numpy(self.store.get(self.images[np.asarray(pos)]))


def missing_images(info):
    """Paths listed in filenames.json that are not files."""
    return [info.image_path(i) for i in range(len(info.filenames)) if not os.path.isfile(info.image_path(i))]


def choose_hflip(args, info):
    """(mirror training images?, why) from --hflip and the dataset's own say."""
    if args.hflip != 'auto':
        return args.hflip == 'on', f'--hflip {args.hflip}'
    has_meta = os.path.exists(os.path.join(info.root, 'dataset.json'))
    return info.hflip, ('dataset.json' if has_meta and 'hflip' in info.extra else 'default for a dataset without "hflip"')


