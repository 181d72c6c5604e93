"""Unit tests of deepfake_course.data.synth: shapes, determinism, bad input, landmarks vs mask, clips, the on-disk build."""
import io, json, os
import numpy as np
import pytest
import torch

from deepfake_course.data import synth
from deepfake_course.data.synth import (identity_params, sample_params, render_faces, render_clip, make_synthfaces,
                                        jpeg_approx)
from deepfake_course.quality import mtcnn_agreement
from deepfake_course.data.audio import log_mel
from deepfake_course.data.manifest import LeakError, check_no_leak


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_shapes_and_ranges():
    out = render_faces(3, 4, size=48, seed=1)
    assert out['images'].shape == (12, 3, 48, 48) and out['images'].dtype == torch.float32
    assert out['mask'].shape == (12, 1, 48, 48)
    assert out['landmarks5'].shape == (12, 5, 2) and out['landmarks68'].shape == (12, 68, 2)
    assert out['identity'].tolist() == [0] * 4 + [1] * 4 + [2] * 4           # identity-major
    assert 0 <= out['images'].min() and out['images'].max() <= 1
    assert 0 <= out['mask'].min() and out['mask'].max() <= 1
    assert set(out['params']) >= {'yaw', 'pitch', 'roll', 'mouth_open', 'smile', 'brow_raise', 'blink', 'skin', 'hair'}
    assert out['params']['yaw'].abs().max() <= 30 and out['params']['roll'].abs().max() <= 20
    ids = render_faces([7, 2], 2, size=32)['identity'].tolist()
    assert ids == [7, 7, 2, 2]


def test_determinism_byte_identical():
    a = render_faces([1, 4], 3, size=32, seed=3); b = render_faces([1, 4], 3, size=32, seed=3)
    assert a['images'].numpy().tobytes() == b['images'].numpy().tobytes()
    assert torch.equal(a['landmarks68'], b['landmarks68'])
    c = render_faces([1, 4], 3, size=32, seed=4)
    assert not torch.equal(a['images'], c['images'])
    # an identity's images do not depend on which other identities are rendered with it
    d = render_faces([4], 3, size=32, seed=3)
    assert torch.equal(d['images'], a['images'][3:])
    # global RNG state is neither used nor changed
    st = torch.get_rng_state(); render_faces(1, 2, size=32); assert torch.equal(st, torch.get_rng_state())


def test_chunking_and_threads_change_no_pixel():
    p = sample_params(5, 7, seed=2)
    a = synth.render(p, 32, workers=1)['images']
    b = synth.render(p, 32, workers=2, chunk=3)['images']
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert torch.get_num_threads() == 1                        # the caller's thread setting is restored


def test_render_layers_trace():
    "The painters each draw something, in painter's order, and the traced frame is the rendered one."
    ip = identity_params(60)
    pick = []
    for has in (ip['glasses'] > 0, ip['beard'] > 0, (ip['hair_style'] == 3) | (ip['hair_style'] == 4)):
        pick.append(next(int(i) for i in torch.nonzero(has).flatten() if int(i) not in pick))
    p = sample_params(pick, 2, seed=1, mouth_open=(0.3, 1.0))
    trace = []
    img, mask = synth._render_chunk(p, 48, trace)
    names = [n for n, _ in trace]
    assert names == ['background', 'clothes', 'long hair', 'neck', 'back of the hair', 'ears', 'head, nose, skin', 'beard',
                     'brows', 'eyes', 'nostrils', 'mouth', 'glasses', 'front of the hair', 'auto-exposure']
    assert torch.equal(trace[-1][1], img)
    img2, mask2 = synth._render_chunk(p, 48)
    assert torch.equal(img2, img) and torch.equal(mask2, mask)
    for (_, a), (n, b) in zip(trace, trace[1:]):
        assert (a - b).abs().max() > 0.05, f'the {n} layer drew nothing'
    # a layer that none of the chunk's faces has is skipped, and the frame is unchanged by it
    q = {k: v[:1] for k, v in sample_params([pick[0]], 1, seed=1, mouth_open=0).items()}
    q['beard'] = torch.zeros(1); q['hair_style'] = torch.ones(1, dtype=torch.long)
    tr = []; synth._render_chunk(q, 48, tr); d = dict(tr)
    assert torch.equal(d['long hair'], d['clothes']) and torch.equal(d['beard'], d['head, nose, skin'])


def test_identity_params_stable_and_distinct():
    p1, p2 = identity_params([5, 6]), identity_params([6, 5])
    for k in p1: assert torch.equal(p1[k][0], p2[k][1])
    p = identity_params(20)
    sig = torch.cat([p['skin'], p['hair'], p['iris'], p['face_w'][:, None], p['glasses'][:, None]], 1)
    d = torch.cdist(sig, sig) + torch.eye(20)
    assert d.min() > 0.05, d.min()                                   # every pair differs clearly somewhere
    assert len(set(p['hair_kind'].tolist())) >= 4 and len(set(p['hair_style'].tolist())) >= 3


@pytest.mark.parametrize('kw,msg', [
    (dict(size=60), 'multiple of 8'), (dict(size=24), 'at least 32'), (dict(size=64.0), 'size must be an int'),
    (dict(identities=0), 'positive'), (dict(identities=[]), 'empty'), (dict(identities=[-2]), 'non-negative'),
    (dict(n=0), 'positive'), (dict(yaw=(30, -30)), 'reversed'), (dict(pitch=(-80, 0)), 'out of bounds'),
    (dict(smile=(0, 2)), 'out of bounds'), (dict(wobble=(0, 1)), 'Unknown range'), (dict(blink='x'), 'blink'),
    (dict(seed=-1), 'seed')])
def test_bad_input(kw, msg):
    args = dict(identities=2, n=2, size=32); args.update(kw)
    with pytest.raises((ValueError, TypeError), match=msg):
        render_faces(args.pop('identities'), args.pop('n'), **args)


def test_landmarks_inside_image_and_mask():
    out = render_faces(10, 4, size=128, seed=2)
    l5, l68, m = out['landmarks5'], out['landmarks68'], out['mask'][:, 0]
    assert ((l5 > 0) & (l5 < 128)).all() and ((l68 > -2) & (l68 < 130)).all()
    idx = torch.arange(len(l5))[:, None]
    on = m[idx, l5[..., 1].long().clamp(0, 127), l5[..., 0].long().clamp(0, 127)]
    assert (on > 0.5).float().mean() >= 0.97, on
    # left before right in MTCNN's order for these yaw ranges, eyes above the mouth
    assert (l5[:, 0, 0] < l5[:, 1, 0]).all() and (l5[:, 3, 0] < l5[:, 4, 0]).all()
    assert (l5[:, :2, 1].mean(1) < l5[:, 3:, 1].mean(1)).all()
    # landmarks scale with the image size (continuous coordinates)
    p = sample_params([3], 2, seed=0)
    l64, _ = synth.landmarks(p, 64); l128, _ = synth.landmarks(p, 128)
    assert torch.allclose(l64 * 2, l128, atol=1e-4)


def test_mtcnn_finds_the_faces():
    out = render_faces(6, 5, size=128, seed=11)
    r = mtcnn_agreement(out['images'], out['landmarks5'])
    assert r['rate'] >= 0.9, r['rate']
    assert r['nme'] <= 0.15, r['nme']
    # noise is not a face
    noise = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    assert mtcnn_agreement(noise, out['landmarks5'][:4])['rate'] <= 0.5


def test_jpeg_matches_pil():
    from PIL import Image
    x = render_faces(2, 2, size=64, seed=0, jpeg=None)['images']
    ref = []
    for im in x:
        buf = io.BytesIO(); Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy()).save(buf, 'JPEG', quality=60)
        ref.append(torch.from_numpy(np.array(Image.open(buf))).permute(2, 0, 1).float() / 255)
    y = jpeg_approx(x, torch.full((4,), 60.))
    assert (y - torch.stack(ref)).abs().mean() < 0.01
    assert (y - x).abs().mean() > 0.002                        # it does compress


def test_clip():
    c = render_clip(2, n_frames=20, size=32, seed=1)
    assert c['frames'].shape == (20, 3, 32, 32) and c['fps'] == 25
    assert c['audio'].shape == (20 * 640,) and c['audio'].abs().max() <= 1
    assert c['mel'].shape == (80, 20 * 640 // 160 + 1)
    assert c['landmarks5'].shape == (20, 5, 2) and c['landmarks68'].shape == (20, 68, 2)
    rms = c['audio'].numpy().reshape(20, -1).std(1)
    assert np.corrcoef(rms, c['params']['mouth_open'].numpy())[0, 1] > 0.9
    d = render_clip(2, n_frames=20, size=32, seed=1)
    assert c['frames'].numpy().tobytes() == d['frames'].numpy().tobytes()
    assert c['audio'].numpy().tobytes() == d['audio'].numpy().tobytes()
    # smooth: consecutive frames change little compared with different clips
    assert (c['frames'][1:] - c['frames'][:-1]).abs().mean() < (c['frames'] - render_clip(5, 20, 32, seed=1)['frames']).abs().mean()
    with pytest.raises(ValueError, match='n_frames'): render_clip(0, n_frames=0)


def test_short_clips():
    "Clips shorter than the 5-frame brow smoothing window render (n_frames 2-4 failed with a shape error)."
    for n in (1, 2, 3, 4, 5):
        c = render_clip(3, n_frames=n, size=32, seed=0)
        assert c['frames'].shape == (n, 3, 32, 32) and c['params']['brow_raise'].shape == (n,)


def test_log_mel_tone():
    t = np.arange(16000) / 16000
    lo, hi = log_mel(np.sin(2 * np.pi * 300 * t)), log_mel(np.sin(2 * np.pi * 3000 * t))
    assert lo.shape == (80, 101) and lo.mean(1).argmax() < hi.mean(1).argmax()


def test_make_synthfaces_build_and_reuse(tmp_path, monkeypatch):
    import pandas as pd
    b = make_synthfaces(tmp_path, n_identities=3, images_per_identity=4, clips_per_identity=1, size=32, seed=0, clip_frames=6)
    assert b.parent == tmp_path.resolve() / 'synthfaces'
    df = pd.read_csv(b / 'manifest.csv', keep_default_na=False)
    assert list(df.columns[:9]) == ['path', 'label', 'source', 'identity', 'target_identity', 'split', 'clip_id', 'frame', 'kind']
    assert 'id_split' in df.columns and 'lm5' in df.columns and 'image_split' not in df.columns
    assert len(df) == 3 * 5 and (df.label == 0).all() and set(df.kind) == {'image', 'clip'}
    assert df[df.kind == 'clip'].clip_id.str.len().gt(0).all() and df[df.kind == 'image'].clip_id.eq('').all()
    assert df.groupby('identity').split.nunique().eq(1).all()                  # split is by identity, clips too
    assert check_no_leak(df) and (df.id_split == df.split).all()             # id_split: the old name, same column
    assert set(df.split) == {'train', 'val', 'test'}
    card_splits = json.loads((b / 'card.json').read_text())['splits']
    assert {s: sorted(set(df.identity[df.split == s])) for s in ('train', 'val', 'test')} == card_splits
    assert all((b / p).exists() for p in df.path)
    lm = np.load(b / 'landmarks.npz')
    assert lm['landmarks5'].shape == (12, 5, 2) and (df.path.values[lm['row']] == lm['path']).all()
    z = np.load(b / df[df.kind == 'clip'].path.iloc[0])
    assert z['frames'].shape == (6, 32, 32, 3) and z['frames'].dtype == np.uint8 and z['audio'].dtype == np.int16
    assert z['mel'].shape[0] == 80 and z['landmarks5'].shape == (6, 5, 2) and int(z['fps']) == 25
    import av
    with av.open(str(b / df[df.kind == 'clip'].path.iloc[0].replace('.npz', '.mp4'))) as c:
        assert {s.type for s in c.streams} == {'video', 'audio'}
    card = json.loads((b / 'card.json').read_text())
    assert card['counts'] == {'images': 12, 'clips': 3, 'identities': 3}
    # reused, not rebuilt
    mtime = (b / 'manifest.csv').stat().st_mtime_ns
    assert make_synthfaces(tmp_path, n_identities=3, images_per_identity=4, clips_per_identity=1, size=32, seed=0, clip_frames=6) == b
    assert (b / 'manifest.csv').stat().st_mtime_ns == mtime
    # an interrupted build leaves nothing that a later run would trust
    def boom(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(synth, 'render_clip', boom)
    with pytest.raises(KeyboardInterrupt):
        make_synthfaces(tmp_path, n_identities=2, images_per_identity=2, clips_per_identity=1, size=32, seed=5)
    assert sorted(p.name for p in (tmp_path / 'synthfaces').iterdir()) == [b.name]
    monkeypatch.undo()
    # data_root by keyword, and a build of fewer than 3 identities (all of them train)
    two = make_synthfaces(data_root=tmp_path, n_identities=2, images_per_identity=2, clips_per_identity=0, size=32, seed=1)
    assert set(pd.read_csv(two / 'manifest.csv', keep_default_na=False).split) == {'train'}
    # a folder that is not a complete build is never reused
    cfg_dir = make_synthfaces(tmp_path, n_identities=1, images_per_identity=1, clips_per_identity=0, size=32, seed=9)
    (cfg_dir / 'card.json').unlink()
    with pytest.raises(RuntimeError, match='not a complete'):
        make_synthfaces(tmp_path, n_identities=1, images_per_identity=1, clips_per_identity=0, size=32, seed=9)


def test_make_synthfaces_refuses_a_leaking_split(tmp_path, monkeypatch):
    "If the split assignment ever put one person in two splits, the build fails and leaves nothing behind."
    def leaky(df, seed):
        df = df.copy(); df['split'] = ['train', 'val', 'test'] * (len(df) // 3) + ['train'] * (len(df) % 3)
        return df
    monkeypatch.setattr(synth, '_identity_splits', leaky)
    with pytest.raises(LeakError, match='more than one split'):
        make_synthfaces(tmp_path, n_identities=3, images_per_identity=3, clips_per_identity=0, size=32, seed=0)
    assert not (tmp_path / 'synthfaces').exists() or not any((tmp_path / 'synthfaces').iterdir())


def test_make_synthfaces_data_root_keyword(tmp_path, monkeypatch):
    "data_root resolves through core.get_data_root: the argument, else $DFC_DATA."
    monkeypatch.setenv('DFC_DATA', str(tmp_path / 'env'))
    b = make_synthfaces(n_identities=1, images_per_identity=1, clips_per_identity=0, size=32)
    assert b.parent == (tmp_path / 'env').resolve() / 'synthfaces'
    with pytest.raises(TypeError): make_synthfaces(root=tmp_path, n_identities=1, images_per_identity=1, clips_per_identity=0)


@pytest.mark.parametrize('kw,exc,msg', [
    (dict(n_identities=0), ValueError, 'n_identities'), (dict(size=36), ValueError, 'multiple of 8'),
    (dict(images_per_identity=0, clips_per_identity=0), ValueError, 'nothing to build'),
    (dict(seed=-3), ValueError, 'seed'), (dict(clip_frames=0), ValueError, 'clip_frames')])
def test_make_synthfaces_bad_input(tmp_path, kw, exc, msg):
    with pytest.raises(exc, match=msg): make_synthfaces(tmp_path, **kw)


def test_make_synthfaces_unwritable_root():
    with pytest.raises(PermissionError, match='not writable'):
        make_synthfaces('/proc/dfc-synth-test', n_identities=1, images_per_identity=1, clips_per_identity=0, size=32)
