"""Unit tests of deepfake_course.generate.stylegan and .stylegan2: StyleGAN (AdaIN) and StyleGAN2 (modulated convolution,
path-length regularisation) as two registered models; truncation and mixing; lazy-regularisation corrections;
exact resume after an interruption; checkpoints of another GAN or size refused; their fake sets."""
import math
import pytest
import torch

from deepfake_course.generate import gan as G
from deepfake_course.generate import stylegan as SG
from deepfake_course.generate import stylegan2 as SG2
from deepfake_course.data.fakes import read_fake_set, resolve_fake_set, read_card


def _imgs(n=24, size=16, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, c, size, size, generator=g)
    return (0.7 * base + 0.3 * torch.rand(n, c, size, size, generator=g)).clamp(0, 1)


TINY = dict(size=16, z_dim=16, w_dim=16, n_mlp=2, channels=8, batch=8, r1_every=4)
NAMES = ['stylegan', 'stylegan2']


def _trainer(name, data=None, **kw):
    return G.build_generator(name, _imgs() if data is None else data, device='cpu', **{**TINY, **kw})


def test_registered_as_two_models():
    gens = G.GENERATORS  # filled by importing the module (G.generators() imports every GAN module)
    assert gens['stylegan'] is SG.StyleGANTrainer and gens['stylegan2'] is SG2.StyleGAN2Trainer
    v1, v2 = _trainer('stylegan'), _trainer('stylegan2')
    assert isinstance(v1.G, SG.StyleGANGenerator) and isinstance(v1.D, SG.StyleGANDiscriminator)
    assert isinstance(v2.G, SG2.StyleGAN2Generator) and isinstance(v2.D, SG2.StyleGAN2Discriminator)
    assert not any(isinstance(m, SG2.ModConv2d) for m in v1.G.modules())  # v1: AdaIN, no modulated conv
    assert not any(isinstance(m, SG.AdaIN) for m in v2.G.modules())  # v2: no AdaIN
    assert v1.run_id != v2.run_id


def test_resolution_errors():
    for cls in (SG.StyleGANGenerator, SG2.StyleGAN2Generator):
        with pytest.raises(ValueError, match='power of two'): cls(40)
    with pytest.raises(ValueError, match='power of two'): _trainer('stylegan2', size=24)


def test_modulated_conv_demodulates_and_forms_agree():
    torch.manual_seed(0)
    mc = SG2.ModConv2d(8, 16, 3, 4)
    out = mc(torch.randn(4, 8, 8, 8), torch.randn(4, 4) * 10)
    assert abs(out.std().item() - 1) < 0.2  # demodulated: unit variance whatever the style's scale
    x, w = torch.randn(3, 8, 8, 8), torch.randn(3, 4)
    assert torch.allclose(mc(x, w), mc(x, w, grouped=True), atol=1e-4)
    up = SG2.ModConv2d(8, 16, 3, 4, up=True)
    assert torch.allclose(up(x, w), up(x, w, grouped=True), atol=1e-4) and up(x, w).shape == (3, 16, 16, 16)
    rgb = SG2.ModConv2d(8, 3, 1, 4, demodulate=False)
    assert torch.allclose(rgb(x, w), rgb(x, w, grouped=True), atol=1e-4)


def test_adain_normalises_and_forgets_channel_strength():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6) * 5 + 2
    ada = SG.AdaIN(8, 4); w = torch.randn(2, 4)
    ys, yb = ada.affine(w).chunk(2, 1)
    y = ada(x, w)
    assert torch.allclose(y.mean([2, 3]), yb, atol=1e-4) and torch.allclose(y.std([2, 3], unbiased=False), (ys + 1).abs(), atol=1e-3)
    x2 = x.clone(); x2[:, 0] *= 10
    assert torch.allclose(ada(x2, w), ada(x, w), atol=1e-4)  # AdaIN: a channel's strength is lost (the droplets' cause)
    mc = SG2.ModConv2d(8, 8, 3, 4)
    assert not torch.allclose(mc(x2, w), mc(x, w), atol=1e-2)  # demodulation keeps it


def test_truncation_and_mixing():
    torch.manual_seed(0)
    for cls in (SG.StyleGANGenerator, SG2.StyleGAN2Generator):
        sg = cls(16, 8, 8, 2, 8); sg.w_avg.normal_()
        assert sg.n_styles == 6
        z, z2 = torch.randn(3, 8), torch.randn(3, 8)
        assert torch.allclose(sg.styles(z, truncation=0.0), sg.w_avg.expand(3, sg.n_styles, -1))
        a = sg(z, z2, mix_at=0, noise_mode='const'); b = sg(z2, noise_mode='const')
        assert torch.allclose(a, b, atol=1e-5)  # mixing at slot 0 = all styles from z2
        c = sg(z, z2, mix_at=2, noise_mode='const')
        assert not torch.allclose(c, b) and not torch.allclose(c, sg(z, noise_mode='const'))
        for bad in (-0.01, 1.01, 2, float('nan'), '0.5', None):
            with pytest.raises(ValueError, match=r'truncation psi must be a number in \[0, 1\]'): sg.styles(z, truncation=bad)
        with pytest.raises(ValueError, match='mix_at'): sg(z, z2, mix_at=None)


@pytest.mark.parametrize('name', NAMES)
def test_sample_refuses_bad_truncation(name):
    tr = _trainer(name)
    for bad in (1.5, -0.2):
        with pytest.raises(ValueError, match='truncation psi'): tr.sample(2, truncation=bad)
    assert tr.sample(2, truncation=0.5).shape == (2, 3, 16, 16)


def test_lazy_regularisation_and_path_length():
    v1, v2 = _trainer('stylegan'), _trainer('stylegan2')  # r1_every 4: D at 4/5; path length every 4: G at 4/5
    for opt, k in [(v2.opt_d, 4), (v2.opt_g, 4), (v1.opt_d, 4)]:
        g = opt.param_groups[0]
        assert math.isclose(g['lr'], 2e-3 * k / (k + 1)) and math.isclose(g['betas'][1], 0.99 ** (k / (k + 1)))
    assert v1.opt_g.param_groups[0]['lr'] == 2e-3  # StyleGAN has no G regulariser
    assert _trainer('stylegan2', pl_weight=0).opt_g.param_groups[0]['lr'] == 2e-3
    torch.manual_seed(0)
    pen, lengths = v2.path_length_penalty(4)
    assert math.isclose(v2.pl_mean, 0.01 * lengths.mean().item(), rel_tol=1e-6) and pen.item() >= 0
    v2.fit(5, verbose=False)
    pl = v2.history_df.pl
    assert pl.isna().sum() == 0 and pl.nunique() == 2  # computed at steps 0 and 4 only (every 4), kept in between
    assert (v2.history_df.pl_mean > 0).all()


@pytest.mark.parametrize('name', NAMES)
def test_interrupted_training_resumes_exactly(name, tmp_path):
    steps = 9  # R1 and path length at steps 0, 4, 8
    torch.manual_seed(1); a = _trainer(name).fit(steps, verbose=False)

    def interrupt(tr):
        if tr.step == 5: raise KeyboardInterrupt
    torch.manual_seed(1); b = _trainer(name)
    with pytest.raises(KeyboardInterrupt): b.fit(steps, ckpt_dir=tmp_path, ckpt_every=4, callback=interrupt, verbose=False)
    assert (tmp_path / 'checkpoint.pt').exists()
    torch.manual_seed(123); c = _trainer(name).fit(steps, ckpt_dir=tmp_path, verbose=False)  # resumes from step 4
    assert c.step == steps and len(c.history) == steps
    for (k, v), v2 in zip(a.G_ema.state_dict().items(), c.G_ema.state_dict().values()):
        assert torch.equal(v, v2), f'{name}: {k} differs after resume'
    for (k, v), v2 in zip(a.D.state_dict().items(), c.D.state_dict().values()): assert torch.equal(v, v2), k
    assert torch.equal(a.G.w_avg, c.G.w_avg) and a.history_df.equals(c.history_df)
    if name == 'stylegan2': assert a.pl_mean == c.pl_mean
    st = torch.get_rng_state(); s1 = c.sample(4, seed=3, truncation=0.7); assert torch.equal(st, torch.get_rng_state())
    assert torch.equal(s1, c.sample(4, seed=3, truncation=0.7)) and s1.min() >= 0 and s1.max() <= 1


def test_checkpoint_of_another_gan_or_size_is_refused(tmp_path):
    _trainer('stylegan').fit(2, ckpt_dir=tmp_path, verbose=False)
    ck = tmp_path / 'checkpoint.pt'
    with pytest.raises(SG.CheckpointError, match="holds a 'stylegan' model, not 'stylegan2'"): _trainer('stylegan2').load(ck)
    with pytest.raises(SG.CheckpointError, match="'stylegan' model, not 'stylegan2'"): _trainer('stylegan2').fit(4, ckpt_dir=tmp_path, verbose=False)
    with pytest.raises(SG.CheckpointError, match='another configuration.*size: checkpoint 16 vs now 8'): _trainer('stylegan', size=8).load(ck)
    with pytest.raises(SG.CheckpointError, match='another configuration.*channels'): _trainer('stylegan', channels=4).load(ck)
    dc = tmp_path / 'dc'; G.build_generator('dcgan', _imgs(), device='cpu', size=16, ngf=8, ndf=8, batch=8).fit(1, ckpt_dir=dc, verbose=False)
    with pytest.raises(SG.CheckpointError, match="holds a 'dcgan' model, not 'stylegan'"): _trainer('stylegan').load(dc / 'checkpoint.pt')


def test_gan_model_dir_caches_the_trained_generator(tmp_path):
    a = _trainer('stylegan2').fit(3, ckpt_dir=G.gan_model_dir(_trainer('stylegan2'), tmp_path), verbose=False)
    b = _trainer('stylegan2')
    d = G.gan_model_dir(b, tmp_path)
    assert d == tmp_path.resolve() / 'models' / 'gan' / a.run_id and (d / 'checkpoint.pt').exists()
    b.fit(3, ckpt_dir=d, verbose=False)  # finds the finished run: no training
    assert b.step == 3 and all(torch.equal(x, y) for x, y in zip(a.G_ema.state_dict().values(), b.G_ema.state_dict().values()))


@pytest.mark.parametrize('name', NAMES)
def test_fake_set_records_quality_and_truncation(name, tmp_path):
    tr = _trainer(name).fit(2, verbose=False)
    on = {'split': 'train', 'identities': [0, 1]}
    fs = G.make_gan_fake_set(tr, 12, trained_on=on, data_root=tmp_path, seed=0, truncation=0.7, quality={'mtcnn_rate': 0.1, 'fd': 50.0})
    df = read_fake_set(fs, tmp_path)
    assert fs.startswith(f'{name}/') and len(df) == 12 and set(df.source) == {name} and set(df.identity) == {-1}
    card = read_card(resolve_fake_set(fs, tmp_path))
    assert card['config']['sample'] == {'truncation': 0.7} and card['config']['generator'] == name
    assert 'BELOW ITS QUALITY BAR' in card['description']
    other = G.make_gan_fake_set(tr, 12, trained_on=on, data_root=tmp_path, seed=0, truncation=1.0, quality={'mtcnn_rate': 0.1})
    assert other != fs  # another ψ, another set
    with pytest.raises(ValueError, match='truncation psi'):
        G.make_gan_fake_set(tr, 4, trained_on=on, data_root=tmp_path, truncation=1.3, quality={'mtcnn_rate': 0.9})


@pytest.mark.parametrize('name', NAMES)
def test_sample_ema_false_uses_the_trained_generator(name):
    "`sample(ema=False)` draws from G, `ema=True` (default) from G_ema: after a few steps with EMA 0.995 they differ."
    tr = _trainer(name)
    tr.fit(3)
    z = torch.randn(4, TINY['z_dim'], generator=torch.Generator().manual_seed(1))
    a, b = tr.sample(z=z, noise_mode='const'), tr.sample(z=z, noise_mode='const', ema=False)
    assert torch.equal(a, tr.sample(z=z, noise_mode='const', ema=True))
    assert not torch.allclose(a, b)
    with torch.no_grad():
        expect = ((tr.G(z, None, None, 1.0, None, 'const').clamp(-1, 1) + 1) / 2).clamp(0, 1)
    assert torch.allclose(b, expect, atol=1e-6)
