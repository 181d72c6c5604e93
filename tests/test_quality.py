"""Unit tests of deepfake_course.quality: the judges of generated faces (identity, landmarks, masked SSIM, flicker,
MTCNN rate) and their checkpoints in train's one format. Small random or rendered data; fast on a 2-core CPU."""
import numpy as np, pytest, torch

from deepfake_course import quality as q
from deepfake_course.train import CheckpointError, read_checkpoint


def _two_ids(n=64, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 0.3; y = torch.arange(n) % 2
    x[y == 1, 0] += 0.6                                    # identity 1 is red
    return x, torch.ones(n, 1, size, size), y


# ---------------------------------------------------------------- measures
def test_measures():
    ref = torch.tensor([[[10., 10.], [30., 10.], [20., 20.], [12., 30.], [28., 30.]]])
    assert q.landmark_nme_iod(ref, ref).item() == 0
    assert q.landmark_nme_iod(ref + torch.tensor([2., 0.]), ref).item() == pytest.approx(0.1)   # 2 px / 20 px inter-ocular
    with pytest.raises(ValueError, match='N x 5 x 2 or N x 68 x 2'): q.landmark_nme_iod(ref[:, :3], ref[:, :3])
    x = torch.rand(2, 3, 32, 32); m = torch.ones(2, 1, 32, 32)
    torch.testing.assert_close(q.masked_ssim(x, x, m), torch.ones(2))
    assert q.masked_ssim(x, torch.rand(2, 3, 32, 32), m).max() < 0.2
    assert q.temporal_flicker(x[:1].expand(4, -1, -1, -1)) == 0
    seq = torch.stack([torch.full((3, 8, 8), v) for v in (0., .1, .3)])
    assert q.temporal_flicker(seq) == pytest.approx(0.15)
    assert q.temporal_flicker(seq, valid=[True, True, False]) == pytest.approx(0.1)
    assert q.face_ellipse(64).shape == (1, 64, 64) and 0.2 < q.face_ellipse(64).mean() < 0.6


def test_landmark_nme_iod_68_points_use_eye_centres():
    ref = torch.zeros(1, 68, 2); ref[0, 36:42, 0] = 10.; ref[0, 42:48, 0] = 30.   # eye centres 20 px apart
    assert q.landmark_nme_iod(ref + torch.tensor([0., 4.]), ref).item() == pytest.approx(0.2)


# ---------------------------------------------------------------- judges
def test_identity_classifier_and_landmark_regressor_learn():
    x, m, y = _two_ids()
    net = q.train_identity_classifier(x, m, y + 4, epochs=4, device='cpu', verbose=False)
    assert (q.predict_identity(net, x, m) == y + 4).float().mean() > 0.9
    with pytest.raises(ValueError, match='at least 2 identities'):
        q.train_identity_classifier(x, m, torch.zeros(64), epochs=1)
    # landmarks: a bright dot whose position is the landmark
    g = torch.Generator().manual_seed(1)
    pos = torch.randint(6, 26, (96, 1, 2), generator=g).float()
    img = torch.zeros(96, 3, 32, 32)
    for i, (px, py) in enumerate(pos[:, 0].long().tolist()): img[i, :, py - 1:py + 2, px - 1:px + 2] = 1
    lm = pos.expand(96, 5, 2).clone()
    reg = q.train_landmark_regressor(img, lm, epochs=15, lr=3e-3, device='cpu', verbose=False)
    mean_face = lm.mean(0, keepdim=True).expand_as(lm)
    assert (q.predict_landmarks(reg, img) - lm).norm(dim=-1).mean() < 0.7 * (mean_face - lm).norm(dim=-1).mean()


def test_judges_train_with_train_fit(monkeypatch):
    # the judges' loop is train.fit (device, AMP, progress): a call reaches it with Adam and a per-step cosine
    import deepfake_course.train as tr
    seen = {}
    real_fit = tr.fit
    def spy(*a, **kw): seen.update(kw); return real_fit(*a, **kw)
    monkeypatch.setattr(tr, 'fit', spy)
    x, m, y = _two_ids(9)                                  # 9 faces, batch 4: the last batch of one face is dropped (BatchNorm)
    q.train_identity_classifier(x, m, y, epochs=1, batch_size=4, device='cpu', verbose=False)
    assert seen['opt'] == 'adam' and seen['schedule'] == 'cosine' and seen['schedule_per'] == 'step' and seen['epochs'] == 1
    with pytest.raises(ValueError, match='at least 2 training faces'):
        q.train_landmark_regressor(x[:1], torch.zeros(1, 5, 2), epochs=1)


def test_judge_checkpoints_cache_and_refuse(tmp_path, monkeypatch):
    x, m, y = _two_ids()
    p = tmp_path / 'id.pt'
    net = q.train_identity_classifier(x, m, y, epochs=2, device='cpu', region=q.face_ellipse(32), ckpt_path=p, verbose=False)
    ck = read_checkpoint(p)
    assert ck['name'] == 'identity-judge' and ck['config']['classes'] == [0, 1] and ck['config']['n_out'] == 2
    # the same faces and settings: loaded, not trained again
    def no_training(*a, **k): raise AssertionError('the cached judge was trained again')
    monkeypatch.setattr(q, '_fit_small', no_training)
    again = q.train_identity_classifier(x, m, y, epochs=2, device='cpu', region=q.face_ellipse(32), ckpt_path=p)
    assert torch.equal(q.predict_identity(again, x, m), q.predict_identity(net, x, m))
    torch.testing.assert_close(again.region, q.face_ellipse(32))
    # other faces or other settings: refused, naming what differs
    with pytest.raises(CheckpointError, match='faces: checkpoint'):
        q.train_identity_classifier(x[:-2], m[:-2], y[:-2], epochs=2, device='cpu', region=q.face_ellipse(32), ckpt_path=p)
    with pytest.raises(CheckpointError, match='epochs: checkpoint 2 vs this call 3'):
        q.train_identity_classifier(x, m, y, epochs=3, device='cpu', region=q.face_ellipse(32), ckpt_path=p)
    monkeypatch.undo()
    # a landmark judge's checkpoint is not an identity judge, and the other way round
    lp = tmp_path / 'lm.pt'
    lm = torch.rand(64, 5, 2) * 32
    reg = q.train_landmark_regressor(x, lm, epochs=1, device='cpu', ckpt_path=lp, verbose=False)
    with pytest.raises(CheckpointError, match="holds a 'landmark-judge' model, not 'identity-judge'"):
        q.train_identity_classifier(x, m, y, epochs=2, device='cpu', region=q.face_ellipse(32), ckpt_path=lp)
    with pytest.raises(CheckpointError, match="holds a 'identity-judge' model, not 'landmark-judge'"):
        q.load_judge(p, q.LANDMARK_JUDGE)
    loaded = q.load_judge(lp)
    assert (loaded.judge, loaded.k, loaded.size) == ('landmark-judge', 5, 32)
    torch.testing.assert_close(q.predict_landmarks(loaded, x), q.predict_landmarks(reg, x))


# ---------------------------------------------------------------- MTCNN rate
def test_mtcnn_rate_faces_noise_and_inputs():
    from deepfake_course.data import synth
    faces = synth.render_faces([0, 1], 4, size=64, seed=0)['images']
    noise = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert q.mtcnn_rate(faces) >= 0.75 and q.mtcnn_rate(noise) == 0.0
    found = q.mtcnn_face_found(faces)
    assert found.dtype == bool and found.shape == (8,)
    u8 = (faces.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()      # N x H x W x 3 uint8 gives the same answers
    assert q.mtcnn_face_found(u8).tolist() == found.tolist()
    # small images need enlarging: in 24-px pictures the faces are near MTCNN's 20-px minimum and most are missed
    small = torch.nn.functional.interpolate(faces, size=(24, 24), mode='bilinear', antialias=True)
    assert q.mtcnn_rate(small, upsample_to=128) >= q.mtcnn_rate(small, upsample_to=None) + 0.25
    with pytest.raises(ValueError, match=r'got shape \(0, 3, 8, 8\)'): q.mtcnn_rate(torch.rand(0, 3, 8, 8))
    with pytest.raises(ValueError, match='min_prob must be in'): q.mtcnn_rate(faces, min_prob=1.5)
