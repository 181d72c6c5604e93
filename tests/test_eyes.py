"""Unit tests of deepfake_course.detect.eyes: eye strips and pairs, highlight segmentation and IoU, the registered detector, bad input."""
import cv2
import numpy as np
import pytest
import torch

from deepfake_course.detect import eyes
from deepfake_course.detect.eyes import (EyeInputError, eye_pairs, eye_strips, stack_eyes, split_eyes, highlight_masks, reflection_iou,
                                         EyeReflectionDetector)


pytestmark = pytest.mark.usefixtures('one_thread')      # conftest's: one torch thread for this module


def _drawn(dot_top=(30, 13), dot_bottom=(30, 13), sclera=0.8, offset=eyes.EYE_OFFSET):
    st = np.full((2, *eyes.EYE_STRIP), sclera, np.float32)
    for k, dot in enumerate((dot_top, dot_bottom)):
        cv2.circle(st[k], (32, 14), 8, 0.25, -1)
        if dot is not None: cv2.circle(st[k], dot, 2, 1.0, -1)
    return stack_eyes(torch.from_numpy(st)[None, :, None].expand(1, 2, 3, *eyes.EYE_STRIP), offset)


def test_stack_and_split():
    st = torch.rand(3, 2, 3, *eyes.EYE_STRIP)
    for off in (28, 32, 36):
        p = stack_eyes(st, off)
        assert p.shape == (3, 3, 64, 64)
        a, b = split_eyes(p, off)
        assert torch.equal(a, st[:, 0]) and torch.equal(b, st[:, 1])
    with pytest.raises(EyeInputError, match='offset 20'): stack_eyes(st, 20)
    with pytest.raises(EyeInputError, match='offset 40'): split_eyes(stack_eyes(st), 40)


def test_iou_of_drawn_highlights():
    assert reflection_iou(_drawn())[0] == pytest.approx(1.0)
    assert reflection_iou(_drawn(dot_bottom=(36, 18)))[0] == 0.0                 # the highlights apart
    assert 0.0 < reflection_iou(_drawn(dot_bottom=(31, 13)))[0] < 1.0            # one pixel apart: partly
    assert reflection_iou(_drawn(None, None, sclera=0.3))[0] == 0.0              # nothing bright: no highlight
    assert reflection_iou(_drawn(offset=32), offset=32)[0] == pytest.approx(1.0)
    m, spots = highlight_masks(_drawn())
    assert m.shape == (1, 2, eyes.EYE_STRIP[0] * eyes.UPSAMPLE, 64 * eyes.UPSAMPLE) and m.any()
    assert np.allclose(spots[0, 0] / eyes.UPSAMPLE, [30, 13], atol=1.0)
    u8 = (_drawn() * 255).to(torch.uint8)
    assert reflection_iou(u8)[0] == pytest.approx(1.0)                            # uint8 pairs read as [0, 255]


def test_bad_input_is_named():
    with pytest.raises(EyeInputError, match='must be N×3×S×S'): reflection_iou(torch.rand(2, 3, 64, 48))
    with pytest.raises(EyeInputError, match='need 68 landmarks'): eye_pairs(torch.rand(2, 3, 64, 64), np.zeros((2, 5, 2)))
    lm = np.zeros((1, 68, 2)); lm[0, 40] = np.nan
    with pytest.raises(EyeInputError, match='finite eyes'): eye_strips(torch.rand(1, 3, 64, 64), lm)
    with pytest.raises(EyeInputError, match='images must be'): eye_strips(torch.rand(3, 64, 64), np.zeros((3, 68, 2)))


def test_rendered_pairs_agree_more_than_mixed_ones():
    from deepfake_course.data.synth import render_faces
    o = render_faces(list(range(6)), 2, size=320, seed=5, physiology=True, **eyes.PORTRAIT)
    st = eye_strips(o['images'], o['landmarks68'].numpy())
    assert st.shape == (12, 2, 3, *eyes.EYE_STRIP) and 0 <= st.min() and st.max() <= 1
    p = stack_eyes(st)
    assert torch.allclose(p, eye_pairs(o['images'], o['landmarks68'].numpy()))
    mixed = stack_eyes(torch.stack([st[:, 0], st.roll(1, 0)[:, 1]], 1))
    assert reflection_iou(p).mean() > reflection_iou(mixed).mean() + 0.15


def test_detector_registered_and_scores(tmp_path):
    from deepfake_course.detect.core import DETECTORS, build_detector, save_detector, load_detector
    assert 'eyes' in DETECTORS and DETECTORS['eyes']['input_size'] == eyes.EYE_PAIR
    det = build_detector('eyes', rel=0.7)
    assert isinstance(det, EyeReflectionDetector) and float(det.rel) == pytest.approx(0.7) and int(det.offset) == eyes.EYE_OFFSET
    s = det(torch.cat([_drawn(), _drawn(dot_bottom=(36, 18))]))
    assert s.shape == (2,) and s[0] < 0.01 and s[1] == 1.0
    det2 = load_detector(save_detector(build_detector('eyes', rel=0.7, offset=32), tmp_path / 'eyes.pt'), expect='eyes')
    assert float(det2.rel) == pytest.approx(0.7) and int(det2.offset) == 32
    assert det2(_drawn(offset=32))[0] < 0.01
