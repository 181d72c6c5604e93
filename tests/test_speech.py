"""generate.speech: WAV files with tags, the speech corpus, Griffin-Lim, the neural vocoder (exact resume), voice conversion
and the spoof sets written through FakeSetWriter."""
import json, math
import numpy as np
import pandas as pd
import pytest
import torch

from deepfake_course.data.audio import SR, log_mel
from deepfake_course.data.fakes import read_fake_set
from deepfake_course.data.manifest import check_no_leak
from deepfake_course.generate.speech import (AudioError, write_wav, read_wav, read_wav_tags, speak, speaker_voice, make_speech,
                                             read_speech, load_waves, median_f0, stft, mel_to_linear, griffin_lim,
                                             griffinlim_spoof, mel_distance, MelVocoder, WaveCrops, train_vocoder,
                                             pitch_formant_shift, vc_targets, vc_spoof, make_spoof_set, vocoder_loss)

pytestmark = pytest.mark.usefixtures('one_thread')


def test_wav_round_trip_and_tags(tmp_path):
    x = (0.6 * np.sin(2 * np.pi * 300 * np.arange(SR // 2) / SR)).astype(np.float32)
    p = write_wav(tmp_path / 'a.wav', x, tags={'method': 'm', 'synthetic': 'yes'})
    y, sr = read_wav(p)
    assert sr == SR and y.shape == x.shape and np.abs(y - x).max() <= 1 / 32767 + 1e-6
    assert read_wav_tags(p) == {'method': 'm', 'synthetic': 'yes'}
    assert read_wav_tags(write_wav(tmp_path / 'b.wav', x)) == {}
    (tmp_path / 'c.wav').write_text('not audio')
    with pytest.raises(AudioError, match='c.wav'): read_wav(tmp_path / 'c.wav')
    with pytest.raises(FileNotFoundError, match='gone.wav'): read_wav(tmp_path / 'gone.wav')
    with pytest.raises(AudioError, match='NaN'): write_wav(tmp_path / 'd.wav', np.array([0.0, np.nan]))


def test_speak_is_the_identity_voice_and_deterministic():
    x, info = speak(7, 0, seed=0)
    assert np.array_equal(x, speak(7, 0, seed=0)[0])
    assert not np.array_equal(x[:2000], speak(7, 1, seed=0)[0][:2000])
    assert 1.5 <= len(x) / SR <= 2.5 and 0.3 <= np.abs(x).max() <= 0.9 + 1e-6
    v = speaker_voice(7)['pitch_hz']
    assert abs(info['pitch_hz'] / v - 1) < 0.2                  # the person's voice, drawn around it
    assert abs(median_f0(x) / info['pitch_hz'] - 1) < 0.08      # and the signal has that pitch
    quiet = x[:int(0.04 * SR)]
    assert 0 < np.sqrt(np.mean(quiet ** 2)) < 10 ** (-50 / 20)   # a noise floor, not digital silence


def test_make_speech_splits_by_identity_and_is_reused(tmp_path):
    p = make_speech(tmp_path, n_identities=12, utterances=1, min_seconds=0.6, max_seconds=0.7, seed=0)
    assert make_speech(tmp_path, n_identities=12, utterances=1, min_seconds=0.6, max_seconds=0.7, seed=0) == p
    df = read_speech(p)
    assert df.attrs['speech_set'] == f'speech/{p.name}' and len(df) == 12 and (df.label == 0).all()
    check_no_leak(df, 'identity')
    assert set(df.split) == {'train', 'val', 'test'}
    assert read_wav_tags(df.path.iloc[0])['synthetic'].startswith('SynthFaces')
    with pytest.raises(FileNotFoundError, match='speech/nothing'): read_speech('speech/nothing', tmp_path)
    with pytest.raises(ValueError, match='min_seconds'): make_speech(tmp_path, min_seconds=3, max_seconds=2)


def test_griffin_lim_converges_and_keeps_the_mel():
    x, _ = speak(3, 0, seed=0, seconds=0.8)
    mag = mel_to_linear(log_mel(x))
    sc = lambda it: float((stft(griffin_lim(mag, len(x), it)).abs() - mag).norm() / mag.norm())
    assert sc(16) < 0.6 * sc(0)
    y = griffinlim_spoof(x, 16)
    assert y.shape == x.shape and abs(np.abs(y).max() - np.abs(x).max()) < 1e-5
    other, _ = speak(4, 0, seed=0, seconds=0.8)
    assert mel_distance(x, y) < 0.5 * mel_distance(x, other)


def test_pitch_formant_shift_moves_pitch_and_refuses_wild_ratios():
    x, _ = speak(2, 0, seed=0)
    f = median_f0(x)
    for r in (0.8, 1.25):
        assert abs(median_f0(pitch_formant_shift(x, r, 1.0)) / f / r - 1) < 0.05
    with pytest.raises(ValueError, match='out of range'): pitch_formant_shift(x, 9.0, 1.0)


def test_vc_targets_stay_in_split():
    sp = pd.DataFrame(dict(identity=range(8), split=['train'] * 4 + ['val'] * 2 + ['test'] * 2))
    t = vc_targets(sp, seed=0)
    where = dict(zip(sp.identity, sp.split))
    assert all(t[i] != i and where[t[i]] == where[i] for i in t)
    with pytest.raises(ValueError, match="split 'test' has 1"):
        vc_targets(pd.DataFrame(dict(identity=[0, 1, 2], split=['train', 'train', 'test'])))


def test_vocoder_shapes_loss_and_exact_resume(tmp_path):
    from deepfake_course.train import InterruptAfter
    waves = [speak(i, 0, seed=0, seconds=0.5)[0] for i in range(4)]
    net = MelVocoder(width=8, depth=1)
    assert net(log_mel(waves[0])[None, :, :20]).shape == (1, 20 * 160)
    assert float(vocoder_loss(torch.tensor(waves[0])[None], torch.tensor(waves[0])[None])) < 1e-4
    with pytest.raises(AudioError, match='shorter'): WaveCrops([waves[0][:100]], frames=20)
    kw = dict(width=8, depth=1, epochs=3, steps=2, batch_size=2, frames=20, lr=1e-3, device='cpu', seed=0)
    whole = train_vocoder(waves[:3], waves[3:], ckpt_dir=tmp_path / 'a', **kw)
    with pytest.raises(KeyboardInterrupt):
        train_vocoder(waves[:3], waves[3:], ckpt_dir=tmp_path / 'b', callbacks=[InterruptAfter(1)], **kw)
    resumed = train_vocoder(waves[:3], waves[3:], ckpt_dir=tmp_path / 'b', **kw)
    assert list(resumed.history.epoch) == [1, 2, 3]
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_spoof_sets_through_the_fake_set_api(tmp_path):
    p = make_speech(tmp_path, n_identities=12, utterances=1, min_seconds=0.6, max_seconds=0.7, seed=0)
    real = read_speech(p)
    names = {m: make_spoof_set(m, real.attrs['speech_set'], tmp_path, gl_iters=2, verbose=False) for m in ('griffinlim', 'vc')}
    assert make_spoof_set('griffinlim', real.attrs['speech_set'], tmp_path, gl_iters=2, verbose=False) == names['griffinlim']
    for m, n in names.items():
        f = read_fake_set(n, tmp_path)
        assert len(f) == len(real) and (f.label == 1).all() and (f.kind == 'clip').all() and (f.media == 'audio').all()
        check_no_leak(pd.concat([real, f]), 'identity')
        tags = read_wav_tags(f.path.iloc[0])
        assert tags['method'] == f'speech-{m}' and tags['fake_set'] == n
        assert set(f.from_clip) == set(real.clip_id)
    v = read_fake_set(names['vc'], tmp_path)
    sp = dict(zip(real.identity, real.split))
    assert (v.identity != v.target_identity).all() and all(sp[a] == sp[b] for a, b in zip(v.identity, v.target_identity))
    with pytest.raises(ValueError, match='method must be one of'): make_spoof_set('tts', real.attrs['speech_set'], tmp_path)
