"""GAN fingerprint attribution (detect.attribution): the up-sampling DCGANs, the network and its detector view, training
with exact resume, fingerprints, robustness conditions, the open-set rule, the accuracy table, the data and bad input."""
import operator
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from deepfake_course.detect import attribution as A
from deepfake_course.detect.core import build_detector, save_detector, load_detector, list_detectors
from deepfake_course.data.fakes import FakeSetWriter, read_fake_set
from deepfake_course.data.manifest import LeakError
from deepfake_course.generate.gan import DCGANGenerator, build_generator
from deepfake_course.train import InterruptAfter, read_checkpoint

pytestmark = pytest.mark.usefixtures('one_thread')
CLASSES = [A.REAL, 'checker', 'blocky']


def _toy(n_per: int, size: int = 16, seed: int = 0):
    """Three toy sources with known traces: smooth noise ('real'), the same plus a fixed checkerboard ('checker'),
    nearest-neighbour up-sampled noise ('blocky'). uint8 images and their rows (each image its own group)."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(3 * n_per, 3, size // 4, size // 4, generator=g), size=size, mode='bilinear', align_corners=False)
    cb = ((torch.arange(size)[:, None] + torch.arange(size)[None]) % 2).float() * 0.2 - 0.1
    x = base.clone()
    x[n_per:2 * n_per] = (x[n_per:2 * n_per] + cb).clamp(0, 1)
    x[2 * n_per:] = F.interpolate(torch.rand(n_per, 3, size // 2, size // 2, generator=g), size=size, mode='nearest')
    src = [c for c in CLASSES for _ in range(n_per)]
    df = pd.DataFrame({'path': '', 'label': [int(s != A.REAL) for s in src], 'source': src, 'identity': -1,
                       'target_identity': -1, 'split': 'test'})
    return (x * 255).round().byte(), df


def _set(n_per, seed=0, classes=CLASSES, size=16):
    x, df = _toy(n_per, size, seed)
    return A.SourceSet(x, df, classes)


def test_upsampling_generators():
    z = torch.randn(3, 100)
    torch.manual_seed(0); a = DCGANGenerator(ngf=8, size=16).eval()
    torch.manual_seed(0); b = A.UpsampleDCGANGenerator(ngf=8, size=16, upsampling='transpose').eval()
    assert torch.allclose(a(z), b(z), atol=1e-6)                                  # 'transpose' is the DCGAN paper's generator
    for u in ('nearest', 'bilinear'):
        g = A.UpsampleDCGANGenerator(ngf=8, size=16, upsampling=u)
        assert g(z).shape == (3, 3, 16, 16) and not any(isinstance(m, torch.nn.ConvTranspose2d) for m in g.net[3:])
    with pytest.raises(ValueError, match="'bicubic'"): A.UpsampleDCGANGenerator(upsampling='bicubic')
    tr = build_generator('dcgan-bilinear', torch.rand(8, 3, 16, 16), size=16, ngf=4, ndf=4)
    assert tr.cfg['batch'] == 32 and tr.G.upsampling == 'bilinear' and tr.sample(2).shape == (2, 3, 16, 16)
    assert A.variant_name('nearest') == 'dcgan-nearest'
    with pytest.raises(ValueError, match="'cubic'"): A.variant_name('cubic')


def test_network_detector_view_and_registry(tmp_path):
    net = build_detector('attribution', sources=CLASSES, input_size=16, fmap_base=32, fmap_max=16)
    x = torch.rand(5, 3, 16, 16)
    out = net(x)
    p = net.last_logits.softmax(1)
    assert out.shape == (5,) and torch.allclose(torch.sigmoid(out), 1 - p[:, 0], atol=1e-5)   # p(fake) = 1 − p(real)
    assert set(net.attribute(x)) <= set(CLASSES)
    with pytest.raises(ValueError, match='built for 16×16'): net(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="'real'"): A.AttributionNet(['a', 'b'], 16)
    with pytest.raises(ValueError, match='distinct'): A.AttributionNet([A.REAL, 'a', 'a'], 16)
    with pytest.raises(ValueError, match='unknown'): A.AttributionNet([A.REAL, A.UNKNOWN], 16)
    with pytest.raises(TypeError, match='tensor'): net.predict([1, 2])
    assert 'attribution' in set(list_detectors()['name'])
    net.open_tau.fill_(0.4); net.open_kind.fill_(0)
    m2 = load_detector(save_detector(net, tmp_path / 'a.pt'), expect='attribution')
    assert m2.sources == CLASSES and float(m2.open_tau) == pytest.approx(0.4) and int(m2.open_kind) == 0
    assert torch.allclose(m2(x), net.eval()(x), atol=1e-6)


def test_loss_and_betas():
    net = A.AttributionNet(CLASSES, 16, 32, 16)
    y = torch.tensor([0, 2, 1])
    out = net(torch.rand(3, 3, 16, 16))
    assert torch.allclose(A.attribution_loss(net)(out, y), F.cross_entropy(net.last_logits, y))
    with pytest.raises(ValueError, match='outside'): A.attribution_loss(net)(out, torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match='two numbers'): A.AdamBetas((0.5,))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A network trained on the toy sources (5 epochs), its sets and its checkpoint folder."
    tr, va, te = _set(48, 0), _set(32, 1), _set(24, 2)
    ck = tmp_path_factory.mktemp('attr') / 'ck'
    torch.manual_seed(0)
    res = A.train_attribution(A.AttributionNet(CLASSES, 16, 32, 16), tr, va, epochs=5, lr=5e-3, batch_size=16, device='cpu',
                              seed=0, progress=False, ckpt_dir=ck)
    return res.model.eval(), tr, va, te, ck


def test_learns_toy_fingerprints(trained):
    net, tr, va, te, ck = trained
    acc = (te.y.numpy() == net.predict(te)['probs'].argmax(1).numpy()).mean()
    assert acc > 0.8, f'toy attribution accuracy {acc:.2f} (chance 0.33)'         # checkerboard, blocks and smooth told apart
    assert tuple(read_checkpoint(ck / 'last.pt')['optimizer']['param_groups'][0]['betas']) == (0.0, 0.99)   # the paper's Adam


def test_interrupted_training_resumes_exactly(tmp_path):
    tr, va = _set(16, 0), _set(8, 1)
    kw = dict(epochs=2, lr=5e-3, batch_size=16, device='cpu', seed=0, progress=False)
    def net(): torch.manual_seed(0); return A.AttributionNet(CLASSES, 16, 16, 8)
    full = A.train_attribution(net(), tr, va, ckpt_dir=tmp_path / 'a', **kw)
    with pytest.raises(KeyboardInterrupt):
        A.train_attribution(net(), tr, va, ckpt_dir=tmp_path / 'b', callbacks=[InterruptAfter(1)], **kw)
    resumed = A.train_attribution(net(), tr, va, ckpt_dir=tmp_path / 'b', **kw)
    np.testing.assert_allclose(resumed.history['train_loss'], full.history['train_loss'], rtol=1e-5)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()): assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match='not the model'): A.train_attribution(net(), tr.with_classes([*CLASSES, 'x']), va, **kw)
    with pytest.raises(ValueError, match="does not know"):
        A.train_attribution(net(), tr, A.SourceSet(va.x, va.df.assign(source='new'), CLASSES), **kw)


def test_fingerprints():
    flat = torch.full((2, 3, 16, 16), 0.5)
    assert residual_max(A.residual(flat)) < 1e-6
    cb = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2).float().expand(1, 3, 16, 16)
    assert divmod(int(A.log_spectrum(A.residual(cb)[0]).argmax()), 16) == (0, 0)     # a checkerboard: the Nyquist corner
    x, df = _toy(16)
    fps = torch.stack([A.fingerprint(x[df.source.to_numpy() == c]) for c in CLASSES])
    pred = A.fingerprint_scores(x, fps).argmax(1).numpy()
    assert (pred[df.source.to_numpy() == 'checker'] == 1).mean() > 0.9            # the aligned checkerboard is found
    with pytest.raises(ValueError, match='N×3×H×W'): A.residual(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match='sigma'): A.residual(cb, 0)


def residual_max(r): return float(r.abs().max())


def test_perturbations():
    x, _ = _toy(2)
    for kind, lv in (('jpeg', 70), ('blur', 1.0), ('noise', 5.0), ('crop', 0.75)):
        y = A.perturb_images(x, kind, lv, seed=3)
        assert y.shape == x.shape and y.dtype == torch.uint8 and torch.equal(y, A.perturb_images(x, kind, lv, seed=3))
        assert not torch.equal(y, x)
    assert torch.equal(A.crop_images(x, 1.0), x)
    with pytest.raises(ValueError, match="'rotate'"): A.perturb_images(x, 'rotate', 3)
    with pytest.raises(ValueError, match=r'\(0, 1\]'): A.crop_images(x, 1.2)
    with pytest.raises(TypeError, match='uint8'): A.perturb_images(x.float(), 'crop', 0.5)
    s = A.SourceSet(x, _toy(2)[1], CLASSES).perturbed('crop', 0.75)
    assert (s.df.condition == 'crop0.75').all()


def test_open_set_rule(trained):
    net, tr, va, te, _ = trained
    far = torch.randint(0, 256, (6, 3, 16, 16), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)  # white noise
    for kind in A.OPEN_SET_SCORES:
        cal = A.calibrate_open_set(net, tr, va, kind, accept=0.9)
        kept = np.mean(np.array(net.attribute(va)) != A.UNKNOWN)
        assert cal['kind'] == kind and abs(kept - 0.9) < 0.05                       # τ keeps about `accept` of validation
        assert set(net.attribute(far, open_set=False)) <= set(CLASSES)
    assert np.mean(np.array(net.attribute(far)) == A.UNKNOWN) >= 5 / 6              # the distance rule (the last calibrated)
    # the distance score itself: minus the Mahalanobis distance to the nearest class mean
    net2 = A.AttributionNet(CLASSES, 16, 32, 16); net2.open_kind.fill_(1)
    net2.means.zero_(); net2.means[1, 0] = 10.0; net2.precision.copy_(4 * torch.eye(net2.precision.shape[0]))
    f = torch.zeros(2, net2.precision.shape[0]); f[1, 0] = 7.0                     # at the real mean; 3 from 'checker''s
    assert torch.allclose(net2.known_score(None, f), torch.tensor([0.0, -6.0]))
    with pytest.raises(ValueError, match='not trained on'):
        A.calibrate_open_set(net, tr, A.SourceSet(va.x, va.df.assign(source='new'), CLASSES))
    with pytest.raises(ValueError, match="'energy'"): A.calibrate_open_set(net, tr, va, 'energy')
    with pytest.raises(ValueError, match=r'\(0, 1\)'): A.calibrate_open_set(net, tr, va, 'msp', 1.0)
    noise_val = A.SourceSet(far, pd.DataFrame({'source': ['noise'] * len(far)}), CLASSES)
    ch = A.choose_open_set(net, tr, va, noise_val, accept=0.9)
    assert set(ch['val_auroc']) == set(A.OPEN_SET_SCORES) and ch['kind'] == max(ch['val_auroc'], key=ch['val_auroc'].get)
    assert int(net.open_kind) == A.OPEN_SET_SCORES.index(ch['kind'])
    with pytest.raises(ValueError, match='outside'): A.choose_open_set(net, tr, va, va)
    sc = A.attribution_scores(net, te)
    assert set(sc.pred) <= {*CLASSES, A.UNKNOWN} and (sc.pred_closed != A.UNKNOWN).all()
    assert np.allclose(sc.score, 1 - sc[f'p_{A.REAL}'])


def test_accuracy_table_and_confusion():
    df = pd.DataFrame({'source': [A.REAL] * 4 + ['a'] * 6, 'label': [0] * 4 + [1] * 6,
                       'pred_closed': [A.REAL, A.REAL, 'a', A.REAL, 'a', 'a', 'a', A.REAL, 'a', 'a'],
                       'unit': [1, 1, 2, 2, -1, -1, -1, -1, -1, -1]})
    df['correct'] = (df.pred_closed == df.source).astype(float)
    t = A.accuracy_table(df, n_boot=200)
    assert t['acc'].iloc[0] == pytest.approx(0.8) and t['acc_lo'].iloc[0] <= 0.8 <= t['acc_hi'].iloc[0]
    assert A.accuracy_table(df, fakes_only=True, n_boot=50)['acc'].iloc[0] == pytest.approx(5 / 6)
    m = A.confusion(df, [A.REAL, 'a'])
    assert m.loc[A.REAL, A.REAL] == pytest.approx(0.75) and m.loc['a', 'a'] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match='unit'): A.accuracy_table(df.drop(columns='unit'))


def test_sourceset_and_frame(tmp_path):
    x, df = _toy(2)
    s = A.SourceSet(x, df, [A.REAL, 'checker'])
    assert s.y.tolist() == [0, 0, 1, 1, -1, -1]                                    # a source outside the classes: −1
    with pytest.raises(ValueError, match='uint8'): A.SourceSet(x.float(), df, CLASSES)
    with pytest.raises(ValueError, match='2 rows'): A.SourceSet(x, df.iloc[:2], CLASSES)
    # a fake set whose person sits in another split than their real faces: a leak, named
    real = pd.DataFrame({'path': 'r.png', 'label': 0, 'identity': [1, 2], 'target_identity': -1, 'split': ['train', 'test'],
                         'kind': 'image', 'clip_id': '', 'frame': -1})
    real.attrs['real_dir'] = str(tmp_path / 'synthfaces' / 'abc')
    with FakeSetWriter('toyfake', {'v': 1}, tmp_path, sign=False) as w:
        w.add_image(torch.rand(3, 8, 8), split='train', identity=2)
    with pytest.raises(LeakError, match='2'): A.attribution_frame({'toyfake': w.name}, real, tmp_path)
    with pytest.raises(ValueError, match='reserved'): A.attribution_frame({A.REAL: w.name}, real, tmp_path)
    ok = A.attribution_frame({'toyfake': w.name}, real.assign(split=['train', 'train']), tmp_path)
    assert ok.source.tolist() == [A.REAL, A.REAL, 'toyfake'] and ok.fake_set.iloc[-1] == w.name


def test_self_blend_set(tmp_path):
    from deepfake_course.detect.core import real_faces
    real = real_faces(tmp_path, n_identities=3, images_per_identity=2, size=32, seed=0)
    name = A.self_blend_set(real, tmp_path, seed=0, verbose=False)
    fk = read_fake_set(name, tmp_path)
    assert name.startswith('self-blend/') and len(fk) == len(real) and (fk.label == 1).all()
    assert sorted(zip(fk.identity, fk.split)) == sorted(zip(real.identity, real.split))   # the real face's person and split
    assert A.self_blend_set(real, tmp_path, seed=0, verbose=False) == name                # reused, not rebuilt
    with pytest.raises(ValueError, match='no real faces'): A.self_blend_set(real.iloc[:0], tmp_path)


def test_background_runs_in_another_process(monkeypatch):
    monkeypatch.setattr(A, 'BACKGROUND_CONTEXT', 'fork')      # the notebook spawns; a fork starts in milliseconds
    bg = A.Background(time.sleep, 0.3)
    assert not bg.done() and bg.result() is None and bg.done()
    assert A.Background(operator.add, 2, 3).result() == 5
    with pytest.raises(ValueError, match="'x'"): A.Background(int, 'x').result()


def test_residual_only_and_patches(tmp_path):
    x = torch.rand(4, 3, 16, 16)
    r = A.ResidualInput(only=True)(x)
    assert r.shape == (4, 3, 16, 16) and torch.allclose(A.ResidualInput()(x)[:, 3:], r)
    flat = torch.full((2, 3, 16, 16), 0.3)
    assert A.ResidualInput(only=True)(flat).abs().max() < 1e-6               # colour and smooth content are gone
    net = build_detector('attribution', sources=CLASSES, input_size=8, fmap_base=32, fmap_max=16, residual_input='only')
    assert net.from_rgb[1].weight.shape[1] == 3 and net(torch.rand(2, 3, 8, 8)).shape == (2,)
    m2 = load_detector(save_detector(net, tmp_path / 'p.pt'), expect='attribution')
    assert m2.residual_input == 'only' and torch.allclose(m2(flat[:, :, :8, :8]), net.eval()(flat[:, :, :8, :8]), atol=1e-6)
    with pytest.raises(ValueError, match="'only'"): A.AttributionNet(CLASSES, 16, residual_input='both')
    s = _set(3)
    p = A.patch_set(s, 8, 2, seed=1)
    assert len(p) == 2 * len(s) and p.x.shape[1:] == (3, 8, 8) and p.size == 8
    assert p.df.source.tolist() == s.df.source.tolist() * 2 and (p.y == s.y.repeat(2)).all()
    for i in range(len(p)):                                                  # each patch is a piece of its image, at an even offset
        src = s.x[i % len(s)]
        hits = [(a, b) for a in range(0, 9) for b in range(0, 9) if torch.equal(src[:, a:a + 8, b:b + 8], p.x[i])]
        assert hits and any(a % 2 == 0 and b % 2 == 0 for a, b in hits)
    assert torch.equal(A.patch_set(s, 8, 2, seed=1).x, p.x) and not torch.equal(A.patch_set(s, 8, 2, seed=2).x, p.x)
    with pytest.raises(ValueError, match='even'): A.patch_set(s, 7)
    with pytest.raises(ValueError, match='n must'): A.patch_set(s, 8, 0)
