"""Random warp all the way, or warp then sharpen? The face-swap training schedule, measured.

Trains the notebook's DF model (64 px, 3.2 M parameters, batch 8, lr 5e-4) on SynthFaces identities 0 (src) and
1 (dst) once per `--warp-fractions` value, for `--steps` steps each, with the same data and seed (`--lr`: the rate while warping). With a fraction
below 1 the rest of the steps run without random warp while the learning rate falls by a cosine to `--lr-final`
(the notebook's default recipe: 0.5 and 5e-5). Every `--eval-every` steps it reports, on 48 held-out faces per
identity: masked reconstruction SSIM, identity transfer (the notebook's inner-face judge) and landmark NME.
Then it prints the last evaluation of each schedule and its SSIM ratio against warping all the way (one run each).

    python benchmarks/faceswap_schedule.py                       # 4000 steps, fractions 1.0 and 0.5 (~30 min on 2 cores)
    python benchmarks/faceswap_schedule.py --steps 1500 --eval-every 500
"""
import argparse, json, time

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--steps', type=int, default=4000)
    ap.add_argument('--warp-fractions', type=float, nargs='+', default=[1.0, 0.5])
    ap.add_argument('--lr', type=float, default=5e-4)
    ap.add_argument('--lr-final', type=float, default=5e-5)
    ap.add_argument('--eval-every', type=int, default=1000)
    ap.add_argument('--n-train', type=int, default=512)
    ap.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
    ap.add_argument('--seed', type=int, default=0)
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    from deepfake_course.data import synth
    from deepfake_course.faces import transform_points
    from deepfake_course.generate import faceswap as fs
    from deepfake_course import quality

    def faceset(identity, n, seed):
        r = synth.render_faces([identity], n, size=128, seed=seed)
        return fs.make_swap_faceset(r['images'], r['mask'], r['landmarks5'], identity, 64, 'full', min_images=1)
    src, dst = faceset(0, a.n_train, a.seed), faceset(1, a.n_train, a.seed + 1)
    src_ho, dst_ho = faceset(0, 48, a.seed + 1000), faceset(1, 48, a.seed + 1001)
    aux = synth.render_faces(list(range(8)), 160, size=128, seed=a.seed + 2000)
    crops, M, _ = fs.align_swap_faces(aux['images'], aux['landmarks5'], 64, 'full')
    masks = fs.warp_affine(aux['mask'].float().reshape(-1, 1, 128, 128), M, (64, 64))
    id_net = quality.train_identity_classifier(crops, masks, aux['identity'], epochs=15, seed=a.seed, region=quality.face_ellipse(64))
    lm_net = quality.train_landmark_regressor(crops, transform_points(np.asarray(aux['landmarks68'], np.float64), M), epochs=15, seed=a.seed)

    final = {}
    for wf in a.warp_fractions:
        torch.manual_seed(a.seed)
        model = fs.build_model('df', 64, e_dims=16, ae_dims=64, d_dims=16, d_mask_dims=8)
        curve = []
        def on_step(step, row):
            if step % a.eval_every == 0 or step == a.steps:
                e = fs.evaluate_swap(model, src_ho, dst_ho, id_net, lm_net); model.train()
                curve.append(dict(step=step, seconds=round(row['seconds']), **{k: round(e[k], 3) for k in ('recon_ssim', 'identity_transfer', 'landmark_nme')}))
                print(f'warp_fraction {wf}: {curve[-1]}', flush=True)
        t = time.time()
        fs.train_faceswap(model, src, dst, steps=a.steps, batch_size=8, lr=a.lr, warp_fraction=wf,
                          lr_final=a.lr_final if wf < 1 else None, preview_every=0, ckpt_every=0, seed=a.seed, on_step=on_step)
        final[wf] = dict(curve[-1], wall_seconds=round(time.time() - t))
    base = final.get(1.0)
    for wf, r in final.items():
        ratio = f", SSIM x{r['recon_ssim'] / base['recon_ssim']:.2f} of warp-all-the-way" if base and wf != 1.0 else ''
        print(f'warp_fraction {wf} after {a.steps} steps: {json.dumps(r)}{ratio}')


if __name__ == '__main__':
    main()
