"""Unit tests of deepfake_course.defend.disrupt: PGD / I-FGSM on tiny generators, the blur layer, bad input, the MTCNN
and detector attacks. Each test runs in a few seconds on one CPU thread."""
import numpy as np, pytest, torch, torch.nn as nn

from deepfake_course.defend import disrupt as dd


@pytest.fixture(autouse=True)
def _threads(one_thread): yield


def _tiny_gen(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(8, 3, 3, padding=1), nn.Tanh()).eval()


def _faces(n=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_attack_beats_random_noise_of_same_budget():
    G, x = _tiny_gen(), _faces()
    for eps in (0.03, 0.1):
        adv = dd.disrupt(G, x, eps, steps=10, seed=1)
        rnd = dd.random_perturbation(x, eps, seed=1)
        m_adv = dd.distortion(G, x, adv)['mse']
        m_rnd = dd.distortion(G, x, rnd)['mse']
        assert (m_adv > m_rnd).all(), (eps, m_adv.tolist(), m_rnd.tolist())
        assert m_adv.mean() > 3 * m_rnd.mean()


def test_perturbation_within_eps_and_range():
    G, x = _tiny_gen(), _faces()
    x[0, :, :4] = 1.0; x[1, :, :4] = -1.0          # saturated pixels: the projection must keep them in [-1, 1]
    for eps, rs in ((0.05, True), (0.2, False)):
        adv = dd.disrupt(G, x, eps, steps=5, random_start=rs)
        assert (adv - x).abs().max() <= eps + 1e-6
        assert adv.min() >= -1 and adv.max() <= 1
        assert (adv - x).abs().max() > 0.5 * eps     # it moved


def test_ifgsm_is_deterministic_and_pgd_start_is_seeded():
    G, x = _tiny_gen(), _faces()
    a = dd.disrupt(G, x, 0.05, steps=4, random_start=False)
    b = dd.disrupt(G, x, 0.05, steps=4, random_start=False)
    assert torch.equal(a, b)
    assert (a - x).abs().max() > 0.02               # not stuck at x, where the distorting loss has a zero gradient
    # where the gradient does not vanish, the seed plays no part in I-FGSM
    w = torch.randn(1, 3, 1, 1)
    lin = lambda X: (X * w).flatten(1).sum(1)
    assert torch.equal(dd.pgd(lin, x, 0.05, 3, random_start=False, seed=1), dd.pgd(lin, x, 0.05, 3, random_start=False, seed=2))
    p1, p2, p3 = (dd.disrupt(G, x, 0.05, steps=2, random_start=True, seed=s) for s in (1, 1, 2))
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)


def test_restarts_keep_the_most_distorting_start_per_image():
    G, x = _tiny_gen(), _faces()
    one = dd.disrupt(G, x, 0.05, steps=3, seed=2)
    torch.testing.assert_close(dd.disrupt(G, x, 0.05, steps=3, seed=2, restarts=1), one)   # one start is plain PGD
    many = dd.disrupt(G, x, 0.05, steps=3, seed=2, restarts=4)
    assert (many - x).abs().max() <= 0.05 + 1e-6
    m1, m4 = dd.distortion(G, x, one)['mse'].to_numpy(), dd.distortion(G, x, many)['mse'].to_numpy()
    assert (m4 >= m1 - 1e-9).all() and m4.mean() > m1.mean()   # the first start is among the four; some face gains
    with pytest.raises(ValueError, match='needs random_start=True'): dd.disrupt(G, x, 0.05, restarts=2, random_start=False)
    with pytest.raises(ValueError, match='restarts must be a positive integer'): dd.disrupt(G, x, 0.05, restarts=0)


def test_idswap_target_draws_with_a_fixed_identity():
    from deepfake_course.generate.idswap import SimSwapGenerator
    torch.manual_seed(0)
    G = SimSwapGenerator(16, id_dim=8, base=4, max_ch=8, n_down=2, n_blocks=1).eval()
    v = torch.nn.functional.normalize(torch.randn(8), dim=0)
    T = dd.IdSwapTarget(G, v)
    x = _faces(3, 16)
    with torch.no_grad(): torch.testing.assert_close(T(x), G(dd.to_01(x), v)[0] * 2 - 1)
    adv = dd.disrupt(T, x, 0.05, steps=3, seed=0)
    assert (dd.distortion(T, x, adv)['mse'] > dd.distortion(T, x, dd.random_perturbation(x, 0.05, 0))['mse']).all()
    with pytest.raises(ValueError, match='identity vector'): dd.IdSwapTarget(G, torch.randn(5))


def test_nullify_objective_brings_output_toward_input():
    G, x = _tiny_gen(), _faces()
    before = dd.distortion(G, x, x)['mse_to_input']
    adv = dd.disrupt(G, x, 0.1, steps=10, objective='nullify')
    after = dd.distortion(G, x, adv)['mse_to_input']
    assert after.mean() < before.mean()


def test_blur_layer_is_differentiable_and_attack_through_it_works():
    x = _faces(2, 32).requires_grad_(True)
    for layer in (dd.GaussianBlur(1.5), dd.BoxBlur(5)):
        y = layer(x)
        assert y.shape == x.shape
        g, = torch.autograd.grad(y.pow(2).sum(), x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    G, x = _tiny_gen(), _faces(4, 32)
    blurred_G = nn.Sequential(dd.GaussianBlur(1.5), G)
    plain = dd.disrupt(G, x, 0.05, steps=8, random_start=False)
    through = dd.disrupt(G, x, 0.05, steps=8, random_start=False, through=dd.GaussianBlur(1.5))
    eot = dd.disrupt(G, x, 0.05, steps=8, random_start=False, through=dd.blur_bank()[:3])
    m = {k: dd.distortion(blurred_G, x, v)['mse'].mean() for k, v in dict(plain=plain, through=through, eot=eot).items()}
    assert m['through'] > m['plain'], m      # against a blurring defender, attacking through the blur does better
    assert len(dd.blur_bank()) == 9


@pytest.mark.parametrize('eps', [0, -0.1, 1.5, float('nan'), True, '0.05', None])
def test_bad_eps_is_refused(eps):
    with pytest.raises(ValueError, match='eps must be a number in'):
        dd.disrupt(_tiny_gen(), _faces(), eps)


def test_bad_images_are_refused():
    G = _tiny_gen()
    with pytest.raises(ValueError, match=r'outside \[-1, 1\].*0\.\.255'):
        dd.disrupt(G, _faces() * 127.5 + 127.5, 0.05)
    with pytest.raises(ValueError, match='N×C×H×W'):
        dd.disrupt(G, _faces()[0], 0.05)
    with pytest.raises(TypeError, match='dtype torch.uint8'):
        dd.disrupt(G, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 0.05)
    with pytest.raises(TypeError, match='torch.Tensor'):
        dd.disrupt(G, np.zeros((2, 3, 8, 8), np.float32), 0.05)
    with pytest.warns(UserWarning, match=r'\[0, 1\] images'):
        dd.disrupt(G, (_faces() + 1) / 2, 0.05, steps=1)
    with pytest.raises(ValueError, match='objective'):
        dd.disrupt(G, _faces(), 0.05, objective='ruin')
    with pytest.raises(ValueError, match='steps'):
        dd.disrupt(G, _faces(), 0.05, steps=0)


def test_model_without_gradient_is_refused():
    G = _tiny_gen()
    class NoGrad(nn.Module):
        def forward(self, x):
            with torch.no_grad(): return G(x)
    class Rounds(nn.Module):
        def forward(self, x): return dd.jpeg(x, 75)
    for m in (NoGrad(), Rounds()):
        with pytest.raises(dd.NoGradientError, match='does not depend differentiably'):
            dd.disrupt(m, _faces(), 0.05, steps=2)


def test_jpeg_and_quantize_keep_range_and_shape():
    x = _faces(3, 32)
    for y in (dd.jpeg(x, 75), dd.quantize(x), dd.blur(x, 1.0)):
        assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert (dd.quantize(x) - x).abs().max() <= 1 / 255 + 1e-6


def test_evade_lowers_fake_score_and_rates():
    torch.manual_seed(0)
    det = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1)).eval()
    x = _faces(8, 16)
    with torch.no_grad(): det[-1].bias.fill_(-det(dd.to_01(x)).mean().item() + 2.0)   # every face scored fake
    s0 = dd.detector_scores(det, x)
    adv = dd.evade(det, x, 0.1, steps=10)
    s1 = dd.detector_scores(det, adv)
    assert (s1 < s0).all() and (adv - x).abs().max() <= 0.1 + 1e-6
    assert dd.evasion_rate([0.9, 0.9, 0.2], [0.1, 0.8, 0.1]) == 0.5
    assert dd.balanced_threshold([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) in (0.2, 0.5)
    with pytest.raises(ValueError, match='logits'):
        dd.fake_logit(torch.zeros(2, 3))


def test_mtcnn_attack_lowers_pnet_score_on_rendered_face():
    from deepfake_course.data.synth import render_faces
    from deepfake_course.faces import get_mtcnn
    m = get_mtcnn('cpu')
    x = dd.to_pm1(render_faces([3], 1, size=80, seed=5)['images'])
    box = dd.mtcnn_boxes(m, x)
    assert len(box[0]) >= 1                           # MTCNN finds the clean face
    def scores(z):
        with torch.no_grad(): s = dd.mtcnn_scores(m, z, box)
        return sum(float(torch.relu(v - 0.3).sum()) for v in s['pnet']), s['onet'][0].max().item()
    (p0, o0) = scores(x)
    adv = dd.hide_faces(x, 0.05, m, steps=5, pnet_weight=1.0)
    (p1, o1) = scores(adv)
    assert (adv - x).abs().max() <= 0.05 + 1e-6
    assert p1 < 0.8 * p0, (p0, p1)                   # less face in P-Net's maps over the pyramid
    assert o1 < o0, (o0, o1)
    with pytest.raises(ValueError, match='smaller than'):
        dd.hide_faces(_faces(1, 16), 0.05, m)
