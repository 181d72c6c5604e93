"""Unit tests of deepfake_course.generate.color: each colour transfer mode checked against the statistics it promises."""
import numpy as np, pytest, torch
import kornia

from deepfake_course.generate import color as ct


def _colour_image(mu, A, seed, size=48):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, size * size, generator=g)
    return (torch.tensor(mu).view(3, 1) + torch.tensor(A) @ z).view(3, size, size).clamp(0, 1)


X = _colour_image([.6, .45, .35], [[.06, 0, 0], [.02, .05, 0], [0, .01, .04]], 0)
R = _colour_image([.4, .5, .55], [[.04, .01, 0], [0, .06, 0], [.01, 0, .05]], 1)
px = lambda a: a.reshape(3, -1).T.double().numpy()


def test_rct_matches_lab_mean_and_std():
    y = ct.rct(X, R)
    lab = lambda a: kornia.color.rgb_to_lab(a[None])[0].reshape(3, -1)
    torch.testing.assert_close(lab(y).mean(1), lab(R).mean(1), atol=1.0, rtol=0)
    torch.testing.assert_close(lab(y).std(1), lab(R).std(1), atol=0, rtol=0.06)
    # batched call equals per-image calls
    torch.testing.assert_close(ct.rct(torch.stack([X, R]), torch.stack([R, X]))[0], y, atol=1e-5, rtol=0)


@pytest.mark.parametrize('mode', ['lct', 'mkl'])
def test_linear_transfers_match_mean_and_covariance(mode):
    y = ct.color_transfer(mode, X, R)
    np.testing.assert_allclose(px(y).mean(0), px(R).mean(0), atol=2e-3)
    np.testing.assert_allclose(np.cov(px(y).T), np.cov(px(R).T), atol=2e-4)


def test_mkl_is_the_optimal_transport_map():
    # Monge-Kantorovich: the linear map is symmetric positive definite (a pure "stretch", no rotation)
    A, B = np.cov(px(X).T), np.cov(px(R).T)
    y = ct.mkl(X, R)
    T = np.linalg.lstsq(px(X) - px(X).mean(0), px(y) - px(y).mean(0), rcond=None)[0]
    np.testing.assert_allclose(T, T.T, atol=1e-3)
    assert np.linalg.eigvalsh((T + T.T) / 2).min() > 0
    np.testing.assert_allclose(T.T @ A @ T, B, atol=2e-4)


def test_idt_matches_marginals():
    y = ct.idt(X, R, n_rot=30)
    q = np.linspace(0.05, 0.95, 19)
    for c in range(3):
        np.testing.assert_allclose(np.quantile(px(y)[:, c], q), np.quantile(px(R)[:, c], q), atol=0.02)
    same = np.abs(ct.idt(R, R).numpy() - R.numpy())                          # the reference onto itself: (nearly) unchanged
    assert same.mean() < 0.003 and same.max() < 0.05


def test_sot_moves_the_distribution():
    def sliced_w(a, b, k=32):
        d = np.random.default_rng(5).normal(size=(k, 3)); d /= np.linalg.norm(d, axis=1, keepdims=True)
        return np.mean([np.abs(np.sort(a @ v) - np.sort(b @ v)).mean() for v in d])
    y = ct.sot(X, R, steps=20, reg_sigma_xy=0)
    assert sliced_w(px(y), px(R)) < 0.15 * sliced_w(px(X), px(R))
    np.testing.assert_allclose(px(y).mean(0), px(R).mean(0), atol=0.01)
    assert ct.sot(X, R).shape == X.shape     # with the bilateral regularisation


def test_colour_transfer_masks_and_errors():
    m = torch.zeros(1, 48, 48); m[:, :24] = 1
    two = torch.cat([R[:, :24], (R[:, 24:] * 0.2)], 1)            # statistics must come from the masked half only
    y = ct.color_transfer('lct', X, two, None, m)
    np.testing.assert_allclose(px(y).mean(0), R[:, :24].reshape(3, -1).double().mean(1).numpy(), atol=3e-3)
    with pytest.raises(ValueError, match="Unknown colour transfer 'hist'"): ct.color_transfer('hist', X, R)
    with pytest.raises(ValueError, match='fewer than 4 pixels'): ct.lct(X, R, torch.zeros(1, 48, 48))
    with pytest.raises(ValueError, match='one 3 x H x W image'): ct.lct(X[:2], R)
    assert ct.color_transfer(None, X, R) is X
    assert ct.color_transfer('mkl', torch.stack([X, X]), R[None]).shape == (2, 3, 48, 48)
    assert set(ct.COLOR_TRANSFERS) == {'rct', 'lct', 'mkl', 'idt', 'sot'}
