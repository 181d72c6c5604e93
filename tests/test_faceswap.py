"""Unit tests of deepfake_course.generate.faceswap: architectures, loss, warp, checkpoints and exact resume, merging,
video, fake sets, evaluation. Random data only; fast on a 2-core CPU. (Colour transfer: test_color.py; the judges:
test_quality.py.)"""
import numpy as np, pandas as pd, pytest, torch
import kornia

from deepfake_course.core import n_params, write_mp4
from deepfake_course.data.fakes import read_fake_set, resolve_fake_set, read_card
from deepfake_course.data.manifest import MANIFEST_COLUMNS
from deepfake_course.faces import face_template
from deepfake_course.generate import faceswap as fs
from deepfake_course.media import read_video, read_provenance
from deepfake_course.train import CheckpointError, read_checkpoint

TINY = dict(e_dims=4, ae_dims=16, d_dims=4, d_mask_dims=2)


def _faceset(identity, n=20, size=32, seed=0):
    g = torch.Generator().manual_seed(seed + identity)
    img = torch.rand(n, 3, size, size, generator=g) * 0.5 + 0.25 * identity
    m = torch.zeros(n, 1, size, size); m[..., size // 6: -size // 6, size // 5: -size // 5] = 1
    lm = torch.as_tensor(face_template(size, 'full'), dtype=torch.float32).expand(n, 5, 2)
    return fs.SwapFaceSet(img.clamp(0, 1), m, lm, identity)


# ---------------------------------------------------------------- architectures
@pytest.mark.parametrize('archi', ['df', 'liae', 'original', 'iae', 'liae-udt', 'df-ud'])
@pytest.mark.parametrize('res', [64, 128])
def test_architectures_shapes(archi, res):
    m = fs.build_model(archi, res, **TINY)
    x = torch.rand(2, 3, res, res)
    for side in ('src', 'dst'):
        img, msk = m.autoencode(x, side)
        assert img.shape == (2, 3, res, res) and msk.shape == (2, 1, res, res)
    sw, swm = m.swap(x)
    assert sw.shape == (2, 3, res, res) and 0 <= swm.min() and swm.max() <= 1
    assert m.config == dict(archi=archi, resolution=res, **TINY)
    assert m.checkpoint_name == f'faceswap-{archi}' and m.checkpoint_config == m.config
    assert n_params(m) == sum(p.numel() for p in m.parameters()) and not hasattr(m, 'n_params')


def test_df_liae_structure():
    df, liae = fs.build_model('df', 64, **TINY), fs.build_model('liae', 64, **TINY)
    assert hasattr(df, 'decoder_src') and hasattr(df, 'decoder_dst') and not hasattr(df, 'inter_B')
    assert hasattr(liae, 'inter_AB') and hasattr(liae, 'inter_B') and hasattr(liae, 'decoder') and not hasattr(liae, 'decoder_src')
    # DF's swap is the src decoder applied to the dst face's code
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(df.swap(x)[0], df.autoencode(x, 'src')[0])
    # pixel shuffle upscaling everywhere in the decoders
    assert any(isinstance(mod, fs.Upscale) for mod in df.decoder_src.modules())


def test_architecture_errors():
    with pytest.raises(ValueError, match="archi 'vae' is not valid"): fs.build_model('vae')
    with pytest.raises(ValueError, match="u \\(pixel-normalised code\\)"): fs.build_model('liae-x')
    with pytest.raises(ValueError, match="divisible by 32"): fs.build_model('liae-ud', 48, **TINY)
    with pytest.raises(ValueError, match="no options"): fs.build_model('iae-u')
    with pytest.raises(ValueError, match='multiple of 16'): fs.build_model('df', 40)
    with pytest.raises(ValueError, match='expects N x 3 x 64 x 64'): fs.build_model('df', 64, **TINY).swap(torch.rand(1, 3, 32, 32))


# ---------------------------------------------------------------- loss and warp
def test_swap_loss():
    s = _faceset(0, 4, 32)
    perfect = fs.swap_loss(s.images, s.masks, s.images, s.masks, s.em)
    assert perfect['total'].item() == pytest.approx(0, abs=1e-4)
    worse = fs.swap_loss(s.images.flip(0), s.masks * 0.5, s.images, s.masks, s.em)
    assert worse['total'] > 0.1 and worse['dssim'] > 0 and worse['mask'] > 0
    # the DSSIM term is kornia's (1 - SSIM) / 2 on the blurred-mask faces
    mb = fs.blurred_mask(s.masks)
    ref = kornia.losses.ssim_loss(s.images.flip(0) * mb, s.images * mb, fs.ssim_window(32), padding='valid')
    assert worse['dssim'].item() == pytest.approx(ref.item(), rel=1e-4)


def test_warp_identity_flip_and_registration():
    rng = np.random.default_rng(0); x = torch.rand(3, 4, 32, 32)
    p = fs.gen_warp_params(3, 32, rng, rotation=0, scale=0, shift=0, warp=False, flip=False)
    torch.testing.assert_close(fs.apply_warp(x, p, warp=False), x, atol=1e-4, rtol=0)
    p['flip'][:] = True
    torch.testing.assert_close(fs.apply_warp(x, p, warp=False), x.flip(-1), atol=1e-4, rtol=0)
    p = fs.gen_warp_params(3, 32, rng)
    both = fs.apply_warp(x, p)
    torch.testing.assert_close(both[:, :1], fs.apply_warp(x[:, :1], p))
    assert (both - x).abs().mean() > 0.05          # it does move things
    g = fs.warp_grid(64, np.random.default_rng(1))
    assert g.shape == (2, 64, 64) and np.abs(g[0] - np.arange(64)[None]).max() < 16


# ---------------------------------------------------------------- training, checkpoints, resume
def test_exact_resume_after_interruption(tmp_path):
    a, b = _faceset(0), _faceset(1)
    kw = dict(steps=6, batch_size=4, preview_every=2, ckpt_every=3, device='cpu', verbose=False)
    torch.manual_seed(1); m1 = fs.build_model('df', 32, **TINY)
    r1 = fs.train_faceswap(m1, a, b, ckpt_path=tmp_path / 'a.pt', **kw)

    class Stop(Exception): pass
    def stop(step, row):
        if step == 4: raise Stop
    torch.manual_seed(1); m2 = fs.build_model('df', 32, **TINY)
    with pytest.raises(Stop): fs.train_faceswap(m2, a, b, ckpt_path=tmp_path / 'b.pt', on_step=stop, **kw)
    torch.manual_seed(7); m3 = fs.build_model('df', 32, **TINY)
    r3 = fs.train_faceswap(m3, a, b, ckpt_path=tmp_path / 'b.pt', **kw)
    assert r3.resumed_from == 3 and r3.step == 6
    for k, v in m1.state_dict().items(): assert torch.equal(v, m3.state_dict()[k]), k
    assert r1.history['loss'].tolist() == r3.history['loss'].tolist()
    assert len(r1.timelapse) >= 3 and r1.previews[-1][1].shape == (20, 3, 32, 32)


def test_checkpoint_mismatch(tmp_path):
    a, b = _faceset(0), _faceset(1)
    fs.train_faceswap(fs.build_model('df', 32, **TINY), a, b, steps=1, batch_size=2, ckpt_path=tmp_path / 'c.pt', device='cpu', verbose=False)
    ck = read_checkpoint(tmp_path / 'c.pt')               # train's one format, named after the model
    assert ck['name'] == 'faceswap-df' and ck['config'] == dict(archi='df', resolution=32, **TINY) and ck['step'] == 1
    with pytest.raises(CheckpointError, match="holds a 'faceswap-df' model, not 'faceswap-liae'"):
        fs.train_faceswap(fs.build_model('liae', 32, **TINY), a, b, steps=2, ckpt_path=tmp_path / 'c.pt', device='cpu', verbose=False)
    with pytest.raises(CheckpointError, match='resolution: checkpoint 32 vs now 64'):
        fs.train_faceswap(fs.build_model('df', 64, **TINY), _faceset(0, size=64), _faceset(1, size=64), steps=2,
                          ckpt_path=tmp_path / 'c.pt', device='cpu', verbose=False)
    (tmp_path / 'junk.pt').write_bytes(b'junk')
    with pytest.raises(CheckpointError, match='truncated or corrupt'): fs.load_swap_model(tmp_path / 'junk.pt')
    with pytest.raises(FileNotFoundError): fs.load_swap_model(tmp_path / 'none.pt')
    assert fs.load_swap_model(tmp_path / 'c.pt').config['archi'] == 'df'
    with pytest.raises(CheckpointError, match="not 'faceswap-liae'"): fs.load_swap_model(tmp_path / 'c.pt', archi='liae')
    # another model's checkpoint in the same format is not a face swap
    from deepfake_course.train import save_checkpoint
    save_checkpoint(tmp_path / 'other.pt', torch.nn.Linear(2, 2), name='shallownet_v3', config=dict(width=2))
    with pytest.raises(CheckpointError, match="holds a 'shallownet_v3' model, not a face swap"): fs.load_swap_model(tmp_path / 'other.pt')


def test_resume_false_starts_afresh(tmp_path):
    a, b = _faceset(0), _faceset(1)
    kw = dict(batch_size=2, ckpt_path=tmp_path / 'r.pt', device='cpu', verbose=False, preview_every=0)
    fs.train_faceswap(fs.build_model('df', 32, **TINY), a, b, steps=2, **kw)
    r = fs.train_faceswap(fs.build_model('df', 32, **TINY), a, b, steps=3, resume=False, **kw)
    assert r.resumed_from == 0 and r.history['step'].tolist() == [1, 2, 3]
    r = fs.train_faceswap(fs.build_model('df', 32, **TINY), a, b, steps=4, **kw)     # longer: resumes at 3
    assert r.resumed_from == 3 and r.step == 4 and len(r.history) == 4
    # a schedule that depends on the run's length (warp then sharpen, a falling rate) cannot be extended: that would mix two schedules
    kw2 = dict(kw, ckpt_path=tmp_path / 's.pt', warp_fraction=0.5, lr_final=1e-5)
    fs.train_faceswap(fs.build_model('df', 32, **TINY), a, b, steps=2, **kw2)
    with pytest.raises(CheckpointError, match='steps: checkpoint 2 vs now 4'): fs.train_faceswap(fs.build_model('df', 32, **TINY), a, b, steps=4, **kw2)
    with pytest.raises(CheckpointError, match='lr: checkpoint'): fs.train_faceswap(fs.build_model('df', 32, **TINY), a, b, steps=2, **dict(kw2, lr=1e-3))


def test_too_few_images():
    img = torch.rand(5, 3, 64, 64); lm = torch.as_tensor(face_template(64, 'full'), dtype=torch.float32).expand(5, 5, 2)
    with pytest.raises(ValueError, match='identity 3: only 5 face images'):
        fs.make_swap_faceset(img, torch.ones(5, 1, 64, 64), lm, identity=3, size=32)
    with pytest.raises(ValueError, match='only 5 faces'):
        fs.train_faceswap(fs.build_model('df', 32, **TINY), _faceset(0).subset(range(5)), _faceset(1), steps=1)
    with pytest.raises(ValueError, match='32 px but the model is 64 px'):
        fs.train_faceswap(fs.build_model('df', 64, **TINY), _faceset(0), _faceset(1), steps=1)


def test_make_swap_faceset_alignment():
    img = torch.rand(16, 3, 64, 64)
    t = face_template(64, 'full'); lm = torch.as_tensor(t * 0.8 + 6, dtype=torch.float32).expand(16, 5, 2)
    s = fs.make_swap_faceset(img, torch.ones(16, 1, 64, 64), lm, 0, size=32)
    np.testing.assert_allclose(s.landmarks5[0].numpy(), face_template(32, 'full'), atol=1e-3)
    assert s.em.max() == 1 and s.em.shape == (16, 1, 32, 32)


# ---------------------------------------------------------------- merging and video
def test_refine_mask():
    yy, xx = np.mgrid[0:32, 0:32]; disc = (((yy - 16) ** 2 + (xx - 16) ** 2) < 100).astype(np.float32)
    assert fs.refine_mask(disc, 4).sum() < disc.sum() < fs.refine_mask(disc, -4).sum()
    b = fs.refine_mask(np.ones((32, 32), np.float32), 0, 7)
    assert b[0].max() == 0 and 0 < b[16, 4] < b[16, 16]


def test_merge_and_pass_through():
    m = fs.build_model('df', 32, **TINY).eval()
    frames = torch.rand(4, 3, 48, 48)
    lm = [face_template(32, 'full') + 8, None, face_template(32, 'full') + 8, np.full((5, 2), np.nan)]
    r = fs.swap_frames(m, frames, lm)
    assert r['n_swapped'] == 2 and r['n_passed'] == 2 and r['swapped'].tolist() == [True, False, True, False]
    assert torch.equal(r['frames'][1], frames[1]) and torch.equal(r['frames'][3], frames[3])
    assert not torch.equal(r['frames'][0], frames[0])
    crop, M, Mi = fs.align_swap_faces(frames[:1], np.asarray(lm[0])[None], 32)
    face, mask = m.swap(crop)
    for mode in ('alpha', 'seamless'):
        out, alpha = fs.merge_face(frames[0], face[0].detach(), torch.ones(1, 32, 32), Mi[0], mode, erode=2, blur=5, color='rct', dst_face=crop[0])
        assert out.shape == frames[0].shape and alpha.max() > 0.9 and alpha[0, 0, 0] == 0
        far = alpha[0] == 0
        assert torch.equal(out[:, far], frames[0][:, far])
    with pytest.raises(ValueError, match="Unknown merge mode"): fs.merge_face(frames[0], face[0], mask[0], Mi[0], 'poisson')


def test_swap_clip_file_roundtrip_with_audio_and_tag(tmp_path):
    m = fs.build_model('df', 32, **TINY).eval()
    fr = (np.random.default_rng(0).random((20, 48, 48, 3)) * 255).astype(np.uint8)
    audio = np.sin(np.arange(12800) / 16000 * 2 * np.pi * 300).astype(np.float32) * 0.5
    src = write_mp4(tmp_path / 'in.mp4', fr, 25, audio, 16000)
    lm = [face_template(32, 'full') + 8] * 19 + [None]
    r = fs.swap_clip(m, src, tmp_path / 'out.mp4', landmarks5=lm, metadata={'source_clip': 'in'})
    assert r['n_swapped'] == 19 and r['n_passed'] == 1 and r['fps'] == 25
    frames, fps, wav = read_video(r['path'])
    assert frames.shape == (20, 48, 48, 3) and abs(len(wav) - len(audio)) <= 2048
    tags = read_provenance(r['path'])
    assert tags['synthetic'] == 'true' and tags['method'] == 'faceswap-df'
    with pytest.raises(FileNotFoundError): fs.swap_clip(m, tmp_path / 'none.mp4', landmarks5=lm)


def test_fake_set(tmp_path):
    m = fs.build_model('liae', 32, **TINY).eval()
    frames = torch.rand(6, 3, 48, 48); lm = np.stack([face_template(32, 'full') + 8] * 6)
    clip = dict(clip_id='c0', frames=frames, audio=np.zeros(4000, np.float32), fps=25, landmarks5=[lm[0], None, lm[0], lm[0], None, lm[0]])
    name = fs.make_faceswap_set(m, frames, lm, 3, 5, 'val', dict(seed=0), data_root=tmp_path, clips=[clip])
    d = resolve_fake_set(name, tmp_path)
    assert name.startswith('faceswap-liae/') and d.parent == (tmp_path / 'fakes' / 'faceswap-liae').resolve()
    man = read_fake_set(name, tmp_path)                        # leak-checked on reading
    assert list(man.columns[:9]) == list(MANIFEST_COLUMNS)
    # the manifest's schema: identity = the face shown (src 3), target_identity = the person whose picture changed (dst 5);
    # the set used to record them the other way round
    assert (man.label == 1).all() and (man.identity == 3).all() and (man.target_identity == 5).all()
    assert (man.split == 'val').all()                          # the pair's two identities in one split
    assert man.kind.tolist() == ['image'] * 6 + ['clip'] and (man.frame == -1).all()
    assert man.clip_id.iloc[-1] == f'{name}/c0' and man.n_passed.iloc[-1] == 2 and man.n_passed.dtype.kind == 'i'
    tags = read_provenance(man.path.iloc[0])
    assert tags['synthetic'] == 'true' and tags['method'] == 'faceswap-liae' and tags['fake_set'] == name
    assert read_provenance(man.path.iloc[-1])['method'] == 'faceswap-liae'
    with np.load(str(man.path.iloc[-1]).replace('.mp4', '.npz')) as z: assert z['frames'].shape == (6, 48, 48, 3) and z['swapped'].sum() == 4
    card = read_card(d)
    assert card['config']['split'] == 'val' and card['counts']['val']['identities'] == [3, 5] and card['counts']['train']['images'] == 0
    assert not any(p.name.startswith('.') for p in d.parent.iterdir())
    mtime = (d / 'manifest.csv').stat().st_mtime
    assert fs.make_faceswap_set(m, frames, lm, 3, 5, 'val', dict(seed=0), data_root=tmp_path, clips=[clip]) == name
    assert (d / 'manifest.csv').stat().st_mtime == mtime       # reused, not rebuilt
    # another split is another set; a clip of another split than the pair's, or an unknown split, is refused
    assert fs.make_faceswap_set(m, frames[:2], lm[:2], 3, 5, 'test', dict(seed=0), data_root=tmp_path) != name
    with pytest.raises(ValueError, match="carry another split than the pair's 'train'"):
        fs.make_faceswap_set(m, frames, lm, 3, 5, 'train', dict(seed=0), data_root=tmp_path, clips=[dict(clip, split='test')])
    with pytest.raises(ValueError, match="split must be one of"):
        fs.make_faceswap_set(m, frames, lm, 3, 5, 'holdout', dict(seed=0), data_root=tmp_path)
    # the real set's identity split instead of a split name: the pair's split, or refused when the pair spans two
    from deepfake_course.data.manifest import LeakError
    id_split = {3: 'test', 5: 'test', 7: 'train'}
    assert read_card(resolve_fake_set(fs.make_faceswap_set(m, frames[:2], lm[:2], 3, 5, id_split, dict(seed=2), data_root=tmp_path),
                                      tmp_path))['config']['split'] == 'test'
    with pytest.raises(LeakError, match=r"src 7: 'train', dst 5: 'test'"):
        fs.make_faceswap_set(m, frames[:2], lm[:2], 7, 5, id_split, dict(seed=2), data_root=tmp_path)
    with pytest.raises(ValueError, match=r'identities \[9\] are not in the identity split'):
        fs.make_faceswap_set(m, frames[:2], lm[:2], 3, 9, id_split, dict(seed=2), data_root=tmp_path)
    with pytest.raises(ValueError, match='5 landmark sets for 6 images'):
        fs.make_faceswap_set(m, frames, lm[:5], 3, 5, 'train', dict(seed=1), data_root=tmp_path)


# ---------------------------------------------------------------- evaluation with the judges of deepfake_course.quality
def test_evaluate_swap():
    from deepfake_course import quality as q
    a, b = _faceset(0, 16), _faceset(1, 16)
    x, mk = torch.cat([a.images, b.images]), torch.cat([a.masks, b.masks])
    id_net = q.train_identity_classifier(x, mk, [0] * 16 + [1] * 16, epochs=2, device='cpu', verbose=False)
    lm_net = q.train_landmark_regressor(x, torch.cat([a.landmarks5, b.landmarks5]), epochs=1, device='cpu', verbose=False)
    e = fs.evaluate_swap(fs.build_model('df', 32, **TINY).eval(), a, b, id_net, lm_net)
    assert set(e) == {'recon_ssim', 'recon_ssim_src', 'recon_ssim_dst', 'identity_transfer', 'identity_kept_dst',
                      'landmark_nme', 'landmark_nme_other_face'}
    assert 0 <= e['identity_transfer'] <= 1 and e['identity_transfer'] + e['identity_kept_dst'] == pytest.approx(1)
    assert e['recon_ssim'] == pytest.approx((e['recon_ssim_src'] + e['recon_ssim_dst']) / 2) and e['landmark_nme'] >= 0
