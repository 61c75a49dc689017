"""A dataset in ASEN's layout (Maryeon/asen: FashionAI, DARN, DeepFashion) into the layout main.py reads, with their
retrieval protocol's query and candidate lists, and the protocol's mAP for a trained model.

ASEN's layout, under DIR:
  meta.json                            {NAME: {"ATTRIBUTES": [names], "ATTRIBUTES_NUM": {name: count} or [counts],
                                        "ATTRIBUTES_VALUES": {name: [value names]} (optional)}, ...}
  NAME/filenames_{train,valid,test}.txt  an image path per line, relative to DIR/NAME; line i is image i of the split
  NAME/label_train.txt                 `img attr val [attr val ...]`: image of filenames_train,
                                       attribute and value index
  NAME/{query,candidate}_{valid,test}.txt  `img attr val`, images of filenames_{valid,test}
What build writes to OUT:
  filenames.json (train, then valid, then test images), images -> DIR/NAME (a link: nothing is copied),
  dataset.json (the attributes as notions, "values" per notion), labels.csv (image, notions..., split),
  tripletlists/NOTION_tripletlist_{train,val,test}.txt drawn as ASEN draws its training triplets (a value of the
  attribute at random, anchor and close two images with it, far one with another value), and
  protocol/{query,candidate}_{val,test}.txt: `image notion value` as indices (filenames.json, notions, values).
ASEN draws new training triplets every epoch; here they are drawn once (--train-triplets per notion).
"""
import json
import os
import re

import numpy as np

from csnlib.dataset_writer import GetDataError, Staging, write_layout, write_triplets
from csnlib.errors import UserError
from triplet_image_loader import SPLITS, utf8_text

ASEN_SPLITS = {'train': 'train', 'val': 'valid', 'test': 'test'}  # ours -> theirs
WHERE = ('ASEN\'s data: the meta files of github.com/Maryeon/asen (its README links them) and the images of FashionAI, '
         'DARN or DeepFashion from their own sites')


def resolve(src, name=None):
    """(DIR, NAME, meta entry) from --from DIR and --name NAME (left out: the one dataset of DIR/meta.json), or from
    --from DIR/NAME."""
    src, given = os.path.abspath(src), '--name'
    if not os.path.exists(os.path.join(src, 'meta.json')) and os.path.exists(os.path.join(os.path.dirname(src),
                                                                                           'meta.json')):
        if name is not None and name != os.path.basename(src):
            raise GetDataError(f'--from {src} is dataset {os.path.basename(src)!r} but --name says {name!r}: pass '
                               f'--from {os.path.dirname(src)} --name NAME, or --from DIR/NAME alone')
        src, name, given = os.path.dirname(src), os.path.basename(src), f'--from {src}'
    path = os.path.join(src, 'meta.json')
    if not os.path.exists(path):
        raise GetDataError(f'--from {src}: no meta.json there or in its parent; expected ASEN\'s layout '
                           f'(DIR/meta.json and DIR/NAME/filenames_train.txt ...): {WHERE}')
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise GetDataError(f'{path}: not valid JSON ({e})') from None
    if not isinstance(meta, dict) or not meta:
        raise GetDataError(f'{path}: expected an object with one entry per dataset (e.g. "FashionAI")')
    if name is None:
        if len(meta) > 1:
            raise GetDataError(f'{path} describes {len(meta)} datasets ({", ".join(meta)}): pass --name NAME with one '
                               f'of them (or --from {os.path.join(src, "NAME")})')
        name = next(iter(meta))
    if name not in meta:
        raise GetDataError(f'{given} {name}: {path} has no dataset {name!r}; it has {", ".join(meta)} (pass --name '
                           f'with one of them)')
    entry = meta[name]
    attrs = entry.get('ATTRIBUTES') if isinstance(entry, dict) else None
    if not isinstance(attrs, list) or not attrs or len(set(attrs)) != len(attrs):
        raise GetDataError(f'{path}: {name}.ATTRIBUTES must be a non-empty list of distinct names')
    for a in attrs:
        if not isinstance(a, str) or not a or '/' in a or a != a.strip():
            raise GetDataError(f'{path}: attribute name {a!r} cannot name a triplet file (no "/", no outer spaces)')
    return src, name, entry


def value_names(entry, path):
    """{attribute: [value names]} from ATTRIBUTES_VALUES, else value indices as text, ATTRIBUTES_NUM of them."""
    attrs, num, vals = entry['ATTRIBUTES'], entry.get('ATTRIBUTES_NUM'), entry.get('ATTRIBUTES_VALUES')
    out = {}
    for i, a in enumerate(attrs):
        if isinstance(vals, dict) and isinstance(vals.get(a), list):
            out[a] = [str(v) for v in vals[a]]
        elif isinstance(vals, list) and i < len(vals) and isinstance(vals[i], list):
            out[a] = [str(v) for v in vals[i]]
        else:
            n = num.get(a) if isinstance(num, dict) else num[i] if isinstance(num, list) and i < len(num) else None
            if not isinstance(n, int) or n < 1:
                raise GetDataError(f'{path}: no value count for attribute {a!r} (ATTRIBUTES_NUM or ATTRIBUTES_VALUES)')
            out[a] = [str(v) for v in range(n)]
    return out


def read_lines(path):
    if not os.path.exists(path):
        raise GetDataError(f'{path} not found: ASEN\'s layout needs it ({WHERE})')
    return utf8_text(path, GetDataError, 'ASEN\'s lists are UTF-8 text').split('\n')  # a latin-1 byte: file, line


def read_labels(path, n_images, values, attrs, pairs=True):
    """[(image, attribute index, value index)] from label_train.txt (pairs: `img attr val attr val ...`) or a
    query/candidate list (`img attr val`); every index checked, with file and line."""
    out = []
    for ln, text in enumerate(read_lines(path), 1):
        parts = text.split()
        if not parts:
            continue
        ok = (all(re.fullmatch(r'[0-9]{1,18}', p) for p in parts)  # ASCII: '²' is a digit to str.isdigit
              and len(parts) >= 3 and len(parts) % 2 == 1 and (pairs or len(parts) == 3))
        if not ok:
            raise GetDataError(f'{path}:{ln}: expected "img attr val{" [attr val ...]" if pairs else ""}" as '
                               f'indices (ASCII digits), got {text.strip()[:60]!r}')
        img, rest = int(parts[0]), [int(p) for p in parts[1:]]
        if img >= n_images:
            raise GetDataError(f'{path}:{ln}: image {img} is outside its filenames list (0..{n_images - 1})')
        for a, v in zip(rest[::2], rest[1::2]):
            if a >= len(attrs) or v >= len(values[attrs[a]]):
                raise GetDataError(f'{path}:{ln}: attribute {a} value {v} is not in meta.json\'s '
                                   f'{len(attrs)} attributes and their values')
            out.append((img, a, v))
    return out


def draw_triplets(images, values, n, rng, max_tries=20):
    """Up to n distinct triplets (anchor, far, close) as ASEN draws them: a value at random (among those with two
    images, when another value exists), anchor and close two images with it, far an image with another value."""
    images, values = np.asarray(images, np.int64), np.asarray(values, np.int64)
    groups = {v: images[values == v] for v in np.unique(values)}
    usable = sorted(v for v, g in groups.items() if len(g) >= 2)
    if len(groups) < 2 or not usable:
        return np.zeros((0, 3), np.int64)
    seen, out = set(), []
    for _ in range(max_tries * n):
        if len(out) == n:
            break
        v = usable[rng.integers(len(usable))]
        a, c = rng.choice(groups[v], 2, replace=False)
        others = images[values != v]
        t = (int(a), int(others[rng.integers(len(others))]), int(c))
        if t not in seen:
            seen.add(t)
            out.append(t)
    return np.array(out, np.int64).reshape(-1, 3)


def build(src, out=None, name=None, seed=1, force=False, sizes=None, log=print):
    """Convert DIR (ASEN's layout) into OUT (default data/asen_NAME); returns OUT. sizes: {split: triplets per
    notion} (default 50000 train, 20000 val, 40000 test)."""
    src, name, entry = resolve(src, name)
    meta_path = os.path.join(src, 'meta.json')
    root = os.path.join(src, name)
    attrs, values = entry['ATTRIBUTES'], value_names(entry, meta_path)
    sizes = sizes or {'train': 50000, 'val': 20000, 'test': 40000}
    out = out or os.path.join('data', f'asen_{name.lower()}')
    if os.path.isdir(out) and os.listdir(out) and not force and not os.path.exists(os.path.join(out, 'manifest.json')):
        raise GetDataError(f'--out {out}: the folder exists and was not built by get_data.py; pick another --out or '
                           f'pass --force to replace it')
    filenames, index, split_of, first = [], {}, [], {}
    for split, theirs in ASEN_SPLITS.items():
        paths = read_lines(os.path.join(root, f'filenames_{theirs}.txt'))
        while paths and not paths[-1].strip():
            paths.pop()
        first[split] = []
        for ln, p in enumerate(paths, 1):
            p = p.strip()
            if not p:
                raise GetDataError(f'{os.path.join(root, f"filenames_{theirs}.txt")}:{ln}: empty line (line i+1 is '
                                   f'image i)')
            if p not in index:
                index[p] = len(filenames)
                filenames.append(p)
                split_of.append(split)
            first[split].append(index[p])
    missing = [p for p in filenames[:50] if not os.path.isfile(os.path.join(root, p))]
    if missing:
        raise GetDataError(f'{os.path.join(root, missing[0])}: image not found ({len(missing)} of the first '
                           f'{min(50, len(filenames))} listed are missing); put the images under {root}: {WHERE}')
    labels = {a: [''] * len(filenames) for a in attrs}
    entries = {}  # (split, attr index) -> [(global image, value)]
    protocol = {}  # (kind, split) -> [(global image, attr, value)]
    conflicts = 0

    def label(split, rows):
        nonlocal conflicts
        for img, a, v in rows:
            g = first[split][img]
            name_v = values[attrs[a]][v]
            if labels[attrs[a]][g] not in ('', name_v):
                conflicts += 1
                continue
            if labels[attrs[a]][g] == '':
                labels[attrs[a]][g] = name_v
                entries.setdefault((split, a), []).append((g, v))

    label('train', read_labels(os.path.join(root, 'label_train.txt'), len(first['train']), values, attrs))
    for split in ('val', 'test'):
        for kind in ('query', 'candidate'):
            rows = read_labels(os.path.join(root, f'{kind}_{ASEN_SPLITS[split]}.txt'), len(first[split]), values,
                               attrs, pairs=False)
            protocol[kind, split] = [(first[split][i], a, v) for i, a, v in rows]
            label(split, rows)
    if conflicts:
        log(f'note: {conflicts} labels give an image a second value for an attribute; the first one is kept')
    rng = np.random.default_rng(seed)
    counts = {}
    with Staging(out, force) as tmp:
        for a, attr in enumerate(attrs):
            counts[attr] = {}
            for split in SPLITS:
                rows = entries.get((split, a), [])
                trip = draw_triplets([r[0] for r in rows], [r[1] for r in rows], sizes[split], rng)
                if len(trip) == 0:
                    raise GetDataError(f'{attr}/{split}: no triplet can be drawn (it needs two values and a value with '
                                       f'two images among the split\'s labelled images)')
                if len(trip) < sizes[split]:
                    log(f'note: {attr}/{split}: {len(trip)} distinct triplets of the {sizes[split]} asked for')
                write_triplets(tmp, attr, split, trip)
                counts[attr][split] = len(trip)
        os.symlink(root, os.path.join(tmp, 'images'))
        write_layout(tmp, name, 'images', filenames, attrs, labels, split_of, True,
                     {'values': values, 'protocol': 'protocol', 'source': 'asen'})
        os.makedirs(os.path.join(tmp, 'protocol'))
        for (kind, split), rows in protocol.items():
            with open(os.path.join(tmp, 'protocol', f'{kind}_{split}.txt'), 'w') as f:
                f.writelines(f'{g} {a} {v}\n' for g, a, v in rows)
        with open(os.path.join(tmp, 'manifest.json'), 'w') as f:
            json.dump({'source': os.path.abspath(src), 'name': name, 'seed': seed, 'triplets_per_notion': sizes,
                       'images': len(filenames), 'triplets': counts,
                       'protocol': {f'{k}_{s}': len(r) for (k, s), r in protocol.items()}}, f, indent=1)
    log(f'{out}: {name} in this repository\'s layout: {len(filenames)} images, {len(attrs)} notions '
        f'({", ".join(attrs)}), protocol lists for val and test')
    return out


def read_protocol(info, split='test'):
    """{notion: (query images (Q,), query values (Q,), candidate images (N,), candidate values (N,))} of a dataset
    converted by build, for protocol_map."""
    lists = {}
    for kind in ('query', 'candidate'):
        path = os.path.join(info.root, info.extra.get('protocol', 'protocol'), f'{kind}_{split}.txt')
        if not os.path.exists(path):
            raise UserError(f'{path} not found: {info.root} has no retrieval protocol lists (get_data.py --dataset '
                            f'asen writes them)')
        rows = np.loadtxt(path, dtype=np.int64, ndmin=2).reshape(-1, 3)
        lists[kind] = rows
    out = {}
    for c, notion in enumerate(info.notions):
        q, cand = lists['query'][lists['query'][:, 1] == c], lists['candidate'][lists['candidate'][:, 1] == c]
        if len(q) and len(cand):
            out[notion] = (q[:, 0], q[:, 2], cand[:, 0], cand[:, 2])
    return out


def protocol_results(model, info, rt, split='test', store=None):
    """ASEN's mAP of a trained model on a converted dataset's protocol lists: each image embedded once (per notion for
    ASEN and task-specific networks, masked for a CSN), ranked by the model's own similarity (dot product for ASEN,
    Euclidean distance otherwise). Returns protocol_map's dict."""
    from asen import ASEN
    from csnlib.evaluate import embed_dataset, subspace
    from csnlib.image_cache import make_store
    from csnlib.search import protocol_map
    if not getattr(model.embednet, 'per_notion_embedding', True):
        raise UserError('the retrieval protocol ranks candidates under a notion: SCE-Net (--model scenet) has no '
                        'embedding per notion')
    lists = read_protocol(info, split)
    images = np.unique(np.concatenate([np.concatenate([q, c]) for q, _, c, _ in lists.values()]))
    emb, masks = embed_dataset(model, images, store or make_store(info, rt), rt, len(info.notions))
    per = {}
    for notion, (q, qv, c, cv) in lists.items():
        space = subspace(emb, masks, info.notions.index(notion))  # (len(images), D)
        per[notion] = (space[np.searchsorted(images, q)], qv, space[np.searchsorted(images, c)], cv)
    return protocol_map(per, 'dot' if isinstance(model.embednet, ASEN) else 'euclidean')
