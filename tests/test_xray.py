"""Face X-ray and Self-Blended Images (detect.xray): the X-ray target, BI and SBI synthesis, the network, training,
bad input, the registry and exact resume."""
import numpy as np
import pandas as pd
import pytest
import torch

from deepfake_course.data.synth import render_faces
from deepfake_course.detect import xray as X
from deepfake_course.detect.core import (FaceTensorSet, build_detector, list_detectors, save_detector, load_detector,
                                         score_faces)
from deepfake_course.train import InterruptAfter

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def faces():
    "Six SynthFaces people, four pictures each, at 32 px, with their 68 landmarks."
    return render_faces(list(range(6)), 4, size=32, seed=3)


def test_xray_target_values():
    M = torch.tensor([0.0, 1.0, 0.5, 0.25])
    assert torch.allclose(X.xray_target(M), torch.tensor([0.0, 0.0, 1.0, 0.75]))
    m = X.feather(X.landmark_mask(render_faces([0], 1, size=64, seed=0)['landmarks68'][0], (64, 64)), 7)
    B = X.xray_target(m)
    assert (B[(m == 0) | (m == 1)] == 0).all() and B.max() <= 1 and B.max() > 0.9   # a boundary: M crosses 0.5


def test_bi_keeps_background_outside_mask(faces):
    x, lm = faces['images'], faces['landmarks68']
    o = X.blended_image(x[0], x[5], lm[0], lm[5], rng=1, steps=True)
    bg = x[0].permute(1, 2, 0).numpy()
    out, M = o['image'], o['mask']
    assert out.shape == bg.shape and M.shape == bg.shape[:2]
    assert (M == 0).any() and (M > 0).any()
    np.testing.assert_allclose(out[M == 0], bg[M == 0], atol=1e-6)             # background untouched outside the mask
    np.testing.assert_allclose(out[M == 1], o['corrected'][M == 1], atol=1e-6)  # the foreground inside it
    np.testing.assert_allclose(o['xray'], 4 * M * (1 - M), atol=1e-6)


def test_sbi_mask_in_image_and_ratio(faces):
    x, lm = faces['images'], faces['landmarks68']
    for r in (0.25, 0.5, 1.0):
        o = X.self_blended_image(x[2], lm[2], rng=7, ratio=r, steps=True)
        M = o['mask']
        assert M.shape == (32, 32) and M.min() >= 0
        assert abs(M.max() - r) < 1e-5                                        # the blend ratio sets the peak
        assert M[0].max() == M[-1].max() == M[:, 0].max() == M[:, -1].max() == 0   # the blend stays inside the picture
        np.testing.assert_allclose(o['image'], M[..., None] * o['source'] + (1 - M[..., None]) * o['target'], atol=1e-5)
    ratios = {X.self_blended_image(x[2], lm[2], rng=s)['ratio'] for s in range(40)}
    assert ratios == set(X.SBI_RATIOS)
    with pytest.raises(ValueError, match='ratio must be in'): X.self_blended_image(x[2], lm[2], ratio=1.5)


def test_bad_input_errors(faces):
    x, lm = faces['images'], faces['landmarks68']
    with pytest.raises(X.BlendInputError, match='background face has no landmarks'):
        X.blended_image(x[0], x[5], None, lm[5])
    with pytest.raises(X.BlendInputError, match='foreground face has no landmarks'):
        X.blended_image(x[0], x[5], lm[0], None)
    small = torch.nn.functional.interpolate(x[5:6], size=24, mode='bilinear')[0]
    with pytest.raises(X.BlendInputError, match=r'one size: the background is 32×32, the foreground 24×24'):
        X.blended_image(x[0], small, lm[0], lm[5] * 0.75)
    with pytest.raises(X.BlendInputError, match='SBI face has no landmarks'): X.self_blended_image(x[0], None)
    with pytest.raises(X.BlendInputError, match='NaN'): X.self_blended_image(x[0], torch.full((68, 2), float('nan')))
    with pytest.raises(X.BlendInputError, match='outside'): X.self_blended_image(x[0], lm[0] * 10)
    with pytest.raises(X.BlendInputError, match='have no landmarks'): X.BlendSet(x, None, faces['identity'])
    with pytest.raises(X.BlendInputError, match='two identities'): X.BlendSet(x[:4], lm[:4], faces['identity'][:4], 'bi')


def test_blendset_items_and_donors(faces):
    ds = X.BlendSet(faces['images'], faces['landmarks68'], faces['identity'].numpy(), 'bi', n_donors=3)
    ids = faces['identity'].numpy()
    assert ds.donors.shape == (24, 3) and not (ids[ds.donors] == ids[:, None]).any()   # donors are other people
    torch.manual_seed(0)
    xs, Bs = zip(*[ds[i % 24] for i in range(48)])
    assert xs[0].shape == (3, 32, 32) and Bs[0].shape == (1, 32, 32)
    y = X.xray_labels(torch.stack(Bs))
    assert 0 < y.sum() < 48                                                   # real and blended faces both drawn
    val = ds.fixed(seed=0)
    assert len(val) == 48 and X.xray_labels(val.tensors[1]).sum() == 24         # one real and one blended copy of each


def test_paired_items(faces):
    ds = X.BlendSet(faces['images'], faces['landmarks68'], faces['identity'].numpy(), 'sbi', augment=False, paired=True)
    torch.manual_seed(0)
    x, B = X.pair_collate([ds[3], ds[7]])
    assert x.shape == (4, 3, 32, 32) and B.shape == (4, 1, 32, 32)
    assert X.xray_labels(B).tolist() == [0, 1, 0, 1]                             # each real face next to its blend
    u8 = lambda t: (t * 255).round().byte()
    assert torch.equal(u8(x[0]), faces['images'][3].mul(255).round().byte())     # the real member is the face itself
    assert not torch.equal(u8(x[1]), u8(x[0]))


def test_network_shapes_and_size_check():
    m = X.XRayNet(32, 4)
    out = m(torch.rand(5, 3, 32, 32))
    assert out.shape == (5,) and m.last_map.shape == (5, 1, 32, 32)
    maps, lg = X.predict_xray(m, torch.rand(3, 3, 32, 32))
    assert maps.shape == (3, 32, 32) and lg.shape == (3,) and 0 <= maps.min() and maps.max() <= 1
    with pytest.raises(ValueError, match='built for 32×32'): m(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match='multiple of 16'): X.XRayNet(40)


def test_training_lowers_the_loss(faces):
    torch.manual_seed(0)
    ds = X.BlendSet(faces['images'][::3], faces['landmarks68'][::3], faces['identity'][::3].numpy(), 'sbi')
    xb, Bb = ds.fixed(seed=1).tensors                                  # 8 real and 8 self-blended faces
    m = X.XRayNet(32, 4); loss = X.xray_loss(m, map_weight=10.0)
    opt = torch.optim.Adam(m.parameters(), 5e-3)
    def step():
        L = loss(m(xb), Bb); opt.zero_grad(); L.backward(); opt.step(); return L.item()
    first = step()
    last = [step() for _ in range(10)]
    assert np.mean(last[-3:]) < 0.7 * first, (first, last)
    with pytest.raises(ValueError, match='X-ray targets'): loss(m(xb), X.xray_labels(Bb))


def test_registered_save_load_and_score(tmp_path):
    names = set(list_detectors()['name'])
    assert {'xray', 'sbi'} <= names
    m = build_detector('sbi', input_size=32, width=4)
    assert isinstance(m, X.XRayNet) and m.detector_name == 'sbi'
    real = FaceTensorSet((torch.rand(20, 3, 32, 32) * 255).byte(), pd.DataFrame({'label': [0] * 20, 'identity': 0, 'source': 't'}))
    cal = X.calibrate(m, real, q=0.9)
    p = score_faces(m, real, device='cpu')['score'].to_numpy()
    assert abs((p > 0.5).mean() - 0.1) < 0.06                                  # about 1 − q of real faces above τ
    path = save_detector(m, tmp_path / 'sbi.pt')
    m2 = load_detector(path, expect='sbi')
    assert float(m2.tau) == pytest.approx(cal['tau'])
    np.testing.assert_allclose(score_faces(m2, real, device='cpu')['score'], p, rtol=1e-5)
    fake = FaceTensorSet(real.x, real.df.assign(label=1))
    with pytest.raises(ValueError, match='real faces only'): X.calibrate(m, fake)


def test_interrupted_training_resumes_exactly(faces, tmp_path):
    ids = faces['identity'].numpy()
    tr = X.BlendSet(faces['images'][:16], faces['landmarks68'][:16], ids[:16], 'bi', n_donors=2)
    va = X.BlendSet(faces['images'][16:], faces['landmarks68'][16:], ids[16:], 'bi', n_donors=2)
    kw = dict(epochs=2, lr=3e-3, batch_size=8, device='cpu', seed=0, progress=False)
    def net(): torch.manual_seed(0); return X.XRayNet(32, 4)       # the same initial weights each time
    full = X.train_blend_detector(net(), tr, va, ckpt_dir=tmp_path / 'a', **kw)
    with pytest.raises(KeyboardInterrupt):
        X.train_blend_detector(net(), tr, va, ckpt_dir=tmp_path / 'b', callbacks=[InterruptAfter(1)], **kw)
    resumed = X.train_blend_detector(net(), tr, va, ckpt_dir=tmp_path / 'b', **kw)
    assert resumed.epochs_run == 2
    np.testing.assert_allclose(resumed.history['train_loss'], full.history['train_loss'], rtol=1e-5)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b)
