"""The standard metric-learning figures, precision@1 and MAP@R (Musgrave et al., ECCV 2020), from
pytorch-metric-learning's AccuracyCalculator, per notion on the same masked test embeddings and labels as the retrieval
mAP (csnlib.search.notion_map). pytorch-metric-learning is optional: pip install pytorch-metric-learning.

The query set is the reference set (each image against all the other test images), the distance is the Euclidean one
the model was trained with, on the masked vectors as they are (not normalised), relevant = same label. A query whose
label no other image has is left out, as the retrieval mAP leaves it out. MAP@R counts the precision at the relevant
ranks among the first R (R = the query's relevant images) only; the retrieval mAP counts them over the whole ranking,
which AccuracyCalculator calls mean_average_precision.
"""
import numpy as np
import torch

from csnlib.evaluate import labelled_subspaces

INSTALL = 'pip install pytorch-metric-learning'
FIGURES = {'precision_at_1': 'precision_at_1', 'map_at_r': 'mean_average_precision_at_r'}  # our key: the library's


def pml_or_none():
    """pytorch_metric_learning's AccuracyCalculator class when the package is installed, else None."""
    try:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    except ImportError:
        return None
    return AccuracyCalculator


@torch.no_grad()
def accuracies(space, labels, include=tuple(FIGURES.values()), k='max_bin_count', chunk=1024, batch_size=256):
    """AccuracyCalculator's figures (the library's names in include) for the rows of space (N, D), each row a query
    against all the other rows, by Euclidean distance; labels (N,) of any kind. k: neighbours retrieved per query
    ('max_bin_count' is enough for precision@1 and MAP@R; None, every row, for mean_average_precision). The library
    keeps k neighbours of each query, so queries go `chunk` at a time, each chunk against every row (the chunk first,
    as its ref_includes_query asks), distances batch_size queries at a time; the chunks' means are weighed by their
    queries. {name: fraction over the queries that have a relevant row, nan when none has}."""
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.inference import CustomKNN
    AccuracyCalculator = pml_or_none()
    x = torch.from_numpy(np.ascontiguousarray(space, dtype=np.float32))  # (N, D)
    _, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)  # (N,) labels as 0..L-1
    codes = codes.reshape(-1)
    has_relevant = np.bincount(codes)[codes] > 1  # (N,) the queries the library averages over
    knn = CustomKNN(LpDistance(normalize_embeddings=False, p=2, power=1), batch_size=batch_size)
    calc = AccuracyCalculator(include=tuple(include), k=k, device=torch.device('cpu'), knn_func=knn)
    t, n = torch.from_numpy(codes), len(x)
    sums, counted = dict.fromkeys(include, 0.0), 0
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        m = int(has_relevant[s:e].sum())
        if not m:
            continue
        order = torch.cat([torch.arange(s, e), torch.arange(0, s), torch.arange(e, n)])  # (N,) the chunk first
        got = calc.get_accuracy(x[s:e], t[s:e], x[order], t[order], ref_includes_query=True)
        for name in include:
            sums[name] += got[name] * m
        counted += m
    return {name: sums[name] / counted if counted else float('nan') for name in include}


def notion_accuracies(emb, masks, images, labels, notions, conditions):
    """precision@1 and MAP@R of each notion in conditions that has labels, over `images` under its mask (as
    csnlib.evaluate.labelled_subspaces gives them: unknown ('') labels left out).
    {'precision_at_1': mean over the notions, 'map_at_r': mean, 'precision_at_1_per_notion': {notion: fraction or
    None}, 'map_at_r_per_notion': {...}} (None: no query has a relevant image; such a notion stays out of the means)."""
    per = {key: {} for key in FIGURES}
    for name, space, lab in labelled_subspaces(emb, masks, images, labels, notions, conditions):
        got = accuracies(space, lab)
        for key, metric in FIGURES.items():
            per[key][name] = None if np.isnan(got[metric]) else float(got[metric])
    out = {}
    for key in FIGURES:
        known = [v for v in per[key].values() if v is not None]
        out[key] = float(np.mean(known)) if known else None
        out[f'{key}_per_notion'] = per[key]
    return out
