"""Off-the-shelf features, as in the paper's brand experiment: a linear probe on a trained model's frozen backbone.

The probe reads the pooled ResNet features (256-d, before the embedding layer) of the test images and learns a label
that no training triplet covered: on Fonts, which of the unseen test families a glyph comes from (fitted on half of the
characters, scored on the other half); on Zappos50k, the brand (fitted on half of each brand's images, scored on the
rest). On Fonts a second probe learns a label that no notion covers at all: the pitch (fixed or proportional, from the
font files), fitted on half of the unseen families of each pitch and scored on the other half by balanced accuracy
(chance 50 %). A randomly initialised backbone gives an untrained reference.
"""
import csv
import os

import numpy as np
import torch

from csnlib.image_cache import ImageStore, build_image_cache
from Resnet_18 import EmbeddingNet

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# the probe that claim (e) is judged on, where there is one: a label no training triplet touched
PROBE_FOR_CLAIM = 'pitch'
DESCRIPTIONS = {
    'pitch': 'the pitch of the font (fixed or proportional: the post table\'s isFixedPitch, or one advance width for '
             'all 62 characters), a label that no notion covers, over the glyphs of the val and test families (none in '
             'a training triplet), fitted on half of the families of each pitch and scored on the others by balanced '
             'accuracy (chance 50 %)',
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


def probe_tasks(info):
    """{name: task} of every probe the dataset allows: 'pitch' and 'family' on Fonts, 'brand' on Zappos50k."""
    tasks = {}
    pitch = pitch_task(info)
    if pitch is not None:
        tasks['pitch'] = pitch
    other = probe_task(info)
    if other is not None:
        tasks['brand' if other['description'].startswith('brand') else 'family'] = other
    return tasks


@torch.no_grad()
def pooled_features(net, info, images, image_size, batch=256):
    """The backbone's pooled features of `images`: (N, 256) float32 numpy, in eval mode, no flips."""
    store = ImageStore(info, image_size, build_image_cache(info, image_size, None, log=lambda *a, **k: None))
    net.eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for s in range(0, len(images), batch):
        u8 = torch.from_numpy(store.get(np.asarray(images[s:s + batch])))  # (b, S, S, 3)
        x = (u8.permute(0, 3, 1, 2).float() / 255.0 - mean) / std  # (b, 3, S, S)
        out.append(net.features(x).float())
    return torch.cat(out).numpy()


def linear_probe(features, labels, fit, balanced=False):
    """Accuracy of a logistic regression fitted on features[fit] and scored on the rest; balanced: the classes weighted
    alike in the fit, and the score the mean of the per-class accuracies (chance 1 / classes)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(features[fit])
    clf = LogisticRegression(max_iter=2000, C=1.0, class_weight='balanced' if balanced else None)
    clf.fit(scaler.transform(features[fit]), labels[fit])
    right = clf.predict(scaler.transform(features[~fit])) == labels[~fit]
    if not balanced:
        return float(right.mean())
    return float(np.mean([right[labels[~fit] == v].mean() for v in np.unique(labels[~fit])]))


def probe_all(net, image_size, info, tasks):
    """{name: accuracy} of every task's probe on one backbone (each image's features computed once)."""
    images = np.unique(np.concatenate([t['images'] for t in tasks.values()]))
    feats = pooled_features(net, info, images, image_size)
    row = {int(i): k for k, i in enumerate(images)}
    return {name: linear_probe(feats[[row[int(i)] for i in t['images']]], t['labels'], t['fit'],
                               t.get('balanced', False))
            for name, t in tasks.items()}


def probe_checkpoint_all(ckpt, info, tasks):
    return probe_all(backbone(ckpt['state_dict']), ckpt['args']['image_size'], info, tasks)


def probe_random_all(run_args, info, tasks, seed):
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
