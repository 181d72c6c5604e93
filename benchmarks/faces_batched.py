"""Batched MTCNN extraction versus a per-frame loop, on SynthFaces clips (deepfake_course.faces).

Renders `--clips` talking clips with SynthFaces (`render_clip`), writes each as an H.264 mp4 and decodes it
again with PyAV (the path real videos take), then detects faces in every frame twice: one
`FaceExtractor.detect(frames)` call per clip (batched) and a Python loop of single-frame calls. Reports the
speed-up and checks that both give the same faces (same count, every box coordinate within `--tol` px).
Timings are the best of `--repeat` runs. Exit status 1 if the boxes differ or the speed-up is below `--target`.

    python benchmarks/faces_batched.py                      # defaults: 4 clips x 50 frames, 128 px, 1 thread
    python benchmarks/faces_batched.py --size 64 --threads 2

`--source photos` replaces SynthFaces by a moving crop of scikit-image's astronaut (only for when the
renderer is not installed)."""
import argparse, json, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch


def synth_clips(n_clips, n_frames, size, seed):
    from deepfake_course.data import synth
    out = []
    for i in range(n_clips):
        c = synth.render_clip(i, n_frames=n_frames, size=size, seed=seed + i)
        out.append(((c['frames'].clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy(), float(c.get('fps', 25))))
    return out


def photo_clips(n_clips, n_frames, size, seed):
    from skimage import data
    from skimage.transform import resize
    a = data.astronaut(); out = []
    rng = np.random.default_rng(seed)
    for i in range(n_clips):
        x0, y0 = rng.integers(60, 140, 2)
        fr = [(resize(a[y0 + t:y0 + t + 260, x0 + t:x0 + t + 260], (size, size), anti_aliasing=True) * 255).astype(np.uint8)
              for t in range(n_frames)]
        out.append((np.stack(fr), 25.0))
    return out


def best_of(fn, repeat):
    best, res = float('inf'), None
    for _ in range(repeat):
        t0 = time.perf_counter(); res = fn(); best = min(best, time.perf_counter() - t0)
    return best, res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--clips', type=int, default=4); ap.add_argument('--frames', type=int, default=50)
    ap.add_argument('--size', type=int, default=128); ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--device', default='auto'); ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--batch-size', type=int, default=64); ap.add_argument('--repeat', type=int, default=3)
    ap.add_argument('--tol', type=float, default=1.0); ap.add_argument('--target', type=float, default=2.0)
    ap.add_argument('--source', choices=['synth', 'photos'], default='synth')
    a = ap.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    from deepfake_course.faces import FaceExtractor
    from deepfake_course.core import write_mp4
    from deepfake_course.media import read_frames
    fx = FaceExtractor(a.device, batch_size=a.batch_size)
    clips = (synth_clips if a.source == 'synth' else photo_clips)(a.clips, a.frames, a.size, a.seed)
    decoded = []
    with tempfile.TemporaryDirectory() as d:
        for i, (fr, fps) in enumerate(clips):
            p = write_mp4(Path(d)/f'clip{i}.mp4', fr, fps=fps)
            decoded.append(read_frames(p)[0])
    fx.detect(decoded[0][:2]); fx.detect(decoded[0][0])           # warm-up
    t_batch, res_b = best_of(lambda: [fx.detect(v) for v in decoded], a.repeat)
    t_loop, res_l = best_of(lambda: [[fx.detect(f)[0] for f in v] for v in decoded], a.repeat)
    n_frames = sum(len(v) for v in decoded)
    max_diff, mismatched, faces = 0.0, 0, 0
    for vb, vl in zip(res_b, res_l):
        for b, l in zip(vb, vl):
            faces += len(b)
            if len(b) != len(l): mismatched += 1; continue
            if len(b): max_diff = max(max_diff, float(np.abs(b.boxes - l.boxes).max()))
    speedup = t_loop / t_batch
    same = mismatched == 0 and max_diff <= a.tol
    rep = dict(source=a.source, device=str(fx.device), threads=torch.get_num_threads(), clips=a.clips, frames=n_frames,
               size=a.size, batch_size=a.batch_size, frames_with_face=int(sum(not d.empty for v in res_b for d in v)),
               faces=faces, batched_s=round(t_batch, 3), loop_s=round(t_loop, 3),
               batched_fps=round(n_frames / t_batch, 1), loop_fps=round(n_frames / t_loop, 1), speedup=round(speedup, 2),
               frames_with_different_face_count=mismatched, max_box_diff_px=round(max_diff, 4), same_boxes=same)
    print(json.dumps(rep, indent=1))
    ok = same and speedup >= a.target
    print(('PASS' if ok else 'FAIL') + f': speed-up {speedup:.2f}x (target {a.target}x), boxes within {a.tol} px: {same}')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
