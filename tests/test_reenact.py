"""Unit tests of generate.reenact: motions, the equivariance transform, training and resume, animation, the fake set."""
import numpy as np
import pandas as pd
import pytest
import torch

from deepfake_course.generate.reenact import (
    FOMM, NoFaceError, RandomTPS, TalkingClips, animate, coordinate_grid, equivariance_losses, load_fomm,
    make_reenact_fake_set, mouth_opening, reenact_pairs, render_talking_clips, sparse_motions, talking_clips, train_fomm)
from deepfake_course.train import CheckpointError

pytestmark = pytest.mark.usefixtures('one_thread')
TINY = dict(num_kp=3, kp_width=4, gen_width=4, dense_width=4, n_res=1)


@pytest.fixture(scope='module')
def clips():
    return render_talking_clips([0, 1, 2], n_frames=5, size=64, seed=0)


def test_clips_are_cached_and_typed(clips, tmp_path):
    assert clips.frames.dtype == torch.uint8 and clips.frames.shape == (3, 5, 3, 64, 64) and clips.masks.dtype == torch.bool
    a = talking_clips([0, 1], 5, 64, 0, data_root=tmp_path)
    assert len(list((tmp_path / 'reenact' / 'clips').glob('*.pt'))) == 1
    b = talking_clips([0, 1], 5, 64, 0, data_root=tmp_path)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.frames, clips.frames[:2])
    c = talking_clips([0, 1], 5, 64, 0, scale=None, data_root=tmp_path)      # the stills' framing: another clip, another file
    assert not torch.equal(c.frames, a.frames) and len(list((tmp_path / 'reenact' / 'clips').glob('*.pt'))) == 2
    with pytest.raises(ValueError, match='no identities'): render_talking_clips([], 5)


def test_sparse_motions_move_by_the_keypoint_shift():
    kp = dict(value=torch.zeros(1, 2, 2), jacobian=torch.eye(2).expand(1, 2, 2, 2).clone())
    moved = dict(value=kp['value'] + torch.tensor([0.2, 0.1]), jacobian=kp['jacobian'])
    m = sparse_motions(kp, moved, 6, 6)
    g = coordinate_grid(6, 6)
    assert torch.allclose(m[0, 0], g) and torch.allclose(m[0, 1:] - g, torch.tensor([-0.2, -0.1]).expand(2, 6, 6, 2), atol=1e-6)
    scaled = dict(value=kp['value'], jacobian=2 * kp['jacobian'])      # the source's neighbourhood twice as large
    assert torch.allclose(sparse_motions(scaled, kp, 6, 6)[0, 1], 2 * g, atol=1e-6)


def test_tps_jacobian_and_equivariance_of_a_perfect_detector():
    tr = RandomTPS(3, 0.05, 0.005, gen=torch.Generator().manual_seed(0))
    c = torch.rand(3, 4, 2) * 2 - 1
    h = 1e-3
    fd = torch.stack([(tr.warp(c + torch.tensor([h, 0.])) - tr.warp(c - torch.tensor([h, 0.]))) / (2 * h),
                      (tr.warp(c + torch.tensor([0., h])) - tr.warp(c - torch.tensor([0., h]))) / (2 * h)], -1)
    assert torch.allclose(tr.jacobian(c), fd, atol=1e-3)
    class Fixed(torch.nn.Module):     # keypoints that do not depend on the image: equivariance must then fail
        def forward(self, x): return dict(value=torch.zeros(len(x), 1, 2), jacobian=torch.eye(2).expand(len(x), 1, 2, 2))
    v, j = equivariance_losses(Fixed(), torch.rand(2, 3, 16, 16), Fixed()(torch.rand(2, 3, 16, 16)),
                               gen=torch.Generator().manual_seed(1), sigma_affine=0.2)
    assert v > 0.01 and j > 0.01


def test_training_resumes_exactly_and_refuses_another_model(clips, tmp_path):
    class Stop(Exception): pass
    def stop(step):
        if step == 3: raise Stop
    kw = dict(steps=5, batch_size=2, device='cpu', verbose=False)
    torch.manual_seed(0); full = train_fomm(FOMM(64, **TINY), clips, **kw)
    torch.manual_seed(0)
    with pytest.raises(Stop): train_fomm(FOMM(64, **TINY), clips, ckpt_path=tmp_path / 'ck.pt', ckpt_every=1, callback=stop, **kw)
    torch.manual_seed(3); res = train_fomm(FOMM(64, **TINY), clips, ckpt_path=tmp_path / 'ck.pt', ckpt_every=1, **kw)
    assert res.resumed_from == 2
    for a, b in zip(full.model.state_dict().values(), res.model.state_dict().values()): assert torch.equal(a, b)
    assert full.history['loss'].tolist() == res.history['loss'].tolist()
    with pytest.raises(CheckpointError): train_fomm(FOMM(64, **dict(TINY, num_kp=4)), clips, ckpt_path=tmp_path / 'ck.pt', **kw)
    assert load_fomm(tmp_path / 'ck.pt').config == FOMM(64, **TINY).config
    torch.save({'name': 'dcgan'}, tmp_path / 'other.pt')
    with pytest.raises(CheckpointError): load_fomm(tmp_path / 'other.pt')
    with pytest.raises(ValueError, match='the model takes'): train_fomm(FOMM(32, **TINY), clips, steps=1)


def test_animate_checks_and_relative_motion(clips):
    m = FOMM(64, **TINY).eval()
    c = clips.clip(0)
    with pytest.raises(ValueError, match='at least 2'): animate(m, c[0], c[:1])
    with pytest.raises(NoFaceError, match='source image'): animate(m, torch.zeros(3, 64, 64), c)
    with pytest.raises(NoFaceError, match='first frame'): animate(m, c[0], torch.cat([torch.zeros(1, 3, 64, 64), c[1:]]))
    with pytest.raises(ValueError, match='N x 3 x 64 x 64'): animate(m, c[0, :, :32], c)
    a = animate(m, clips.clip(1)[0], c)
    assert a['frames'].shape == c.shape and 0 <= a['frames'].min() and a['frames'].max() <= 1
    d = a['kp_new']['value'] - a['kp_source']['value']       # relative motion: the driver's displacement, scaled
    dd = a['kp_driving']['value'] - a['kp_driving']['value'][:1]
    ratio = (d.norm() / dd.norm()).item()
    assert torch.allclose(d[0], torch.zeros_like(d[0])) and torch.allclose(d, dd * ratio, atol=1e-5)
    b = animate(m, clips.clip(1)[0], c, adapt_scale=False)                 # no scaling: exactly the driver's displacement
    assert torch.allclose(b['kp_new']['value'] - b['kp_source']['value'], dd, atol=1e-6)
    e = animate(m, clips.clip(1)[0], c, relative=False)                      # absolute: the driver's own keypoints
    assert torch.equal(e['kp_new']['value'], e['kp_driving']['value'])


def test_mouth_opening_and_pairs():
    long = render_talking_clips([3], n_frames=40, size=64, seed=0)
    r = np.corrcoef(mouth_opening(long.landmarks68[0]).numpy(), long.mouth_open[0].numpy())[0, 1]
    assert r > 0.9
    p = reenact_pairs({5: 'train', 6: 'train', 7: 'train', 8: 'test', 9: 'test'})
    assert p.values.tolist() == [[5, 6, 'train'], [6, 7, 'train'], [7, 5, 'train'], [8, 9, 'test'], [9, 8, 'test']]
    with pytest.raises(ValueError, match='val split holds one identity'): reenact_pairs({1: 'val', 2: 'test', 3: 'test'})


def test_fake_set_writes_clips_with_voice_and_frames(tmp_path):
    from deepfake_course.data.fakes import read_fake_set
    from deepfake_course.media import read_video
    m = FOMM(64, **TINY).eval()
    name = make_reenact_fake_set(m, pd.DataFrame([dict(src=0, dst=1, split='test'), dict(src=1, dst=0, split='test')]),
                                 n_frames=4, frames_per_clip=2, data_root=tmp_path, verbose=False)
    man = read_fake_set(name, tmp_path)
    assert (man.kind == 'clip').sum() == 2 and (man.kind == 'image').sum() == 4
    clip = man[man.kind == 'clip'].iloc[0]
    assert (clip.identity, clip.target_identity) == (0, 1)
    frames, fps, wav = read_video(clip.path)
    assert frames.shape[0] == 4 and wav is not None and len(wav) > 0
    assert set(man[man.kind == 'image'].clip_id) == set(man[man.kind == 'clip'].clip_id)
    again = make_reenact_fake_set(m, pd.DataFrame([dict(src=0, dst=1, split='test'), dict(src=1, dst=0, split='test')]),
                                  n_frames=4, frames_per_clip=2, data_root=tmp_path, verbose=False)
    assert again == name
    with pytest.raises(ValueError, match='lack columns'): make_reenact_fake_set(m, pd.DataFrame([dict(src=0, dst=1)]), data_root=tmp_path)
