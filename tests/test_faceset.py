"""Unit tests of deepfake_course.generate.faceset: pose from landmarks, DFL's sorts, near-duplicates, best faces,
occluders, XSeg polygons (rasterising, include/exclude, bad points), XSeg training and its exact resume. SynthFaces at
64 px and random data; each test takes a few seconds at most on a 2-core CPU."""
import json
import cv2, numpy as np, pandas as pd, pytest, torch

from deepfake_course.data import synth
from deepfake_course.generate import faceset as fst
from deepfake_course.generate.faceswap import SwapFaceSet, align_swap_faces, warp_affine
from deepfake_course.faces import transform_points
from deepfake_course.train import CheckpointError


@pytest.fixture(scope='module')
def faces(one_thread):
    "12 aligned 64-px SynthFaces of one person with their 68 landmarks (crop pixels), masks and the renderer's parameters."
    r = synth.render_faces([0], 12, size=128, seed=3)
    crops, M, _ = align_swap_faces(r['images'], r['landmarks5'], 64, 'full')
    lm = transform_points(np.asarray(r['landmarks68'], np.float64), M).numpy()
    masks = warp_affine(r['mask'].float(), M, (64, 64)).clamp(0, 1)
    return dict(x=crops.clamp(0, 1), lm=lm, m=masks, p=r['params'], raw=r)


def _blur(x, sigma=1.5):
    return torch.stack([torch.from_numpy(cv2.GaussianBlur(f.permute(1, 2, 0).numpy(), (0, 0), sigma)).permute(2, 0, 1) for f in x])


# ---------------------------------------------------------------- pose, hull, measures
def test_pose_from_landmarks_matches_renderer(faces):
    est = fst.estimate_pose(faces['lm'])
    for k in ('yaw', 'pitch'):
        assert np.abs(est[k].to_numpy() - faces['p'][k].numpy()).mean() < 3, k
    roll = fst.estimate_pose(faces['raw']['landmarks68'])['roll'].to_numpy()   # roll: in the frame, before alignment
    assert np.abs(roll - faces['p']['roll'].numpy()).mean() < 3
    for k, v in (('yaw', 25), ('pitch', 15)):    # signs: yaw > 0 turns to the image's right, pitch > 0 looks up
        lo, hi = (synth.render_face(0, 128, **{**dict(yaw=0, pitch=0, roll=0), k: s * v})['landmarks68'] for s in (-1, 1))
        assert fst.estimate_pose(lo)[k][0] < -v / 2 and fst.estimate_pose(hi)[k][0] > v / 2


def test_bad_landmarks_error():
    with pytest.raises(ValueError, match='landmarks68 must be N x 68 x 2'): fst.estimate_pose(np.zeros((3, 5, 2)))
    with pytest.raises(ValueError, match='NaN'): fst.face_hull_mask(np.full((1, 68, 2), np.nan), 64)
    with pytest.raises(ValueError, match='with N = 4 faces'): fst.sharpness(torch.rand(4, 3, 32, 32), np.zeros((3, 68, 2)))


def test_hull_holds_the_face(faces):
    h = fst.face_hull_mask(faces['lm'], 64)
    assert h.shape == (12, 1, 64, 64) and set(h.unique().tolist()) <= {0.0, 1.0}
    nose = np.floor(faces['lm'][:, 27:36]).astype(int)
    assert all(h[i, 0, nose[i, :, 1], nose[i, :, 0]].all() for i in range(12))
    assert fst.mask_iou(h, faces['m']).mean() > 0.5


def test_mouth_open_follows_renderer():
    r = synth.render_faces([0], 6, size=64, seed=0, mouth_open=(0, 1), yaw=0, pitch=0, roll=0)
    mo = fst.mouth_open(r['landmarks68'])
    assert np.corrcoef(mo, r['params']['mouth_open'].numpy())[0, 1] > 0.95


# ---------------------------------------------------------------- sorts
def test_sort_by_blur_puts_blurred_copies_last(faces):
    x = torch.cat([faces['x'][:5], _blur(faces['x'][:5])]); lm = np.concatenate([faces['lm'][:5]] * 2)
    order = fst.sort_faces(x, lm, 'blur')
    assert sorted(order[:5].tolist()) == [0, 1, 2, 3, 4]
    assert (fst.sharpness(x[5:], lm[5:]) < fst.sharpness(x[:5], lm[:5])).all()


@pytest.mark.parametrize('by', ['yaw', 'pitch'])
def test_sort_by_pose_from_largest(faces, by):
    order = fst.sort_faces(faces['x'], faces['lm'], by)
    truth = faces['p'][by].numpy()[order]
    assert (np.diff(truth) <= 3).all()          # descending (within the estimate's error)
    assert truth[0] == truth.max()


def test_sort_by_hist_chains_similar_faces(faces):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([faces['x'][:4], (faces['x'][:4] + 0.01 * torch.randn(4, 3, 64, 64, generator=g)).clamp(0, 1)])
    order = fst.sort_faces(x, np.concatenate([faces['lm'][:4]] * 2), 'hist').tolist()
    assert sorted(order) == list(range(8)) and order[0] == 0 and order[1] == 4    # face 0, then its own noisy copy


def test_sort_by_hist_dissim_puts_odd_face_first(faces):
    x = torch.cat([faces['x'][:6], faces['x'][6:7] * 0.3])
    assert fst.sort_faces(x, faces['lm'][:7], 'hist-dissim')[0] == 6


def test_sorts_accept_a_swap_faceset(faces):
    s = SwapFaceSet(faces['x'], faces['m'], torch.rand(12, 5, 2) * 40 + 10)
    assert fst.sort_faces(s, faces['lm'], 'yaw').tolist() == fst.sort_faces(faces['x'], faces['lm'], 'yaw').tolist()


def test_too_small_faceset_errors(faces):
    with pytest.raises(ValueError, match='a faceset of 1 face is too small to sort by blur: it needs at least 2'):
        fst.sort_faces(faces['x'][:1], faces['lm'][:1], 'blur')
    with pytest.raises(ValueError, match='a faceset of 12 faces is too small to pick 12 best faces'):
        fst.best_faces(faces['x'], faces['lm'], 12)
    with pytest.raises(ValueError, match='use one of blur, yaw, pitch, hist, hist-dissim'):
        fst.sort_faces(faces['x'], faces['lm'], 'age')


# ---------------------------------------------------------------- near duplicates
def test_near_duplicates_are_removed(faces):
    x = faces['x'][:6]
    copies = (x[[1, 3]] * 1.03 + 0.005 * torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    allx = torch.cat([x, copies])                                     # 6 and 7 copy 1 and 3
    kept, removed = fst.near_duplicates(allx, 0.02)
    assert kept.tolist() == [0, 1, 2, 3, 4, 5]
    assert sorted(zip(removed['face'], removed['kept_instead'])) == [(6, 1), (7, 3)]
    kept, _ = fst.near_duplicates(allx, 0.02, priority=[6, 7, 0, 1, 2, 3, 4, 5])    # the first in priority stays
    assert kept.tolist() == [0, 2, 4, 5, 6, 7]
    assert fst.near_duplicates(x, 0.02)[0].tolist() == list(range(6))       # six different pictures: nothing removed
    d = fst.duplicate_distances(allx, 'phash', 8); assert d.shape == (8, 8) and (np.diag(d) == 0).all()
    with pytest.raises(ValueError, match='threshold must be a number >= 0'): fst.near_duplicates(allx, -0.1)
    with pytest.raises(ValueError, match='priority must be a permutation'): fst.near_duplicates(allx, 0.02, priority=[0, 0, 1, 2, 3, 4, 5, 6])


# ---------------------------------------------------------------- best faces
def test_best_faces_seek_out_rare_values():
    rng = np.random.default_rng(0); n = 120
    st = pd.DataFrame({'blur': rng.uniform(50, 100, n), 'yaw': rng.uniform(-30, 30, n), 'pitch': rng.uniform(-10, 10, n),
                       'mouth': rng.uniform(0, 0.03, n), 'light': rng.normal(0, 0.1, n), 'brightness': rng.normal(0.4, 0.02, n)})
    rare = rng.choice(n, 5, replace=False); st.loc[rare, 'mouth'] = np.linspace(0.2, 0.4, 5)   # five open mouths among 120
    x = torch.zeros(n, 3, 8, 8); lm = np.zeros((n, 68, 2))
    pick = fst.best_faces(x, lm, 24, yaw_bins=2, pitch_bins=1, stats=st)
    assert len(pick) == 24 and len(set(pick.tolist())) == 24
    assert len(set(rare.tolist()) & set(pick.tolist())) >= 4                      # the rare open mouths are sought out (5 in 120 -> 4+ in 24)
    assert len(set(rare.tolist()) & set(np.random.default_rng(1).choice(n, 24, replace=False).tolist())) <= 2   # (chance keeps about 1)
    mid = (st['yaw'].min() + st['yaw'].max()) / 2
    assert (st['yaw'].to_numpy()[pick] < mid).sum() == 12                            # equal shares over the two yaw bins
    st2 = st.copy(); st2.loc[rare, 'blur'] = 1.0                                     # the rare faces are now the blurriest
    pick2 = fst.best_faces(x, lm, 6, yaw_bins=1, pitch_bins=1, sharp_factor=2, stats=st2)
    assert not set(rare.tolist()) & set(pick2.tolist())                          # only the sharpest 2 x 6 compete


def test_share_is_even_and_complete():
    assert fst._share(10, [100, 100]).tolist() == [5, 5]
    assert fst._share(10, [2, 100, 100]).tolist() == [2, 4, 4]
    assert fst._share(10, [3, 3]).tolist() == [3, 3]                 # not enough faces: everything


# ---------------------------------------------------------------- occluders
def test_occluders_cut_the_mask(faces):
    r = faces['raw']
    o = fst.paint_occluders(r['images'][:6], r['mask'][:6], r['landmarks68'][:6], fraction=1.0, seed=0)
    assert o['occluded'].all() and (o['mask'] <= r['mask'][:6] + 1e-6).all()
    hidden = (r['mask'][:6] - o['mask']).flatten(1).sum(1)
    share = hidden / r['mask'][:6].flatten(1).sum(1)
    assert (share > 0).all() and share.mean() > 0.05                             # each hides some skin
    changed = (o['images'] - r['images'][:6]).abs().sum(1, keepdim=True) > 1e-4
    assert (changed <= (o['occluder'] > 0)).all()                                  # pixels change only under the occluder
    none = fst.paint_occluders(r['images'][:3], r['mask'][:3], r['landmarks68'][:3], fraction=0.0)
    assert torch.equal(none['images'], r['images'][:3].clamp(0, 1)) and not none['occluded'].any()
    with pytest.raises(ValueError, match='kinds must be'): fst.paint_occluders(r['images'][:1], r['mask'][:1], r['landmarks68'][:1], kinds=('cat',))


# ---------------------------------------------------------------- XSeg polygons
SQ = lambda a, b: [[a, a], [b, a], [b, b], [a, b]]


def test_polygons_rasterise_include_minus_exclude():
    inc = {'type': 1, 'pts': SQ(5, 45)}; exc = {'type': 0, 'pts': SQ(20, 30)}
    m = fst.rasterize_polys({'polys': [inc, exc]}, 64)
    assert m.shape == (1, 64, 64) and float(m.sum()) == 1600 - 100
    assert float(m[0, 25, 25]) == 0 and float(m[0, 10, 10]) == 1 and float(m[0, 50, 50]) == 0
    assert torch.equal(fst.rasterize_polys({'polys': [exc, inc]}, 64), m)             # DFL's order: includes first, whatever the list says
    assert float(fst.rasterize_polys({'polys': [inc]}, (48, 64)).sum()) == 1600        # (H, W)
    half = fst.rasterize_polys({'polys': [{'type': 1, 'pts': [[0, 0], [10.5, 0], [10.5, 1], [0, 1]]}]}, 16)
    assert abs(float(half.sum()) - 10.5) < 1e-6 and abs(float(half[0, 0, 10]) - 0.5) < 1e-6   # sub-pixel edges: partial coverage
    assert float(fst.rasterize_polys({'polys': []}, 16).sum()) == 0


def test_traced_polygons_give_back_the_mask(faces):
    ring = np.zeros((64, 64), np.float32); cv2.circle(ring, (32, 32), 20, 1, -1); cv2.circle(ring, (32, 32), 8, 0, -1)
    seg = fst.mask_to_polys(ring)
    assert sorted(p['type'] for p in seg['polys']) == [0, 1] and seg['polys'][0]['type'] == 1
    assert fst.mask_iou(fst.rasterize_polys(seg, 64)[None], torch.from_numpy(ring)[None, None])[0] > 0.97
    for m in faces['m'][:4]:
        assert fst.mask_iou(fst.rasterize_polys(fst.mask_to_polys(m[0]), 64)[None], m[None])[0] > 0.95
    json.dumps(seg)                                                                 # stored as plain JSON, as DFL dumps it


def test_polygons_outside_the_image_error():
    bad = {'polys': [{'type': 1, 'pts': SQ(5, 45)}, {'type': 0, 'pts': [[10, 10], [64.5, 12], [20, 30]]}]}
    with pytest.raises(ValueError, match=r"face_0007.jpg: polygon 1 \(exclude\) has 1 point\(s\) outside the 64x64 image, e.g. point 1 at \(64.50, 12.00\)"):
        fst.rasterize_polys(bad, 64, 'face_0007.jpg')
    with pytest.raises(ValueError, match='polygon 0 .* outside'): fst.rasterize_polys({'polys': [{'type': 1, 'pts': [[-1, 0], [5, 0], [5, 5]]}]}, 64, 'a')
    with pytest.raises(ValueError, match='a: polygon 0 has points that are not finite'): fst.rasterize_polys({'polys': [{'type': 1, 'pts': [[np.nan, 0], [5, 0], [5, 5]]}]}, 64, 'a')
    with pytest.raises(ValueError, match='polygon 0 has type 3'): fst.rasterize_polys({'polys': [{'type': 3, 'pts': SQ(1, 5)}]}, 64)
    with pytest.raises(ValueError, match='at least 3'): fst.rasterize_polys({'polys': [{'type': 1, 'pts': [[1, 1], [2, 2]]}]}, 64)
    with pytest.raises(ValueError, match="must be a dict"): fst.rasterize_polys([SQ(1, 5)], 64)


def test_write_and_read_labels(tmp_path):
    labels = {'a.jpg': {'polys': [{'type': 1, 'pts': SQ(2, 20)}]}, 'b.jpg': {'polys': []}}
    p = fst.write_polys(tmp_path / 'labels.json', labels, 32)
    assert fst.read_polys(p) == labels
    with pytest.raises(ValueError, match='b.jpg: polygon 0 .* outside the 32x32 image'):
        fst.write_polys(tmp_path / 'bad.json', {'b.jpg': {'polys': [{'type': 1, 'pts': SQ(2, 40)}]}}, 32)
    assert not (tmp_path / 'bad.json').exists()                                     # checked before anything is written
    (tmp_path / 'junk.json').write_text('[1, 2')
    with pytest.raises(ValueError, match='not an XSeg label file'): fst.read_polys(tmp_path / 'junk.json')
    with pytest.raises(FileNotFoundError, match='no XSeg labels'): fst.read_polys(tmp_path / 'missing.json')


# ---------------------------------------------------------------- XSeg network
def _labelled(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    m = torch.zeros(n, 1, size, size); m[..., size // 4: -size // 4, size // 4: -size // 4] = 1
    return x, m


def test_xseg_net_shapes_and_size():
    net = fst.XSegNet(16)
    assert 2e5 < sum(p.numel() for p in net.parameters()) < 1e6                   # a few hundred thousand parameters
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match='divisible by 8'): net(torch.rand(1, 3, 36, 36))
    p = fst.apply_xseg(fst.XSegNet(4), torch.rand(3, 3, 32, 32)); assert p.shape == (3, 1, 32, 32) and 0 <= p.min() and p.max() <= 1


def test_xseg_training_resumes_exactly(tmp_path, one_thread):
    x, m = _labelled()
    kw = dict(steps=6, batch_size=4, base=4, ckpt_every=3, device='cpu', verbose=False)
    torch.manual_seed(1); net_a, h_a = fst.train_xseg(x, m, ckpt_path=tmp_path / 'a.pt', **kw)
    class Stop(Exception): pass
    def stop_at_4(step, row):
        if step == 4: raise Stop()
    torch.manual_seed(1)
    with pytest.raises(Stop): fst.train_xseg(x, m, ckpt_path=tmp_path / 'b.pt', on_step=stop_at_4, **kw)
    torch.manual_seed(123); net_b, h_b = fst.train_xseg(x, m, ckpt_path=tmp_path / 'b.pt', **kw)   # other initial weights: all from the checkpoint
    for (k, va), vb in zip(net_a.state_dict().items(), net_b.state_dict().values()): assert torch.equal(va, vb), k
    assert h_a['loss'].tolist() == h_b['loss'].tolist() and len(h_b) == 6
    with pytest.raises(CheckpointError): fst.train_xseg(x[:3], m[:3], ckpt_path=tmp_path / 'a.pt', **kw)   # other faces: refused
    with pytest.raises(ValueError, match='1 labelled face'): fst.train_xseg(x[:1], m[:1], steps=1)


def test_xseg_learns_a_mask(one_thread):
    x, m = _labelled(8, 32)
    x = x * 0.3 + m * 0.6                                                     # the "face" is brighter than the background
    torch.manual_seed(0); net, h = fst.train_xseg(x, m, steps=100, batch_size=8, base=4, lr=1e-2, device="cpu", verbose=False)
    assert h['loss'].iloc[-10:].mean() < h['loss'].iloc[:5].mean()
    assert fst.mask_iou(fst.apply_xseg(net, x), m).mean() > 0.9


def test_with_masks_and_iou():
    s = SwapFaceSet(torch.rand(4, 3, 32, 32), torch.ones(4, 1, 32, 32), torch.rand(4, 5, 2) * 20 + 6, identity=3)
    new = torch.zeros(4, 1, 32, 32); new[..., 8:24, 8:24] = 1
    t = fst.with_masks(s, new)
    assert torch.equal(t.masks, new) and t.identity == 3 and (t.em <= new).all() and torch.equal(t.images, s.images)
    a = torch.zeros(1, 1, 4, 4); a[..., :2] = 1; b = torch.zeros(1, 1, 4, 4); b[..., 1:3] = 1
    assert fst.mask_iou(a, b)[0] == pytest.approx(1 / 3) and fst.mask_iou(a, a)[0] == 1
    assert fst.mask_iou(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))[0] == 1     # two empty masks agree


def test_mean_ci_and_mouth_box(faces):
    m, lo, hi = fst.mean_ci(np.r_[np.zeros(50), np.ones(50)], 500)
    assert m == 0.5 and 0.35 < lo < 0.5 < hi < 0.65
    box = fst.mouth_box(faces['lm'][:3], 64)
    pts = np.floor(faces['lm'][:3, 48:68]).astype(int)
    assert all(box[i, 0, pts[i, :, 1], pts[i, :, 0]].all() for i in range(3)) and (box.flatten(1).sum(1) < 0.2 * 64 * 64).all()
