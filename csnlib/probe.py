"""Off-the-shelf features, as in the paper's brand experiment: a linear probe on a trained model's frozen backbone.

The probe reads the pooled ResNet features (256-d, before the embedding layer) of the test images and learns a label
that no training triplet covered: on Fonts, which of the unseen test families a glyph comes from (fitted on half of the
characters, scored on the other half); on Zappos50k, the brand (fitted on half of each brand's images, scored on the
rest). A randomly initialised backbone gives an untrained reference.
"""
import csv
import os

import numpy as np
import torch

from csnlib.image_cache import ImageStore, build_image_cache
from Resnet_18 import EmbeddingNet

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def probe_task(info):
    """{'images' (N,), 'labels' (N,), 'fit' (N,) bool, 'description'} for the dataset, or None when it has no label
    the training triplets did not cover."""
    rows = None
    if info.labels_file and os.path.exists(info.labels_file):
        with open(info.labels_file, newline='') as f:
            rows = list(csv.DictReader(f))
    if rows and 'font' in rows[0] and 'character' in rows[0] and 'split' in rows[0]:
        test = np.array([i for i, r in enumerate(rows) if r['split'] == 'test'])
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


def linear_probe(features, labels, fit):
    """Accuracy of a logistic regression fitted on features[fit] and scored on the rest."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(features[fit])
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(scaler.transform(features[fit]), labels[fit])
    return float((clf.predict(scaler.transform(features[~fit])) == labels[~fit]).mean())


def backbone(state_dict, prefix='embednet.embeddingnet.'):
    """The trained EmbeddingNet of a CSN or standard triplet network checkpoint."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(f'no {prefix}* weights in the checkpoint (task-specific networks have one backbone per notion)')
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
