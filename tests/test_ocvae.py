"""OC-FakeDect (detect.ocvae): the VAE, its two scores, the real-validation threshold, the registry, exact resume."""
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from deepfake_course.detect.core import (FaceTensorSet, DetectionData, build_detector, list_detectors, predict_scores,
                                         save_detector, load_detector, score_faces, train_detector, detect)
from deepfake_course.detect.ocvae import ConvEncoder, ConvDecoder, OCFakeDect, oc_loss, raw_scores, calibrate, oc1_from
from deepfake_course.train import InterruptAfter

pytestmark = pytest.mark.usefixtures('one_thread')
KW = dict(input_size=32, hidden=32, latent=8, width=4)


def smooth_faces(n, size=32, seed=0):
    "Smooth images (random low-frequency blobs), uint8: what the tiny VAE learns as 'real'."
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return (torch.nn.functional.interpolate(low, size=size, mode='bilinear', align_corners=False) * 255).round().byte()


def face_set(x, label=0, identity=0, split='train'):
    return FaceTensorSet(x, pd.DataFrame({'path': '', 'label': label, 'identity': identity, 'target_identity': -1,
                                          'source': 'test', 'split': split}, index=range(len(x))))


def real_data(n_train=64, n_val=32, seed=0):
    tr, va = face_set(smooth_faces(n_train, seed=seed)), face_set(smooth_faces(n_val, seed=seed + 1), split='val')
    return DetectionData(tr, va, va, 'none/none', note='real only')


def test_shapes_and_paper_sizes():
    enc, dec = ConvEncoder(32, 32, 8, 4), ConvDecoder(32, 32, 8, 4)
    mu, lv = enc(torch.rand(3, 3, 32, 32))
    assert mu.shape == lv.shape == (3, 8)
    assert dec(mu).shape == (3, 3, 32, 32)
    assert ConvEncoder(100, 1024, 1024, 16).conv(torch.rand(1, 3, 100, 100)).shape == (1, 16, 25, 25)  # the paper's 10,000
    with pytest.raises(ValueError, match='multiple of 4'): ConvEncoder(30)


def test_wrong_size_names_both_sizes():
    m = build_detector('ocfakedect2', **KW).eval()
    with pytest.raises(ValueError, match=r'trained on 32×32 faces.*48×48'):
        m(torch.rand(2, 3, 48, 48))
    with pytest.raises(ValueError, match=r'ocfakedect2: trained on 32×32'):
        predict_scores(m, torch.rand(2, 3, 64, 64), device='cpu')
    # score_faces resizes to the model's size, so the same faces score fine through it
    assert len(score_faces(m, face_set(smooth_faces(3, 64)), device='cpu')) == 3


def test_loss_refuses_fakes_and_e2_does_not_train_the_vae():
    torch.manual_seed(0)
    m = OCFakeDect(2, **KW)
    x = torch.rand(4, 3, 32, 32)
    with pytest.raises(ValueError, match='real faces only: this batch holds 1 fake'):
        oc_loss(m)(m(x), torch.tensor([0., 0, 1, 0]))
    m(x); m.terms['latent'].sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in [*m.encoder.parameters(), *m.decoder.parameters()])
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in m.encoder2.parameters())
    with pytest.raises(ValueError, match='variant must be 1 or 2'): OCFakeDect(0)


def test_registry_and_save_load_keep_threshold(tmp_path):
    names = set(list_detectors()['name'])
    assert {'ocfakedect1', 'ocfakedect2'} <= names
    m = build_detector('ocfakedect2', **KW).eval()
    assert m.encoder2 is not None and build_detector('ocfakedect1', **KW).encoder2 is None
    cal = calibrate(m, face_set(smooth_faces(40)), q=0.9)
    assert cal['tau'] != 1.0
    back = load_detector(save_detector(m, tmp_path / 'oc.pt'), expect='ocfakedect2')
    assert float(back.tau) == pytest.approx(cal['tau']) and float(back.scale) == pytest.approx(cal['scale'])
    x = smooth_faces(5, seed=3)
    np.testing.assert_allclose(predict_scores(back, x, 'cpu'), predict_scores(m, x, 'cpu'), rtol=1e-6)


def test_calibrate_threshold_is_the_real_quantile():
    torch.manual_seed(0)
    m = build_detector('ocfakedect2', **KW).eval()
    real = face_set(smooth_faces(200, seed=5))
    cal = calibrate(m, real, q=0.95)
    s = raw_scores(m, real)['oc2']
    assert cal['tau'] == pytest.approx(np.quantile(s, 0.95))
    p = predict_scores(m, real.x, 'cpu')
    assert (p > 0.5).sum() == (s > cal['tau']).sum()        # p(fake) > 0.5 exactly above τ
    assert abs((p > 0.5).mean() - 0.05) < 0.01
    with pytest.raises(ValueError, match='real faces only'): calibrate(m, face_set(smooth_faces(4), label=1))
    with pytest.raises(ValueError, match='q must be in'): calibrate(m, real, q=1.5)


def test_oc1_from_is_the_same_vae():
    torch.manual_seed(0)
    m2 = build_detector('ocfakedect2', **KW).eval()
    m1 = oc1_from(m2).eval()
    assert m1.detector_name == 'ocfakedect1' and m1.encoder2 is None
    x = torch.rand(6, 3, 32, 32)
    np.testing.assert_allclose(raw_scores(m1, x)['oc1'], raw_scores(m2, x)['oc1'], rtol=1e-6)


def test_trained_vae_flags_what_it_cannot_reconstruct():
    "Trained on smooth images only, the image error ranks noisy images above unseen smooth ones; E₂ learns its inverse."
    torch.manual_seed(0); m = build_detector('ocfakedect2', **KW)
    d = real_data(128, 32)
    def latent_term(model):   # E₂'s loss on the validation faces (training mode: the loss it minimises; fixed noise)
        was = {k: v.clone() for k, v in model.state_dict().items()}
        model.train(); torch.manual_seed(1)
        with torch.no_grad(): model(d.val.x.float() / 255)
        model.load_state_dict(was)     # leave the BatchNorm statistics as they were
        return float(model.terms['latent'].mean())
    before = latent_term(m)
    res = train_detector(m, d, epochs=6, lr=3e-3, batch_size=32, device='cpu', loss=oc_loss(m), opt='adam', schedule=None, seed=0)
    assert res.history['train_loss'].iloc[-1] < res.history['train_loss'].iloc[0]
    m = res.model.eval()
    calibrate(m, d.val)
    test_real = smooth_faces(32, seed=9)
    fake = (torch.rand(32, 3, 32, 32) * 255).byte()
    s_r, s_f = raw_scores(m, test_real), raw_scores(m, fake)
    y = np.r_[np.zeros(32), np.ones(32)]
    assert roc_auc_score(y, np.r_[s_r['oc1'], s_f['oc1']]) > 0.95
    assert latent_term(m) < 0.5 * before       # E₂ learnt to map reconstructions of real faces back to their μ
    m1 = oc1_from(m).eval(); calibrate(m1, d.val)
    assert (predict_scores(m1, fake, 'cpu') > 0.5).mean() > 0.9      # beyond τ: called fake
    assert (predict_scores(m1, test_real, 'cpu') > 0.5).mean() < 0.3
    # detect() on a face crop uses the calibrated logit too
    out = detect(fake[0].permute(1, 2, 0).numpy(), m1, faces='none', device='cpu')
    assert out['score'].iloc[0] > 0.5 and out['detector'].iloc[0] == 'ocfakedect1'


def test_interrupted_training_resumes_exactly(tmp_path):
    d = real_data(64, 16)
    kw = dict(epochs=3, lr=1e-3, batch_size=16, device='cpu', opt='adam', schedule=None, seed=0)
    from deepfake_course.detect.core import Augment
    aug = Augment(flip=True, shift=0)
    torch.manual_seed(0); full = build_detector('ocfakedect2', **KW)
    ref = train_detector(full, d, loss=oc_loss(full), augment=aug, ckpt_dir=tmp_path / 'a', **kw)
    torch.manual_seed(0); m = build_detector('ocfakedect2', **KW)
    with pytest.raises(KeyboardInterrupt):
        train_detector(m, d, loss=oc_loss(m), augment=aug, ckpt_dir=tmp_path / 'b', callbacks=[InterruptAfter(1)], **kw)
    torch.manual_seed(123); m2 = build_detector('ocfakedect2', **KW)   # a fresh process: other initial weights
    res = train_detector(m2, d, loss=oc_loss(m2), augment=aug, ckpt_dir=tmp_path / 'b', **kw)
    assert res.epochs_run == 3
    np.testing.assert_allclose(res.history['train_loss'], ref.history['train_loss'], rtol=1e-6)
    for (k, a), b in zip(ref.model.state_dict().items(), res.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=f'{k} differs after resuming')
    # resuming an ocfakedect2 run with an ocfakedect1 model is refused, naming both
    from deepfake_course.train import CheckpointError
    m1 = build_detector('ocfakedect1', **KW)
    with pytest.raises(CheckpointError, match='ocfakedect'):
        train_detector(m1, d, loss=oc_loss(m1), ckpt_dir=tmp_path / 'b', **dict(kw, epochs=4))
