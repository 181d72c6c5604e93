"""Training-step speed of every registered image detector with contiguous (NCHW) against channels-last (NHWC) tensors.

For each detector in `DETECTORS` that takes a face batch N×3×S×S (its registered size, or `--size` when it takes any),
times Adam steps on random faces and labels with `detector_loss()`: two warm-up steps, then the median of `--steps`
timed steps, once with the model and batch as PyTorch makes them and once converted to `torch.channels_last`, and
checks that both give the same logits (up to float rounding) on one batch. Prints one row per detector: seconds a
step each way and the ratio. A detector that cannot take a face batch (the audio and clip models, or one that must be
fitted first) is listed with its error: those are not failures of either layout.

usage: python benchmarks/memory_format.py [--size 64] [--batch 32] [--steps 3] [--only NAME ...]
"""
import argparse, os, statistics, time
os.environ.setdefault('DFC_QUIET', '1')
import torch

from deepfake_course.detect.core import DETECTORS, build_detector, detector_loss, _load_detector_modules

def step_time(net, x, y, steps, cl):
    if cl: net = net.to(memory_format=torch.channels_last); x = x.contiguous(memory_format=torch.channels_last)
    opt, lf, ts = torch.optim.Adam(net.parameters(), 1e-4), detector_loss(), []
    net.train()
    for i in range(2 + steps):
        t = time.perf_counter(); opt.zero_grad(); lf(net(x), y).backward(); opt.step()
        if i >= 2: ts.append(time.perf_counter() - t)
    return statistics.median(ts)

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--size', type=int, default=64); ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--steps', type=int, default=3); ap.add_argument('--only', nargs='*')
    a = ap.parse_args()
    _load_detector_modules()
    print(f"{'detector':22s} {'px':>4s} {'NCHW s':>8s} {'NHWC s':>8s} {'speed-up':>8s}  same logits")
    for name in sorted(DETECTORS):
        if a.only and name not in a.only: continue
        sz = DETECTORS[name]['input_size'] or a.size
        def fresh():   # the same initial weights for each of the three uses
            torch.manual_seed(0)
            return build_detector(name) if DETECTORS[name]['input_size'] else build_detector(name, input_size=sz)
        try:
            net = fresh()
            x, y = torch.rand(a.batch, 3, sz, sz), (torch.rand(a.batch) > .5).float()
            net.eval()
            with torch.no_grad():
                ref = net(x); got = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
            same = torch.allclose(ref.float(), got.float(), rtol=1e-3, atol=1e-4)
            t0 = step_time(fresh(), x, y, a.steps, False)
            t1 = step_time(fresh(), x, y, a.steps, True)
            print(f"{name:22s} {sz:4d} {t0:8.3f} {t1:8.3f} {t0 / t1:7.2f}x  {same}", flush=True)
        except Exception as e:
            print(f"{name:22s} {sz:4d} cannot take a face batch: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
