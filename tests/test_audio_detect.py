"""detect.audio: refusing audio a countermeasure cannot judge, LFCC/CQCC features, the GMM back-end, the LCNN (exact resume),
and `detect_audio`."""
import math, warnings
import numpy as np
import pytest
import torch

from deepfake_course.data.audio import SR
from deepfake_course.generate.speech import AudioError, write_wav, speak, griffinlim_spoof, stft
from deepfake_course.detect.audio import (load_audio, check_audio, resample_audio, AudioResampled, linear_filterbank, dct_matrix,
                                          deltas, lfcc, CQT, cqcc, GMMDetector, fit_gmm, train_gmm_detector, MFM, LCNN,
                                          train_lcnn, score_audio, detect_audio)
from deepfake_course.detect.core import build_detector, save_detector, load_detector

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def voice():
    return speak(50_001, 0, seed=0)[0]


def test_bad_audio_is_refused_by_name(tmp_path, voice):
    x = voice
    assert np.abs(load_audio(write_wav(tmp_path / 'ok.wav', x)) - x).max() < 1e-4
    with pytest.raises(AudioError, match=r"silent.wav.*silent.*dBFS"): load_audio(write_wav(tmp_path / 'silent.wav', 1e-4 * x))
    with pytest.raises(AudioError, match=r"silent"): check_audio(np.zeros(SR))
    with pytest.raises(AudioError, match=r"clip.wav.*clipped"): load_audio(write_wav(tmp_path / 'clip.wav', np.clip(10 * x, -1, 1)))
    with pytest.raises(AudioError, match=r"0.20 s"): load_audio(write_wav(tmp_path / 'short.wav', x[:SR // 5]))
    with pytest.raises(AudioError, match=r"4000 Hz"): load_audio(write_wav(tmp_path / 'low.wav', resample_audio(x, SR, 4000), sr=4000))
    (tmp_path / 'notes.txt').write_text('hello')
    with pytest.raises(AudioError, match='notes.txt'): load_audio(tmp_path / 'notes.txt')
    with pytest.raises(FileNotFoundError, match='nowhere.wav'): load_audio(tmp_path / 'nowhere.wav')
    with pytest.raises(AudioError, match='mono'): check_audio(np.zeros((2, SR)))


def test_other_rates_are_resampled_with_a_warning(tmp_path, voice):
    p = write_wav(tmp_path / 'hi.wav', resample_audio(voice, SR, 48000), sr=48000)
    with pytest.warns(AudioResampled, match='48000'):
        y = load_audio(p)
    n = min(len(y), len(voice))
    assert abs(len(y) - len(voice)) <= 2 and np.corrcoef(y[:n], voice[:n])[0, 1] > 0.99
    with pytest.warns(AudioResampled, match='nothing above 4000 Hz'):
        load_audio(write_wav(tmp_path / 'tel.wav', resample_audio(voice, SR, 8000), sr=8000))


def test_video_without_sound_is_refused_and_with_sound_is_read(tmp_path, voice):
    from deepfake_course.core import write_mp4
    mute = write_mp4(tmp_path / 'mute.mp4', np.zeros((8, 32, 32, 3), np.uint8), fps=25)
    with pytest.raises(AudioError, match=r"mute.mp4.*without an audio track"): load_audio(mute)
    n = len(voice) // 640 * 640
    talk = write_mp4(tmp_path / 'talk.mp4', np.zeros((n // 640, 32, 32, 3), np.uint8), fps=25, audio=voice[:n], sample_rate=SR)
    assert abs(len(load_audio(talk)) - n) < 1100


def test_lfcc_pieces():
    fb = linear_filterbank(20, 512)
    centres = fb.argmax(1).numpy() * SR / 512
    assert np.allclose(np.diff(centres), np.diff(centres).mean(), atol=SR / 512 + 1)   # evenly spaced in Hz
    D = dct_matrix(20, 20)
    assert torch.allclose(D @ D.T, torch.eye(20), atol=1e-5)
    assert torch.allclose(deltas(torch.arange(12.))[2:-2], torch.ones(8))
    x = (0.3 * np.random.default_rng(0).standard_normal(SR)).astype(np.float32)
    f = lfcc(x)
    assert f.shape == (60, SR // 160 + 1) and torch.isfinite(f).all()
    assert torch.allclose(lfcc(torch.tensor(np.stack([x, x])))[1], f, atol=1e-4)


def test_cqt_puts_a_tone_in_its_bin_and_cqcc_shape():
    cq = CQT()
    for f in (150.0, 1200.0, 6000.0):
        tone = (0.5 * np.sin(2 * np.pi * f * np.arange(SR) / SR)).astype(np.float32)
        k = int(cq(tone).abs().mean(-1).argmax())
        assert abs(math.log2(cq.freqs[k] / f)) <= 1 / cq.B
    x = (0.3 * np.random.default_rng(1).standard_normal(SR // 2)).astype(np.float32)
    assert cqcc(x).shape == (60, SR // 2 // 160 + 1)


def test_gmm_llr_matches_sklearn_and_checkpoints(tmp_path):
    from sklearn.mixture import GaussianMixture
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (300, 60)), rng.normal(0.8, 1, (300, 60))
    g = build_detector('lfcc_gmm', n_components=3)
    with pytest.raises(RuntimeError, match='not fitted'): g(torch.zeros(1, SR))
    ga, gb = GaussianMixture(3, covariance_type='diag', random_state=0).fit(a), fit_gmm(b, 3)
    g.set_mixture(0, ga); g.set_mixture(1, gb); g.fitted.fill_(True)
    ll = g.frame_loglik(torch.tensor(a[:7]))
    assert np.allclose(ll[:, 0].numpy(), ga.score_samples(a[:7]), atol=1e-6)
    assert np.allclose(ll[:, 1].numpy(), gb.score_samples(a[:7]), atol=1e-6)
    g2 = load_detector(save_detector(g, tmp_path / 'g.pt'), expect='lfcc_gmm')
    assert torch.equal(g2.mu, g.mu) and torch.equal(g2.var, g.var) and bool(g2.fitted)
    with pytest.raises(ValueError, match='front_end'): GMMDetector('mfcc')


def test_gmm_detector_separates_griffin_lim(voice):
    real = [speak(i, 0, seed=0, seconds=0.8)[0] for i in range(6)]
    fake = [griffinlim_spoof(w, 8) for w in real]
    m = train_gmm_detector('lfcc_gmm', real[:4], fake[:4], n_components=2, max_frames=2000)
    s = score_audio(m, real[4:] + fake[4:])
    assert s[2:].min() > s[:2].max()                            # the held-out spoofs score above the held-out real speech


def test_mfm_and_lcnn_any_length_and_gain():
    assert MFM()(torch.tensor([1., 5., 3., 2.])[None, :, None]).flatten().tolist() == [3.0, 5.0]
    net = LCNN(width=4).eval()
    x = torch.tensor(speak(1, 0, seed=0)[0])
    with torch.no_grad():
        assert net(torch.randn(2, 9000) * 0.1).shape == (2,)
        assert torch.allclose(net(x[None]), net(0.25 * x[None]), atol=1e-4)     # loudness does not count


def test_lcnn_resume_is_exact(tmp_path):
    from deepfake_course.train import InterruptAfter
    real = [speak(i, 0, seed=0, seconds=0.6)[0] for i in range(4)]
    fake = [griffinlim_spoof(w, 2) for w in real]
    kw = dict(width=4, epochs=3, steps=2, batch_size=4, seconds=0.25, lr=1e-3, device='cpu', seed=0)
    whole = train_lcnn(real[:3], fake[:3], real[3:], fake[3:], ckpt_dir=tmp_path / 'a', **kw)
    with pytest.raises(KeyboardInterrupt):
        train_lcnn(real[:3], fake[:3], real[3:], fake[3:], ckpt_dir=tmp_path / 'b', callbacks=[InterruptAfter(1)], **kw)
    resumed = train_lcnn(real[:3], fake[:3], real[3:], fake[3:], ckpt_dir=tmp_path / 'b', **kw)
    assert list(resumed.history.epoch) == [1, 2, 3]
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_detect_audio(tmp_path, voice):
    from deepfake_course.core import write_mp4
    real = [speak(i, 0, seed=0, seconds=0.8)[0] for i in range(4)]
    m = train_gmm_detector('lfcc_gmm', real, [griffinlim_spoof(w, 4) for w in real], n_components=2, max_frames=2000)
    ck = save_detector(m, tmp_path / 'm.pt')
    p = write_wav(tmp_path / 'v.wav', voice)
    out = detect_audio([p, voice], ck, expect='lfcc_gmm')
    assert list(out.source) == [str(p), '<array>'] and out.score.between(0, 1).all()
    assert abs(out.logit[0] - out.logit[1]) < 1e-2                  # the file and its samples score the same
    assert abs(out.logit[0] - score_audio(m, [voice])[0]) < 1e-2
    mute = write_mp4(tmp_path / 'mute.mp4', np.zeros((8, 32, 32, 3), np.uint8), fps=25)
    with pytest.raises(AudioError, match='without an audio track'): detect_audio(mute, ck)
    with pytest.raises(ValueError, match="not an audio countermeasure"): detect_audio(p, build_detector('thumbnail_logreg'))


def test_registry_builds_the_audio_detectors_without_importing_them():
    "A fresh interpreter finds the audio countermeasures through the registry (detect.core's module list)."
    import subprocess, sys
    code = ("from deepfake_course.detect.core import list_detectors, build_detector; n = set(list_detectors()['name']); "
            "print(' '.join(sorted(n & {'lfcc_gmm', 'cqcc_gmm', 'lcnn'})), type(build_detector('lcnn', width=4)).__name__)")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ['cqcc_gmm', 'lcnn', 'lfcc_gmm', 'LCNN']
