"""Unit tests of deepfake_course.faces: loading (through deepfake_course.media), MTCNN detection, the noise filter,
alignment, paste-back, video."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from deepfake_course import faces as F
from deepfake_course import media as M
from deepfake_course.core import write_mp4
from deepfake_course.data.manifest import MANIFEST_COLUMNS, LeakError


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


@pytest.fixture(scope='module')
def photos():
    return F.real_photos()


@pytest.fixture(scope='module')
def fx():
    return F.FaceExtractor('cpu')


def _lfw_rgb(photos, idx, size=100):
    from skimage.transform import resize
    return np.stack([(resize(photos['lfw'][i], (size, size), order=1) * 255).round().astype(np.uint8) for i in idx])[..., None].repeat(3, -1)


def _smooth(h, w, k=1):
    "A smooth colour pattern (bilinear resampling changes it little)."
    yy, xx = torch.meshgrid(torch.linspace(0, 6, h), torch.linspace(0, 6, w), indexing='ij')
    return torch.stack([(k * yy).sin(), xx.cos(), (yy + k * xx).sin()]) * 0.4 + 0.5


def load_rgb(p):
    "A file as the detector reads it: the course's one loader, H×W×3 uint8."
    return M.load_image(p, dtype='uint8', hwc=True)


# ---------------------------------------------------------------- loading
def test_load_image_converts_gray_rgba_16bit_palette(tmp_path, photos):
    import cv2
    from PIL import Image
    g = photos['grace_hopper']
    cv2.imwrite(str(tmp_path/'gray.png'), cv2.cvtColor(g, cv2.COLOR_RGB2GRAY))
    rgba = np.dstack([g[..., ::-1], np.full(g.shape[:2], 255, np.uint8)]); rgba[:10, :10, 3] = 0
    cv2.imwrite(str(tmp_path/'rgba.png'), rgba)
    cv2.imwrite(str(tmp_path/'deep.png'), g[..., ::-1].astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path/'deepgray.png'), cv2.cvtColor(g, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257)
    Image.fromarray(g).convert('P').save(tmp_path/'pal.gif')
    for n in ['gray.png', 'rgba.png', 'deep.png', 'deepgray.png', 'pal.gif']:
        im = load_rgb(tmp_path/n)
        assert im.shape == g.shape and im.dtype == np.uint8, n
    assert np.array_equal(load_rgb(tmp_path/'deep.png'), g)
    rg = load_rgb(tmp_path/'rgba.png')
    assert (rg[:10, :10] == 0).all() and np.array_equal(rg[20:], g[20:])       # transparent -> black (the course's rule), opaque unchanged
    assert np.array_equal(F.as_image_list(tmp_path/'rgba.png')[0], rg)          # the detector reads files the same way
    gray = load_rgb(tmp_path/'gray.png')
    assert np.array_equal(gray[..., 0], gray[..., 2])


def test_load_image_applies_exif_orientation(tmp_path):
    from PIL import Image
    im = Image.fromarray(np.zeros((30, 50, 3), np.uint8))
    ex = Image.Exif(); ex[0x0112] = 6                                  # "rotate 90° clockwise to display"
    im.save(tmp_path/'rot.jpg', exif=ex)
    assert load_rgb(tmp_path/'rot.jpg').shape == (50, 30, 3)


def test_load_image_errors(tmp_path):
    (tmp_path/'x.jpg').write_text('not an image')
    with pytest.raises(M.ImageLoadError, match='not an image file'): load_rgb(tmp_path/'x.jpg')
    (tmp_path/'e.png').write_bytes(b'')
    with pytest.raises(M.ImageLoadError, match='not an image file'): load_rgb(tmp_path/'e.png')
    with pytest.raises(FileNotFoundError, match='does not exist'): load_rgb(tmp_path/'nope.png')
    with pytest.raises(M.ImageLoadError, match='folder'): load_rgb(tmp_path)


def test_to_rgb_uint8_arrays():
    assert F.to_rgb_uint8(torch.rand(3, 8, 9)).shape == (8, 9, 3)
    assert F.to_rgb_uint8(np.ones((8, 9), np.float32)).max() == 255
    assert F.to_rgb_uint8(np.full((4, 4), 65535, np.uint16)).max() == 255
    assert F.to_rgb_uint8(np.full((4, 4, 1), 200.0)).max() == 200          # floats above 1 are taken as 0..255
    with pytest.raises(M.ImageLoadError, match='shape'): F.to_rgb_uint8(np.zeros((9, 9, 7)))
    with pytest.raises(M.ImageLoadError, match='NaN'): F.to_rgb_uint8(np.full((4, 4), np.nan))
    with pytest.raises(M.ImageLoadError, match='zero size'): F.to_rgb_uint8(np.zeros((0, 4, 3)))
    rgba = np.full((2, 2, 4), 200, np.uint8); rgba[..., 3] = 255; rgba[0, 0, 3] = 0
    assert F.to_rgb_uint8(rgba)[0, 0].tolist() == [0, 0, 0] and F.to_rgb_uint8(rgba)[1, 1].tolist() == [200] * 3   # alpha over black


# ---------------------------------------------------------------- noise filter
def test_filter_noise_rule():
    # largest 100x100 (w+h 200, limit 200/sqrt3 = 115.47)
    boxes = [[0, 0, 100, 100], [0, 0, 58, 58], [0, 0, 57, 57], [0, 0, 10, 10], [0, 0, 300, 300]]
    nf = F.filter_noise(boxes, probs=[0.99, 0.99, 0.99, 0.99, 0.3], min_prob=0.9, min_size=20)
    assert nf.kept.tolist() == [0, 1]
    assert nf.ignored.tolist() == [2, 3, 4]
    assert nf.reasons[0].startswith('noise') and 'size' in nf.reasons[1] and 'probability' in nf.reasons[2]
    # without the low-probability giant the rule is relative to the 100 px face; with ratio inf nothing is noise
    assert F.filter_noise(boxes[:3], min_size=0, ratio=float('inf')).kept.tolist() == [0, 1, 2]
    assert F.filter_noise(np.zeros((0, 4))).kept.size == 0
    with pytest.raises(ValueError, match='x2 >= x1'): F.filter_noise([[5, 0, 0, 5]])
    with pytest.raises(ValueError, match='NaN'): F.filter_noise([[0, 0, np.nan, 5]])


# ---------------------------------------------------------------- detection
def test_detect_portraits_and_empty(fx, photos):
    dets = fx.detect([photos['astronaut'], photos['grace_hopper'], np.full((90, 120, 3), 127, np.uint8)])
    assert [len(d) for d in dets] == [1, 1, 0]
    a = dets[0]
    x1, y1, x2, y2 = a.boxes[0]
    assert 150 < (x1 + x2) / 2 < 260 and 50 < (y1 + y2) / 2 < 140            # Eileen Collins' face, upper middle
    assert a.landmarks.shape == (1, 5, 2) and a.probs[0] > 0.99
    assert a.landmarks[0, 0, 0] < a.landmarks[0, 1, 0] and a.landmarks[0, 2, 1] < a.landmarks[0, 3, 1]
    assert dets[2].empty and dets[2].reason == 'no face detected'
    tiny = fx.detect(np.zeros((8, 8, 3), np.uint8))[0]
    assert tiny.empty and 'smaller than' in tiny.reason


def test_detect_groups_mixed_sizes_like_single_calls(fx, photos):
    lfw = list(_lfw_rgb(photos, [0, 1, 2], 100)) + list(_lfw_rgb(photos, [3, 4], 120))
    mixed = [lfw[0], lfw[3], lfw[1], lfw[4], lfw[2]]               # sizes interleaved
    batched = fx.detect(mixed)
    single = [fx.detect(im)[0] for im in mixed]
    for b, s, im in zip(batched, single, mixed):
        assert b.image_size == im.shape[:2]
        assert len(b) == len(s)
        if len(b): assert np.abs(b.boxes - s.boxes).max() <= 1


def test_detect_accepts_tensors_and_paths(fx, photos, tmp_path):
    from PIL import Image
    Image.fromarray(photos['grace_hopper']).save(tmp_path/'gh.png')
    t = torch.from_numpy(photos['grace_hopper']).permute(2, 0, 1).float() / 255
    d1 = fx.detect(tmp_path/'gh.png')[0]; d2 = fx.detect(t[None])[0]; d3 = fx.detect(str(tmp_path/'gh.png'))[0]
    assert len(d1) == len(d2) == len(d3) == 1
    assert np.abs(d1.boxes - d2.boxes).max() <= 1
    (tmp_path/'notes.txt').write_text('x')
    with pytest.raises(M.ImageLoadError, match='notes.txt'): fx.detect([tmp_path/'notes.txt'])


def test_lfw_faces_and_nonfaces(fx, photos):
    x = _lfw_rgb(photos, list(range(0, 100, 4)) + list(range(100, 200, 4)))   # 25 faces, 25 non-faces
    found = np.array([not d.empty for d in fx.detect(x)])
    assert found[:25].mean() >= 0.9 and found[25:].sum() == 0


def test_collage_noise_filter(fx, photos):
    big = F.face_collage([photos['astronaut'][:260, 110:370]], [260], canvas=(300, 520), seed=1)[0]
    small = _lfw_rgb(photos, [0, 1], 44)
    big[:, 340:] = 180; big[10:54, 360:404] = small[0]; big[200:244, 440:484] = small[1]
    d = fx.detect(big)[0]
    assert len(d) == 1 and d.ignored is not None and len(d.ignored) >= 1
    assert all(r.startswith('noise') for r in d.ignored.reasons)


# ---------------------------------------------------------------- alignment
def test_umeyama_matches_skimage():
    from skimage.transform import SimilarityTransform
    rng = np.random.default_rng(0)
    for _ in range(5):
        src, dst = rng.random((5, 2)) * 50, rng.random((5, 2)) * 80
        st = SimilarityTransform.from_estimate(src, dst)
        assert np.allclose(F.umeyama(src, dst).numpy(), st.params, atol=1e-8)
    with pytest.raises(ValueError, match='degenerate'): F.umeyama(np.ones((5, 2)), rng.random((5, 2)))


@pytest.mark.parametrize('face_type', list(F.FACE_TYPES))
def test_align_exact_similarity_and_inverse(face_type):
    t = torch.as_tensor(F.face_template(48, face_type))
    A = torch.tensor([[0.8, -0.5, 60.], [0.5, 0.8, 10.]], dtype=torch.float64)
    lm = F.transform_points(t, A)
    img = torch.stack([_smooth(150, 170, 1), _smooth(150, 170, 2)])
    crops, M, M_inv = F.align_faces(img, torch.stack([lm, lm]), 48, face_type, image_index=[1, 0])
    assert crops.shape == (2, 3, 48, 48)
    assert torch.allclose(F.transform_points(lm, M[0]), t, atol=1e-3)
    assert torch.allclose(F.transform_points(t, M_inv[0]), lm, atol=1e-3)
    assert F.landmark_nme(lm[None], M[:1].double(), 48, face_type).item() < 1e-4
    # the crop shows the right image: sample the template's nose pixel both ways
    nx, ny = F.transform_points(t[2], M_inv[0]).round().long().tolist()
    assert torch.allclose(crops[0, :, int(round(t[2, 1].item())), int(round(t[2, 0].item()))], img[1, :, ny, nx], atol=0.05)


def test_align_errors():
    with pytest.raises(ValueError, match='Unknown face_type'): F.face_template(64, 'half')
    with pytest.raises(ValueError, match='K×5×2'): F.align_faces(torch.rand(1, 3, 32, 32), torch.rand(1, 4, 2))
    with pytest.raises(ValueError, match='image_index'): F.align_faces(torch.rand(1, 3, 32, 32), torch.rand(2, 5, 2) * 30, image_index=[0, 1])


def test_extract_gives_crops_with_transforms(fx, photos):
    d = fx.extract([photos['grace_hopper'], np.zeros((64, 64, 3), np.uint8)], size=40, face_type='tight')
    assert d[0].crops.shape == (1, 3, 40, 40) and d[0].M.shape == (1, 2, 3) and d[0].M_inv.shape == (1, 2, 3)
    assert d[1].empty and d[1].crops.shape == (0, 3, 40, 40)
    assert F.landmark_nme(d[0].landmarks, d[0].M.double(), 40, 'tight').item() < 0.15


def test_paste_back_restores_frame_and_blends():
    frame = _smooth(120, 140)                      # smooth, so resampling loses little
    t = torch.as_tensor(F.face_template(64))
    lm = F.transform_points(t, torch.tensor([[1.1, 0.2, 30.], [-0.2, 1.1, 20.]]))
    crop, M, M_inv = F.align_face(frame, lm, 64)
    back = F.paste_back(frame, crop, M_inv, erode=4)
    centre = F.transform_points(torch.tensor([[32., 32.]]), M_inv)[0].round().long()
    cx, cy = centre.tolist()
    assert (back - frame)[:, cy - 5:cy + 5, cx - 5:cx + 5].abs().max() < 0.02          # bilinear twice: close, not exact
    out = F.paste_back(frame, torch.zeros_like(crop), M_inv, blur=9)
    assert out[:, cy, cx].abs().max() < 1e-3                                            # the new face is in
    assert torch.equal(out[:, :3, -3:], frame[:, :3, -3:])                               # far away untouched
    bat = F.paste_back(frame[None].repeat(2, 1, 1, 1), crop[None].repeat(2, 1, 1, 1), M_inv[None].repeat(2, 1, 1))
    assert bat.shape == (2, 3, 120, 140)
    with pytest.raises(ValueError, match='mask must be'): F.paste_back(frame, crop, M_inv, mask=torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match='erode and blur'): F.paste_back(frame, crop, M_inv, erode=-1)


# ---------------------------------------------------------------- video
def test_sample_indices():
    assert M.sample_indices(10, every=4).tolist() == [0, 4, 8]
    assert M.sample_indices(11, count=3).tolist() == [0, 5, 10]
    assert M.sample_indices(2, count=5).tolist() == [0, 1]
    with pytest.raises(ValueError, match='every'): M.sample_indices(5, every=0)
    with pytest.raises(ValueError, match='not both'): M.sample_indices(5, every=1, count=1)


def test_video_errors(tmp_path):
    import av
    (tmp_path/'t.mp4').write_text('no video here')
    with pytest.raises(M.VideoError, match='t.mp4'): M.read_frames(tmp_path/'t.mp4')
    with pytest.raises(FileNotFoundError): M.read_frames(tmp_path/'missing.mp4')
    with av.open(str(tmp_path/'nostream.mp4'), 'w') as c:     # a container without a video stream
        s = c.add_stream('libx264', rate=25); s.width = s.height = 32; s.pix_fmt = 'yuv420p'; c.start_encoding()
    with pytest.raises(M.VideoError, match='nostream.mp4'): M.read_frames(tmp_path/'nostream.mp4')
    with av.open(str(tmp_path/'five.mkv'), 'w') as c:
        s = c.add_stream('libx264', rate=25); s.width = s.height = 32; s.pix_fmt = 'yuv420p'
        for f in [av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format='rgb24')] * 5 + [None]:
            for pkt in s.encode(f): c.mux(pkt)
    whole = (tmp_path/'five.mkv').read_bytes()
    msgs = []
    for cut in range(100, len(whole), 100):       # every truncation is a VideoError (or still decodes), never a crash
        (tmp_path/'cut.mkv').write_bytes(whole[:cut])
        try: M.read_frames(tmp_path/'cut.mkv', every=2)
        except M.VideoError as e: msgs.append(str(e))
    assert any('no frames' in m for m in msgs) and all('cut.mkv' in m for m in msgs)


def test_write_read_video_roundtrip(tmp_path):
    frames = np.stack([np.full((31, 40, 3), 20 * i, np.uint8) for i in range(9)])
    p = write_mp4(tmp_path/'v.mp4', frames, fps=10)
    info = M.video_info(p)
    assert info['n_frames'] == 9 and info['width'] == 40 and info['height'] == 32 and info['fps'] == 10
    fr, idx, fps = M.read_frames(p, count=3)
    assert idx.tolist() == [0, 4, 8] and abs(int(fr[2, 4, 4, 0]) - 160) <= 3


def test_link_tracks():
    mk = lambda *bs: F.Detections(np.array(bs, np.float32).reshape(-1, 4), np.ones(len(bs), np.float32), np.zeros((len(bs), 5, 2), np.float32))
    seq = [mk([0, 0, 20, 20]), mk([2, 0, 22, 20], [60, 60, 80, 80]), mk([61, 61, 81, 81], [3, 1, 23, 21])]
    assert [t.tolist() for t in F.link_tracks(seq)] == [[0], [0, 1], [1, 0]]


def test_extract_videos_manifest_and_no_face_frames(tmp_path, fx, photos):
    face = photos['grace_hopper'][40:360, 60:380]
    from skimage.transform import resize
    f = (resize(face, (96, 96), anti_aliasing=True) * 255).astype(np.uint8)
    frames = np.full((10, 120, 160, 3), 180, np.uint8)
    for i in range(10):
        if i in (4, 5): continue                                  # two frames without a face
        frames[i, 10:106, 4 + 5 * i:100 + 5 * i] = f
    write_mp4(tmp_path/'in'/'clip.mp4', frames)
    bad = tmp_path/'in'/'bad.mp4'; bad.write_text('x')
    rows = pd.DataFrame(dict(path=['clip.mp4', 'bad.mp4'], label=[1, 0], source=['test', 'test'], identity=[3, 4],
                             target_identity=[5, -1], split=['val', 'val'], clip_id=['c1', 'c2'], frame=[-1, -1], kind=['clip', 'clip']))
    with pytest.raises(M.VideoError, match='bad.mp4'):
        F.extract_videos(rows, fx, data_root=tmp_path/'data', base=tmp_path/'in', every=1, size=32)
    assert not (tmp_path/'data'/'faces').exists() or not any(p.name.endswith('.csv') for p in (tmp_path/'data'/'faces').rglob('*'))
    out = F.extract_videos(rows, fx, data_root=tmp_path/'data', base=tmp_path/'in', every=1, size=32, on_error='skip')
    man, frm = pd.read_csv(out/'manifest.csv'), pd.read_csv(out/'frames.csv', keep_default_na=False)
    assert list(man.columns[:9]) == list(MANIFEST_COLUMNS)
    assert len(man) == 8 and set(man['clip_id']) == {'c1'} and (man['label'] == 1).all() and (man['identity'] == 3).all()
    assert man['track'].nunique() == 1 or man['track'].value_counts().iloc[0] >= 4
    nf = frm[(frm['clip_id'] == 'c1') & (frm['n_faces'] == 0)]
    assert nf['frame'].tolist() == [4, 5] and (nf['reason'] == 'no face detected').all()
    assert frm[frm['clip_id'] == 'c2']['reason'].str.contains('unreadable').all()
    assert all((out/p).exists() for p in man['path'])
    assert load_rgb(out/man['path'][0]).shape == (32, 32, 3)
    assert F.extract_videos(rows, fx, data_root=tmp_path/'data', base=tmp_path/'in', every=1, size=32, on_error='skip') == out



def test_extract_videos_refuses_leaky_clips(tmp_path, fx):
    clip = write_mp4(tmp_path/'a.mp4', np.full((2, 32, 32, 3), 90, np.uint8))
    rows = pd.DataFrame(dict(path=[str(clip)] * 3, label=[0, 1, 0], source=['t'] * 3, identity=[3, 8, 6], target_identity=[-1, 3, -1],
                             split=['train', 'test', 'val'], clip_id=['r3', 'f8', 'r6'], frame=[-1] * 3, kind=['clip'] * 3))
    # the fake in test changes identity 3, whose real clip is in train: refused before any frame is decoded or any folder made
    with pytest.raises(LeakError, match=r'extract_videos: the clips given: 1 identity in more than one split: 3 \(test, train\)'):
        F.extract_videos(rows, fx, data_root=tmp_path/'data', every=1, size=32)
    assert not (tmp_path/'data'/'faces').exists()
    # the identity split copied by SynthFaces (`id_split`) is checked too
    with pytest.raises(LeakError, match=r'1 identity in more than one id_split: 3 \(test, train\)'):
        F.extract_videos(rows.assign(split='test', id_split=['train', 'test', 'val']), fx, data_root=tmp_path/'data', every=1, size=32)


def test_one_shared_mtcnn(fx, photos):
    m = F.get_mtcnn('cpu', fx.min_face_size)
    assert fx.mtcnn is m and F.FaceExtractor('cpu').mtcnn is m and F.get_mtcnn('cpu', fx.min_face_size) is m
    assert F.get_mtcnn('cpu', select_largest=True) is not F.get_mtcnn('cpu') and F.get_mtcnn('cpu', 40) is not m
    boxes, probs, lms = m.detect(photos['astronaut'][None], landmarks=True)          # the raw facenet-pytorch API
    assert len(boxes[0]) == 1 and probs[0][0] > 0.99 and lms[0].shape == (1, 5, 2)
    assert np.abs(boxes[0] - fx.detect(photos['astronaut'])[0].boxes).max() < 1e-3   # the extractor's boxes are the handle's
    with pytest.raises(ValueError, match='three probabilities'): F.get_mtcnn('cpu', thresholds=(0.6, 0.7))
    with pytest.raises(ValueError, match='factor'): F.get_mtcnn('cpu', factor=1.2)

def test_synthfaces_alignment_nme(fx):
    synth = pytest.importorskip('deepfake_course.data.synth')
    r = synth.render_faces(2, 4, size=128, seed=0)
    dets = fx.extract(r['images'], size=64, face_type='full', largest_only=True)
    hit = [i for i, d in enumerate(dets) if not d.empty]
    assert len(hit) >= 6
    nme = F.landmark_nme(r['landmarks5'][hit], torch.stack([dets[i].M[0] for i in hit]).double(), 64, 'full')
    assert nme.mean() <= 0.05
