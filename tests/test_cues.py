"""Unit tests of deepfake_course.detect.cues: POS heart rate, regions, bad input, EAR and blinks, eye crops, LRCN, degradations."""
import numpy as np
import pytest
import torch

from deepfake_course.detect import cues
from deepfake_course.detect.cues import (CueInputError, pos, heart_rate_bpm, check_pulse_length, region_masks, eye_aspect_ratio,
                                         blink_events, ear_blinks, eye_crops, LRCN, degrade, pulse_features, PulseDetector)
from deepfake_course.data.synth import render_clip


pytestmark = pytest.mark.usefixtures('one_thread')      # conftest's: one torch thread for this module


def _toy(bpm=72.0, T=250, fps=25, flicker=0.0):
    t = np.arange(T) / fps
    g = 1 - 0.01 * np.sin(2 * np.pi * bpm / 60 * t)
    rgb = np.stack([150 * (1 - 0.004 * np.sin(2 * np.pi * bpm / 60 * t)), 100 * g, 80 * (1 - 0.007 * np.sin(2 * np.pi * bpm / 60 * t))], 1)
    return rgb * (1 + flicker * np.sin(2 * np.pi * 0.4 * t))[:, None]


@pytest.mark.parametrize('bpm', [55.0, 80.0, 105.0])
def test_pos_heart_rate(bpm):
    hr, snr = heart_rate_bpm(pos(_toy(bpm, flicker=0.05), 25), 25)
    assert abs(hr - bpm) < 1.5 and snr > 0


def test_pos_ignores_brightness_only():
    t = np.arange(250) / 25
    flat = np.stack([150 + 0 * t, 100 + 0 * t, 80 + 0 * t], 1) * (1 + 0.05 * np.sin(2 * np.pi * 1.5 * t))[:, None]
    h = pos(flat, 25)
    assert np.abs(h).max() < 1e-6                       # a change of brightness alone is projected away


def test_too_short_clip_says_minimum():
    with pytest.raises(CueInputError, match=r'need at least 4 s \(120 frames at 30 fps\)'): check_pulse_length(90, 30)
    with pytest.raises(CueInputError, match='too short'): pos(_toy(T=50), 25)


def test_region_masks_and_bad_landmarks():
    c = render_clip(2, 4, size=64, seed=0)
    m = region_masks(c['landmarks68'][0].numpy(), (64, 64))
    assert m.shape == (3, 64, 64) and all(k.sum() > 20 for k in m)
    skin = c['mask'][0, 0].numpy() > 0.5
    assert all((k & skin).sum() / k.sum() > 0.9 for k in m)       # the regions are skin
    with pytest.raises(CueInputError): region_masks(np.zeros((5, 2)), (64, 64))


def test_pulse_on_rendered_clip():
    c = render_clip(6, 150, size=64, seed=1, physiology=True)
    fr = (c['frames'].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    f = pulse_features(fr, c['landmarks68'].numpy(), 25)
    assert abs(f['hr_est'] - float(c['params']['hr_bpm'].mean())) < 6
    assert set(cues.PULSE_FEATURES) <= set(f)
    still = pulse_features(np.repeat(fr[:1], len(fr), 0), np.repeat(c['landmarks68'].numpy()[:1], len(fr), 0), 25)
    assert f['amp'] > 0.1 and still['amp'] < 1e-6             # a face whose colour never changes has no pulse
    assert all(np.isfinite(still[k]) for k in cues.PULSE_FEATURES)   # and features a classifier can take


def test_ear_and_blinks():
    eye = np.array([[0, 0], [1, -1], [2, -1], [3, 0], [2, 1], [1, 1]], float)
    lm = np.zeros((3, 68, 2)); lm[:, 36:42] = eye; lm[:, 42:48] = eye + [10, 0]
    lm[1, [37, 38, 43, 44], 1] = -0.1; lm[1, [40, 41, 46, 47], 1] = 0.1     # closed in frame 1
    e = eye_aspect_ratio(lm)
    assert abs(e[0] - 4 / 6) < 1e-9 and e[1] < 0.1
    assert blink_events([0, 1, 1, 0, 1], 25).frames.tolist() == [2, 1]
    with pytest.raises(CueInputError, match='68 iBUG'): eye_aspect_ratio(np.zeros((2, 20, 2)))
    lm[0, 44] = np.nan
    with pytest.raises(CueInputError, match='missing'): eye_aspect_ratio(lm)


def test_ear_counts_rendered_blinks():
    ok = []
    for i in range(6):
        c = render_clip(i, 200, size=64, seed=3, physiology=True)
        ok.append(abs(len(ear_blinks(c['landmarks68'].numpy(), 25)) - int(c['params']['blink_onset'].sum())) <= 1)
    assert np.mean(ok) >= 5 / 6


def test_eye_crops_and_lrcn_shapes():
    c = render_clip(1, 6, size=64, seed=0)
    fr = (c['frames'].permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    x = eye_crops(fr, c['landmarks68'].numpy())
    assert x.shape == (6, 2, 1, *cues.EYE_CROP) and 0 <= x.min() and x.max() <= 1
    assert LRCN()(x.transpose(0, 1)).shape == (2, 6)
    lm = c['landmarks68'].numpy().copy(); lm[2, 36] = np.nan
    with pytest.raises(CueInputError, match='eye landmarks'): eye_crops(fr, lm)


def test_degrade():
    fr = (np.random.default_rng(0).random((2, 32, 32, 3)) * 255).astype(np.uint8)
    assert (degrade(fr) == fr).all()
    j = degrade(fr, 'jpeg', 30); r = degrade(fr, 'resize', 0.5)
    assert j.shape == fr.shape and r.shape == fr.shape and (j != fr).any() and (r != fr).any()
    with pytest.raises(ValueError, match='kind'): degrade(fr, 'blur', 1)


def test_head_pose_from_true_landmarks():
    from deepfake_course.data.synth import render_faces, rotation
    o = render_faces([4, 9], 10, size=64, seed=2)
    m3, K = cues.mean_face_3d(), cues.camera_matrix(64)
    R = rotation(o['params']['yaw'], o['params']['pitch'], o['params']['roll']).numpy()
    err = [np.degrees(np.arccos(np.clip(-cues.head_pose(l, m3, K, cues.WHOLE)[0][:, 2] @ (r[:, 2] * [1, 1, -1]), -1, 1)))
           for l, r in zip(o['landmarks68'].numpy(), R)]
    assert np.median(err) < 4                              # the head direction of the renderer, from its landmarks
    f = cues.pose_features(o['landmarks68'].numpy(), 64)
    assert f.shape == (20, cues.N_POSE_FEATURES) and np.isfinite(f).all()
    # a face whose centre is moved against its outline: the two poses part
    lm = o['landmarks68'].numpy().copy(); lm[:, cues.CENTRAL] += [3.0, 0.0]
    lm[:, 17:27] -= [3.0, 0.0]                             # the brows stay with the outline: only nose and mouth move
    assert np.median(cues.pose_features(lm, 64)[:, -1]) > np.median(f[:, -1])
    with pytest.raises(CueInputError, match='68 finite landmarks'): cues.pose_features(np.zeros((3, 5, 2)), 64)


def test_landmarknet_and_svm_head():
    net = cues.LandmarkNet()
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 68, 2)
    with pytest.raises(CueInputError, match='expects N×3×64×64'): net(torch.rand(2, 3, 32, 32))
    fr = (np.random.default_rng(0).random((3, 64, 64, 3)) * 255).astype(np.uint8)
    assert cues.detect_landmarks(net, fr).shape == (3, 68, 2)
    rng = np.random.default_rng(1); X = rng.normal(size=(200, 3)); y = (np.hypot(X[:, 0], X[:, 1]) > 1.2).astype(int)
    h = cues.SVMHead(3).fit(X, y, 10.0)
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(y, h(torch.from_numpy(X)).numpy()) > 0.95
    h2 = cues.SVMHead(3); h2.load_state_dict(h.state_dict())
    assert torch.allclose(h(torch.from_numpy(X)), h2(torch.from_numpy(X)))
    with pytest.raises(RuntimeError, match='not fitted'): cues.SVMHead(3)(torch.zeros(1, 3))
    with pytest.raises(ValueError, match='both 0'): cues.SVMHead(3).fit(X, np.zeros(200), 1.0)


def test_detectors_registered():
    from deepfake_course.detect.core import DETECTORS, build_detector
    assert {'pulse', 'lrcn', 'headpose'} <= set(DETECTORS)
    assert isinstance(build_detector('pulse'), PulseDetector) and isinstance(build_detector('lrcn'), LRCN)
    assert isinstance(build_detector('headpose'), cues.HeadPoseDetector)


def test_fitted_headpose_and_pulse_detectors_save_and_load(tmp_path):
    from deepfake_course.detect.core import build_detector, save_detector, load_detector
    rng = np.random.default_rng(3); X = rng.normal(size=(120, cues.N_POSE_FEATURES)); y = (X[:, 0] + X[:, 1] > 0).astype(int)
    det = build_detector('headpose'); det.head.fit(X, y, 1.0)
    assert det.checkpoint_config['n_sv'] == det.head.sv.shape[0] > 0          # the rebuilt head gets buffers of this size
    again = load_detector(save_detector(det, tmp_path / 'hp.pt'), expect='headpose')
    assert torch.allclose(again(torch.from_numpy(X)), det(torch.from_numpy(X)))
    assert torch.equal(again.landmarks.head[1].weight, det.landmarks.head[1].weight)
    p = build_detector('pulse'); p.head.fit(rng.normal(size=(40, len(cues.PULSE_FEATURES))), np.r_[np.zeros(20), np.ones(20)], 0.1)
    p2 = load_detector(save_detector(p, tmp_path / 'pulse.pt'), expect='pulse')
    f = torch.from_numpy(rng.normal(size=(5, len(cues.PULSE_FEATURES))))
    assert torch.allclose(p2(f), p(f)) and float(p2.head.C) == pytest.approx(0.1)
