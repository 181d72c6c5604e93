"""Unit tests of deepfake_course.generate.idswap (SimSwap-mini): shapes, identity injection, bad input, exact resume,
checkpoint checks, fake sets. Tiny sizes: the whole file runs in seconds on one thread."""
import numpy as np
import pandas as pd
import pytest
import torch

from deepfake_course.generate import idswap as ids
from deepfake_course.train import CheckpointError, read_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures('one_thread')
TINY = dict(base=8, max_ch=16, n_blocks=1)


@pytest.fixture(scope='module')
def faces():
    "3 people x 3 pictures at 32 px, with counterfactuals."
    return ids.render_aligned(range(100_000, 100_003), 3, size=32, render_size=64, seed=0, counterfactual=True)


@pytest.fixture(scope='module')
def enc():
    torch.manual_seed(0)
    return ids.IdentityEncoder(32, 4, 16).eval()


def test_aligned_faces(faces):
    assert faces.images.shape == (9, 3, 32, 32) and faces.masks.shape == (9, 1, 32, 32)
    assert faces.landmarks68.shape == (9, 68, 2) and faces.identities == [100_000, 100_001, 100_002]
    assert faces.cf_images.shape == faces.images.shape and (faces.cf_identity != faces.identity).all()
    # a counterfactual is the same picture of another person (pose, light, background): closer to its original than another picture is
    assert (faces.images - faces.cf_images).abs().mean() < 0.8 * (faces.images - faces.images.roll(1, 0)).abs().mean()
    assert len(faces.of(100_001)) == 3 and len(faces.subset([0, 4])) == 2
    with pytest.raises(ValueError, match='no faces of identity 7'): faces.of(7)
    with pytest.raises(ValueError, match='at least 2 identities'): ids.render_aligned([5], 1, 32, 64, counterfactual=True)


def test_identity_encoder_and_margin(faces, enc):
    e = enc(faces.images)
    assert e.shape == (9, 16) and torch.allclose(e.norm(dim=1), torch.ones(9), atol=1e-5)
    with pytest.raises(ValueError, match='expects N x 3 x 32 x 32'): enc(torch.rand(1, 3, 64, 64))
    cos, y = torch.tensor([[0.5, 0.1]]), torch.tensor([0])
    assert ids.margin_loss(cos, y, 30, 0.35) > ids.margin_loss(cos, y, 30, 0.0)
    assert ids.margin_loss(cos, y, 30, 0.5, 'arcface') > ids.margin_loss(cos, y, 30, 0.0, 'arcface')
    with pytest.raises(ValueError, match="'cosface' or 'arcface'"): ids.margin_loss(cos, y, kind='x')
    with pytest.raises(ValueError, match='too few faces'): ids.train_identity_encoder(faces.subset([0, 3]), epochs=1)


def test_train_identity_encoder_caches(faces, tmp_path):
    kw = dict(epochs=1, batch_size=4, width=4, dim=16, device='cpu', ckpt_dir=tmp_path)
    a = ids.train_identity_encoder(faces, **kw)
    assert (tmp_path / 'identity-encoder.pt').exists() and read_checkpoint(tmp_path / 'identity-encoder.pt')['name'] == ids.IDENC
    b = ids.train_identity_encoder(faces, **kw)                      # loaded, not retrained
    for k, v in a.state_dict().items(): assert torch.equal(v, b.state_dict()[k]), k
    with pytest.raises(CheckpointError, match='another configuration'): ids.train_identity_encoder(faces, **dict(kw, epochs=2))
    v = ids.verification(b, faces, n_pairs=20)
    assert 0 <= v['auc'] <= 1 and len(v['same']) == 20


def test_generator_shapes_injection_and_errors(faces, enc):
    G = ids.SimSwapGenerator(32, 16, residual=True, **TINY).eval()
    x, v = faces.images[:2], enc(faces.images[[3, 6]])
    img, m = G(x, v)
    assert img.shape == (2, 3, 32, 32) and m.shape == (2, 1, 32, 32) and 0 <= m.min() and m.max() <= 1
    assert torch.allclose(img, x.clamp(1e-3, 1 - 1e-3), atol=1e-4)            # residual: the untrained generator returns its target
    with torch.no_grad(): G.last[1].weight.normal_(0, 0.05)
    assert not torch.allclose(G(x, v)[0], G(x, v.flip(0))[0], atol=1e-4)      # AdaIN: another identity, another output
    assert G(x, v[0])[0].shape == (2, 3, 32, 32)                               # one vector for every face
    with pytest.raises(ValueError, match='takes identity vectors of size 16'): G(x, torch.rand(2, 128))
    with pytest.raises(ValueError, match='3 identity vectors for 2 faces'): G(x, torch.rand(3, 16))
    with pytest.raises(ValueError, match='divisible by 2\\*\\*n_down'): ids.SimSwapGenerator(36, 16, **TINY)
    G2 = ids.SimSwapGenerator(32, 16, predict_mask=False, **TINY)
    assert G2(x, v)[1].eq(1).all()
    assert not torch.allclose(G2(x, v)[0], G2(x, v.flip(0))[0], atol=1e-4)   # the default (not residual): the identity matters from step 0
    img2 = G2(x, v)[0]; img2.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in G2.named_parameters() if 'style' in n)  # and gets gradients
    logit, feats = ids.PatchDiscriminator(4)(x)
    assert logit.shape == (2, 1, 4, 4) and len(feats) == 4
    with pytest.raises(ValueError, match='of size 16'): ids.IdentitySwapper(G, torch.rand(8))


def test_source_identity_needs_a_face(enc):
    with pytest.raises(ValueError, match='no face found in the source image'):
        ids.source_identity(enc, torch.full((1, 3, 96, 96), 0.5))
    with pytest.raises(ValueError, match='no face found'):
        ids.source_identity(enc, torch.rand(1, 3, 64, 64), landmarks5=[np.full((5, 2), np.nan)])


def _train(faces, enc, path, on_step=None, seed_model=1, **kw):
    torch.manual_seed(seed_model)
    G, D = ids.SimSwapGenerator(32, 16, **TINY), ids.PatchDiscriminator(4)
    args = dict(steps=6, batch_size=4, ckpt_every=3, w_cf=1.0, device='cpu', verbose=False, preview_every=0, ckpt_path=path, on_step=on_step)
    return ids.train_idswap(G, D, enc, faces, **{**args, **kw})


def test_exact_resume_after_interruption(faces, enc, tmp_path):
    r1 = _train(faces, enc, tmp_path / 'a.pt')
    class Stop(Exception): pass
    def stop(step, row):
        if step == 4: raise Stop
    with pytest.raises(Stop): _train(faces, enc, tmp_path / 'b.pt', on_step=stop)
    r3 = _train(faces, enc, tmp_path / 'b.pt', seed_model=7)                  # other initial weights: all must come from the checkpoint
    assert r3.resumed_from == 3 and r3.step == 6
    for k, v in r1.generator.state_dict().items(): assert torch.equal(v, r3.generator.state_dict()[k]), k
    for k, v in r1.discriminator.state_dict().items(): assert torch.equal(v, r3.discriminator.state_dict()[k]), k
    assert r1.history['loss_g'].tolist() == r3.history['loss_g'].tolist()
    assert r1.history['same'].tolist() == [True, False] * 3                  # even steps: same person; odd: another
    assert r1.history['cf'].isna().tolist() == [True, False] * 3


def test_checkpoint_checks(faces, enc, tmp_path):
    _train(faces, enc, tmp_path / 'c.pt', steps=1)
    assert read_checkpoint(tmp_path / 'c.pt')['name'] == ids.SIMSWAP
    assert ids.load_idswap_generator(tmp_path / 'c.pt').config['resolution'] == 32
    with pytest.raises(CheckpointError, match='resolution: checkpoint 32 vs now 64'):
        ids.load_idswap_generator(tmp_path / 'c.pt', config=dict(resolution=64))
    with pytest.raises(CheckpointError):                                      # another generator configuration is not resumed
        torch.manual_seed(0)
        ids.train_idswap(ids.SimSwapGenerator(32, 16, base=8, max_ch=16, n_blocks=2), ids.PatchDiscriminator(4), enc, faces, steps=2,
                         batch_size=4, ckpt_path=tmp_path / 'c.pt', device='cpu', verbose=False)
    save_checkpoint(tmp_path / 'other.pt', torch.nn.Linear(2, 2), name='faceswap-df', config={})
    with pytest.raises(CheckpointError, match="'faceswap-df'"): ids.load_idswap_generator(tmp_path / 'other.pt')


def test_training_input_errors(faces, enc):
    G, D = ids.SimSwapGenerator(32, 16, **TINY), ids.PatchDiscriminator(4)
    with pytest.raises(ValueError, match='too few faces'): ids.train_idswap(G, D, enc, faces.subset([0, 1, 2]), steps=1)
    with pytest.raises(ValueError, match='vectors of size 16; the generator takes 8'):
        ids.train_idswap(ids.SimSwapGenerator(32, 8, **TINY), D, enc, faces, steps=1)
    with pytest.raises(ValueError, match='faces are 32 px but the generator is 64 px'):
        ids.train_idswap(ids.SimSwapGenerator(64, 16, **TINY), D, enc, faces, steps=1)
    plain = ids.AlignedFaces(faces.images, faces.masks, faces.landmarks5, faces.landmarks68, faces.identity)
    with pytest.raises(ValueError, match='counterfactual'): ids.train_idswap(G, D, enc, plain, steps=1, w_cf=1.0)
    with pytest.raises(ValueError, match='batch_size must be at least 2'): ids.train_idswap(G, D, enc, faces, steps=1, batch_size=1)


def test_fake_sets(enc, tmp_path):
    torch.manual_seed(0)
    G = ids.SimSwapGenerator(32, 16, **TINY).eval()
    pairs = pd.DataFrame(dict(src=[0, 2], dst=[1, 3], split=['train', 'test']))
    name = ids.make_idswap_fake_set(G, enc, pairs, tmp_path, n_images=2, render_size=64)
    from deepfake_course.data.fakes import read_fake_set
    man = read_fake_set(name, tmp_path)
    assert name.startswith('idswap/') and len(man) == 4 and set(man.source) == {'idswap'}
    assert sorted(set(zip(man.identity, man.target_identity, man.split))) == [(0, 1, 'train'), (2, 3, 'test')]
    assert man.swapped.all()
    assert ids.make_idswap_fake_set(G, enc, [(0, 1, 'train'), (2, 3, 'test')], tmp_path, n_images=2, render_size=64) == name   # reused
    from deepfake_course.data.manifest import LeakError
    with pytest.raises(LeakError, match='two splits'): ids.make_idswap_fake_set(G, enc, [(0, 1, 'train'), (1, 2, 'val')], tmp_path)
    with pytest.raises(ValueError, match='same person'): ids.make_idswap_fake_set(G, enc, [(4, 4, 'train')], tmp_path)
    with pytest.raises(ValueError, match='describe a custom render_fn'):
        ids.make_idswap_fake_set(G, enc, [(0, 1, 'train')], tmp_path, render_fn=lambda i, n, s: None)
    clips = ids.make_idswap_clip_set(G, enc, [(0, 1, 'val')], tmp_path, n_frames=3, render_size=64)
    cm = read_fake_set(clips, tmp_path)
    assert clips.startswith('idswap-clip/') and len(cm) == 1 and cm.kind.iloc[0] == 'clip' and cm.n_frames.iloc[0] == 3
    npz = np.load(str(cm.path.iloc[0]).replace('.mp4', '.npz'))
    assert npz['frames'].shape == (3, 64, 64, 3) and len(npz['audio']) > 0


def test_family_table_and_recipe(tmp_path):
    t = ids.family_table({'a': dict(identity_transfer=0.9, mtcnn_rate=1.0, extra=3), 'gan': dict(mtcnn_rate=0.5, fd=10.0)})
    assert list(t.columns[:2]) == ['identity transfer', 'landmark NME vs driving face'] and t.columns[-1] == 'extra'
    assert np.isnan(t.loc['gan', 'identity transfer']) and t.loc['a', 'MTCNN rate'] == 1.0
    with pytest.raises(ValueError, match='non-empty'): ids.family_table({})
    with pytest.raises(TypeError, match='unknown identity-swap recipe setting'): ids.recipe_params(nope=1)
    a = ids.idswap_model_dir(tmp_path, 'idenc', 0)
    assert a == ids.idswap_model_dir(tmp_path, 'idenc', 0, steps=5) != ids.idswap_model_dir(tmp_path, 'idenc', 0, idenc_epochs=1)
    assert ids.idswap_model_dir(tmp_path, 'generator', 0) != ids.idswap_model_dir(tmp_path, 'generator', 0, steps=5)
