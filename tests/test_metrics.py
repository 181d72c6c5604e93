"""Unit tests of deepfake_course.metrics: equality with scikit-learn and the DASH Lab EER formula, hand-made cases,
input errors, video aggregation by unique ids, bootstrap intervals, plots and Grad-CAM."""
import math, re

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn import metrics as skm

from deepfake_course.metrics import (apply_temperature, binary_metrics, bootstrap_ci, check_binary, eer_score,
                                     fit_temperature, fmt_ci, grad_cam, grad_x_act, metrics_table, pick_threshold, plot_det, plot_roc,
                                     plot_scores, show_cam, threshold_metrics, tpr_at_fpr, video_metrics, aggregate_videos)

KEYS = {'acc', 'balanced_acc', 'auroc', 'eer', 'eer_threshold', 'ap', 'tpr_at_fpr_1e-2', 'tpr_at_fpr_1e-3', 'logloss'}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close('all')


def dashlab_eer(y, s):
    fpr, tpr, _ = skm.roc_curve(y, s)
    return brentq(lambda x: 1. - x - interp1d(fpr, tpr)(x), 0., 1.)


def sample(seed, n=400, ties=False, share=0.5, d=1.5):
    r = np.random.default_rng(seed)
    y = (r.random(n) < share).astype(int)
    y[0], y[1] = 0, 1
    s = 1 / (1 + np.exp(-(r.normal(0, 1, n) + d * (y - 0.5))))
    return y, (np.round(s, 2) if ties else s)


# ---------------------------------------------------------------- binary_metrics against scikit-learn

@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('ties', [False, True])
def test_equal_to_sklearn(seed, ties):
    y, s = sample(seed, n=300 + 50 * seed, ties=ties, share=0.2 + 0.1 * seed)
    t = 0.3 + 0.05 * seed
    m = binary_metrics(y, s, threshold=t)
    assert KEYS <= set(m)
    assert abs(m['auroc'] - skm.roc_auc_score(y, s)) < 1e-9
    assert abs(m['ap'] - skm.average_precision_score(y, s)) < 1e-9
    assert abs(m['acc'] - skm.accuracy_score(y, s >= t)) < 1e-9
    assert abs(m['balanced_acc'] - skm.balanced_accuracy_score(y, s >= t)) < 1e-9
    assert abs(m['logloss'] - skm.log_loss(y, np.clip(s, 1e-7, 1 - 1e-7))) < 1e-9
    assert abs(m['logloss'] - skm.log_loss(y, s)) < 1e-9  # no clipping needed for these scores
    assert abs(m['eer'] - dashlab_eer(y, s)) < 1e-9
    assert m['n_real'] == (y == 0).sum() and m['n_fake'] == (y == 1).sum() and m['threshold'] == t


def test_default_threshold_and_input_types():
    y, s = sample(1)
    ref = binary_metrics(y, s)
    assert ref['threshold'] == 0.5 and abs(ref['acc'] - skm.accuracy_score(y, s >= 0.5)) < 1e-12
    bf = binary_metrics(torch.tensor(y), torch.tensor(s).bfloat16())  # half-precision scores are accepted
    assert abs(bf['auroc'] - ref['auroc']) < 0.02
    for yy, ss in [(torch.tensor(y), torch.tensor(s)), (pd.Series(y), pd.Series(s)), (list(y), list(s)),
                   (y.astype(bool), s), (y.astype(float), s[:, None])]:
        assert binary_metrics(yy, ss) == ref


def test_recalls_use_label_masks_not_order():
    y = np.array([1, 0, 1, 0, 0, 1]); s = np.array([.9, .1, .2, .7, .3, .8])
    perm = np.random.default_rng(0).permutation(6)
    a, b = threshold_metrics(y, s), threshold_metrics(y[perm], s[perm])
    assert a == b
    assert a['recall_fake'] == pytest.approx(2 / 3) and a['recall_real'] == pytest.approx(2 / 3)
    assert a['balanced_acc'] == pytest.approx((a['recall_fake'] + a['recall_real']) / 2)


def test_logloss_only_for_probabilities_and_clipped():
    assert math.isnan(binary_metrics([0, 1, 1], [-3., 0.5, 4.])['logloss'])
    m = binary_metrics([0, 1, 0, 1], [0., 1., 1., 0.5])  # a confident wrong answer: finite thanks to clipping
    assert math.isfinite(m['logloss'])
    assert abs(m['logloss'] - skm.log_loss([0, 1, 0, 1], np.clip([0., 1., 1., .5], 1e-7, 1 - 1e-7))) < 1e-9


# ---------------------------------------------------------------- EER

@pytest.mark.parametrize('seed', range(10))
def test_eer_equals_dashlab_formula(seed):
    n = [8, 20, 57, 400, 3000][seed % 5]
    y, s = sample(seed, n=n, ties=seed % 2 == 1)
    assert abs(eer_score(y, s)[0] - dashlab_eer(y, s)) < 1e-9


def test_eer_hand_made():
    assert eer_score([0, 0, 1, 1], [.1, .2, .8, .9]) == (0.0, 0.8)  # perfect ranking; threshold = lowest fake
    assert eer_score([0, 0, 1, 1], [.9, .8, .2, .1])[0] == 1.0
    assert eer_score([0, 1, 0, 1], [.5] * 4) == (0.5, 0.5)  # no information; finite threshold
    assert eer_score([0, 0, 1, 1], [.1, .4, .35, .8]) == (0.5, 0.4)
    e, t = eer_score([0, 0, 0, 1, 1, 1], [.1, .2, .6, .5, .7, .8])
    assert e == pytest.approx(1 / 3) and t == pytest.approx(0.6)
    # interpolation: (0,0)-(0,.5)-(.5,.5)-(.5,1)... gives 0.5; with 4 per class a horizontal crossing at 0.375
    y = [0, 0, 0, 0, 1, 1, 1, 1]; s = [.1, .2, .55, .65, .3, .6, .7, .8]
    assert eer_score(y, s)[0] == pytest.approx(dashlab_eer(y, s), abs=1e-12)


def test_eer_threshold_balances_errors():
    y, s = sample(3, n=20000)
    e, t = eer_score(y, s)
    fpr, fnr = (s[y == 0] >= t).mean(), (s[y == 1] < t).mean()
    assert abs(fpr - e) < 2e-3 and abs(fnr - e) < 2e-3


def test_eer_is_consistent_estimator():
    from scipy.stats import norm
    r = np.random.default_rng(0); n = 50000
    y = np.r_[np.zeros(n, int), np.ones(n, int)]; s = np.r_[r.normal(-1, 1, n), r.normal(1, 1, n)]
    m = binary_metrics(y, s, threshold=0.0)
    assert m['eer'] == pytest.approx(norm.cdf(-1), abs=0.005)
    assert m['auroc'] == pytest.approx(norm.cdf(2 / math.sqrt(2)), abs=0.003)
    assert m['tpr_at_fpr_1e-2'] == pytest.approx(norm.sf(norm.ppf(0.99) - 2), abs=0.02)
    assert m['eer_threshold'] == pytest.approx(0.0, abs=0.03)


# ---------------------------------------------------------------- TPR at a fixed FPR

def test_tpr_at_fpr_hand_made():
    fpr, tpr = np.array([0, 0, .5, .5, 1]), np.array([0, .5, .5, 1, 1])
    assert tpr_at_fpr(fpr, tpr, 0.0) == 0.5  # top of the vertical step at FPR 0
    assert tpr_at_fpr(fpr, tpr, 0.25) == 0.5
    assert tpr_at_fpr(fpr, tpr, 0.5) == 1.0
    assert tpr_at_fpr(fpr, tpr, 1.0) == 1.0
    assert tpr_at_fpr(np.array([0, .2, 1.]), np.array([0, .6, 1.]), 0.1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r'\[0, 1\]'): tpr_at_fpr(fpr, tpr, -0.1)


def test_tpr_at_fpr_on_vertices_is_best_reachable_tpr():
    y, s = sample(5, n=1000)
    fpr, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False)
    for target in np.unique(fpr)[:30]:
        best = max(((s[y == 1] >= t).mean() for t in thr[1:] if (s[y == 0] >= t).mean() <= target), default=0.0)
        assert tpr_at_fpr(*skm.roc_curve(y, s)[:2], target) == pytest.approx(best, abs=1e-12)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize('y,s,msg', [
    ([0, 1, 1], [.1, .2], 'lengths differ'),
    ([], [], 'empty'),
    ([0, 1], [.1, float('nan')], 'NaN'),
    ([0, 1], [.1, float('inf')], 'infinite'),
    ([0, 1], [.1, -float('inf')], 'infinite'),
    ([0, 2], [.1, .2], 'labels must be 0 \\(real\\) or 1 \\(fake\\); found 2'),
    ([0, -1, 1], [.1, .2, .3], 'found -1'),
    ([0, 0.5, 1], [.1, .2, .3], 'found 0.5'),
    (['real', 'fake'], [.1, .2], 'labels must be 0'),
    ([1, 1, 1], [.1, .2, .3], 'only one class'),
    ([0, 0], [.1, .2], 'only one class'),
    ([0, 1], [[.1, .9], [.8, .2]], 'softmax'),
    ([0, 1], ['a', 'b'], 'numeric'),
])
def test_bad_input_is_named(y, s, msg):
    for fn in (binary_metrics, eer_score, lambda a, b: bootstrap_ci(a, b, n_boot=5), pick_threshold):
        with pytest.raises(ValueError, match=msg): fn(y, s)


def test_bad_threshold():
    with pytest.raises(ValueError, match='threshold'): binary_metrics([0, 1], [.1, .9], threshold=float('nan'))


# ---------------------------------------------------------------- thresholds

def test_pick_threshold_rules():
    y, s = [0, 0, 1, 1], [.1, .2, .8, .9]
    assert pick_threshold(y, s, 'acc') == 0.8 and pick_threshold(y, s, 'youden') == 0.8
    y, s = sample(2, n=2000)
    assert pick_threshold(y, s, 'eer') == eer_score(y, s)[1]
    for target in (0.0, 0.01, 0.1):
        t = pick_threshold(y, s, 'fpr', fpr=target)
        assert (s[y == 0] >= t).mean() <= target
    t = pick_threshold(y, s, 'acc')
    grid = np.r_[np.unique(s), np.inf]
    best = ((s[None, :] >= grid[:, None]) == y[None, :]).mean(1).max()  # accuracy of every possible threshold
    assert threshold_metrics(y, s, t)['acc'] == pytest.approx(best, abs=1e-12)
    with pytest.raises(ValueError, match='unknown rule'): pick_threshold(y, s, 'f1')
    assert threshold_metrics([0, 1], [.2, .3], pick_threshold([0, 1], [.9, .1], 'fpr', fpr=0.0))['recall_fake'] == 0.0


# ---------------------------------------------------------------- video level

def frames_df():
    return pd.DataFrame({'clip_id': ['a'] * 4 + ['b'] * 3 + ['c'] * 2,
                         'source': ['real'] * 4 + ['df'] * 3 + ['df'] * 2,
                         'frame': [0, 1, 2, 3, 0, 1, 2, 0, 1],
                         'label': [0] * 4 + [1] * 3 + [1] * 2,
                         'score': [.1, .2, .9, .3, .6, .7, .2, .4, .5]})


@pytest.mark.parametrize('agg,k,expect', [
    ('mean', 3, {'a': .375, 'b': 0.5, 'c': .45}), ('max', 3, {'a': .9, 'b': .7, 'c': .5}),
    ('median', 3, {'a': .25, 'b': .6, 'c': .45}), ('topk', 2, {'a': .6, 'b': .65, 'c': .45}),
    ('topk', 10, {'a': .375, 'b': 0.5, 'c': .45}), (lambda v: v.min(), 3, {'a': .1, 'b': .2, 'c': .4})])
def test_video_aggregation(agg, k, expect):
    m, v = video_metrics(frames_df(), agg=agg, k=k)
    got = v.set_index('clip_id')['score'].to_dict()
    assert got == pytest.approx(expect)
    assert v.set_index('clip_id')['n_frames'].to_dict() == {'a': 4, 'b': 3, 'c': 2}
    assert list(v.columns) == ['clip_id', 'label', 'score', 'n_frames']
    ref = binary_metrics(v['label'], v['score'])
    assert m['auroc'] == ref['auroc'] and m['n_videos'] == 3 and m['n_frames'] == 9


def test_video_ids_must_be_unique():
    df = frames_df()
    with pytest.raises(ValueError, match="both real and fake"):
        video_metrics(df.assign(clip_id=['a'] * 9))
    ff = pd.concat([df, df[df.label == 1].assign(source='f2f')], ignore_index=True)  # FF++-style reused names
    with pytest.raises(ValueError, match="more than one source.*by=\\['source', 'clip_id'\\]"):
        video_metrics(ff)
    m, v = video_metrics(ff, by=['source', 'clip_id'])
    assert len(v) == 5 and list(v.columns[:2]) == ['source', 'clip_id']
    with pytest.raises(ValueError, match='same frame more than once'):
        video_metrics(ff.drop(columns='source'))
    _, v2 = video_metrics(ff.drop(columns='source'), check_frames=False)
    assert len(v2) == 3  # what a name-only grouping silently does: 2 fake videos merged into each name
    with pytest.raises(ValueError, match="empty 'clip_id'"):
        video_metrics(df.assign(clip_id=[''] + ['b'] * 8))
    with pytest.raises(ValueError, match="missing column"):
        video_metrics(df.drop(columns='score'))
    with pytest.raises(ValueError, match="missing column.*'prob'"):
        video_metrics(df, score_col='prob')
    with pytest.raises(ValueError, match='unknown agg'): video_metrics(df, agg='mode')
    with pytest.raises(ValueError, match='k must be a positive integer'): video_metrics(df, agg='topk', k=0)
    with pytest.raises(ValueError, match='empty input'): video_metrics(df.iloc[:0])
    with pytest.raises(ValueError, match='NaN'): video_metrics(df.assign(score=[np.nan] + [.5] * 8))
    with pytest.raises(ValueError, match='only one class'): video_metrics(df[df.label == 1])


def test_video_other_columns():
    df = frames_df().rename(columns={'score': 'p', 'label': 'y', 'clip_id': 'vid'})
    m, v = video_metrics(df, by='vid', score_col='p', label_col='y', agg='max')
    assert v.set_index('vid')['score']['a'] == .9
    assert len(aggregate_videos(frames_df())) == 3


# ---------------------------------------------------------------- bootstrap

@pytest.mark.parametrize('seed', range(4))
def test_fast_resample_metrics_equal_sklearn(seed):
    from deepfake_course.metrics import _metric_fn
    y, s = sample(seed, n=200 + 300 * seed, ties=seed % 2 == 0, share=0.15 + 0.2 * seed)
    for name in ('auroc', 'ap', 'eer', 'acc', 'balanced_acc', 'logloss', 'tpr_at_fpr_1e-2', 'tpr_at_fpr_1e-3'):
        assert abs(_metric_fn(name, 0.45, fast=True)(y, s) - _metric_fn(name, 0.45)(y, s)) < 1e-9, name


def test_bootstrap_basics():
    y, s = sample(0, n=600)
    p, lo, hi = bootstrap_ci(y, s, 'auroc', n_boot=300, seed=1)
    assert p == skm.roc_auc_score(y, s) and lo < p < hi
    assert (p, lo, hi) == bootstrap_ci(y, s, 'auroc', n_boot=300, seed=1)
    assert (lo, hi) != bootstrap_ci(y, s, 'auroc', n_boot=300, seed=2)[1:]
    _, lo50, hi50 = bootstrap_ci(y, s, 'auroc', n_boot=300, seed=1, alpha=0.5)
    assert lo < lo50 < hi50 < hi
    for m in ('eer', 'ap', 'acc', 'balanced_acc', 'logloss', 'tpr_at_fpr_1e-2', 'tpr_at_fpr_1e-3'):
        p, lo, hi = bootstrap_ci(y, s, m, n_boot=100, seed=0)
        assert lo <= hi and math.isfinite(p)
        if m in ('eer', 'ap'): assert p == pytest.approx(binary_metrics(y, s)[m], abs=1e-12)
    assert bootstrap_ci(y, s, 'acc', n_boot=20, threshold=0.9)[0] == threshold_metrics(y, s, 0.9)['acc']


def test_bootstrap_interval_shrinks_with_n():
    w = []
    for n in (200, 3200):
        y, s = sample(1, n=n)
        _, lo, hi = bootstrap_ci(y, s, 'auroc', n_boot=300)
        w.append(hi - lo)
    assert w[1] < w[0] / 2.5  # ~ 1/sqrt(n): 4x narrower expected


def test_bootstrap_stratified_keeps_class_counts():
    y, s = sample(0, n=200, share=0.3)
    nf = int(y.sum())
    count = lambda yy, ss: float(yy.sum())
    assert bootstrap_ci(y, s, count, n_boot=200) == (nf, nf, nf)
    _, lo, hi = bootstrap_ci(y, s, count, n_boot=200, stratified=False)
    assert lo < nf < hi


def test_bootstrap_groups_resample_whole_clips():
    r = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 5); y = np.repeat(np.arange(40) % 2, 5)
    s = np.repeat(r.random(40), 5) + np.tile(np.arange(5), 40) * 1e-3  # each clip's frames: one base score + frame index
    # every resample has exactly 200 frames (20 real + 20 fake clips of 5 frames)
    assert bootstrap_ci(y, s, lambda yy, ss: float(len(yy)), n_boot=50, groups=groups) == (200.0, 200.0, 200.0)
    # and every clip comes whole, its frames in order
    pick = []
    def record_pick(yy, ss):
        pick.append(ss.copy()); return 0.0
    bootstrap_ci(y, s, record_pick, n_boot=20, groups=groups, seed=3)
    frame_of = {round(v, 12): i % 5 for i, v in enumerate(s)}
    clip_of = {round(v, 12): i // 5 for i, v in enumerate(s)}
    for ss in pick[1:]:  # the first call is the point estimate
        clips = np.array([clip_of[round(v, 12)] for v in ss]); frames = np.array([frame_of[round(v, 12)] for v in ss])
        assert np.array_equal(frames, np.tile(np.arange(5), len(ss) // 5))  # whole clips, in frame order
        assert len(np.unique(clips)) < 40  # with replacement
    with pytest.raises(ValueError, match='both real and fake'):
        bootstrap_ci(y, s, n_boot=5, groups=np.zeros(200))
    with pytest.raises(ValueError, match='lengths differ'):
        bootstrap_ci(y, s, n_boot=5, groups=groups[:10])


def test_bootstrap_bad_args():
    y, s = sample(0, n=100)
    with pytest.raises(ValueError, match='unknown metric'): bootstrap_ci(y, s, 'f1')
    with pytest.raises(ValueError, match='n_boot'): bootstrap_ci(y, s, n_boot=0)
    with pytest.raises(ValueError, match='alpha'): bootstrap_ci(y, s, alpha=1.5)


def test_bootstrap_coverage():
    "A 90 % interval should cover the true AUROC in roughly 90 % of fresh test sets."
    from scipy.stats import norm
    true = norm.cdf(1.5 / math.sqrt(2)); hits = []
    for i in range(40):
        r = np.random.default_rng(100 + i); n = 150
        y = np.r_[np.zeros(n, int), np.ones(n, int)]; s = np.r_[r.normal(0, 1, n), r.normal(1.5, 1, n)]
        _, lo, hi = bootstrap_ci(y, s, n_boot=200, alpha=0.1, seed=i)
        hits.append(lo <= true <= hi)
    assert 0.75 <= np.mean(hits) <= 1.0


# ---------------------------------------------------------------- tables and plots

def test_metrics_table():
    sets = {'a': sample(0, n=300), 'b': sample(1, n=300, d=3.0)}
    t = metrics_table(sets, n_boot=50)
    assert list(t.index) == ['a', 'b'] and list(t.columns) == ['auroc', 'eer', 'ap', 'acc', 'n_real', 'n_fake']
    assert all(re.fullmatch(r'\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]', v) for v in t['auroc'])
    c = metrics_table(sets, metrics=('auroc', 'eer'), n_boot=50, style='columns')
    assert list(c.columns) == ['auroc', 'auroc_lo', 'auroc_hi', 'eer', 'eer_lo', 'eer_hi', 'n_real', 'n_fake']
    assert c.loc['b', 'auroc'] == skm.roc_auc_score(*sets['b'])
    assert (c['auroc_lo'] <= c['auroc']).all() and (c['auroc'] <= c['auroc_hi']).all()
    df = pd.DataFrame({'label': sets['a'][0], 'score': sets['a'][1]})
    assert metrics_table({'df': df}, n_boot=20).loc['df', 'n_real'] == (sets['a'][0] == 0).sum()
    with pytest.raises(ValueError, match='style'): metrics_table(sets, style='latex')
    with pytest.raises(ValueError, match="score set 'x'"): metrics_table({'x': pd.DataFrame({'label': [0, 1]})})


def people(seed, n_ids=40, per=6, d=1.5, person_sd=1.0, face_sd=0.05, detector='A'):
    "Real and fake faces of n_ids people; a person's faces share a score offset (near-duplicates when face_sd is small)."
    r = np.random.default_rng(seed)
    off = r.normal(0, person_sd, n_ids)
    rows = [{'identity': i, 'label': lab, 'score': 1 / (1 + np.exp(-((lab - .5) * d + off[i] + r.normal(0, face_sd))))}
            for i in range(n_ids) for lab in (0, 1) for _ in range(per)]
    return pd.DataFrame(rows).assign(detector=detector)


def test_metrics_table_by_two_columns_and_thresholds():
    df = pd.concat([people(k * 2 + j, d=1 + k + j, detector=det).assign(method=m)
                    for k, det in enumerate(('A', 'B')) for j, m in enumerate(('swap', 'gan'))], ignore_index=True)
    thr = {'A': 0.4, 'B': 0.6}
    t = metrics_table(df, by=['detector', 'method'], n_boot=100, threshold=thr)
    assert t.index.names == ['detector', 'method'] and list(t.index) == [('A', 'swap'), ('A', 'gan'), ('B', 'swap'), ('B', 'gan')]
    assert list(t.columns) == ['n', 'n_real', 'n_fake', 'n_groups', 'threshold'] + [
        c for m in ('auroc', 'eer', 'ap', 'acc') for c in (m, f'{m}_lo', f'{m}_hi')]
    for (det, m), row in t.iterrows():
        d = df[(df.detector == det) & (df.method == m)]
        bm = binary_metrics(d['label'], d['score'], threshold=thr[det])
        assert row['auroc'] == skm.roc_auc_score(d['label'], d['score'])
        assert row['eer'] == pytest.approx(bm['eer'], abs=1e-12) and row['ap'] == pytest.approx(bm['ap'], abs=1e-12)
        assert row['acc'] == bm['acc'] and row['threshold'] == thr[det]
        assert (row['n'], row['n_real'], row['n_fake'], row['n_groups']) == (480, 240, 240, 40)
        for k in ('auroc', 'eer', 'ap', 'acc'): assert row[f'{k}_lo'] <= row[k] <= row[f'{k}_hi']
    # a threshold per (detector, method) tuple; the tuple wins over the detector
    t2 = metrics_table(df, by=['detector', 'method'], metrics=('acc',), n_boot=20, threshold={('A', 'gan'): 0.9, 'A': 0.1, 'B': 0.5})
    assert t2['threshold'].tolist() == [0.1, 0.9, 0.5, 0.5]
    with pytest.raises(ValueError, match=r"threshold has no entry for \('B', 'swap'\)"):
        metrics_table(df, by=['detector', 'method'], n_boot=20, threshold={'A': 0.5})
    # one by-column: a plain index; the same numbers as the old dict form resampling rows
    one = metrics_table(df[df.method == 'swap'], by='detector', group=None, n_boot=50, seed=3)
    assert one.index.name == 'detector' and list(one.index) == ['A', 'B'] and one.loc['A', 'n_groups'] == 480
    a = df[(df.method == 'swap') & (df.detector == 'A')]
    old = metrics_table({'A': (a['label'], a['score'])}, n_boot=50, seed=3, style='columns')
    for c in ('auroc', 'auroc_lo', 'auroc_hi', 'acc_lo', 'acc_hi'): assert one.loc['A', c] == old.loc['A', c]
    txt = metrics_table(df, by=None, metrics=('auroc',), n_boot=20, style='text')
    assert list(txt.index) == ['all'] and re.fullmatch(r'\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]', txt.loc['all', 'auroc'])
    def fakes_seen(y, s): return float(y.sum())
    assert metrics_table(df, metrics=(fakes_seen,), by='detector', n_boot=20).loc['A', 'fakes_seen_lo'] == 480  # a callable, named


def test_metrics_table_errors_name_the_row_and_column():
    df = people(0)
    with pytest.raises(ValueError, match=r"scores lacks column\(s\) \['method'\]"):
        metrics_table(df, by=['detector', 'method'])
    with pytest.raises(ValueError, match=r"no group column 'clip_id'.*group=None"):
        metrics_table(df, group='clip_id')
    only_fakes = pd.concat([df, df[df.label == 1].assign(detector='B')], ignore_index=True)
    with pytest.raises(ValueError, match=r"metrics_table\[detector='B'\]: y_true has only one class"):
        metrics_table(only_fakes, n_boot=10)
    with pytest.raises(ValueError, match=r"metrics_table: unknown metric 'f1'"):
        metrics_table(df, metrics=('auroc', 'f1'))
    with pytest.raises(ValueError, match='n_boot'): metrics_table(df, n_boot=0)
    with pytest.raises(ValueError, match='threshold must be a finite number'): metrics_table(df, threshold=float('nan'))


def test_group_bootstrap_is_wider_with_near_duplicate_rows():
    "Six near-copies of each face: resampling rows pretends to 6x the data; resampling people does not."
    df = people(1, n_ids=60, per=6, face_sd=0.01)
    g = metrics_table(df, group='identity', n_boot=300)
    r = metrics_table(df, group=None, n_boot=300)
    assert g.loc['A', 'auroc'] == r.loc['A', 'auroc']  # the same point estimate
    for m in ('auroc', 'eer', 'ap'):
        wg, wr = g.loc['A', f'{m}_hi'] - g.loc['A', f'{m}_lo'], r.loc['A', f'{m}_hi'] - r.loc['A', f'{m}_lo']
        assert wg > 1.5 * wr, (m, wg, wr)
    # and the people bootstrap of duplicated rows matches the one of the people themselves (one face each)
    single = people(1, n_ids=60, per=1, face_sd=0.0)
    w1 = metrics_table(single, group=None, n_boot=300).loc['A']
    assert abs((g.loc['A', 'auroc_hi'] - g.loc['A', 'auroc_lo']) - (w1['auroc_hi'] - w1['auroc_lo'])) < 0.5 * (w1['auroc_hi'] - w1['auroc_lo'])


def test_group_bootstrap_with_single_class_and_mixed_groups():
    "Groups of three kinds: real only (scores < .3), fake only (> .7), both (in between); stratified by kind."
    r = np.random.default_rng(0)
    rows = [(f'r{i}', 0, r.uniform(0, .3)) for i in range(8) for _ in range(3)]
    rows += [(f'f{i}', 1, r.uniform(.7, 1)) for i in range(5) for _ in range(3)]
    rows += [(f'm{i}', lab, r.uniform(.3, .7)) for i in range(6) for lab in (0, 1, 1)]
    g, y, s = map(np.array, zip(*rows))
    y, s = y.astype(int), s.astype(float)
    kinds = lambda yy, ss: float(1e6 * (ss < .3).sum() + 1e3 * (ss > .7).sum() + ((ss >= .3) & (ss <= .7)).sum())
    c = kinds(y, s)
    assert c == 24e6 + 15e3 + 18
    assert bootstrap_ci(y, s, kinds, n_boot=200, groups=g) == (c, c, c)  # every resample keeps 8, 5 and 6 groups of each kind
    _, lo, hi = bootstrap_ci(y, s, kinds, n_boot=200, groups=g, stratified=False)
    assert lo < c < hi
    sizes = lambda yy, ss: float(len(yy) % 3)  # whole groups of 3 rows
    assert bootstrap_ci(y, s, sizes, n_boot=100, groups=g, stratified=False)[1:] == (0.0, 0.0)
    df = pd.DataFrame({'identity': g, 'label': y, 'score': s, 'detector': 'A'})
    t = metrics_table(df, n_boot=100)
    assert t.loc['A', 'n_groups'] == 19 and t.loc['A', 'auroc_lo'] <= t.loc['A', 'auroc'] <= t.loc['A', 'auroc_hi']
    # rows without an identity (the manifest's -1, or NaN) are groups of their own
    df2 = df.assign(identity=[-1] * 6 + list(range(len(df) - 6)))
    assert metrics_table(df2, n_boot=20).loc['A', 'n_groups'] == len(df)
    assert metrics_table(df.assign(identity=np.nan), n_boot=20).loc['A', 'n_groups'] == len(df)


def test_group_bootstrap_with_ties():
    df = people(2, n_ids=30, per=4, face_sd=0.3)
    df['score'] = df['score'].round(1)  # heavy ties
    t = metrics_table(df, metrics=('auroc', 'eer', 'ap'), n_boot=200)
    assert t.loc['A', 'auroc'] == skm.roc_auc_score(df['label'], df['score'])
    assert t.loc['A', 'ap'] == skm.average_precision_score(df['label'], df['score'])
    for m in ('auroc', 'eer', 'ap'): assert t.loc['A', f'{m}_lo'] <= t.loc['A', m] <= t.loc['A', f'{m}_hi']
    flat = metrics_table(df.assign(score=0.5), metrics=('auroc', 'eer'), n_boot=50)  # all tied: chance, with no spread
    assert flat.loc['A', ['auroc', 'auroc_lo', 'auroc_hi', 'eer', 'eer_lo', 'eer_hi']].tolist() == [0.5] * 6


def test_fmt_ci():
    t = pd.DataFrame({'auroc': [0.93125, 0.5], 'auroc_lo': [0.9021, 0.41], 'auroc_hi': [0.958, 0.6]}, index=['a', 'b'])
    assert fmt_ci(t).tolist() == ['93.1 [90.2, 95.8]', '50.0 [41.0, 60.0]']
    assert fmt_ci(t, pct=False, digits=3)['a'] == '0.931 [0.902, 0.958]'
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['eer', 'eer_lo', 'eer_hi'\]"): fmt_ci(t, 'eer')
    tab = metrics_table(people(0), n_boot=20)
    assert fmt_ci(tab, 'eer').index.equals(tab.index)


def test_fit_temperature_recovers_overconfidence():
    r = np.random.default_rng(0)
    z = r.normal(0, 2, 20000); y = (r.random(len(z)) < 1 / (1 + np.exp(-z))).astype(int)
    for k in (0.5, 1.0, 3.0):  # the detector reports k * z
        T = fit_temperature(k * z, y, kind='logits')
        assert abs(T / k - 1) < 0.06, (k, T)
    p = 1 / (1 + np.exp(-3 * z))
    T = fit_temperature(p, y)  # probabilities are read as such (auto)
    assert abs(T - 3) < 0.2
    cal = apply_temperature(p, T)
    assert skm.log_loss(y, cal) < skm.log_loss(y, np.clip(p, 1e-7, 1 - 1e-7))
    assert skm.roc_auc_score(y, cal) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    np.testing.assert_allclose(apply_temperature(3 * z, 3.0), 1 / (1 + np.exp(-z)), atol=1e-12)
    # N×C logits with class labels: a 2-logit head gives the binary answer; three classes work too
    assert fit_temperature(np.c_[np.zeros_like(z), 3 * z], y) == pytest.approx(fit_temperature(3 * z, y, kind='logits'), rel=1e-4)
    z3 = r.normal(0, 2, (5000, 3)); y3 = np.array([r.choice(3, p=np.exp(v) / np.exp(v).sum()) for v in z3])
    assert abs(fit_temperature(2 * z3, y3) - 2) < 0.2
    np.testing.assert_allclose(apply_temperature(2 * z3, 2.0).sum(1), 1.0)
    with pytest.raises(ValueError, match='only one class'): fit_temperature(p, np.zeros(len(p)))
    with pytest.raises(ValueError, match='lengths differ'): fit_temperature(p, y[:10])
    with pytest.raises(ValueError, match='class indices 0..2'): fit_temperature(z3, y3 + 1)
    with pytest.raises(ValueError, match="kind='probs' but scores lie in"): fit_temperature(z, y, kind='probs')
    with pytest.raises(ValueError, match='NaN or infinite'): fit_temperature(np.r_[z[:-1], np.nan], y)
    with pytest.raises(ValueError, match='T must be a positive number'): apply_temperature(p, -1.0)
    with pytest.warns(UserWarning, match='edge of bounds'):
        fit_temperature(np.r_[-np.ones(50), np.ones(50)] * 5, np.r_[np.zeros(50), np.ones(50)], kind='logits')


def test_plots():
    sets = {'weak': sample(0, d=0.5), 'strong': sample(1, d=3)}
    ax = plot_roc(sets)
    labels = [l.get_label() for l in ax.get_lines()]
    assert sum('AUROC' in l for l in labels) == 2 and 'chance' in labels
    auc = skm.roc_auc_score(*sets['strong'])
    assert any(f'{auc:.3f}' in l for l in labels)
    ax = plot_det(sets)
    assert ax.get_xlim() == (-3, 3) and len(ax.get_lines()) >= 2
    axs = plot_scores(sets, threshold=0.4)
    assert len(axs) == 2 and all(any(l.get_xdata()[0] == 0.4 for l in a.get_lines()) for a in axs)
    fig, ax = plt.subplots()
    assert plot_scores(sets, ax=ax) is ax and plot_roc(sets['weak'], ax=ax) is ax
    with pytest.raises(ValueError, match='only 1 axes'): plot_scores(sets, ax=[ax])
    with pytest.raises(ValueError, match='lengths differ'): plot_roc({'bad': ([0, 1], [.1])})


# ---------------------------------------------------------------- Grad-CAM

class Spot(nn.Module):
    "A hand-made CNN: 1-channel 'detector' of brightness, avg-pooled into n_out logits."
    def __init__(self, n_out=1, inplace=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_(); self.conv.weight[0] = 1 / 3; self.conv.weight[1] = -1 / 3
        self.act = nn.ReLU(inplace=inplace); self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, n_out)
        with torch.no_grad():
            self.fc.weight.zero_(); self.fc.bias.zero_(); self.fc.weight[0, 0] = 1.0
            if n_out > 1: self.fc.weight[1, 0] = -1.0
    def forward(self, x):
        z = self.pool(self.act(self.conv(x))).flatten(1)
        return self.fc(z)


def spot_images(n=4, size=16):
    x = torch.zeros(n, 3, size, size); where = []
    for i in range(n):
        r, c = 2 + 3 * i % (size - 4), 3 + 5 * i % (size - 4)
        x[i, :, r, c] = 1.0; where.append((r, c))
    return x, where


@pytest.mark.parametrize('n_out', [1, 2])
def test_grad_cam_localises_hand_made_evidence(n_out):
    m = Spot(n_out); x, where = spot_images()
    cams = grad_cam(m, x, m.conv, target=1 if n_out == 1 else 0)
    assert cams.shape == (4, 16, 16) and cams.dtype == torch.float32
    assert float(cams.min()) >= 0 and float(cams.max()) <= 1
    for c, (r, cc) in zip(cams, where):
        assert np.unravel_index(int(c.argmax()), c.shape) == (r, cc)
        assert float(c[r, cc]) == pytest.approx(1.0)
    # no evidence for the other class: an all-zero map
    other = grad_cam(m, x, 'conv', target=0 if n_out == 1 else 1)
    assert float(other.abs().max()) == 0.0


def test_grad_cam_default_target_and_1d_output():
    m = Spot(2); x, _ = spot_images(2)
    assert torch.equal(grad_cam(m, x, m.conv), grad_cam(m, x, m.conv, target=m(x).argmax(1)))
    m1 = Spot(1)
    flat = nn.Sequential(m1, nn.Flatten(0))  # N logits, no class axis
    assert torch.allclose(grad_cam(flat, x, m1.conv), grad_cam(m1, x, m1.conv, target=1))


def test_grad_cam_leaves_model_alone():
    m = Spot(1); x, _ = spot_images()
    bn = nn.Sequential(nn.BatchNorm2d(3), m); bn.train()
    for p in m.parameters(): p.requires_grad_(False)  # a frozen backbone still works
    cams = grad_cam(bn, x, m.act)  # an in-place ReLU as the layer
    assert cams.shape == (4, 16, 16)
    assert bn.training and bn[0].training  # modes restored
    assert all(p.grad is None for p in bn.parameters())
    assert int(bn[0].num_batches_tracked) == 0  # ran in eval mode: BatchNorm statistics untouched


def test_grad_cam_errors():
    m = Spot(2); x, _ = spot_images(2)
    with pytest.raises(ValueError, match='no layer'): grad_cam(m, x, 'nope')
    with pytest.raises(ValueError, match='feature map'): grad_cam(m, x, m.fc)
    with pytest.raises(ValueError, match='out of range'): grad_cam(m, x, m.conv, target=2)
    with pytest.raises(ValueError, match='N×C×H×W'): grad_cam(m, x[0], m.conv)
    with pytest.raises(ValueError, match='3 targets for 2 images'): grad_cam(m, x, m.conv, target=[0, 1, 1])
    with pytest.raises(ValueError, match='target must be 1 \\(fake\\) or 0'): grad_cam(Spot(1), x, 'conv', target=2)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__(); self.conv = nn.Conv2d(3, 3, 1); self.fc = nn.Linear(3, 1)
        def forward(self, x): return self.fc(self.conv(self.conv(x)).mean((2, 3)))
    with pytest.raises(ValueError, match='ran 2 times'): grad_cam(Twice(), x, 'conv')


def test_show_cam():
    m = Spot(1); x, _ = spot_images(3)
    fig = show_cam(x, grad_cam(m, x, m.conv), titles=['a', 'b', 'c'])
    assert len([a for a in fig.axes if a.images]) == 3
    with pytest.raises(ValueError, match='3 images but 2'): show_cam(x, grad_cam(m, x, m.conv)[:2])


# ---------------------------------------------------------------- gradient × activation (saliency with a dense head)

class DensePatch(nn.Module):
    """A hand-made CNN with a flatten + dense head, like ShallowNetV3's: a brightness channel (1×1 conv, ReLU), read by a
    dense layer as 'the patch at `where` is brighter than the rest of the image': +1 on the patch's positions, a
    negative weight on every other position (twice the patch's total). Each position has its own weight, with mixed
    signs, and their mean is negative: Grad-CAM's channel weight (the spatial mean of the gradient) is below zero."""
    def __init__(self, size=16, where=(5, 9), k=2, n_out=1):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False); self.act = nn.ReLU()
        w = torch.full((size, size), -2.0 * k * k / (size * size - k * k))
        w[where[0]:where[0] + k, where[1]:where[1] + k] = 1.0
        self.fc = nn.Linear(size * size, n_out)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 3); self.fc.bias.zero_(); self.fc.weight.zero_()
            self.fc.weight[-1] = w.flatten()  # the fake logit (the only one with 1 output)
            if n_out == 2: self.fc.weight[0] = -w.flatten()
    def forward(self, x): return self.fc(self.act(self.conv(x)).flatten(1))


def patch_images(n=4, size=16, where=(5, 9), k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 0.3
    x[:, :, where[0]:where[0] + k, where[1]:where[1] + k] = 1.0
    return x


@pytest.mark.parametrize('n_out', [1, 2])
def test_grad_x_act_finds_the_patch_where_grad_cam_is_blank(n_out):
    where, k = (5, 9), 2
    m = DensePatch(where=where, k=k, n_out=n_out); x = patch_images(where=where, k=k)
    logits = m(x)
    assert ((logits if n_out == 1 else logits[:, 1] - logits[:, 0]) > 0).all()  # every image is called fake
    # Grad-CAM: mean gradient of the brightness channel < 0, so ReLU(weight × activation) is 0 everywhere: blank
    assert float(grad_cam(m, x, m.conv, target=1).abs().max()) == 0.0
    cams = grad_x_act(m, x, m.conv, target=1)
    assert cams.shape == (4, 16, 16) and cams.dtype == torch.float32
    assert float(cams.min()) >= 0 and float(cams.max()) == pytest.approx(1.0)
    for c in cams:  # the peak is on the planted patch, and the map is 0 away from it (evidence against is cut)
        r, cc = np.unravel_index(int(c.argmax()), c.shape)
        assert where[0] <= r < where[0] + k and where[1] <= cc < where[1] + k
        assert float(c[:where[0] - 1].abs().max()) == 0.0
    signed = grad_x_act(m, x, 'conv', target=1, signed=True)  # the rest of the image counts against "fake"
    assert float(signed.max()) == pytest.approx(1.0) and -1 <= float(signed.min()) < 0
    assert float(signed[:, :where[0] - 1].max()) < 0
    real = grad_x_act(m, x, m.conv, target=0)  # evidence for "real": everywhere but the patch
    assert all(float(c[where[0]:where[0] + k, where[1]:where[1] + k].max()) < 0.5 for c in real)


def test_grad_x_act_is_grad_cam_under_global_pooling():
    "With a global-average-pooled head every position of a channel gets the same gradient: the two maps coincide."
    m = Spot(2); x, _ = spot_images()
    for t in (0, 1): torch.testing.assert_close(grad_x_act(m, x, m.conv, target=t), grad_cam(m, x, m.conv, target=t))


def test_grad_x_act_leaves_model_alone_and_explains_errors():
    m = DensePatch(); x = patch_images(2)
    bn = nn.Sequential(nn.BatchNorm2d(3), m); bn.train()
    assert grad_x_act(bn, x, m.act).shape == (2, 16, 16)
    assert bn.training and int(bn[0].num_batches_tracked) == 0 and all(p.grad is None for p in bn.parameters())
    with pytest.raises(ValueError, match="grad_x_act: the model has no layer 'nope'"): grad_x_act(m, x, 'nope')
    with pytest.raises(ValueError, match='grad_x_act: layer output must be an N×K×h×w'): grad_x_act(m, x, m.fc)
    with pytest.raises(ValueError, match='grad_x_act: 3 targets for 2 images'): grad_x_act(m, x, m.conv, target=[0, 1, 1])


def test_show_cam_signed_maps():
    m = DensePatch(); x = patch_images(3)
    signed = grad_x_act(m, x, m.conv, signed=True)
    fig = show_cam(x, signed, titles=['a', 'b', 'c'])
    ims = [a.images[0].get_array() for a in fig.axes if a.images]
    assert len(ims) == 3
    # blue (bwr's low end) where the map is -1 ... red where it is +1: the overlay keeps the sign
    r, c = np.unravel_index(int(signed[0].argmin()), signed[0].shape)
    px = np.asarray(ims[0])[r, c]
    assert px[2] > px[0]
    r, c = np.unravel_index(int(signed[0].argmax()), signed[0].shape)
    px = np.asarray(ims[0])[r, c]
    assert px[0] > px[2]


def test_group_bootstrap_warns_when_every_stratum_has_one_group():
    "Two identities, one real-only and one with both kinds: every cluster resample is the sample itself (zero width)."
    import warnings
    from deepfake_course.metrics import bootstrap_ci
    y = np.array([0] * 10 + [0] * 5 + [1] * 5); s = np.r_[np.linspace(0, .4, 10), np.linspace(.2, .6, 5), np.linspace(.5, 1, 5)]
    groups = np.array([1] * 10 + [2] * 10)
    with pytest.warns(UserWarning, match='single group'):
        _, lo, hi = bootstrap_ci(y, s, groups=groups, n_boot=50)
    assert lo == hi
    with warnings.catch_warnings():   # three identities with both kinds: a real interval, no warning
        warnings.simplefilter('error')
        _, lo, hi = bootstrap_ci(np.tile(y[10:], 3), np.tile(s[10:], 3) + np.repeat([0, .1, -.1], 10), groups=np.repeat([1, 2, 3], 10), n_boot=50)
    assert hi > lo
