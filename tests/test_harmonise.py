"""Unit tests of deepfake_course.generate.harmonise (20c_harmonise): composites, the harmonisation network and its
training, the merge and colour measures, the paired AUROC difference; and the 'faceswap-hq' source in bench."""
import numpy as np
import pytest
import torch

from deepfake_course.generate import harmonise as H


@pytest.fixture(scope='module')
def faces():
    from deepfake_course.data.synth import render_faces
    return render_faces([0, 1, 2], 4, size=32, seed=3)


def test_soft_alpha_erodes_and_feathers(faces):
    m = (faces['mask'] > 0.5).float()
    torch.testing.assert_close(H.soft_alpha(m), m)
    e = H.soft_alpha(m, erode=2)
    assert (e <= m).all() and e.sum() < m.sum()
    b = H.soft_alpha(m, blur=5)
    assert ((b > 0) & (b < 1)).any() and b.min() >= 0 and b.max() <= 1


def test_recolour_is_seeded_and_scaled(faces):
    x = faces['images']
    a, b = H.random_recolour(x, x, faces['mask'], faces['mask'], seed=4), H.random_recolour(x, x, faces['mask'], faces['mask'], seed=4)
    assert torch.equal(a, b) and (a - x).abs().mean() > 0.01
    assert not torch.equal(a, H.random_recolour(x, x, faces['mask'], faces['mask'], seed=5))
    weak = H.random_recolour(x, strength=0.2, seed=4)
    assert (weak - x).abs().mean() < (H.random_recolour(x, strength=1.0, seed=4) - x).abs().mean()


def test_composites_touch_only_the_face(faces):
    c, a, t = H.make_composites(faces['images'], faces['mask'], n_per=2, seed=0)
    assert c.shape == (24, 3, 32, 32) and torch.equal(t[:12], faces['images']) and torch.equal(t[12:], faces['images'])
    bg = (a < 1e-6).expand_as(c)
    torch.testing.assert_close(c[bg], t[bg])
    assert (c - t).abs()[~bg].mean() > 0.01
    with pytest.raises(ValueError, match='mask is empty'): H.make_composites(faces['images'], torch.zeros_like(faces['mask']))
    with pytest.raises(ValueError, match='do not match'): H.make_composites(faces['images'], faces['mask'][:5])


def test_harmonynet_starts_as_identity_and_keeps_the_background(faces):
    torch.manual_seed(0)
    net = H.HarmonyNet(width=4, depth=2).eval()
    c, a, t = H.make_composites(faces['images'], faces['mask'], n_per=1, seed=0)
    x = torch.cat([c, a], 1)
    with torch.no_grad(): torch.testing.assert_close(net(x), c)
    with torch.no_grad(): net.out.weight.normal_(0, 0.5)          # a net that changes things: still only inside the mask
    with torch.no_grad(): y = net(x)
    bg = (a < 1e-6).expand_as(c)
    torch.testing.assert_close(y[bg], c[bg]); assert (y - c).abs()[~bg].max() > 1e-3
    with pytest.raises(ValueError, match='RGB \\+ mask'): net(c)
    with pytest.raises(ValueError, match='divisible by 4'): net(torch.zeros(1, 4, 30, 30))
    with pytest.raises(ValueError, match='harmonise: alpha'): H.harmonise(net, c, a[:3])


def test_fmse_is_normalised_by_the_foreground():
    t = torch.zeros(2, 3, 32, 32)
    small, big = torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32)
    small[..., :12, :12] = 1; big[..., :24, :24] = 1
    m = torch.cat([small, big])
    out = t + 0.1 * m                                              # the same error per foreground pixel
    per = [float(H.fmse_loss(out[i:i + 1], torch.cat([t, m], 1)[i:i + 1])) for i in range(2)]
    assert per[0] == pytest.approx(per[1], rel=1e-5) and per[0] == pytest.approx(0.01, rel=1e-4)
    assert float(H.fmse_loss(t, torch.cat([t, m], 1))) == 0
    r = H.harmony_metrics(out, t, m)
    assert r['fmse'] == pytest.approx([0.01 * 255 ** 2] * 2, rel=1e-4) and (r['mse'] < r['fmse']).all()


def test_train_harmoniser_learns_and_resumes_exactly(faces, tmp_path):
    c, a, t = H.make_composites(faces['images'], faces['mask'], n_per=2, seed=0)
    tr, va = (c[:16], a[:16], t[:16]), (c[16:], a[16:], t[16:])
    kw = dict(width=4, depth=2, batch_size=4, lr=3e-3, device='cpu', seed=0, progress=False)
    full = H.train_harmoniser(tr, va, epochs=2, ckpt_dir=tmp_path / 'full', **kw)
    assert full.history['train_loss'].iloc[-1] < full.history['train_loss'].iloc[0]
    from deepfake_course.train import InterruptAfter
    with pytest.raises(KeyboardInterrupt):                                            # interrupted after its first epoch ...
        H.train_harmoniser(tr, va, epochs=2, ckpt_dir=tmp_path / 'cut', callbacks=[InterruptAfter(1)], **kw)
    torch.manual_seed(123)                                                            # (another RNG state: all comes from the checkpoint)
    resumed = H.train_harmoniser(tr, va, epochs=2, ckpt_dir=tmp_path / 'cut', **kw)   # ... and continued
    assert resumed.history.drop(columns='time').equals(full.history.drop(columns='time'))
    for p, q in zip(full.model.state_dict().values(), resumed.model.state_dict().values()): torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match='one non-zero length'): H.train_harmoniser((c[:4], a[:3], t[:4]), va, epochs=1, **kw)


def test_leak_and_colour_measures(faces):
    x, m = faces['images'], faces['mask']
    assert (H.leak_outside(x, x, m) == 0).all()
    assert H.leak_outside(x, (x + 0.1).clamp(0, 1), m) == pytest.approx(np.full(12, 25.5), abs=3)
    with pytest.raises(ValueError, match='disagree'): H.leak_outside(x, x[:3], m)
    assert H.face_colour_error(x, x, m, m) == pytest.approx(np.zeros(12), abs=1e-4)
    assert (H.face_colour_error((x * 0.8), x, m, m) > 2).all()


def test_auroc_drop_is_paired_and_bounded():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40), np.ones(40)]; u = np.tile(np.arange(8), 10)
    good = y + rng.normal(0, 0.3, 80); noise = rng.normal(0, 1, 80)
    same = H.auroc_drop(y, good, good, u, n_boot=200)
    assert same['drop'] == 0 and same['low'] == 0 and same['high'] == 0
    r = H.auroc_drop(y, good, noise, u, n_boot=200)
    assert r['drop'] > 0.3 and r['low'] <= r['drop'] <= r['high'] and r['low'] > 0 and r['n_units'] == 8
    with pytest.raises(ValueError, match='lengths differ'): H.auroc_drop(y, good, noise[:-1], u)
    with pytest.raises(ValueError, match='real \\(0\\) and fake'): H.auroc_drop(np.ones(80), good, noise, u)


def test_faceswap_hq_is_a_course_source():
    from deepfake_course import bench
    from deepfake_course.generalise import family_of
    assert 'faceswap-hq' in bench.FAKE_SOURCES and family_of('faceswap-hq') == 'autoencoder-swap'
    cfg = bench.main_config(True, extra_sources=['faceswap-hq'])
    assert cfg['extra_sources'] == ['faceswap-hq'] and all(k in cfg for k in bench.HARMONISER_KEYS)
    with pytest.raises(ValueError, match='unknown setting'): bench.main_config(True, harm_size=3)
