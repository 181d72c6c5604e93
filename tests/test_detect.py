"""Unit tests of deepfake_course.detect: ShallowNet, MesoNet and timm baselines, FDFtNet, the registry,
checkpoints, score_faces, detect's errors, and the data spine (detection_data reads a NAMED fake set, the blend-swap
set is named by its settings alone, no identity crosses splits). Small tensors and tiny renders: runs on a CPU."""
import contextlib, math
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from deepfake_course.core import n_params
from deepfake_course.media import read_frames
from deepfake_course.train import save_checkpoint, CheckpointError
from deepfake_course.data.manifest import LeakError
from deepfake_course.data.fakes import FakeSetWriter, FakeSetNotFound, list_fake_sets
from deepfake_course.detect.core import (DETECTORS, build_detector, list_detectors, fake_prob, detector_loss, save_detector,
                                         load_detector, FaceTensorSet, DetectionData, score_faces, detect, blend_swap,
                                         similarity_from_landmarks, Augment, detection_data, make_blendswap, blendswap_set,
                                         real_faces, NoFaceError, PERTURBATIONS, perturb, jpeg_recompress,
                                         show_perturbations)
from deepfake_course.detect.shallownet import (ShallowNetV1, ShallowNetV2, ShallowNetV3, ShallowNetEnsemble, keras_l2, he_init,
                                               recalibrate_bn)
from deepfake_course.detect.baselines import MesoNet, load_weights_file
from deepfake_course.detect.fdftnet import SelfAttention, FineTuneTransformer, MBBlockV3, MBStack, FDFtNet, Cutout


def _x(n=2, s=64): return torch.rand(n, 3, s, s)


# ---------------------------------------------------------------- registry
def test_registry_has_every_detector():
    names = set(list_detectors()['name'])
    for n in ['shallownet_v1', 'shallownet_v2', 'shallownet_v3', 'shallownet_ensemble', 'meso4', 'mesoinception4',
              'xception', 'xception_mini', 'resnet50', 'resnet_small', 'efficientnet_b0', 'squeezenet', 'fdftnet',
              'vgg_small', 'inception_small', 'densenet_small', 'vit_small', 'gramnet', 'efficientnet_b4']:
        assert n in names, n
    with pytest.raises(KeyError, match='Unknown detector'): build_detector('nope')


@pytest.mark.parametrize('name', ['shallownet_v1', 'shallownet_v2', 'shallownet_v3', 'shallownet_ensemble', 'meso4',
                                  'mesoinception4', 'xception_mini', 'resnet_small', 'squeezenet', 'vgg_small',
                                  'inception_small', 'densenet_small', 'vit_small', 'gramnet'])
def test_every_small_detector_scores_a_batch(name):
    kw = {'width_mult': 0.25} if name in ('shallownet_v1', 'shallownet_v2') else {}
    m = build_detector(name, input_size=64, **kw).eval()
    with torch.no_grad(): p = fake_prob(m(_x(3)))
    assert p.shape == (3,) and ((p >= 0) & (p <= 1)).all()
    assert m.detector_name == name and m.input_size == 64


@pytest.mark.parametrize('name', ['vgg_small', 'inception_small', 'densenet_small', 'vit_small', 'gramnet'])
def test_zoo_detectors_learn_a_planted_cue(name):
    "Each architecture of the zoo separates faces with a planted bright square from faces without after a few steps."
    torch.manual_seed(0)
    x = torch.rand(32, 3, 32, 32) * 0.5; y = (torch.arange(32) % 2).float()
    x[y == 1, :, 8:16, 8:16] = 1.0
    m = build_detector(name, input_size=32); opt = torch.optim.Adam(m.parameters(), 3e-3)
    for _ in range(25):
        loss = nn.functional.binary_cross_entropy_with_logits(m(x), y); opt.zero_grad(); loss.backward(); opt.step()
    m.eval()
    with torch.no_grad(): p = torch.sigmoid(m(x))
    assert (p[y == 1].min() > p[y == 0].max()) or ((p > 0.5).float() == y).float().mean() > 0.9, (name, float(loss))


def test_gram_matrix_ignores_where_a_texture_is():
    from deepfake_course.detect.baselines import GramBlock
    f = torch.randn(2, 4, 5, 5); perm = torch.randperm(25)
    g = GramBlock.gram(f)
    assert g.shape == (2, 4, 4) and torch.allclose(g, g.transpose(1, 2))
    assert torch.allclose(g, GramBlock.gram(f.flatten(2)[:, :, perm].reshape(2, 4, 5, 5)), atol=1e-5)
    assert torch.allclose(g[0, 0, 0], (f[0, 0] ** 2).mean())


# ---------------------------------------------------------------- ShallowNet
def test_shallownet_v1_is_sized_for_128():
    m = ShallowNetV1(128)
    assert m.feat_shape == (437, 3, 3) and m.head[1].in_features == 3933
    assert ShallowNetV1(64, 0.25).feat_shape[1:] == (1, 1)
    assert ShallowNetV1(32, 0.25)(_x(2, 32)).shape == (2,)      # the pool that would meet a 1x1 map is left out


def test_shallownet_v3_matches_paper_shapes():
    m = ShallowNetV3(64)
    assert m.feat_shape == (32, 12, 12)
    assert abs(n_params(m) / 1e6 - 4.83) < 0.02
    assert m.features(_x()).shape == (2, 32, 12, 12)
    with pytest.raises(ValueError, match='at least 20 px'): ShallowNetV3(16)


def test_shallownet_v2_map_and_no_bn_in_convs():
    m = ShallowNetV2(64)
    assert m.feat_shape == (192, 16, 16)
    assert not any(isinstance(l, nn.BatchNorm2d) for l in m.features.modules())


def test_ensemble_is_mean_probability():
    a, b = ShallowNetV1(64, 0.25).eval(), ShallowNetV3(64).eval()
    e = ShallowNetEnsemble([a, b]).eval(); x = _x(4)
    with torch.no_grad():
        torch.testing.assert_close(fake_prob(e(x)), (fake_prob(a(x)) + fake_prob(b(x))) / 2, atol=1e-5, rtol=0)
    with pytest.raises(ValueError): ShallowNetEnsemble([])


def test_keras_l2_adds_penalty():
    m = ShallowNetV3(64); y = torch.tensor([0., 1.]); z = torch.zeros(2)
    extra = keras_l2(m, 1e-4)(z, y) - detector_loss()(z, y)
    ref = 1e-4 * sum((mm.weight ** 2).sum() for mm in m.modules() if isinstance(mm, (nn.Conv2d, nn.Linear)))
    torch.testing.assert_close(extra, ref)



# ---------------------------------------------------------------- ShallowNet: the score collapse and its fix
def test_dc_free_init_gives_zero_mean_filters_at_he_scale():
    m = ShallowNetV3(64)
    spatial = [c for c in m.features.modules() if isinstance(c, nn.Conv2d) and c.kernel_size[0] > 1]
    assert len(spatial) == 3 and all(float(c.weight.detach().sum((2, 3)).abs().max()) < 1e-5 for c in spatial)
    assert abs(float(m.features[0][0].weight.detach().std()) / math.sqrt(2 / 75) - 1) < 0.1  # He's variance kept
    plain = ShallowNetV3(64, dc_free=False)  # plain He filters respond to brightness
    assert float(plain.features[0][0].weight.detach().sum((2, 3)).abs().max()) > 1e-2
    assert float(he_init(plain, dc_free=True).features[0][0].weight.detach().sum((2, 3)).abs().max()) < 1e-5


def _bn_input(m, x):
    got = {}
    h = m.head[3].register_forward_hook(lambda mod, i, o: got.__setitem__('x', i[0].detach()))
    with torch.no_grad(): m(x)
    h.remove(); return got['x']


def test_precise_bn_re_estimates_head_statistics_for_the_eval_network():
    torch.manual_seed(0)
    m = ShallowNetV3(32, width_mult=0.25, dense=16, precise_bn=24); opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    xs = [torch.rand(8, 3, 32, 32) for _ in range(4)]
    m.train()
    for x in xs:
        loss = m(x).square().mean(); opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad(): m(torch.rand(8, 3, 32, 32))  # no gradient: not a training step, not remembered
    assert sum(len(t) for t in m._bn_inputs) == 24 and m._bn_stale  # the last 24 training faces only
    n_steps = int(m.head[3].num_batches_tracked)
    m.eval()
    assert not m.training and not m._bn_stale and int(m.head[3].num_batches_tracked) == n_steps
    assert all(not mod.training for mod in m.modules())
    h = _bn_input(m, torch.cat(xs[1:]))  # the eval network's (dropout off) BN input on those faces
    torch.testing.assert_close(m.head[3].running_mean, h.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m.head[3].running_var, h.var(0), atol=1e-5, rtol=1e-4)  # one part of 24: its variance
    before = m.head[3].running_mean.clone(); m.eval()  # nothing new to learn from: unchanged
    assert torch.equal(m.head[3].running_mean, before)
    # precise_bn=0: PyTorch's running averages, which do not describe the eval network
    torch.manual_seed(0)
    p = ShallowNetV3(32, width_mult=0.25, dense=16, precise_bn=0); opt = torch.optim.SGD(p.parameters(), lr=1e-2)
    p.train()
    for x in xs:
        loss = p(x).square().mean(); opt.zero_grad(); loss.backward(); opt.step()
    p.eval()
    assert p._bn_inputs == [] and (p.head[3].running_mean - _bn_input(p, torch.cat(xs[1:])).mean(0)).abs().max() > 1e-3
    with pytest.raises(ValueError, match='precise_bn must be a number of faces'): ShallowNetV3(64, precise_bn=-1)


def test_recalibrate_bn_restores_modes_and_momentum():
    m = ShallowNetV1(32, 0.125, precise_bn=0).train(); m.features[0].eval()
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    recalibrate_bn(m, torch.rand(5, 3, 32, 32), batch_size=2)  # parts of 3 and 2: a part of 1 would break BatchNorm1d
    assert m.training and not m.features[0].training and m.features[1].training
    assert all(b.momentum == 0.1 for b in bns)
    assert all(int(b.num_batches_tracked) == 0 for b in bns)  # the count of training steps is kept


def _toy_faces(n, size, seed, ident0=0):
    "Aligned toy 'faces' (a bright ellipse, smooth blotches, per-image brightness); fakes (odd rows) carry faint fine grain."
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing='ij')
    face = ((xx / 0.6) ** 2 + (yy / 0.8) ** 2 < 1).float()
    low = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode='bilinear', align_corners=False)
    x = 0.25 + 0.4 * face + 0.2 * (low - 0.5) + 0.1 * torch.rand(n, 1, 1, 1, generator=g)
    y = torch.arange(n) % 2
    x = (x + y[:, None, None, None] * 0.06 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1)
    df = pd.DataFrame({'path': '', 'label': y.numpy(), 'identity': ident0 + np.arange(n) // 4,
                       'source': np.where(y.numpy() == 1, 'toy-fake', 'toy')})
    return FaceTensorSet((x * 255).round().to(torch.uint8), df)


def _assert_scores_spread(model, data):
    "The threshold 0.5 separates the test faces about as well as the best threshold; scores spread on both sides of it."
    from sklearn.metrics import roc_auc_score, roc_curve
    sc = score_faces(model, data.test, device='cpu'); y, s = sc['label'].to_numpy(), sc['score'].to_numpy()
    fpr, tpr, _ = roc_curve(y, s)
    best_bal = float(((tpr + 1 - fpr) / 2).max()); acc = float(((s >= 0.5) == y).mean())
    seen = dict(acc=acc, best_bal=best_bal, auroc=roc_auc_score(y, s), above=(s >= 0.5).mean(), std_real=s[y == 0].std(),
                std_fake=s[y == 1].std())
    assert abs(acc - best_bal) <= 0.05, seen
    assert 0.2 < seen['above'] < 0.8, seen  # not all on one side of 0.5
    assert seen['std_real'] > 0.005 and seen['std_fake'] > 0.005, seen
    assert seen['auroc'] > 0.9, seen


def test_shallownet_v3_scores_do_not_collapse():
    """A separable toy, a few epochs with train_detector's defaults: the threshold 0.5 must separate the classes about
    as well as the best threshold does. Plain ShallowNetV3 (He init, PyTorch's running BatchNorm averages) puts every
    score in a band a few thousandths wide on one side of 0.5 (ACC at 0.5 = 0.50 while AUROC = 0.96)."""
    from deepfake_course.detect.core import train_detector
    torch.manual_seed(0)
    data = DetectionData(_toy_faces(256, 32, 0), _toy_faces(64, 32, 100, 1000), _toy_faces(128, 32, 200, 2000), 'toy')
    res = train_detector(build_detector('shallownet_v3', input_size=32), data, epochs=3, batch_size=32, device='cpu', seed=0,
                         progress=False)
    _assert_scores_spread(res.model, data)

# ---------------------------------------------------------------- MesoNet and timm
def test_meso4_has_the_papers_27977_parameters():
    assert n_params(MesoNet(256), trainable_only=True) == 27977
    m = MesoNet(256)
    # official order: Conv, ReLU, BN, MaxPool
    assert [type(l).__name__ for l in m.features[0]] == ['Conv2d', 'ReLU', 'BatchNorm2d', 'MaxPool2d']


def test_mesoinception_widths():
    m = MesoNet(64, inception=True)
    assert m.features[0][0].out_channels == 11 and m.features[1][0].out_channels == 12
    assert m(_x()).shape == (2,)


def test_user_weights_load_and_bad_file_is_refused(tmp_path):
    a = build_detector('resnet_small', n_out=3)
    torch.save(a.net.state_dict(), tmp_path / 'w.pth')
    b = build_detector('resnet_small', weights=str(tmp_path / 'w.pth'))
    assert set(b.weights_report['skipped']) == {'fc.weight', 'fc.bias'}
    torch.testing.assert_close(b.net.conv1.weight, a.net.conv1.weight)
    (tmp_path / 'txt.pth').write_text('nope')
    with pytest.raises(ValueError, match='not a PyTorch state dict'): build_detector('resnet_small', weights=str(tmp_path / 'txt.pth'))


# ---------------------------------------------------------------- FDFtNet
def test_self_attention_starts_as_identity_and_rows_sum_to_one():
    sa = SelfAttention(16); x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(sa(x), x)
    assert sa.f.out_channels == 2 and sa.g.out_channels == 2 and sa.h.out_channels == 16
    torch.testing.assert_close(sa.attention(x).sum(-1), torch.ones(2, 36))
    with torch.no_grad(): sa.gamma.fill_(0.5)
    assert not torch.allclose(sa(x), x)


def test_ftt_widths_and_output():
    f = FineTuneTransformer(3, (32, 64, 96), 64)
    assert f(_x()).shape == (2, 64)
    assert [r[-1].h.out_channels for r in f.rounds] == [32, 64, 96]


def test_mbblock_canonical_and_code_faithful():
    x = torch.randn(2, 32, 12, 12)
    # the released graph keeps the input's resolution in block 1 (its stride-2 depthwise output only feeds the SE squeeze)
    for faithful, hw in ((False, (6, 6)), (True, (12, 12))):
        b = MBBlockV3(32, 96, 48, 3, 2, 24, faithful_to_code=faithful)
        assert b(x).shape == (2, 48, *hw) and not b.residual
    assert MBBlockV3(48, 96, 48, 5, 1, 24).residual
    assert len(MBStack(32, N=4, expand=96, cout=48, se=24, out=64).blocks) == 4


def test_mbstack_faithful_path_block_shapes():
    # cutz-j/FDFtNet fdft/mb_block.py: block 1's main path is expand1 × SE gates (the stride-2 depthwise output only
    # feeds the SE squeeze), so every block of the released graph keeps the backbone's 12×12 map; the canonical
    # MobileNetV3 stack halves it in block 1. Before the fix the faithful path subsampled block 1 to 6×6.
    x = torch.randn(2, 32, 12, 12)
    for faithful, hw in ((True, (12, 12)), (False, (6, 6))):
        st = MBStack(32, N=3, expand=48, cout=16, se=8, out=24, faithful_to_code=faithful).eval()
        h, shapes = x, []
        with torch.no_grad():
            for b in st.blocks: h = b(h); shapes.append(tuple(h.shape))
        assert shapes == [(2, 16, *hw)] * 3, (faithful, shapes)
        assert not st.blocks[0].residual and all(b.residual for b in st.blocks[1:])
        assert st(x).shape == (2, 24)
    net = _tiny_fdft(True, faithful_to_code=True).eval()
    with torch.no_grad(): assert net(_x(2)).shape == (2, 2)


def _tiny_fdft(frozen, **kw):
    return build_detector('fdftnet', backbone='shallownet_v3', M=3, N=2, ftt_widths=(8, 16, 24), expand=32, mb_out=16,
                          se=8, feat=32, freeze_backbone=frozen, **kw)


def test_fdftnet_frozen_backbone_does_not_change():
    torch.manual_seed(0)
    net = _tiny_fdft(True)
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], 1e-2)
    net.train(); assert not net.backbone.training
    for _ in range(2):
        loss = detector_loss()(net(_x(4)), torch.tensor([0., 1., 0., 1.])); opt.zero_grad(); loss.backward(); opt.step()
    for k, v in net.backbone.state_dict().items(): torch.testing.assert_close(v, before[k])  # BN statistics too
    assert n_params(net.backbone, trainable_only=True) == 0


def test_fdftnet_without_ftt_is_the_mbblock_head_alone():
    "use_ftt=False (the paper's Table 6 ablation) drops the FTT's weights and its term in the sum, nothing else."
    torch.manual_seed(0)
    a = build_detector('fdftnet', backbone='shallownet_v3', input_size=32, M=2, N=1, ftt_widths=(8, 16), expand=16, mb_out=8, se=4, feat=16)
    b = build_detector('fdftnet', backbone='shallownet_v3', input_size=32, M=2, N=1, ftt_widths=(8, 16), expand=16, mb_out=8, se=4, feat=16,
                       use_ftt=False)
    assert b.ftt is None and n_params(a) - n_params(b) == n_params(a.ftt)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith('ftt.')})
    a.eval(); b.eval(); x = _x(2, 32)
    with torch.no_grad():
        assert torch.allclose(b(x), a.fc(a.mb(a.backbone.features(x))), atol=1e-5)
        assert not torch.allclose(a(x), b(x))                     # the FTT term is really there in the full model


def test_fdftnet_unfrozen_backbone_trains():
    torch.manual_seed(0)
    net = _tiny_fdft(False); net.train()
    w0 = net.backbone.features[0][0].weight.clone()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    loss = detector_loss()(net(_x(4)), torch.tensor([0., 1., 0., 1.])); loss.backward(); opt.step()
    assert not torch.allclose(w0, net.backbone.features[0][0].weight)


def test_fdftnet_needs_a_feature_backbone():
    with pytest.raises(TypeError, match='no features'): FDFtNet(nn.Linear(3, 1))


class _BNBackbone(nn.Module):
    "A backbone with BatchNorm in its features and one BatchNorm that FDFtNet never runs (like ShallowNetV3's head)."
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.BatchNorm1d(8)


def _bn_in(net, bn, x):
    "The eval network's input to `bn` on x, as channels × values."
    got = {}; h = bn.register_forward_hook(lambda m, i, o: got.__setitem__('x', i[0].detach()))
    with torch.no_grad(): net(x)
    h.remove(); return got['x'].transpose(0, 1).flatten(1)


@contextlib.contextmanager
def _one_thread():
    "One intra-op torch thread: small convolutions gain nothing from more, and lose much on a busy machine."
    old = torch.get_num_threads(); torch.set_num_threads(1)
    try: yield
    finally: torch.set_num_threads(old)


@_one_thread()
def test_fdftnet_precise_bn_re_estimates_the_heads_statistics_only():
    xs = [torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for frozen in (True, False):
        torch.manual_seed(0)
        net = FDFtNet(_BNBackbone(), 32, M=2, N=2, ftt_widths=(8, 16), expand=16, mb_out=8, se=4, feat=16,
                      freeze_backbone=frozen, precise_bn=24)
        bb0 = {k: v.clone() for k, v in net.backbone.state_dict().items()}
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-2)
        net.train()
        for x in xs:
            loss = detector_loss()(net(x), torch.tensor([0., 1.] * 4)); opt.zero_grad(); loss.backward(); opt.step()
        assert sum(len(t) for t in net._bn_inputs) == 24 and net._bn_stale  # the last 24 training faces
        net.eval()
        assert not net._bn_stale and all(not m.training for m in net.modules())
        x = torch.cat(xs[1:])
        for bn in (net.ftt.rounds[0][1], net.mb.blocks[0].expand[1]):  # each holds the eval network's statistics
            h = _bn_in(net, bn, x)
            torch.testing.assert_close(bn.running_mean, h.mean(1), atol=1e-5, rtol=1e-3)
            torch.testing.assert_close(bn.running_var, h.var(1), atol=1e-6, rtol=1e-2)
        assert torch.equal(net.backbone.head.running_var, bb0['head.running_var'])  # never run: left as it was
        if frozen:
            for k, v in net.backbone.state_dict().items(): assert torch.equal(v, bb0[k]), k  # the frozen backbone: untouched
        else:
            h = _bn_in(net, net.backbone.features[1], x)
            torch.testing.assert_close(net.backbone.features[1].running_mean, h.mean(1), atol=1e-5, rtol=1e-3)
    # precise_bn=0: PyTorch's running averages, still near their initial variance 1 after 4 steps
    torch.manual_seed(0)
    p = FDFtNet(_BNBackbone(), 32, M=2, N=2, ftt_widths=(8, 16), expand=16, mb_out=8, se=4, feat=16, precise_bn=0)
    opt = torch.optim.SGD([q for q in p.parameters() if q.requires_grad], lr=1e-2); p.train()
    for x in xs:
        loss = detector_loss()(p(x), torch.tensor([0., 1.] * 4)); opt.zero_grad(); loss.backward(); opt.step()
    p.eval(); bn = p.ftt.rounds[0][1]
    assert p._bn_inputs == [] and (bn.running_var / _bn_in(p, bn, torch.cat(xs[1:])).var(1)).median() > 2
    with pytest.raises(ValueError, match='precise_bn must be a number of faces'): _tiny_fdft(True, precise_bn=-1)


def test_fdftnet_scores_do_not_collapse():
    """The toy of the ShallowNetV3 test, two epochs of train_detector's defaults (16 steps): the threshold 0.5 must
    separate the classes about as well as the best threshold does. With PyTorch's running BatchNorm averages
    (precise_bn=0) every test score sits at 0.52 ± 0.0005: the running variances are still many times those of the
    heads' first layers, so eval mode flattens the features."""
    from deepfake_course.detect.core import train_detector
    torch.manual_seed(0)
    data = DetectionData(_toy_faces(256, 32, 0), _toy_faces(64, 32, 100, 1000), _toy_faces(128, 32, 200, 2000), 'toy')
    net = build_detector('fdftnet', backbone='shallownet_v3', backbone_kwargs=dict(width_mult=0.25, dense=16), input_size=32,
                         M=3, N=2, ftt_widths=(8, 16, 24), expand=32, mb_out=16, se=8, feat=32)
    with _one_thread():
        res = train_detector(net, data, epochs=2, batch_size=32, device='cpu', seed=0, progress=False)
        _assert_scores_spread(res.model, data)


def test_cutout():
    torch.manual_seed(0)
    assert torch.equal(Cutout(0, 5)(torch.ones(3, 16, 16)), torch.ones(3, 16, 16))
    outs = [Cutout(3, 5)(torch.ones(3, 64, 64)) for _ in range(30)]
    zeros = [(o == 0).all(0).sum().item() for o in outs]
    assert max(zeros) > 0 and max(zeros) <= 3 * 20 * 20
    with pytest.raises(ValueError): Cutout(1, 0)


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_roundtrip_and_wrong_detector(tmp_path):
    m = build_detector('shallownet_v3', input_size=32).eval()
    p = save_detector(m, tmp_path / 'v3.pt')
    m2 = load_detector(p, expect='shallownet_v3')
    x = _x(2, 32)
    with torch.no_grad(): torch.testing.assert_close(m(x), m2(x))
    with pytest.raises(CheckpointError, match="holds a 'shallownet_v3' detector, not 'meso4'"): load_detector(p, expect='meso4')
    # a checkpoint in the one format that does not name its model (fit's, of a plain model) loads only where every tensor fits
    save_checkpoint(tmp_path / 'plain.pt', m, rng=False)
    with pytest.raises(CheckpointError, match='does not hold'): load_detector(tmp_path / 'plain.pt', expect='meso4')
    load_detector(tmp_path / 'plain.pt', expect='shallownet_v3', input_size=32)
    with pytest.raises(CheckpointError, match='does not say which detector'): load_detector(tmp_path / 'plain.pt')
    with pytest.raises(FileNotFoundError): load_detector(tmp_path / 'missing.pt')
    torch.save(m.state_dict(), tmp_path / 'foreign.pt')                  # not the course's format
    with pytest.raises(CheckpointError, match='not a deepfake_course checkpoint'): load_detector(tmp_path / 'foreign.pt', expect='shallownet_v3')
    other = nn.Linear(2, 1); save_checkpoint(tmp_path / 'gan.pt', other, name='dcgan', config={'ngf': 8}, rng=False)
    with pytest.raises(CheckpointError, match="holds a 'dcgan' detector, not 'meso4'"): load_detector(tmp_path / 'gan.pt', expect='meso4')
    with pytest.raises(CheckpointError, match="not a registered detector"): load_detector(tmp_path / 'gan.pt')


def test_fit_checkpoints_of_a_detector_load_by_name(tmp_path):
    from deepfake_course.train import fit
    torch.manual_seed(0)
    m = build_detector('thumbnail_logreg', thumb=4, input_size=16)
    x, y = torch.rand(8, 3, 16, 16), torch.tensor([0., 1.] * 4)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    fit(m, dl, dl, loss_fn=detector_loss(), epochs=1, device='cpu', ckpt_dir=tmp_path / 'ck')
    m2 = load_detector(tmp_path / 'ck' / 'best.pt', expect='thumbnail_logreg')
    assert m2.thumb == 4
    with torch.no_grad(): torch.testing.assert_close(m.eval()(x), m2(x))


def test_fdftnet_checkpoint_rebuilds_without_backbone_file(tmp_path):
    bb = build_detector('shallownet_v3'); bp = save_detector(bb, tmp_path / 'bb.pt')
    net = build_detector('fdftnet', backbone='shallownet_v3', backbone_ckpt=str(bp), N=1, expand=16, mb_out=8, se=4,
                         feat=16, ftt_widths=(4, 8, 8)).eval()
    torch.testing.assert_close(net.backbone.features[0][0].weight, bb.features[0][0].weight)
    p = save_detector(net, tmp_path / 'fd.pt'); bp.unlink()
    net2 = load_detector(p, expect='fdftnet'); x = _x(2)
    with torch.no_grad(): torch.testing.assert_close(net(x), net2(x))


# ---------------------------------------------------------------- data, evaluate, detect
def _face_tensors(n=8, s=32):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(n, 3, s, s, generator=g) * 255).byte()
    df = pd.DataFrame({'path': [''] * n, 'label': [0, 1] * (n // 2), 'source': ['synthfaces', 'blend-swap'] * (n // 2),
                       'identity': range(n), 'target_identity': -1, 'split': 'test', 'clip_id': '', 'frame': -1, 'kind': 'image'})
    return FaceTensorSet(x, df)


def test_face_tensor_set_and_score_faces():
    fs = _face_tensors()
    x, y = fs[1]; assert x.dtype == torch.float32 and y.item() == 1.0 and x.max() <= 1
    assert fs.resized(16).x.shape == (8, 3, 16, 16)
    m = build_detector('shallownet_v3', input_size=32)
    sc = score_faces(m, fs, device='cpu')
    assert list(sc.columns[:9]) == ['path', 'label', 'source', 'identity', 'target_identity', 'split', 'clip_id', 'frame', 'kind']
    assert len(sc) == 8 and sc['score'].between(0, 1).all() and (sc['detector'] == 'shallownet_v3').all()


def test_augment_keeps_shape():
    a = Augment(flip=True, shift=2, extra=Cutout(2, 2))
    assert a(torch.rand(3, 32, 32)).shape == (3, 32, 32)


# ---------------------------------------------------------------- robustness conditions
def _damage(x, kind, level, seed=0): return (perturb(x, kind, level, seed).float() - x.float()).abs().mean().item()


def test_perturbations_keep_shape_and_dtype():
    x = _toy_faces(6, 64, 0).x
    assert list(PERTURBATIONS) == ['jpeg90', 'jpeg70', 'jpeg50', 'blur1', 'blur2', 'resize0.5', 'resize0.25', 'noise5', 'noise10',
                                   'c23', 'c40']
    for name, (kind, level) in PERTURBATIONS.items():
        y = perturb(x, kind, level)
        assert y.shape == x.shape and y.dtype == torch.uint8, name
        assert _damage(x, kind, level) > 0.5, name  # each condition does change the faces
        assert perturb(x[2], kind, level).shape == (3, 64, 64)  # one face, 3×H×W
    assert perturb(x[:, :, :4, :4], 'blur', 3.0).shape == (6, 3, 4, 4)  # a kernel larger than the face is cut to fit


def test_perturbations_level_zero_is_identity():
    x = _toy_faces(4, 64, 0).x
    for kind, level in [('blur', 0), ('noise', 0.0), ('resize', 1.0), ('resize', 0.999)]:  # 0.999·64 rounds to 64 px
        y = perturb(x, kind, level)
        assert torch.equal(y, x) and y is not x, (kind, level)
    assert _damage(x, 'jpeg', 100) < 1.5  # JPEG at quality 100 still rounds colours, but barely


def test_perturbations_damage_grows_with_the_level():
    x = _toy_faces(8, 64, 0).x
    for kind, levels in [('blur', [0.5, 1, 2, 4]), ('noise', [2, 5, 10, 20]), ('resize', [0.75, 0.5, 0.25, 0.125]),
                         ('jpeg', [95, 90, 70, 50, 30]), ('h264', [10, 23, 32, 40, 51])]:
        d = [_damage(x, kind, lv) for lv in levels]
        assert all(a < b for a, b in zip(d, d[1:])), (kind, d)
    # the noise has the std asked for (rounding and clipping aside)
    assert abs((perturb(x, 'noise', 10).float() - x.float()).std().item() - 10) < 0.5


def test_perturbations_are_deterministic_for_a_seed():
    x = _toy_faces(4, 32, 0).x
    assert torch.equal(perturb(x, 'noise', 5, seed=3), perturb(x, 'noise', 5, seed=3))
    assert not torch.equal(perturb(x, 'noise', 5, seed=3), perturb(x, 'noise', 5, seed=4))
    for kind, level in [('jpeg', 70), ('blur', 1.0), ('resize', 0.5), ('h264', 40)]:
        assert torch.equal(perturb(x, kind, level, seed=0), perturb(x, kind, level, seed=1))


def test_h264_levels_and_sides_are_checked():
    x = _toy_faces(2, 32, 0).x
    for bad in (-1, 52, 23.5):
        with pytest.raises(ValueError, match='integer CRF in 0..51'): perturb(x, 'h264', bad)
    with pytest.raises(ValueError, match='even sides, got 31×31'): perturb(x[:, :, :31, :31], 'h264', 23)


def test_perturb_errors_name_the_bad_kind_or_level():
    x = _toy_faces(2, 32, 0).x
    with pytest.raises(ValueError, match="unknown kind 'gamma'"): perturb(x, 'gamma', 1.0)
    for kind, level, msg in [('jpeg', 0, 'jpeg level'), ('jpeg', 101, 'jpeg level'), ('jpeg', 50.5, 'jpeg level'),
                             ('blur', -1, 'blur level'), ('resize', 0, 'resize level'), ('resize', 1.5, 'resize level'),
                             ('noise', -2, 'noise level'), ('noise', float('nan'), 'finite number'),
                             ('blur', '1', 'finite number'), ('noise', True, 'finite number')]:
        with pytest.raises(ValueError, match=msg) as e: perturb(x, kind, level)
        assert repr(level) in str(e.value), (kind, level, str(e.value))
    with pytest.raises(TypeError, match='uint8'): perturb(x.float() / 255, 'blur', 1.0)
    with pytest.raises(TypeError, match='uint8'): perturb(x[0, 0], 'blur', 1.0)


def test_face_tensor_set_perturbed_and_jpeg():
    fs = _toy_faces(6, 32, 0)
    p = fs.perturbed('blur', 2.0)
    assert len(p) == len(fs) and p.x.shape == fs.x.shape and not torch.equal(p.x, fs.x)
    assert (p.df['perturbation'] == 'blur').all() and (p.df['level'] == 2.0).all()
    assert 'perturbation' not in fs.df.columns  # the clean set is left as it was
    assert torch.equal(p.x, perturb(fs.x, 'blur', 2.0))
    assert torch.equal(fs.perturbed('noise', 5, seed=1).x, perturb(fs.x, 'noise', 5, seed=1))
    j = fs.jpeg(70)
    assert torch.equal(j.x, jpeg_recompress(fs.x, 70)) and (j.df['jpeg_quality'] == 70).all()
    assert (j.df['perturbation'] == 'jpeg').all() and (j.df['level'] == 70).all()
    x0, y0 = p[0]; assert x0.dtype == torch.float32 and float(y0) == float(fs.y[0])


def test_show_perturbations_draws_one_row_per_face():
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    fs = _toy_faces(5, 32, 0)
    fig = show_perturbations(fs, n=3)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 3 * (1 + len(PERTURBATIONS))
    assert [ax.get_title() for ax in fig.axes[:1 + len(PERTURBATIONS)]] == ['clean'] + list(PERTURBATIONS)
    fig2 = show_perturbations(fs.x, {'b': ('blur', 1.0)}, n=2)
    assert len([ax for ax in fig2.axes if ax.images]) == 4
    plt.close(fig); plt.close(fig2)

def test_similarity_recovers_transform():
    pts = torch.rand(4, 5, 2) * 40
    c, s_ = math.cos(0.4), math.sin(0.4)
    dst = 0.8 * pts @ torch.tensor([[c, -s_], [s_, c]]).T + torch.tensor([3., 5.])
    M = similarity_from_landmarks(pts, dst)
    torch.testing.assert_close(pts @ M[:, :, :2].transpose(1, 2) + M[:, :, 2][:, None], dst, atol=1e-3, rtol=0)


def test_blend_swap_changes_only_the_face():
    n, s = 2, 32
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing='ij')
    mask = (((yy - 16) ** 2 + (xx - 16) ** 2) < 81).float()[None, None].repeat(n, 1, 1, 1)
    lm = torch.tensor([[12., 13], [20, 13], [16, 17], [13, 21], [19, 21]]).repeat(n, 1, 1)
    tgt = dict(images=torch.full((n, 3, s, s), 0.2), landmarks5=lm, mask=mask)
    don = dict(images=torch.full((n, 3, s, s), 0.9), landmarks5=lm, mask=mask)
    out = blend_swap(tgt, don, colour=False)
    assert torch.allclose(out[..., 0, 0], torch.tensor(0.2))           # background untouched
    assert out[0, 0, 16, 16] > 0.8                                    # face centre comes from the donor
    with pytest.raises(ValueError, match='differ in batch'): blend_swap(tgt, dict(don, images=torch.zeros(n + 1, 3, s, s)))
    small = dict(images=torch.full((n, 3, 16, 16), 0.9), landmarks5=lm / 2, mask=mask[..., ::2, ::2])
    out2 = blend_swap(tgt, small, colour=False)                       # a low-resolution donor is warped up
    assert out2.shape == out.shape and out2[0, 0, 16, 16] > 0.8
    out3, alpha = blend_swap(tgt, don, colour=False, return_mask=True)   # the alpha it pasted with: out = a*donor + (1-a)*target
    assert torch.equal(out3, out) and alpha.shape == (n, 1, s, s)
    assert torch.allclose(out, alpha * 0.9 + (1 - alpha) * 0.2, atol=1e-5)


def test_detect_errors_and_crop_mode(tmp_path):
    from PIL import Image
    m = build_detector('shallownet_v3', input_size=32)
    img = (np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / 'face.png')
    r = detect(tmp_path / 'face.png', m, faces='none', device='cpu')
    assert len(r) == 1 and 0 <= r['score'].iloc[0] <= 1 and r['frame'].iloc[0] == -1
    (tmp_path / 'notes.txt').write_text('not an image')
    with pytest.raises(ValueError, match='neither an image nor a video'): detect(tmp_path / 'notes.txt', m)
    with pytest.raises(FileNotFoundError, match='does not exist'): detect(tmp_path / 'nothing.png', m)
    with pytest.raises(IsADirectoryError): detect(tmp_path, m)
    p = save_detector(m, tmp_path / 'v3.pt')
    with pytest.raises(CheckpointError, match="not 'meso4'"): detect(tmp_path / 'face.png', p, faces='none', expect='meso4')
    with pytest.raises(ValueError, match="faces must be"): detect(img, m, faces='maybe')
    r2 = detect([img, img], m, faces='none', device='cpu')
    assert list(r2['frame']) == [0, 1]


def test_detect_reads_video_frames(tmp_path):
    import av
    path = tmp_path / 'v.mp4'
    with av.open(str(path), 'w') as c:
        st = c.add_stream('libx264', rate=5); st.width = st.height = 32; st.pix_fmt = 'yuv420p'
        for i in range(6):
            fr = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format='rgb24')
            for pk in st.encode(fr): c.mux(pk)
        for pk in st.encode(): c.mux(pk)
    frames, idx, fps = read_frames(path, every=2)
    assert list(idx) == [0, 2, 4] and frames[0].shape == (32, 32, 3) and fps == 5
    r = detect(path, build_detector('shallownet_v3', input_size=32), faces='none', every=3, device='cpu')
    assert list(r['frame']) == [0, 3]
    assert r.attrs['frames'] == [0, 3]                                    # every frame read
    r = detect(path, build_detector('shallownet_v3', input_size=32), faces='none', max_frames=4, device='cpu')
    assert list(r['frame']) == [0, 1, 2, 3] and r.attrs['frames'] == [0, 1, 2, 3]


def test_detect_says_when_no_face():
    pytest.importorskip('deepfake_course.faces')
    m = build_detector('shallownet_v3', input_size=32)
    with pytest.raises(ValueError, match='no face found'): detect(np.full((96, 96, 3), 127, np.uint8), m)
    with pytest.raises(NoFaceError, match='no face found') as e: detect([np.full((96, 96, 3), 127, np.uint8)] * 2, m)
    assert (e.value.source, e.value.n_frames) == ('<array>', 2) and isinstance(e.value, ValueError)


# ---------------------------------------------------------------- the data spine: named fake sets, no leaks
TINY = dict(n_identities=3, images_per_identity=2, size=32, seed=0)   # 3 identities: one per split


@pytest.fixture(scope='module')
def spine_root(tmp_path_factory):
    "A data root with the tiny SynthFaces build and the blend-swap set made for it."
    root = tmp_path_factory.mktemp('spine')
    name = blendswap_set(root, **TINY, verbose=False)
    return root, name


def _id_split(root):
    real = real_faces(root, TINY['n_identities'], TINY['images_per_identity'], TINY['size'], TINY['seed'])
    return real.groupby('identity')['split'].first().to_dict()


def test_blendswap_set_is_named_by_its_settings_alone(spine_root, tmp_path):
    root, name = spine_root
    assert name.startswith('blend-swap/')
    split = _id_split(root)
    # other fake sets appear in the same root: a face-swap set and a blend swap built with other settings
    with FakeSetWriter('faceswap-df', {'steps': 1}, root) as w:
        for i, s in split.items(): w.add_image(np.zeros((32, 32, 3), np.uint8), split=s, identity=i, target_identity=i)
    other = make_blendswap(root, split, per_identity=1, size=32, seed=5, verbose=False)
    assert other != name and len(list_fake_sets(root)) == 3
    assert blendswap_set(root, **TINY, verbose=False) == name                  # the same set, not the newest one
    data = detection_data(root, name, 32, TINY['n_identities'], TINY['images_per_identity'], TINY['seed'])
    assert data.fake_set == name and set(data.test.df.query('label == 1')['source']) == {'blend-swap'}
    assert detection_data(root, 'faceswap-df/' + list_fake_sets(root, 'faceswap-df').name[0].split('/')[1], 32,
                          TINY['n_identities'], TINY['images_per_identity'], TINY['seed']).fake_set.startswith('faceswap-df/')
    fresh = tmp_path / 'fresh'                                                # a fresh data root: the same name
    assert blendswap_set(fresh, **TINY, verbose=False) == name


def test_blendswap_keeps_donor_and_target_in_one_split(spine_root):
    root, name = spine_root
    from deepfake_course.data.fakes import read_fake_set
    df = read_fake_set(name, root)
    split = _id_split(root)
    assert (df['split'] == df['identity'].map(split)).all() and (df['split'] == df['target_identity'].map(split)).all()
    assert len(df) == TINY['n_identities'] * TINY['images_per_identity'] and (df['label'] == 1).all()
    card = df.attrs['card']
    assert card['method'] == 'blend-swap' and card['config']['per_identity'] == TINY['images_per_identity']


def test_detection_data_reads_only_the_named_set(spine_root):
    root, name = spine_root
    args = (32, TINY['n_identities'], TINY['images_per_identity'], TINY['seed'])
    with pytest.raises(FakeSetNotFound, match=f"the sets that exist: .*{name}"): detection_data(root, 'faceswap-df/0123456789', *args)
    with pytest.raises(TypeError, match='name the fake set'): detection_data(root, None, *args)
    data = detection_data(root, name, *args)
    assert isinstance(data, DetectionData) and data.fake_set == name and 'fake_source' not in vars(data)
    for s in ('train', 'val', 'test'):
        part = data[s].df
        assert set(part['label']) == {0, 1} and set(part['split']) == {s}
    assert data.resized(16).fake_set == name and data.resized(16).train.x.shape[-1] == 16


def test_a_fake_whose_target_is_a_training_identity_cannot_sit_in_test(spine_root):
    root, _ = spine_root
    split = _id_split(root)
    tr = next(i for i, s in split.items() if s == 'train'); te = next(i for i, s in split.items() if s == 'test')
    with FakeSetWriter('leaky', {'target': 'train identity in test'}, root) as w:   # leak-free on its own: one row
        w.add_image(np.zeros((32, 32, 3), np.uint8), split='test', identity=te, target_identity=tr)
    with pytest.raises(LeakError, match=rf"{tr} \(test, train\)"):
        detection_data(root, w.name, 32, TINY['n_identities'], TINY['images_per_identity'], TINY['seed'])


def test_make_blendswap_refuses_a_bad_split(tmp_path):
    with pytest.raises(ValueError, match="'train', 'val' or 'test'"): make_blendswap(tmp_path, {0: 'training'})
    with pytest.raises(ValueError, match='is empty'): make_blendswap(tmp_path, {})


def test_registry_lists_every_detector_module_without_importing_it():
    "list_detectors in a fresh interpreter names the detectors of every detect module (X-ray/SBI and the localisers included)."
    import subprocess, sys
    code = "from deepfake_course.detect.core import list_detectors; print(' '.join(list_detectors()['name']))"
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.split()
    assert {'shallownet_v3', 'ocfakedect1', 'tgd_resnet_gnws', 'xray', 'sbi', 'mfcnn', 'pulse', 'lrcn', 'headpose', 'eyes'} <= set(out)
