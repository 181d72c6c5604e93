"""Unit tests of deepfake_course.generate.textguide (notebook 25b): the caption tokenizer and its errors, the contrastive
loss on hand cases, exact resume and refusal of other configurations, the cached course CLIP, zero-shot on a tiny trained
model, StyleCLIP's latent optimisation on a tiny generator, and the StyleCLIP fake set."""
import math

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepfake_course.generate import textguide as T
from deepfake_course.generate.diffusion import CaptionError, caption_faces, caption_text
from deepfake_course.train import CheckpointError, save_checkpoint

TINY = dict(width=16, layers=1, heads=2, img_size=16, img_width=4, dim=8)
TINY_PARAMS = dict(n_identities=6, per_identity=4, n_heldout=3, size=16, steps=4, batch=8, width=16, layers=1, heads=2, img_width=4, dim=8)


@pytest.fixture(scope='module', autouse=True)
def _one_thread(one_thread): yield


@pytest.fixture(scope='module')
def small():
    return caption_faces(6, 4, size=16, seed=0)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return T.CourseCLIP(**TINY)


# -- tokenizer

def test_tokenizer_round_trip_and_errors():
    tok = T.CaptionTokenizer()
    full = caption_text([1, 0, 1, 0, 1, 0])[0]
    ids = tok.encode([full, 'a face'])
    assert ids.shape == (2, tok.max_len) and ids.dtype == torch.long
    assert tok.decode(ids) == [full, 'a face']
    assert (ids[1] == tok.eos).nonzero()[0].item() == 2 and (ids[1, 3:] == tok.pad).all()
    with pytest.raises(CaptionError, match=r"\['moustache'\] are not in the course CLIP's vocabulary.*glasses"):
        tok.encode('a face with a moustache')
    with pytest.raises(CaptionError, match='reads at most 3'): T.CaptionTokenizer(max_len=4).encode('a face, smiling')
    with pytest.raises(CaptionError, match='a caption is a string'): tok.encode([3])
    with pytest.raises(ValueError, match='starts with'): T.CaptionTokenizer(['a', 'face'])


def test_canonical_caption_lists_known_phrases():
    assert T.canonical_caption('a face smiling and with glasses') == 'a face, with glasses, smiling'
    with pytest.raises(CaptionError, match="known phrases"): T.canonical_caption('a face, with green hair')
    with pytest.raises(CaptionError, match='says both'): T.canonical_caption('a face, smiling, not smiling')


# -- loss

def test_clip_loss_hand_cases():
    n = 5
    assert T.clip_loss(torch.zeros(n, n)).item() == pytest.approx(math.log(n), abs=1e-6)
    L = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    assert T.clip_loss(L).item() == pytest.approx(T.clip_loss(L.T).item(), abs=1e-6)
    ref = (F.cross_entropy(L, torch.arange(n)) + F.cross_entropy(L.T, torch.arange(n))) / 2
    assert T.clip_loss(L).item() == pytest.approx(ref.item(), abs=1e-6)
    # hand case: logits [[2, 0], [0, 2]] → each row CE = log(1 + e^-2)
    assert T.clip_loss(torch.tensor([[2., 0], [0, 2]])).item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)


def test_clip_loss_duplicates_and_hard_negatives():
    lab = torch.tensor([[1., 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    pos = T.caption_matches(lab, lab)  # images 0 and 1 share a caption
    assert pos.int().tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    best, wrong = torch.where(pos, 8.0, -8.0), 10 * torch.eye(3)
    assert T.clip_loss(best, pos) < T.clip_loss(wrong, pos) and T.clip_loss(wrong) < T.clip_loss(best)
    # unsaid attributes (-1) match anything; a caption true of nobody is only a negative
    stated = torch.tensor([[-1., -1, -1, -1, -1, -1], [0., 0, 0, 0, 0, 1]])
    assert T.caption_matches(lab, stated).int().tolist() == [[1, 0], [1, 0], [1, 0]]
    T.clip_loss(torch.randn(3, 2), T.caption_matches(lab, stated))  # fine: every image has a true text
    with pytest.raises(ValueError, match='at least one true text'): T.clip_loss(torch.randn(3, 3), torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match='positives'): T.clip_loss(torch.randn(3, 3), torch.ones(2, 3, dtype=torch.bool))


# -- model

def test_model_shapes_and_word_order():
    m = _tiny()
    u = m.encode_image(torch.rand(2, 3, 16, 16))
    v = m.encode_text(['a face, with dark hair, with light skin', 'a face, with light hair, with dark skin'])
    assert u.shape == v.shape == (2, 8)
    assert torch.allclose(u.norm(dim=1), torch.ones(2), atol=1e-5) and torch.allclose(v.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(v[0], v[1], atol=1e-4)  # same words, other order: another embedding
    assert m.scale().item() == pytest.approx(1 / 0.07, rel=1e-4)
    with torch.no_grad(): m.logit_scale.fill_(10.0)
    assert m.scale().item() == pytest.approx(100.0)  # capped at 100


# -- training, resume, checkpoints

def _train(small, ckpt, **kw):
    m = _tiny()
    return m, T.train_clip(m, small['images'], small['labels'], steps=6, batch=8, ckpt_path=ckpt, every=2, device='cpu', **kw)


def test_interrupted_training_resumes_exactly(small, tmp_path):
    m_all, loop_all = _train(small, tmp_path / 'a.pt')
    _, cut = _train(small, tmp_path / 'b.pt', stop_after=3)
    assert cut.step == 3
    m_res, loop_res = _train(small, tmp_path / 'b.pt')
    assert loop_res.resumed_from == 2 and loop_res.step == 6
    for (k, a), b in zip(m_all.state_dict().items(), m_res.state_dict().values()): assert torch.equal(a, b), k
    assert [r['loss'] for r in loop_res.history] == [r['loss'] for r in loop_all.history]
    with pytest.raises(CheckpointError, match='another configuration'): _train(small, tmp_path / 'a.pt', keep_p=0.3)


def test_course_clip_caches_and_refuses_other_configs(tmp_path):
    run = T.course_clip(tmp_path, device='cpu', **TINY_PARAMS)
    assert not run.loaded and run.path.is_file() and len(run.history) == 4
    assert run.path.parent == T.clip_model_dir(tmp_path, 0, **TINY_PARAMS)
    again = T.course_clip(tmp_path, device='cpu', **TINY_PARAMS)
    assert again.loaded and all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), again.model.state_dict().values()))
    with pytest.raises(CheckpointError, match='another configuration'): T.load_clip(run.path, {**run.params, 'seed': 0, 'steps': 5})
    save_checkpoint(tmp_path / 'other.pt', nn.Linear(2, 2), name='shallownet_v3')
    with pytest.raises(CheckpointError, match="not 'course-clip'"): T.load_clip(tmp_path / 'other.pt')
    with pytest.raises(TypeError, match='unknown parameter'): T.course_clip(tmp_path, epochs=3)


def test_zero_shot_on_a_tiny_trained_model(small):
    m = _tiny()
    T.train_clip(m, small['images'], small['labels'], steps=3, batch=8, device='cpu')
    p = T.zero_shot(m, small['images'])
    assert p.shape == (24, 6) and ((p > 0) & (p < 1)).all()
    rep = T.zero_shot_report(m, small['images'], small['labels'], small['identity'], n_boot=30)
    acc = ((p > 0.5).float() == small['labels']).float().mean().item()
    assert rep.loc['mean', 'acc'] == pytest.approx(acc, abs=1e-6)
    assert (rep.lo <= rep.acc + 1e-9).all() and (rep.acc <= rep.hi + 1e-9).all() and list(rep.index)[-1] == 'mean'
    s = T.clip_score(m, small['images'][:3], 'a face and smiling')
    ref = T.image_embeddings(m, small['images'][:3]) @ m.encode_text(['a face, smiling']).detach().T
    assert torch.allclose(s, ref[:, 0], atol=1e-5)
    with pytest.raises(CaptionError, match='names no attribute'): T.clip_score(m, small['images'][:1], 'a face, with a beard')
    with pytest.raises(ValueError, match='2 images but 3 captions'): T.clip_score(m, small['images'][:2], ['a face'] * 3)
    assert T.zero_shot_prompts(['glasses'])['glasses'] == ('a face, without glasses', 'a face, with glasses')
    with pytest.raises(CaptionError, match='unknown attribute'): T.zero_shot_prompts(['beard'])


# -- StyleCLIP

def _gen():
    from deepfake_course.generate.stylegan import StyleGANGenerator
    from deepfake_course.fidelity import FaceFeatureNet
    torch.manual_seed(0)
    return StyleGANGenerator(16, 16, 16, 2, 8), FaceFeatureNet(4, 16, 3, 4, 16).eval()


def test_styleclip_optimise():
    G, Fn = _gen(); m = _tiny()
    ws = G.mix(torch.randn(2, 16), torch.randn(2, 16), mix_at=3).detach()
    r0 = T.styleclip_optimise(G, ws, m, 'a face, smiling', Fn, steps=0)
    assert torch.equal(r0['before'], r0['after']) and torch.equal(r0['ws'], ws)
    r = T.styleclip_optimise(G, ws, m, 'a face, smiling', Fn, steps=12, lr=0.05, lambda_l2=0, lambda_id=0)
    assert r['history'].d_clip.iloc[-1] < r['history'].d_clip.iloc[0]
    rw = T.styleclip_optimise(G, ws, m, 'a face, smiling', Fn, steps=4, space='w', augment=2)
    d = rw['ws'] - ws
    assert torch.allclose(d, d[:, :1].expand_as(d), atol=1e-6) and d.abs().max() > 0   # 'w': one shift for all slots
    held = T.styleclip_optimise(G, ws, m, 'a face, smiling', Fn, steps=12, lr=0.05, lambda_l2=1e3, lambda_id=0)
    assert held['history'].l2.iloc[-1] < r['history'].l2.iloc[-1] / 10
    assert all(p.requires_grad for p in G.parameters())
    with pytest.raises(CaptionError): T.styleclip_optimise(G, ws, m, 'a face, wearing a hat')
    with pytest.raises(ValueError, match="'w' or 'w\\+'"): T.styleclip_optimise(G, ws, m, 'a face', space='s')
    with pytest.raises(ValueError, match='2 latents but 3 captions'): T.styleclip_optimise(G, ws, m, ['a face'] * 3)


class _Judge:  # says every attribute is off
    def predict(self, x): return torch.zeros(len(x), 6)


class _Trainer:  # what the fake set reads of a generator's trainer
    name, run_id, step = 'stylegan', 'stylegan-test', 7
    def weights_sha1(self): return 'abc'


class _Run:  # what the fake set reads of a CourseGAN
    trainer, notebook, quality = _Trainer(), '21b_stylegan', {'mtcnn_rate': 0.7, 'fd': 100.0}
    trained_on = {'identities': [0, 1], 'split': 'all'}


def test_styleclip_edits_and_fake_set(tmp_path):
    from deepfake_course.data.fakes import read_fake_set
    G, Fn = _gen(); m = _tiny()
    e = T.styleclip_edits(G, m, Fn, _Judge(), ['a face, with glasses', 'a face, not smiling'], n=3, pool=5, steps=2, batch=2)
    tab = e['table']
    assert len(tab) == 6 and e['after'].shape == (6, 3, 16, 16)
    assert tab.needed[:3].all() and not tab.needed[3:].any()   # the judge says no glasses and nobody smiles
    assert torch.allclose(torch.tensor(tab.clip_gain.values), torch.tensor((tab.clip_after - tab.clip_before).values), atol=1e-6)
    s = T.summarise_edits(tab)
    assert list(s.index) == ['a face, with glasses', 'a face, not smiling', 'all'] and math.isnan(s.loc['a face, not smiling', 'changed'])
    ckpt = tmp_path / 'm' / 'clip.pt'; ckpt.parent.mkdir()
    clip_run = T.ClipRun(m, {'steps': 1}, [], 0.0, ckpt, False)
    q = {'mtcnn_rate': 0.5, 'attr_acc': 0.3}
    name = T.make_styleclip_fake_set(e, _Run(), clip_run, tmp_path, quality=q, verbose=False)
    with pytest.warns(UserWarning, match='below'): df = read_fake_set(name, tmp_path)
    assert name.startswith('styleclip/') and len(df) == 6 and df.caption.tolist() == tab.caption.tolist()
    assert df.groupby('latent_index').split.nunique().max() == 1 and set(df.identity) == {-1}
    src = df.attrs['card']['sources']
    assert src['generator']['run_id'] == 'stylegan-test' and src['quality']['meets_bar'] is False
    assert src['latents']['indices'] == sorted(set(tab.latent_index)) and src['clip']['params'] == {'steps': 1}
    assert T.make_styleclip_fake_set(e, _Run(), clip_run, tmp_path, quality=q, verbose=False) == name   # found, reused
    with pytest.raises(ValueError, match='measured quality'): T.make_styleclip_fake_set(e, _Run(), clip_run, tmp_path)
    with pytest.raises(ValueError, match='3 fractions'): T.make_styleclip_fake_set(e, _Run(), clip_run, tmp_path, quality=q, split=(1, 1))
