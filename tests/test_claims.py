"""csnlib/claims.py: the paired interval and test against the arithmetic written out, the verdict rule's false-verdict
rate, each claim's rule on made-up summaries, and the mask statistics against hand-made masks."""
import numpy as np
import pytest


def point_of(accs, seeds=None):
    from csnlib.claims import mean_std
    seeds = seeds or list(range(1, len(accs) + 1))
    return dict(zip(('mean', 'std'), mean_std(accs)), n=len(accs), seeds=seeds, values=list(accs))


def summary_of(**models):
    """{model: {budget: accuracies over seeds}} -> what csnlib.claims.summarise gives."""
    from csnlib.claims import mean_std
    out = {}
    for m, per in models.items():
        for b, accs in per.items():
            mu, sd = mean_std(accs)
            out.setdefault(m, {})[b] = {'seeds': list(range(1, len(accs) + 1)), 'accuracy': list(accs),
                                        'accuracy_mean': mu, 'accuracy_std': sd,
                                        'parameters': 4_000_000 if m == 'task' else 1_000_000}
    return out


def test_the_paired_interval_and_test_against_the_arithmetic_written_out():
    import math

    from csnlib.claims import paired
    t975 = {1: 12.7062, 2: 4.3027, 4: 2.7764}                           # the t table's 97.5 % points
    rng = np.random.default_rng(0)
    for n in (2, 3, 5):
        a, b = rng.uniform(0.6, 0.8, n), rng.uniform(0.6, 0.8, n)
        seeds = list(range(10, 10 + n))
        shuffled = rng.permutation(n)                                   # pairing follows the seeds, not the order
        got = paired(point_of(a, seeds), point_of(b[shuffled], [seeds[i] for i in shuffled]))
        d = [a[i] - b[i] for i in range(n)]
        mean = sum(d) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
        if n - 1 in t975:
            half = t975[n - 1] * sd / math.sqrt(n)
            assert got['ci95'] == pytest.approx([mean - half, mean + half], abs=1e-5)
        assert got['difference'] == pytest.approx(mean) and got['n'] == n
        # the two-sided p of the paired t-test: the t density integrated beyond |t| (trapezoids)
        t, k = abs(mean) / (sd / math.sqrt(n)), n - 1
        c = math.gamma((k + 1) / 2) / (math.sqrt(k * math.pi) * math.gamma(k / 2))
        xs = t + np.linspace(0, 200, 200_001) ** 2                      # dense near t, out to t + 40000
        ys = c * (1 + xs * xs / k) ** (-(k + 1) / 2)
        tail = float(((ys[1:] + ys[:-1]) / 2 * np.diff(xs)).sum())
        assert got['p'] == pytest.approx(2 * tail, abs=2e-4)
    assert paired(point_of([0.7]), point_of([0.6])) is None             # one seed: no interval
    assert paired(point_of([0.7, 0.8], [1, 2]), point_of([0.6, 0.5], [3, 4])) is None  # no seed in common


def test_the_rule_gives_a_false_verdict_five_percent_of_the_time():
    """Two equal models (seed differences normal around 0): the interval excludes zero in about 5 % of studies, half
    each way, whatever the number of seeds; the one-standard-deviation rule it replaced, about one time in five."""
    from csnlib.claims import false_verdict_rate, paired, verdict
    rng = np.random.default_rng(1)
    for n in (3, 5):
        words = [verdict(paired(point_of(a), point_of(b)))
                 for a, b in zip(rng.normal(0.7, 0.01, (4000, n)), rng.normal(0.7, 0.01, (4000, n)))]
        rate = sum(w != 'inconclusive' for w in words) / len(words)
        assert abs(rate - 0.05) < 0.012 and abs(words.count('holds') - words.count('does not hold')) < 80, rate
        assert false_verdict_rate(n) == pytest.approx(0.05)
    old = [abs(a.mean() - b.mean()) > max(a.std(ddof=1), b.std(ddof=1))
           for a, b in zip(rng.normal(0, 1, (4000, 3)), rng.normal(0, 1, (4000, 3)))]
    assert 0.1 < np.mean(old) < 0.3


def test_claims_follow_the_paired_interval_rule():
    from csnlib.claims import claim_a, claim_b, claim_c, claim_e, compare
    p = point_of
    assert compare(p([0.80, 0.82, 0.81]), p([0.70, 0.71, 0.69]))[0] == 'holds'
    assert compare(p([0.70, 0.71, 0.69]), p([0.80, 0.82, 0.81]))[0] == 'does not hold'
    assert compare(p([0.80, 0.70, 0.75]), p([0.74, 0.73, 0.75]))[0] == 'inconclusive'      # the interval spans zero
    assert compare(p([0.90]), p([0.50]))[0] == 'inconclusive'                              # one seed: no interval
    assert compare(p([0.71, 0.72, 0.73]), p([0.70, 0.71, 0.72]))[0] == 'holds'             # small but paired
    worst = summary_of(triplet={9: [0.60, 0.61, 0.62]}, task={9: [0.80, 0.81, 0.79]},
                       csn_fixed={9: [0.82, 0.80, 0.81]}, csn_learned={9: [0.81, 0.80, 0.83]})
    assert claim_a(worst, 9)[0] == 'holds'
    assert claim_b(worst, 9)[0] == 'inconclusive'                   # a tie is not evidence either way
    assert '4.00x' in claim_b(worst, 9)[1] and len(claim_b(worst, 9)[2]) == 2
    not_worst = summary_of(triplet={9: [0.90, 0.91, 0.92]}, task={9: [0.80, 0.81, 0.79]},
                           csn_fixed={9: [0.82, 0.80, 0.81]})
    assert claim_a(not_worst, 9)[0] == 'does not hold'
    below = summary_of(task={9: [0.90, 0.91, 0.92]}, csn_fixed={9: [0.80, 0.81, 0.79]},
                       csn_learned={9: [0.8, 0.8, 0.81]})
    assert claim_b(below, 9)[0] == 'does not hold'
    ci = claim_b(below, 9)[2][0]
    assert ci['models'] == ['csn_fixed', 'task'] and ci['difference'] == pytest.approx(-11.0)
    assert ci['ci95'][0] < -11.0 < ci['ci95'][1] < 0
    mixed = summary_of(task={9: [0.80, 0.81, 0.79]}, csn_fixed={9: [0.90, 0.91, 0.92]},
                       csn_learned={9: [0.7, 0.71, 0.72]})
    assert claim_b(mixed, 9)[0] == 'inconclusive'                       # the two CSNs disagree
    catch_up = summary_of(csn_fixed={1: [0.70, 0.71, 0.72], 2: [0.80, 0.81, 0.79]},
                          csn_learned={1: [0.60, 0.61, 0.62], 2: [0.80, 0.82, 0.81]})
    assert claim_c(catch_up, [1, 2])[0] == 'holds'                      # behind, the gap closes, not behind at the end
    never = summary_of(csn_fixed={1: [0.70, 0.71, 0.72], 2: [0.80, 0.81, 0.79]},
                       csn_learned={1: [0.60, 0.61, 0.62], 2: [0.70, 0.71, 0.69]})
    assert claim_c(never, [1, 2])[0] == 'does not hold'
    ahead_early = summary_of(csn_fixed={1: [0.60, 0.61, 0.62], 2: [0.80, 0.81, 0.79]},
                             csn_learned={1: [0.70, 0.71, 0.72], 2: [0.80, 0.82, 0.81]})
    assert claim_c(ahead_early, [1, 2])[0] == 'does not hold'
    assert claim_c(catch_up, [1])[0] == 'inconclusive'
    probe = {'triplet': p([0.3, 0.31, 0.29]), 'csn_fixed': p([0.5, 0.52, 0.51]), 'csn_learned': p([0.45, 0.5, 0.48]),
             'random': p([0.1, 0.1, 0.1])}
    assert claim_e(probe)[0] == 'holds' and 'untrained) 10.00 ± 0.00 %, below every trained' in claim_e(probe)[1]
    probe['random'] = p([0.6, 0.6, 0.6])                                 # as on Fonts at a small budget
    assert 'above every trained backbone' in claim_e(probe)[1]
    probe['random'] = p([0.4, 0.4, 0.4])
    assert 'between the trained backbones' in claim_e(probe)[1]
    assert 'untrained' not in claim_e({k: v for k, v in probe.items() if k != 'random'})[1]
    assert claim_e(None)[0] == 'inconclusive'


def test_mask_stats_tell_disjoint_from_shared_masks_and_judge_them_against_their_start():
    from csnlib.claims import claim_d, mask_stats
    disjoint = np.kron(np.eye(4), np.ones(16))                          # the fixed masks: (4, 64)
    s = mask_stats(disjoint)
    assert s['sparse'] == pytest.approx(0.75) and s['overlap'] == 0 and s['active'] == [16] * 4
    shared = np.tile(np.r_[np.ones(8), np.zeros(56)], (4, 1))           # every notion on the same 8 dimensions
    s = mask_stats(shared)
    assert s['sparse'] == pytest.approx(56 / 64) and s['overlap'] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    starts = [np.maximum(rng.normal(0.9, 0.7, (4, 64)), 0) for _ in range(3)]  # the --learned start
    assert all(0.1 < mask_stats(m)['sparse'] < 0.3 and mask_stats(m)['overlap'] > 0.5 for m in starts)
    subset = disjoint * 0.9
    subset[:, 60:] = 1.0                                                # each notion's own block and 4 shared dims
    rows = lambda masks: {('csn_learned', 9, k + 1): {'masks': m.tolist(), 'masks_start': st.tolist()}
                          for k, (m, st) in enumerate(zip(masks, starts))}
    word, text, masks, cis, extra = claim_d(rows([subset + 0.001 * k for k in range(3)]), 9)
    assert word == 'holds' and 0.05 < masks['overlap'][0] < 0.5
    assert {c['what'] for c in cis} == {'sparse', 'overlap below chance'}
    assert 'at their start' in text and 'random active sets of the same sizes' in text
    assert len(extra['masks_change']) == 3
    assert claim_d(rows([disjoint] * 3), 9)[0] == 'does not hold'        # sparse, but nothing shared
    assert claim_d(rows([shared] * 3), 9)[0] == 'does not hold'          # shared, more than chance
    # sparse masks whose active dimensions are drawn at random: they share what chance gives, which is no structure
    chance_like = []
    for k in range(5):
        m = np.zeros((4, 64))
        for c in range(4):
            m[c, np.random.default_rng(100 + 10 * k + c).choice(64, 20, replace=False)] = 1.0
        chance_like.append(m)
    starts5 = [np.maximum(rng.normal(0.9, 0.7, (4, 64)), 0) for _ in range(5)]
    rows5 = {('csn_learned', 9, k + 1): {'masks': m.tolist(), 'masks_start': st.tolist()}
             for k, (m, st) in enumerate(zip(chance_like, starts5))}
    word, text, masks, cis, extra = claim_d(rows5, 9)
    overlap = [s['overlap'] for s in masks['per_seed']]
    assert word == 'inconclusive' and 'random masks of the same sizes' in extra['reason']
    assert 0.05 < np.mean(overlap) < np.mean([s['overlap'] for s in extra['masks_start']['per_seed']])  # below start
    word, _, _, _, extra = claim_d(rows([st + 1e-4 for st in starts]), 9)
    assert word == 'inconclusive' and extra['reason'] == 'the masks did not train'


def test_chance_overlap_against_the_exact_value_and_seeds_to_decide_against_the_t_interval():
    from scipy import stats

    from csnlib.claims import chance_overlap, paired, seeds_to_decide
    # two 2-sets of 4 dimensions: Jaccard 0 (1 in 6), 1/3 (4 in 6) or 1 (1 in 6): expected 7/18
    assert chance_overlap([2, 2], 4, draws=20000) == pytest.approx(7 / 18, abs=0.01)
    assert chance_overlap([4, 4, 4], 4, draws=10) == 1.0 and chance_overlap([1, 1], 64, draws=2000) < 0.05
    a = {'seeds': [1, 2, 3], 'values': [0.50, 0.53, 0.49]}
    b = {'seeds': [1, 2, 3], 'values': [0.49, 0.50, 0.50]}
    pair = paired(a, b)
    n = seeds_to_decide(pair)
    d = np.array([0.01, 0.03, -0.01])
    half = lambda k: stats.t.ppf(0.975, k - 1) * d.std(ddof=1) / np.sqrt(k)
    assert half(n) < abs(d.mean()) <= half(n - 1)  # the first n whose interval would exclude zero
    assert seeds_to_decide({**pair, 'difference': 0.0}) == 0


def test_a_single_seed_gives_a_mean_without_a_spread_and_the_report_names_each_run_s_machine():
    from csnlib.claims import claim_a, machine_tag, machines_text, pct
    assert pct(point_of([0.8, 0.9])) == '85.00 ± 7.07' and pct(point_of([0.8])) == '80.00' and pct(None) == 'not run'
    one = summary_of(triplet={9: [0.60]}, task={9: [0.80]}, csn_fixed={9: [0.79]}, csn_learned={9: [0.78]})
    word, text, _ = claim_a(one, 9)
    assert word == 'inconclusive' and '±' not in text and 'from a single seed' in text
    cpu = {'cpu': 'Some CPU', 'cores': 2, 'bf16': True, 'gpu': None, 'torch': '2.14.1'}
    assert machine_tag(cpu) == 'Some CPU, 2 cores, with bf16 units, torch 2.14.1'
    assert machine_tag({**cpu, 'bf16': False, 'gpu': 'Some GPU'}) == ('Some CPU, 2 cores, without bf16 units, GPU '
                                                                      'Some GPU, torch 2.14.1')
    assert machine_tag(None) == 'not recorded'
    assert machines_text({'A': 3, 'not recorded': 1}) == "; the runs' machines: A (3 runs), not recorded (1 run)"
    assert machines_text({}) == ''


def test_the_mask_figure_shows_sce_nets_masks_through_relu_and_each_run_beside_its_start(tmp_path):
    from csnlib.claims import figure_masks, write_mask_figure
    raw = np.array([[-0.5, 0.2], [1.0, -2.0]])                        # an SCE-Net record from before the ReLU fix
    assert figure_masks('scenet', raw).tolist() == [[0, 0.2], [1.0, 0]]
    assert figure_masks('csn_learned', raw).tolist() == raw.tolist()    # CSN's records hold relu(M) already
    rows = {('csn_fixed', 9, s): {'masks': np.kron(np.eye(2), np.ones(2)).tolist()} for s in (1, 2)}
    rows |= {(m, 9, s): {'masks': raw.tolist(), 'masks_start': raw.tolist()} for m in ('csn_learned', 'scenet')
             for s in (1, 2)}
    rows[('triplet', 9, 1)] = {'masks': None}
    assert write_mask_figure(rows, 9, ['a', 'b'], tmp_path / 'm.png') and (tmp_path / 'm.png').stat().st_size > 500
    assert not write_mask_figure(rows, 10, ['a', 'b'], tmp_path / 'none.png')   # no run at that budget


def test_the_successors_stand_against_each_of_the_paper_s_models_paired_by_seed_without_a_verdict():
    from csnlib.claims import paired, successors_against_csn, successors_markdown
    summary = summary_of(asen=({600: [0.70, 0.72, 0.71], 6000: [0.80, 0.83]}),
                         csn_fixed=({600: [0.68, 0.69, 0.70], 6000: [0.82, 0.81]}),
                         task=({600: [0.75, 0.74, 0.76]}))
    entries = successors_against_csn(summary, [600, 6000])
    got = {(tuple(e['models']), e['budget']): e for e in entries}
    assert set(got) == {(('asen', 'csn_fixed'), 600), (('asen', 'csn_fixed'), 6000), (('asen', 'task'), 600)}
    e = got[(('asen', 'csn_fixed'), 600)]                               # (0.02 + 0.03 + 0.01) / 3, in points
    assert e['difference'] == pytest.approx(2.0) and e['n'] == 3
    pair = paired(point_of([0.70, 0.72, 0.71]), point_of([0.68, 0.69, 0.70]))
    assert e['ci95'] == pytest.approx([100 * x for x in pair['ci95']])
    text = '\n'.join(successors_markdown(entries, [600, 6000]))
    assert '| ASEN (attention conditioned on the notion) minus CSN, fixed disjoint masks | +2.00 [' in text
    assert '| ASEN (attention conditioned on the notion) minus task-specific triplet networks | -4.00 [' in text
    assert text.rstrip().endswith('|  |') and 'holds' not in text                # no 6,000 task run; no verdict
    assert successors_markdown([], [600]) == []
    assert successors_against_csn(summary_of(csn_fixed={600: [0.7]}), [600]) == []   # no successor ran


def test_claim_e_over_family_halvings_pairs_seeds_on_their_split_means_and_gives_the_range_over_splits():
    from csnlib.claims import claim_e, split_range
    from reproduce import probe_point
    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.8, (3, 50))  # (seeds, splits): what a split does to every model alike
    triplet = probe_point({s + 1: base[s].tolist() for s in range(3)})
    fixed = probe_point({s + 1: (base[s] + 0.02 + 0.001 * s).tolist() for s in range(3)})
    learned = probe_point({s + 1: (base[s] + rng.normal(0, 0.01, 50)).tolist() for s in range(3)})
    assert triplet['values'] == pytest.approx(base.mean(1)) and len(triplet['splits']) == 3
    word, text, cis = claim_e({'triplet': triplet, 'csn_fixed': fixed, 'csn_learned': learned})
    assert 'over 50 random family halvings' in text
    assert cis[0]['models'] == ['csn_fixed', 'triplet'] and cis[0]['difference'] == pytest.approx(2.1)
    assert split_range(fixed, triplet) == '; by split, from +2.10 to +2.10 points'
    lo, hi = (float(x) for x in split_range(learned, triplet).split('from ')[1].replace(' points', '').split(' to '))
    assert lo < 0 < hi  # the splits disagree where only noise separates two models
    assert split_range({'seeds': [1], 'values': [0.5]}, triplet) == ''
    plain = probe_point({1: 0.7, 2: 0.72})
    assert 'splits' not in plain and plain['mean'] == pytest.approx(0.71)


def test_the_subspace_section_shows_each_models_matrix_and_the_untrained_reference():
    from csnlib.claims import subspace_markdown
    sub = {'csn_fixed': {'seeds': [1, 2], 'matrix': {'font': {'font': 0.9, 'slant': 0.55},
                                                     'slant': {'font': 0.2, 'slant': 0.95}}},
           'triplet': {'seeds': [1], 'matrix': {'all': {'font': 0.5, 'slant': None}}},
           'random': {'seeds': [1, 2], 'matrix': {'font': {'font': 0.1, 'slant': 0.5}}}}
    L = subspace_markdown(sub, ['font', 'slant'])
    text = '\n'.join(L)
    assert '| font | 90.0 | 55.0 |' in text and '| slant | 20.0 | 95.0 |' in text and '| all | 50.0 |  |' in text
    assert (text.index('standard triplet network (seeds') < text.index('CSN, fixed disjoint masks (seeds')
            < text.index('randomly initialised backbone, fixed masks (seeds'))
    assert subspace_markdown(None, ['font']) == []
