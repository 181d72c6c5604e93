"""Unit tests of deepfake_course.generate.gan (notebook 21): the shared GAN machinery (trainer base class, registry,
exact resume, the course's checkpoint format, the judges, quality bars, fake sets through FakeSetWriter) and the
paper's DCGAN. Progressive growing, the style-based generators and StarGAN have their own test files."""
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


TINY = {'dcgan': dict(size=16, ngf=8, ndf=8, batch=8)}
Q = {'mtcnn_rate': 0.75, 'fd': 12.0}  # measured quality a fake set's card records (here: made up, above the bar)


def _trainer(name='dcgan', data=None, **kw):
    data = _imgs() if data is None else data
    return G.build_generator(name, data, device='cpu', **{**TINY[name], **kw})


def test_bad_datasets():
    with pytest.raises(ValueError, match='empty'): FID.check_images(torch.zeros(0, 3, 16, 16))
    with pytest.raises(ValueError, match='only 1 image'): G.DCGANTrainer(torch.rand(1, 3, 16, 16), size=16)
    with pytest.raises(ValueError, match=r'\[0, 1\]'): FID.check_images(torch.rand(4, 3, 8, 8) * 255)
    with pytest.raises(ValueError, match='channels'): FID.check_images(torch.rand(4, 2, 8, 8))
    with pytest.raises(ValueError, match='N×C×H×W'): FID.check_images(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match='empty'): G.DCGANTrainer(torch.zeros(0, 3, 16, 16), size=16)
    with pytest.raises(ValueError, match='identities'): G.DCGANTrainer(_imgs(), identities=[0, 1], size=16)
    with pytest.raises(ValueError, match='unknown setting'): G.DCGANTrainer(_imgs(), size=16, ngff=3)


def test_resolution_errors():
    for res in [48, 12, 0, 3.0, 2048]:
        with pytest.raises(ValueError, match='power of two'): G.DCGANGenerator(size=res)
        with pytest.raises(ValueError, match='power of two'): G.check_resolution(res)
    with pytest.raises(ValueError, match='power of two'): G.DCGANTrainer(_imgs(), size=24)


def test_dcgan_exact_paper_configuration():
    g, d = G.DCGANGenerator(100, 64, 3, 64), G.DCGANDiscriminator(64, 3, 64)
    assert n_params(g) == 3576704 and n_params(d) == 2765568
    assert g(torch.randn(2, 100)).shape == (2, 3, 64, 64) and d(torch.randn(2, 3, 64, 64)).shape == (2,)
    convs = [m for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [512, 256, 128, 64, 3] and all(c.bias is None for c in convs)
    cfg = G.DCGANTrainer.defaults
    assert (cfg['nz'], cfg['ngf'], cfg['ndf'], cfg['batch'], cfg['lr'], cfg['beta1'], cfg['size']) == (100, 64, 64, 64, 2e-4, 0.5, 64)


def test_building_blocks():
    torch.manual_seed(0)
    x = G.PixelNorm()(torch.randn(2, 8, 4, 4) * 5)
    assert torch.allclose(x.pow(2).mean(1), torch.ones(2, 4, 4), atol=1e-4)
    y = G.minibatch_stddev(torch.randn(8, 3, 4, 4))
    assert y.shape == (8, 4, 4, 4) and (y[:, -1] > 0).all()
    assert abs(G.EqLinear(512, 512)(torch.randn(256, 512)).std().item() - math.sqrt(2)) < 0.1  # He: variance × gain²
    assert abs(G.EqConv2d(64, 64, 3, gain=1)(torch.randn(16, 64, 8, 8)).std().item() - 1) < 0.1


def test_judge(tmp_path):
    f = G.synth_attribute_faces(6, 4, size=16, seed=0)
    j = G.GANJudge(f['images'], f['identity'], size=16, n_eval=8, feat_epochs=1, device='cpu', data_root=tmp_path, verbose=False)
    assert len(j.ref_idx) == len(j.alt_idx) == 8 and not set(j.ref_idx.tolist()) & set(j.alt_idx.tolist())
    assert set(j.real) == {'fd', 'precision', 'recall', 'mtcnn_rate'} and j.fd_floor >= 0
    assert list((tmp_path / 'models' / 'gan-judge').iterdir())  # the feature network is cached in the data root
    noise = torch.rand(8, 3, 16, 16)
    assert j(noise, mtcnn=False)['fd'] > j.fd_floor  # noise is further from the real faces than other real faces are
    big = j(resize(f['images'][:8], 64), mtcnn=False)  # any sample size: the features are taken at the judge's size
    assert big['fd'] < j(noise, mtcnn=False)['fd']
    tr = G.DCGANTrainer(f['images'], size=16, ngf=8, ndf=8, batch=8, device='cpu')
    assert set(j.of(tr, n=8)) == {'fd', 'precision', 'recall', 'mtcnn_rate'}
    with pytest.raises(ValueError, match='identities of shape'): G.GANJudge(f['images'], [0, 1], size=16, data_root=tmp_path)
    with pytest.raises(ValueError, match='one identity'): G.GANJudge(f['images'], [3] * 24, size=16, data_root=tmp_path)
    j2 = G.GANJudge(f['images'], f['identity'], size=16, n_eval=8, feat_epochs=1, device='cpu', data_root=tmp_path, verbose=False)
    assert j2.fd_floor == j.fd_floor  # loaded, not retrained: the same network


def test_interrupted_training_resumes_exactly(tmp_path):
    name, steps = 'dcgan', 9
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
    class Other(G.DCGANTrainer): name = 'other-gan'  # another generator with the same networks
    with pytest.raises(G.CheckpointError, match="holds a 'dcgan' model, not 'other-gan'"): Other(_imgs(), **TINY['dcgan']).load(ck)
    with pytest.raises(G.CheckpointError, match="'dcgan' model, not 'other-gan'"): Other(_imgs(), **TINY['dcgan']).fit(4, ckpt_dir=tmp_path, verbose=False)
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


def test_registry(tmp_path):
    gens = G.generators()  # imports every generator module of the course
    assert set(gens) == {'dcgan', 'pggan', 'stylegan', 'stylegan2', 'stargan', 'dcgan-transpose', 'dcgan-nearest', 'dcgan-bilinear',
                         'ddpm', 'ldm'}
    assert all(gens[k].name == k and issubclass(gens[k], G.GANTrainer) for k in gens)
    assert {gens[k].__module__.rsplit('.', 1)[1] for k in gens} == {'gan', 'pggan', 'stylegan', 'stylegan2', 'stargan', 'attribution', 'diffusion'}
    with pytest.raises(KeyError, match='unknown generator.*dcgan'): G.build_generator('biggan', _imgs())
    with pytest.raises(TypeError, match='not a GANTrainer'): G.register_generator(dict)
    class Clash(G.DCGANTrainer): name = 'dcgan'
    with pytest.raises(ValueError, match="'dcgan' is taken"): G.register_generator(Clash)
    assert G.GENERATORS['dcgan'] is G.DCGANTrainer and G.register_generator(G.DCGANTrainer) is G.DCGANTrainer
    tr = _trainer()
    assert G.gan_model_dir(tr, tmp_path) == tmp_path / 'models' / 'gan' / tr.run_id


def test_quality_verdict():
    v = G.quality_verdict({'mtcnn_rate': 0.61, 'fd': 30.0, 'precision': 0.5})
    assert v['meets_bar'] and v['failed'] == [] and v['bars'] == {'mtcnn_rate': ['>=', 0.6]} and v['figures']['fd'] == 30.0
    v = G.quality_verdict({'mtcnn_rate': 0.9, 'attr_acc': 0.7, 'l1_rest': 0.06})
    assert not v['meets_bar'] and v['failed'] == ['attr_acc', 'l1_rest']
    assert G.quality_verdict({'mtcnn_rate': 0.9, 'l1_rest': 0.05})['meets_bar']  # the bars are inclusive
    with pytest.raises(ValueError, match='measured quality'): G.quality_verdict(None)
    with pytest.raises(ValueError, match='measured quality'): G.quality_verdict({'fd': 3.0})
    with pytest.raises(ValueError, match='finite'): G.quality_verdict({'mtcnn_rate': float('nan')})


def test_fake_set(tmp_path):
    from PIL import Image
    name = 'dcgan'
    tr = _trainer(name).fit(2, verbose=False)
    on = {'split': 'train', 'identities': [0, 1]}
    with pytest.raises(ValueError, match='measured quality'): G.make_gan_fake_set(tr, 20, trained_on=on, data_root=tmp_path)
    fs = G.make_gan_fake_set(tr, 20, trained_on=on, data_root=tmp_path, seed=0, quality=Q)
    folder = resolve_fake_set(fs, tmp_path)
    assert fs.startswith(f'{name}/') and folder.parent == tmp_path.resolve() / 'fakes' / name
    df = pd.read_csv(folder / 'manifest.csv', keep_default_na=False)
    assert tuple(df.columns[:9]) == MANIFEST_COLUMNS and len(df) == 20
    assert set(df.label) == {1} and set(df.source) == {name} and set(df.kind) == {'image'} and set(df.frame) == {-1}
    assert set(df.split) == {'train', 'val', 'test'} and (df.split == 'train').sum() == 14
    assert set(df.clip_id) == {''} and set(df.identity) == {-1} and set(df.target_identity) == {-1}  # GAN faces are nobody
    png = folder / df.path[0]
    tags = read_provenance(png)
    assert tags['synthetic'] == 'true' and tags['method'] == name and 'deepfake-course' in tags['software'] and tags['fake_set'] == fs
    with Image.open(png) as im: assert im.mode == 'RGB' and im.size == (16, 16)
    card = read_card(folder)
    assert card['total'] == 20 and card['config']['generator'] == name and card['method'] == name
    assert card['sources']['trained_on']['split'] == 'train' and card['sources']['trained_on']['identities'] == [0, 1]
    assert card['sources']['quality'] == G.quality_verdict(Q) and 'BELOW' not in card['description']
    assert G.make_gan_fake_set(tr, 20, trained_on=on, data_root=tmp_path, seed=0, quality=Q) == fs  # reused
    assert G.make_gan_fake_set(tr, 10, trained_on=on, data_root=tmp_path, seed=0, quality=Q) != fs  # another request, another set
    low = read_card(resolve_fake_set(G.make_gan_fake_set(tr, 10, trained_on=on, data_root=tmp_path, seed=1,
                                                         quality={'mtcnn_rate': 0.1}), tmp_path))
    assert low['sources']['quality']['failed'] == ['mtcnn_rate'] and 'BELOW ITS QUALITY BAR (mtcnn_rate)' in low['description']
    from deepfake_course.data.fakes import BelowQualityBar
    with pytest.warns(BelowQualityBar, match=r'below its generator.s quality bar: mtcnn_rate 0.1 \(bar >= 0.6\)'):
        got = read_fake_set(low['name'], tmp_path)
    assert got.attrs['quality']['meets_bar'] is False
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error', BelowQualityBar); assert read_fake_set(fs, tmp_path).attrs['quality']['meets_bar']
    assert not [p for p in folder.parent.iterdir() if 'partial' in p.name]
    with pytest.raises(ValueError, match='positive'): G.make_gan_fake_set(tr, 0, trained_on=on, data_root=tmp_path, quality=Q)


def test_fake_set_identities_splits_and_sources(tmp_path):
    on = {'split': 'train'}
    dc = _trainer('dcgan').fit(1, verbose=False)
    with pytest.raises(ValueError, match='trained on'): G.make_gan_fake_set(dc, 4, data_root=tmp_path, quality=Q)  # the card must say
    with pytest.raises(ValueError, match='unknown split'): G.make_gan_fake_set(dc, 4, split='holdout', trained_on=on, data_root=tmp_path, quality=Q)
    with pytest.raises(ValueError, match='one per image'): G.make_gan_fake_set(dc, 4, split=['train', 'test'], trained_on=on, data_root=tmp_path, quality=Q)
    with pytest.raises(ValueError, match='summing to 1'): G.make_gan_fake_set(dc, 4, split=(0.5, 0.5, 0.5), trained_on=on, data_root=tmp_path, quality=Q)
    one = read_fake_set(G.make_gan_fake_set(dc, 4, split='test', trained_on=on, data_root=tmp_path, quality=Q), tmp_path)
    assert set(one.split) == {'test'} and set(one.identity) == {-1}
    per = read_fake_set(G.make_gan_fake_set(dc, 4, split=['train', 'val', 'test', 'test'], trained_on=on, data_root=tmp_path, quality=Q), tmp_path)
    assert per.sort_values('path').split.tolist() == ['train', 'val', 'test', 'test']
    # images that show someone (StarGAN edits keep their source face): fractions are drawn per identity, so no person straddles two splits
    ids = (torch.arange(30) // 5).tolist()  # 6 identities
    df = read_fake_set(G.make_gan_fake_set(dc, 30, identity=ids, trained_on=on, data_root=tmp_path, quality=Q), tmp_path)
    assert df.identity.min() >= 0 and (df.groupby('identity').split.nunique() == 1).all() and df.split.nunique() > 1
    assert sorted(df.identity.tolist()) == sorted(ids)
    # the trainer's own identities fill trained_on
    data = _imgs(); tids = torch.arange(len(data)) // 4
    named = G.DCGANTrainer(data, identities=tids, device='cpu', **TINY['dcgan']).fit(1, verbose=False)
    name = G.make_gan_fake_set(named, 6, data_root=tmp_path, quality=Q)
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
    with pytest.raises(KeyboardInterrupt): G.make_gan_fake_set(tr, 10, trained_on={'split': 'train'}, data_root=tmp_path, quality=Q)
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


def _notebook_parameters(stem: str) -> dict:
    "The defaults of a notebook's papermill parameters cell (name → value), read with ast."
    import ast, json
    from pathlib import Path
    nb = json.loads((Path(__file__).parent.parent / 'nbs' / f'{stem}.ipynb').read_text())
    cell = next(c for c in nb['cells'] if 'parameters' in c.get('metadata', {}).get('tags', []))
    out = {}
    for node in ast.parse(''.join(cell['source'])).body:
        if isinstance(node, ast.AnnAssign) and node.value is not None: out[node.target.id] = ast.literal_eval(node.value)
        elif isinstance(node, ast.Assign): out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def test_course_recipes_take_their_lectures_defaults():
    "A later lecture's `course_gan(name)` must train (or find) exactly what the lecture trains at its defaults."
    from deepfake_course.generate.gan import _recipes, course_params
    recipes = _recipes()
    assert set(recipes) == {'dcgan', 'pggan', 'stylegan', 'stylegan2', 'stargan', 'ddpm', 'ldm'}
    for name, fn in recipes.items():
        nb = _notebook_parameters(fn.notebook)
        params = course_params(name)
        assert params, name
        missing = sorted(set(params) - set(nb))
        assert not missing, f'{name}: recipe parameters {missing} are not parameters of {fn.notebook}'
        differ = {k: (v, nb[k]) for k, v in params.items() if nb[k] != v}
        assert not differ, f'{name}: recipe defaults differ from {fn.notebook} (recipe, notebook): {differ}'


def test_course_gan_refuses_unknown_names(tmp_path):
    from deepfake_course.generate.gan import course_gan
    with pytest.raises(KeyError, match='known: dcgan'):
        course_gan('biggan', tmp_path)
    with pytest.raises(TypeError, match='pg_stab'):
        course_gan('pggan', tmp_path, pg_stabb=3)
