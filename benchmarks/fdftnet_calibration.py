"""FDFtNet's score collapse, before and after the fix (precise BatchNorm statistics for the heads).

The main job's recipe (`bench.QUICK`: 64 px, `train_detector`'s defaults: AdamW, cosine schedule, lr 1e-3, batch 32,
`--epochs` epochs, the epoch with the best validation AUROC kept) on the blend-swap set of 16 identities × 18 faces
(`detect.core.blendswap_set` + `detection_data`, SynthFaces' identity split): ShallowNetV3 is trained first (as the main
job does) and saved; FDFtNet (paper-sized heads, attention at every FTT round) is fine-tuned on top of it, frozen, once
per variant:

* before: `precise_bn=0` (BatchNorm's running averages as PyTorch keeps them, momentum 0.1, variance starting at 1);
* after:  `precise_bn=512` (the default of `build_detector('fdftnet')`): the heads' BatchNorm statistics re-estimated
          for the final weights on the last 512 training faces whenever the model is switched to eval mode.

Printed per variant: mean ± std of the real and of the fake test scores, the share in [0.1, 0.9], ACC at 0.5,
balanced accuracy at the best threshold, AUROC, the epoch kept, and `bn_var_ratio`: over the heads' BatchNorm layers, the median of (running variance the
model holds) / (variance of that layer's input in the eval network on training faces); first layer of the FTT and of
the MBblockV3 stack separately. 1 is right; above 1 eval mode divides the features by too large a σ.
With --out DIR: scores.csv and summary.json there.

usage: python benchmarks/fdftnet_calibration.py [--variants before after] [--epochs 4] [--threads 2] [--out DIR]
   the smoke settings of 60_benchmark: --n-identities 9 --images-per-identity 16 --epochs 1
"""
import argparse, copy, json, os, time
from pathlib import Path

os.environ.setdefault('DFC_QUIET', '1')
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from sklearn.metrics import roc_auc_score, roc_curve

from deepfake_course.detect.core import (blendswap_set, detection_data, train_detector, score_faces, build_detector,
                                         save_detector)
from deepfake_course.detect.fdftnet import recalibrate_bn_layers

VARIANTS = {'before': dict(precise_bn=0), 'after': dict(precise_bn=512)}


def spread(y, s) -> dict:
    "Score spread and decision figures of one set of test scores."
    y, s = np.asarray(y), np.asarray(s, float)
    fpr, tpr, _ = roc_curve(y, s)
    return dict(real_mean=s[y == 0].mean(), real_std=s[y == 0].std(), fake_mean=s[y == 1].mean(), fake_std=s[y == 1].std(),
                in_band=((s >= 0.1) & (s <= 0.9)).mean(), acc_05=((s >= 0.5) == y).mean(),
                best_bal_acc=((tpr + 1 - fpr) / 2).max(), auroc=roc_auc_score(y, s))


def bn_var_ratio(model, x) -> dict:
    "Running variance held / the eval network's variance on x, per head BatchNorm (median over channels)."
    ref = copy.deepcopy(model).cpu(); recalibrate_bn_layers(ref, x, skip=ref.backbone)
    held = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and not n.startswith('backbone')}
    true = dict(ref.named_modules())
    r = {n: float((m.running_var.cpu() / true[n].running_var).median()) for n, m in held.items()}
    return dict(bn_var_ratio=float(np.median(list(r.values()))), bn_var_ratio_ftt0=r['ftt.rounds.0.1'],
                bn_var_ratio_mb0=r['mb.blocks.0.expand.1'])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--variants', nargs='+', default=['before', 'after'], choices=list(VARIANTS))
    ap.add_argument('--n-identities', type=int, default=16); ap.add_argument('--images-per-identity', type=int, default=18)
    ap.add_argument('--size', type=int, default=64); ap.add_argument('--epochs', type=int, default=4)
    ap.add_argument('--batch', type=int, default=32); ap.add_argument('--lr', type=float, default=1e-3)
    ap.add_argument('--seed', type=int, default=0); ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--data-root', default=None); ap.add_argument('--out', default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    fs = blendswap_set(a.data_root, a.n_identities, a.images_per_identity, a.size, a.seed, verbose=False)
    data = detection_data(a.data_root, fs, size=a.size, n_identities=a.n_identities, images_per_identity=a.images_per_identity, seed=a.seed)
    steps = -(-len(data.train) // a.batch) * a.epochs
    print(f'{data}; {a.epochs} epochs ({steps} steps), batch {a.batch}, lr {a.lr}, {a.threads} thread(s)', flush=True)
    kw = dict(epochs=a.epochs, lr=a.lr, batch_size=a.batch, device='cpu', seed=a.seed, progress=False,
              metrics=lambda s, y: {'auroc': roc_auc_score(y, s)}, monitor='val_auroc', mode='max')
    out = Path(a.out) if a.out else Path(os.environ.get('TMPDIR', '/tmp')) / 'fdftnet_calibration'
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    bb = train_detector(build_detector('shallownet_v3', input_size=a.size), data, **kw)
    bp = save_detector(bb.model, out / f'shallownet_v3_{a.n_identities}x{a.images_per_identity}_{a.epochs}ep.pt')
    sc = score_faces(bb.model, data.test, device='cpu')
    rows = [dict(variant='backbone (ShallowNetV3)', seconds=time.time() - t, best_epoch=bb.best_epoch, **spread(sc.label, sc.score))]
    scores = [sc.assign(variant='backbone')]
    xr = data.train.x[torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:256]].float() / 255
    for v in a.variants:
        net = build_detector('fdftnet', backbone='shallownet_v3', backbone_ckpt=str(bp), input_size=a.size, **VARIANTS[v])
        t = time.time()
        res = train_detector(net, data, **kw)
        sec = time.time() - t
        assert not res.model.backbone.training  # the frozen backbone stays in eval mode (not a cause)
        sc = score_faces(res.model, data.test, device='cpu').assign(variant=v)
        r = dict(variant=v, **VARIANTS[v], seconds=sec, best_epoch=res.best_epoch, **spread(sc.label, sc.score),
                 **bn_var_ratio(res.model, xr))
        rows.append(r); scores.append(sc)
        print(' '.join(f'{k}={val:.3f}' if isinstance(val, float) else f'{k}={val}' for k, val in r.items()), flush=True)
    tab = pd.DataFrame(rows).set_index('variant')
    with pd.option_context('display.width', 250, 'display.max_columns', 40): print(tab.round(3).to_string())
    pd.concat(scores).to_csv(out / 'scores.csv', index=False)
    (out / 'summary.json').write_text(json.dumps(dict(args=vars(a), fake_set=data.fake_set, rows=rows), indent=1, default=float))
    print('wrote', out)


if __name__ == '__main__':
    main()
