"""Face-swap training steps in float32 and in bf16 autocast on the CPU (`train_faceswap(cpu_bf16=...)`).

bf16 autocast only helps a CPU that computes bf16 in hardware (AVX512-BF16 or AMX, `core.cpu_bf16_native()`); on
others `cpu_bf16=True` falls back to float32 and both rows below time the same thing. For every architecture of
`generate.faceswap` at the 20_faceswap lecture's sizes (64 px, e/ae/d/mask dims 16/64/16/8, batch 8 a side), the two
runs start from the same weights and draw the same batches: `--steps` steps each after `--warmup` untimed ones,
with the random warp. Printed: the median seconds a step (from the loop's own clock), the speed-up, and the
training loss of the last 10 steps in each precision (the same run twice should give close losses; bf16 keeps
about 3 significant digits in the convolutions, the losses stay in float32).

usage: python benchmarks/cpu_bf16.py [--steps 40] [--warmup 5] [--archis df liae original iae] [--threads 2]
"""
import argparse, statistics

import torch

from deepfake_course.core import cpu_bf16_native
from deepfake_course.data import synth
from deepfake_course.generate.faceswap import build_model, make_swap_faceset, train_faceswap


def faceset(identity, n, seed):
    r = synth.render_faces([identity], n, size=128, seed=seed)
    return make_swap_faceset(r['images'], r['mask'], r['landmarks5'], identity, 64, 'full')


def run(archi, src, dst, steps, warmup, bf16):
    torch.manual_seed(0)
    m = build_model(archi, 64, e_dims=16, ae_dims=64, d_dims=16, d_mask_dims=8)
    r = train_faceswap(m, src, dst, steps=warmup + steps, batch_size=8, preview_every=0, device='cpu', cpu_bf16=bf16,
                       verbose=False, seed=0)
    sec = r.history['seconds'].diff().iloc[warmup:]
    return statistics.median(sec), float(r.history['loss'].iloc[-10:].mean())


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--steps', type=int, default=40); ap.add_argument('--warmup', type=int, default=5)
    ap.add_argument('--archis', nargs='+', default=['df', 'liae', 'original', 'iae']); ap.add_argument('--threads', type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"CPU computes bf16 in hardware: {cpu_bf16_native()} (torch {torch.__version__}, {a.threads} threads)")
    src, dst = faceset(0, 64, 0), faceset(1, 64, 1)
    print(f"{'archi':9s} | {'fp32 s/step':>11s} {'bf16 s/step':>11s} | speed-up | {'fp32 loss':>9s} {'bf16 loss':>9s}")
    for archi in a.archis:
        (t32, l32), (t16, l16) = run(archi, src, dst, a.steps, a.warmup, False), run(archi, src, dst, a.steps, a.warmup, True)
        print(f"{archi:9s} | {t32:11.3f} {t16:11.3f} | {t32 / t16:7.2f}x | {l32:9.3f} {l16:9.3f}")
