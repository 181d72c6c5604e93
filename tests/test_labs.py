"""The `deepfake-course` command line (deepfake_course.cli.main, called in-process) and the main job's configuration
as the notebook and the CLI build it (deepfake_course.bench.main_config; no job is run here)."""
import json, os, pathlib

import nbformat
import numpy as np
import pandas as pd
import pytest

from deepfake_course import bench, labs, report
from deepfake_course.bench import FULL, QUICK, main_config
from deepfake_course.data.manifest import check_no_leak, make_manifest
from deepfake_course.labs import LabError, _coerce, _parse_grid, _split_values, run_lab
from deepfake_course.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH_NB = ROOT / 'nbs' / '60_benchmark.ipynb'
KERNEL = {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}}


def as_config(base, quick, seed=0):
    "What main_config returns for an untouched QUICK/FULL (tuples become lists, seed and quick added)."
    return {**base, 'detectors': list(base['detectors']), 'jpeg': list(base['jpeg']), 'blur': [float(v) for v in base['blur']],
            'resize': [float(v) for v in base['resize']], 'noise': [float(v) for v in base['noise']],
            'extra_sources': list(base['extra_sources']), 'seed': seed, 'quick': quick}


def notebook_overrides(nb_path):
    "The settings 60_benchmark's parameters cell passes to main_config, at their defaults (as papermill reads them)."
    import papermill as pm, ast
    params = pm.inspect_notebook(str(nb_path))
    return {k: ast.literal_eval(v['default']) for k, v in params.items() if k in QUICK}


# ---- the main job's configuration (bug: quick=False still got the quick sizes from the parameters cell) ----

def test_notebook_defaults_with_quick_false_are_full():
    over = notebook_overrides(BENCH_NB)
    assert set(over) >= {'n_identities', 'images_per_identity', 'fs_steps', 'det_epochs', 'n_boot'}, over
    assert main_config(False, 0, **over) == as_config(FULL, False)
    assert main_config(True, 0, **over) == as_config(QUICK, True)


def test_none_overrides_nothing_and_a_set_value_overrides():
    assert main_config(False, n_identities=None, jpeg=None) == as_config(FULL, False)
    cfg = main_config(False, n_identities=10, jpeg=[50])
    assert (cfg['n_identities'], cfg['jpeg'], cfg['fs_steps']) == (10, [50], FULL['fs_steps'])
    with pytest.raises(ValueError, match='unknown setting'): main_config(False, epochz=3)
    with pytest.raises(ValueError, match='two identities to swap'): main_config(False, n_identities=8)


def test_named_run_folder_refuses_another_configuration(tmp_path, monkeypatch):
    run_dir = tmp_path / 'runs' / 'main' / 'mine'
    run_dir.mkdir(parents=True)
    (run_dir / 'config.json').write_text(json.dumps(main_config(True, 0)))
    def no_work(*a, **k): raise AssertionError('main_job started working in a folder that holds another configuration')
    monkeypatch.setattr(bench, 'build_real', no_work)
    with pytest.raises(ValueError, match=r"another configuration.*n_boot"):
        bench.main_job(quick=True, data_root=tmp_path, device='cpu', name='mine', log=lambda *a: None, n_boot=10)



# ---- the face swaps' pairs (bug: one swap model's src, the first training identity, was pasted into val and test fakes) ----

def id_split_of(n_train, n_val, n_test, seed=0):
    "identity -> split with identities shuffled, so a split's identities are not consecutive numbers."
    splits = ['train'] * n_train + ['val'] * n_val + ['test'] * n_test
    ids = np.random.default_rng(seed).permutation(len(splits))
    return {int(i): s for i, s in zip(ids, splits)}


@pytest.mark.parametrize('sizes', [(8, 2, 2), (16, 4, 4), (6, 2, 3)])
def test_swap_pairs_keep_both_identities_in_one_split(sizes):
    id_split = id_split_of(*sizes)
    pairs = bench.swap_pairs(id_split)
    assert len(pairs) and set(pairs.split) == {'train', 'val', 'test'}
    for r in pairs.itertuples():
        assert r.src != r.dst and id_split[r.src] == id_split[r.dst] == r.split, r
    train = {i for i, s in id_split.items() if s == 'train'}
    held = pairs[pairs.split != 'train']
    assert not train & (set(held.src) | set(held.dst)), 'a val/test fake shows a training identity'
    # every identity takes part, and one model per split: one src per split
    assert set(pairs.src) | set(pairs.dst) == set(id_split)
    assert pairs.groupby('split').src.nunique().eq(1).all()
    # the fakes these pairs make pass the leak check together with the real faces
    real = pd.DataFrame(dict(path=[f'r{i}.png' for i in id_split], label=0, source='synthfaces', identity=list(id_split),
                             split=list(id_split.values())))
    fakes = pd.DataFrame(dict(path='f.png', label=1, source='faceswap-df', identity=pairs.dst, target_identity=pairs.src, split=pairs.split))
    assert check_no_leak(make_manifest(pd.concat([real, fakes], ignore_index=True)))


def test_swap_pairs_need_two_identities_per_split():
    with pytest.raises(ValueError, match=r"the test split holds 1 identity"): bench.swap_pairs(id_split_of(4, 2, 1))
    with pytest.raises(ValueError, match='splits must be one of'): bench.swap_pairs({0: 'train', 1: 'train', 2: 'holdout'})


def test_results_table_one_row_per_key_with_identity_intervals():
    rng = np.random.default_rng(0)
    rows = []
    for det in ('meso4', 'shallownet_v3'):
        for tr in ('faceswap-df', 'dcgan'):
            for split, te, cond in [('val', tr, 'clean'), ('test', tr, 'clean'), ('test', tr, 'jpeg50'),
                                    ('test', {'faceswap-df': 'dcgan', 'dcgan': 'faceswap-df'}[tr], 'clean')]:
                for ident in range(6):
                    y = np.r_[np.zeros(5), np.ones(5)]
                    rows.append(pd.DataFrame(dict(detector=det, train_source=tr, test_source=te, split=split, condition=cond,
                                                  identity=ident, target_identity=np.where(y == 1, (ident + 1) % 6, -1),
                                                  label=y.astype(int), score=np.clip(0.3 * y + rng.random(10) * 0.7, 0, 1))))
    scores = pd.concat(rows, ignore_index=True)
    calib = report.calibrate(scores)
    assert len(calib) == 4 and calib.threshold.between(0, 1).all() and (calib.temperature > 0).all()
    t = report.results_table(scores, calib, n_boot=50, seed=0)
    assert len(t) == 16 and not t.duplicated(report.RESULT_KEYS).any()  # 12 test rows + a control row per (detector, source)
    assert list(t.columns[:5]) == report.RESULT_KEYS + ['setting']
    main = t[t.setting != 'control']
    assert (main.n == 60).all() and (main.n_groups == 6).all() and (t.auroc_lo <= t.auroc).all() and (t.auroc <= t.auroc_hi).all()
    assert {'acc_val_threshold', 'acc_val_threshold_lo', 'acc_val_threshold_hi', 'eer', 'ap', 'bacc_best', 'fpr_val_threshold'} <= set(t.columns)
    got = t.set_index(report.RESULT_KEYS).setting
    assert got[('meso4', 'dcgan', 'dcgan', 'clean')] == 'in-distribution'
    assert got[('meso4', 'dcgan', 'faceswap-df', 'clean')] == 'cross-generator'
    assert got[('meso4', 'dcgan', 'dcgan', 'jpeg50')] == 'robustness'
    assert got[('meso4', 'dcgan', 'dcgan', 'control')] == 'control'
    # the validation rows decide the threshold: moving the val scores moves the test ACC, not the AUROC
    shifted = scores.assign(score=np.where(scores.split == 'val', np.clip(scores.score + 0.25, 0, 1), scores.score))
    t2 = report.results_table(shifted, report.calibrate(shifted), n_boot=50, seed=0).set_index(report.RESULT_KEYS)
    k = ('meso4', 'dcgan', 'dcgan', 'clean')
    assert t2.loc[k, 'auroc'] == pytest.approx(t.set_index(report.RESULT_KEYS).loc[k, 'auroc'])
    assert not np.allclose(report.calibrate(shifted).threshold, calib.threshold)
    assert not hasattr(bench, 'pretty_table')


# ---- deepfake-course run ----

@pytest.fixture
def fake_job(monkeypatch):
    "Replace the main job by a recorder: the CLI's arguments are checked without running anything."
    calls = []
    def main_job(**kwargs):
        calls.append(kwargs); return pathlib.Path(kwargs['data_root']) / 'report.md'
    monkeypatch.setattr(bench, 'main_job', main_job)
    return calls


def test_run_without_quick_is_full(fake_job, tmp_path):
    assert main(['run', '--data-root', str(tmp_path / 'd')]) == 0
    (kw,) = fake_job
    assert kw['quick'] is False
    over = {k: v for k, v in kw.items() if k not in ('quick', 'data_root', 'device', 'seed', 'name')}
    assert main_config(kw['quick'], kw['seed'], **over) == as_config(FULL, False)


def test_run_set_passes_overrides_and_a_resolved_data_root(fake_job, tmp_path):
    rc = main(['run', '--quick', '--data-root', str(tmp_path / 'd'), '--seed', '3', '--name', 'x',
               '--set', 'n_boot=50', '--set', 'detectors=[shallownet_v3,meso4]', '--set', 'det_lr=1e-4', '--set', 'jpeg=[90, 50]'])
    assert rc == 0
    (kw,) = fake_job
    assert kw['data_root'] == (tmp_path / 'd').resolve() and isinstance(kw['data_root'], pathlib.Path)
    assert (kw['quick'], kw['seed'], kw['name']) == (True, 3, 'x')
    assert {k: kw[k] for k in ('n_boot', 'detectors', 'det_lr', 'jpeg')} == \
        {'n_boot': 50, 'detectors': ['shallownet_v3', 'meso4'], 'det_lr': 1e-4, 'jpeg': [90, 50]}


def test_run_set_unknown_key_names_it_and_lists_the_known(fake_job, tmp_path, capsys):
    assert main(['run', '--data-root', str(tmp_path), '--set', 'epochz=3']) == 2
    err = capsys.readouterr().err
    assert 'epochz' in err and 'unknown setting' in err
    for k in ('n_identities', 'det_epochs', 'n_boot', 'jpeg'): assert k in err
    assert main(['run', '--data-root', str(tmp_path), '--set', 'seed=3']) == 2
    assert '--seed' in capsys.readouterr().err
    assert fake_job == []


def test_run_set_bad_value_stops_before_the_job(fake_job, tmp_path, capsys):
    assert main(['run', '--data-root', str(tmp_path), '--set', 'jpeg=[120]']) == 2
    assert 'JPEG quality' in capsys.readouterr().err
    assert main(['run', '--data-root', str(tmp_path), '--set', 'n_boot']) == 2
    assert 'NAME=VALUE' in capsys.readouterr().err
    assert fake_job == []


def test_run_your_own_data_flags_reach_the_job(fake_job, tmp_path):
    real, fake = tmp_path / 'r', tmp_path / 'f'
    assert main(['run', '--quick', '--data-root', str(tmp_path / 'd'), '--real-dir', str(real), '--fake-dir', str(fake)]) == 0
    assert main(['run', '--quick', '--data-root', str(tmp_path / 'd'), '--dataset', 'dfdc', '--dataset-root', str(real)]) == 0
    a, b = fake_job
    assert (a['real_dir'], a['fake_dir']) == (str(real), str(fake)) and 'dataset' not in a
    assert (b['dataset'], b['dataset_root']) == ('dfdc', str(real)) and 'real_dir' not in b


@pytest.mark.parametrize('argv, msg', [(['--real-dir', 'r'], '--real-dir and --fake-dir go together'),
                                       (['--dataset', 'dfdc'], '--dataset and --dataset-root go together'),
                                       (['--real-dir', 'r', '--fake-dir', 'f', '--dataset', 'dfdc', '--dataset-root', 'x'], 'not both')])
def test_run_your_own_data_bad_flags_stop_before_the_job(fake_job, tmp_path, capsys, argv, msg):
    assert main(['run', '--quick', '--data-root', str(tmp_path)] + argv) == 2
    assert msg in capsys.readouterr().err and fake_job == []


def test_run_unknown_dataset_is_a_usage_error(capsys):
    with pytest.raises(SystemExit): main(['run', '--dataset', 'ffhq', '--dataset-root', '.'])
    assert 'ff++-dfd' in capsys.readouterr().err


def test_run_name_help_says_where_the_folder_is(capsys):
    with pytest.raises(SystemExit): main(['run', '--help'])
    out = ' '.join(capsys.readouterr().out.split())
    assert 'runs/main/NAME' in out and 'hash of the configuration' in out


# ---- values and grids ----

def test_coerce_reads_values_like_papermill():
    assert [_coerce(v) for v in ['3', '0.5', '1e-3', 'true', 'True', 'False', 'None', 'null', 'cpu']] == \
        [3, 0.5, 1e-3, True, True, False, None, None, 'cpu']
    assert _coerce('[32, 64]') == [32, 64] and _coerce('[meso4, fdftnet]') == ['meso4', 'fdftnet']
    assert _coerce('{e_dims: 8}') == {'e_dims': 8}
    with pytest.raises(ValueError, match='does not parse'): _coerce('[1, 2')


def test_parse_grid_brackets_are_one_value():
    assert _parse_grid(['sizes=[32,64],[64]', 'seed=0,1']) == {'sizes': [[32, 64], [64]], 'seed': [0, 1]}
    assert _parse_grid(['seed=0,1', 'device=cpu']) == {'seed': [0, 1], 'device': ['cpu']}
    assert _parse_grid(['names="a,b",c']) == {'names': ['a,b', 'c']}
    assert _split_values('[1,[2,3]],{"a":1,"b":2}') == ['[1,[2,3]]', '{"a":1,"b":2}']
    for bad, msg in [(['sizes=[32,64'], 'unbalanced'), (['seed'], 'NAME=VALUE'), (['seed=0', 'seed=1'], 'twice'),
                     (['seed='], 'no values')]:
        with pytest.raises(ValueError, match=msg): _parse_grid(bad)


# ---- labs on tiny notebooks ----

def write_nb(path, params_src, *cells):
    nb = nbformat.v4.new_notebook(metadata=KERNEL)
    p = nbformat.v4.new_code_cell(params_src); p.metadata['tags'] = ['parameters']
    nb.cells = [p, *[nbformat.v4.new_code_cell(c) for c in cells]]
    nbformat.write(nb, str(path))
    return path


@pytest.fixture(scope='module')
def sizes_nb(tmp_path_factory):
    "A lab that records what it received (plain json: no torch import, so a run takes a kernel start)."
    d = tmp_path_factory.mktemp('nbs')
    return write_nb(d / 'sizes_lab.ipynb',
                    'data_root = None\nout_dir = None\ndevice = "auto"\nseed = 0\nsizes = [32]',
                    'import json, pathlib\n'
                    'pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)\n'
                    'm = {"n_sizes": len(sizes), "size_sum": sum(sizes), "got_seed": seed, "got_root": data_root}\n'
                    '(pathlib.Path(out_dir) / "metrics.json").write_text(json.dumps(m))')


def test_lab_grid_list_values(sizes_nb, tmp_path, capsys):
    out = tmp_path / 'grid'
    rc = main(['lab', str(sizes_nb), '--data-root', str(tmp_path / 'd'), '--out', str(out),
               '--grid', 'sizes=[32,64],[64]', 'seed=0,1', '--timeout', '120'])
    assert rc == 0, capsys.readouterr().err
    import pandas as pd
    df = pd.read_csv(out / 'grid.csv')
    assert len(df) == 4
    assert sorted(zip(df.n_sizes, df.size_sum, df.got_seed)) == [(1, 64, 0), (1, 64, 1), (2, 96, 0), (2, 96, 1)]
    assert set(df.got_root) == {str((tmp_path / 'd').resolve())}
    assert (out / 'sizes=[32,64]_seed=1' / 'lab.json').exists()


def test_lab_data_root_conflict_is_an_error(sizes_nb, tmp_path, capsys):
    rc = main(['lab', str(sizes_nb), '--data-root', str(tmp_path / 'a'), '-p', 'data_root', str(tmp_path / 'b'),
               '--out', str(tmp_path / 'o')])
    assert rc == 2 and 'two data roots' in capsys.readouterr().err


def test_failing_lab_prints_cell_and_error_briefly(tmp_path, capsys):
    nb = write_nb(tmp_path / 'broken.ipynb', 'data_root = None\nout_dir = None\nn_students = 0',
                  'scores = [0.9, 0.8]',
                  'def mean(xs):\n    return sum(xs) / n_students\n\nprint(mean(scores))')
    out = tmp_path / 'run'
    rc = main(['lab', str(nb), '--data-root', str(tmp_path / 'd'), '--out', str(out), '--timeout', '120'])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert 'cell 3 of 3' in err and 'def mean(xs):' in err and 'return sum(xs) / n_students' in err
    assert 'ZeroDivisionError: float division by zero' in err
    assert str(out.resolve() / 'broken.ipynb') in err and (out / 'broken.ipynb').exists()
    assert 'Traceback' not in err and len(err.strip().splitlines()) <= 10, err

    with pytest.raises(LabError) as e:
        run_lab(nb, tmp_path / 'run2', data_root=tmp_path / 'd', timeout=120)
    assert (e.value.cell_index, e.value.ename) == (2, 'ZeroDivisionError')
    assert e.value.executed == (tmp_path / 'run2' / 'broken.ipynb').resolve()


def test_lab_timeout_is_a_lab_error(tmp_path):
    nb = write_nb(tmp_path / 'slow.ipynb', 'data_root = None\nout_dir = None', 'x = 1', 'import time\ntime.sleep(30)')
    with pytest.raises(LabError) as e:
        run_lab(nb, tmp_path / 'run', data_root=tmp_path / 'd', timeout=2)
    msg = str(e.value)
    assert 'cell 3 of 3' in msg and 'time.sleep(30)' in msg and 'timeout=2' in msg, msg


# ---- deepfake-course detect: score files with a trained detector ----

def const_detector(bias: float):
    "A thumbnail_logreg whose fake probability is sigmoid(bias) for every input: which detector scored is then visible."
    import torch
    from deepfake_course.detect.core import build_detector
    m = build_detector('thumbnail_logreg', thumb=4, input_size=32)
    with torch.no_grad(): m.fc.weight.zero_(); m.fc.bias.fill_(bias)
    return m


def sigmoid(x): return 1 / (1 + np.exp(-x))


@pytest.fixture
def media(tmp_path):
    "A face crop, a six-frame clip, a text file and a flat grey picture (no face)."
    from deepfake_course.core import write_mp4
    from deepfake_course.media import write_png
    rng = np.random.default_rng(0)
    d = tmp_path / 'media'; d.mkdir()
    write_png(d / 'face.png', (rng.random((32, 32, 3)) * 255).astype(np.uint8))
    write_mp4(d / 'clip.mp4', rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), fps=5)
    (d / 'notes.txt').write_text('not a picture')
    write_png(tmp_path / 'grey.png', np.full((96, 96, 3), 127, np.uint8))
    return d


def saved(model, path):
    from deepfake_course.detect.core import save_detector
    return save_detector(model, path)


def test_detect_scores_image_and_video_and_goes_on_after_bad_files(media, tmp_path, capsys):
    ck = saved(const_detector(1.0), tmp_path / 'det.pt')
    rc = main(['detect', str(media / 'face.png'), str(media / 'notes.txt'), str(tmp_path / 'missing.png'),
               str(media / 'clip.mp4'), '--model', str(ck), '--faces', 'none', '--every', '2', '--device', 'cpu'])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = [l for l in out.splitlines() if not l.startswith('#')]
    p = f"{sigmoid(1.0):.3f}"
    assert lines[0] == f"{media / 'face.png'}  frame -  face 0  box 0,0,32,32  p_fake {p}  fake"
    assert lines[1].startswith(f"{media / 'face.png'}  summary  1/1 frames with a face  p_fake mean {p}")
    assert [l.split('  ')[1] for l in lines[2:5]] == ['frame 0', 'frame 2', 'frame 4']    # --every 2 of 6 frames
    assert lines[5].startswith(f"{media / 'clip.mp4'}  summary  3/3 frames with a face") and 'fake frames 100%' in lines[5]
    assert lines[5].endswith('verdict fake (uncalibrated)') and len(lines) == 6
    assert 'p_fake >= 0.500 (uncalibrated' in out and f'from {ck.resolve()}' in out
    assert f"{media / 'notes.txt'} is not an image or video" in err
    assert f"{tmp_path / 'missing.png'} does not exist" in err and 'scored 2 of 4 files' in err


def test_detect_json_is_one_object(media, tmp_path, capsys):
    ck = saved(const_detector(-1.0), tmp_path / 'det.pt')
    rc = main(['detect', str(media), str(tmp_path / 'missing.png'), '--model', str(ck), '--faces', 'none',
               '--max-frames', '4', '--json', '--device', 'cpu'])
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out)                                       # the whole of stdout is one JSON object
    assert set(res) == {'detector', 'faces', 'files', 'errors'}
    assert [pathlib.Path(f['file']).name for f in res['files']] == ['clip.mp4', 'face.png']   # the folder's media only
    assert len(res['faces']) == 4 + 1 and {r['verdict'] for r in res['faces']} == {'real'}
    clip, face = res['files']
    assert (clip['kind'], clip['frames'], clip['face_frames'], clip['fake_frames']) == ('video', 4, 4, 0.0)
    assert face['kind'] == 'image' and face['verdict'] == 'real' and abs(face['mean_prob'] - sigmoid(-1.0)) < 1e-6
    row = res['faces'][-1]
    assert row['frame'] == -1 and row['face_prob'] is None and [row[k] for k in ('x0', 'y0', 'x1', 'y1')] == [0, 0, 32, 32]
    assert res['errors'] == [{'file': str(tmp_path / 'missing.png'), 'error': f"{tmp_path / 'missing.png'} does not exist"}]
    assert res['detector']['detector'] == 'thumbnail_logreg' and res['detector']['calibrated'] is False
    assert res['detector']['threshold'] == 0.5 and res['detector']['checkpoint'] == str(ck.resolve())


def test_detect_no_face_says_so_and_nothing_scored_is_status_1(media, tmp_path, capsys):
    pytest.importorskip('deepfake_course.faces')
    ck = saved(const_detector(0.0), tmp_path / 'det.pt')
    rc = main(['detect', str(tmp_path / 'grey.png'), str(media / 'notes.txt'), '--model', str(ck), '--device', 'cpu'])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"no face found in {tmp_path / 'grey.png'} (MTCNN" in err and 'pass --faces none if it is already a face crop' in err
    assert 'scored 0 of 2 files' in err


def test_detect_checkpoint_of_no_known_detector(media, tmp_path, capsys):
    import torch
    from deepfake_course.train import save_checkpoint
    bad = save_checkpoint(tmp_path / 'other.pt', torch.nn.Linear(2, 1), rng=False, name='not-a-detector')
    assert main(['detect', str(media / 'face.png'), '--model', str(bad), '--faces', 'none']) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "'not-a-detector'" in err and 'thumbnail_logreg' in err and 'shallownet_v3' in err
    assert main(['detect', str(media / 'face.png'), '--model', str(media / 'notes.txt'), '--faces', 'none']) == 2
    err = capsys.readouterr().err
    assert str(media / 'notes.txt') in err and 'not a PyTorch file' in err and 'thumbnail_logreg' in err
    assert main(['detect', str(media / 'face.png'), '--model', str(tmp_path / 'nope.pt')]) == 2
    assert 'nope.pt: no such checkpoint file' in capsys.readouterr().err


def test_detect_bad_usage_is_status_2(media, tmp_path, capsys):
    for argv in (['detect'], ['detect', str(media), '--every', '0'], ['detect', str(media), '--faces', 'maybe'],
                 ['detect', str(media), '--model', 'a.pt', '--run', 'r']):
        with pytest.raises(SystemExit) as e: main(argv)
        assert e.value.code == 2, argv
    err = capsys.readouterr().err
    assert 'expected a whole number >= 1, got 0' in err and 'not allowed with argument' in err


def fake_run(root, name, dets, records=None, finished=True, mtime=None):
    """A main-job run folder as bench writes it: config.json, stages/, detectors/<source>/<fake-set hash>/<detector>/
    final.pt (save_detector) with fit's best.pt beside it (score = best val AUROC, monitor 'val_auroc'), metrics.json last.
    `dets`: (source, bias, val_auroc or None for no best.pt)."""
    from deepfake_course.train import save_checkpoint
    run = root / 'runs' / 'main' / name
    (run / 'stages').mkdir(parents=True)
    (run / 'config.json').write_text(json.dumps(main_config(True, 0)))
    cks = {}
    for source, bias, val in dets:
        d = run / 'detectors' / source / f'{abs(hash(source)) % 10**10:010d}' / 'thumbnail_logreg'
        m = const_detector(bias)
        cks[source] = saved(m, d / 'final.pt')
        if val is not None:
            save_checkpoint(d / 'best.pt', m, rng=False, name=m.checkpoint_name, config=m.checkpoint_config, epoch=1,
                            score=val, monitor='val_auroc')
    if finished:
        m = {'metrics': {'n_rows': 1}, 'fake_set': {s: f'{s}/abc' for s, *_ in dets}}
        if records is not None: m['detectors'] = records(cks)
        (run / 'metrics.json').write_text(json.dumps(m))
        if mtime is not None: os.utime(run / 'metrics.json', (mtime, mtime))
    return run, cks


def test_detect_default_is_the_newest_finished_runs_best_on_validation(media, tmp_path, capsys):
    root = tmp_path / 'data'
    fake_run(root, 'older', [('faceswap-df', 3.0, 0.99)], mtime=1_000_000)
    newer, cks = fake_run(root, 'newer', [('faceswap-df', 2.0, 0.70), ('dcgan', -2.0, 0.95)], mtime=2_000_000)
    fake_run(root, 'running', [('faceswap-df', 4.0, 1.0)], finished=False)  # newest folder, but no metrics.json
    argv = ['detect', str(media / 'face.png'), '--faces', 'none', '--data-root', str(root), '--device', 'cpu']
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"from {cks['dcgan'].resolve()} (run newer, trained on dcgan, val AUROC 0.950)" in out
    assert f"p_fake {sigmoid(-2.0):.3f}  real" in out
    assert 'uncalibrated: the run records no validation threshold for it' in out
    assert main(argv + ['--run', 'older']) == 0                       # a run by name under <data root>/runs/main
    assert f"p_fake {sigmoid(3.0):.3f}  fake" in capsys.readouterr().out
    assert main(argv + ['--run', str(root / 'runs' / 'newer'), '--json']) == 2   # neither a folder nor a run name
    assert "no run folder" in capsys.readouterr().err


def test_detect_uses_the_runs_recorded_threshold_and_temperature(media, tmp_path, capsys):
    root = tmp_path / 'data'
    recs = lambda cks: [dict(detector='thumbnail_logreg', train_source='faceswap-df', checkpoint=str(cks['faceswap-df'].relative_to(run_dir)),
                             val_auroc=0.9, threshold=0.8, temperature=2.0),
                        dict(detector='thumbnail_logreg', train_source='dcgan', checkpoint=str(cks['dcgan']), val_auroc=0.6)]
    run_dir = root / 'runs' / 'main' / 'cal'
    run, cks = fake_run(root, 'cal', [('faceswap-df', 2.0, None), ('dcgan', -2.0, 0.99)], records=recs)
    # the records' val AUROC (0.9 > 0.6) wins over best.pt's; p = sigmoid(2 / 2) = 0.731 < 0.8: real
    assert main(['detect', str(media / 'face.png'), '--faces', 'none', '--data-root', str(root), '--json', '--device', 'cpu']) == 0
    res = json.loads(capsys.readouterr().out)
    d = res['detector']
    assert (d['calibrated'], d['threshold'], d['temperature'], d['val_auroc']) == (True, 0.8, 2.0, 0.9)
    assert d['checkpoint'] == str(cks['faceswap-df'].resolve())
    (row,) = res['faces']
    assert abs(row['p_fake'] - sigmoid(1.0)) < 1e-9 and abs(row['p_raw'] - sigmoid(2.0)) < 1e-6 and row['verdict'] == 'real'
    assert res['files'][0]['calibrated'] is True and res['files'][0]['verdict'] == 'real'
    # --model naming a checkpoint of that run: the same calibration
    assert main(['detect', str(media / 'face.png'), '--faces', 'none', '--model', str(cks['faceswap-df']), '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    assert 'p_fake >= 0.800 (threshold chosen on validation, temperature 2)' in out and 'uncalibrated' not in out
    assert out.rstrip().endswith('verdict real')


def test_detect_run_without_validation_figures_lists_its_checkpoints(media, tmp_path, capsys):
    root = tmp_path / 'data'
    run, cks = fake_run(root, 'noval', [('faceswap-df', 1.0, None), ('dcgan', 1.0, None)])
    assert main(['detect', str(media / 'face.png'), '--faces', 'none', '--run', str(run)]) == 2
    err = capsys.readouterr().err
    assert 'records no validation figure' in err and str(cks['faceswap-df']) in err and str(cks['dcgan']) in err


def test_detect_without_a_finished_run_says_what_exists(media, tmp_path, capsys):
    root = tmp_path / 'data'
    assert main(['detect', str(media / 'face.png'), '--data-root', str(root)]) == 2
    assert 'no finished main-job run with detector checkpoints' in capsys.readouterr().err
    fake_run(root, 'half', [('faceswap-df', 1.0, 0.8)], finished=False)
    (root / 'runs' / 'main' / 'empty').mkdir()
    (root / 'runs' / 'main' / 'empty' / 'metrics.json').write_text('{}')
    assert main(['detect', str(media / 'face.png'), '--data-root', str(root)]) == 2
    err = capsys.readouterr().err
    assert 'empty (no detector checkpoints)' in err and 'half (unfinished: no metrics.json)' in err


def test_run_detectors_reads_the_validation_auroc_fit_keeps(tmp_path):
    "best.pt as `fit` itself writes it (not a hand-made copy): its score is the run's validation AUROC."
    import torch
    from sklearn.metrics import roc_auc_score
    from deepfake_course.detect.core import detector_loss
    from deepfake_course.train import fit
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0., 1.] * 16); x = torch.rand(32, 3, 32, 32, generator=g) + y[:, None, None, None] * 0.2
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    run = tmp_path / 'run'; ck = run / 'detectors' / 'faceswap-df' / 'abc' / 'thumbnail_logreg'
    res = fit(const_detector(0.0), dl, dl, loss_fn=detector_loss(), epochs=2, lr=1e-2, device='cpu', ckpt_dir=ck,
              metrics=lambda s, l: {'auroc': roc_auc_score(l, s)}, monitor='val_auroc', mode='max', progress=False)
    saved(res.model, ck / 'final.pt')
    det = labs.run_detectors(run)
    assert len(det) == 1 and det.detector[0] == 'thumbnail_logreg' and det.train_source[0] == 'faceswap-df'
    assert det.val_auroc[0] == pytest.approx(res.best_score) and np.isnan(det.threshold[0])


def test_detect_files_gathers_faces_summaries_and_errors(media, tmp_path):
    faces, files, errors = labs.detect_files([media, tmp_path / 'missing.png'], const_detector(0.0), threshold=0.4,
                                             faces='none', every=3, device='cpu')
    assert [pathlib.Path(f).name for f in files.file] == ['clip.mp4', 'face.png']
    assert list(faces.frame) == [0, 3, -1] and (faces.verdict == 'fake').all()       # p = 0.5 >= 0.4
    assert list(files.frames) == [2, 1] and not files.calibrated.any()
    assert list(errors.file) == [str(tmp_path / 'missing.png')]
