"""Get a dataset in the layout main.py reads: filenames.json, an images folder, tripletlists/, dataset.json, labels.csv.

    python get_data.py                                   # Zappos50k + the paper's triplets into data/ (needs internet)
    python get_data.py --from ~/Downloads                # the same from archives fetched by hand
    python get_data.py --dataset fonts --out data/fonts  # offline: glyphs of the fonts installed on this machine
    python get_data.py --dataset attributes --images DIR --attributes FILE.csv --out DIR   # your own images
    python get_data.py --dataset synthetic --synthetic-images 2000 --out DIR   # offline shoe drawings (Zappos layout)
    python get_data.py --dataset asen --from DIR --name FashionAI   # ASEN's layout: DIR/meta.json, DIR/FashionAI/

Triplet lines are `a b c`: image a (anchor) is more similar to image c (close) than to image b (far) under the notion.
Each split draws its triplets from its own images only.
"""
import argparse
import csv
import io
import json
import os
import shutil
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

from csnlib import zappos
from csnlib.dataset_writer import (
    GetDataError,
    Staging,
    balanced_split,
    label_codes,
    parse_split,
    split_groups,
    write_all_triplets,
    write_layout,
)
from csnlib.errors import run_script
from csnlib.options import int_range, nonneg_int, positive_int
from triplet_image_loader import SPLITS, image_size_problem, name_problem, path_problem, utf8_text


def refuse_foreign(out, force):
    """Never overwrite a folder that is not a dataset this script built, unless --force."""
    if os.path.exists(out) and os.listdir(out) and not force and not os.path.exists(os.path.join(out, 'manifest.json')):
        raise GetDataError(f'--out {out}: the folder exists and was not built by get_data.py; pick another --out '
                           f'or pass --force to replace it')


# ---------------------------------------------------------------------------------------------------- fonts

def font_stamp(font_dirs):
    from csnlib.fonts import find_font_files
    return [[p, os.path.getsize(p), int(os.path.getmtime(p))] for p in find_font_files(font_dirs)]


def contact_sheet(path, root, filenames, labels, notions, n_values=8, n_per_value=12, thumb=40, seed=0):
    """A PNG with, per notion, a row of sample glyphs for each of up to n_values of its values."""
    rng = np.random.default_rng(seed)
    rows = []
    for notion in notions:
        codes, names = label_codes(labels[notion])
        picked = sorted(rng.choice(len(names), min(n_values, len(names)), replace=False))
        for v in picked:
            idx = np.flatnonzero(codes == v)
            rows.append((f'{notion}: {names[v]}'[:28], rng.choice(idx, min(n_per_value, len(idx)), replace=False)))
    label_w = 190
    sheet = Image.new('L', (label_w + n_per_value * (thumb + 2), len(rows) * (thumb + 2) + 2), 255)
    draw = ImageDraw.Draw(sheet)
    for r, (text, idx) in enumerate(rows):
        y = 2 + r * (thumb + 2)
        draw.text((4, y + thumb // 2 - 6), text, fill=0)
        for j, i in enumerate(idx):
            with Image.open(os.path.join(root, filenames[i])) as im:
                sheet.paste(im.convert('L').resize((thumb, thumb)), (label_w + j * (thumb + 2), y))
    sheet.save(path)


def build_fonts(args, log=print):
    from csnlib import fonts
    system = [] if args.no_system_fonts else [d for d in fonts.SYSTEM_FONT_DIRS if os.path.isdir(d)]
    font_dirs = system + list(args.font_dir or [])
    if not font_dirs:
        raise GetDataError('no font folder: --no-system-fonts needs --font-dir DIR')
    sizes = {'train': args.train_triplets, 'val': args.val_triplets, 'test': args.test_triplets}
    settings = {'font_dirs': font_dirs, 'size': args.size, 'max_faces': args.max_faces, 'seed': args.seed,
                'split': args.split, 'triplets_per_notion': sizes}
    out = args.out or os.path.join('data', 'fonts')
    manifest_path = os.path.join(out, 'manifest.json')
    stamp = font_stamp(font_dirs)
    if os.path.exists(manifest_path) and not args.force:
        try:
            with open(manifest_path) as f:
                old = json.load(f)
        except (OSError, ValueError):                                   # a damaged record: build again
            old = {}
        if isinstance(old, dict) and old.get('settings') == settings and old.get('font_files') == stamp:
            log(f'{out}: already built from the same fonts and settings ({old["counts"]["images"]} images); '
                f'--force rebuilds it')
            return out
    refuse_foreign(out, args.force)
    t0 = time.time()
    with Staging(out, args.force) as tmp:
        staging = os.path.join(tmp, 'render')
        kept, dropped = fonts.build(font_dirs, staging, size=args.size, workers=args.workers,
                                    max_faces=args.max_faces, seed=args.seed, log=log)
        if not kept:
            raise GetDataError(f'no usable font faces under {", ".join(font_dirs)} (dropped {len(dropped)}); '
                               f'install the fonts with `bash setup.sh` or pass --font-dir DIR')
        split_of_face = balanced_split([fonts.key(f['family']) for f in kept],
                                       {n: [f[n] for f in kept] for n in ('family', 'weight', 'slant')},
                                       parse_split(args.split), args.seed)
        filenames, labels, split_of, pitch = [], {n: [] for n in FONT_NOTIONS}, [], []
        used = set()
        for f, split in sorted(zip(kept, split_of_face), key=lambda t: (fonts.key(t[0]['family']), t[0]['style'])):
            folder = f'{fonts.slug(f["family"])}/{fonts.slug(f["style"])}'
            while folder in used:                                       # two names with one slug
                folder += '_'
            used.add(folder)
            os.makedirs(os.path.join(tmp, 'images', os.path.dirname(folder)), exist_ok=True)
            os.replace(os.path.join(staging, str(f['id'])), os.path.join(tmp, 'images', folder))
            f['folder'], f['split'] = folder, str(split)
            for c in fonts.CHARS:
                filenames.append(f'{folder}/U{ord(c):04X}.png')
                labels['character'].append(c)
                labels['font'].append(f['family'])
                labels['weight'].append(f['weight'])
                labels['slant'].append(f['slant'])
                pitch.append(f['pitch'])
                split_of.append(str(split))
        shutil.rmtree(staging, ignore_errors=True)
        counts = write_all_triplets(tmp, FONT_NOTIONS, labels, split_of, sizes, args.seed, log)
        # a mirrored glyph is another character (b/d, p/q) or none (J, S, 7), and an italic leans the other way
        write_layout(tmp, 'fonts', 'images', filenames, FONT_NOTIONS, labels, split_of, False,
                     {'image_size': args.size, 'description': 'glyphs A-Z a-z 0-9 of installed fonts, white on black'})
        fonts.add_label_column(os.path.join(tmp, 'labels.csv'), 'pitch', pitch)  # no notion: for reproduce.py's probe
        contact_sheet(os.path.join(tmp, 'contact_sheet.png'), os.path.join(tmp, 'images'), filenames, labels,
                      FONT_NOTIONS, seed=args.seed)
        reasons = {}
        for f in dropped:
            reasons[f['drop']] = reasons.get(f['drop'], 0) + 1
        summary = {'faces_kept': len(kept), 'families': len({fonts.key(f['family']) for f in kept}),
                   'faces_dropped': len(dropped), 'dropped_by_reason': dict(sorted(reasons.items())),
                   'images': len(filenames), 'triplets': counts,
                   'images_per_split': {s: int(sum(1 for x in split_of if x == s)) for s in SPLITS},
                   'weight': {v: labels['weight'].count(v) // 62 for v in ('regular', 'bold')},
                   'slant': {v: labels['slant'].count(v) // 62 for v in ('upright', 'italic')},
                   'pitch': {v: pitch.count(v) // 62 for v in ('fixed', 'proportional')}}
        keep_keys = ('path', 'index', 'sha256', 'family', 'style', 'weight', 'slant', 'weight_class',
                     'italic_angle', 'pitch', 'folder', 'split')
        manifest = {'settings': settings, 'font_files': stamp, 'counts': summary,
                    'build_seconds': round(time.time() - t0, 1),
                    'kept': [{k: f.get(k) for k in keep_keys} for f in kept],
                    'dropped': [{k: f.get(k) for k in ('path', 'index', 'sha256', 'family', 'style', 'drop', 'detail')}
                                for f in dropped]}
        with open(os.path.join(tmp, 'manifest.json'), 'w') as fh:
            json.dump(manifest, fh, indent=1)
    log(f'{out}: {summary["faces_kept"]} faces of {summary["families"]} families kept, {len(dropped)} dropped '
        f'({", ".join(f"{k} {v}" for k, v in summary["dropped_by_reason"].items())}); {len(filenames)} images; '
        f'triplets per notion train/val/test {sizes["train"]}/{sizes["val"]}/{sizes["test"]}; '
        f'{manifest["build_seconds"]} s. See {out}/contact_sheet.png and {out}/manifest.json')
    return out


FONT_NOTIONS = ['character', 'font', 'weight', 'slant']


# ------------------------------------------------------------------------------------------ your own images

def read_attributes(path, image_column, notions):
    """(image paths, {notion: strings}) from a CSV; names the file and line of every problem."""
    if not os.path.isfile(path):
        raise GetDataError(f'--attributes {path}: no such file')
    text = utf8_text(path, GetDataError, 'save the CSV as UTF-8 (e.g. "CSV UTF-8" in a spreadsheet)')
    reader = csv.reader(io.StringIO(text, newline=''))
    try:
        header = [h.strip() for h in next(reader)]
        rows = []
        for r in reader:
            if any(x.strip() for x in r):
                rows.append((reader.line_num, r))
    except StopIteration:
        raise GetDataError(f'{path}: empty file (expected a header line: image,<notion>,...)') from None
    except csv.Error as e:
        raise GetDataError(f'{path}:{reader.line_num}: not a readable CSV line ({e})') from None
    doubled = sorted({h for h in header if header.count(h) > 1})
    if doubled:
        raise GetDataError(f'{path}:1: column(s) {", ".join(repr(h) for h in doubled)} appear twice in the header; '
                           f'every column needs its own name')
    col = image_column or next((h for h in header if h.lower() in ('image', 'path', 'file', 'filename')), header[0])
    if col not in header:
        raise GetDataError(f'{path}:1: no column {col!r} for the image path (header: {", ".join(header)}); '
                           f'see --image-column')
    notions = notions or [h for h in header if h != col and h.lower() != 'split']
    missing = [n for n in notions if n not in header]
    if missing or not notions:
        raise GetDataError(f'{path}:1: notion column(s) {", ".join(missing) or "(none)"} not in the header '
                           f'({", ".join(header)})')
    if len(set(notions)) != len(notions):
        raise GetDataError(f'--notions {" ".join(notions)}: a notion is named twice')
    for n in notions:
        why = name_problem(n)
        if why:
            raise GetDataError(f'{path}:1: notion column {n!r} cannot be a notion name: {why} (a notion name becomes '
                               f'part of file names, tripletlists/<notion>_tripletlist_<split>.txt); rename the column')
    ci, idx = header.index(col), [header.index(n) for n in notions]
    images, labels, seen = [], {n: [] for n in notions}, {}
    for ln, r in rows:
        if len(r) != len(header):
            raise GetDataError(f'{path}:{ln}: {len(r)} fields, the header has {len(header)}')
        p = r[ci].strip()
        if not p:
            raise GetDataError(f'{path}:{ln}: empty image path')
        if p in seen:
            raise GetDataError(f'{path}:{ln}: image {p!r} listed again (first on line {seen[p]})')
        seen[p] = ln
        images.append(p)
        for n, i in zip(notions, idx):
            labels[n].append(r[i].strip())
    if not images:
        raise GetDataError(f'{path}: no rows after the header')
    return images, labels, notions


def check_images(images_dir, images, attributes):
    """Every listed image exists and decodes; otherwise stop naming all the bad ones (CSV line order)."""
    bad = []
    real_dir = os.path.realpath(images_dir).rstrip(os.sep) + os.sep
    for i, p in enumerate(images):
        full = os.path.join(images_dir, p)
        if os.path.isabs(p) or path_problem(p):
            bad.append(f'{p}: must be a path inside --images')
            continue
        if not os.path.realpath(full).startswith(real_dir):
            bad.append(f'{full}: resolves to {os.path.realpath(full)}, outside --images (a symbolic link); put the '
                       f'image itself inside {images_dir}')
            continue
        try:
            with Image.open(full) as im:
                why = image_size_problem(*im.size)
                if why:
                    bad.append(f'{full}: {im.size[0]} x {im.size[1]} px, {why}; crop or shrink it')
                    continue
                im.verify()
        except FileNotFoundError:
            bad.append(f'{full}: not found')
        except Exception as e:  # noqa: BLE001 (PIL raises many kinds for broken files)
            bad.append(f'{full}: unreadable ({e})')
    if bad:
        shown = '\n  '.join(bad[:20]) + (f'\n  ... and {len(bad) - 20} more' if len(bad) > 20 else '')
        raise GetDataError(f'{attributes}: {len(bad)} image(s) cannot be used:\n  {shown}')


def build_attributes(args, log=print):
    if not args.images or not args.attributes:
        raise GetDataError('--dataset attributes needs --images DIR and --attributes FILE.csv')
    if not os.path.isdir(args.images):
        raise GetDataError(f'--images {args.images}: no such folder')
    out = args.out or os.path.join('data', 'attributes')
    refuse_foreign(out, args.force)
    images, labels, notions = read_attributes(args.attributes, args.image_column, args.notions)
    check_images(args.images, images, args.attributes)
    split_of = split_groups(images, parse_split(args.split), args.seed)
    sizes = {'train': args.train_triplets, 'val': args.val_triplets, 'test': args.test_triplets}
    with Staging(out, args.force) as tmp:
        counts = write_all_triplets(tmp, notions, labels, split_of, sizes, args.seed, log)
        images_dir = os.path.abspath(args.images)
        # the images stay where they are: DIR/images is a link to them, so dataset.json names a folder inside DIR
        os.symlink(images_dir, os.path.join(tmp, 'images'), target_is_directory=True)
        write_layout(tmp, os.path.basename(os.path.abspath(out)), 'images', images, notions, labels, split_of,
                     not args.no_hflip)
        unknown = {n: sum(1 for v in labels[n] if not v) for n in notions}
        with open(os.path.join(tmp, 'manifest.json'), 'w') as f:
            json.dump({'settings': {'images': images_dir, 'attributes': os.path.abspath(args.attributes),
                                    'notions': notions, 'seed': args.seed, 'split': args.split,
                                    'triplets_per_notion': sizes},
                       'counts': {'images': len(images), 'triplets': counts, 'unlabelled': unknown}}, f, indent=1)
    left_out = ', '.join(f'{n} {k}' for n, k in unknown.items() if k)
    log(f'{out}: {len(images)} images, notions {", ".join(notions)}'
        + (f'; rows without a value, left out of that notion only: {left_out}' if left_out else ''))
    return out


# ---------------------------------------------------------------------------------------------------- the CLI

def split_fractions(text):
    """--split's argparse type: checked at parse time, kept as the text (it is recorded as given)."""
    try:
        parse_split(text)
    except GetDataError:
        raise argparse.ArgumentTypeError(f'expected three fractions train,val,test such as 0.7,0.15,0.15 (train > 0, '
                                         f'none < 0), got {text!r}') from None
    return text


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=__doc__.split('\n', 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    a = p.add_argument
    a('--dataset', choices=['zappos', 'fonts', 'attributes', 'synthetic', 'asen'], default='zappos',
      help='which dataset to build (default: zappos)')
    a('--out', metavar='DIR', help='output folder (default: data for zappos, data/fonts, data/attributes)')
    a('--force', action='store_true', help='rebuild even when the output looks complete (default: off)')
    a('--seed', type=nonneg_int, default=1, help='seed of the image split and the triplet draw (default: 1)')
    a('--split', type=split_fractions, default='0.7,0.15,0.15',
      help='train,val,test fractions of the fonts\' families or of your images '
           '(default: 0.7,0.15,0.15)')
    a('--train-triplets', type=positive_int, default=50000, help='training triplets per notion (default: 50000)')
    a('--val-triplets', type=positive_int, default=20000,
      help='validation triplets per notion (default: 20000, as the paper)')
    a('--test-triplets', type=positive_int, default=40000,
      help='test triplets per notion (default: 40000, as the paper)')
    g = p.add_argument_group('fonts')
    g.add_argument('--font-dir', action='append', metavar='DIR',
                   help='more fonts to use besides /usr/share/fonts (repeatable; default: none)')
    g.add_argument('--no-system-fonts', action='store_true',
                   help='use only the --font-dir folders, not /usr/share/fonts (default: off)')
    g.add_argument('--max-faces', type=positive_int, help='use about this many faces, whole families (default: all)')
    g.add_argument('--size', type=positive_int, default=64, help='glyph image size in pixels (default: 64)')
    g.add_argument('--workers', type=positive_int, help='rendering processes (default: one per CPU core)')
    g = p.add_argument_group('attributes (your own images)')
    g.add_argument('--images', metavar='DIR', help='folder the CSV\'s image paths are relative to')
    g.add_argument('--attributes', metavar='FILE.csv', help='CSV: an image path column and one column per notion')
    g.add_argument('--image-column', help='the CSV column with the image path (default: image, path, file or '
                                          'filename, else the first)')
    g.add_argument('--notions', nargs='+', help='the CSV columns to use as notions (default: all but the image '
                                                'and a split column)')
    g.add_argument('--no-hflip', action='store_true',
                   help='a horizontally mirrored image does not keep its labels (text, left/right notions): write '
                        '"hflip": false to dataset.json so that main.py never mirrors these images (default: mirroring '
                        'keeps the labels, as for shoes)')
    g = p.add_argument_group('synthetic (offline shoe drawings in the Zappos layout, for tests and benchmarks)')
    g.add_argument('--synthetic-images', type=int_range(32), default=2000, metavar='N',
                   help='number of images (default: 2000; out: data/synthetic)')
    g = p.add_argument_group('asen (a dataset in ASEN\'s layout: --from DIR with DIR/meta.json and DIR/NAME/)')
    g.add_argument('--name', metavar='NAME',
                   help='which dataset of DIR/meta.json to convert, from DIR/NAME/ (FashionAI, DARN, DeepFashion or '
                        'any other key there; out: data/asen_NAME in lower case) (default: the only one, when '
                        'meta.json has one)')
    zappos.add_args(p)
    return p


def main(argv=None):
    """Build the dataset that argv asks for; a user's mistake raises GetDataError (run_script prints it)."""
    args = build_parser().parse_args(argv)
    if args.name is not None and args.dataset != 'asen':
        raise GetDataError(f'--name {args.name}: --name picks a dataset of ASEN\'s meta.json, for --dataset asen only')
    if args.dataset == 'synthetic':
        from csnlib import synthetic
        synthetic.build(args.out or os.path.join('data', 'synthetic'), args.synthetic_images, args.seed, args.force)
    elif args.dataset == 'asen':  # --from DIR [--name NAME] (ASEN's meta.json and DIR/NAME) or DIR/NAME
        from csnlib import asen_data
        if not args.from_dir:
            raise GetDataError('--dataset asen needs --from DIR: a dataset in ASEN\'s layout (meta.json, NAME/)')
        asen_data.build(args.from_dir, args.out, name=args.name, seed=args.seed, force=args.force,
                        sizes={'train': args.train_triplets, 'val': args.val_triplets, 'test': args.test_triplets})
    elif args.dataset == 'fonts':
        build_fonts(args)
    elif args.dataset == 'attributes':
        build_attributes(args)
    else:
        zappos.run(args)


if __name__ == '__main__':
    sys.exit(run_script(main,
                        interrupted='interrupted; nothing half-built was left in place, run it again to continue'))
