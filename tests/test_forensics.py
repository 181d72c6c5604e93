"""detect.forensics: the classic detectors find what was planted, say clearly what is wrong with bad input, and score sets."""
import numpy as np, pandas as pd, pytest
from deepfake_course.detect.forensics import (ELA, CopyMoveBlocks, CopyMoveKeypoints, SimCamera, SimLens, flat_field, prnu_fingerprint,
                                              attribute_camera, ca_displacements, fit_ca, light_direction, true_light_2d, angle_diff,
                                              pixel_scores, localisation_table, score_tamper_set, ela, ForensicError, NoiseLevel)
from deepfake_course.generate.tamper import (copy_move_info, photo_crop, load_photo, render_scenes, jpeg_compress, remove_info,
                                             make_tamper_set)


def _texture(n=128, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, n, 3), dtype=np.uint8)


def test_block_matching_finds_a_planted_copy():
    tex = _texture()
    src = np.zeros((128, 128), bool); src[20:44, 16:48] = True
    img, gt, _ = copy_move_info(tex, mask=src, shift=(60, 50))
    assert pixel_scores(CopyMoveBlocks().predict_mask(img), gt)[0] > 0.8
    assert pixel_scores(CopyMoveBlocks(features='pca').predict_mask(img), gt)[0] > 0.8
    assert not CopyMoveBlocks().predict_mask(tex).any()                                   # nothing copied, nothing found
    with pytest.raises(ForensicError, match='too small'): CopyMoveBlocks(block=16).score_map(tex[:40, :40])


def test_keypoints_find_a_rotated_copy():
    photo = photo_crop(load_photo('skimage/astronaut.png'), 256, np.random.default_rng(0), zoom=(1.0, 1.0))
    img, gt, _ = copy_move_info(photo, rotation=20, scale=1.1, rng=3, area=(0.03, 0.04))
    tf = CopyMoveKeypoints().transforms(img)
    assert tf and abs(abs(np.degrees(np.arctan2(tf[0][0][1, 0], tf[0][0][0, 0]))) - 20) < 3
    assert pixel_scores(CopyMoveKeypoints().predict_mask(img), gt)[0] > 0.5


def test_prnu_attribution_three_cameras():
    cams = [SimCamera(s, 128) for s in range(3)]
    fps = {c.seed: prnu_fingerprint([c.shoot(flat_field(128, [c.seed, i]), [c.seed, i]) for i in range(8)]) for c in cams}
    scenes = render_scenes(2, 128, seed=1)['images']
    for j, img in enumerate(scenes):
        for c in cams: assert attribute_camera(c.shoot(img, [j, c.seed]), fps)[0] == c.seed
    with pytest.raises(ForensicError, match='got 3 image'): prnu_fingerprint([flat_field(128, i) for i in range(3)])
    with pytest.raises(ForensicError, match='one size'): prnu_fingerprint([flat_field(128, i) for i in range(5)] + [flat_field(64, 9)])


def test_ela_and_grey_input():
    img = _texture(64)
    assert ela(jpeg_compress(img, 90), 90).mean() < ela(img, 90).mean()              # a re-save at the same quality changes less
    assert ELA().score_map(img[..., 0]).shape == (64, 64)                             # grey is converted, not refused
    rgba = np.concatenate([img, np.full((64, 64, 1), 255, np.uint8)], -1)
    assert np.allclose(ELA().score_map(rgba), ELA().score_map(img))                  # opaque RGBA = RGB
    with pytest.raises(ForensicError, match='too small'): ELA().score(img[:8, :8])


def test_noise_level_sees_inpainting():
    noisy = np.clip(128 + np.random.default_rng(0).normal(0, 4, (128, 128, 3)), 0, 255).astype(np.uint8)
    out, m, _ = remove_info(noisy, method='telea', rng=1, area=(0.03, 0.04))
    nm = NoiseLevel().score_map(out)
    assert nm[m].mean() > 2 * nm[~m].mean()


def test_chromatic_aberration_fit():
    photo = photo_crop(load_photo('skimage/astronaut.png'), 256, np.random.default_rng(0), zoom=(1.0, 1.0))
    P, D, R = ca_displacements(SimLens(1.008, 1.0).apply(photo))
    s, c = fit_ca(P[R > 0.2], D[R > 0.2], R[R > 0.2])
    assert abs(s - 0.008) < 0.002 and np.abs(c - 127.5).max() < 20


def test_light_direction_on_rendered_faces():
    sc = render_scenes(4, 256, seed=2)
    err = [angle_diff(light_direction(sc['images'][i], sc['faces'][i] == k)[0], true_light_2d(sc['light_az'][i], sc['light_el'][i]))
           for i in range(4) for k in range(1, 5)]
    assert np.median(err) < 20, err


def test_pixel_scores_and_table():
    assert pixel_scores(np.ones((4, 4), bool), np.ones((4, 4), bool)) == (1.0, 1.0)
    f1, iou = pixel_scores(np.array([[1, 1], [0, 0]], bool), np.array([[1, 0], [0, 0]], bool))
    assert abs(f1 - 2 / 3) < 1e-9 and abs(iou - 0.5) < 1e-9
    with pytest.raises(ForensicError, match='differ in size'): pixel_scores(np.ones((2, 2)), np.ones((2, 3)))
    rng = np.random.default_rng(0)
    df = pd.DataFrame(dict(detector='d', tamper='t', jpeg=0, identity=np.repeat(np.arange(10), 2), label=np.tile([1, 0], 10),
                           score=np.tile([1.0, 0.0], 10) + rng.normal(0, 0.1, 20), f1=np.tile([0.5, np.nan], 10), iou=np.tile([0.3, np.nan], 10)))
    t = localisation_table(df, n_boot=50)
    assert t.auroc.iloc[0] == 1.0 and abs(t.f1.iloc[0] - 0.5) < 1e-9 and t.f1_lo.iloc[0] <= 0.5 <= t.f1_hi.iloc[0]


def test_score_tamper_set_pairs_every_image(tmp_path, monkeypatch):
    monkeypatch.setenv('DFC_C2PA', '0')
    name = make_tamper_set('copy_move', 6, data_root=tmp_path, source='photos', size=64, verbose=False)
    rows = score_tamper_set(CopyMoveBlocks(), name, tmp_path, jpeg=90)
    assert len(rows) == 12 and rows.label.sum() == 6 and (rows.jpeg == 90).all()
    assert rows[rows.label == 1].f1.notna().all() and rows[rows.label == 0].f1.isna().all()


def test_noise_level_is_finite_on_flat_jpeg_regions():
    "Regression: a box filter rounded the residual variance of a flat black area to -3e-14, and sqrt gave NaN scores."
    a = jpeg_compress(photo_crop(load_photo('skimage/astronaut.png'), 256, np.random.default_rng([0, 11, 15])), 75)
    m, s, _ = NoiseLevel().analyse(a)
    assert np.isfinite(m).all() and np.isfinite(s)
