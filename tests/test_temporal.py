"Unit tests of `deepfake_course.detect.temporal` (36_temporal) and the video path of `detect`."
import numpy as np, pandas as pd, pytest, torch
from deepfake_course.detect import temporal as T, videodata as V
from deepfake_course.detect.core import detect, clip_model_scores


def _videos(n=6, frames=16, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return T.VideoSet(torch.randint(0, 256, (n, frames, 3, size, size), generator=g, dtype=torch.uint8),
                      torch.randn(n, 80, 4 * frames, generator=g).half(), np.array([0, 1] * (n // 2)),
                      np.array(['real', 'flicker'] * (n // 2)), np.array(['train'] * n), np.arange(n) // 2,
                      np.array([f'v{i}' for i in range(n)]))


def test_voice_donors_same_split_other_person():
    real = pd.DataFrame(dict(path=[f'p{i}' for i in range(8)], identity=[0, 0, 1, 1, 2, 3, 4, 5],
                             split=['train'] * 4 + ['val', 'val', 'test', 'test']))
    d = T.voice_donors(real)
    by = real.set_index('path')
    for p, q in d.items():
        assert by.loc[p, 'split'] == by.loc[q, 'split'] and by.loc[p, 'identity'] != by.loc[q, 'identity']


def test_window_keeps_voice_and_mel_aligned():
    n = 20
    z = dict(frames=np.arange(n)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8), landmarks5=np.zeros((n, 5, 2)),
             landmarks68=np.zeros((n, 68, 2)), audio=np.arange(n * T.SAMPLES_PER_FRAME), mel=np.tile(np.arange(n * 4), (80, 1)))
    v = V._window(z, 2, 8, audio_start=5)
    assert v['frames'][0, 0, 0, 0] == 2 and len(v['frames']) == 8
    assert v['audio'][0] == 5 * T.SAMPLES_PER_FRAME and len(v['audio']) == 8 * T.SAMPLES_PER_FRAME
    assert v['mel'][0, 0] == 5 * 4 and v['mel'].shape[1] == 8 * 4


def test_flicker_and_paste_change_only_the_face():
    rng = np.random.default_rng(0)
    fr = rng.integers(0, 256, (4, 64, 64, 3)).astype(np.uint8)
    lm = np.tile(np.array([[20 + 24 * np.cos(a), 32 + 24 * np.sin(a)] for a in np.linspace(0, 2 * np.pi, 68)]) * 0.5 + 16, (4, 1, 1))
    out = T.framewise_flicker(fr, lm, rng)
    m = V._poly_masks(lm, T.FACE_HULL, (64, 64), 1.5) > 1e-3
    assert np.array_equal(out[~m], fr[~m]) and not np.array_equal(out, fr)
    new = 255 - fr
    pasted = T.paste_lower_face(fr, new, lm)
    m2 = V._poly_masks(lm, T.LOWER_FACE, (64, 64), 1.2) > 1e-3
    assert np.array_equal(pasted[~m2], fr[~m2])


def test_rerender_with_its_own_voice_is_the_clip():
    from deepfake_course.data.synth import render_clip
    c = render_clip(3, 6, size=32, seed=11)
    u8 = (c['frames'].clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(T.rerender_mouth(3, 11, 3, 11, 6, 32).astype(int) - u8.astype(int)).max() <= 1
    other = T.rerender_mouth(3, 11, 4, 5, 6, 32)
    assert np.abs(other.astype(int) - u8.astype(int)).max() > 10     # the mouth moved


def test_mask_inputs_masks_the_same_span():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        v, a = torch.ones(1, 3, 16, 8, 8), torch.ones(1, 80, 64)
        vm, am = T.mask_inputs(v, a, g, erase_p=0.0)
        dead_v = (vm[0] == 0).flatten(2).all(-1).all(0)
        dead_a = (am[0] == 0).all(0).reshape(-1, 4).all(-1)
        assert torch.equal(dead_v, dead_a)
        assert torch.equal(v, torch.ones_like(v))                   # the clean copy is untouched


def test_neg_cosine_centred_ignores_what_does_not_change():
    t = torch.randn(2, 8, 4)
    assert T.neg_cosine(t + 5.0, t).item() == pytest.approx(-1, abs=1e-5)        # an offset per clip does not count
    assert T.neg_cosine(t + 5.0, t, center=False).item() > -0.9
    p, q = torch.randn(2, 8, 4), torch.randn(2, 8, 4)
    w = torch.tensor([1.0, 0.0])                                                    # only the first clip counts
    assert T.neg_cosine(p, q, weight=w).item() == pytest.approx(T.neg_cosine(p[:1], q[:1]).item(), abs=1e-6)


def test_encoders_shapes_and_locality():
    enc = T.VideoEncoder(32, 4, 16).eval()
    x = torch.randn(2, 3, 12, 32, 32); y = x.clone(); y[:, :, -1] += 1
    with torch.no_grad():
        a, b = enc.cnn(x), enc.cnn(y)
    assert torch.allclose(a[:, :, :8], b[:, :, :8], atol=1e-5) and not torch.allclose(a[:, :, -1], b[:, :, -1])
    for bb in T.BACKBONES:
        for hd in T.HEADS:
            assert T.VideoEncoder(32, 4, 16, bb, hd)(x).shape == (2, 12, 16)
    assert T.AudioEncoder(4, 16)(torch.randn(2, 80, 48)).shape == (2, 12, 16)
    with pytest.raises(T.ClipError, match='expected video'): enc(torch.randn(2, 3, 12, 40, 40))
    with pytest.raises(ValueError, match='multiple of 8'): T.VideoEncoder(36)


def test_detector_refuses_missing_or_misaligned_audio():
    det = T.TemporalDetector(32, 4, 16, audio=True, proj_dim=8, hidden=16, clip_frames=8)
    x, m = torch.randn(2, 3, 8, 32, 32), torch.randn(2, 80, 32)
    assert det(x, m).shape == (2,)
    with pytest.raises(T.ClipError, match='needs the clip'): det(x)
    with pytest.raises(T.ClipError, match='log-mel frames'): det(x, m[..., :-4])


def test_init_from_stage1_and_stage2_errors():
    ssl = T.AVSSL(T.VideoEncoder(32, 4, 16), T.AudioEncoder(4, 16), 8, 16)
    det = T.TemporalDetector(32, 4, 16, audio=True, proj_dim=8, hidden=16).init_from(ssl)
    for k, v in ssl.audio.state_dict().items(): assert torch.equal(det.audio.state_dict()[k], v)
    data = _videos()
    with pytest.raises(ValueError, match='teacher'): T.train_stage2(det, data, steps=1, ssl_weight=0.3)
    with pytest.raises(ValueError, match='one class'): T.train_stage2(det, data.subset(data.label == 0), steps=1)


def test_teacher_update_is_an_ema():
    ssl = T.AVSSL(T.VideoEncoder(32, 4, 16), T.AudioEncoder(4, 16), 8, 16)
    with torch.no_grad():
        for p in ssl.video.parameters(): p.add_(1.0)
    before = next(ssl.teacher_v.parameters()).clone(); student = next(ssl.video.parameters())
    ssl.update_teachers(0.9)
    assert torch.allclose(next(ssl.teacher_v.parameters()), 0.9 * before + 0.1 * student)
    assert T.ema_momentum(256, 0.999) == pytest.approx(1 - 0.001 * 256 / 96)


def test_people_fraction_and_degrade():
    data = _videos(8)
    sub = T.people_fraction(data, 0.5, seed=1)
    assert len(np.unique(sub.person)) == 2 and set(sub.video) <= set(data.video)
    with pytest.raises(ValueError, match='fraction'): T.people_fraction(data, 0)
    d = T.degrade_videos(data, 'drop', 1.0)
    assert torch.equal(d.frames[:, 5], data.frames[:, 0])
    assert T.degrade_videos(data, 'blur', 1.0).frames.shape == data.frames.shape
    assert [T.ssl_name(w) for w in (0.0, 0.3, 1.0)] == ['0', '0.3', '1.0']


def test_clip_model_scores_windows_padding_and_refusal():
    det = T.TemporalDetector(32, 4, 16, proj_dim=8, hidden=16, clip_frames=8).eval()
    crops = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    p, info = clip_model_scores(det, crops, device='cpu')
    assert p.shape == (20,) and ((p > 0) & (p < 1)).all() and info['windows'] == 4 and info['padded'] == 0
    p, info = clip_model_scores(det, crops[:5], device='cpu')
    assert info['padded'] == 3 and p.shape == (5,)
    with pytest.raises(ValueError, match='cannot be scored'): clip_model_scores(det, crops[:3], device='cpu')
    # the video score is the window logits' mean: the same as scoring the windows directly
    with torch.no_grad(): l = det.clip_logits(crops[:8][None]).item()
    p, info = clip_model_scores(det, crops[:8], device='cpu')
    assert info['video_prob'] == pytest.approx(1 / (1 + np.exp(-l)), abs=1e-5)


def test_detect_with_an_audio_visual_model_on_arrays():
    det = T.TemporalDetector(32, 4, 16, audio=True, proj_dim=8, hidden=16, clip_frames=8).eval()
    det.input_size, det.detector_name = 32, 'temporal_av'
    frames = [np.random.default_rng(i).integers(0, 256, (32, 32, 3)).astype(np.uint8) for i in range(12)]
    wav = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    r = detect(frames, det, faces='none', device='cpu', audio=wav, fps=25)
    assert len(r) == 12 and 0 < r.attrs['video_prob'] < 1 and r.attrs['no_face_frames'] == []
    with pytest.raises(ValueError, match='no audio'): detect(frames, det, faces='none', device='cpu')
    with pytest.raises(ValueError, match='shorter than its frames'): detect(frames, det, faces='none', device='cpu', audio=wav[:3000])
    with pytest.raises(ValueError, match='consecutive'): detect(frames, det, faces='none', device='cpu', audio=wav, every=2)


def test_videos_from_manifest_reads_files_and_skips_bad_ones(tmp_path):
    from deepfake_course.data.manifest import tiny_video
    ok = [tiny_video(tmp_path / f'v{i}.mp4', n_frames=10, size=32, seed=i) for i in range(2)]
    mute = tiny_video(tmp_path / 'mute.mp4', n_frames=10, size=32, audio=False)
    short = tiny_video(tmp_path / 'short.mp4', n_frames=4, size=32)
    df = pd.DataFrame(dict(path=[str(p) for p in (*ok, mute, short)], label=[0, 1, 0, 1], source=['real', 'dub', 'real', 'dub'],
                           split='test', clip_id=['a', 'b', 'c', 'd']))
    vs = T.videos_from_manifest(df, video_frames=8, size=32, faces='none')
    assert len(vs) == 2 and vs.frames.shape == (2, 8, 3, 32, 32) and vs.mel.shape == (2, 80, 32)
    assert list(vs.type) == ['real', 'dub'] and list(vs.video) == ['a', 'b']
    reasons = dict(vs.skipped)
    assert 'no audio' in reasons[str(mute)] and '4 frames' in reasons[str(short)]
    assert len(T.videos_from_manifest(df.iloc[2:3], video_frames=8, faces='none', need_audio=False)) == 1
