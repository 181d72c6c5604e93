"""Unit tests of deepfake_course.bench's caching: a cached face-swap set does not train the judges, and the main job's
GAN without a run folder is found in the data root instead of being trained again."""
from pathlib import Path
import pandas as pd
import pytest
import torch

from deepfake_course import bench
from deepfake_course.data import fakes as F


def _real(n=9):
    splits = ['train'] * 3 + ['val'] * 3 + ['test'] * 3
    df = pd.DataFrame(dict(identity=list(range(n)), target_identity=-1, split=splits[:n], path=[f'x{i}.png' for i in range(n)], label=0))
    df.attrs['real_dir'] = '/somewhere/synthfaces/abc123'
    return df


def test_cached_faceswap_set_does_not_train_judges(tmp_path, monkeypatch):
    cfg = bench.main_config(quick=True)
    calls = []
    def judges():
        calls.append(1); raise AssertionError('the judges were trained for a cached fake set')
    card = {'sources': {'job': {'quality': {'all': {'identity_transfer': 0.9}}, 'train_seconds': {}}}}
    monkeypatch.setattr(F.FakeSetWriter, 'exists', property(lambda self: True))
    monkeypatch.setattr(F, 'read_card', lambda path: card)
    out = bench.build_faceswap_fakes(cfg, _real(), tmp_path, judges, device='cpu')
    assert calls == [] and out['quality'] == {'all': {'identity_transfer': 0.9}} and out['fake_set'].startswith('faceswap-df/')
    # not cached: the function is called before anything is trained (here it raises, so nothing else runs)
    monkeypatch.setattr(F.FakeSetWriter, 'exists', property(lambda self: False))
    monkeypatch.setattr(bench, 'pretrained_swap_model', lambda *a, **k: (None, 0.0))
    with pytest.raises(AssertionError, match='judges were trained'): bench.build_faceswap_fakes(cfg, _real(), tmp_path, judges, device='cpu')
    assert calls == [1]


def _random_real(tmp_path):
    "Six random 32-px 'real faces' of six identities (four train, two test), as the main job's real manifest."
    from deepfake_course.media import write_png
    rows = []
    for i, s in enumerate(['train'] * 4 + ['test'] * 2):
        p = tmp_path / 'real' / f'{i}.png'; p.parent.mkdir(exist_ok=True)
        write_png(p, torch.rand(3, 32, 32), {})
        rows.append(dict(identity=i, split=s, path=str(p), label=0))
    real = pd.DataFrame(rows); real.attrs['real_dir'] = str(tmp_path / 'real')
    return real


def test_main_job_gan_found_in_data_root(tmp_path, monkeypatch):
    "Without a run folder, build_gan_fakes trains its GAN in gan_model_dir: a second call loads it (0 new steps)."
    from deepfake_course.generate import gan as G
    cfg = bench.main_config(quick=True, gan_steps=3, gan_size=16, gan_width=8, n_gan=6, size=32)
    real = _random_real(tmp_path)
    steps, build = [], G.build_generator
    def counting_build(*a, **k):  # every training step of the trainers that build_gan_fakes builds is counted
        tr = build(*a, **k); step = tr.train_step
        def counted():
            steps.append(1); return step()
        tr.train_step = counted
        return tr
    monkeypatch.setattr(G, 'build_generator', counting_build)
    a = bench.build_gan_fakes(cfg, real, tmp_path, device='cpu', verbose=False)
    n_first = len(steps)
    b = bench.build_gan_fakes(cfg, real, tmp_path, device='cpu', verbose=False)
    assert n_first >= 3 and len(steps) == n_first  # the second call trained nothing
    assert a['fake_set'] == b['fake_set']
    assert any((tmp_path / 'models' / 'gan').iterdir())


def test_main_job_gan_can_be_the_diffusion_model(tmp_path):
    "`--set gan=ddpm`: the main job's generator stage builds lecture 25's DDPM (its width is `ch`) and writes its fake set."
    from deepfake_course.data.fakes import read_fake_set
    cfg = bench.main_config(quick=True, gan='ddpm', gan_steps=2, gan_size=16, gan_width=8, n_gan=6, size=32)
    real = _random_real(tmp_path)
    out = bench.build_gan_fakes(cfg, real, tmp_path, device='cpu', verbose=False)
    assert out['fake_set'].startswith('ddpm/') and len(read_fake_set(out['fake_set'], tmp_path)) == 6


def test_course_sources_names_and_dispatch(tmp_path, monkeypatch):
    cfg = bench.main_config(quick=True, n_identities=9)
    with pytest.raises(ValueError, match=r"unknown fake source\(s\) \['deepfakes'\].*blend-swap"):
        bench.course_sources(['deepfakes'], cfg, tmp_path)
    with pytest.raises(ValueError, match='only the lecture GANs take parameters'):
        bench.course_sources(['dcgan'], cfg, tmp_path, gan_params={'dcgan': {'steps': 3}})
    # each source goes to its recipe, once, in the order given (duplicates dropped); the lecture GANs get their parameters
    calls = []
    monkeypatch.setattr(bench, 'build_real', lambda job, root: _real())
    monkeypatch.setattr(bench, 'build_gan_fakes', lambda job, real, root, **kw: calls.append(('main', job['gan'])) or {'fake_set': 'dcgan/1'})
    import deepfake_course.generate.gan as G
    monkeypatch.setattr(G, 'course_gan_fake_set', lambda name, root, **kw: calls.append((name, kw.get('steps'))) or f'{name}/2')
    out = bench.course_sources(['dcgan', 'pggan', 'dcgan'], cfg, tmp_path, gan_params={'pggan': {'steps': 7}})
    assert calls == [('main', 'dcgan'), ('pggan', 7)]
    assert list(out) == ['dcgan', 'pggan'] and out['pggan']['fake_set'] == 'pggan/2' and 'lecture' in out['pggan']['how']


def test_extra_sources_and_the_reenact_source(tmp_path, monkeypatch):
    assert bench.main_config(quick=True)['extra_sources'] == []
    assert bench.main_config(quick=True, extra_sources='reenact')['extra_sources'] == ['reenact']
    with pytest.raises(ValueError, match=r"extra_sources \['faceswap-df'\]"): bench.main_config(quick=True, extra_sources=['faceswap-df'])
    with pytest.raises(ValueError, match=r"extra_sources \['nope'\].*reenact"): bench.main_config(quick=True, extra_sources=['nope'])
    # 'reenact' trains the lecture's recipe at the job's size and stills' framing, and pairs people inside each split
    import deepfake_course.generate.reenact as R
    cfg = bench.main_config(quick=True, n_identities=9)
    seen = {}
    monkeypatch.setattr(bench, 'build_real', lambda job, root: _real())
    monkeypatch.setattr(R, 'reenact_recipe', lambda root, **kw: seen.update(recipe=kw) or R.FOMMRun(R.FOMM(64, num_kp=2, kp_width=4, gen_width=4, dense_width=4, n_res=1), pd.DataFrame(), 1.0))
    monkeypatch.setattr(R, 'make_reenact_fake_set', lambda model, pairs, **kw: seen.update(pairs=pairs, set=kw) or 'reenact/1')
    monkeypatch.setattr(bench, 'mtcnn_quality', lambda *a, **k: {'all': {}})
    out = bench.course_sources(['reenact'], cfg, tmp_path)
    assert out['reenact']['fake_set'] == 'reenact/1'
    assert seen['recipe']['size'] == cfg['size'] and seen['recipe']['scale'] is None and seen['set']['scale'] is None
    assert (seen['pairs'].groupby('split').apply(lambda p: set(p.src) == set(p.dst))).all()
    assert seen['set']['frames_per_clip'] == seen['set']['n_frames'] == cfg['images_per_identity']


def test_the_idswap_source_swaps_the_job_faces_inside_each_split(tmp_path, monkeypatch):
    import deepfake_course.generate.idswap as I
    cfg = bench.main_config(quick=True, n_identities=9)
    seen = {}
    class Run: generator, idenc, result = 'G', 'E', type('R', (), {'seconds': 1.0})
    monkeypatch.setattr(bench, 'build_real', lambda job, root: _real())
    monkeypatch.setattr(I, 'course_idswap', lambda root, **kw: Run)
    monkeypatch.setattr(I, 'make_idswap_fake_set', lambda g, e, pairs, root, **kw: seen.update(pairs=pairs, kw=kw) or 'idswap/1')
    monkeypatch.setattr(bench, 'mtcnn_quality', lambda *a, **k: {'all': {}})
    calls = []
    monkeypatch.setattr(bench, 'render_identity', lambda c, i, n=None, off=0: calls.append((i, n, off)))
    assert bench.course_sources(['idswap'], cfg, tmp_path)['idswap']['fake_set'] == 'idswap/1'
    assert (seen['pairs'].groupby('split').apply(lambda p: set(p.src) == set(p.dst))).all()
    seen['kw']['render_fn'](4, cfg['images_per_identity'], cfg['seed'])                 # the driving faces: the job's own stills
    seen['kw']['render_fn'](5, 1, cfg['seed'] + I.SOURCE_SEED)                         # the identity: another render
    assert calls == [(4, cfg['images_per_identity'], 0), (5, 1, I.SOURCE_SEED)]
