"""The study's judgement: statistics paired by seed, the paper's claims and their verdicts, the report's text and
figures. reproduce.py trains the runs and keeps their records; everything here reads records and numbers only."""
import shlex

import numpy as np

MODELS = [('triplet', 'standard triplet network', ['--model', 'triplet'], 23.72),
          ('task', 'task-specific triplet networks', ['--model', 'task'], 11.35),
          ('csn_fixed', 'CSN, fixed disjoint masks', ['--model', 'csn'], 10.79),
          ('csn_learned', 'CSN, learned masks', ['--model', 'csn', '--learned'], 10.73),
          # CSN's successors, under the same protocol (on request: --models ... asen scenet; not in the paper's table)
          ('asen', 'ASEN (attention conditioned on the notion)', ['--model', 'asen'], None),
          ('scenet', 'SCE-Net (masks weighed per pair of images)', ['--model', 'scenet', '--scenet-branch', 'pair'],
           None),
          # the released SCE-Net code's branch, which reads the answer from the slot order: trained only to show how
          # much that gives it (reproduce.py --released-scenet-at), never in the sweep, the claims or the standing
          ('scenet_triplet', 'SCE-Net as released (branch on the triplet in role order: reads the slot order)',
           ['--model', 'scenet', '--scenet-branch', 'triplet'], None)]
LEAKY = ('scenet_triplet',)  # models known to see which slot holds the close image
PAPER_MODELS = ('triplet', 'task', 'csn_fixed', 'csn_learned')  # the default: the models of the paper's table
TITLE = {m[0]: m[1] for m in MODELS}
CONFIDENCE = 0.95
MOVED = 0.05  # a learned mask whose mean absolute change is under 5 % of its start's mean absolute value did not train


def lr_tag(lr):
    """3e-4 -> '3e-4', 2.5e-4 -> '2.5e-4': the learning rate in a run's name."""
    m, e = f'{lr:.6e}'.split('e')
    return f'{m.rstrip("0").rstrip(".")}e{int(e)}'


def paper_error(model):
    """The paper's Zappos50k triplet prediction error of a model (%), or a dash for a model not in its table."""
    e = dict((m[0], m[3]) for m in MODELS)[model]
    return '—' if e is None else f'{e:.2f}'


# ------------------------------------------------------------------------------------------------------- statistics

def mean_std(xs):
    """Mean and sample standard deviation (0 for one value)."""
    xs = np.asarray(xs, dtype=float)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def paired(a, b):
    """A minus B over the seeds both have: {'difference', 'ci95': [lo, hi], 'p', 'n'} with the t interval and the
    paired t-test (two-sided); None below two seeds."""
    from scipy import stats
    common = sorted(set(a['seeds']) & set(b['seeds']))
    if len(common) < 2:
        return None
    va, vb = dict(zip(a['seeds'], a['values'])), dict(zip(b['seeds'], b['values']))
    d = np.array([va[s] - vb[s] for s in common])
    n, mean, sd = len(d), float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / np.sqrt(n)
    p = (1.0 if sd == 0 and mean == 0 else 0.0 if sd == 0
         else float(2 * stats.t.sf(abs(mean) / (sd / np.sqrt(n)), n - 1)))
    return {'difference': mean, 'ci95': [mean - half, mean + half], 'p': p, 'n': n}


def verdict(pair):
    """'holds' when the interval lies above zero, 'does not hold' below, else 'inconclusive'."""
    if pair is None:
        return 'inconclusive'
    lo, hi = pair['ci95']
    return 'holds' if lo > 0 else 'does not hold' if hi < 0 else 'inconclusive'


def compare(a, b):
    """Is A above B, paired by seed? (verdict, the numbers in words, the pair or None)."""
    if a is None or b is None:
        return 'inconclusive', 'not run', None
    pair = paired(a, b)
    if pair is None:
        d = a['mean'] - b['mean']
        return 'inconclusive', f'difference {d * 100:+.2f} points from a single seed', None
    lo, hi = pair['ci95']
    word = verdict(pair)
    more = seeds_to_decide(pair) if word == 'inconclusive' else None
    return word, (f'difference {pair["difference"] * 100:+.2f} points, 95 % CI [{lo * 100:+.2f}, '
                  f'{hi * 100:+.2f}] over {pair["n"]} seeds, paired t-test p = {pair["p"]:.3g}'
                  + (f'; at this difference and spread about {more} seeds would decide it' if more else
                     '; at this difference and spread more than 100 seeds would be needed' if more == 0 else '')), pair


def seeds_to_decide(pair, most=100):
    """The fewest seeds whose 95 % interval would exclude zero if the paired differences kept their mean and standard
    deviation; 0 when more than `most` would be needed (or the mean difference is 0)."""
    from scipy import stats
    n0 = pair['n']
    half = (pair['ci95'][1] - pair['ci95'][0]) / 2
    sd = half * np.sqrt(n0) / float(stats.t.ppf(0.5 + CONFIDENCE / 2, n0 - 1))
    d = abs(pair['difference'])
    if d == 0:
        return 0
    for n in range(n0 + 1, most + 1):
        if float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / np.sqrt(n) < d:
            return n
    return 0


def ci_entry(models, pair, **extra):
    """One comparison of reproduce.json's claims_ci, in points."""
    return {'models': list(models), **extra, 'difference': pair['difference'] * 100,
            'ci95': [pair['ci95'][0] * 100, pair['ci95'][1] * 100], 'p': pair['p'], 'n': pair['n']}


def point(summary, model, budget, key='accuracy'):
    s = summary.get(model, {}).get(budget)
    if s is None:
        return None
    return {'mean': s[f'{key}_mean'], 'std': s[f'{key}_std'], 'n': len(s['seeds']), 'seeds': s['seeds'],
            'values': s[key]}


def combine(words):
    """One verdict from several: all the same -> that one; otherwise inconclusive."""
    return words[0] if len(set(words)) == 1 else 'inconclusive'


def pct(p):
    """'mean ± sd' in %, or the mean alone where one seed gives no spread."""
    if not p:
        return 'not run'
    n = p.get('n', len(p.get('values') or [0, 0]))
    return f'{p["mean"] * 100:.2f}' if n < 2 else f'{p["mean"] * 100:.2f} ± {p["std"] * 100:.2f}'


def summarise(rows, models, budgets):
    """{model: {budget: {seeds, accuracy, accuracy_mean, accuracy_std, per_notion_mean, ..., stopped, epochs_trained,
    best_epoch, masks, masks_start, masks_change}}} of what finished."""
    out = {}
    for model in models:
        for b in budgets:
            rs = sorted(((s, r) for (m, bb, s), r in rows.items() if m == model and bb == b), key=lambda t: t[0])
            if not rs:
                continue
            acc = [r['test']['accuracy'] for _, r in rs]
            mu, sd = mean_std(acc)
            notions = list(rs[0][1]['test']['per_notion'])
            maps = [r['test']['mAP'] for _, r in rs if r['test'].get('mAP') is not None]
            d = out.setdefault(model, {})[b] = {
                'seeds': [s for s, _ in rs], 'accuracy': acc, 'accuracy_mean': mu, 'accuracy_std': sd,
                'per_notion_mean': {n: float(np.mean([r['test']['per_notion'][n] for _, r in rs])) for n in notions},
                'per_notion_std': {n: mean_std([r['test']['per_notion'][n] for _, r in rs])[1] for n in notions},
                'mAP_mean': float(np.mean(maps)) if maps else None, 'mAP_std': mean_std(maps)[1] if maps else None,
                'parameters': rs[0][1]['parameters'], 'epochs': max(r['epochs_trained'] for _, r in rs),
                'stopped': [r['stopped'] for _, r in rs], 'epochs_trained': [r['epochs_trained'] for _, r in rs],
                'best_epoch': [r['best_epoch'] for _, r in rs], 'lr': rs[0][1]['lr'],
                'masks': None, 'masks_start': None, 'masks_change': None,
                # accuracy + accuracy with far and close swapped - 1, per seed (None: tested before the check)
                'order_excess': [((r['test'].get('order_check') or {}).get('excess')) for _, r in rs]}
            # pytorch-metric-learning's, where the tests had it; ASEN's protocol mAP on datasets in its layout
            for key in ('pml_precision_at_1', 'pml_map_at_r', 'protocol_mAP'):
                v = [r['test'][key] for _, r in rs if r['test'].get(key) is not None]
                d[f'{key}_mean'], d[f'{key}_std'] = mean_std(v) if v else (None, None)
            if rs[0][1].get('masks') is not None and model == 'csn_learned':
                d['masks'] = mask_summary([mask_stats(r['masks']) for _, r in rs])
                d['masks_start'] = mask_summary([mask_stats(r['masks_start']) for _, r in rs])
                d['masks_change'] = [mask_change(r['masks'], r['masks_start']) for _, r in rs]
    return out


def mask_stats(masks):
    m = np.asarray(masks, dtype=float)  # (C, D)
    active = m >= 0.1 * m.max(1, keepdims=True)  # (C, D)
    pairs = [(i, j) for i in range(len(m)) for j in range(i + 1, len(m))]
    overlap = [(active[i] & active[j]).sum() / max((active[i] | active[j]).sum(), 1) for i, j in pairs]
    return {'sparse': float(1 - active.mean()), 'overlap': float(np.mean(overlap)) if overlap else 0.0,
            'active': active.sum(1).tolist()}


def mask_summary(stats):
    """The form of reproduce.json's "masks": mean and sd of the fraction under and of the overlap, and each seed's."""
    return {'sparse': mean_std([s['sparse'] for s in stats]), 'overlap': mean_std([s['overlap'] for s in stats]),
            'per_seed': stats}


def chance_overlap(active, dim, draws=4000, seed=0):
    """The overlap (mean pairwise Jaccard) that random active sets with each notion's own number of active dimensions
    (active: C counts) would have among `dim` dimensions: the mean over `draws` draws (a permutation null)."""
    rng = np.random.default_rng(seed)
    k = np.asarray(active, dtype=int)[None, :, None]  # (1, C, 1)
    ranks = rng.random((draws, len(active), dim)).argsort(2).argsort(2)  # (draws, C, dim): a random order per set
    sets = ranks < k  # (draws, C, dim): k_c dimensions drawn without replacement for notion c
    pairs = [(i, j) for i in range(len(active)) for j in range(i + 1, len(active))]
    jac = [(sets[:, i] & sets[:, j]).sum(1) / np.maximum((sets[:, i] | sets[:, j]).sum(1), 1) for i, j in pairs]
    return float(np.mean(jac))


def mask_change(masks, start):
    """Mean absolute change of the masks from their start, and the start's mean absolute value."""
    m, s = np.asarray(masks, dtype=float), np.asarray(start, dtype=float)
    return {'mean_abs_change': float(np.abs(m - s).mean()), 'start_mean_abs': float(np.abs(s).mean())}


# ---------------------------------------------------------------------------------------------------------- claims

def claim_a(summary, budget):
    """(a) the standard triplet network is the worst model."""
    t = point(summary, 'triplet', budget)
    others = [m for m in ('task', 'csn_fixed', 'csn_learned') if point(summary, m, budget)]
    if t is None or not others:
        return 'inconclusive', 'the standard triplet network or every other model is missing', []
    results = [(m, *compare(point(summary, m, budget), t)) for m in others]
    text = '; '.join(f'{TITLE[m]} {pct(point(summary, m, budget))} vs {pct(t)} % ({why}): {w}'
                     for m, w, why, _ in results)
    cis = [ci_entry([m, 'triplet'], pair) for m, _, _, pair in results if pair]
    return combine([w for _, w, _, _ in results]), text, cis


def claim_b(summary, budget):
    """(b) a CSN is at least as good as the task-specific networks, with a quarter of their parameters."""
    task = point(summary, 'task', budget)
    csns = [m for m in ('csn_fixed', 'csn_learned') if point(summary, m, budget)]
    if task is None or not csns:
        return 'inconclusive', 'the task-specific networks or both CSNs are missing', []
    results = [(m, *compare(point(summary, m, budget), task)) for m in csns]
    ratio = summary['task'][budget]['parameters'] / summary[csns[0]][budget]['parameters']
    text = ('; '.join(f'{TITLE[m]} {pct(point(summary, m, budget))} vs {pct(task)} % ({why}): {w}'
                      for m, w, why, _ in results)
            + f'; parameters: task-specific {summary["task"][budget]["parameters"]:,}, CSN '
              f'{summary[csns[0]][budget]["parameters"]:,} ({ratio:.2f}x)')
    cis = [ci_entry([m, 'task'], pair) for m, _, _, pair in results if pair]
    return combine([w for _, w, _, _ in results]), text, cis


def claim_c(summary, budgets):
    """(c) learned masks need more triplets than fixed ones and catch up with them or pass them as the budget grows:
    fixed ahead with the fewest triplets, the gap narrowing (paired by seed), and learned not behind with the most."""
    have = [b for b in budgets if point(summary, 'csn_fixed', b) and point(summary, 'csn_learned', b)]
    if len(have) < 2:
        return 'inconclusive', 'needs both CSNs at two budgets or more', []
    small, large = have[0], have[-1]
    fixed_s, learned_s = point(summary, 'csn_fixed', small), point(summary, 'csn_learned', small)
    fixed_l, learned_l = point(summary, 'csn_fixed', large), point(summary, 'csn_learned', large)
    w_small, why_small, p_small = compare(fixed_s, learned_s)
    w_large, why_large, p_large = compare(learned_l, fixed_l)
    gap = lambda f, learned: {'seeds': f['seeds'], 'values': [  # fixed minus learned, per seed both have
        dict(zip(f['seeds'], f['values']))[s] - dict(zip(learned['seeds'], learned['values'])).get(s, np.nan)
        for s in f['seeds']]}
    g_small, g_large = gap(fixed_s, learned_s), gap(fixed_l, learned_l)
    for g in (g_small, g_large):
        keep = [i for i, v in enumerate(g['values']) if np.isfinite(v)]
        g['seeds'], g['values'] = [g['seeds'][i] for i in keep], [g['values'][i] for i in keep]
    w_narrow, why_narrow, p_narrow = compare({**g_small, 'mean': float(np.mean(g_small['values']))},
                                             {**g_large, 'mean': float(np.mean(g_large['values']))})
    gaps = ', '.join(
        f'{b:,}: {(summary["csn_learned"][b]["accuracy_mean"] - summary["csn_fixed"][b]["accuracy_mean"]) * 100:+.2f}'
        for b in have)
    text = (f'learned minus fixed, by training triplets: {gaps} points; fewest triplets, fixed above learned: '
            f'{w_small} ({why_small}); the gap narrows from {small:,} to {large:,}: {w_narrow} ({why_narrow}); most '
            f'triplets, learned above fixed: {w_large} ({why_large})')
    cis = [ci_entry(['csn_fixed', 'csn_learned'], p_small, budget=small) if p_small else None,
           ci_entry(['csn_learned', 'csn_fixed'], p_large, budget=large) if p_large else None,
           ci_entry(['gap at ' + str(small), 'gap at ' + str(large)], p_narrow) if p_narrow else None]
    cis = [c for c in cis if c]
    if w_small == 'does not hold' or w_large == 'does not hold':
        return 'does not hold', text, cis  # learned ahead with the fewest triplets, or still behind with the most
    if w_small == 'holds' and w_narrow == 'holds' and p_large is not None:
        return 'holds', text, cis  # behind with the fewest triplets, the gap closed, not behind with the most
    return 'inconclusive', text, cis


def claim_d(rows, budget):
    """(d) learned masks are sparse and share dimensions between notions: sparser than their own start (paired by
    seed), and sharing a small subset, judged against chance: overlap above 0.05 and below what random active sets
    with each notion's own sizes would share (chance_overlap, per seed, paired). Making masks sparser lowers their
    overlap by itself, so the start is not the reference for the sharing."""
    rs = sorted(((s, r) for (m, b, s), r in rows.items() if m == 'csn_learned' and b == budget), key=lambda t: t[0])
    if not rs:
        return 'inconclusive', 'no CSN with learned masks at this budget', None, [], None
    seeds = [s for s, _ in rs]
    stats = [mask_stats(r['masks']) for _, r in rs]
    starts = [mask_stats(r['masks_start']) for _, r in rs]
    change = [mask_change(r['masks'], r['masks_start']) for _, r in rs]
    rel = [c['mean_abs_change'] / max(c['start_mean_abs'], 1e-12) for c in change]
    val = lambda xs, key: {'seeds': seeds, 'values': [x[key] for x in xs], 'mean': float(np.mean([x[key] for x in xs]))}
    for x in stats:
        x['chance'] = chance_overlap(x['active'], len(rs[0][1]['masks'][0]))
    w_sparse, why_sparse, p_sparse = compare(val(stats, 'sparse'), val(starts, 'sparse'))
    w_less, why_less, p_less = compare(val(stats, 'chance'), val(stats, 'overlap'))
    sparse, shared = mean_std([s['sparse'] for s in stats]), mean_std([s['overlap'] for s in stats])
    sparse0, shared0 = mean_std([s['sparse'] for s in starts]), mean_std([s['overlap'] for s in starts])
    chance = mean_std([s['chance'] for s in stats])
    fixed = f'(fixed disjoint masks: {1 - 1 / len(stats[0]["active"]):.2f} under, overlap 0)'
    ms = lambda t: f'{t[0]:.2f}' if len(seeds) < 2 else f'{t[0]:.2f} ± {t[1]:.2f}'  # no spread from one seed
    text = (f'fraction of mask weights under 0.1 of their row\'s maximum {ms(sparse)} (at their start {ms(sparse0)}); '
            f'overlap (Jaccard of the dimensions at or above 0.1 of the maximum) between notions {ms(shared)} (at '
            f'their start {ms(shared0)}; random active sets of the same sizes: {ms(chance)}) {fixed}; mean absolute '
            f'change from the start {np.mean([c["mean_abs_change"] for c in change]):.3f} ({np.mean(rel) * 100:.1f} % '
            f'of the start\'s mean absolute value); sparser than the start: {w_sparse} ({why_sparse}); overlap below '
            f'chance (random active sets with each notion\'s own number of dimensions, 4,000 draws per seed): '
            f'{w_less} ({why_less}); rule: sparse = sparser than the start by the interval, shared = overlap above '
            f'0.05 and below chance by the interval')
    cis = [ci_entry(['trained', 'start'], p_sparse, what='sparse') if p_sparse else None,
           ci_entry(['chance', 'trained'], p_less, what='overlap below chance') if p_less else None]
    masks = mask_summary(stats)
    extra = {'masks_start': mask_summary(starts), 'masks_change': change}
    if max(rel) < MOVED:
        return 'inconclusive', text, masks, [c for c in cis if c], extra | {'reason': 'the masks did not train'}
    if w_sparse == 'holds' and w_less == 'holds' and shared[0] > 0.05:
        word = 'holds'
    elif w_sparse == 'does not hold' or shared[0] <= 0.05 or w_less == 'does not hold':
        word = 'does not hold'
    else:
        word = 'inconclusive'
    if w_sparse == 'holds' and w_less == 'inconclusive':
        extra['reason'] = 'sparse, but the notions share what random masks of the same sizes would share'
    elif w_sparse == 'holds' and w_less == 'does not hold':
        extra['reason'] = 'sparse, but the notions share more dimensions than random masks of the same sizes would'
    return word, text, masks, [c for c in cis if c], extra


def claim_e(probe):
    """(e) the CSN's features make better off-the-shelf features than the standard triplet network's."""
    if not probe:
        return 'inconclusive', 'the probe was not run', []
    t = probe.get('triplet')
    csns = [m for m in ('csn_fixed', 'csn_learned') if m in probe]
    if t is None or not csns:
        return 'inconclusive', 'the standard triplet network or both CSNs are missing', []
    results = [(m, *compare(probe[m], t)) for m in csns]
    text = '; '.join(f'{TITLE[m]} {pct(probe[m])} vs {pct(t)} % ({why}{split_range(probe[m], t)}): {w}'
                     for m, w, why, _ in results)
    if 'splits' in t:
        text = (f'over {len(t["splits"][0])} random family halvings, each seed\'s accuracy the mean over them, paired '
                f'by seed: ' + text)
    cis = [ci_entry([m, 'triplet'], pair) for m, _, _, pair in results if pair]
    return (combine([w for _, w, _, _ in results]),
            text + untrained(probe.get('random'), [t, *(probe[m] for m in csns)]), cis)


def split_range(a, b):
    """'; by split: from X to Y points': the range over the family halvings of A minus B, each split's difference
    averaged over the seeds both have ('' without splits)."""
    if 'splits' not in a or 'splits' not in b:
        return ''
    common = sorted(set(a['seeds']) & set(b['seeds']))
    sa, sb = dict(zip(a['seeds'], a['splits'])), dict(zip(b['seeds'], b['splits']))
    d = np.mean([np.subtract(sa[s], sb[s]) for s in common], axis=0) * 100  # (splits,)
    return f'; by split, from {d.min():+.2f} to {d.max():+.2f} points'


def subspace_markdown(sub, notions):
    """The report's section on what each notion's subspace holds: a matrix per model, rows the subspaces."""
    if not sub:
        return []
    L = ['## What each notion\'s subspace holds', '',
         'A probe from each notion\'s embedding (a CSN\'s masked embedding, ASEN\'s and the task-specific networks\' '
         'embedding under that notion; the standard triplet network\'s one embedding, row "all") of the test images '
         'to every notion\'s label, fitted on half of the test families and scored on the others (balanced accuracy, '
         'mean over the family halvings and the seeds; the font label, which no family shares, on half of each '
         'family\'s characters). A subspace that predicts another notion\'s label as well as its own is not '
         'disentangled. The untrained reference is the fixed masks on a randomly initialised backbone.', '']
    for m in [*(x[0] for x in MODELS), 'random']:
        if m not in sub:
            continue
        mx = sub[m]['matrix']
        labels = [n for n in notions if n in next(iter(mx.values()))] or list(next(iter(mx.values())))
        title = TITLE.get(m, 'randomly initialised backbone, fixed masks')
        L += [f'{title} (seeds {", ".join(map(str, sub[m]["seeds"]))}):', '',
              '| subspace | ' + ' | '.join(labels) + ' |', '|---|' + '---:|' * len(labels)]
        for row, cells in mx.items():
            L.append(f'| {row} | ' + ' | '.join('' if cells.get(lab) is None else f'{cells[lab] * 100:.1f}'
                                                for lab in labels) + ' |')
        L.append('')
    return L


def untrained(random, trained):
    """Where the randomly initialised backbone's probe lies against the trained ones' (by the mean)."""
    if not random:
        return ''
    above = sum(random['mean'] > t['mean'] for t in trained)
    if above == 0:
        where = 'below every trained backbone'
    elif above == len(trained):
        where = 'above every trained backbone: triplet training made these features worse'
    else:
        where = 'between the trained backbones'
    return f'; randomly initialised backbone (untrained) {pct(random)} %, {where}'


SUCCESSORS, REFERENCES = ('asen', 'scenet'), ('csn_fixed', 'csn_learned', 'task')


def successors_against_csn(summary, budgets):
    """Where CSN's successors stand against the paper's models, paired by seed at every budget: reproduce.json's
    "successors", in points (reported, not judged: no claim of the paper is about them)."""
    out = []
    for m in SUCCESSORS:
        for ref in REFERENCES:
            for b in budgets:
                a, r = point(summary, m, b), point(summary, ref, b)
                pair = paired(a, r) if a and r else None
                if pair:
                    out.append(ci_entry([m, ref], pair, budget=b))
    return out


def successors_markdown(entries, budgets):
    """The successors' table: successor minus reference, points and the 95 % interval, a column per budget."""
    if not entries:
        return []
    cell = {(tuple(e['models']), e['budget']): e for e in entries}
    L = ['## CSN\'s successors against the paper\'s models', '',
         'Test accuracy of ASEN and SCE-Net minus that of each of the paper\'s models, in points, paired by seed: the '
         'mean difference and its 95 % confidence interval (the number of seeds in brackets). No claim of the paper is '
         'about these models, so the study reports them and gives no verdict.', '',
         '| successor minus | ' + ' | '.join(f'{b:,}' for b in budgets) + ' |', '|---|' + '---:|' * len(budgets)]
    for pair in dict.fromkeys(tuple(e['models']) for e in entries):
        cells = []
        for b in budgets:
            e = cell.get((pair, b))
            cells.append(f'{e["difference"]:+.2f} [{e["ci95"][0]:+.2f}, {e["ci95"][1]:+.2f}] ({e["n"]})' if e else '')
        L.append(f'| {TITLE[pair[0]]} minus {TITLE[pair[1]]} | ' + ' | '.join(cells) + ' |')
    return L + ['']


def false_verdict_rate(n):
    """The rule's rate of a verdict ("holds" or "does not hold") for one comparison of two equal models, with n seeds:
    the interval's 1 - CONFIDENCE when the seed differences are normal (half of it each way); none below two seeds."""
    return 1 - CONFIDENCE if n >= 2 else 0.0


# ----------------------------------------------------------------------------------------------------------- report

def write_curve(summary, budgets, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9.6, 4.2))
    for model, title, _, _ in MODELS:
        pts = [(b, summary[model][b]) for b in budgets if b in summary.get(model, {})]
        if not pts:
            continue
        x = np.array([b for b, _ in pts])
        err = np.array([(1 - s['accuracy_mean']) * 100 for _, s in pts])
        sd = np.array([s['accuracy_std'] * 100 for _, s in pts])
        ax.plot(x, err, marker='o', label=title)
        ax.fill_between(x, err - sd, err + sd, alpha=0.2)
    ax.set_xscale('log')
    ax.set_xticks(budgets, [f'{b:,}' for b in budgets])  # the budgets themselves, not powers of ten
    ax.minorticks_off()
    ax.set_xlabel('training triplets (unique, over all notions)')
    ax.set_ylabel('test triplet error (%)')
    ax.set_title('error against training triplets (band: ± one sd over seeds)')
    ax.grid(True, alpha=0.3)
    ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the plot: no line hidden under it
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure_masks(model, masks):
    """A record's masks as the model uses them: SCE-Net's records before the fix kept its weights without the ReLU."""
    m = np.asarray(masks, dtype=float)  # (C, D)
    return np.maximum(m, 0) if model.startswith('scenet') else m


def write_mask_figure(rows, budget, notions, path):
    """The masks at `budget`, one row per run and a column each for the start and the trained masks: the fixed
    disjoint masks once (they never change), then each seed's learned masks (CSN) and SCE-Net's K masks, which belong
    to no notion (rows 'mask 1'..'mask K')."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from csnlib.pictures import draw_masks
    found = []  # (title, row labels, start or None, trained)
    for (m, b, s), r in sorted(rows.items(), key=lambda kv: ([x[0] for x in MODELS].index(kv[0][0]), kv[0][2])):
        if b != budget or r.get('masks') is None:
            continue
        if m == 'csn_fixed':
            if not any(f[0].startswith(TITLE[m]) for f in found):
                found.append((f'{TITLE[m]} (the same for every seed)', notions, None, figure_masks(m, r['masks'])))
            continue
        labels = [f'mask {k + 1}' for k in range(len(r['masks']))] if m.startswith('scenet') else notions
        start = r.get('masks_start')
        found.append((f'{TITLE[m]}, seed {s}', labels, None if start is None else figure_masks(m, start),
                      figure_masks(m, r['masks'])))
    if not found:
        return False
    n_rows = max(len(f[1]) for f in found)
    fig, axes = plt.subplots(len(found), 2, figsize=(13, 0.6 + (0.3 * n_rows + 0.55) * len(found)), squeeze=False)
    for i, (title, labels, start, trained) in enumerate(found):
        last = i == len(found) - 1
        for ax, masks, when in ((axes[i, 0], start, 'start'), (axes[i, 1], trained, 'trained')):
            if masks is None:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f'{title}: fixed, no start to show', ha='center', va='center', fontsize=8)
                continue
            draw_masks(ax, masks, labels, f'{title}, {when}', vmin=0, xlabel=last, title_size=8, fraction=0.03,
                       pad=0.01)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def pm(mean, std, n):
    """'mean ± sd' in %, or the mean alone from a single seed (no spread to give)."""
    return f'{mean * 100:.2f}' if n < 2 else f'{mean * 100:.2f} ± {std * 100:.2f}'


CLAIMS = {'a': 'the standard triplet network is the worst model',
          'b': 'a CSN is at least as good as the task-specific networks, with a quarter of their parameters',
          'c': 'learned masks need more triplets than fixed ones and catch up with them or pass them as the '
               'budget grows',
          'd': 'learned masks are sparse and share dimensions between notions',
          'e': 'the CSN\'s features are better off-the-shelf features than the standard triplet network\'s'}


def markdown(rep):
    budgets = rep['budgets']
    top = str(rep.get('top') or budgets[-1])  # the largest budget with a finished run
    models = [m for m in (x[0] for x in MODELS) if top in rep['models'].get(m, {})]
    notions = list(rep['models'][models[0]][top]['per_notion_mean']) if models else []
    # ASEN's retrieval protocol (datasets in its layout: get_data.py --dataset asen): queries against candidates
    protocol = any(rep['models'][m][top].get('protocol_mAP_mean') is not None for m in models)
    s = rep['settings']
    forwards = ('three backbone calls per step, as the original' if s.get('three_forwards') else
                'one backbone call per step for anchors, fars and closes '
                '(main.py\'s default; the original makes three)')
    L = [f'# The CSN paper\'s claims on {rep["data"]}', '']
    L += sweep_markdown(rep)
    L += [f'Triplet prediction accuracy (%) on the test triplets, from each run\'s best checkpoint (by validation '
          f'accuracy): mean ± standard deviation over the seeds of the last column (asked for: '
          f'{", ".join(map(str, rep["seeds"]))}; a single seed gives no spread). '
          f'{int(top):,} training triplets. Order check: the accuracy with far and close swapped in everything the '
          f'model sees, plus the accuracy as given, minus 100 %, in points (the largest over the seeds): 0 for a model '
          f'that cannot see which slot holds the close image, ties aside; a model far from 0 reads the answer from the '
          f'order of the triplet\'s images, and its accuracy is not comparable with the others\'. mAP: retrieval mean '
          f'average precision over the test images under each '
          f'notion\'s mask (datasets with labels); precision@1 and MAP@R: pytorch-metric-learning\'s, on the same '
          f'embeddings (where it was installed)'
          + ('; protocol mAP: ASEN\'s, queries against candidates per attribute, weighted by queries' if protocol
             else '') + '. The paper\'s error is on Zappos50k (64-d, 200k triplets), for the ordering only.',
          '', '| model | ' + ' | '.join(notions) + ' | overall | error | order check | mAP | precision@1 | MAP@R | '
          + ('protocol mAP | ' if protocol else '') + 'parameters | paper error (Zappos50k) | seeds |',
          '|---|' + '---:|' * (len(notions) + 9 + protocol)]
    for m in models:
        d = rep['models'][m][top]
        k = len(d['seeds'])
        mp = pm(d['mAP_mean'], d['mAP_std'], k) if d.get('mAP_mean') is not None else ''
        p1, mr, pr = (pm(d[f'{key}_mean'], d[f'{key}_std'], k) if d.get(f'{key}_mean') is not None else ''
                      for key in ('pml_precision_at_1', 'pml_map_at_r', 'protocol_mAP'))
        L.append(f'| {TITLE[m]} | '
                 + ' | '.join(pm(d['per_notion_mean'][n], d['per_notion_std'][n], k) for n in notions)
                 + f' | **{pm(d["accuracy_mean"], d["accuracy_std"], k)}** | '
                   f'{(1 - d["accuracy_mean"]) * 100:.2f} | {order_cell(d.get("order_excess"))} | {mp} | {p1} | {mr} | '
                   + (f'{pr} | ' if protocol else '') + f'{d["parameters"]:,} | '
                   f'{paper_error(m)} | '
                   f'{", ".join(map(str, d["seeds"]))} |')
    L += ['', 'Test error (%) against training triplets (mean ± sd over seeds; the number of seeds in brackets):', '',
          '| model | ' + ' | '.join(f'{b:,}' for b in budgets) + ' |', '|---|' + '---:|' * len(budgets)]
    for m, title, _, _ in MODELS:
        if m not in rep['models']:
            continue
        cells = []
        for b in budgets:
            d = rep['models'][m].get(str(b))
            cells.append(f'{pm(1 - d["accuracy_mean"], d["accuracy_std"], len(d["seeds"]))} ({len(d["seeds"])})'
                         if d else '')
        L.append(f'| {title} | ' + ' | '.join(cells) + ' |')
    L += ['', '![error against training triplets](curve.png)', '',
          'How each run stopped, per seed: epochs trained / best epoch / reason (plateau: no better validation '
          f'accuracy for {rep["patience"]} epochs; cap: still improving at --epochs {rep["epochs_cap"]}; seen: '
          'the equal-compute budget of --seen):', '',
          '| model | budget | seeds | epochs trained | best epoch | stopped |',
          '|---|---:|---|---|---|---|']
    for m, title, _, _ in MODELS:
        for b in budgets:
            d = rep['models'].get(m, {}).get(str(b))
            if d:
                L.append(f'| {title} | {b:,} | {", ".join(map(str, d["seeds"]))} | '
                         f'{", ".join(map(str, d["epochs_trained"]))} | {", ".join(map(str, d["best_epoch"]))} | '
                         f'{", ".join(d["stopped"])} |')
    L += ['', '## The claims', '',
          f'Rule: models are compared paired by seed (a seed gives every model the same triplets): the mean difference '
          f'with its {CONFIDENCE:.0%} confidence interval over the seeds (t distribution) and a paired t-test. A claim '
          f'"holds" or "does not hold" only when the interval excludes zero; otherwise, or from a single seed, it is '
          f'"inconclusive". For one comparison of two equal models the rule gives a false verdict '
          f'{false_verdict_rate(2):.0%} of the time ({false_verdict_rate(2) / 2:.1%} each way), whatever the number of '
          f'seeds; more seeds narrow the interval, so that real differences are found. A claim that rests on a run '
          f'stopped by the cap is "inconclusive: not converged". Nothing was tuned per model.', '']
    for k in 'abcde':
        why = rep['claims_reason'].get(k)
        L.append(f'- **({k}) {CLAIMS[k]}: {rep["claims"][k]}{": " + why if why else ""}.** {rep["claims_detail"][k]}.')
    for pname, p in (rep.get('probes') or {}).items():
        L.append(f'- (e) on {p["description"]}: '
                 + '; '.join(f'{TITLE.get(m, "randomly initialised backbone")} {pct(v)} %'
                             for m, v in p['points'].items()) + '.')
    if rep.get('probe_task'):
        L += ['', f'Probe of claim (e)\'s verdict: {rep["probe_task"]}.']
    if rep.get('probe_missing'):
        L += ['', f'Runs without a probe (their record has none and their checkpoint was not there to compute it), '
                  f'left out of claim (e): {", ".join(rep["probe_missing"])}.']
    if rep.get('masks_figure'):
        L += ['', '![masks](masks.png)']
    sub = subspace_markdown(rep.get('subspaces'), notions)
    L += ['', *sub] if sub else []
    L += ['', *successors_markdown(rep.get('successors'), budgets)]
    L += [*checks_markdown(rep.get('checks'), 'three' if s.get('three_forwards') else 'one')]
    L += ['', f'Command: `{rep["command"]}`', '',
          f'Settings (the same for every model): {s["dim_embed"]}-d embedding, batch {s["batch_size"]} (main.py\'s '
          f'default, the original\'s, is 256), lr {lr_tag(s["lr"])} ({rep["lr_choice"]}), margin {s["margin"]}, image '
          f'size {s["image_size"]}, backbone {"random init" if s["no_pretrained"] else "ImageNet ResNet-18"}, '
          f'horizontal flips {s["hflip"]}, {forwards}; the '
          f'task-specific networks train in one optimizer, each on its notion\'s share of every batch (about a quarter '
          f'with four notions)' + (f'; main.py flags: `{shlex.join(rep["passed_to_main"])}`' if rep['passed_to_main']
                                   else '') + '.', '',
          *dataset_lines(rep),
          f'Runs finished: {rep["runs_finished"]} of {rep["runs_planned"]}; training and testing took '
          f'{rep["wall_s"] / 3600:.2f} h in all (as run, summed over runs){machines_text(rep.get("machines"))}.', '']
    return '\n'.join(L)


def dataset_lines(rep):
    """What the report says of its records' data: one dataset's fingerprint, and the records made before records
    named theirs."""
    if not rep.get('dataset_sha256'):
        return []
    old = rep.get('runs_without_dataset') or []
    return [f'Dataset: every record that names its data names the same (SHA-256 of dataset.json, filenames.json, the '
            f'labels and the triplet lists: {rep["dataset_sha256"][:16]}...)'
            + (f'; {len(old)} of the {rep["runs_finished"]} runs were recorded before records named their data' if old
               else '') + '.', '']


def order_cell(excess):
    """The order check's excess in points, the largest in size over the seeds (accuracy + accuracy with far and close
    swapped - 100 %: 0 for a model that cannot see which slot holds the close image); blank before the check."""
    known = [e for e in excess or [] if e is not None]
    if not known:
        return ''
    worst = max(known, key=abs)
    return f'{worst * 100:+.2f}' + ('' if len(known) == len(excess) else f' ({len(known)} of {len(excess)} seeds)')


def machines_text(machines):
    """', on CPU A (n runs), ...' from the records' machines; records made before they kept one are counted apart."""
    if not machines:
        return ''
    parts = [f'{m} ({n} run{"s" if n != 1 else ""})' for m, n in machines.items()]
    return '; the runs\' machines: ' + ', '.join(parts)


def machine_tag(machine):
    """One line for a record's machine: CPU, cores, bf16 units, torch."""
    if not machine:
        return 'not recorded'
    gpu = f', GPU {machine["gpu"]}' if machine.get('gpu') else ''
    return (f'{machine["cpu"]}, {machine["cores"]} cores, {"with" if machine["bf16"] else "without"} bf16 units'
            f'{gpu}, torch {machine["torch"]}')


def sweep_markdown(rep):
    sw = rep.get('sweep')
    if not sw or not sw['table']:
        return []
    models = sw['models']
    L = [f'Learning-rate sweep: best validation accuracy (%) at {sw["budget"]:,} training triplets, seed {sw["seed"]} '
         f'(epochs trained, stop reason):', '', '| lr | ' + ' | '.join(TITLE[m] for m in models) + ' | mean |',
         '|---|' + '---:|' * (len(models) + 1)]
    for lr, per in sorted(sw['table'].items(), key=lambda kv: float(kv[0])):
        cells = [f'{per[m]["best_val_acc"] * 100:.2f} ({per[m]["epochs_trained"]}, {per[m]["stopped"]})' if m in per
                 else '' for m in models]
        mean = f'{np.mean([per[m]["best_val_acc"] for m in models]) * 100:.2f}' if all(m in per for m in models) else ''
        L.append(f'| {lr_tag(float(lr))} | ' + ' | '.join(cells) + f' | {mean} |')
    return L + ['', f'The study uses lr {lr_tag(sw["chosen"]) if sw["chosen"] else "(none yet)"}: {sw["why"]}.', '']


def checks_markdown(checks, study_forwards):
    """The report's section on --checks-at."""
    if not checks:
        return []
    fmt = lambda p: ('from a single seed' if p is None else f'{p["difference"] * 100:+.2f} points, 95 % CI '
                     f'[{p["ci95"][0] * 100:+.2f}, {p["ci95"][1] * 100:+.2f}], paired t-test p = {p["p"]:.3g}')
    L = [f'## Checks of the protocol at {checks["budget"]:,} training triplets', '']
    t = checks['task_alone']
    if t:
        L += ['Task-specific networks: in the study the networks train in one optimizer, each on its notion\'s share '
              'of every batch; here each is trained alone on its notion\'s triplets of the joint run (the same '
              'triplets, a quarter of the budget with four notions) with the full batch, so with a quarter of the '
              'steps per epoch: its cap and its patience are four times as many epochs (the same number of optimizer '
              'steps), and the four are tested together:', '',
              '| seed | joint (the study) | each alone | alone: epochs trained per notion |', '|---|---:|---:|---|']
        for s, a, j, e in zip(t['seeds'], t['values'], t['joint'], t['epochs_trained']):
            L.append(f'| {s} | {j * 100:.2f} | {a * 100:.2f} | {", ".join(map(str, e))} |')
        L += ['', f'Alone minus joint: {fmt(t["pair"])}: **{t["verdict"] if t["pair"] else "inconclusive"}** '
              f'(it would hold, training alone better, with the interval above zero; not hold with it below).', '']
    if checks['forwards']:
        L += [f'Forward arithmetic: the study makes {study_forwards} backbone call(s) per step; the same runs with '
              f'{checks["other_forwards"]} (test accuracy, %):', '',
              f'| model | seeds | {study_forwards} (the study) | {checks["other_forwards"]} | '
              f'{checks["other_forwards"]} minus {study_forwards} |',
              '|---|---|---|---|---|']
        for m, f in checks['forwards'].items():
            L.append(f'| {TITLE[m]} | {", ".join(map(str, f["seeds"]))} | '
                     f'{", ".join(f"{v * 100:.2f}" for v in f["study"])} | '
                     f'{", ".join(f"{v * 100:.2f}" for v in f["other"])} | {fmt(f["pair"])} |')
        L.append('')
    return L
