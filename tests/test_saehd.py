"""Unit tests of deepfake_course.generate.saehd: SAEHD's options (summary in and out, refused values), DFL's optimizer,
the two discriminators, the option-driven losses and sampling, training with exact resume, pretraining, the ablation's
noise table. Random or tiny rendered data; fast on a 2-core CPU."""
import math
from dataclasses import replace

import numpy as np, pandas as pd, pytest, torch

from deepfake_course.faces import face_template
from deepfake_course.generate import saehd as sa
from deepfake_course.generate.faceswap import SwapFaceSet, load_swap_model

TINY = dict(e_dims=4, ae_dims=16, d_dims=4, d_mask_dims=2)


def _faceset(identity, n=16, size=32, seed=0, yaw_shift=0.0):
    g = torch.Generator().manual_seed(seed + identity)
    img = torch.rand(n, 3, size, size, generator=g) * 0.5 + 0.25 * identity
    m = torch.zeros(n, 1, size, size); m[..., size // 6: -size // 6, size // 5: -size // 5] = 1
    lm = torch.as_tensor(face_template(size, 'full'), dtype=torch.float32).expand(n, 5, 2).clone()
    lm[:, 2, 0] += torch.linspace(-yaw_shift, yaw_shift, n)   # the nose moves sideways: yaw
    return SwapFaceSet(img.clamp(0, 1), m, lm, identity)


def _cfg(**kw): return sa.SAEHDConfig(**{**dict(archi='df-ud', resolution=32, batch_size=4, **TINY), **kw})


def test_lecture_summary_round_trip():
    c = sa.SAEHDConfig.from_summary(sa.LECTURE_SUMMARY)
    assert (c.archi, c.resolution, c.face_type, c.batch_size, c.blur_out_mask, c.ct_mode) == ('liae-udt', 224, 'wf', 32, True, 'rct')
    small = sa.cpu_sized(c)
    assert (small.resolution, small.e_dims, small.gan_patch_size) == (64, 16, 8)
    text = small.summary(iteration=12, model_name='x')
    assert 'Model Summary' in text and 'archi: liae-udt ' in text and 'Current iteration: 12 ' in text
    assert sa.SAEHDConfig.from_summary(text) == small
    assert all(len(l) == len(text.splitlines()[0]) for l in text.splitlines())   # DFL's box: every line as wide
    assert 'ln_dropout' in sa.LECTURE_SUMMARY.replace('lr_dropout', 'ln_dropout') and \
        sa.SAEHDConfig.from_summary(sa.LECTURE_SUMMARY.replace('lr_dropout', 'ln_dropout')).lr_dropout == 'n'   # the lecture's misprint


@pytest.mark.parametrize('kw, msg', [(dict(archi='liae-x'), "archi 'liae-x' is not valid"), (dict(archi='df-ud', resolution=80), 'divisible by 32'),
                                     (dict(archi='liae', true_face_power=0.01), 'no meaning for liae'), (dict(gan_power=6.0), 'gan_power must be'),
                                     (dict(face_type='x'), 'face_type must be'), (dict(ct_mode='xyz'), 'ct_mode must be'),
                                     (dict(archi='original'), 'SAEHD builds df or liae'), (dict(masked_training=1), 'True or False'),
                                     (dict(resolution=24), 'multiple of 16')])
def test_config_refuses(kw, msg):
    with pytest.raises(ValueError, match=msg): _cfg(**kw)


def test_pretrain_overrides_are_shown_and_used():
    c = _cfg(pretrain=True, gan_power=0.5, lr_dropout='y')
    assert c.options()['gan_power'] == 0.0 and c.options()['lr_dropout'] == 'n' and c.options()['uniform_yaw'] is True
    e = c.effective(); assert e.random_warp is False and e.random_src_flip and e.gan_power == 0.0


def test_dfl_optimizer_formulas():
    g = torch.linspace(-1, 1, 1000)
    for kind, expect in (('adabelief', lambda g: -0.1 * (0.1 * g) / (torch.sqrt(0.001 * (0.9 * g) ** 2) + 1e-6)),
                         ('rmsprop', lambda g: -0.1 * g / (torch.sqrt(0.1 * g ** 2) + 1e-6))):
        p = torch.nn.Parameter(torch.zeros(1000)); o = sa.DFLOptimizer([p], lr=0.1, kind=kind); p.grad = g.clone(); o.step()
        assert torch.allclose(p.detach(), expect(g), atol=1e-5)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(5000)); o = sa.DFLOptimizer([p], lr=0.1, lr_dropout=0.3); p.grad = torch.ones(5000); o.step()
    assert abs((p != 0).float().mean().item() - 0.3) < 0.03
    p = torch.nn.Parameter(torch.zeros(10)); o = sa.DFLOptimizer([p], kind='rmsprop', clipnorm=1.0); p.grad = torch.full((10,), 5.0); o.step()
    assert torch.allclose(o.state[p]['a'], 0.1 * (torch.full((10,), 5.0) / math.sqrt(250)) ** 2)
    with pytest.raises(ValueError, match='lr_dropout must be'): sa.DFLOptimizer([p], lr_dropout=0)


def test_discriminators():
    for ps in (4, 8, 16, 28):
        pix, centre = sa.UNetPatchDiscriminator(ps, 3, 4)(torch.rand(1, 3, 64, 64))
        assert pix.shape == (1, 1, 64, 64) and abs(sa._receptive_field(sa.patch_layers(ps)) - ps) <= 2
    for n in (1, 2, 5, 8, 16):   # 1 + n // 8 'SAME' convs of stride 2
        out = n
        for _ in range(1 + n // 8): out = math.ceil(out / 2)
        assert sa.CodeDiscriminator(8, n, 4)(torch.rand(2, 8, n, n)).shape[-1] == out


def test_blur_out_and_style_and_hsv():
    t = torch.rand(2, 3, 32, 32); m = torch.zeros(2, 1, 32, 32); m[..., 8:24, 8:24] = 1
    b = sa.blur_out(t, m, 128)
    assert torch.allclose(b * m, t * m) and ((b - t).abs() * (1 - m)).sum() > 0
    assert sa.style_loss(t, t, 2, 10.).abs().max() < 1e-6 and (sa.style_loss(t, t * 0.5, 2, 10.) > 0).all()
    h = sa.random_hsv(t, 0.3, np.random.default_rng(0)); assert h.shape == t.shape and (h - t).abs().mean() > 0.01


def test_uniform_yaw_sampler_favours_rare_yaws():
    fs = _faceset(0, 40, yaw_shift=0.0)
    lm = fs.landmarks5.clone(); lm[-4:, 2, 0] += 6   # four faces turned far to one side
    fs = SwapFaceSet(fs.images, fs.masks, lm, 0)
    draws = sa.YawSampler(fs)(np.random.default_rng(0), 2000)
    assert (draws >= 36).mean() > 0.3   # 10% of the faces, about half the draws
    assert (np.random.default_rng(0).integers(0, 40, 2000) >= 36).mean() < 0.15   # what plain uniform sampling gives


def test_train_resume_exact_with_discriminators(tmp_path):
    c = _cfg(true_face_power=0.1, gan_power=0.1, face_style_power=1.0, bg_style_power=1.0, blur_out_mask=True, lr_dropout='y')
    s, d = _faceset(0), _faceset(1)
    def run(path, init, on_step=None):
        torch.manual_seed(init)
        return sa.train_saehd(c.build(), s, d, c, steps=6, ckpt_path=path, ckpt_every=2, preview_every=0, verbose=False, disc_ch=8, on_step=on_step)
    full = run(tmp_path / 'a.pt', 0)
    def boom(step, row):
        if step == 3: raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): run(tmp_path / 'b.pt', 0, boom)
    res = run(tmp_path / 'b.pt', 5)
    assert res.resumed_from == 2
    for k, v in full.model.state_dict().items(): assert torch.equal(v, res.model.state_dict()[k]), k
    assert {'true_face', 'gan', 'face_style', 'bg_style'} <= set(full.history.columns)
    assert load_swap_model(tmp_path / 'a.pt').archi == 'df-ud'


def test_liae_inter_ab_frozen_without_warp():
    c = _cfg(archi='liae', random_warp=False)
    m = c.build(); before = [p.clone() for p in m.inter_AB.parameters()]; b_before = [p.clone() for p in m.inter_B.parameters()]
    sa.train_saehd(m, _faceset(0), _faceset(1), c, steps=3, warp_fraction=0.0, preview_every=0, verbose=False)
    assert all(torch.equal(a, b) for a, b in zip(before, m.inter_AB.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(b_before, m.inter_B.parameters()))


def test_from_pretrained_reinitialises_inters():
    c = _cfg(); m = c.build(); st = {k: v + 1 for k, v in m.state_dict().items()}
    f = sa.from_pretrained(c.build(), st)
    assert torch.equal(f.encoder.down[0].conv.weight, st['encoder.down.0.conv.weight'])
    assert not torch.equal(f.inter.fc1.weight, st['inter.fc1.weight'])


def test_train_errors():
    c = _cfg()
    with pytest.raises(ValueError, match='the model is df-ud'): sa.train_saehd(c.build(), _faceset(0), _faceset(1), replace(c, archi='df'), steps=1)
    with pytest.raises(ValueError, match='only 1 faces'): sa.train_saehd(c.build(), _faceset(0).subset([0]), _faceset(1), c, steps=1)
    with pytest.raises(ValueError, match='unknown ablation row'): sa.option_ablation(c, ['nope'])


def test_noise_table_flags_only_real_differences():
    rows = []
    for s in range(3):
        for r, shift in (('ref', 0.0), ('same', 0.001), ('far', 0.3)):
            rows.append(dict(row=r, seed=s, recon_ssim=0.5 + shift + 0.01 * s, identity_transfer=0.5, landmark_nme=0.1, mtcnn_rate=0.5, flicker=1.0))
    nt = sa.noise_table(pd.DataFrame(rows), 'ref')
    assert nt.loc['same', 'noise_recon_ssim'] and not nt.loc['far', 'noise_recon_ssim']
    assert nt.loc['far', 'd_recon_ssim'] == pytest.approx(0.3)
