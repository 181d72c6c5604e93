"""T-GD (notebook 35_tgd): the γ formula, L2-SP against a hand computation, intra-class CutMix, teacher swap,
exact resume, the refusals (one-class sets, a teacher of another backbone), ForensicTransfer and the data splits."""
import copy, math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from deepfake_course.detect.core import build_detector, list_detectors, FaceTensorSet
from deepfake_course.detect.tgd import (tgd_gamma, l2sp_terms, classifier_names, intra_class_cutmix, tgd_noise, tgd_train,
                                        save_teacher, load_teacher, few_shots, concat_sets, WSConv2d, gan_domains, GAN_NAMES)
from deepfake_course.train import CheckpointError
from deepfake_course.data.manifest import check_no_leak

SIZE = 16


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "One torch thread: these tiny networks crawl when two threads fight over a busy machine."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def toy_set(n, seed, shift=0.0, split='train'):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.5 + 0.25
    y = torch.arange(n) % 2
    x[y == 1, :, 2:8, 2:8] += 0.2 + shift
    df = pd.DataFrame({'label': y.numpy(), 'source': np.where(y.numpy() == 1, 'fake', 'real'), 'split': split})
    return FaceTensorSet((x.clamp(0, 1) * 255).round().to(torch.uint8), df)


def tiny(kind='tgd_resnet_gnws'):
    return build_detector(kind, width=8, input_size=SIZE) if kind == 'tgd_resnet_gnws' else \
        build_detector(kind, width_mult=0.25, depth_mult=0.25, input_size=SIZE)


KW = dict(epochs=3, batch_size=8, swap_every=1, progress=False, seed=0, device='cpu')


def test_registry():
    names = set(list_detectors()['name'])
    assert {'tgd_resnet_gnws', 'tgd_efficientnet_b0', 'forensictransfer'} <= names
    for k in ('tgd_resnet_gnws', 'tgd_efficientnet_b0'):
        assert tiny(k)(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 2)
    assert build_detector('forensictransfer', input_size=SIZE)(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 2)
    assert classifier_names(tiny()) == ['fc.weight', 'fc.bias']
    assert classifier_names(tiny('tgd_efficientnet_b0')) == ['net.classifier.1.weight', 'net.classifier.1.bias']
    for m in (tiny('tgd_efficientnet_b0'), build_detector('tgd_efficientnet_b0')):  # two-class head drawn small, not U(±0.7)
        assert m.net.classifier[1].weight.abs().max() < 0.1 and m.net.classifier[1].bias.abs().max() == 0


def test_weight_standardisation():
    c = WSConv2d(3, 5, 3)
    w = c.standardised_weight()
    assert torch.allclose(w.mean((1, 2, 3)), torch.zeros(5), atol=1e-5)
    assert torch.allclose(w.std((1, 2, 3), unbiased=False), torch.ones(5), atol=1e-3)


def test_gamma():
    assert math.isclose(float(tgd_gamma(torch.tensor(0.0))), 0.5)
    assert math.isclose(float(tgd_gamma(torch.tensor(math.log(3.0)), s=2.0)), 0.5, rel_tol=1e-6)  # 2·1/(1+3)
    assert float(tgd_gamma(torch.tensor(40.0))) < 1e-15
    assert not tgd_gamma(torch.tensor(0.3, requires_grad=True)).requires_grad


def test_l2sp_by_hand():
    torch.manual_seed(0)
    st = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(2, 2))
    an = copy.deepcopy(st)
    with torch.no_grad():
        an[0].weight.add_(torch.tensor([3.0, 0.0]).view(2, 1, 1, 1)); an[0].bias.sub_(torch.tensor([0.0, 1.0]))
        an[2].bias.add_(7.0)
    sp, cls = l2sp_terms(st, an)
    assert math.isclose(sp.item(), 0.5 * (9 + 1), rel_tol=1e-6)
    want = 0.5 * (st[2].weight.detach().pow(2).sum() + st[2].bias.detach().pow(2).sum())
    assert math.isclose(cls.item(), want.item(), rel_tol=1e-6)
    with pytest.raises(ValueError, match='anchor has no parameter'):
        l2sp_terms(st, nn.Sequential(nn.Identity(), nn.Linear(2, 2)))


def test_cutmix_keeps_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 3, 8, 8).clone()
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 0])
    changed = 0
    for _ in range(300):
        m, perm, box, same = intra_class_cutmix(x, y, g)
        src = m.flatten(1).long()
        for i in range(10):
            assert set(y[src[i].unique()].tolist()) == {int(y[i])}
        changed += int((m != x).any())
    assert changed > 0  # it does mix


def test_noise_reproducible():
    x = (torch.rand(5, 3, SIZE, SIZE) * 255).to(torch.uint8)
    a, b = tgd_noise(x, torch.Generator().manual_seed(4)), tgd_noise(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and not torch.equal(a, x)
    with pytest.raises(TypeError, match='uint8'):
        tgd_noise(x.float())


def test_teacher_swap_and_student_start():
    tr, va = toy_set(32, 0), {'source': toy_set(16, 1), 'target': toy_set(16, 2, 0.1)}
    teacher = tiny()
    seen = []
    def watch(loop, step):
        st, te = loop.models['student'].state_dict(), loop.models['teacher'].state_dict()
        seen.append(all(torch.equal(st[k], te[k]) for k in st))
    r = tgd_train(tiny(), tr, va, teacher=teacher, on_step=watch, **KW)
    spe = 32 // 8
    assert [i for i, s in enumerate(seen) if s] == [spe - 1, 2 * spe - 1]
    assert r.history['teacher_swapped'].tolist() == [True, True, False]
    assert (r.history['gamma'] > 0).all() and (r.history['gamma'] <= 0.5).all()
    # the student starts at the teacher's weights: with lr = 0 it stays there
    still = tgd_train(tiny(), tr, va, teacher=teacher, lr=0.0, **{**KW, 'epochs': 1, 'swap_every': None})
    for k, v in teacher.state_dict().items(): assert torch.equal(still.model.state_dict()[k], v), k
    assert still.history['l_sp'].iloc[0] == 0.0
    with pytest.raises(ValueError, match='needs the source model'):
        tgd_train(tiny(), tr, va, **KW)


@pytest.mark.parametrize('kind', ['tgd_resnet_gnws', 'tgd_efficientnet_b0'])
def test_resume_is_exact(tmp_path, kind):
    tr, va = toy_set(32, 0), {'source': toy_set(16, 1), 'target': toy_set(16, 2, 0.1)}
    teacher = tiny(kind)
    full = tgd_train(tiny(kind), tr, va, teacher=teacher, **KW)
    class Stop(Exception): pass
    def stop(loop, step):
        if step == 6: raise Stop
    with pytest.raises(Stop):
        tgd_train(tiny(kind), tr, va, teacher=teacher, ckpt_path=tmp_path / 'ck.pt', every=3, on_step=stop, **KW)
    res = tgd_train(tiny(kind), tr, va, teacher=teacher, ckpt_path=tmp_path / 'ck.pt', every=3, **KW)
    assert res.resumed_from == 6
    for k, v in full.model.state_dict().items(): assert torch.equal(res.model.state_dict()[k], v), k
    for k, v in full.teacher.state_dict().items(): assert torch.equal(res.teacher.state_dict()[k], v), k
    pd.testing.assert_frame_equal(full.history, res.history)
    # another teacher with the same checkpoint path: refused, not silently resumed
    other = copy.deepcopy(teacher)
    with torch.no_grad(): next(other.parameters()).add_(0.01)
    with pytest.raises(CheckpointError, match='source_model_sha1'):
        tgd_train(tiny(kind), tr, va, teacher=other, ckpt_path=tmp_path / 'ck.pt', every=3, **KW)


def test_one_class_target_refused():
    tr = toy_set(32, 0)
    only_fake = tr.subset(tr.df['label'].to_numpy() == 1)
    with pytest.raises(ValueError, match=r"label\(s\) \[1\]"):
        tgd_train(tiny(), only_fake, {'source': toy_set(16, 1)}, teacher=tiny(), **KW)
    va = toy_set(16, 2)
    with pytest.raises(ValueError, match=r"validation set 'target'.*label\(s\) \[0\]"):
        tgd_train(tiny(), tr, {'target': va.subset(va.df['label'].to_numpy() == 0)}, teacher=tiny(), **KW)


def test_teacher_of_another_backbone_refused(tmp_path):
    p = save_teacher(tiny(), tmp_path / 't.pt')
    t = load_teacher(p, 'tgd_resnet_gnws')
    assert torch.equal(t.fc.weight.detach(), load_teacher(p, 'tgd_resnet_gnws').fc.weight.detach())
    with pytest.raises(CheckpointError, match="'tgd_resnet_gnws'.*'tgd_efficientnet_b0'"):
        load_teacher(p, 'tgd_efficientnet_b0')
    with pytest.raises(ValueError, match='same architecture'):
        tgd_train(tiny('tgd_efficientnet_b0'), toy_set(32, 0), {'s': toy_set(16, 1)}, teacher=t, **KW)


def test_forensictransfer_trains():
    tr, va = toy_set(32, 0), {'source': toy_set(16, 1)}
    r = tgd_train(build_detector('forensictransfer', width=8, latent=8, input_size=SIZE), tr, va, method='pretrain',
                  lr=0.05, momentum=0.9, cutmix_p=0, blur_p=0, jpeg_p=0, **{**KW, 'epochs': 2})
    assert len(r.history) == 2 and np.isfinite(r.history['loss']).all()
    with pytest.raises(ValueError, match='even'):
        build_detector('forensictransfer', latent=7)


def test_few_shots():
    tr = toy_set(40, 0)
    s = few_shots(tr, 10, seed=1)
    assert len(s) == 10 and s.df['label'].sum() == 5
    with pytest.raises(ValueError, match='label 0'):
        few_shots(tr, 50)
    with pytest.raises(ValueError, match='train split only'):
        few_shots(toy_set(8, 0, split='val'), 2)
    assert len(concat_sets(s, s)) == 20


SMOKE_GANS = {
    'stargan': dict(n_identities=12, per_identity=4, size=16, conv_dim=8, n_res=1, batch=8, star_steps=2, judge_epochs=1,
                    n_test=8, n_curve=1, n_fakes=24),
    'pggan': dict(n_identities=12, per_identity=4, pg_resolution=16, pg_stab=2, pg_fade=2, pg_final=2, pg_batch=8, pg_fmap_base=64,
                  pg_fmap_max=16, feat_epochs=1, n_eval=8, n_curve=1, n_fakes=24)}


def test_gan_domains_share_one_identity_split(tmp_path):
    doms = gan_domains(['stargan', 'pggan'], tmp_path, gan_params=SMOKE_GANS, size=SIZE, verbose=False)
    rows = pd.concat([pd.concat([d.train.df, d.val.df, d.test.df]) for d in doms.values()], ignore_index=True)
    check_no_leak(rows, 'identity')
    real = rows[rows['label'] == 0]
    assert (real.groupby('identity')['split'].nunique() == 1).all()  # one split per identity across both domains
    star = rows[rows['source'] == 'stargan']
    for i, s in star.groupby('identity')['split'].first().items():
        assert set(real.loc[real['identity'] == i, 'split']) <= {s}
    assert (rows.loc[rows['source'] == 'pggan', 'identity'] == -1).all()
    for d in doms.values():
        assert d.attrs['real_verified'] and d.attrs['below_bar'] and 'BELOW ITS QUALITY BAR' in d.note
        for s in ('train', 'val', 'test'):
            assert set(d[s].df['label']) == {0, 1}
    with pytest.raises(ValueError, match='unknown GAN'):
        gan_domains(['biggan'], tmp_path)
    assert set(GAN_NAMES) == {'pggan', 'stargan', 'stylegan', 'stylegan2'}
