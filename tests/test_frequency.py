"""Frequency detectors (detect.frequency): the spectrum and its azimuthal average, Durall's detector, the DCT and the
F3-Net branches, FakeSpotter's coverage, bad input, the registry, checkpoints and exact resume."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from deepfake_course.detect import frequency as Q
from deepfake_course.detect.core import (DetectionData, FaceTensorSet, build_detector, list_detectors, save_detector,
                                         load_detector, score_faces, train_detector, detect)
from deepfake_course.train import InterruptAfter

pytestmark = pytest.mark.usefixtures('one_thread')


def smooth_faces(n, size=32, seed=0):
    "Smooth random pictures (a few low-frequency blobs), float in [0, 1], N×3×size×size."
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 4, 4, generator=g)
    return F.interpolate(small, size=size, mode='bicubic', align_corners=False).clamp(0, 1)


def upsampled(n, size=32, seed=0):
    "The same kind of pictures made at half size and doubled by zero insertion and a 2×2 box (nearest): a replica up top."
    return F.interpolate(smooth_faces(n, size // 2, seed) + 0.05 * torch.rand(n, 3, size // 2, size // 2,
                         generator=torch.Generator().manual_seed(seed + 1)), scale_factor=2, mode='nearest').clamp(0, 1)


def face_set(x, y, split):
    n = len(x)
    df = pd.DataFrame({'path': [''] * n, 'label': y, 'source': np.where(np.asarray(y) == 1, 'toy', 'synthfaces'),
                       'identity': np.arange(n), 'target_identity': -1, 'split': split})
    return FaceTensorSet((x * 255).round().byte(), df)


def toy_data(n=24, size=32, seed=0):
    "Real = smooth pictures, fake = up-sampled ones, for train, val and test."
    sets = {}
    for k, s in enumerate(('train', 'val', 'test')):
        x = torch.cat([smooth_faces(n, size, seed + 10 * k) + 0.05 * torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed + 10 * k + 5)),
                       upsampled(n, size, seed + 10 * k + 2)]).clamp(0, 1)
        sets[s] = face_set(x, [0] * n + [1] * n, s)
    return DetectionData(sets['train'], sets['val'], sets['test'], 'toy/0')


# ---- the spectrum

def test_log_spectrum_of_a_cosine_peaks_at_its_frequency():
    n, k = 32, 5
    x = torch.arange(n).double()
    g = (0.5 + 0.4 * torch.cos(2 * math.pi * k * x / n))[None, :].repeat(n, 1)      # varies along x only
    S = Q.log_spectrum(g[None].float().repeat(3, 1, 1)[None])[0]
    c = n // 2
    top = set(map(tuple, torch.nonzero(S >= S.flatten().topk(3).values[-1]).tolist()))
    assert top == {(c, c), (c, c + k), (c, c - k)}                   # DC and ±k along u (columns)


def test_constant_image_has_only_dc():
    x = torch.full((1, 3, 16, 16), 0.25)
    S = Q.log_spectrum(x)[0]
    assert S[8, 8] == pytest.approx(20 * math.log(float(Q.grey255(x).sum())), rel=1e-9)
    assert (S.flatten().sort().values[:-1] < -300).all()


def test_rings_and_azimuthal_average():
    r = Q.ring_index(64)
    assert r[32, 32] == 0 and (r == 0).sum() == 1 and r.max() == 45 and r[32, 0] == 32 and r[0, 32] == 32
    counts = torch.bincount(r.flatten())
    assert counts[1] == 8 and counts[2] == 16                         # ring 1: (±1, 0), (0, ±1), (±1, ±1); ring 2: radius 2 to 2.83
    prof = Q.azimuthal_average((r.double() * 2 + 1)[None])
    assert torch.allclose(prof[0], torch.arange(46).double() * 2 + 1)


def test_resample_matrix_is_exact_on_cubics_and_keeps_ends():
    xi = np.linspace(0, 1, 23)
    M = Q.resample_matrix(23, 40)
    for f in (lambda t: t ** 3 - 2 * t, lambda t: 3 + 0 * t):
        assert torch.allclose(M @ torch.tensor(f(xi)), torch.tensor(f(np.linspace(0, 1, 40))), atol=1e-9)
    with pytest.raises(ValueError, match='3 and 10'): Q.resample_matrix(3, 10)


def test_azimuthal_spectrum_shape_and_normalisation():
    x = smooth_faces(5, 32)
    p = Q.azimuthal_spectrum(x, 20)
    assert p.shape == (5, 20) and torch.allclose(p[:, 0], torch.ones(5).double())
    raw = Q.azimuthal_spectrum(x, 20, normalise=False)
    assert torch.allclose(raw / raw[:, :1], p)
    assert torch.allclose(Q.azimuthal_spectrum((x * 255).round().byte(), 20), Q.azimuthal_spectrum((x * 255).round() / 255, 20), atol=1e-4)  # uint8 0..255 = float 0..1 (float32 rounding)


@pytest.mark.parametrize('shape, msg', [((2, 3, 32, 40), '32×40'), ((1, 3, 7, 7), '7×7 px'), ((2, 3, 2, 32, 32), '(2, 3, 2, 32, 32)')])
def test_spectrum_bad_input_names_the_shape(shape, msg):
    with pytest.raises(Q.SpectrumInputError, match=msg.replace('(', r'\(').replace(')', r'\)')):
        Q.azimuthal_spectrum(torch.rand(*shape))


def test_minimum_size_is_accepted():
    m = Q.SPECTRUM_MIN_SIZE
    assert Q.azimuthal_spectrum(torch.rand(2, 3, m, m), 8).shape == (2, 8)
    with pytest.raises(Q.SpectrumInputError, match=str(m - 1)): Q.SpectrumDetector(input_size=m - 1)


# ---- Durall's detector

def test_spectrum_detector_separates_upsampled_pictures_and_round_trips(tmp_path):
    d = toy_data()
    m = build_detector('spectrum', input_size=32, n_points=16)
    with pytest.raises(RuntimeError, match='not fitted'): m(d.test.x[:2].float() / 255)
    info = Q.fit_spectrum_detector(m, d.train, d.val, Cs=(0.1, 1.0))
    assert info['chosen'] in (0.1, 1.0)
    s = score_faces(m, d.test, device='cpu')
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(s.label, s.score) > 0.95
    with pytest.raises(Q.SpectrumInputError, match='built for 32×32'): m(torch.rand(2, 3, 16, 16))
    again = load_detector(save_detector(m, tmp_path / 'spec.pt'), expect='spectrum')
    assert np.allclose(score_faces(again, d.test, device='cpu').score, s.score, atol=1e-6)
    img = (d.test.x[-1].permute(1, 2, 0)).numpy()
    out = detect(img, tmp_path / 'spec.pt', faces='none', expect='spectrum', device='cpu')
    assert out.score.iloc[0] == pytest.approx(float(s.score.iloc[-1]), abs=1e-5)


def test_linear_head_refuses_bad_labels_and_features():
    h = Q.LinearHead(4)
    with pytest.raises(ValueError, match=r'both 0 \(real\) and 1 \(fake\)'): h.fit(np.zeros((6, 4)), np.ones(6))
    with pytest.raises(ValueError, match=r'N×4'): h.fit(np.zeros((6, 3)), [0, 1] * 3)
    with pytest.raises(ValueError, match='C must be > 0'): h.fit(np.random.rand(6, 4), [0, 1] * 3, C=0)
    f = np.random.default_rng(0).normal(size=(80, 4)); y = (f[:, 2] > 0).astype(int)
    info = Q.fit_head_on_val(h, f[:60], y[:60], f[60:], y[60:], Cs=(1.0, 0.1))
    assert info[info['chosen']] == max(v for k, v in info.items() if k != 'chosen')
    assert int(h.linear.weight[0].abs().argmax()) == 2


# ---- DCT and F3-Net

@pytest.mark.parametrize('n', [2, 8, 10, 64])
def test_dct_matrix_is_orthonormal(n):
    D = Q.dct_matrix(n).double()
    assert torch.allclose(D @ D.T, torch.eye(n).double(), atol=1e-6)
    assert torch.allclose(D[0], torch.full((n,), 1 / math.sqrt(n)).double(), atol=1e-7)


@pytest.mark.parametrize('n, cuts', [(64, Q.fad_cuts(64)), (32, Q.fad_cuts(32)), (8, Q.lfs_cuts(8, 6)), (10, Q.lfs_cuts(10, 6))])
def test_bands_partition_the_spectrum(n, cuts):
    b = Q.diagonal_bands(n, cuts)
    assert torch.equal(b.sum(0), torch.ones(n, n))
    assert b[0, 0, 0] == 1 and b[-1, n - 1, n - 1] == 1
    idx = b.argmax(0)                                                  # the band index never falls as u + v grows
    for u in range(n):
        assert (idx[u].diff() >= 0).all()
    assert Q.fad_cuts(64)[1:3] == [22.0, 32]


def test_bad_band_cuts():
    with pytest.raises(ValueError, match=r'\[0.0, 4.0, 4.0\]'): Q.diagonal_bands(8, [0, 4, 4])


def test_fad_reconstructs_and_lfs_matches_a_hand_computed_window():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = Q.FAD(32, learnable=False)(x)
    assert y.shape == (2, 12, 32, 32)
    assert torch.allclose(y[:, :3] + y[:, 3:6] + y[:, 6:9], x, atol=1e-4) and torch.allclose(y[:, 9:], x, atol=1e-4)
    lfs = Q.LFS(8, 2, 6, learnable=False)
    img = torch.rand(1, 3, 32, 32)
    z = lfs(img)
    assert z.shape == (1, 6, 16, 16)
    g = F.pad((0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]) * 255, (3, 3, 3, 3))
    i, j = 4, 11
    X = torch.log10((lfs.D @ g[0, 2 * i:2 * i + 8, 2 * j:2 * j + 8] @ lfs.D.T).abs() + 1e-15)
    B = Q.diagonal_bands(8, Q.lfs_cuts(8, 6))
    assert torch.allclose(z[0, :, i, j], (X * B).sum((1, 2)) / B.sum((1, 2)), atol=1e-4)


def test_learnable_filters_start_near_the_bands_and_get_gradients():
    torch.manual_seed(0)
    fad = Q.FAD(16)
    f = fad.filters[0].filt()
    assert (f - fad.filters[0].base).abs().max() < 0.5                 # 2σ(w) − 1 with w ~ N(0, 0.1²) is small
    fad(torch.rand(2, 3, 16, 16)).sum().backward()
    assert all(flt.w.grad is not None and flt.w.grad.abs().sum() > 0 for flt in fad.filters)


@pytest.mark.parametrize('variant, n_feat', [('both', 16), ('fad', 8), ('lfs', 8)])
def test_f3net_variants(variant, n_feat):
    m = build_detector('f3net', input_size=16, width=1, variant=variant)
    assert m.features(torch.rand(3, 3, 16, 16)).shape == (3, n_feat) and m(torch.rand(3, 3, 16, 16)).shape == (3,)
    assert (m.fad is None) == (variant == 'lfs') and (m.lfs is None) == (variant == 'fad')


def test_f3net_bad_input():
    with pytest.raises(ValueError, match="'rgb'"): Q.F3Net(variant='rgb')
    with pytest.raises(ValueError, match='got 15'): Q.F3Net(input_size=15)
    with pytest.raises(ValueError, match=r'built for 16×16.*\(2, 3, 32, 32\)'): Q.F3Net(16, 2)(torch.rand(2, 3, 32, 32))


def test_f3net_training_resumes_exactly(tmp_path):
    d = toy_data(n=8, size=16)
    kw = dict(epochs=2, lr=3e-3, batch_size=8, device='cpu', seed=0, opt='adam', progress=False)
    def net(): torch.manual_seed(0); return build_detector('f3net', input_size=16, width=2)
    full = train_detector(net(), d, ckpt_dir=tmp_path / 'a', **kw)
    with pytest.raises(KeyboardInterrupt):
        train_detector(net(), d, ckpt_dir=tmp_path / 'b', callbacks=[InterruptAfter(1)], **kw)
    resumed = train_detector(net(), d, ckpt_dir=tmp_path / 'b', **kw)
    assert np.allclose(resumed.history['train_loss'].to_numpy(), full.history['train_loss'].to_numpy(), atol=1e-5)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


# ---- FakeSpotter

def test_fakespotter_thresholds_coverage_and_frozen_net(tmp_path):
    from deepfake_course.quality import SmallCNN
    torch.manual_seed(0)
    d = toy_data(n=12, size=32)
    spot = Q.FakeSpotter.from_face_net(SmallCNN(3, 4), input_size=32)
    spot.detector_name = 'fakespotter'
    x = d.train.x.float() / 255
    with pytest.raises(RuntimeError, match='thresholds not set'): spot.coverage(x)
    acts = spot.activations(x)
    T = spot.set_thresholds(x)
    assert torch.allclose(T, torch.stack([a.mean() for a in acts]).float(), atol=1e-5)
    cov = spot.coverage(x)
    assert cov.shape == (len(x), 4 + 8 + 16 + 32) and cov.min() >= 0 and cov.max() <= 1
    assert torch.allclose(cov[:, 4:12], (acts[1] > T[1]).float().mean((2, 3)))
    assert not any(p.requires_grad for p in spot.net.parameters())
    spot.train(); assert not spot.net.training
    with pytest.raises(ValueError, match='built for 32×32'): spot.activations(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r'\(5,\)'): Q.FakeSpotter(layers=(5,))


def test_fakespotter_fits_and_round_trips(tmp_path):
    from deepfake_course.quality import SmallCNN
    torch.manual_seed(0)
    d = toy_data(n=16, size=32)
    face = SmallCNN(3, 4)
    m = build_detector('fakespotter', input_size=32, n_ids=3, width=4)
    m.net.load_state_dict(face.state_dict())
    with pytest.raises(RuntimeError, match='not fitted'): m(d.test.x[:2].float() / 255)
    info = Q.fit_fakespotter(m, d.train, d.val, Cs=(1.0,))
    assert info['chosen'] == 1.0
    s = score_faces(m, d.test, device='cpu')
    again = load_detector(save_detector(m, tmp_path / 'fs.pt'), expect='fakespotter')
    assert torch.allclose(again.T, m.T)
    assert np.allclose(score_faces(again, d.test, device='cpu').score, s.score, atol=1e-6)


def test_face_net_is_the_identity_judge_on_whole_faces():
    x = smooth_faces(12, 32); ids = np.repeat([3, 7, 9], 4)
    net = Q.train_face_net(x, ids, epochs=1, width=4, device='cpu')
    assert net.judge == 'identity-judge' and net.judge_config['max_blur'] == 0 and net.region is None
    assert net.classes.tolist() == [3, 7, 9]
    spot = Q.FakeSpotter.from_face_net(net, 32)
    assert torch.equal(spot.net.features[0].weight, net.features[0].weight)


def test_registered():
    names = set(list_detectors()['name'])
    assert {'spectrum', 'f3net', 'fakespotter'} <= names
