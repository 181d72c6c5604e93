"""Realism and identity of SynthFaces, judged by models nobody here tuned to them.

1. Realism: facenet-pytorch's MTCNN (weights ship in the wheel) on `--n` faces over the default pose and expression
   ranges, at 128x128 and at 64x64 upsampled to 128. Reports the detection rate and the landmark NME (mean distance
   between MTCNN's 5 points and the renderer's ground truth, over the inter-ocular distance).
   Targets: rate >= 0.98 at 128, >= 0.95 at 64, NME <= 0.10.
2. Identity: a small CNN (4 stride-2 conv layers, width 32) trained from scratch on `--ids` identities x `--per-id` images (80% of each
   identity's images), tested on the held-out 20% (other poses, expressions, lights, backgrounds).
   Target: accuracy >= 0.95.

    python benchmarks/synth_realism.py                  # 500 faces per size, 20 identities x 50 images
    python benchmarks/synth_realism.py --n 200 --skip-identity
Exit status 1 if a target is missed. `--save DIR` writes PNG grids of the faces MTCNN missed."""
import argparse, json, sys, time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def realism(n, seed, save=None):
    from deepfake_course.data.synth import render_faces
    from deepfake_course.quality import mtcnn_agreement
    out = {}
    for size in (128, 64):
        t = time.time()
        r = render_faces(max(1, n // 10), 10, size=size, seed=seed)
        m = mtcnn_agreement(r['images'], r['landmarks5'])
        out[size] = dict(rate=m['rate'], nme=m['nme'], n=len(r['images']), seconds=round(time.time() - t, 1))
        print(f"MTCNN at {size}x{size}{' (upsampled to 128)' if size < 128 else ''}: detection {m['rate']:.3f}, "
              f"NME {m['nme']:.3f} over {len(r['images'])} faces")
        if save and (~m['found']).any():
            from deepfake_course.core import save_images
            save_images(r['images'][~m['found']][:32], f"{save}/missed_{size}.png", ncols=8)
    return out


class SmallCNN(nn.Module):
    def __init__(self, n_classes, w=24):
        super().__init__()
        ch = [3, w, 2 * w, 4 * w, 4 * w]
        self.f = nn.Sequential(*[nn.Sequential(nn.Conv2d(ch[i], ch[i + 1], 3, 2, 1), nn.BatchNorm2d(ch[i + 1]), nn.ReLU())
                                 for i in range(4)])
        self.head = nn.Linear(ch[-1], n_classes)

    def forward(self, x): return self.head(self.f(x).mean((2, 3)))


def identity_accuracy(n_ids, per_id, size, epochs, seed):
    from deepfake_course.data.synth import render_faces
    r = render_faces(n_ids, per_id, size=size, seed=seed)
    x, y = r['images'], r['identity']
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for i in range(n_ids):                                   # hold out 20% of each identity's images
        idx = torch.nonzero(y == i).flatten(); test[idx[torch.randperm(len(idx), generator=g)[:max(1, len(idx) // 5)]]] = True
    torch.manual_seed(seed)
    net = SmallCNN(n_ids, 32); opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-4)
    xtr, ytr = x[~test], y[~test]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * ((len(ytr) + 63) // 64))
    for ep in range(epochs):
        net.train()
        for b in torch.randperm(len(ytr), generator=g).split(64):
            xb = xtr[b]
            if torch.rand(1, generator=g) < 0.5: xb = xb.flip(3)      # mirror: identity does not depend on the side
            dx, dy = (int(v) for v in torch.randint(-3, 4, (2,), generator=g)); xb = xb.roll((dy, dx), (2, 3))   # small shifts
            loss = F.cross_entropy(net(xb), ytr[b]); opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    net.eval()
    with torch.no_grad(): acc = (net(x[test]).argmax(1) == y[test]).float().mean().item()
    print(f"identity: small CNN on {n_ids} identities x {per_id} images ({size}px, {epochs} epochs): "
          f"held-out accuracy {acc:.3f} ({int(test.sum())} test images)")
    return dict(accuracy=acc, n_test=int(test.sum()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--n', type=int, default=500, help='faces per size for MTCNN')
    ap.add_argument('--ids', type=int, default=20); ap.add_argument('--per-id', type=int, default=50)
    ap.add_argument('--id-size', type=int, default=64); ap.add_argument('--epochs', type=int, default=40)
    ap.add_argument('--seed', type=int, default=1234)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--skip-identity', action='store_true')
    ap.add_argument('--save', default=None)
    ap.add_argument('--json', default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = dict(mtcnn=realism(a.n, a.seed, a.save))
    ok = res['mtcnn'][128]['rate'] >= 0.98 and res['mtcnn'][64]['rate'] >= 0.95 and res['mtcnn'][128]['nme'] <= 0.10
    if not a.skip_identity:
        res['identity'] = identity_accuracy(a.ids, a.per_id, a.id_size, a.epochs, a.seed)
        ok &= res['identity']['accuracy'] >= 0.95
    print('all targets met' if ok else 'a target was MISSED')
    if a.json:
        with open(a.json, 'w') as f: json.dump(res, f, indent=2, default=float)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
