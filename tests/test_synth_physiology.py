"""Tests of SynthFaces' physiology option (issue 22): off by default and byte-identical to the renderer before it;
when on, a pulse, natural blinks and corneal highlights that follow the light, with their truth returned."""
import hashlib, json
import numpy as np
import pytest
import torch

from deepfake_course.data import synth
from deepfake_course.data.synth import render_clip, render_faces, clip_params, make_synthfaces, heart_rate, blink_rate


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _digest(x): return hashlib.sha256((x.clamp(0, 1) * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()[:16]


# digests of the renderer before the physiology option (git c24c9db), computed on this project's CPU build of torch
def test_default_pixels_unchanged():
    c = render_clip(3, 12, size=64, seed=0)
    assert _digest(c['frames']) == '9d98aca5fd493a64'
    assert hashlib.sha256(c['landmarks68'].numpy().tobytes()).hexdigest()[:16] == '7d05e337558d8754'
    assert hashlib.sha256(c['audio'].numpy().tobytes()).hexdigest()[:16] == 'a86ff35f6d3a5ee8'
    assert _digest(render_clip(5, 40, size=96, seed=7)['frames']) == '3a77ac876c5ed249'
    assert _digest(render_faces([0, 4], 3, size=64, seed=1)['images']) == 'eb5ccdcc0ebfaba0'
    assert not {'pulse', 'glint', 'hr_bpm', 'blink_onset'} & set(clip_params(3, 12)[0])


def test_build_hash_unchanged_and_physiology_in_hash_only_when_on(tmp_path):
    kw = dict(n_identities=1, images_per_identity=1, clips_per_identity=1, size=32, clip_frames=4)
    a = make_synthfaces(tmp_path, **kw)
    assert a.name == '72570a3d76'                     # the hash this configuration had before the option existed
    assert 'physiology' not in json.loads((a / 'card.json').read_text())['config']
    b = make_synthfaces(tmp_path, physiology=True, **kw)
    assert b.name != a.name and json.loads((b / 'card.json').read_text())['config']['physiology'] is True
    z = np.load(next((b / 'clips').glob('*.npz')))
    assert {'hr_bpm', 'pulse_wave', 'blink_onset', 'yaw', 'light_az'} <= set(z.files)
    assert 'hr_bpm' not in np.load(next((a / 'clips').glob('*.npz'))).files


def test_heart_and_blink_rates_per_identity():
    hr = heart_rate(range(200))
    assert hr.min() >= 50 and hr.max() <= 110 and hr.std() > 10            # spread over the range
    np.testing.assert_array_equal(heart_rate([7, 3]), heart_rate([7, 3]))   # stable per person
    br = blink_rate(range(200))
    assert 18 < np.median(br) < 34 and br.min() > 5                          # about 26/min while talking


def test_pulse_colour_and_waveform():
    p, _, _ = clip_params(2, 250, seed=1, physiology=True)
    f = p['pulse'].numpy()
    amp = f.max(0) - f.min(0)
    assert amp[1] > amp[2] > amp[0] and 0.01 < amp[1] < 0.05              # green strongest, a small change
    w = p['pulse_wave'].numpy()
    spec = np.abs(np.fft.rfft(w - w.mean(), 4096)); fr = np.fft.rfftfreq(4096, 1 / synth.FPS)
    assert abs(fr[spec.argmax()] * 60 - float(p['hr_bpm'].mean())) < 2        # the waveform beats at the rendered rate
    assert abs(float(p['hr_bpm'].mean()) - heart_rate([2])[0]) < 2


def test_skin_mean_carries_pulse():
    def green(c):   # mean green of the skin, less its 1-s moving average (pose and expression change slowly)
        m = c['mask'][:, 0] > 0.9
        g = ((c['frames'][:, 1] * m).sum((1, 2)) / m.sum((1, 2))).numpy()
        return (g - np.convolve(g, np.ones(25) / 25, 'same'))[12:-12]
    for i in (4, 5):
        c = render_clip(i, 200, size=48, seed=2, physiology=True)
        w = c['params']['pulse_wave'].numpy()[12:-12]
        assert np.corrcoef(green(c), w)[0, 1] < -0.6                            # more blood, darker green
        assert abs(np.corrcoef(green(render_clip(i, 200, size=48, seed=2)), w)[0, 1]) < 0.4   # no pulse by default


def test_blinks_natural():
    durs, counts = [], []
    for i in range(12):
        p, _, _ = clip_params(i, 500, seed=0, physiology=True)
        on = p['blink_onset'].numpy() > 0
        counts.append(on.sum()); durs += p['blink_duration'].numpy()[on].tolist()
        b = p['blink'].numpy()
        for f in np.flatnonzero(on): assert b[f:f + 3].max() > 0.5            # every blink half-closes the eye at least in one frame
    rate = np.sum(counts) / (12 * 20) * 60
    assert 12 < rate < 45 and min(durs) >= 0.1 and max(durs) <= 0.4


def _glint_centre(img, ref, l68, eye):
    "Centroid of what the highlight adds to one eye (against `ref`, the same face without it), relative to the eye's centre, in eye widths."
    pts = l68[36:42] if eye == 0 else l68[42:48]
    x0, y0 = pts.min(0).values.floor().int().tolist(); x1, y1 = pts.max(0).values.ceil().int().tolist()
    wm = (img - ref)[:, y0:y1 + 1, x0:x1 + 1].mean(0).clamp_min(0)
    wm = wm * (wm > 0.3 * wm.max())
    if wm.sum() == 0: return None
    ys, xs = torch.meshgrid(torch.arange(wm.shape[0]), torch.arange(wm.shape[1]), indexing='ij')
    c = torch.stack([(xs * wm).sum() / wm.sum() + x0, (ys * wm).sum() / wm.sum() + y0])
    return ((c - pts.mean(0)) / (pts[:, 0].max() - pts[:, 0].min())).numpy()


def test_corneal_highlight_follows_light_in_both_eyes():
    ids = [1, 2, 5]
    kw = dict(size=192, seed=0, yaw=0, pitch=0, roll=0, gaze=0, blink=0, light_el=10, noise=0, blur=0, jpeg=None)
    cen = {}
    for az in (-45, 45):
        on, off = render_faces(ids, 1, light_az=az, physiology=True, **kw), render_faces(ids, 1, light_az=az, **kw)
        cen[az] = [[_glint_centre(on['images'][k], off['images'][k], on['landmarks68'][k], e) for e in (0, 1)] for k in range(len(ids))]
    for k in range(len(ids)):
        (l0, l1), (r0, r1) = cen[-45][k], cen[45][k]
        assert r0[0] - l0[0] > 0.05 and r1[0] - l1[0] > 0.05                  # both move with the light (x right)
        assert abs(l0[0] - l1[0]) < 0.05 and abs(r0[0] - r1[0]) < 0.05        # translated alike, not mirrored
