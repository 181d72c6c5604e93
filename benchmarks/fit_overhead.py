"""Overhead of `deepfake_course.train.fit` against a plain PyTorch loop (same 4-layer CNN, data, optimiser).

Two comparisons, each repeated and interleaved (plain, fit, plain, fit, ... with alternating order) so that
load on a shared machine hits both alike. Wall time and process CPU time per epoch are both measured (on a
loaded shared machine CPU time is the steadier measure of the work each loop does; wall time also counts
waiting for disk); medians, their ratio, the median of the paired (adjacent-run) ratios and the ratio of the
minima (the least disturbed runs) are printed:

* train:      fit(train_dl) without validation or checkpoints  vs  the plain training loop;
* train+val:  fit(train_dl, val_dl) (best weights kept in memory)  vs  the plain training loop plus a plain
              validation pass;
* train+val+ckpt: the same, but fit also writes last.pt/best.pt every epoch (ckpt_dir=...), which the plain
              loop does not: this row adds the price of checkpointing to fit's side.

usage: python benchmarks/fit_overhead.py [--n 384] [--size 64] [--batch 32] [--epochs 2] [--repeats 7] [--threads 1]
Target: ratio <= 1.10.
"""
import argparse, os, platform, statistics, tempfile, time

os.environ.setdefault('DFC_QUIET', '1')
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from deepfake_course.train import fit, make_toy_images, tiny_cnn


def plain_epochs(model, dl, val_dl, epochs, lr):
    "The loop a student writes by hand: AdamW, BCE on logits, loss.item() per step; optional validation pass."
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train(); total, n = 0.0, 0
        for x, y in dl:
            out = model(x)
            loss = F.binary_cross_entropy_with_logits(out.view(-1), y.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(y); n += len(y)
        if val_dl is not None:
            model.eval(); vt, vn = 0.0, 0
            with torch.no_grad():
                for x, y in val_dl:
                    out = model(x)
                    vt += F.binary_cross_entropy_with_logits(out.view(-1), y.float()).item() * len(y); vn += len(y)
    return total / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--n', type=int, default=384, help='training images')
    ap.add_argument('--n-val', type=int, default=128, help='validation images')
    ap.add_argument('--size', type=int, default=64, help='image side (pixels)')
    ap.add_argument('--width', type=int, default=16, help='channels of the first conv layer')
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--epochs', type=int, default=2, help='epochs per timed run')
    ap.add_argument('--repeats', type=int, default=7)
    ap.add_argument('--threads', type=int, default=1, help='torch intra-op threads (0: torch default)')
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    x, y = make_toy_images(a.n, a.size, seed=0)
    xv, yv = make_toy_images(a.n_val, a.size, seed=1)
    dl = DataLoader(TensorDataset(x, y), batch_size=a.batch, shuffle=True)
    val_dl = DataLoader(TensorDataset(xv, yv), batch_size=2 * a.batch)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}, "
          f"{a.n} train / {a.n_val} val images of {a.size} px, batch {a.batch}, tiny_cnn(width={a.width}), "
          f"{a.epochs} epochs x {a.repeats} repeats")

    def model():
        torch.manual_seed(0)
        return tiny_cnn(1, width=a.width)

    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            'train': (lambda: plain_epochs(model(), dl, None, a.epochs, 1e-3),
                      lambda: fit(model(), dl, epochs=a.epochs, lr=1e-3, device='cpu', progress=False)),
            'train+val': (lambda: plain_epochs(model(), dl, val_dl, a.epochs, 1e-3),
                          lambda: fit(model(), dl, val_dl, epochs=a.epochs, lr=1e-3, device='cpu', progress=False)),
            'train+val+ckpt': (lambda: plain_epochs(model(), dl, val_dl, a.epochs, 1e-3),
                          lambda: fit(model(), dl, val_dl, epochs=a.epochs, lr=1e-3, device='cpu', progress=False,
                                      ckpt_dir=os.path.join(tmp, f'ck{time.perf_counter_ns()}'), resume=False)),
        }
        for name, (plain, fitted) in runs.items():
            plain(); fitted()  # warm-up (allocator, kernels, imports)
            t = {('p', 'wall'): [], ('f', 'wall'): [], ('p', 'cpu'): [], ('f', 'cpu'): []}
            for r in range(a.repeats):
                order = [('p', plain), ('f', fitted)] if r % 2 == 0 else [('f', fitted), ('p', plain)]
                for tag, f in order:
                    w0, c0 = time.perf_counter(), time.process_time(); f()
                    t[tag, 'wall'].append((time.perf_counter() - w0) / a.epochs)
                    t[tag, 'cpu'].append((time.process_time() - c0) / a.epochs)
            for clock in ('wall', 'cpu'):
                p, f = t['p', clock], t['f', clock]
                paired = statistics.median(b / a_ for a_, b in zip(p, f))
                print(f"{name:15s} {clock:4s}  plain {statistics.median(p):.3f} s/epoch  fit {statistics.median(f):.3f} s/epoch  "
                      f"ratio of medians {statistics.median(f) / statistics.median(p):.3f}  median paired ratio {paired:.3f}  "
                      f"ratio of minima {min(f) / min(p):.3f}")
            print(f"{'':15s} wall runs: plain {' '.join(f'{x:.2f}' for x in t['p', 'wall'])} | fit {' '.join(f'{x:.2f}' for x in t['f', 'wall'])}")

if __name__ == '__main__':
    main()
