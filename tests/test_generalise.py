"Unit tests of deepfake_course.generalise (notebook 60c) and deepfake_course.lofo (notebook 60d)."
import numpy as np
import pandas as pd
import pytest
import torch

from deepfake_course import generalise as G
from deepfake_course import lofo as L
from deepfake_course.detect.core import DetectionData, FaceTensorSet, build_detector

pytestmark = pytest.mark.usefixtures('one_thread')


def _faces(source, split, ids, fake: bool, n_per: int = 3, size: int = 16, seed: int = 0, target=None):
    "uint8 faces of `ids` (n_per each): fakes are brighter, so a detector can learn them."
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(len(ids) * n_per, 3, size, size, generator=g) * 0.5 + (0.4 if fake else 0.0)
    df = pd.DataFrame({'path': '', 'label': int(fake), 'source': source if fake else 'synthfaces',
                       'identity': np.repeat(ids, n_per), 'target_identity': np.repeat(target if target is not None else [-1] * len(ids), n_per),
                       'split': split})
    return FaceTensorSet((x.clamp(0, 1) * 255).round().byte(), df)


def _data(source, seed=0, test_ids=(6, 7), train_ids=(0, 1, 2, 3)):
    def split(s, ids):
        r, f = _faces(source, s, list(ids), False, seed=seed), _faces(source, s, list(ids), True, seed=seed + 1)
        return FaceTensorSet(torch.cat([r.x, f.x]), pd.concat([r.df, f.df], ignore_index=True))
    return DetectionData(split('train', train_ids), split('val', (4, 5)), split('test', test_ids), f'{source}/abc')


def test_families():
    assert G.family_of('faceswap-df') == 'autoencoder-swap' and G.family_of('stylegan2') == 'gan'
    with pytest.raises(ValueError, match='known sources'): G.family_of('dall-e')
    assert G.source_families(['dcgan', 'self-blend', 'pggan']) == {'gan': ['dcgan', 'pggan'], 'tampering': ['self-blend']}
    folds = L.lofo_folds(['faceswap-df', 'blend-swap', 'dcgan'])
    assert list(folds.held_out) == ['autoencoder-swap', 'blend-swap', 'gan']
    assert folds.set_index('held_out').loc['gan', 'train_sources'] == ['faceswap-df', 'blend-swap']
    with pytest.raises(ValueError, match='two families'): L.lofo_folds(['dcgan', 'pggan'])


def test_check_rows():
    assert G.check_rows(['meso4', 'shallownet_v3', 'fdftnet']) == ['meso4', 'shallownet_v3', 'fdftnet']
    with pytest.raises(ValueError, match='before'): G.check_rows(['fdftnet'])
    assert G.check_rows(['fdftnet'], need_backbone=False) == ['fdftnet']     # run_lofo trains the backbone itself
    with pytest.raises(ValueError, match='unknown'): G.check_rows(['meso5'])
    with pytest.raises(ValueError, match='not two-class image'): G.check_rows(['lfcc_gmm'])
    with pytest.raises(ValueError, match='twice'): G.check_rows(['meso4', 'meso4'])
    assert 'no fake' in G.how_trained('sbi') and 'MSE' in G.how_trained('meso4') and 'frozen' in G.how_trained('fdftnet')


def test_pool_sources():
    data = {'a': _data('a'), 'b': _data('b', seed=5)}
    p = G.pool_sources(data, ['a', 'b'])
    assert len(p.train) == len(data['a'].train) + len(data['b'].train) and len(p.val) == len(data['a'].val) + len(data['b'].val)
    assert p.train.y.sum() == data['a'].train.y.sum() + data['b'].train.y.sum()
    assert torch.equal(p.train.x[:len(data['a'].train)], data['a'].train.x) and p.fake_set == 'a/abc+b/abc'
    assert set(p.train.df.pool_source) == {'a', 'b'}
    with pytest.raises(ValueError, match='unknown source'): G.pool_sources(data, ['c'])
    with pytest.raises(ValueError, match='no source'): G.pool_sources(data, [])


def test_table_from_scores():
    data = {'a': _data('a'), 'b': _data('b', seed=5)}
    sets = G.test_sets(data, ['jpeg70'])
    assert set(sets) == {('a', 'clean'), ('a', 'jpeg70'), ('b', 'clean'), ('b', 'jpeg70')}
    assert not torch.equal(sets[('a', 'jpeg70')].x, sets[('a', 'clean')].x)
    with pytest.raises(ValueError, match='unknown perturbation'): G.test_sets(data, ['jpeg71'])
    torch.manual_seed(0)
    models = {'meso4': build_detector('meso4', input_size=16).eval()}
    sc = G.score_rows(models, sets, device='cpu')
    assert len(sc) == sum(len(s) for s in sets.values()) and {'unit', 'source', 'perturbation', 'detector'} <= set(sc.columns)
    # a perfect score and a reversed one: the table must say 1 and 0 with degenerate intervals
    sc = sc.assign(score=np.where(sc.source == 'a', sc.label, 1 - sc.label).astype(float))
    t = G.generalisation_table(sc, n_boot=30)
    assert list(t.columns) == ['detector', 'source', 'perturbation', 'auroc', 'low', 'high', 'n_real', 'n_fake', 'n_groups']
    assert len(t) == 4 and (t[t.source == 'a'].auroc == 1).all() and (t[t.source == 'b'].auroc == 0).all()
    w = G.wide(t, 'clean', 'text')
    assert w.loc['meso4', 'a'] == '100.0 [100.0, 100.0]'
    with pytest.raises(ValueError, match='lack'): G.generalisation_table(sc.drop(columns='unit'))


def test_train_row_and_lofo_refuses_a_leak(tmp_path):
    data = {'blend-swap': _data('blend-swap'), 'dcgan': _data('dcgan', seed=5)}
    m, info = G.train_row('meso4', data['blend-swap'], tmp_path / 'r', epochs=5, lr=5e-3, batch_size=8, device='cpu')
    assert info['val_auroc'] > 0.9 and (tmp_path / 'r' / 'final.pt').exists()   # the brighter fakes are learnt
    m2, info2 = G.train_row('meso4', data['blend-swap'], tmp_path / 'r', epochs=5, lr=5e-3, batch_size=8, device='cpu')
    x = data['blend-swap'].test.x[:4].float() / 255
    assert torch.allclose(m(x), m2(x), atol=1e-6)                            # read back, not retrained
    folds = L.lofo_folds(['blend-swap', 'dcgan'])
    sc, inf = L.run_lofo(['meso4'], data, folds, tmp_path / 'lofo', epochs=1, batch_size=8, device='cpu')
    assert set(sc.held_out) == {'blend-swap', 'gan'} and len(inf) == 2
    assert set(sc[sc.held_out == 'gan'].source) == {'dcgan'}
    leaky = {'blend-swap': data['blend-swap'], 'dcgan': _data('dcgan', seed=5, train_ids=(0, 1, 6))}   # person 6 is a test person
    with pytest.raises(ValueError, match=r'test people \[6\]'): L.run_lofo(['meso4'], leaky, folds, tmp_path / 'leak', epochs=1, device='cpu')
    with pytest.raises(ValueError, match='real faces only'): L.run_lofo(['sbi'], data, folds, tmp_path / 'x')
    t = L.lofo_table(sc, n_boot=20)
    assert set(t.held_out) == {'blend-swap', 'gan'} and np.allclose(t.family_auroc, t.auroc)


def test_source_build_in_a_second_process(tmp_path, monkeypatch):
    from deepfake_course import bench
    # spawned, as in the notebook: a forked child cannot sign the set's C2PA manifests (c2pa's context does not survive a fork)
    monkeypatch.setattr(G.SourceBuild, 'BACKGROUND', ('blend-swap',))      # the cheap set stands in for the face swaps
    job = bench.main_config(quick=True, n_identities=9, images_per_identity=4)
    threads = torch.get_num_threads()
    b = G.SourceBuild(['blend-swap', 'self-blend'], job, tmp_path, device='cpu')   # an empty root: the child builds and signs
    assert 'self-blend' in b.sources and b.sources['self-blend']['fake_set'].startswith('self-blend/')
    out = b.wait()
    assert list(out) == ['blend-swap', 'self-blend'] and out['blend-swap']['fake_set'].startswith('blend-swap/')
    assert not b.pending and b.poll() and torch.get_num_threads() == threads
    with pytest.raises(ValueError, match='unknown source'): G.SourceBuild(['dall-e'], job, tmp_path)


def test_run_folds_in_two_processes_matches_one(tmp_path, monkeypatch):
    from deepfake_course.detect import attribution as A
    monkeypatch.setattr(A, 'BACKGROUND_CONTEXT', 'fork')                    # the notebook spawns; a fork starts in milliseconds
    data = {'blend-swap': _data('blend-swap'), 'dcgan': _data('dcgan', seed=5), 'self-blend': _data('self-blend', seed=9)}
    folds = L.lofo_folds(list(data))
    kw = dict(epochs=1, batch_size=8, device='cpu')
    two, inf = L.run_folds(['meso4'], data, folds, tmp_path / 'two', parallel=True, **kw)
    one, _ = L.run_folds(['meso4'], data, folds, tmp_path / 'one', parallel=False, **kw)
    assert set(two.held_out) == set(folds.held_out) and len(inf) == 3
    key = ['held_out', 'source', 'label', 'identity']
    a, b = two.sort_values(key, kind='stable'), one.sort_values(key, kind='stable')
    assert np.allclose(a.score.to_numpy(), b.score.to_numpy(), atol=1e-5)   # the same folds, in one process or two
    p = G.pool_sources(data, ['blend-swap', 'dcgan'], fraction=0.5)
    assert len(p.train) == len(data['blend-swap'].train) and p.train.y.sum() == data['blend-swap'].train.y.sum()
    with pytest.raises(ValueError, match='fraction'): G.pool_sources(data, ['dcgan'], fraction=0)
