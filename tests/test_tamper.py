"""generate.tamper: the tampering primitives (masks match what changed), bad input, and the tamper sets (no split leak)."""
import numpy as np, pytest, torch
from deepfake_course.generate.tamper import (as_rgb_u8, check_mask, splice, copy_move_info, remove, self_blend, jpeg_compress,
                                             random_mask, make_tamper_set, load_tamper_set, render_scenes, TamperError,
                                             TAMPER_KINDS, REMOVAL_METHODS)
from deepfake_course.data.manifest import check_no_leak, split_groups


def _texture(h=96, w=96, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_conversions_and_bad_input():
    assert as_rgb_u8(np.zeros((10, 12))).shape == (10, 12, 3)                       # grey -> 3 channels
    rgba = np.zeros((4, 4, 4), np.uint8); rgba[..., :3] = 255; rgba[..., 3] = 0
    assert as_rgb_u8(rgba).max() == 0                                                # alpha composited over black
    assert as_rgb_u8(torch.ones(3, 5, 7)).shape == (5, 7, 3) and as_rgb_u8(torch.ones(3, 5, 7)).min() == 255
    with pytest.raises(TamperError, match='differs from the image'): check_mask(np.ones((5, 5)), (6, 5))
    with pytest.raises(TamperError, match=r'\[0, 1\]'): as_rgb_u8(np.full((4, 4, 3), 3.0))
    with pytest.raises(TamperError, match='differs from the image'): splice(_texture(), _texture(seed=1), mask=np.ones((10, 10)))


def test_splice_changes_only_its_mask():
    t, d = _texture(), _texture(seed=1)
    out, m = splice(t, d, rng=0)
    assert m.shape == t.shape[:2] and m.any()
    assert (out[~m] == t[~m]).all() and (out[m] == t[m]).mean() < 0.05


def test_copy_move_copies_the_region():
    img = _texture()
    src = np.zeros((96, 96), bool); src[10:26, 10:30] = True
    out, m, info = copy_move_info(img, mask=src, shift=(50, 40))
    assert (out[60:76, 50:70] == img[10:26, 10:30]).all()                            # an exact copy, shifted
    assert m[10:26, 10:30].all() and m[60:76, 50:70].all() and m.sum() == 2 * src.sum()
    assert (out[~info['copy_mask']] == img[~info['copy_mask']]).all()
    with pytest.raises(TamperError, match='outside|no place'): copy_move_info(img, mask=src, shift=(90, 0))


@pytest.mark.parametrize('method', REMOVAL_METHODS)
def test_remove_fills_only_the_mask(method):
    img = _texture()
    out, m = remove(img, method=method, rng=3)
    assert (out[~m] == img[~m]).all() and (out[m] != img[m]).any()


def test_self_blend_and_jpeg():
    img = _texture()
    m = random_mask(96, 96, 0, (0.1, 0.15), shape='ellipse')
    out, gt = self_blend(img, mask=m, rng=1)
    assert gt.shape == m.shape and (gt & m).sum() > 0.7 * m.sum()
    j = jpeg_compress(img, 50)
    assert j.shape == img.shape and 0 < np.abs(j.astype(int) - img).mean()
    with pytest.raises(TamperError, match='quality'): jpeg_compress(img, 0)


@pytest.mark.parametrize('source', ['synth', 'photos'])
def test_tamper_set_has_masks_and_no_leak(tmp_path, source, monkeypatch):
    monkeypatch.setenv('DFC_C2PA', '0')
    name = make_tamper_set('splice', 9, data_root=tmp_path, source=source, size=64, verbose=False)
    d = load_tamper_set(name, data_root=tmp_path)
    df = d['manifest']
    check_no_leak(df)
    g = split_groups(df); assert (df.groupby(g).split.nunique() == 1).all()
    assert set(df.split) == {'train', 'val', 'test'}
    assert tuple(d['masks'].shape) == (9, 64, 64) and d['images'].shape == d['pristine'].shape == (9, 3, 64, 64)
    changed = (d['images'] - d['pristine']).abs().amax(1) > 1.5 / 255
    assert (changed & d['masks']).sum() >= 0.95 * changed.sum() and changed.any()    # what changed is inside the mask
    assert make_tamper_set('splice', 9, data_root=tmp_path, source=source, size=64, verbose=False) == name   # cached
    if source == 'synth':
        assert {'light_az', 'donor_light_az', 'faces', 'spliced_face'} <= set(df.columns)
    else:
        assert (df.target_identity >= 0).all() and (df.identity != df.target_identity).all()
    test = load_tamper_set(name, data_root=tmp_path, split='test')
    assert len(test['manifest']) == (df.split == 'test').sum() == len(test['images'])


def test_make_tamper_set_bad_input(tmp_path):
    with pytest.raises(TamperError, match='kind'): make_tamper_set('morph', 4, data_root=tmp_path)
    with pytest.raises(TamperError, match='unknown parameter'): make_tamper_set('remove', 4, data_root=tmp_path, rotation=3)
    with pytest.raises(TamperError, match='multiple of 16'): make_tamper_set('remove', 4, data_root=tmp_path, size=100)
    with pytest.raises(TamperError, match='method'): make_tamper_set('remove', 4, data_root=tmp_path, method='magic')


def test_scenes_share_one_light():
    sc = render_scenes(2, 64, seed=3)
    assert sc['images'].shape == (2, 64, 64, 3) and sc['faces'].max() == 4 and sc['landmarks'].shape == (2, 4, 68, 2)
    p = sc['params']
    assert torch.equal(p['light_az'].view(2, 4)[:, 0:1].expand(2, 4), p['light_az'].view(2, 4))
