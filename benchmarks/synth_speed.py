"""Rendering speed of SynthFaces (deepfake_course.data.synth.render_faces), batched, on CPU threads or a GPU.

Renders `--n` faces (`--per-identity` per identity) at each size, `--repeat` times, and reports faces/s of the best
and of the median run for each thread count. Targets: >= 1000 faces/s at 64x64 and >= 250 faces/s at 128x128 on
2 CPU cores. The machine's load average is printed with the results: on a shared machine the best run is the
closest to what the code does on free cores, the median what you got. Faces per CPU-second (process time) tell
what each core does while it actually runs this process: on N free cores expect about N times that with N threads.
Exit status 1 if a best rate misses its target.

    python benchmarks/synth_speed.py                          # 2 threads, 64 and 128 px
    python benchmarks/synth_speed.py --threads 1 2 --n 2048 --repeat 5
    python benchmarks/synth_speed.py --device cuda
"""
import argparse, json, os, statistics, sys, time

import torch

TARGETS = {64: 1000.0, 128: 250.0}


def measure(size, n, per_identity, threads, repeat, device):
    from deepfake_course.data.synth import render_faces
    torch.set_num_threads(threads)
    n_id = max(1, n // per_identity)
    render_faces(2, 8, size=size, seed=0, device=device)                        # warm-up
    rates, cpu_rates = [], []
    for r in range(repeat):
        if device.startswith('cuda'): torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        out = render_faces(n_id, per_identity, size=size, seed=r, device=device)
        if device.startswith('cuda'): torch.cuda.synchronize()
        rates.append(n_id * per_identity / (time.perf_counter() - t))
        cpu_rates.append(n_id * per_identity / max(time.process_time() - c, 1e-9))
    return dict(size=size, threads=threads, device=device, n=n_id * per_identity, best=max(rates),
                median=statistics.median(rates), runs=[round(x, 1) for x in rates],
                per_cpu_second=statistics.median(cpu_rates))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--sizes', type=int, nargs='+', default=[64, 128])
    ap.add_argument('--threads', type=int, nargs='+', default=[2])
    ap.add_argument('--n', type=int, default=1024, help='faces per run (at 128 px half as many)')
    ap.add_argument('--per-identity', type=int, default=16)
    ap.add_argument('--repeat', type=int, default=3)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--json', default=None, help='also write the results here')
    a = ap.parse_args(argv)
    res, ok = [], True
    for th in a.threads:
        for size in a.sizes:
            n = a.n if size <= 64 else max(a.per_identity, a.n // 2)
            r = measure(size, n, a.per_identity, th, a.repeat, a.device); res.append(r)
            tgt = TARGETS.get(size)
            met = tgt is None or a.device != 'cpu' or th != 2 or r['best'] >= tgt
            ok &= met
            print(f"{size:4d}px  {th} thread(s)  {a.device:5s}  best {r['best']:8.0f} faces/s  median {r['median']:8.0f}"
                  f"  (n={r['n']}, runs {r['runs']}; {r['per_cpu_second']:.0f} faces per CPU-second)" + (f"  target {tgt:.0f}: {'met' if met else 'MISSED'}" if tgt and th == 2 and a.device == 'cpu' else ''))
    load = os.getloadavg() if hasattr(os, 'getloadavg') else None
    print(f"load average (1, 5, 15 min): {load}  on {os.cpu_count()} logical CPUs")
    if a.json:
        with open(a.json, 'w') as f: json.dump(dict(results=res, load=load), f, indent=2)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
