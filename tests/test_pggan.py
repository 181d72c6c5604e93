"""Unit tests of deepfake_course.generate.pggan (notebook 21a): the growing schedule, the fade-in of G, D and the reals,
clear errors for resolutions it cannot grow to and for wrong checkpoints, and exact resume in the middle of a fade-in."""
import pytest
import torch
import torch.nn.functional as F

from deepfake_course.generate import pggan as P
from deepfake_course.generate import gan as G
from deepfake_course.train import CheckpointError, read_checkpoint, model_info


def _imgs(n=24, size=16, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, c, size, size, generator=g)
    return (0.7 * base + 0.3 * torch.rand(n, c, size, size, generator=g)).clamp(0, 1)


TINY = dict(size=16, start_res=8, fmap_base=64, fmap_max=16, batch=8, stab=3, fade=3)


def _trainer(data=None, **kw):
    return P.PGGANTrainer(_imgs() if data is None else data, device='cpu', **{**TINY, **kw})


@pytest.mark.parametrize('res', [48, 12, 0, 3.0, 2048])
def test_progressive_growing_needs_power_of_two(res):
    with pytest.raises(ValueError, match='power of two'): P.PGGANTrainer(_imgs(size=16), size=res)
    with pytest.raises(ValueError, match='power of two'): P.PGGenerator(res)


def test_resolution_errors_name_the_allowed_ones():
    with pytest.raises(ValueError, match='larger than size'): P.PGGANTrainer(_imgs(size=16), size=16, start_res=32)
    with pytest.raises(ValueError, match='one of 8, 16, 32, 64, 128, 256, 512, 1024'): P.PGGANTrainer(_imgs(size=32), size=24)
    with pytest.raises(ValueError, match='one of 4, 8, 16'): P.PGGANTrainer(_imgs(size=32), size=32, start_res=6)
    with pytest.raises(ValueError, match=r'upscaled images.*\[8, 16\]'): P.PGGANTrainer(_imgs(size=16), size=32)
    with pytest.raises(ValueError, match='power of two'): P.PGGANTrainer(torch.rand(4, 3, 48, 48), size=None)  # size from the data
    g = P.PGGenerator(16, 8, fmap_base=32, fmap_max=8)
    with pytest.raises(ValueError, match=r'levels 0 \(4 px\), 1 \(8 px\), 2 \(16 px\); got level 3'): g(torch.randn(2, 8), 3)
    with pytest.raises(ValueError, match=r'alpha must be in \[0, 1\]'): g(torch.randn(2, 8), 1, -0.5)
    d = P.PGDiscriminator(16, fmap_base=32, fmap_max=8)
    with pytest.raises(ValueError, match='takes 8×8 images'): d(torch.randn(2, 3, 16, 16), 1)
    tr = _trainer()
    with pytest.raises(ValueError, match=r'cannot sample at 32 px: it grows 8→16 px; available: \[8\]'): tr.sample(2, resolution=32)
    with pytest.raises(ValueError, match=r'at step 0 it has grown only to 8 px; available: \[8\]'): tr.sample(2, resolution=16)
    tr.fit(7, verbose=False)  # past the fade-in: 16 px is there now
    assert tr.sample(2, resolution=16).shape == (2, 3, 16, 16) and tr.sample(2, resolution=8, full_size=False).shape == (2, 3, 8, 8)
    for k, v in [('stab', 0), ('fade', 1.5), ('final', -1)]:
        with pytest.raises(ValueError, match=f'{k} must be a positive integer'): _trainer(**{k: v})


def test_pg_schedule_and_fade():
    assert P.pg_schedule(0, 1, 3, 10, 10) == (1, 1.0)
    assert P.pg_schedule(15, 1, 3, 10, 10) == (2, 0.5)
    assert P.pg_schedule(25, 1, 3, 10, 10) == (2, 1.0)
    assert P.pg_schedule(1000, 1, 3, 10, 10) == (3, 1.0)
    assert P.pg_total_steps(8, 32, 10, 10) == 50 and P.pg_total_steps(8, 32, 10, 5, final=40) == 70
    assert P.pg_total_steps(16, 16, 10, 5, final=40) == 40 and P.pg_resolutions(8, 32) == [8, 16, 32]
    g = P.PGGenerator(32, 16, fmap_base=64, fmap_max=16)
    z = torch.randn(4, 16)
    # alpha = 0 is exactly the upscaled previous resolution; alpha = 1 the new block
    lo = g(z, 1, 1.0); mid0 = g(z, 2, 0.0)
    assert torch.allclose(mid0, F.interpolate(lo, scale_factor=2, mode='nearest'), atol=1e-6)
    d = P.PGDiscriminator(32, fmap_base=64, fmap_max=16)
    assert d(g(z, 3, 0.5), 3, 0.5).shape == (4,)


def test_fade_in_is_continuous_for_d_and_the_reals():
    torch.manual_seed(0)
    d = P.PGDiscriminator(32, fmap_base=64, fmap_max=16)
    x = torch.randn(8, 3, 16, 16)
    assert torch.allclose(d(x, 2, 0.0), d(F.avg_pool2d(x, 2), 1, 1.0), atol=1e-5)  # D at α = 0 = the previous stage
    tr = _trainer(size=16)
    real = torch.rand(4, 3, 16, 16)
    faded = tr.real_at(real, 2, 0.0)  # reals at α = 0: the low-resolution image, upscaled (what G makes at α = 0)
    assert torch.allclose(faded, F.interpolate(F.avg_pool2d(real, 2), scale_factor=2, mode='nearest'))
    assert torch.equal(tr.real_at(real, 2, 1.0), real) and tr.real_at(real, 1, 1.0).shape == (4, 3, 8, 8)
    assert torch.allclose(tr.real_at(real, 2, 0.5), 0.5 * real + 0.5 * faded)


def test_no_minibatch_stddev_and_no_wscale():
    d = P.PGDiscriminator(16, fmap_base=32, fmap_max=8, mbstd_group=0)
    assert d.conv_last.weight.shape[1] == 8 and d(torch.randn(3, 3, 16, 16)).shape == (3,)  # any batch size without mbstd
    torch.manual_seed(0); a = P.PGGenerator(16, 8, fmap_base=32, fmap_max=8)
    torch.manual_seed(0); b = P.fold_wscale(P.PGGenerator(16, 8, fmap_base=32, fmap_max=8))
    z = torch.randn(2, 8)
    assert torch.allclose(a(z), b(z), atol=1e-5)  # the same function, the scale now inside the weights
    assert b.conv0.scale == 1.0 and b.conv0.weight.std() < 0.2


def test_registered():
    assert G.generators()['pggan'] is P.PGGANTrainer
    assert isinstance(G.build_generator('pggan', _imgs(), device='cpu', **TINY), P.PGGANTrainer)


def test_interrupted_training_resumes_exactly(tmp_path):
    steps = 9  # levels change at steps 3 and 9 (optimiser reset)
    torch.manual_seed(1); a = _trainer().fit(steps, verbose=False)

    def interrupt(tr):
        if tr.step == 5: raise KeyboardInterrupt
    torch.manual_seed(1); b = _trainer()
    with pytest.raises(KeyboardInterrupt): b.fit(steps, ckpt_dir=tmp_path, ckpt_every=4, callback=interrupt, verbose=False)
    assert (tmp_path / 'checkpoint.pt').exists() and not [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]
    torch.manual_seed(123); c = _trainer().fit(steps, ckpt_dir=tmp_path, verbose=False)  # resumes from step 4
    assert c.step == steps and len(c.history) == steps
    for (k, v), v2 in zip(a.sampling_module().state_dict().items(), c.sampling_module().state_dict().values()):
        assert torch.equal(v, v2), f'{k} differs after resume'
    assert a.history_df.drop(columns=[]).equals(c.history_df)
    st = torch.get_rng_state(); s1 = c.sample(4, seed=3); assert torch.equal(st, torch.get_rng_state())
    assert torch.equal(s1, c.sample(4, seed=3)) and s1.min() >= 0 and s1.max() <= 1


def test_resume_in_the_middle_of_a_fade_in(tmp_path):
    kw = dict(stab=3, fade=6, final=3)  # 8 px for steps 0-2, fade-in 8→16 over steps 3-8, 16 px for steps 9-11
    torch.manual_seed(1); a = _trainer(**kw).fit(12, verbose=False)

    def interrupt(tr):
        if tr.step == 7: raise KeyboardInterrupt
    torch.manual_seed(1); b = _trainer(**kw)
    with pytest.raises(KeyboardInterrupt): b.fit(12, ckpt_dir=tmp_path, ckpt_every=5, callback=interrupt, verbose=False)
    ck = read_checkpoint(tmp_path / 'checkpoint.pt')
    assert ck['step'] == 5 and b.schedule(5) == (2, 2 / 6)  # the checkpoint sits inside the fade-in
    fresh = _trainer(**kw).load(tmp_path / 'checkpoint.pt')
    assert fresh.step == 5 and fresh.level == 2 and fresh.stage() == '8→16 px, fade 33%'
    assert fresh.opt_g.state and fresh.opt_d.state  # Adam's moments of the new stage come back too
    torch.manual_seed(123); c = _trainer(**kw).fit(12, ckpt_dir=tmp_path, verbose=False)
    for m in ('G', 'D', 'G_ema'):
        for (k, v), v2 in zip(a.modules()[m].state_dict().items(), c.modules()[m].state_dict().values()):
            assert torch.equal(v, v2), f'{m}.{k} differs after resuming inside the fade-in'
    for o in ('opt_g', 'opt_d'):
        sa, sc = a.optimizers()[o].state_dict()['state'], c.optimizers()[o].state_dict()['state']
        assert sa.keys() == sc.keys() and all(torch.equal(sa[i]['exp_avg'], sc[i]['exp_avg']) for i in sa)
    assert a.history_df.equals(c.history_df) and list(c.history_df.alpha[3:9].round(3)) == [0.0, 0.167, 0.333, 0.5, 0.667, 0.833]


def test_checkpoint_of_another_gan_or_size_is_refused(tmp_path):
    _trainer().fit(2, ckpt_dir=tmp_path, verbose=False)
    ck = tmp_path / 'checkpoint.pt'
    with pytest.raises(CheckpointError, match="holds a 'pggan' model, not 'dcgan'"):
        G.DCGANTrainer(_imgs(), size=16, ngf=8, ndf=8, device='cpu').load(ck)
    with pytest.raises(CheckpointError, match='size: checkpoint 16 vs now 8'): _trainer(size=8).load(ck)
    with pytest.raises(CheckpointError, match='fmap_max: checkpoint 16 vs now 8'): _trainer(fmap_max=8).fit(4, ckpt_dir=tmp_path, verbose=False)
    dc = tmp_path / 'dc'; G.DCGANTrainer(_imgs(), size=16, ngf=8, ndf=8, batch=8, device='cpu').fit(1, ckpt_dir=dc, verbose=False)
    with pytest.raises(CheckpointError, match="holds a 'dcgan' model, not 'pggan'"): _trainer().load(dc / 'checkpoint.pt')


def test_checkpoint_is_the_course_format(tmp_path):
    tr = _trainer().fit(4, ckpt_dir=tmp_path, ckpt_every=2, verbose=False)
    ck = read_checkpoint(tmp_path / 'checkpoint.pt')  # G, D, the EMA copy and both optimisers: one file, one format
    assert ck['name'] == 'pggan' and ck['parts']['model'] == ['G', 'D', 'G_ema'] and ck['parts']['optimizer'] == ['opt_g', 'opt_d']
    assert ck['config']['data_sha1'] == tr.data_sha1 and ck['config']['fmap_max'] == 16 and ck['step'] == 4 and ck['rng'] is not None
    assert model_info(tmp_path / 'checkpoint.pt')['name'] == 'pggan'
    fresh = _trainer().load(tmp_path / 'checkpoint.pt')
    assert fresh.step == 4 and fresh.level == tr.level and len(fresh.history) == 4
    assert all(torch.equal(a, b) for a, b in zip(tr.G_ema.state_dict().values(), fresh.G_ema.state_dict().values()))


def test_fake_set_records_quality(tmp_path):
    from deepfake_course.data.fakes import read_card, resolve_fake_set
    tr = _trainer().fit(2, verbose=False)
    fs = G.make_gan_fake_set(tr, 6, trained_on={'split': 'train', 'identities': [0]}, data_root=tmp_path, seed=0,
                             quality={'mtcnn_rate': 0.1, 'fd': 50.0})
    card = read_card(resolve_fake_set(fs, tmp_path))
    assert fs.startswith('pggan/') and card['total'] == 6 and card['config']['generator'] == 'pggan'
    assert 'quality' in str(card) and 'meets_bar' in str(card)


def test_torgb_zero_makes_new_layers_start_silent():
    torch.manual_seed(0)
    g = P.PGGenerator(16, 8, fmap_base=32, fmap_max=8, torgb_zero=True)
    z = torch.randn(3, 8)
    assert torch.equal(g(z, 1), torch.zeros(3, 3, 8, 8))
    with torch.no_grad(): g.torgb[1].weight.normal_()  # a trained 8-px stage; the 16-px layer still silent
    lo = g(z, 1)
    assert torch.allclose(g(z, 2, 0.3), 0.7 * F.interpolate(lo, scale_factor=2, mode='nearest'), atol=1e-6)  # fades to flat, not noise
    assert _trainer(torgb_zero=True).G.torgb[0].weight.abs().sum() == 0 and _trainer().G.torgb[0].weight.abs().sum() > 0
