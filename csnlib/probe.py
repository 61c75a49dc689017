"""Off-the-shelf features, as in the paper's brand experiment: a linear probe on a trained model's frozen backbone.

The probe reads the pooled ResNet features (256-d, before the embedding layer) of the test images and learns a label
that no training triplet covered: on Fonts, which of the unseen test families a glyph comes from (fitted on half of the
characters, scored on the other half); on Zappos50k, the brand (fitted on half of each brand's images, scored on the
rest). On Fonts a second probe learns a label that no notion covers at all: the pitch (fixed or proportional, from the
font files), fitted on half of the unseen families of each pitch and scored on the other half by balanced accuracy
(chance 50 %), once on a fixed halving ('pitch') and over many random halvings ('pitch_splits'). A randomly initialised
backbone gives an untrained reference.

The notion x label matrix asks what each notion's subspace holds: a linear probe from notion c's embedding of the test
images (f(x) * m_c for a CSN, notion c's network or ASEN's embed(x, c)) to every notion's label, fitted and scored on
disjoint families.
"""
import csv
import os

import numpy as np
import torch

from csnlib.image_cache import ImageStore, build_image_cache
from Resnet_18 import EmbeddingNet
from triplet_image_loader import DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# the probe that claim (e) is judged on, where there is one: a label no training triplet touched
PROBE_FOR_CLAIM = 'pitch'
PITCH_SPLITS = 50  # claim (e)'s random family halvings, split seeds 0..49
MATRIX_SPLITS = 5  # the notion x label matrix's family halvings, split seeds 0..4 (the matrix holds their mean)
GROUP, WITHIN = 'font', 'character'  # the family column of labels.csv, and the one that splits a family's glyphs
PROBE_KINDS, KNN = ('linear', 'knn'), 10  # the matrix's probes (see split_probe); neighbours of the knn probe
DESCRIPTIONS = {
    'pitch': 'the pitch of the font (fixed or proportional: the post table\'s isFixedPitch, or one advance width for '
             'all 62 characters), a label that no notion covers, over the glyphs of the val and test families (none in '
             'a training triplet), fitted on half of the families of each pitch and scored on the others by balanced '
             'accuracy (chance 50 %)',
    'pitch_splits': 'the pitch probe repeated over random halvings of the val and test families (split seed s: each '
                    'pitch\'s families shuffled by numpy\'s default_rng(s), the first half, rounded up, fitted on, '
                    'the rest scored, by balanced accuracy); families with faces of both pitches left out',
    'family': 'the font family of the test glyphs (families that no training triplet showed; a trained notion, font, '
              'on unseen families), fitted on half of the characters and scored on the others',
    'brand': 'the brand of the test images, fitted on half of each brand\'s images and scored on the rest'}


def probe_task(info):
    """{'images' (N,), 'labels' (N,), 'fit' (N,) bool, 'description'} for the dataset, or None when it has no label
    the training triplets did not cover."""
    rows = None
    if info.labels_file and os.path.exists(info.labels_file):
        with open(info.labels_file, newline='') as f:
            rows = list(csv.DictReader(f))
    if rows and 'font' in rows[0] and 'character' in rows[0] and 'split' in rows[0]:
        test = np.array([i for i, r in enumerate(rows) if r['split'] == 'test'])
        if not len(test):
            return None
        chars = sorted({rows[i]['character'] for i in test})
        fit_chars = set(chars[::2])
        labels = np.array([rows[i]['font'] for i in test])
        fit = np.array([rows[i]['character'] in fit_chars for i in test])
        return {'images': test, 'labels': labels, 'fit': fit,
                'description': f'font family of the {len(test)} test glyphs ({len(set(labels))} families that no '
                               f'training triplet showed), fitted on {len(fit_chars)} of the {len(chars)} characters '
                               f'and scored on the others'}
    parts = [p.split('/') for p in info.filenames]
    if info.name == 'zappos50k' and all(len(p) >= 4 for p in parts):
        brands = np.array(['/'.join(p[2:3]) for p in parts])
        if rows and 'split' in rows[0]:
            images = np.array([i for i, r in enumerate(rows) if r['split'] == 'test'])
        else:  # the paper's release has no split column: the images of its test triplets
            images = np.unique(np.concatenate([np.loadtxt(info.triplet_file(n, 'test'), dtype=np.int64, ndmin=2).ravel()
                                               for n in info.notions if os.path.exists(info.triplet_file(n, 'test'))]))
        names, counts = np.unique(brands[images], return_counts=True)
        keep = set(names[counts >= 4])  # a brand needs images on both sides of the probe's split
        images = np.array([i for i in images if brands[i] in keep])
        fit = np.zeros(len(images), bool)
        for b in keep:
            sel = np.flatnonzero(brands[images] == b)
            fit[sel[::2]] = True
        return {'images': images, 'labels': brands[images], 'fit': fit,
                'description': f'brand of {len(images)} test images ({len(keep)} brands with 4 images or more), '
                               f'fitted on half of each brand\'s images and scored on the rest'}
    return None


def pitch_task(info):
    """The pitch probe on Fonts: {'images', 'labels', 'fit', 'balanced': True, 'description'}, or None when
    labels.csv has no pitch column or fewer than two unseen families of a pitch."""
    if not info.labels_file or not os.path.exists(info.labels_file):
        return None
    with open(info.labels_file, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows or not {'pitch', 'font', 'split'} <= set(rows[0]):
        return None
    images = np.array([i for i, r in enumerate(rows) if r['split'] in ('val', 'test') and r['pitch']])
    if not len(images):
        return None
    pitch = {}
    for i in images:
        pitch[rows[i]['font']] = rows[i]['pitch']
    fit_families = set()
    for value in sorted(set(pitch.values())):
        families = sorted(f for f, v in pitch.items() if v == value)
        if len(families) < 2:
            return None
        fit_families.update(families[::2])
    labels = np.array([rows[i]['pitch'] for i in images])
    fit = np.array([rows[i]['font'] in fit_families for i in images])
    counts = {v: sum(1 for x in pitch.values() if x == v) for v in sorted(set(pitch.values()))}
    return {'images': images, 'labels': labels, 'fit': fit, 'balanced': True,
            'description': f'pitch of the {len(images)} val and test glyphs '
                           f'({", ".join(f"{n} {v}" for v, n in counts.items())} '
                           f'families, none in a training triplet), fitted on half of the families of each pitch, '
                           f'balanced accuracy'}


def read_labels(info):
    """labels.csv's rows as dicts, or None when the dataset has none."""
    if not info.labels_file or not os.path.exists(info.labels_file):
        return None
    with open(info.labels_file, newline='') as f:
        return list(csv.DictReader(f))


def halve(groups, rng):
    """The groups fitted on: the sorted groups shuffled by rng, the first half (rounded up, as families[::2])."""
    order = rng.permutation(sorted(groups))
    return set(order[:(len(order) + 1) // 2].tolist())


def pitch_splits_task(info, n_splits=PITCH_SPLITS):
    """Claim (e)'s pitch probe over n_splits random family halvings: {'images' (N,), 'labels' (N,), 'fits'
    (n_splits, N) bool, 'balanced': True, 'families' {pitch: count}, 'mixed' [families left out], 'description'},
    or None as pitch_task. Split s shuffles each pitch's families (sorted, pitches in sorted order) with one
    np.random.default_rng(s) and fits on the first half of each, rounded up. A family whose val and test faces have
    both pitches has no one label: it would stand on one side of every split with glyphs of both classes, in one
    design, so the probe would score the face's width within a design rather than the family's pitch; it is left
    out and named in the description (on Fonts: Compagnon, four fixed faces and one proportional). pitch_task's one
    fixed halving stays as it was (records computed with it keep their meaning); split 0 here is not that halving."""
    rows = read_labels(info)
    if not rows or not {'pitch', 'font', 'split'} <= set(rows[0]):
        return None
    pitches = {}
    for r in rows:
        if r['split'] in ('val', 'test') and r['pitch']:
            pitches.setdefault(r['font'], set()).add(r['pitch'])
    mixed = sorted(f for f, v in pitches.items() if len(v) > 1)
    by_pitch = {}
    for f, v in pitches.items():
        if len(v) == 1:
            by_pitch.setdefault(next(iter(v)), []).append(f)
    if len(by_pitch) < 2 or min(len(f) for f in by_pitch.values()) < 2:
        return None
    images = np.array([i for i, r in enumerate(rows) if r['split'] in ('val', 'test') and r['pitch']
                       and r['font'] not in mixed], dtype=np.int64)
    fams = np.array([rows[i]['font'] for i in images])
    fits = np.zeros((n_splits, len(images)), bool)
    for s in range(n_splits):
        rng = np.random.default_rng(s)
        fit = set().union(*(halve(by_pitch[p], rng) for p in sorted(by_pitch)))
        fits[s] = np.isin(fams, sorted(fit))
    counts = {p: len(f) for p, f in sorted(by_pitch.items())}
    left = (f'; {len(mixed)} famil{"y" if len(mixed) == 1 else "ies"} with faces of both pitches left out '
            f'({", ".join(mixed)})' if mixed else '')
    return {'images': images, 'labels': np.array([rows[i]['pitch'] for i in images]), 'fits': fits, 'balanced': True,
            'families': counts, 'mixed': mixed,
            'description': f'pitch of the {len(images)} val and test glyphs of '
                           f'{" and ".join(f"{n} {p}" for p, n in counts.items())} families (none in a training '
                           f'triplet){left}, over {n_splits} random halvings of each pitch\'s families (split seeds '
                           f'0 to {n_splits - 1}: fitted on half, rounded up, scored on the rest), balanced accuracy'}


def probe_tasks(info, n_splits=0):
    """{name: task} of every probe the dataset allows: 'pitch' and 'family' on Fonts, 'brand' on Zappos50k; with
    n_splits (e.g. PITCH_SPLITS), also 'pitch_splits', the pitch probe over n_splits family halvings."""
    tasks = {}
    pitch = pitch_task(info)
    if pitch is not None:
        tasks['pitch'] = pitch
    other = probe_task(info)
    if other is not None:
        tasks['brand' if other['description'].startswith('brand') else 'family'] = other
    splits = pitch_splits_task(info, n_splits) if n_splits else None
    if splits is not None:
        tasks['pitch_splits'] = splits
    return tasks


def image_batches(info, images, image_size, batch=256):
    """The images normalised as training saw them, batch at a time: (b, 3, S, S) float32, no flips."""
    store = ImageStore(info, image_size, build_image_cache(info, image_size, None, log=lambda *a, **k: None))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for s in range(0, len(images), batch):
        u8 = torch.from_numpy(store.get(np.asarray(images[s:s + batch])))  # (b, S, S, 3)
        yield (u8.permute(0, 3, 1, 2).float() / 255.0 - mean) / std  # (b, 3, S, S)


@torch.no_grad()
def pooled_features(net, info, images, image_size, batch=256):
    """The backbone's pooled features of `images`: (N, 256) float32 numpy, in eval mode, no flips."""
    net.eval()
    out = [net.features(x).float() for x in image_batches(info, images, image_size, batch)]
    return torch.cat(out).numpy()


def linear_probe(features, labels, fit, balanced=False):
    """Accuracy of a logistic regression fitted on features[fit] and scored on the rest; balanced: the classes weighted
    alike in the fit, and the score the mean of the per-class accuracies (chance 1 / classes). One BLAS thread: on a
    busy machine two threads made a 7,000 x 256 fit 30 times slower (14 s against 0.5 s), for the same result."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):
        scaler = StandardScaler().fit(features[fit])
        clf = LogisticRegression(max_iter=2000, C=1.0, class_weight='balanced' if balanced else None)
        clf.fit(scaler.transform(features[fit]), labels[fit])
        right = clf.predict(scaler.transform(features[~fit])) == labels[~fit]
    if not balanced:
        return float(right.mean())
    return float(np.mean([right[labels[~fit] == v].mean() for v in np.unique(labels[~fit])]))


def probe_all(net, image_size, info, tasks):
    """{name: accuracy} of every task's probe on one backbone, each image's features computed once; a task with
    'fits' (pitch_splits) gives a list, one accuracy per split."""
    images = np.unique(np.concatenate([t['images'] for t in tasks.values()]))
    feats = pooled_features(net, info, images, image_size)
    out = {}
    for name, t in tasks.items():
        x = feats[np.searchsorted(images, t['images'])]  # (N, 256)
        balanced = t.get('balanced', False)
        out[name] = ([linear_probe(x, t['labels'], fit, balanced) for fit in t['fits']] if 'fits' in t
                     else linear_probe(x, t['labels'], t['fit'], balanced))
    return out


def probe_checkpoint_all(ckpt, info, tasks):
    """probe_all on a checkpoint's trained backbone."""
    return probe_all(backbone(ckpt['state_dict']), ckpt['args']['image_size'], info, tasks)


def probe_random_all(run_args, info, tasks, seed):
    """probe_all on a backbone initialised at random with torch seed `seed` (a run's dim_embed and image_size)."""
    torch.manual_seed(seed)
    return probe_all(EmbeddingNet(run_args['dim_embed']), run_args['image_size'], info, tasks)


def backbone(state_dict, prefix='embednet.embeddingnet.'):
    """The trained EmbeddingNet of a CSN or standard triplet network checkpoint."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(f'no {prefix}* weights in the checkpoint '
                         f'(task-specific networks have one backbone per notion)')
    net = EmbeddingNet(sd['fc.weight'].shape[0])
    net.load_state_dict(sd)
    return net


def probe_checkpoint(ckpt, info, task):
    feats = pooled_features(backbone(ckpt['state_dict']), info, task['images'], ckpt['args']['image_size'])
    return linear_probe(feats, task['labels'], task['fit'])


def probe_random(run_args, info, task, seed):
    torch.manual_seed(seed)
    net = EmbeddingNet(run_args['dim_embed'])
    feats = pooled_features(net, info, task['images'], run_args['image_size'])
    return linear_probe(feats, task['labels'], task['fit'])


# ------------------------------------------------------------------------------------ what each notion's subspace holds

def matrix_task(info, n_splits=MATRIX_SPLITS):
    """The notion x label matrix's probes over the test images (labels.csv's split == 'test'; every labelled image
    where there is no split column): {'images' (N,), 'labels' {notion: (N,) str}, 'fits' {notion: (n_splits, N)
    bool}, 'scores' {notion: (n_splits, N) bool}, 'description'}, or None when labels.csv has no notion's column.
    Split s halves the families (labels.csv's 'font'; each image its own group where there is none) with
    np.random.default_rng(s): fitted on half, scored on the other half, so no family is on both sides. The font
    label cannot be learned across families (no class on both sides), so its column splits each family's glyphs
    instead: fitted on half of the characters (shuffled by the same rng), scored on the rest; without a character
    column it is left out. Only images whose class the fit saw are scored, and unlabelled ('') images are in
    neither side."""
    rows = read_labels(info)
    notions = [n for n in info.notions if rows and n in rows[0]]
    if not notions:
        return None
    split = 'split' in rows[0]
    images = np.array([i for i, r in enumerate(rows) if not split or r['split'] == 'test'], dtype=np.int64)
    if not len(images):
        return None
    column = lambda k: np.array([rows[i][k] for i in images])  # noqa: E731
    groups = column(GROUP) if GROUP in rows[0] else images.astype(str)
    within = column(WITHIN) if WITHIN in rows[0] else None
    labels = {n: column(n) for n in notions if n != GROUP or within is not None}
    fits = {n: np.zeros((n_splits, len(images)), bool) for n in labels}
    scores = {n: np.zeros((n_splits, len(images)), bool) for n in labels}
    for s in range(n_splits):
        rng = np.random.default_rng(s)
        by_family = np.isin(groups, sorted(halve(set(groups), rng)))
        by_glyph = np.isin(within, sorted(halve(set(within), rng))) if within is not None else None
        for n, lab in labels.items():
            fit = (by_glyph if n == GROUP else by_family) & (lab != '')
            fits[n][s] = fit
            scores[n][s] = ~fit & (lab != '') & np.isin(lab, np.unique(lab[fit]))
    left = '' if len(labels) == len(notions) else f'; the {GROUP} label is left out (no {WITHIN} column to split by)'
    n_groups = f'{len(set(groups))} {"families" if GROUP in rows[0] else "images"}'
    return {'images': images, 'labels': labels, 'fits': fits, 'scores': scores,
            'description': f'probes (balanced accuracy) from each notion\'s embedding of '
                           f'the {len(images)} {"test " if split else ""}images to every notion\'s label, fitted on '
                           f'half of the {n_groups} and scored on the other half, the mean over {n_splits} random '
                           f'halvings (split seeds 0 to {n_splits - 1})'
                           + (f'; the {GROUP} label on a split of each family\'s glyphs by {WITHIN} instead '
                              f'(families have no class on both sides of a family split)' if GROUP in labels else '')
                           + left}


def split_probe(features, labels, fit, score, kind='linear'):
    """Balanced accuracy of a probe fitted on features[fit] and scored on features[score] (disjoint); None when the
    fit sees fewer than two classes or nothing is scored. kind 'linear': linear_probe (a logistic regression on
    standardised features, so it reads every dimension a mask leaves above zero, however small its weight); 'knn':
    a vote of the KNN (10) nearest fitted images in the features' own Euclidean metric, as the model's distance weighs
    them (a dimension that a learned mask scales down counts as little as it does there)."""
    if len(np.unique(labels[fit])) < 2 or not score.any():
        return None
    keep = fit | score
    if kind == 'linear':
        return linear_probe(features[keep], labels[keep], fit[keep], balanced=True)
    if kind != 'knn':
        raise ValueError(f'probe kind {kind!r}: one of {PROBE_KINDS}')
    from sklearn.neighbors import KNeighborsClassifier
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):
        clf = KNeighborsClassifier(min(KNN, int(fit.sum()))).fit(features[fit], labels[fit])
        right = clf.predict(features[score]) == labels[score]
    return float(np.mean([right[labels[score] == v].mean() for v in np.unique(labels[score])]))


@torch.no_grad()
def subspace_embeddings(model, info, images, image_size, rows):
    """{row: (N, D) float32 numpy} of the test images under each notion. rows: {name: notion index} (masked
    embedding f(x) * m_c of a CSN, notion c's network, ASEN's embed(x, c); SCE-Net: f(x) * relu(M_k) of its mask k),
    or {'all': None} (the standard triplet network's one embedding)."""
    model.eval()
    net = model.embednet
    w = net.concept_masks() if hasattr(net, 'concept_masks') else net.mask_weights()  # (C or K, D) or None
    out = {r: [] for r in rows}
    for x in image_batches(info, images, image_size):
        shared = None if net.per_notion_backbone else net.embed(x).float()  # (b, D)
        for r, c in rows.items():
            if net.per_notion_backbone:
                out[r].append(net.embed(x, c).float())  # (b, D)
            elif c is None or w is None:
                out[r].append(shared)
            else:
                out[r].append(shared * w[c].float())  # (b, D)
    return {r: torch.cat(v).numpy() for r, v in out.items()}


def matrix_rows(model, notions, conditions):
    """The matrix's rows for a model: {notion name: index} of each notion it was trained on, {'all': None} for the
    standard triplet network, {'mask k + 1': k} for SCE-Net (named as claims.py names its masks, which are weighed
    per pair of images: none is a notion's)."""
    net = model.embednet
    if hasattr(net, 'concept_masks'):
        return {f'mask {k + 1}': k for k in range(net.concept_masks().shape[0])}
    if not net.per_notion_backbone and net.mask_weights() is None:
        return {'all': None}
    return {notions[c]: c for c in conditions}


def model_matrix(model, image_size, info, rows, task, kind='linear'):
    """{row: {label notion: balanced accuracy}} of one model, embedded once: each cell the mean over the task's
    splits where the fit saw two classes or more (None where no split did); kind: split_probe's."""
    emb = subspace_embeddings(model, info, task['images'], image_size, rows)
    out = {}
    for r, x in emb.items():
        out[r] = {}
        for n, lab in task['labels'].items():
            accs = [a for f, s in zip(task['fits'][n], task['scores'][n])
                    if (a := split_probe(x, lab, f, s, kind)) is not None]
            out[r][n] = float(np.mean(accs)) if accs else None
    return out


def model_args(run_args):
    """main.py's flags with a run's recorded ones over the defaults (as --resume merges them)."""
    from csnlib.checkpoint import merge_checkpoint_args
    from csnlib.options import main_parser
    return merge_checkpoint_args(main_parser().parse_args([]), {'args': dict(run_args), 'state_dict': {}}, set(),
                                 'the run\'s record')


def checked_task(info, task):
    """matrix_task(info) where task is None; DataError where the dataset has no notion's label to probe."""
    task = matrix_task(info) if task is None else task
    if task is None:
        raise DataError(f'{info.labels_file or os.path.join(info.root, "labels.csv")}: no column of a notion '
                        f'({", ".join(info.notions)}) to probe')
    return task


def notion_label_matrix(ckpt, info, task=None, kind='linear'):
    """The notion x label matrix of a checkpoint's model (any --model; rows: matrix_rows, columns and splits:
    matrix_task, kind: split_probe's): {row: {label notion: balanced accuracy}}, e.g. on Fonts
    {'character': {'character': 0.61, 'font': 0.20, 'weight': 0.71, 'slant': 0.62}, 'font': {...}, ...}."""
    from csnlib.builder import build_model
    from csnlib.checkpoint import trained_conditions
    task = checked_task(info, task)
    notions = ckpt.get('notions') or info.notions
    if list(notions) != list(info.notions):
        raise DataError(f'the checkpoint was trained on notions {list(notions)}, but {info.root} has {info.notions}: '
                        f'pass the dataset it was trained on')
    model = build_model(model_args(ckpt['args']), len(notions), pretrained=False)
    model.load_state_dict(ckpt['state_dict'])
    rows = matrix_rows(model, notions, trained_conditions(ckpt, notions))
    return model_matrix(model, ckpt['args']['image_size'], info, rows, task, kind)


def random_notion_label_matrix(run_args, info, seed, task=None, kind='linear'):
    """notion_label_matrix of an untrained model of the run's shape (its --model, masks and dim_embed, random weights
    from torch seed `seed`, no ImageNet weights; every notion a row): the reference a trained subspace is judged
    against."""
    from csnlib.builder import build_model
    task = checked_task(info, task)
    torch.manual_seed(seed)
    model = build_model(model_args(run_args), len(info.notions), pretrained=False)
    rows = matrix_rows(model, info.notions, range(len(info.notions)))
    return model_matrix(model, run_args['image_size'], info, rows, task, kind)
