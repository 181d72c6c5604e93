"""Unit tests of deepfake_course.fidelity: the judges' reference data, Fréchet distance, k-NN precision/recall,
the feature network (trained with train.fit, saved and loaded with the course's one checkpoint format)."""
import numpy as np
import pytest
import torch

from deepfake_course import fidelity as FID
from deepfake_course.train import CheckpointError, save_checkpoint, tiny_cnn, read_checkpoint


def _two_class(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.rand(40, 3, 16, 16, generator=g) * 0.3, 0.7 + torch.rand(40, 3, 16, 16, generator=g) * 0.3])
    return x, torch.tensor([0] * 40 + [1] * 40)


def test_quality_measures():
    torch.manual_seed(0)
    a, b = torch.randn(400, 6), torch.randn(400, 6)
    assert FID.frechet_distance(a, b) < 0.3
    assert abs(FID.frechet_distance(a, b + 3) - 54) < 5
    p, r = FID.knn_precision_recall(a, b); assert p > 0.8 and r > 0.8
    p, r = FID.knn_precision_recall(a, b * 0.05); assert p > 0.9 and r < 0.3
    p, r = FID.knn_precision_recall(a, b + 10); assert p == 0 and r == 0
    with pytest.raises(ValueError, match='at least 2'): FID.frechet_distance(a[:1], b)
    with pytest.raises(ValueError, match='same D'): FID.frechet_distance(a, b[:, :3])
    with pytest.raises(ValueError, match='more than k'): FID.knn_precision_recall(a[:3], b, k=3)


def test_frechet_distance_one_dimension():
    torch.manual_seed(0)  # one feature: FD = (μa − μb)² + (σa − σb)², the 1-D Wasserstein-2 distance between Gaussians
    a, b = torch.randn(20000, 1), 1 + 3 * torch.randn(20000, 1)
    assert abs(FID.frechet_distance(a, b) - (1 + 4)) < 0.2


def test_feature_net_learns_labels():
    x, y = _two_class()
    net, acc = FID.train_feature_net(x, y, epochs=4, batch=8, size=16, device="cpu")
    assert acc['val_acc'] >= 0.9 and net.features(x[:5]).shape == (5, 128)
    with pytest.raises(ValueError, match='labels'): FID.train_feature_net(x, y[:3], epochs=1, device='cpu')
    with pytest.raises(ValueError, match='one class'): FID.train_feature_net(x, torch.zeros(80), epochs=1, device='cpu')
    with pytest.raises(ValueError, match='>= 0'): FID.train_feature_net(x, y - 1, epochs=1, device='cpu')


def test_feature_net_checkpoint(tmp_path):
    x, y = _two_class()
    net, acc = FID.train_feature_net(x, y, epochs=2, batch=8, size=16, device='cpu', ckpt_dir=tmp_path)
    ck = read_checkpoint(tmp_path / FID.FEATURES_FILE)   # the course's one format, named
    assert ck['name'] == 'fidelity-features' and ck['config']['n_classes'] == 2 and ck['config']['size'] == 16
    loaded, ck2 = FID.load_feature_net(tmp_path / FID.FEATURES_FILE, device='cpu')
    assert torch.equal(loaded.features(x), net.features(x))
    again, acc2 = FID.train_feature_net(x, y, epochs=2, batch=8, size=16, device='cpu', ckpt_dir=tmp_path)  # reused, not retrained
    assert acc2 == acc and torch.equal(again.features(x), net.features(x))
    with pytest.raises(CheckpointError, match='epochs: 2 vs 3'):
        FID.train_feature_net(x, y, epochs=3, batch=8, size=16, device='cpu', ckpt_dir=tmp_path)
    save_checkpoint(tmp_path / 'other.pt', tiny_cnn(), name='shallownet_v3', config={})
    with pytest.raises(CheckpointError, match="'shallownet_v3' model, not 'fidelity-features'"): FID.load_feature_net(tmp_path / 'other.pt')


def test_feature_net_training_resumes_exactly(tmp_path):
    from deepfake_course.train import InterruptAfter
    import deepfake_course.fidelity as fmod
    x, y = _two_class()
    full, _ = FID.train_feature_net(x, y, epochs=3, batch=8, size=16, device='cpu', seed=1)
    real_fit = fmod.fit
    def crash_after_1(*a, **k): return real_fit(*a, **{**k, 'callbacks': [InterruptAfter(1)]})
    fmod.fit = crash_after_1
    try:
        with pytest.raises(KeyboardInterrupt): FID.train_feature_net(x, y, epochs=3, batch=8, size=16, device='cpu', seed=1, ckpt_dir=tmp_path)
    finally: fmod.fit = real_fit
    assert not (tmp_path / FID.FEATURES_FILE).exists() and (tmp_path / 'fit' / 'last.pt').exists()
    with pytest.raises(CheckpointError, match='another configuration.*lr'):  # half a run of another configuration is not resumed
        FID.train_feature_net(x, y, epochs=3, batch=8, size=16, device='cpu', seed=1, lr=1e-3, ckpt_dir=tmp_path)
    resumed, _ = FID.train_feature_net(x, y, epochs=3, batch=8, size=16, device='cpu', seed=1, ckpt_dir=tmp_path)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()): assert torch.equal(a, b), k


def test_fidelity_scores_see_collapse_and_noise():
    f = FID.synth_faces(12, 6, size=32, seed=0)
    x, ids = f['images'], f['identity']
    assert x.shape == (72, 3, 32, 32) and ids.tolist() == sorted(ids.tolist())
    net, _ = FID.train_feature_net(x, ids, epochs=3, batch=16, size=32, device='cpu')
    ref, real = net.features(x[::2]), x[1::2]
    floor = FID.fidelity_scores(real, ref, net)
    collapsed = FID.fidelity_scores(x[ids < 2].repeat(3, 1, 1, 1)[:36], ref, net)
    noisy = FID.fidelity_scores((real + 0.3 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1), ref, net)
    assert set(floor) == {'fd', 'precision', 'recall'}
    assert collapsed['fd'] > floor['fd'] and noisy['fd'] > floor['fd'] and collapsed['recall'] < floor['recall']
    with pytest.raises(ValueError, match=r'\[0, 1\]'): FID.fidelity_scores(real * 5, ref, net)


def test_lfw_faces():
    x = FID.lfw_faces(100, 32)
    assert x.shape == (100, 1, 32, 32) and 0 <= x.min() and x.max() <= 1
    with pytest.raises(ValueError, match='1..100'): FID.lfw_faces(101)
