"""Unit tests of deepfake_course.generate.stargan (notebook 21c): StarGAN's networks, the cause of the old
"cyan noise" edits (running InstanceNorm statistics in eval mode), the masked output, edits by attribute name,
the attribute judge, checkpoints (another GAN or size refused; exact resume) and the StarGAN fake set."""
import pandas as pd
import pytest
import torch

from deepfake_course.generate import gan as G
from deepfake_course.generate import stargan as SG
from deepfake_course.data.fakes import read_fake_set, resolve_fake_set, read_card
from deepfake_course.data.manifest import MANIFEST_COLUMNS

TINY = dict(size=16, conv_dim=8, n_res=1, batch=8, n_critic=2)
Q = {'mtcnn_rate': 0.75, 'attr_acc': 0.9, 'l1_rest': 0.02}  # measured quality a fake set's card records (made up)


def _imgs(n=24, size=16, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, c, size, size, generator=g)
    return (0.7 * base + 0.3 * torch.rand(n, c, size, size, generator=g)).clamp(0, 1)


def _labels(n=24): return (torch.arange(n)[:, None] % torch.tensor([2, 3]) == 0).float()


def _trainer(data=None, **kw):
    data = _imgs() if data is None else data
    return G.build_generator('stargan', data, labels=_labels(len(data)), device='cpu',
                             **{**TINY, 'attr_names': ['smile', 'mouth_open'], **kw})


def test_registered_and_bad_labels():
    assert G.GENERATORS['stargan'] is SG.StarGANTrainer  # registered when the module is imported
    with pytest.raises(ValueError, match='labels'): SG.StarGANTrainer(_imgs(), size=16)
    with pytest.raises(ValueError, match='0 or 1'): SG.StarGANTrainer(_imgs(), labels=torch.rand(24, 2), size=16)
    with pytest.raises(ValueError, match='3 attr_names for 2'): _trainer(attr_names=['a', 'b', 'c'])
    with pytest.raises(ValueError, match="output must be one of"): _trainer(output='residual')


def test_networks():
    for out in SG.STAR_OUTPUTS:
        g = SG.StarGenerator(3, 16, 2, output=out)
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        y, m = g(x, torch.tensor([[1., 0, 1], [0, 1, 0]]), with_mask=True)
        assert y.shape == (2, 3, 32, 32) and y.abs().max() <= 1
        assert (m is None) == (out == 'plain')
        if out == 'mask':  # edit = m·colour + (1 − m)·input: where the mask is 0, the input comes through untouched
            assert m.shape == (2, 1, 32, 32) and ((m > 0) & (m < 1)).all()
            with torch.no_grad(): g.to_mask.bias.fill_(-60.0)
            assert torch.allclose(g(x, torch.ones(2, 3)), x, atol=1e-6)
    with pytest.raises(ValueError, match='c must be 2×3'): g(x, torch.ones(2, 2))
    src, cls = SG.StarDiscriminator(32, 3, 16)(x)
    assert src.shape == (2, 1, 2, 2) and cls.shape == (2, 3)


def test_eval_mode_equals_train_mode():
    """The cause of the noisy edits: InstanceNorm with track_running_stats=True normalises by running averages in eval
    mode (edit() calls G.eval()), not by each image's own statistics, so the trained generator behaves differently
    when it edits than when it trained. The fixed generator gives the same output in both modes."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16) * 2 - 1; c = torch.tensor([[1., 0]] * 4)
    for track, same in [(True, False), (False, True)]:
        torch.manual_seed(0)
        g = SG.StarGenerator(2, 8, 1, track_stats=track).train()
        with torch.no_grad():
            for _ in range(3): g(torch.randn(8, 3, 16, 16) * 3 + 1, torch.ones(8, 2))  # running stats drift from x's own
            a = g(x, c); g.eval(); b = g(x, c)
        assert torch.allclose(a, b, atol=1e-5) == same, f'track_stats={track}'
    tr = _trainer().fit(4, verbose=False)  # the trainer's generator: same edit in both modes
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) and m.track_running_stats for m in tr.G.modules())
    e = tr.edit(_imgs(3), torch.tensor([1., 0.]))
    tr.G.train()
    with torch.no_grad(): e2 = ((tr.G(_imgs(3) * 2 - 1, torch.tensor([[1., 0.]] * 3)) + 1) / 2).clamp(0, 1)
    assert torch.allclose(e, e2, atol=1e-6)


def test_edit_shapes_and_names():
    tr = _trainer()
    out = tr.edit(_imgs(3), torch.tensor([1., 0.]))
    assert out.shape == (3, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match='2 attributes'): tr.edit(_imgs(3), torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"not trained on attribute\(s\) \['beard'\]; it knows \['smile', 'mouth_open'\]"):
        tr.edit(_imgs(3), {'beard': 1})
    with pytest.raises(ValueError, match=r"leaves out \['mouth_open'\]"): tr.edit(_imgs(3), {'smile': 1})
    with pytest.raises(ValueError, match='0 or 1'): tr.edit(_imgs(3), torch.full((3, 2), 0.5))
    lab = torch.tensor([[0., 1], [1, 0], [0, 0]])
    assert torch.equal(tr.targets({'smile': 1}, 3, labels=lab), torch.tensor([[1., 1], [1, 0], [1, 0]]))
    assert torch.equal(tr.edit(_imgs(3), {'smile': 1}, labels=lab), tr.edit(_imgs(3), torch.tensor([[1., 1], [1, 0], [1, 0]])))
    assert torch.equal(tr.edit(_imgs(3), {'smile': 1, 'mouth_open': 0}), tr.edit(_imgs(3), torch.tensor([1., 0.])))
    out, m = tr.edit(_imgs(3), {'smile': 0, 'mouth_open': 1}, with_mask=True)
    assert m.shape == (3, 1, 16, 16)
    assert _trainer(output='plain').edit(_imgs(2), torch.tensor([1., 0.]), with_mask=True)[1] is None


@pytest.mark.parametrize('output', ['mask', 'plain'])
def test_interrupted_training_resumes_exactly(output, tmp_path):
    steps = 9  # G every 2nd step
    torch.manual_seed(1); a = _trainer(output=output).fit(steps, verbose=False)

    def interrupt(tr):
        if tr.step == 5: raise KeyboardInterrupt
    torch.manual_seed(1); b = _trainer(output=output)
    with pytest.raises(KeyboardInterrupt): b.fit(steps, ckpt_dir=tmp_path, ckpt_every=4, callback=interrupt, verbose=False)
    assert (tmp_path / 'checkpoint.pt').exists() and not [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]
    torch.manual_seed(123); c = _trainer(output=output).fit(steps, ckpt_dir=tmp_path, verbose=False)  # resumes from step 4
    assert c.step == steps and len(c.history) == steps
    for (k, v), v2 in zip(a.G.state_dict().items(), c.G.state_dict().values()): assert torch.equal(v, v2), f'{k} differs after resume'
    for (k, v), v2 in zip(a.D.state_dict().items(), c.D.state_dict().values()): assert torch.equal(v, v2), f'{k} differs after resume'
    assert a.history_df.equals(c.history_df) and a._last_g == c._last_g
    st = torch.get_rng_state(); s1 = c.sample(4, seed=3); assert torch.equal(st, torch.get_rng_state())
    assert torch.equal(s1, c.sample(4, seed=3)) and s1.min() >= 0 and s1.max() <= 1


def test_checkpoint_of_another_gan_or_size_is_refused(tmp_path):
    _trainer().fit(2, ckpt_dir=tmp_path, verbose=False)
    ck = tmp_path / 'checkpoint.pt'
    with pytest.raises(G.CheckpointError, match="another configuration.*size: checkpoint 16 vs now 32"):
        _trainer(data=_imgs(size=32), size=32).load(ck)
    with pytest.raises(G.CheckpointError, match="another configuration.*output: checkpoint 'mask' vs now 'plain'"):
        _trainer(output='plain').fit(4, ckpt_dir=tmp_path, verbose=False)
    dc = tmp_path / 'dc'
    G.DCGANTrainer(_imgs(), size=16, ngf=8, ndf=8, batch=8, device='cpu').fit(1, ckpt_dir=dc, verbose=False)
    with pytest.raises(G.CheckpointError, match="holds a 'dcgan' model, not 'stargan'"): _trainer().load(dc / 'checkpoint.pt')
    assert _trainer().run_id != _trainer(output='plain').run_id and _trainer().run_id.startswith('stargan-')


def test_star_faces_and_counterfactuals():
    f = SG.star_faces(3, 2, size=16, seed=1, render_size=64)
    assert f['images'].shape == (6, 3, 16, 16) and f['labels'].shape == (6, 2) and f['attrs'] == ['smile', 'mouth_open']
    assert f['values'] == {'smile': SG.STAR_ATTRS['smile'], 'mouth_open': SG.STAR_ATTRS['mouth_open']}
    same = SG.synth_counterfactual(f, torch.arange(6), f['labels'])  # re-rendering with its own labels gives the image back
    assert (same - f['images']).abs().max() < 1e-4
    flipped = SG.synth_counterfactual(f, torch.arange(6), 1 - f['labels'])
    assert ((flipped - f['images']).abs().amax(1) > 0.05).float().mean() > 0.005  # the attributes change some pixels
    with pytest.raises(ValueError, match=r"unknown attribute\(s\) \['beard'\]; known"): SG.star_faces(2, 2, attrs=['beard'])
    with pytest.raises(ValueError, match='target must be 6×2'): SG.synth_counterfactual(f, torch.arange(6), torch.ones(6))


def test_attr_judge(tmp_path):
    f = SG.star_faces(8, 6, size=16, seed=2, render_size=64)
    j = SG.train_attr_judge(f['images'], f['labels'], f['identity'], f['attrs'], epochs=1, width=8, device='cpu', ckpt_dir=tmp_path)
    acc = j.accuracy
    assert acc['n_val_identities'] == 2 and set(acc['val_identities']) <= set(f['identity'].tolist())
    held = torch.isin(f['identity'], torch.tensor(acc['val_identities']))
    sc = j.score(f['images'][held], f['labels'][held])
    assert abs(acc['val_acc'] - (sc['smile'] + sc['mouth_open']) / 2) < 1e-6 and 0 <= acc['val_all'] <= 1
    assert j.predict(f['images'][:5]).shape == (5, 2)
    again = SG.train_attr_judge(f['images'], f['labels'], f['identity'], f['attrs'], epochs=1, width=8, device='cpu', ckpt_dir=tmp_path)
    assert again.accuracy == acc and torch.equal(again.predict(f['images']), j.predict(f['images']))  # loaded, not retrained
    assert len(list(tmp_path.iterdir())) == 1  # one folder per configuration and data
    other = SG.train_attr_judge(f['images'], f['labels'], f['identity'], f['attrs'], epochs=2, width=8, device='cpu', ckpt_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2 and other.accuracy['val_identities'] == acc['val_identities']  # trained anew
    dc = G.DCGANTrainer(_imgs(), size=16, ngf=8, ndf=8, batch=8, device='cpu')
    for ck in tmp_path.glob('*/attr-judge.pt'): dc.save(ck)  # another model's file at the judge's path
    with pytest.raises(G.CheckpointError, match="'dcgan' model, not 'stargan-attr-judge'"):
        SG.train_attr_judge(f['images'], f['labels'], f['identity'], f['attrs'], epochs=1, width=8, device='cpu', ckpt_dir=tmp_path)
    with pytest.raises(ValueError, match='labels must be 48×3'):
        SG.train_attr_judge(f['images'], f['labels'], f['identity'], ['a', 'b', 'c'], epochs=1)


def test_fake_set(tmp_path):
    from PIL import Image
    from deepfake_course.media import read_provenance
    data = _imgs(); ids = torch.arange(len(data)) // 4  # 6 identities
    tr = _trainer(data=data, identities=ids).fit(2, verbose=False)
    fs = G.make_gan_fake_set(tr, 30, data_root=tmp_path, seed=0, quality=Q)  # the trainer's identities fill trained_on
    folder = resolve_fake_set(fs, tmp_path)
    assert fs.startswith('stargan/') and folder.parent == tmp_path.resolve() / 'fakes' / 'stargan'
    df = pd.read_csv(folder / 'manifest.csv', keep_default_na=False)
    assert tuple(df.columns[:9]) == MANIFEST_COLUMNS and len(df) == 30 and set(df.label) == {1} and set(df.source) == {'stargan'}
    assert {'edited_attr', 'new_value', 'source_index'} <= set(df.columns) and set(df.edited_attr) <= {'smile', 'mouth_open'}
    # edits keep their source face's identity; the split is drawn per identity, so no person straddles two splits
    assert (df.identity.to_numpy() == ids.numpy()[df.source_index.to_numpy()]).all()
    assert (df.groupby('identity').split.nunique() == 1).all() and df.split.nunique() > 1
    tags = read_provenance(folder / df.path[0])
    assert tags['method'] == 'stargan' and tags['fake_set'] == fs
    with Image.open(folder / df.path[0]) as im: assert im.mode == 'RGB' and im.size == (16, 16)
    nobody = _trainer().fit(1, verbose=False)  # no identities given: the edits belong to nobody (-1)
    anon = read_fake_set(G.make_gan_fake_set(nobody, 5, trained_on={'split': 'train'}, data_root=tmp_path, quality=Q), tmp_path)
    assert set(anon.identity) == {-1} and set(anon.target_identity) == {-1} and len(anon) == 5
    card = read_card(folder)
    assert card['sources']['trained_on']['identities'] == list(range(6)) and card['sources']['quality']['meets_bar']
    low = read_card(resolve_fake_set(G.make_gan_fake_set(tr, 10, data_root=tmp_path, seed=1,
                                                         quality={**Q, 'l1_rest': 0.21, 'attr_acc': 0.57}), tmp_path))
    assert sorted(low['sources']['quality']['failed']) == ['attr_acc', 'l1_rest']
