"""Datasets in the CSN release's layout: filenames.json, an images folder and
tripletlists/<notion>_tripletlist_<split>.txt.

Each triplet line is `a b c`: image a (anchor) is more similar to image c (close) than to image b (far).
load_image decodes, resizes and centre-crops an image to (S, S, 3) uint8; TripletBatches and ImageBatches are the
datasets of a split's triplets and of its images. The uint8 cache they read from is csnlib/image_cache.py, the
DataLoader and the device input (flips, normalisation) csnlib/loader.py.
"""
import csv
import io
import json
import os
import re
import struct
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


def name_problem(name):
    """Why `name` cannot be a notion name (it becomes part of file names: tripletlists/<name>_tripletlist_<split>.txt,
    a picture's name), or None."""
    if not isinstance(name, str):
        return f'{name!r} is not a string'
    if not name.strip():
        return 'it is empty'
    for bad, what in (('/', 'a "/"'), ('\\', 'a "\\"'), ('..', '".."')):
        if bad in name:
            return f'it holds {what}'
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return 'it holds a control character'
    return None


def names_problem(names):
    """Why a list of notion names cannot be used (not a list, a bad name, a name twice), or None."""
    if not isinstance(names, list) or not names:
        return f'expected a non-empty list of notion names, got {names!r}'
    seen = set()
    for n in names:
        why = name_problem(n)
        if why:
            return f'notion name {n!r}: {why}'
        if n in seen:
            return f'notion name {n!r} is given twice'
        seen.add(n)
    return None


def path_problem(name):
    """Why an image path of filenames.json cannot be a path inside the images folder (checked as text), or None."""
    p = name.replace('\\', '/')
    if p.startswith('/') or re.match(r'^[A-Za-z]:', p):
        return 'is absolute'
    if '..' in p.split('/'):
        return 'climbs out with ".."'
    return None


def utf8_text(path, error=None, hint='save it as UTF-8'):
    """The text of a file that must be UTF-8 (a BOM is dropped); a byte that is not names the file and line."""
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        return raw.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        line = raw.count(b'\n', 0, e.start) + 1
        raise (error or DataError)(f'{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}, {e.reason}); '
                                   f'{hint}') from None


@dataclass
class DatasetInfo:
    root: str
    name: str
    images_dir: str
    notions: list
    filenames: list
    labels_file: str = None
    extra: dict = field(default_factory=dict)
    images_real: str = field(default=None, init=False, repr=False)  # the images folder with links resolved

    def __post_init__(self):
        self.images_real = os.path.realpath(self.images_dir)

    def image_path(self, i):
        """The path of image i; DataError (naming filenames.json's line) when it is absolute, climbs out with '..' or
        resolves (symbolic links included) to a file outside the images folder."""
        name = self.filenames[i]
        path = os.path.join(self.images_dir, name)
        why = path_problem(name)
        if why is None:
            real = os.path.realpath(path)
            if not real.startswith(self.images_real.rstrip(os.sep) + os.sep):
                why = f'resolves to {real}, outside the images folder (a symbolic link)'
        if why:
            raise DataError(f'image path {name!r} (line {i + 1} of {os.path.join(self.root, "filenames.json")}) '
                            f'{why}; every image must be a file inside {self.images_dir}')
        return path

    @property
    def hflip(self):
        """Whether a horizontal mirror keeps every label (dataset.json "hflip"; true when absent, as for shoes)."""
        return self.extra.get('hflip', True)

    def triplet_file(self, notion, split):
        return os.path.join(self.root, 'tripletlists', f'{notion}_tripletlist_{split}.txt')


def dataset_fingerprint(info):
    """SHA-256 over what defines a dataset's runs: dataset.json, filenames.json, the labels and every triplet list
    (their names and bytes). Two folders with the same fingerprint give the same triplets and labels."""
    import hashlib
    lists = os.path.join(info.root, 'tripletlists')
    listed = sorted(f for f in os.listdir(lists) if f.endswith('.txt')) if os.path.isdir(lists) else []
    paths = [os.path.join(info.root, 'dataset.json'), os.path.join(info.root, 'filenames.json'), info.labels_file,
             *(os.path.join(lists, f) for f in listed)]
    h = hashlib.sha256()
    for path in (p for p in paths if p and os.path.isfile(p)):
        h.update(os.path.relpath(path, info.root).encode() + b'\0')
        with open(path, 'rb') as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def load_dataset_info(root):
    """Read DIR/dataset.json (or the Zappos defaults when it is absent) and DIR/filenames.json."""
    if not os.path.isdir(root):
        raise DataError(f'data folder {root!r} does not exist: {GET_DATA_HINT}, or point --data at it')
    meta_path = os.path.join(root, 'dataset.json')
    meta = {'name': 'zappos50k', 'images': ZAPPOS_IMAGES, 'notions': ZAPPOS_NOTIONS}
    if os.path.exists(meta_path):
        try:
            meta = json.loads(utf8_text(meta_path))
        except (OSError, ValueError) as e:
            raise DataError(f'{meta_path}: not valid JSON ({e})') from None
        check_meta(meta, meta_path)
    names_path = os.path.join(root, 'filenames.json')
    if not os.path.exists(names_path):
        raise DataError(f'{names_path} not found: {root!r} is not a dataset folder; {GET_DATA_HINT}')
    # plain text despite the name: one image path per line
    filenames = [line.strip() for line in utf8_text(names_path, hint='image paths must be UTF-8').split('\n')]
    while filenames and not filenames[-1]:
        filenames.pop()
    for i, name in enumerate(filenames):
        if not name:
            raise DataError(f'{names_path}:{i + 1}: empty line (line i+1 is image i)')
        if '\0' in name or '\r' in name:
            raise DataError(f'{names_path}:{i + 1}: a {"NUL byte" if chr(0) in name else "carriage return"} inside '
                            f'the image path {name!r}; line i+1 must hold the path of image i alone')
    images_dir = os.path.join(root, meta['images'])
    if not os.path.isdir(images_dir):
        raise DataError(f'images folder {images_dir!r} not found (named by '
                        f'{meta_path if os.path.exists(meta_path) else "the Zappos default"}); {GET_DATA_HINT}')
    labels = os.path.join(root, meta['labels']) if meta.get('labels') else None
    return DatasetInfo(root, meta.get('name', os.path.basename(os.path.abspath(root))), images_dir,
                       list(meta['notions']), filenames, labels, meta)


def check_meta(meta, meta_path):
    """dataset.json's keys and the types of their values; DataError naming the key and what it must be."""
    expected = '{"name", "images", "notions", "labels", "hflip"}'
    if not isinstance(meta, dict):
        raise DataError(f'{meta_path}: expected a JSON object {expected}, got a {type(meta).__name__}')
    for key in ('images', 'notions'):
        if key not in meta:
            raise DataError(f'{meta_path}: missing key {key!r} (expected {expected})')
    why = names_problem(meta['notions'])
    if why:
        raise DataError(f'{meta_path}: "notions": {why}; notion names must be distinct, non-empty and free of "/", '
                        f'"\\" and ".." (they become file names)')
    images = meta['images']
    if not isinstance(images, str) or not images.strip():
        raise DataError(f'{meta_path}: "images" must be the name of the images folder (a string), not {images!r}')
    if path_problem(images):
        raise DataError(f'{meta_path}: "images" {images!r} {path_problem(images)}: the images folder must lie inside '
                        f'{os.path.dirname(meta_path) or "."} (a relative path without ".."; it may be a link to '
                        f'another disk). A dataset built by an older get_data.py: build it again with --force')
    for key in ('name', 'labels'):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise DataError(f'{meta_path}: "{key}" must be a string, not {meta[key]!r}')
    name = meta.get('name')
    why = name is not None and (name_problem(name) or ('it starts with "."' if name.startswith('.') else None))
    if why:  # the name chooses folders (reproduce.py's results/NAME): it must stay one plain name
        raise DataError(f'{meta_path}: "name" {name!r} is not a plain name ({why}): it names folders such as '
                        f'results/NAME; use letters, digits, "-" or "_"')
    if meta.get('labels') and path_problem(meta['labels']):
        raise DataError(f'{meta_path}: "labels" {meta["labels"]!r} {path_problem(meta["labels"])}: labels.csv must '
                        f'lie inside the data folder')
    if not isinstance(meta.get('hflip', True), bool):
        raise DataError(f'{meta_path}: "hflip" must be true or false (whether a mirrored image keeps its labels), '
                        f'not {meta["hflip"]!r}')


def notion_index(value, notions, trained=None, flag='--notion', owner='this dataset', what='mask or network'):
    """A notion given by name or index (an int, or a string of digits) -> its index into notions; DataError (a
    ValueError) when unknown, or when trained (indices) is given and the notion is not in it."""
    if isinstance(value, str) and value in notions:
        c = notions.index(value)
    elif isinstance(value, str) and value.isdigit() and int(value) < len(notions):
        c = int(value)
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(notions):
        c = int(value)
    else:
        known = ', '.join(f'{i}={n}' for i, n in enumerate(notions))
        raise DataError(f'{flag} {value!r}: unknown notion; {owner} has {known}')
    if trained is not None and c not in trained:
        raise DataError(f'{flag} {notions[c]}: the checkpoint was not trained on it (its --conditions were '
                        f'{", ".join(notions[t] for t in trained)}), so its {what} is untrained; use one of these')
    return c


def parse_conditions(values, notions):
    """--conditions accepts notion indices or names (also comma-separated); returns sorted unique indices."""
    if not values:
        return list(range(len(notions)))
    parts = [part.strip() for v in values for part in str(v).split(',')]
    return sorted({notion_index(part, notions, flag='--conditions') for part in parts if part})


_TRIPLET = re.compile(r'\s*(-?[0-9]+)\s+(-?[0-9]+)\s+(-?[0-9]+)\s*$', re.ASCII)


def check_triplet_file(path, n_images):
    """Parse a triplet list. Returns (triplets (M, 3) int64, line numbers (M,), problems [(path, line, message)])."""
    if not os.path.exists(path):
        raise DataError(f'{path} not found: the dataset has no triplets for this notion and split; {GET_DATA_HINT}')
    rows, lines, problems, seen = [], [], [], {}
    with open(path, encoding='utf-8', errors='replace') as f:  # a byte that is not UTF-8 makes a malformed line
        for ln, text in enumerate(f, 1):
            if not text.strip():
                continue
            m = _TRIPLET.match(text)
            if m is None:
                problems.append((path, ln, f'malformed line {text.strip()[:60]!r} (expected three image indices '
                                           f'"a b c" in ASCII digits)'))
                continue
            t = tuple(int(p) for p in m.groups())
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
    # every notion with a list is drawn, in the dataset's order, so that a subset (--conditions) gets the very triplets
    # the run on all notions gets for it; only the selected notions' lists are checked and kept
    for c in [c for c in range(len(info.notions)) if c in conditions or os.path.exists(
            info.triplet_file(info.notions[c], split))]:
        t, _, bad = check_triplet_file(info.triplet_file(info.notions[c], split), len(info.filenames))
        if len(t) > per_notion:
            t = t[np.sort(rng.choice(len(t), per_notion, replace=False))]
        if c not in conditions:
            continue
        problems += bad
        if len(t) < per_notion:
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


def read_labels(info, log=print):
    """labels.csv (image,<notion>...) in filenames.json order -> {notion: list of str ('' = unknown)}, or None.
    Its image column, when it has one, must list filenames.json's images in their order; a notion without a column
    is said (it gets no retrieval mAP)."""
    path = info.labels_file
    if not path or not os.path.exists(path):
        return None
    reader = csv.reader(io.StringIO(utf8_text(path), newline=''))
    rows, lines = [], []  # the rows that are not blank, and their line numbers
    try:
        header = [h.strip() for h in next(reader)]
        for r in reader:
            if r:
                rows.append(r)
                lines.append(reader.line_num)
    except StopIteration:
        raise DataError(f'{path}: empty file (expected a header line image,<notion>...)') from None
    except csv.Error as e:
        raise DataError(f'{path}:{reader.line_num}: not a readable CSV line ({e})') from None
    if len(rows) != len(info.filenames):
        raise DataError(f'{path}: {len(rows)} rows, but filenames.json lists {len(info.filenames)} images')
    doubled = sorted({h for h in header if header.count(h) > 1})
    if doubled:
        raise DataError(f'{path}:1: column(s) {", ".join(doubled)} given twice')
    col = {h: k for k, h in enumerate(header)}
    cell = lambda r, k: r[k] if k < len(r) else ''  # noqa: E731
    if 'image' in col:
        for i, r in enumerate(rows):
            if cell(r, col['image']).strip() != info.filenames[i]:
                raise DataError(f'{path}:{lines[i]}: image {cell(r, col["image"])!r}, but line {i + 1} of '
                                f'filenames.json is {info.filenames[i]!r}: labels.csv must list the images of '
                                f'filenames.json in its order; write it again')
    missing = [n for n in info.notions if n not in col]
    if missing:
        log(f'note: {path} has no column for notion(s) {", ".join(missing)} (columns: {", ".join(header)}): no '
            f'retrieval mAP for {"them" if len(missing) > 1 else "it"}')
    return {n: [cell(r, col[n]) for r in rows] for n in info.notions if n in col}


# ---------------------------------------------------------------------------------------------------------- images

# images larger than this are refused from their header, before anything is decoded: a 1 x 100,000 px PNG of a few
# hundred bytes passes PIL's pixel limit, but resized to 112 px on its shorter side it is 112 x 11 million
MAX_IMAGE_SIDE = 16384       # px, either side
MAX_IMAGE_PIXELS = 40000000  # width x height (a 40-megapixel photo)
MAX_IMAGE_ASPECT = 32        # longer side / shorter side


def image_size_problem(width, height):
    """Why an image of width x height px is refused before decoding, or None."""
    if min(width, height) < 1:
        return 'it has no pixels'
    if max(width, height) > MAX_IMAGE_SIDE:
        return f'a side over {MAX_IMAGE_SIDE:,} px'
    if width * height > MAX_IMAGE_PIXELS:
        return f'over {MAX_IMAGE_PIXELS / 1e6:.0f} million pixels'
    if max(width, height) > MAX_IMAGE_ASPECT * min(width, height):
        return f'one side over {MAX_IMAGE_ASPECT} times the other (resized, it would be huge)'
    return None


class ImageTooLarge(DataError):
    """An image refused from its header: too many pixels, a side too long, or too long for its width."""


def check_image_size(im, what):
    """ImageTooLarge (a DataError) naming `what` when the opened, not yet decoded PIL image im is too large or too long
    to decode."""
    why = image_size_problem(*im.size)
    if why:
        raise ImageTooLarge(f'{what}: the image is {im.size[0]} x {im.size[1]} px, {why}; refused before decoding. '
                            f'Crop or shrink it (at most {MAX_IMAGE_SIDE:,} px a side, '
                            f'{MAX_IMAGE_PIXELS / 1e6:.0f} million pixels, {MAX_IMAGE_ASPECT}:1)')


def load_image(path, size):
    """Decode, resize the shorter side to `size`, centre-crop size x size, RGB: (S, S, 3) uint8.
    The same transform as the original's Resize(112) + CenterCrop(112), done on the PIL image. Its size is checked
    from the header first (check_image_size)."""
    from torchvision.transforms import functional as TF
    try:
        with Image.open(path) as im:
            check_image_size(im, path)
            im = im.convert('RGB')
            im = TF.center_crop(TF.resize(im, size), size)
            return np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f'image not found: {path}') from None
    except Image.DecompressionBombError as e:
        raise DataError(f'cannot read image {path}: {e} Shrink the image, or leave it out of the dataset') from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
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
    return info.hflip, ('dataset.json' if has_meta and 'hflip' in info.extra
                        else 'default for a dataset without "hflip"')


