"""Unit tests of deepfake_course.generate.faceswap: architectures, loss, warp, colour transfer (known statistics),
checkpoints and exact resume, merging, video, fake sets, measures. Random data only; fast on a 2-core CPU."""
import numpy as np, pandas as pd, pytest, torch
import kornia
from PIL import Image

from deepfake_course.generate import faceswap as fs

TINY = dict(e_dims=4, ae_dims=16, d_dims=4, d_mask_dims=2)


def _faceset(identity, n=20, size=32, seed=0):
    g = torch.Generator().manual_seed(seed + identity)
    img = torch.rand(n, 3, size, size, generator=g) * 0.5 + 0.25 * identity
    m = torch.zeros(n, 1, size, size); m[..., size // 6: -size // 6, size // 5: -size // 5] = 1
    lm = torch.as_tensor(fs._template(size, 'full'), dtype=torch.float32).expand(n, 5, 2)
    return fs.FaceSet(img.clamp(0, 1), m, lm, identity)


def _colour_image(mu, A, seed, size=48):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, size * size, generator=g)
    return (torch.tensor(mu).view(3, 1) + torch.tensor(A) @ z).view(3, size, size).clamp(0, 1)


X = _colour_image([.6, .45, .35], [[.06, 0, 0], [.02, .05, 0], [0, .01, .04]], 0)
R = _colour_image([.4, .5, .55], [[.04, .01, 0], [0, .06, 0], [.01, 0, .05]], 1)
px = lambda a: a.reshape(3, -1).T.double().numpy()


# ---------------------------------------------------------------- architectures
@pytest.mark.parametrize('archi', ['df', 'liae'])
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
    with pytest.raises(ValueError, match="Unknown face-swap architecture 'vae'"): fs.build_model('vae')
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


# ---------------------------------------------------------------- colour transfer: known statistics
def test_rct_matches_lab_mean_and_std():
    y = fs.rct(X, R)
    lab = lambda a: kornia.color.rgb_to_lab(a[None])[0].reshape(3, -1)
    torch.testing.assert_close(lab(y).mean(1), lab(R).mean(1), atol=1.0, rtol=0)
    torch.testing.assert_close(lab(y).std(1), lab(R).std(1), atol=0, rtol=0.06)
    # batched call equals per-image calls
    torch.testing.assert_close(fs.rct(torch.stack([X, R]), torch.stack([R, X]))[0], y, atol=1e-5, rtol=0)


@pytest.mark.parametrize('mode', ['lct', 'mkl'])
def test_linear_transfers_match_mean_and_covariance(mode):
    y = fs.color_transfer(mode, X, R)
    np.testing.assert_allclose(px(y).mean(0), px(R).mean(0), atol=2e-3)
    np.testing.assert_allclose(np.cov(px(y).T), np.cov(px(R).T), atol=2e-4)


def test_mkl_is_the_optimal_transport_map():
    # Monge-Kantorovich: the linear map is symmetric positive definite (a pure "stretch", no rotation)
    A, B = np.cov(px(X).T), np.cov(px(R).T)
    y = fs.mkl(X, R)
    T = np.linalg.lstsq(px(X) - px(X).mean(0), px(y) - px(y).mean(0), rcond=None)[0]
    np.testing.assert_allclose(T, T.T, atol=1e-3)
    assert np.linalg.eigvalsh((T + T.T) / 2).min() > 0
    np.testing.assert_allclose(T.T @ A @ T, B, atol=2e-4)


def test_idt_matches_marginals():
    y = fs.idt(X, R, n_rot=30)
    q = np.linspace(0.05, 0.95, 19)
    for c in range(3):
        np.testing.assert_allclose(np.quantile(px(y)[:, c], q), np.quantile(px(R)[:, c], q), atol=0.02)
    same = np.abs(fs.idt(R, R).numpy() - R.numpy())                          # the reference onto itself: (nearly) unchanged
    assert same.mean() < 0.003 and same.max() < 0.05


def test_sot_moves_the_distribution():
    def sliced_w(a, b, k=32):
        d = np.random.default_rng(5).normal(size=(k, 3)); d /= np.linalg.norm(d, axis=1, keepdims=True)
        return np.mean([np.abs(np.sort(a @ v) - np.sort(b @ v)).mean() for v in d])
    y = fs.sot(X, R, steps=20, reg_sigma_xy=0)
    assert sliced_w(px(y), px(R)) < 0.15 * sliced_w(px(X), px(R))
    np.testing.assert_allclose(px(y).mean(0), px(R).mean(0), atol=0.01)
    assert fs.sot(X, R).shape == X.shape     # with the bilateral regularisation


def test_colour_transfer_masks_and_errors():
    m = torch.zeros(1, 48, 48); m[:, :24] = 1
    two = torch.cat([R[:, :24], (R[:, 24:] * 0.2)], 1)            # statistics must come from the masked half only
    y = fs.color_transfer('lct', X, two, None, m)
    np.testing.assert_allclose(px(y).mean(0), R[:, :24].reshape(3, -1).double().mean(1).numpy(), atol=3e-3)
    with pytest.raises(ValueError, match="Unknown colour transfer 'hist'"): fs.color_transfer('hist', X, R)
    with pytest.raises(ValueError, match='fewer than 4 pixels'): fs.lct(X, R, torch.zeros(1, 48, 48))
    assert fs.color_transfer(None, X, R) is X
    assert fs.color_transfer('mkl', torch.stack([X, X]), R[None]).shape == (2, 3, 48, 48)


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
    with pytest.raises(fs.CheckpointMismatchError, match="archi: checkpoint 'df' vs model 'liae'"):
        fs.train_faceswap(fs.build_model('liae', 32, **TINY), a, b, steps=2, ckpt_path=tmp_path / 'c.pt', device='cpu', verbose=False)
    with pytest.raises(fs.CheckpointMismatchError, match='resolution: checkpoint 32 vs model 64'):
        fs.load_swap_checkpoint(tmp_path / 'c.pt', fs.build_model('df', 64, **TINY))
    (tmp_path / 'junk.pt').write_bytes(b'junk')
    with pytest.raises(fs.CheckpointMismatchError, match='not a readable checkpoint'): fs.load_swap_checkpoint(tmp_path / 'junk.pt')
    with pytest.raises(FileNotFoundError): fs.load_swap_checkpoint(tmp_path / 'none.pt')
    assert fs.load_swap_model(tmp_path / 'c.pt').config['archi'] == 'df'


def test_too_few_images():
    img = torch.rand(5, 3, 64, 64); lm = torch.as_tensor(fs._template(64, 'full'), dtype=torch.float32).expand(5, 5, 2)
    with pytest.raises(ValueError, match='identity 3: only 5 face images'):
        fs.make_faceset(img, torch.ones(5, 1, 64, 64), lm, identity=3, size=32)
    with pytest.raises(ValueError, match='only 5 faces'):
        fs.train_faceswap(fs.build_model('df', 32, **TINY), _faceset(0).subset(range(5)), _faceset(1), steps=1)
    with pytest.raises(ValueError, match='32 px but the model is 64 px'):
        fs.train_faceswap(fs.build_model('df', 64, **TINY), _faceset(0), _faceset(1), steps=1)


def test_make_faceset_alignment():
    img = torch.rand(16, 3, 64, 64)
    t = fs._template(64, 'full'); lm = torch.as_tensor(t * 0.8 + 6, dtype=torch.float32).expand(16, 5, 2)
    s = fs.make_faceset(img, torch.ones(16, 1, 64, 64), lm, 0, size=32)
    np.testing.assert_allclose(s.landmarks5[0].numpy(), fs._template(32, 'full'), atol=1e-3)
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
    lm = [fs._template(32, 'full') + 8, None, fs._template(32, 'full') + 8, np.full((5, 2), np.nan)]
    r = fs.swap_frames(m, frames, lm)
    assert r['n_swapped'] == 2 and r['n_passed'] == 2 and r['swapped'].tolist() == [True, False, True, False]
    assert torch.equal(r['frames'][1], frames[1]) and torch.equal(r['frames'][3], frames[3])
    assert not torch.equal(r['frames'][0], frames[0])
    crop, M, Mi = fs.align_faces(frames[:1], np.asarray(lm[0])[None], 32)
    face, mask = m.swap(crop)
    for mode in ('alpha', 'seamless'):
        out, alpha = fs.merge_face(frames[0], face[0].detach(), torch.ones(1, 32, 32), Mi[0], mode, erode=2, blur=5, color='rct', dst_face=crop[0])
        assert out.shape == frames[0].shape and alpha.max() > 0.9 and alpha[0, 0, 0] == 0
        far = alpha[0] == 0
        assert torch.equal(out[:, far], frames[0][:, far])
    with pytest.raises(ValueError, match="Unknown merge mode"): fs.merge_face(frames[0], face[0], mask[0], Mi[0], 'poisson')


def test_mp4_roundtrip_with_audio_and_tag(tmp_path):
    fr = (np.random.default_rng(0).random((20, 32, 32, 3)) * 255).astype(np.uint8)
    audio = np.sin(np.arange(12800) / 16000 * 2 * np.pi * 300).astype(np.float32) * 0.5
    p = fs.write_mp4(tmp_path / 'v.mp4', fr, 25, audio, 16000, {'comment': fs.SYNTHETIC_TAG})
    v = fs.read_mp4(p)
    assert v['frames'].shape == (20, 32, 32, 3) and v['metadata']['comment'] == fs.SYNTHETIC_TAG
    assert v['sample_rate'] == 16000 and abs(len(v['audio']) - len(audio)) <= 2048
    with pytest.raises(FileNotFoundError): fs.read_mp4(tmp_path / 'none.mp4')


def test_fake_set(tmp_path):
    m = fs.build_model('liae', 32, **TINY).eval()
    frames = torch.rand(6, 3, 48, 48); lm = np.stack([fs._template(32, 'full') + 8] * 6)
    clip = dict(clip_id='c0', frames=frames, audio=np.zeros(4000, np.float32), fps=25, landmarks5=[lm[0], None, lm[0], lm[0], None, lm[0]])
    d = fs.make_faceswap_set(m, frames, lm, 3, 5, dict(seed=0), root=tmp_path, splits=['train'] * 4 + ['val', 'test'], clips=[clip])
    assert d.parent == tmp_path / 'fakes' / 'faceswap-liae'
    man = pd.read_csv(d / 'manifest.csv', keep_default_na=False)
    assert list(man.columns[:9]) == fs.MANIFEST_COLUMNS
    assert (man.label == 1).all() and (man.identity == 5).all() and (man.target_identity == 3).all()
    assert man.kind.tolist() == ['image'] * 6 + ['clip'] and (man.frame == -1).all()
    assert man.clip_id.iloc[-1].startswith('faceswap-liae-') and man.n_passed.iloc[-1] == 2 and man.n_passed.dtype.kind == 'i'
    assert Image.open(d / man.path[0]).text['Description'] == fs.SYNTHETIC_TAG
    assert fs.read_mp4(d / man.path.iloc[-1])['metadata']['deepfake_method'] == 'faceswap-liae'
    assert (d / 'card.json').exists() and not any(p.name.startswith('.') for p in d.parent.iterdir())
    mtime = (d / 'manifest.csv').stat().st_mtime
    assert fs.make_faceswap_set(m, frames, lm, 3, 5, dict(seed=0), root=tmp_path, splits=['train'] * 4 + ['val', 'test'], clips=[clip]) == d
    assert (d / 'manifest.csv').stat().st_mtime == mtime       # reused, not rebuilt


# ---------------------------------------------------------------- measures
def test_measures():
    ref = torch.tensor([[[10., 10.], [30., 10.], [20., 20.], [12., 30.], [28., 30.]]])
    assert fs.landmark_nme(ref, ref).item() == 0
    assert fs.landmark_nme(ref + torch.tensor([2., 0.]), ref).item() == pytest.approx(0.1)   # 2 px / 20 px inter-ocular
    x = torch.rand(2, 3, 32, 32); m = torch.ones(2, 1, 32, 32)
    torch.testing.assert_close(fs.masked_ssim(x, x, m), torch.ones(2))
    assert fs.masked_ssim(x, torch.rand(2, 3, 32, 32), m).max() < 0.2
    assert fs.temporal_flicker(x[:1].expand(4, -1, -1, -1)) == 0
    seq = torch.stack([torch.full((3, 8, 8), v) for v in (0., .1, .3)])
    assert fs.temporal_flicker(seq) == pytest.approx(0.15)
    assert fs.temporal_flicker(seq, valid=[True, True, False]) == pytest.approx(0.1)
    assert fs.face_ellipse(64).shape == (1, 64, 64) and 0.2 < fs.face_ellipse(64).mean() < 0.6


def test_identity_classifier_and_landmark_regressor_learn():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32, generator=g) * 0.3; y = torch.arange(64) % 2
    x[y == 1, 0] += 0.6                                    # identity 1 is red
    net = fs.train_identity_classifier(x, torch.ones(64, 1, 32, 32), y + 4, epochs=4, device='cpu', verbose=False)
    assert (fs.predict_identity(net, x, torch.ones(64, 1, 32, 32)) == y + 4).float().mean() > 0.9
    with pytest.raises(ValueError, match='at least 2 identities'):
        fs.train_identity_classifier(x, torch.ones(64, 1, 32, 32), torch.zeros(64), epochs=1)
