"""ShallowNetV3's score collapse, before and after the fix (DC-free filter init + precise BN statistics).

Trains ShallowNetV3 (paper widths, 64 px) on the blend-swap set that 30_shallownet builds (`detect.core.blendswap_set`,
`detection_data`) with the main job's recipe (`train_detector` defaults: AdamW 1e-3, cosine, batch 32, the epoch with
the best validation AUROC kept), once per variant, and scores the test split (`score_faces`):

* before:       `dc_free=False, precise_bn=0` (He init; BatchNorm's running averages as PyTorch keeps them);
* dc_free:      zero-mean 5×5 / 3×3 filters at init only;
* precise_bn:   BatchNorm statistics re-estimated with dropout off only;
* after:        both (the defaults of `build_detector('shallownet_v3')`).

Printed per variant: mean ± std of the real and of the fake scores, the fraction of scores in [0.1, 0.9], the share of
each class on its own side of 0.5, ACC at 0.5, balanced accuracy at the best threshold, AUROC, and the head's
BatchNorm input variance with dropout off over the variance with dropout on (training mode) on training faces, and
the share of test faces whose Grad-CAM / gradient × activation map of the evidence for their true class is blank.
With --out DIR: scores.csv, summary.json and score_histograms.png there.

usage: python benchmarks/shallownet_calibration.py [--variants before after] [--epochs 4] [--threads 2] [--out DIR]
"""
import argparse, json, os, time
from pathlib import Path

os.environ.setdefault('DFC_QUIET', '1')
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from sklearn.metrics import roc_auc_score, roc_curve

from deepfake_course.detect.core import blendswap_set, detection_data, train_detector, score_faces, build_detector, Augment
from deepfake_course.detect.shallownet import keras_l2

VARIANTS = {'before': dict(dc_free=False, precise_bn=0), 'dc_free': dict(dc_free=True, precise_bn=0),
            'precise_bn': dict(dc_free=False, precise_bn=512), 'after': dict(dc_free=True, precise_bn=512)}


def spread(y, s) -> dict:
    "Score spread and decision figures of one set of test scores."
    y, s = np.asarray(y), np.asarray(s, float)
    fpr, tpr, _ = roc_curve(y, s)
    return dict(real_mean=s[y == 0].mean(), real_std=s[y == 0].std(), fake_mean=s[y == 1].mean(), fake_std=s[y == 1].std(),
                in_band=((s >= 0.1) & (s <= 0.9)).mean(), real_below=(s[y == 0] < 0.5).mean(), fake_above=(s[y == 1] >= 0.5).mean(),
                acc_05=((s >= 0.5) == y).mean(), best_bal_acc=((tpr + 1 - fpr) / 2).max(), auroc=roc_auc_score(y, s))


def bn_variance_ratio(model, x) -> float:
    "Median over units of var(head BN input, dropout off) / var(head BN input, dropout on)."
    bn = [m for m in model.head if isinstance(m, nn.BatchNorm1d)][0]; got = {}
    h = bn.register_forward_hook(lambda m, i, o: got.__setitem__('x', i[0].detach()))
    was = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(): model(x); clean = got['x']
        for m in model.modules():
            if isinstance(m, nn.Dropout): m.train()
        with torch.no_grad(): model(x); noisy = got['x']
    finally:
        h.remove()
        for m, t in was.items(): nn.Module.train(m, t)  # plain mode switch: no re-estimation here
    alive = noisy.var(0) > 1e-10
    return float((clean.var(0)[alive] / noisy.var(0)[alive]).median())


def blank_maps(model, fts) -> dict:
    "Share of all-zero saliency maps (evidence for each face's true class) at the last conv layer, per method and class."
    from deepfake_course.metrics import grad_cam, grad_x_act
    layer = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)][-1]
    x, lab = fts.x.float() / 255, torch.tensor(fts.df['label'].to_numpy(copy=True))
    out = {}
    for fn in (grad_cam, grad_x_act):
        blank = (fn(model, x, layer, target=lab).flatten(1).amax(1) == 0).numpy()
        out.update({f'blank_{fn.__name__}_real': blank[lab.numpy() == 0].mean(), f'blank_{fn.__name__}_fake': blank[lab.numpy() == 1].mean()})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--variants', nargs='+', default=['before', 'after'], choices=list(VARIANTS))
    ap.add_argument('--n-identities', type=int, default=24); ap.add_argument('--images-per-identity', type=int, default=16)
    ap.add_argument('--size', type=int, default=64); ap.add_argument('--epochs', type=int, default=4)
    ap.add_argument('--batch', type=int, default=32); ap.add_argument('--lr', type=float, default=1e-3)
    ap.add_argument('--recipe', choices=['main', 'nb30'], default='main',
                    help="main: train_detector's defaults as the main job uses them; nb30: Adam, Keras L2, flips and shifts")
    ap.add_argument('--seed', type=int, default=0); ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--data-root', default=None); ap.add_argument('--out', default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    fs = blendswap_set(a.data_root, a.n_identities, a.images_per_identity, a.size, a.seed, verbose=False)
    data = detection_data(a.data_root, fs, size=a.size, n_identities=a.n_identities, images_per_identity=a.images_per_identity, seed=a.seed)
    print(f'{data}; recipe {a.recipe}, {a.epochs} epochs, batch {a.batch}, lr {a.lr}, {a.threads} thread(s)', flush=True)
    xr = data.train.x[torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:256]].float() / 255
    rows, scores = [], []
    for v in a.variants:
        net = build_detector('shallownet_v3', input_size=a.size, **VARIANTS[v])
        t = time.time()
        if a.recipe == 'main':
            res = train_detector(net, data, epochs=a.epochs, lr=a.lr, batch_size=a.batch, device='cpu', seed=a.seed, progress=False,
                                 metrics=lambda s, y: {'auroc': roc_auc_score(y, s)}, monitor='val_auroc', mode='max')
        else:
            res = train_detector(net, data, epochs=a.epochs, lr=a.lr, batch_size=a.batch, device='cpu', seed=a.seed, progress=False,
                                 opt='adam', loss=keras_l2(net), augment=Augment(flip=True, shift=2))
        sec = time.time() - t
        sc = score_faces(res.model, data.test, device='cpu').assign(variant=v)
        r = dict(variant=v, **VARIANTS[v], seconds=sec, best_epoch=res.best_epoch, **spread(sc.label, sc.score),
                 bn_var_ratio=bn_variance_ratio(res.model, xr), **blank_maps(res.model.cpu().eval(), data.test))
        rows.append(r); scores.append(sc)
        print(' '.join(f'{k}={val:.3f}' if isinstance(val, float) else f'{k}={val}' for k, val in r.items()), flush=True)
    tab = pd.DataFrame(rows).set_index('variant')
    with pd.option_context('display.width', 200): print(tab.round(3).to_string())
    if a.out:
        out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
        pd.concat(scores).to_csv(out / 'scores.csv', index=False)
        (out / 'summary.json').write_text(json.dumps(dict(args=vars(a), fake_set=data.fake_set, rows=rows), indent=1, default=float))
        import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
        from deepfake_course.metrics import plot_scores
        sets = {v: (g.label.to_numpy(), g.score.to_numpy()) for v, g in pd.concat(scores).groupby('variant', sort=False)}
        axs = np.ravel(plot_scores(sets, threshold=0.5, bins=np.linspace(0, 1, 41)))
        for ax, v in zip(axs, sets):
            r = tab.loc[v]
            ax.set_xlim(0, 1); ax.set_title(f"{v}: ACC@0.5 {r.acc_05:.2f}, best bal. ACC {r.best_bal_acc:.2f}, AUROC {r.auroc:.2f}", fontsize=8)
        plt.gcf().suptitle(f'ShallowNetV3 test scores on {data.fake_set} ({a.epochs} epochs)', fontsize=9); plt.gcf().tight_layout()
        plt.gcf().savefig(out / 'score_histograms.png', dpi=100); print('wrote', out)


if __name__ == '__main__':
    main()
