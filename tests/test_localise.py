"""Unit tests of deepfake_course.detect.localise (nbs/39b_localisers.ipynb): residual filters, the Z-score layer,
output shapes, overfitting a planted-rectangle set, the scoring table and bad input."""
import time
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepfake_course.detect import localise as L


def planted(n, side=32, seed=0):
    "A rectangle of a noisier texture pasted into a smooth one, with its mask (test data only)."
    g = torch.Generator().manual_seed(seed)
    tex = lambda noise: F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(side, side), mode='bilinear',
                                      align_corners=False) + noise * torch.randn(n, 3, side, side, generator=g)
    a, b = tex(0.01), tex(0.08)
    m = torch.zeros(n, side, side, dtype=torch.bool)
    for i in range(n):
        h, w = torch.randint(side // 4, side // 2 + 1, (2,), generator=g).tolist()
        t, l = int(torch.randint(0, side - h + 1, (1,), generator=g)), int(torch.randint(0, side - w + 1, (1,), generator=g))
        m[i, t:t + h, l:l + w] = True
    return torch.where(m[:, None], b, a).clamp(0, 1), m


@pytest.fixture(autouse=True)
def _threads(one_thread): yield


def test_srm_kernels_are_high_pass():
    srm = L.SRMConv()
    flat = torch.full((2, 3, 20, 20), 0.37)
    assert srm(flat)[..., 2:-2, 2:-2].abs().max() < 1e-6          # a constant image: zero response away from the border
    ramp = torch.linspace(0, 1, 20).view(1, 1, 1, 20).expand(1, 3, 20, 20)
    assert srm(ramp)[..., 2:-2, 2:-2].abs().max() < 1e-5          # second-order kernels: a linear ramp too
    noisy = flat + 0.05 * torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    assert srm(noisy)[..., 2:-2, 2:-2].abs().mean() > 1e-3        # ... but noise passes


def _bayar_ok(w, tol=1e-5):
    k = w.shape[-1] // 2
    centre = w[:, :, k, k]
    off = w.sum((2, 3)) - centre
    return bool((centre + 1).abs().max() < tol and (off - 1).abs().max() < tol)


def test_bayar_constraint_holds_after_a_step():
    torch.manual_seed(0)
    conv = L.BayarConv2d(3, 4, 5)
    assert _bayar_ok(conv.weight.detach())
    x = torch.rand(2, 3, 16, 16)
    before = conv.weight.detach().clone()
    conv(x).pow(2).mean().backward()
    with torch.no_grad(): conv.weight -= 0.5 * conv.weight.grad      # a plain gradient step
    assert not _bayar_ok(conv.weight.detach())                   # the raw step breaks the constraint ...
    conv(x)                                                      # ... and the next use re-imposes it
    assert _bayar_ok(conv.weight.detach())
    assert (conv.weight.detach() - before).abs().max() > 1e-4    # the step did change the filter


def test_zscore_responds_to_a_planted_outlier():
    g = torch.Generator().manual_seed(0)
    f = 0.01 * torch.randn(1, 6, 48, 48, generator=g)
    f[..., 30:36, 10:16] += 1.0
    z = L.ZScore((7, 15, 31))(f)
    assert z.shape == (1, 3, 6, 48, 48)
    inside, outside = z[..., 31:35, 11:15].abs().mean(), z[..., :8, 30:].abs().mean()
    assert inside > 20 * outside, (inside, outside)
    with pytest.raises(ValueError, match='odd'): L.ZScore((6,))


@pytest.mark.parametrize('name', ['rgbn', 'mantranet', 'span', 'pscc'])
def test_output_is_input_sized(name):
    torch.manual_seed(0)
    model = L.LOCALISERS[name](width=4)
    x = torch.rand(2, 3, 40, 48)
    out = model(x)
    assert out.shape[0] == 2 and out.shape[-2:] == (40, 48)
    assert model.prob_maps(x).shape == (2, 40, 48)
    assert torch.isfinite(model.loss(out, torch.zeros(2, 40, 48))).item()


def test_mfcnn_map_is_input_sized():
    m = L.MFCNN(width=4, patch=16, stride=8)
    assert m(torch.rand(3, 3, 16, 16)).shape == (3, 1)
    assert m.prob_maps(torch.rand(2, 3, 40, 48)).shape == (2, 40, 48)
    with pytest.raises(ValueError, match='smaller than the patch'): m.prob_maps(torch.rand(1, 3, 12, 12))


def test_rgbn_overfits_planted_rectangles(tmp_path):
    x, m = planted(8, 32, seed=1)
    torch.manual_seed(0)
    c0 = time.process_time()
    r = L.train_localiser(L.RGBN(width=6), (x, m), (x, m), epochs=15, lr=1e-2, batch_size=4, progress=False,
                          ckpt_dir=tmp_path / 'ck')
    p = r.model.prob_maps(x)
    f1 = L.pixel_f1_iou(p >= L.best_threshold(p, m), m)[0].mean()
    assert f1 > 0.8, f1
    assert time.process_time() - c0 < 15        # CPU time: a few seconds, whatever else the machine is running
    # the checkpoint is the course's one format, named after the model
    from deepfake_course.train import read_checkpoint, load_checkpoint, CheckpointError
    assert read_checkpoint(tmp_path / 'ck' / 'best.pt')['name'] == 'rgbn'
    fresh = L.RGBN(width=6); load_checkpoint(tmp_path / 'ck' / 'best.pt', fresh, expect='rgbn')
    assert torch.allclose(fresh.eval()(x[:2]), r.model.eval()(x[:2]), atol=1e-5)
    with pytest.raises(CheckpointError): load_checkpoint(tmp_path / 'ck' / 'best.pt', L.RGBN(width=6), expect='pscc')


def test_pixel_metrics_and_threshold():
    m = torch.zeros(2, 8, 8, dtype=torch.bool); m[0, 2:6, 2:6] = True; m[1, :4] = True
    pred = m.clone(); pred[0, 2:4] = False                        # half of the first mask found, no false positive
    f1, iou = L.pixel_f1_iou(pred, m)
    assert np.allclose(f1, [2 * 8 / 24, 1.0]) and np.allclose(iou, [0.5, 1.0])
    f1, iou = L.pixel_f1_iou(~m, m)
    assert np.allclose(f1, 0) and np.allclose(iou, 0)
    t = L.best_threshold(m.float() * 0.5 + 0.25, m)
    assert 0.25 < t <= 0.75
    with pytest.raises(ValueError, match='non-empty mask'): L.best_threshold(torch.rand(2, 8, 8), torch.zeros(2, 8, 8))


def test_image_score_top_k():
    p = torch.zeros(4, 10, 10); p[1, 0, 0] = 1; p[2, :2] = 0.5
    s = L.image_score(p, k=0.0)
    assert np.allclose(s, [0, 1, 0.5, 0])
    assert np.allclose(L.image_score(p, k=0.1), [0, 0.1, 0.5, 0])


def test_localisation_table_bootstraps_source_images():
    g = np.random.default_rng(0)
    masks = np.zeros((10, 8, 8), bool); masks[:, 2:5, 2:5] = True
    good = masks + 0.1 * g.random(masks.shape)
    rows = L.localisation_scores(good, masks, 0.1 * g.random(masks.shape), groups=[f's{i}' for i in range(10)],
                                 threshold=0.5, k=0.05, method='m', tamper='splice', condition='clean')
    tab = L.localisation_table(rows, n_boot=30)
    r = tab.loc[('m', 'splice', 'clean')]
    assert r.n_groups == 10 and r.auroc == 1.0 and r.f1 == 1.0 and r.iou == 1.0
    assert r.f1_lo <= r.f1 <= r.f1_hi
    bad = L.localisation_scores(np.zeros_like(good), masks, np.zeros_like(good), [f's{i}' for i in range(10)], 0.5,
                                method='m', tamper='splice', condition='clean')
    assert L.localisation_table(bad, n_boot=20).f1.iloc[0] == 0.0


def test_bad_input_errors():
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match='do not match'): L.check_masks(torch.zeros(2, 16, 15), x)
    with pytest.raises(ValueError, match='do not match'): L.MaskSet(x, torch.zeros(2, 15, 16))
    with pytest.raises(ValueError, match='differ'): L.bce_dice_loss(torch.zeros(2, 16, 16), torch.zeros(2, 16, 15))
    with pytest.raises(ValueError, match='differ'): L.localisation_scores(np.zeros((2, 16, 16)), np.zeros((2, 8, 8)),
                                                                         np.zeros((2, 16, 16)), ['a', 'b'], 0.5)
    for name in ['rgbn', 'mantranet', 'span', 'pscc']:
        with pytest.raises(ValueError, match=r'N×3×H×W.*4 channel'): L.LOCALISERS[name](width=4)(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match='1 channel'): L.MFCNN(width=4)(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match='smaller than'): L.PSCCNet(width=4)(torch.rand(1, 3, 8, 8))
    # the detector interface converts grey and RGBA (documented), and refuses other channel counts
    det = L.DeepLocaliser(L.RGBN(width=4), 'rgbn')
    assert det.score_map(torch.rand(16, 16)).shape == (16, 16)
    assert det.score_map(torch.rand(4, 16, 16)).shape == (16, 16)
    assert isinstance(det.score(np.zeros((16, 16, 3), np.uint8)), float)
    with pytest.raises(ValueError, match='C in'): det.score_map(torch.rand(2, 16, 16))


@pytest.mark.parametrize('kind', ['rgbn', 'mfcnn'])
def test_interrupted_training_resumes_exactly(tmp_path, kind):
    "Random crops, flips and patches come from the RNG that fit checkpoints: a run cut after epoch 2 and resumed equals an uncut one."
    from deepfake_course.train import InterruptAfter
    x, m = planted(6, 32, seed=2)
    make = lambda: L.RGBN(width=4) if kind == 'rgbn' else L.MFCNN(width=4, patch=16, stride=8, hidden=8)
    kw = dict(epochs=4, lr=5e-3, batch_size=4, progress=False, **({'crop': 16} if kind == 'rgbn' else {}))
    torch.manual_seed(0); full = L.train_localiser(make(), (x, m), (x, m), ckpt_dir=tmp_path / 'full', **kw)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        L.train_localiser(make(), (x, m), (x, m), ckpt_dir=tmp_path / 'cut', callbacks=[InterruptAfter(2)], **kw)
    torch.manual_seed(123); torch.rand(77)  # the resumed process starts from another RNG state
    resumed = L.train_localiser(make(), (x, m), (x, m), ckpt_dir=tmp_path / 'cut', **kw)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()): assert torch.equal(a, b)
