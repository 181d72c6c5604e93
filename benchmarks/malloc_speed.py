"""Training-step time with and without `core.keep_freed_memory` (glibc malloc keeping freed blocks for reuse).

Each setting runs in its own Python process (the malloc setting is process-wide and chosen at import):
`DFC_MALLOC=system` keeps glibc's default; without it `deepfake_course` applies `keep_freed_memory()`. Each process
trains ShallowNetV1-mini (width 0.25) and ShallowNetV3 (paper widths) with Adam and the Keras L2 penalty on random
64-face batches at 64 and 128 px: two warm-up steps, then `--steps` timed steps; printed per model and size are the
median wall seconds a step, the kernel (system) CPU seconds a step and the minor page faults a step, then the ratio
of the medians.

usage: python benchmarks/malloc_speed.py [--steps 3] [--sizes 64 128] [--threads 2]
"""
import argparse, json, os, subprocess, sys

def child(sizes, steps, threads):
    import resource, statistics, time
    import torch
    from deepfake_course.core import MALLOC_TUNED
    from deepfake_course.detect.core import build_detector
    from deepfake_course.detect.shallownet import keras_l2
    torch.set_num_threads(threads); torch.manual_seed(0)
    rows = []
    for sz in sizes:
        for name, kw in [('shallownet_v1', dict(width_mult=0.25)), ('shallownet_v3', dict(width_mult=1.0))]:
            net = build_detector(name, input_size=sz, **kw); opt = torch.optim.Adam(net.parameters(), 1e-3)
            x, y, lf = torch.rand(64, 3, sz, sz), (torch.rand(64) > .5).float(), keras_l2(net)
            walls, syss, faults = [], [], []
            for i in range(2 + steps):
                r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                opt.zero_grad(); lf(net(x), y).backward(); opt.step()
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                if i >= 2:
                    walls.append(time.perf_counter() - t0); syss.append(r1.ru_stime - r0.ru_stime); faults.append(r1.ru_minflt - r0.ru_minflt)
            rows.append(dict(model=name, size=sz, tuned=MALLOC_TUNED, wall=statistics.median(walls),
                             sys=statistics.median(syss), faults=statistics.median(faults)))
    print(json.dumps(rows))

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--steps', type=int, default=3); ap.add_argument('--sizes', type=int, nargs='+', default=[64, 128])
    ap.add_argument('--threads', type=int, default=2); ap.add_argument('--child', action='store_true')
    a = ap.parse_args()
    if a.child: child(a.sizes, a.steps, a.threads); sys.exit(0)
    res = {}
    for setting in ('system', 'kept'):
        env = dict(os.environ, DFC_QUIET='1')
        if setting == 'system': env['DFC_MALLOC'] = 'system'
        else: env.pop('DFC_MALLOC', None)
        out = subprocess.run([sys.executable, __file__, '--child', '--steps', str(a.steps), '--threads', str(a.threads),
                              '--sizes', *map(str, a.sizes)], env=env, capture_output=True, text=True, check=True).stdout
        res[setting] = json.loads(out.strip().splitlines()[-1])
    print(f"{'model':15s} {'px':>4s} | {'system malloc: s/step  sys s  faults':>38s} | {'kept: s/step  sys s  faults':>30s} | speed-up")
    for s, k in zip(res['system'], res['kept']):
        print(f"{s['model']:15s} {s['size']:4d} | {s['wall']:14.2f} {s['sys']:6.2f} {s['faults']:9.0f}       | "
              f"{k['wall']:8.2f} {k['sys']:6.2f} {k['faults']:8.0f}   | {s['wall'] / k['wall']:.2f}x")
