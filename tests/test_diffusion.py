"""Unit tests of generate.diffusion: schedules, the samplers, captions, inpainting checks, checkpoints, fake sets."""
import numpy as np
import pytest
import torch

from deepfake_course.generate.diffusion import (
    CAPTION_ATTRS, CaptionError, DiffusionTrainer, InpaintError, LatentDiffusionTrainer, alpha_bar_schedule, caption_faces,
    caption_text, check_inpaint, inpaint, make_diffusion_fake_set, parse_caption, q_sample, region_masks, sample_loop,
    train_autoencoder)
from deepfake_course.train import CheckpointError

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def faces():
    return caption_faces(4, 3, size=16, seed=0)


def tiny(faces, **kw):
    return DiffusionTrainer(faces['images'], labels=faces['labels'], identities=faces['identity'], device='cpu', size=16, ch=8,
                            mult=[1, 2], batch=4, T=50, **kw)


def test_schedules():
    for kind in ('cosine', 'linear'):
        ab = alpha_bar_schedule(200, kind)
        assert ab.shape == (201,) and ab[0] == 1 and (ab[1:] < ab[:-1]).all() and ab[-1] < 0.01
    with pytest.raises(ValueError, match='cosine'): alpha_bar_schedule(10, 'quadratic')
    with pytest.raises(ValueError): alpha_bar_schedule(1)


def test_q_sample_matches_the_marginal():
    ab = alpha_bar_schedule(100)
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    xt = q_sample(x0, torch.full((20000,), 60), ab)
    a = ab[60].item()
    assert abs(xt.mean().item() - 0.5 * a ** 0.5) < 0.02 and abs(xt.var().item() - (1 - a)) < 0.03


def test_ddim_with_eta_zero_is_deterministic_and_exact_for_a_perfect_denoiser():
    # if the network knew the true noise, DDIM (η = 0) would recover x0 from x_T exactly: the reverse process inverts the forward one
    ab = alpha_bar_schedule(100)
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    eps = torch.randn_like(x0)
    xT = q_sample(x0, torch.full((3,), 100), ab, eps)
    out = sample_loop(lambda x, t: eps, xT, ab, steps=10, eta=0.0)
    assert torch.allclose(out, x0, atol=1e-3)   # float32 rounding, amplified by 1/√ᾱ_T at the first step
    with pytest.raises(ValueError, match='at most 100'): sample_loop(lambda x, t: eps, xT, ab, steps=101)


def test_repaint_keeps_known_pixels(faces):
    tr = tiny(faces)
    m = region_masks(faces['landmarks'], 16, 'mouth')
    out = inpaint(tr, faces['images'], m, steps=3, resample=2)
    assert torch.equal(out * (1 - m), faces['images'] * (1 - m)) and not torch.equal(out, faces['images'])


def test_inpaint_refuses_bad_masks(faces):
    x = faces['images'][:2]
    with pytest.raises(InpaintError, match='empty'): check_inpaint(x, torch.zeros(2, 1, 16, 16), 16)
    with pytest.raises(InpaintError, match='20×20'): check_inpaint(x, torch.ones(2, 1, 20, 20), 16)
    with pytest.raises(InpaintError, match='whole image'): check_inpaint(x, torch.ones(2, 1, 16, 16), 16)
    with pytest.raises(InpaintError, match='makes 32×32'): check_inpaint(x, region_masks(faces['landmarks'][:2], 16), 32)
    with pytest.raises(InpaintError, match='unknown region'): region_masks(faces['landmarks'], 16, 'ears')


def test_captions_round_trip_and_refuse_unknown_phrases():
    lab = torch.tensor([[1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1]]).float()
    for row, cap in zip(lab, caption_text(lab)): assert torch.equal(parse_caption(cap), row)
    assert parse_caption('a face, smiling').tolist() == [-1, -1, -1, 1, -1, -1]
    with pytest.raises(CaptionError, match='known phrases'): parse_caption('a face with a hat')
    with pytest.raises(CaptionError, match='both'): parse_caption('a face, smiling, not smiling')
    with pytest.raises(CaptionError): caption_text(torch.zeros(2, 5))


def test_caption_faces_follow_their_labels():
    f = caption_faces(6, 4, size=32, seed=1)
    assert f['images'].shape == (24, 3, 32, 32) and f['labels'].shape == (24, len(CAPTION_ATTRS))
    light = f['labels'][:, list(CAPTION_ATTRS).index('light')] > 0      # lit from the left: the left half is brighter
    lr = f['images'][:, :, 8:24, 4:16].mean((1, 2, 3)) - f['images'][:, :, 8:24, 16:28].mean((1, 2, 3))
    assert (lr[light] > lr[~light].max()).float().mean() > 0.5 and lr[light].mean() > lr[~light].mean()


def test_resume_is_exact_and_another_configuration_is_refused(faces, tmp_path):
    a = tiny(faces); torch.manual_seed(5); a.fit(4, ckpt_dir=tmp_path / 'a', verbose=False)
    b = tiny(faces); torch.manual_seed(5); b.fit(2, ckpt_dir=tmp_path / 'b', ckpt_every=2, verbose=False)
    c = tiny(faces); c.fit(4, ckpt_dir=tmp_path / 'b', verbose=False)        # resumes b's checkpoint at step 2
    assert [h['loss'] for h in c.history] == [h['loss'] for h in a.history]
    with pytest.raises(CheckpointError, match='configuration'):
        DiffusionTrainer(faces['images'], device='cpu', size=16, ch=16, mult=[1, 2], T=50).fit(5, ckpt_dir=tmp_path / 'a', verbose=False)


def test_guidance_and_caption_errors(faces):
    tr = tiny(faces)
    x = tr.sample(2, steps=2, cond='a face, with glasses', guidance=3.0)
    assert x.shape == (2, 3, 16, 16) and torch.equal(x, tr.sample(2, steps=2, cond='a face, with glasses', guidance=3.0))
    with pytest.raises(CaptionError, match='known phrases'): tr.sample(2, steps=2, cond='a face with a hat')
    unc = DiffusionTrainer(faces['images'], device='cpu', size=16, ch=8, mult=[1, 2], T=50)
    with pytest.raises(CaptionError, match='without captions'): unc.sample(2, steps=2, cond='a face, smiling')


def test_latent_diffusion_round_trip(faces, tmp_path):
    ae, hist = train_autoencoder(caption_faces(2, 4, size=32)['images'], steps=6, batch=4, ch=8, device='cpu', verbose=False)
    with pytest.raises(TypeError, match='autoencoder'): LatentDiffusionTrainer(faces['images'], device='cpu')
    ld = LatentDiffusionTrainer(caption_faces(2, 4, size=32)['images'], device='cpu', autoencoder=ae, size=32, ch=8, mult=[1, 2], T=50, batch=4)
    ld.fit(2, verbose=False)
    assert ld.latent(3).shape == (3, 4, 8, 8) and ld.sample(3, steps=2).shape == (3, 3, 32, 32)


def test_fake_set_has_captions_and_refuses_a_bad_one(faces, tmp_path):
    tr = tiny(faces)
    q = {'mtcnn_rate': 0.7, 'fd': 1.0}
    caps = caption_text(torch.tensor([[1, 0, 1, 0, 1, 0]] * 8).float())
    name = make_diffusion_fake_set(tr, 'ddpm-guided', 8, quality=q, trained_on={'identities': [0, 1]}, steps=2, captions=caps,
                                   guidance=2.0, data_root=tmp_path, verbose=False)
    from deepfake_course.data.fakes import read_fake_set, read_card, resolve_fake_set
    df = read_fake_set(name, tmp_path)
    assert len(df) == 8 and (df.caption == caps[0]).all() and (df.identity == -1).all() and set(df.split) <= {'train', 'val', 'test'}
    card = read_card(resolve_fake_set(name, tmp_path))
    assert card['sources']['sampler']['guidance'] == 2.0 and card['sources']['quality']['meets_bar']
    with pytest.raises(CaptionError, match='known phrases'):
        make_diffusion_fake_set(tr, 'ddpm-guided', 2, quality=q, trained_on={}, captions=['a face', 'a face with a hat'], data_root=tmp_path)
    with pytest.raises(CaptionError, match='2 captions for 3'):
        make_diffusion_fake_set(tr, 'ddpm-guided', 3, quality=q, trained_on={}, captions=['a face'] * 2, data_root=tmp_path)
