"""Unit tests of deepfake_course.generate.gan: shapes, the paper's DCGAN, progressive-growing schedule,
modulated convolution, exact resume after an interruption, checkpoint checks (the course's one format), fake sets
through FakeSetWriter, and the MTCNN face rate the GAN notebook judges samples with."""
import json, math
import numpy as np
import pandas as pd
import pytest
import torch

from deepfake_course.generate import gan as G
from deepfake_course import fidelity as FID
from deepfake_course.core import n_params
from deepfake_course.media import read_provenance, resize
from deepfake_course.data.fakes import read_fake_set, resolve_fake_set, read_card
from deepfake_course.data.manifest import MANIFEST_COLUMNS


def _imgs(n=24, size=16, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, c, size, size, generator=g)
    return (0.7 * base + 0.3 * torch.rand(n, c, size, size, generator=g)).clamp(0, 1)


TINY = {
    'dcgan': dict(size=16, ngf=8, ndf=8, batch=8),
    'pggan': dict(size=16, start_res=8, fmap_base=64, fmap_max=16, batch=8, stab=3, fade=3),
    'stylegan': dict(size=16, z_dim=16, w_dim=16, n_mlp=2, channels=8, batch=8, r1_every=4),
    'stargan': dict(size=16, conv_dim=8, n_res=1, batch=8, n_critic=2),
}


def _trainer(name, data=None, **kw):
    data = _imgs() if data is None else data
    labels = (torch.arange(len(data))[:, None] % torch.tensor([2, 3]) == 0).float() if name == 'stargan' else None
    return G.build_generator(name, data, labels=labels, device='cpu', **{**TINY[name], **kw})


def test_bad_datasets():
    with pytest.raises(ValueError, match='empty'): FID.check_images(torch.zeros(0, 3, 16, 16))
    with pytest.raises(ValueError, match='only 1 image'): G.DCGANTrainer(torch.rand(1, 3, 16, 16), size=16)
    with pytest.raises(ValueError, match=r'\[0, 1\]'): FID.check_images(torch.rand(4, 3, 8, 8) * 255)
    with pytest.raises(ValueError, match='channels'): FID.check_images(torch.rand(4, 2, 8, 8))
    with pytest.raises(ValueError, match='N×C×H×W'): FID.check_images(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match='empty'): G.DCGANTrainer(torch.zeros(0, 3, 16, 16), size=16)
    with pytest.raises(ValueError, match='identities'): G.DCGANTrainer(_imgs(), identities=[0, 1], size=16)
    with pytest.raises(ValueError, match='unknown setting'): G.DCGANTrainer(_imgs(), size=16, ngff=3)


@pytest.mark.parametrize('res', [48, 12, 0, 3.0, 2048])
def test_progressive_growing_needs_power_of_two(res):
    with pytest.raises(ValueError, match='power of two'): G.PGGANTrainer(_imgs(size=16), size=res)
    with pytest.raises(ValueError, match='power of two'): G.PGGenerator(res)


def test_other_resolution_errors():
    with pytest.raises(ValueError, match='power of two'): G.DCGANGenerator(size=24)
    with pytest.raises(ValueError, match='power of two'): G.StyleGenerator(40)
    with pytest.raises(ValueError, match='larger than size'): G.PGGANTrainer(_imgs(size=16), size=16, start_res=32)


def test_dcgan_exact_paper_configuration():
    g, d = G.DCGANGenerator(100, 64, 3, 64), G.DCGANDiscriminator(64, 3, 64)
    assert n_params(g) == 3576704 and n_params(d) == 2765568
    assert g(torch.randn(2, 100)).shape == (2, 3, 64, 64) and d(torch.randn(2, 3, 64, 64)).shape == (2,)
    convs = [m for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [512, 256, 128, 64, 3] and all(c.bias is None for c in convs)
    cfg = G.DCGANTrainer.defaults
    assert (cfg['nz'], cfg['ngf'], cfg['ndf'], cfg['batch'], cfg['lr'], cfg['beta1'], cfg['size']) == (100, 64, 64, 64, 2e-4, 0.5, 64)


def test_pg_schedule_and_fade():
    assert G.pg_schedule(0, 1, 3, 10, 10) == (1, 1.0)
    assert G.pg_schedule(15, 1, 3, 10, 10) == (2, 0.5)
    assert G.pg_schedule(25, 1, 3, 10, 10) == (2, 1.0)
    assert G.pg_schedule(1000, 1, 3, 10, 10) == (3, 1.0)
    assert G.pg_total_steps(8, 32, 10, 10) == 50
    g = G.PGGenerator(32, 16, fmap_base=64, fmap_max=16)
    z = torch.randn(4, 16)
    # alpha = 0 is exactly the upscaled previous resolution; alpha = 1 the new block
    lo = g(z, 1, 1.0); mid0 = g(z, 2, 0.0)
    assert torch.allclose(mid0, torch.nn.functional.interpolate(lo, scale_factor=2, mode='nearest'), atol=1e-6)
    d = G.PGDiscriminator(32, fmap_base=64, fmap_max=16)
    assert d(g(z, 3, 0.5), 3, 0.5).shape == (4,)


def test_building_blocks():
    torch.manual_seed(0)
    x = G.PixelNorm()(torch.randn(2, 8, 4, 4) * 5)
    assert torch.allclose(x.pow(2).mean(1), torch.ones(2, 4, 4), atol=1e-4)
    y = G.minibatch_stddev(torch.randn(8, 3, 4, 4))
    assert y.shape == (8, 4, 4, 4) and (y[:, -1] > 0).all()
    mc = G.ModConv2d(8, 16, 3, 4)
    out = mc(torch.randn(4, 8, 8, 8), torch.randn(4, 4) * 10)
    assert abs(out.std().item() - 1) < 0.2  # demodulated: unit variance whatever the style's scale


def test_style_generator_truncation_and_mixing():
    torch.manual_seed(0)
    sg = G.StyleGenerator(16, 8, 8, 2, 8)
    sg.w_avg.normal_()
    z, z2 = torch.randn(3, 8), torch.randn(3, 8)
    assert torch.allclose(sg.styles(z, truncation=0.0), sg.w_avg.expand(3, sg.n_styles, -1))
    a = sg(z, z2, mix_at=0, noise_mode='const'); b = sg(z2, noise_mode='const')
    assert torch.allclose(a, b, atol=1e-5)  # mixing at slot 0 = all styles from z2
    c = sg(z, z2, mix_at=2, noise_mode='const')
    assert not torch.allclose(c, b) and not torch.allclose(c, sg(z, noise_mode='const'))


@pytest.mark.parametrize('name', ['dcgan', 'pggan', 'stylegan', 'stargan'])
def test_interrupted_training_resumes_exactly(name, tmp_path):
    steps = 9  # pggan: levels change at steps 3 and 9 (optimiser reset), stargan: G every 2nd step
    torch.manual_seed(1); a = _trainer(name).fit(steps, verbose=False)

    def interrupt(tr):
        if tr.step == 5: raise KeyboardInterrupt
    torch.manual_seed(1); b = _trainer(name)
    with pytest.raises(KeyboardInterrupt): b.fit(steps, ckpt_dir=tmp_path, ckpt_every=4, callback=interrupt, verbose=False)
    assert (tmp_path / 'checkpoint.pt').exists() and not [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]
    torch.manual_seed(123); c = _trainer(name).fit(steps, ckpt_dir=tmp_path, verbose=False)  # resumes from step 4
    assert c.step == steps and len(c.history) == steps
    for (k, v), v2 in zip(a.sampling_module().state_dict().items(), c.sampling_module().state_dict().values()):
        assert torch.equal(v, v2), f'{name}: {k} differs after resume'
    assert a.history_df.drop(columns=[]).equals(c.history_df)
    # sampling is deterministic given a seed and leaves the global RNG alone
    st = torch.get_rng_state(); s1 = c.sample(4, seed=3); assert torch.equal(st, torch.get_rng_state())
    assert torch.equal(s1, c.sample(4, seed=3)) and s1.min() >= 0 and s1.max() <= 1


def test_checkpoint_of_another_generator_is_refused(tmp_path):
    _trainer('dcgan').fit(2, ckpt_dir=tmp_path, verbose=False)
    ck = tmp_path / 'checkpoint.pt'
    with pytest.raises(G.CheckpointError, match="holds a 'dcgan' model, not 'stylegan'"): _trainer('stylegan').load(ck)
    with pytest.raises(G.CheckpointError, match="'dcgan' model, not 'stylegan'"): _trainer('stylegan').fit(4, ckpt_dir=tmp_path, verbose=False)
    with pytest.raises(G.CheckpointError, match="'dcgan' model built with another configuration.*ngf: checkpoint 8 vs now 4"): _trainer('dcgan', ngf=4).load(ck)
    with pytest.raises(G.CheckpointError, match='another configuration.*data_sha1'): _trainer('dcgan', data=_imgs(seed=5)).load(ck)
    bad = tmp_path / 'bad.pt'; bad.write_bytes(b'not a checkpoint')
    with pytest.raises(G.CheckpointError, match='not a deepfake_course checkpoint|truncated or corrupt'): _trainer('dcgan').load(bad)
    cut = tmp_path / 'cut.pt'; cut.write_bytes(ck.read_bytes()[:2000])  # a half-written file
    with pytest.raises(G.CheckpointError, match='truncated or corrupt'): _trainer('dcgan').load(cut)
    # run_id names a checkpoint folder per configuration and dataset
    assert _trainer('dcgan').run_id == _trainer('dcgan').run_id != _trainer('dcgan', ngf=4).run_id
    assert _trainer('dcgan').run_id.startswith('dcgan-')
    # resume=False starts over even though a checkpoint exists
    assert _trainer('dcgan').fit(1, ckpt_dir=tmp_path, resume=False, verbose=False).step == 1


def test_registry():
    assert set(G.GENERATORS) == {'dcgan', 'pggan', 'stylegan', 'stargan'}
    assert all(G.GENERATORS[k].name == k for k in G.GENERATORS)
    with pytest.raises(KeyError, match='unknown generator'): G.build_generator('biggan', _imgs())
    with pytest.raises(ValueError, match='labels'): G.StarGANTrainer(_imgs(), size=16)
    with pytest.raises(ValueError, match='0 or 1'): G.StarGANTrainer(_imgs(), labels=torch.rand(24, 2), size=16)


def test_stargan_edit_shapes():
    tr = _trainer('stargan')
    out = tr.edit(_imgs(3), torch.tensor([1., 0.]))
    assert out.shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match='2 attributes'): tr.edit(_imgs(3), torch.ones(3, 5))


def test_checkpoint_is_the_course_format(tmp_path):
    from deepfake_course.train import read_checkpoint, model_info
    tr = _trainer('pggan').fit(4, ckpt_dir=tmp_path, ckpt_every=2, verbose=False)
    ck = read_checkpoint(tmp_path / 'checkpoint.pt')  # G, D, the EMA copy and both optimisers: one file, one format
    assert ck['name'] == 'pggan' and ck['parts']['model'] == ['G', 'D', 'G_ema'] and ck['parts']['optimizer'] == ['opt_g', 'opt_d']
    assert ck['config']['data_sha1'] == tr.data_sha1 and ck['config']['fmap_max'] == 16 and ck['step'] == 4 and ck['rng'] is not None
    assert model_info(tmp_path / 'checkpoint.pt')['name'] == 'pggan'
    fresh = _trainer('pggan').load(tmp_path / 'checkpoint.pt')
    assert fresh.step == 4 and fresh.level == tr.level and len(fresh.history) == 4
    assert all(torch.equal(a, b) for a, b in zip(tr.G_ema.state_dict().values(), fresh.G_ema.state_dict().values()))


@pytest.mark.parametrize('name', ['dcgan', 'stargan'])
def test_fake_set(name, tmp_path):
    from PIL import Image
    tr = _trainer(name).fit(2, verbose=False)
    on = {'split': 'train', 'identities': [0, 1]}
    fs = G.make_gan_fake_set(tr, 20, trained_on=on, data_root=tmp_path, seed=0)
    folder = resolve_fake_set(fs, tmp_path)
    assert fs.startswith(f'{name}/') and folder.parent == tmp_path.resolve() / 'fakes' / name
    df = pd.read_csv(folder / 'manifest.csv', keep_default_na=False)
    assert tuple(df.columns[:9]) == MANIFEST_COLUMNS and len(df) == 20
    assert set(df.label) == {1} and set(df.source) == {name} and set(df.kind) == {'image'} and set(df.frame) == {-1}
    assert set(df.split) == {'train', 'val', 'test'} and (df.split == 'train').sum() == 14
    assert set(df.clip_id) == {''} and set(df.identity) == {-1} and set(df.target_identity) == {-1}  # GAN faces are nobody
    if name == 'stargan': assert {'edited_attr', 'new_value', 'source_index'} <= set(df.columns)
    png = folder / df.path[0]
    tags = read_provenance(png)
    assert tags['synthetic'] == 'true' and tags['method'] == name and 'deepfake-course' in tags['software'] and tags['fake_set'] == fs
    with Image.open(png) as im: assert im.mode == 'RGB' and im.size == (16, 16)
    card = read_card(folder)
    assert card['total'] == 20 and card['config']['generator'] == name and card['method'] == name
    assert card['sources']['trained_on']['split'] == 'train' and card['sources']['trained_on']['identities'] == [0, 1]
    assert G.make_gan_fake_set(tr, 20, trained_on=on, data_root=tmp_path, seed=0) == fs  # reused
    assert G.make_gan_fake_set(tr, 10, trained_on=on, data_root=tmp_path, seed=0) != fs  # another request, another set
    assert not [p for p in folder.parent.iterdir() if 'partial' in p.name]
    with pytest.raises(ValueError, match='positive'): G.make_gan_fake_set(tr, 0, trained_on=on, data_root=tmp_path)


def test_fake_set_identities_splits_and_sources(tmp_path):
    on = {'split': 'train'}
    dc = _trainer('dcgan').fit(1, verbose=False)
    with pytest.raises(ValueError, match='trained on'): G.make_gan_fake_set(dc, 4, data_root=tmp_path)  # the card must say
    with pytest.raises(ValueError, match='unknown split'): G.make_gan_fake_set(dc, 4, split='holdout', trained_on=on, data_root=tmp_path)
    with pytest.raises(ValueError, match='one per image'): G.make_gan_fake_set(dc, 4, split=['train', 'test'], trained_on=on, data_root=tmp_path)
    with pytest.raises(ValueError, match='summing to 1'): G.make_gan_fake_set(dc, 4, split=(0.5, 0.5, 0.5), trained_on=on, data_root=tmp_path)
    one = read_fake_set(G.make_gan_fake_set(dc, 4, split='test', trained_on=on, data_root=tmp_path), tmp_path)
    assert set(one.split) == {'test'} and set(one.identity) == {-1}
    per = read_fake_set(G.make_gan_fake_set(dc, 4, split=['train', 'val', 'test', 'test'], trained_on=on, data_root=tmp_path), tmp_path)
    assert per.sort_values('path').split.tolist() == ['train', 'val', 'test', 'test']
    # StarGAN edits keep their source face's identity: fractions are drawn per identity, so no person straddles two splits
    data = _imgs(); ids = torch.arange(len(data)) // 4  # 6 identities
    labels = (torch.arange(len(data))[:, None] % torch.tensor([2, 3]) == 0).float()
    st = G.StarGANTrainer(data, labels=labels, identities=ids, device='cpu', **TINY['stargan']).fit(1, verbose=False)
    name = G.make_gan_fake_set(st, 30, data_root=tmp_path)  # the trainer's identities fill trained_on
    df = read_fake_set(name, tmp_path)
    assert df.identity.min() >= 0 and (df.groupby('identity').split.nunique() == 1).all() and df.split.nunique() > 1
    assert (df.identity.to_numpy() == ids.numpy()[df.source_index.to_numpy()]).all()
    assert read_card(resolve_fake_set(name, tmp_path))['sources']['trained_on']['identities'] == list(range(6))


def test_fake_set_build_failure_leaves_nothing(tmp_path, monkeypatch):
    import deepfake_course.data.fakes as fakes
    tr = _trainer('dcgan').fit(1, verbose=False)
    calls = {'n': 0}
    real = fakes.write_png
    def boom(*a, **k):
        calls['n'] += 1
        if calls['n'] == 5: raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(fakes, 'write_png', boom)
    with pytest.raises(KeyboardInterrupt): G.make_gan_fake_set(tr, 10, trained_on={'split': 'train'}, data_root=tmp_path)
    assert list((tmp_path / 'fakes' / 'dcgan').iterdir()) == []


def test_mtcnn_rate_separates_faces_from_non_faces():
    from skimage import data
    from deepfake_course.quality import mtcnn_rate, mtcnn_face_found
    faces = FID.lfw_faces(40, 32)
    nonfaces = resize(torch.from_numpy(data.lfw_subset()[100:140].astype(np.float32))[:, None], 32)
    assert mtcnn_rate(faces) >= 0.9 and mtcnn_rate(nonfaces) <= 0.1
    found = mtcnn_face_found(faces[:4]); assert found.dtype == bool and found.shape == (4,)
    net = FID.FaceFeatureNet(2, 32, 1)  # gan_quality: the distribution judges and the face rate side by side
    q = G.gan_quality(faces[:20], net.features(faces[20:]), net)
    assert set(q) == {'fd', 'precision', 'recall', 'mtcnn_rate'} and q['mtcnn_rate'] >= 0.9


def test_synth_faces_and_counterfactuals():
    pytest.importorskip('deepfake_course.data.synth')
    f = G.synth_attribute_faces(2, 2, size=32, seed=0)
    assert f['images'].shape == (4, 3, 32, 32) and f['labels'].shape == (4, 2)
    same = G.synth_counterfactual(f, torch.arange(4), f['labels'])
    assert (same - f['images']).abs().max() < 1e-4  # re-rendering with the same attributes reproduces the image
    flipped = G.synth_counterfactual(f, torch.arange(4), 1 - f['labels'])
    assert (flipped - f['images']).abs().mean() > 1e-3
    with pytest.raises(ValueError, match='unknown attribute'): G.synth_attribute_faces(1, 1, attrs=('beard',))
