"""The main job's face-swap recipe: quality of one split's DF model against its training steps (issue 14).

One model as the main job trains it for a test split of 4 people: SynthFaces identity 11 swapped into 12, 13 and 14,
64-px frames, the model at `--res` px, 96 other renders per side to train on, `--steps` steps of `--batch` faces per
side (the first `--warp` of them with random warp, then sharpening as the learning rate falls by a cosine to 5e-5). With
`--pretrain P`, the model first learns 32 people outside any job (identities 1000+) for P steps (DFL's pretrain step).
Judged like `bench.swap_quality`: identity transfer (a judge trained on 8 identities x 48 other renders, inner face only),
masked SSIM of the src and dst reconstructions of 18 held-out faces each, MTCNN's detection rate on the merged frames
(mask eroded 1 px, blurred 3 px, RCT colour) and on the real driving frames. Appends one JSON line to --out.

usage: python benchmarks/main_job_swap_recipe.py --steps 500 [--res 32] [--batch 8] [--lr 1e-3] [--warp 0.3]
                                                 [--pretrain 0] [--threads 2] [--out swap_recipe.jsonl]
"""
import argparse, json, os, time
os.environ.setdefault('DFC_QUIET', '1')
import torch
from deepfake_course.data.synth import render_faces
from deepfake_course.generate import faceswap as fsw
from deepfake_course.quality import train_identity_classifier, predict_identity, face_ellipse, mtcnn_rate

ap = argparse.ArgumentParser()
ap.add_argument('--steps', type=int, default=500); ap.add_argument('--res', type=int, default=32)
ap.add_argument('--batch', type=int, default=8); ap.add_argument('--lr', type=float, default=1e-3)
ap.add_argument('--warp', type=float, default=0.3); ap.add_argument('--pretrain', type=int, default=0)
ap.add_argument('--threads', type=int, default=2); ap.add_argument('--out', default='swap_recipe.jsonl')
a = ap.parse_args()
torch.set_num_threads(a.threads)
S, src, dsts = 64, 11, [12, 13, 14]

def faceset(ids, n, seed, ident=-1):
    r = render_faces(ids, n, size=S, seed=seed)
    return r, fsw.make_swap_faceset(r['images'], r['mask'], r['landmarks5'], identity=ident, size=a.res, min_images=1)

model = fsw.build_model('df', a.res)
t0 = time.time()
if a.pretrain:
    _, pool = faceset(list(range(1000, 1032)), 12, 5)
    model = fsw.train_faceswap(model, pool, pool, steps=a.pretrain, batch_size=a.batch, warp_fraction=1.0, preview_every=0,
                               device='cpu', verbose=False).model
t_pre = time.time() - t0
_, fs_src = faceset([src], 96, 100, src); _, fs_dst = faceset(dsts, 32, 101)
_, ho_src = faceset([src], 18, 7, src); hd, ho_dst = faceset(dsts, 18, 7)
t0 = time.time()
m = fsw.train_faceswap(model, fs_src, fs_dst, steps=a.steps, batch_size=a.batch, lr=a.lr, lr_final=5e-5, warp_fraction=a.warp,
                       preview_every=0, device='cpu', verbose=False).model.eval()
t_train = time.time() - t0
ra = render_faces([src] + dsts + [15, 16, 17, 18], 48, size=S, seed=2000)
crops, M, _ = fsw.align_swap_faces(ra['images'], ra['landmarks5'], a.res, 'full')
judge = train_identity_classifier(crops, fsw.warp_affine(ra['mask'].float(), M, (a.res, a.res)), ra['identity'], epochs=10,
                                  device='cpu', region=face_ellipse(a.res, 'full'))
comp, _ = fsw.swap_crops(m, ho_dst)
sw = fsw.swap_frames(m, hd['images'], list(hd['landmarks5'].double().numpy()), erode=1, blur=3, color='rct')
out = dict(vars(a), pretrain_s=round(t_pre), train_s=round(t_train), steps_per_s=round(a.steps / t_train, 2),
           identity_transfer=round((predict_identity(judge, comp, ho_dst.masks) == src).float().mean().item(), 3),
           recon_ssim=round((fsw.recon_ssim(m, ho_src, 'src') + fsw.recon_ssim(m, ho_dst, 'dst')) / 2, 3),
           mtcnn_rate_fake=round(mtcnn_rate(sw['frames']), 3), mtcnn_rate_real=round(mtcnn_rate(hd['images']), 3))
print(json.dumps(out))
with open(a.out, 'a') as f: f.write(json.dumps(out) + '\n')
