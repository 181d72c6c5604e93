"""Tests of deepfake_course.yourdata (notebook 60a_yourdata): the user's folders and research data sets in their published
layouts -> manifest -> MTCNN face crops (cached, resumable) -> DetectionData.

Every fixture tree is built here from SynthFaces renders (`write_face_media`), which MTCNN finds, at 80 px with one or
two frames per video, so the whole file stays small."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import deepfake_course.yourdata as yd
from deepfake_course.data.manifest import SPLITS, check_no_leak, load_ffpp_dfd, tiny_image
from deepfake_course.detect.core import DetectionData
from deepfake_course.yourdata import (DATASETS, dataset_manifest, extract_face_crops, folder_pair_manifest, user_detection_data,
                                      write_face_media)

pytestmark = pytest.mark.usefixtures('one_thread')
PX = 80      # render size: MTCNN finds every SynthFaces face at this size
CROP = 32    # crop size: small and fast


def face(path, identity, donor=None, seed=0, n_frames=2):
    return write_face_media(path, identity, n_frames=n_frames, size=PX, seed=seed, donor=donor)


def both_labels_everywhere(df):
    return df.groupby('split').label.nunique().to_dict() == {s: 2 for s in SPLITS}


def crops_and_data(manifest, root, frames=1):
    crops = extract_face_crops(manifest, root, size=CROP, frames_per_video=frames, device='cpu', verbose=False)
    data = user_detection_data(crops, size=CROP)
    assert isinstance(data, DetectionData) and data.size == CROP
    assert sum(len(data[s]) for s in SPLITS) == len(crops)
    for s in SPLITS:
        assert sorted(set(data[s].df.label)) == [0, 1], s
        assert data[s].x.shape[1:] == (3, CROP, CROP)
    assert check_no_leak(crops, ('identity', 'clip_id'))
    return crops, data


# ---------------------------------------------------------------- the user's two folders
def make_pair(root):
    "real: a (image + video), b, c; fake: a (same person), d, and a file e.png directly in the folder."
    real, fake = root / 'real', root / 'fake'
    face(real / 'a' / 'a0.png', 1, seed=1); face(real / 'a' / 'talk.mp4', 1, seed=2)
    face(real / 'b' / 'b0.jpg', 2, seed=3); face(real / 'c' / 'sub' / 'c0.png', 3, seed=4)
    face(fake / 'a' / 'a_swapped.png', 1, donor=101, seed=5); face(fake / 'd' / 'd0.png', 4, donor=102, seed=6)
    face(fake / 'e.png', 5, donor=103, seed=7)
    return real, fake


def test_folder_pair_layout(tmp_path):
    real, fake = make_pair(tmp_path / 'in')
    Image.fromarray(np.full((PX, PX, 3), 128, np.uint8)).save(real / 'b' / 'wall.png')      # no face in it
    (real / '.hidden').mkdir(); face(real / '.hidden' / 'x.png', 9)                           # hidden: ignored
    m = folder_pair_manifest(real, fake, seed=0)
    assert len(m) == 8 and sorted(set(m.group)) == ['a', 'b', 'c', 'd', 'fake/e.png']
    assert m.groupby('group').identity.nunique().max() == 1
    assert dict(zip(m.group, m.identity)) == {'a': 0, 'b': 1, 'c': 2, 'd': 3, 'fake/e.png': 4}   # sorted group names
    assert m[m.group == 'a'].split.nunique() == 1 and m[m.group == 'a'].label.nunique() == 2       # same person: one split
    assert both_labels_everywhere(m)
    v = m[m.kind == 'clip'].iloc[0]
    assert v.clip_id == 'yourdata/real/a/talk' and v.label == 0 and v.source == 'real'
    assert m.split.tolist() == folder_pair_manifest(real, fake, seed=0).split.tolist()        # seeded
    crops, data = crops_and_data(m, tmp_path / 'data', frames=2)
    out = Path(crops.attrs['dir'])
    assert out.parent == tmp_path / 'data' / 'faces' / 'yourdata' and crops.attrs['name'] == f'yourdata/{out.name}'
    assert crops.attrs['no_face'] == [str(real / 'b' / 'wall.png')] and not crops.attrs['cache_hit']
    card = json.loads((out / 'card.json').read_text())
    assert card['no_face'] == crops.attrs['no_face'] and card['files'] == 8 and card['crops'] == len(crops) == 8  # video: 2 frames
    assert sum(c['real']['no_face'] for c in card['counts'].values()) == 1
    assert (crops.frame >= 0).sum() == 2 and set(crops.origin) == set(m.path) - {str(real / 'b' / 'wall.png')}
    assert all(Path(p).is_file() and Path(p).parent.parent.parent == out for p in crops.path)
    assert Image.open(crops.path[0]).size == (CROP, CROP)
    assert (out / 'manifest.csv').is_file() and not (out / 'done').exists()
    # the results table resamples `identity`: it is the group
    assert dict(zip(data.train.df.group, data.train.df.identity)) == {g: i for g, i in zip(m.group, m.identity) if g in set(data.train.df.group)}
    assert data.fake_set == crops.attrs['name'] and '8 MTCNN face crops' in data.note and 'yourdata' in data.note
    assert user_detection_data(out, size=CROP).fake_set == data.fake_set                      # from the folder too
    assert user_detection_data(crops, size=CROP, name='mine').fake_set == 'mine'


# ---------------------------------------------------------------- research data sets in their published layouts
def test_ffpp_with_a_compression_level(tmp_path):
    root = tmp_path / 'FF'
    ids = [f'{i:03d}' for i in range(6)]
    pairs = [(ids[0], ids[1]), (ids[2], ids[3]), (ids[4], ids[5])]
    for i, v in enumerate(ids): face(root / 'original_sequences/youtube/c40/videos' / f'{v}.mp4', i, seed=i)
    for k, (a, b) in enumerate(pairs): face(root / 'manipulated_sequences/Deepfakes/c40/videos' / f'{a}_{b}.mp4', int(a), donor=int(b), seed=10 + k)
    for s, pr in zip(SPLITS, pairs): (root / f'{s}.json').write_text(json.dumps([list(pr)]))
    m = dataset_manifest('ff++', root, compression='c40')
    assert len(m) == 9 and set(m.compression) == {'c40'} and both_labels_everywhere(m) and m.attrs['dataset'] == 'ff++'
    assert (m.identity >= 0).all() and set(m.group) == {f'identity {i}' for i in range(6)}
    with pytest.raises(FileNotFoundError, match=r"original_sequences/youtube/c23'"): dataset_manifest('ff++', root)
    crops, data = crops_and_data(m, tmp_path / 'data')
    assert len(crops) == 9 and set(crops.compression) == {'c40'}
    assert data.test.df.clip_id.str.startswith('ffpp/').all()


def test_ffpp_dfd(tmp_path):
    root = tmp_path / 'FF'
    videos = root / 'original_sequences/actors/c23/videos'
    fakes = root / 'manipulated_sequences/DeepFakeDetection/c23/videos'
    for a in range(1, 10): face(videos / f'{a:02d}__kitchen_talk.mp4', a, seed=a)
    fakes.mkdir(parents=True)
    reals = load_ffpp_dfd(root, seed=0)                                  # the actors' split, before any fake exists
    by = {s: sorted(reals.identity[reals.split == s]) for s in SPLITS}
    for k, s in enumerate(SPLITS): face(fakes / f'{by[s][0]:02d}_{by[s][1]:02d}__kitchen_talk__EXP{k:05d}.mp4', by[s][0], donor=by[s][1], seed=20 + k)
    face(fakes / f'{by["train"][0]:02d}_{by["val"][0]:02d}__kitchen_talk__CROSS000.mp4', by['train'][0], donor=by['val'][0], seed=30)
    with pytest.warns(UserWarning, match='join actors of two splits'):
        m = dataset_manifest('ff++-dfd', root, seed=0)
    assert len(m) == 12 and len(m.attrs['dropped']) == 1 and both_labels_everywhere(m)
    crops, data = crops_and_data(m, tmp_path / 'data')
    assert set(crops.dataset) == {'ffpp-dfd'} and 'ffpp-dfd' in data.note


def test_celebdf(tmp_path):
    root = tmp_path / 'Celeb-DF-v2'
    for k, n in enumerate(['id0_0000', 'id1_0000', 'id2_0000', 'id3_0000', 'id5_0000', 'id6_0000']): face(root / 'Celeb-real' / f'{n}.mp4', k, seed=k)
    for k, (t, s) in enumerate([(0, 1), (2, 3), (5, 6)]): face(root / 'Celeb-synthesis' / f'id{t}_id{s}_0000.mp4', t, donor=s, seed=10 + k)
    for k in range(2): face(root / 'YouTube-real' / f'{k:05d}.mp4', 20 + k, seed=20 + k)
    (root / 'List_of_testing_videos.txt').write_text('1 YouTube-real/00000.mp4\n1 Celeb-real/id5_0000.mp4\n0 Celeb-synthesis/id5_id6_0000.mp4\n')
    with pytest.warns(UserWarning, match='1 training clip'):            # id6_0000: a person of the test list
        m = dataset_manifest('celeb-df', root, seed=0)
    assert m.attrs['dropped'] == ['celebdf/Celeb-real/id6_0000'] and both_labels_everywhere(m)
    assert sorted(m.clip_id[m.split == 'test']) == ['celebdf/Celeb-real/id5_0000', 'celebdf/Celeb-synthesis/id5_id6_0000', 'celebdf/YouTube-real/00000']
    yt = m[m.source == 'celebdf-youtube-real']                           # unknown people: one bootstrap group per video
    assert (yt.identity > 6).all() and yt.identity.nunique() == 2 and set(yt.group) == set(yt.clip_id)
    crops, data = crops_and_data(m, tmp_path / 'data')
    assert len(crops) == 9


def test_dfdc(tmp_path):
    root = tmp_path / 'dfdc'
    part = root / 'dfdc_train_part_7'
    meta = {}
    for k in range(3):
        face(part / f'orig{k}.mp4', k, seed=k); face(part / f'swap{k}.mp4', k, donor=50 + k, seed=k)
        meta[f'orig{k}.mp4'] = dict(label='REAL', split='train', original=None)
        meta[f'swap{k}.mp4'] = dict(label='FAKE', split='train', original=f'orig{k}.mp4')
    (part / 'metadata.json').write_text(json.dumps(meta))
    m = dataset_manifest('dfdc', root, seed=0)
    assert len(m) == 6 and both_labels_everywhere(m) and m.groupby('group').split.nunique().max() == 1
    crops, data = crops_and_data(m, tmp_path / 'data')
    for s in SPLITS:    # the bootstrap group of a fake is its original video's
        df = data[s].df
        assert set(df.identity[df.label == 1]) == set(df.identity[df.label == 0])
    meta['swap3.mp4'] = dict(label='FAKE', split='train', original='orig0.mp4')
    (part / 'metadata.json').write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match='swap3.mp4'): dataset_manifest('dfdc', part)


def test_folder_tree(tmp_path):
    root = tmp_path / 'tree'
    for k in range(3):
        face(root / 'real' / f'r{k}.png', k, seed=k)
        face(root / 'fake' / ('gan' if k else 'swap') / f'f{k}.png', 10 + k, donor=20 + k, seed=k)
    m = dataset_manifest('folder', root, seed=0)
    assert len(m) == 6 and both_labels_everywhere(m) and m.identity.nunique() == 6 and set(m.group) == set(m.path)
    crops, data = crops_and_data(m, tmp_path / 'data')
    assert set(crops.source) == {'real', 'gan', 'swap'}


# ---------------------------------------------------------------- resume and cache
def test_interrupted_extraction_resumes_and_a_complete_one_is_reused(tmp_path, monkeypatch, capsys):
    real, fake = make_pair(tmp_path / 'in')
    m = folder_pair_manifest(real, fake, seed=0)
    reads, real_read = [], yd.read_frames

    def flaky(path, *a, **kw):
        if len(reads) == 3: raise KeyboardInterrupt('interrupted')    # the fourth file: as if the user pressed Ctrl-C
        out = real_read(path, *a, **kw); reads.append(str(path)); return out
    monkeypatch.setattr(yd, 'read_frames', flaky)
    with pytest.raises(KeyboardInterrupt): extract_face_crops(m, tmp_path / 'data', size=CROP, frames_per_video=1, device='cpu')
    done = list((tmp_path / 'data' / 'faces' / 'yourdata').glob('*/done/*.json'))
    assert len(done) == 3 and not list((tmp_path / 'data' / 'faces' / 'yourdata').glob('*/manifest.csv'))

    def counted(path, *a, **kw):
        out = real_read(path, *a, **kw); reads.append(str(path)); return out
    monkeypatch.setattr(yd, 'read_frames', counted)
    crops = extract_face_crops(m, tmp_path / 'data', size=CROP, frames_per_video=1, device='cpu')
    assert 'resuming, 3 of 7 files were done' in capsys.readouterr().out
    assert sorted(reads) == sorted(m.path) and len(reads) == len(set(reads)) == 7          # every file read once, in all
    assert len(crops) == 7 and set(crops.origin) == set(m.path)

    def never(path, *a, **kw): raise AssertionError(f'{path} read again')
    monkeypatch.setattr(yd, 'read_frames', never)
    again = extract_face_crops(m, tmp_path / 'data', size=CROP, frames_per_video=1, device='cpu')
    assert 'found, reused (7 crops of 7 files' in capsys.readouterr().out
    assert again.attrs['cache_hit'] and again.path.tolist() == crops.path.tolist() and again.attrs['no_face'] == []
    pd.testing.assert_frame_equal(again, crops)
    # an uninterrupted run elsewhere gives the same crops
    monkeypatch.setattr(yd, 'read_frames', real_read)
    fresh = extract_face_crops(m, tmp_path / 'other', size=CROP, frames_per_video=1, device='cpu', verbose=False)
    assert all(np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))) for a, b in zip(fresh.path, crops.path))


# ---------------------------------------------------------------- bad input: clear errors
def test_folder_pair_errors(tmp_path):
    real, fake = make_pair(tmp_path / 'in')
    with pytest.raises(FileNotFoundError, match=r"real_dir '.*nowhere' does not exist"): folder_pair_manifest(tmp_path / 'nowhere', fake)
    with pytest.raises(FileNotFoundError, match=r"fake_dir '.*nowhere' does not exist"): folder_pair_manifest(real, tmp_path / 'nowhere')
    with pytest.raises(ValueError, match=r"fake_dir '.*e.png' is a file, not a folder"): folder_pair_manifest(real, fake / 'e.png')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match=r"real_dir '.*empty' holds no images or videos .*; it is empty"): folder_pair_manifest(tmp_path / 'empty', fake)
    (tmp_path / 'empty' / 'notes.txt').write_text('x')
    with pytest.raises(FileNotFoundError, match=r"holds no images or videos .*; it holds notes.txt"): folder_pair_manifest(real, tmp_path / 'empty')
    # too few groups: the message says how many are needed and what the folder holds
    two = tmp_path / 'two'
    for g in 'xy': tiny_image(two / g / 'f.png', 16)
    with pytest.raises(ValueError, match=r"needs at least 3 groups with real faces and 3 with fakes \(one per split: train, val, test\); "
                                         r"real_dir '.*two' holds 2: x, y\."):
        folder_pair_manifest(two, fake)
    with pytest.raises(ValueError, match=r"fake_dir '.*two' holds 2: x, y"): folder_pair_manifest(real, two)
    tiny_image(two / 'z.png', 16)                                          # a file in the folder: a third group
    assert folder_pair_manifest(two, fake).groupby('label').group.nunique().to_dict() == {0: 3, 1: 3}
    # without a test split, two of each are enough
    two_fake = tmp_path / 'two_fake'
    for g in 'xy': tiny_image(two_fake / g / 'f.png', 16, seed=1)
    m = folder_pair_manifest(two, two_fake, fractions=(0.5, 0.5, 0.0))
    assert m.groupby('split').label.nunique().to_dict() == {'train': 2, 'val': 2}
    with pytest.raises(ValueError, match=r'needs at least 2 groups .* \(one per split: train, val\); real_dir .* holds 1: real/f.png'):
        folder_pair_manifest(two / 'x', two_fake, fractions=(0.5, 0.5, 0.0))
    with pytest.raises(ValueError, match=r"real_dir '.*in/real' and fake_dir '.*in/real/a' overlap"): folder_pair_manifest(real, real / 'a')
    with pytest.raises(ValueError, match='fractions must be'): folder_pair_manifest(real, fake, fractions=(0.5, 0.5, 0.5))


def test_dataset_errors(tmp_path):
    for bad in ('faceforensics', 'celebdf', ''):
        with pytest.raises(ValueError, match=r"unknown dataset .*: use one of ff\+\+, ff\+\+-dfd, celeb-df, dfdc, folder"): dataset_manifest(bad, tmp_path)
    assert dataset_manifest.__module__ == 'deepfake_course.yourdata' and DATASETS == ('ff++', 'ff++-dfd', 'celeb-df', 'dfdc', 'folder')
    with pytest.raises(FileNotFoundError, match=r"the dfdc data set root '.*nowhere' does not exist"): dataset_manifest('dfdc', tmp_path / 'nowhere')
    with pytest.raises(FileNotFoundError, match=r"real/fake folder tree .*: expected the folder '.*/real'"): dataset_manifest('folder', tmp_path)
    # a folder tree whose own split leaves val without fakes
    for s in SPLITS:
        tiny_image(tmp_path / 'tree' / s / 'real' / 'r.png', 16)
        if s != 'val': tiny_image(tmp_path / 'tree' / s / 'fake' / 'f.png', 16)
    (tmp_path / 'tree' / 'val' / 'fake').mkdir()
    with pytest.raises(ValueError, match=r"every split needs real and fake files .*but val holds 1 real and 0 fake file\(s\)"):
        dataset_manifest('folder', tmp_path / 'tree')


def test_a_split_without_fake_faces_is_an_error(tmp_path):
    real, fake = tmp_path / 'real', tmp_path / 'fake'
    for g in range(3):
        face(real / f'p{g}' / 'x.png', g, seed=g)
        (fake / f'p{g}').mkdir(parents=True)
        Image.fromarray(np.full((PX, PX, 3), 90 + g, np.uint8)).save(fake / f'p{g}' / 'x.png')   # a grey wall: no face
    m = folder_pair_manifest(real, fake)
    with pytest.raises(ValueError, match=r"train has no fake crop \(1 fake file\(s\), 1 without a face\).*lower min_prob"):
        extract_face_crops(m, tmp_path / 'data', size=CROP, device='cpu', verbose=False)
    assert not list((tmp_path / 'data').rglob('manifest.csv'))            # not a complete folder: never reused
    with pytest.raises(ValueError, match='frames_per_video must be >= 1'): extract_face_crops(m, tmp_path / 'data', frames_per_video=0)
    with pytest.raises(FileNotFoundError, match=r"1 file\(s\) of the manifest are missing"):
        extract_face_crops(pd.concat([m, m.iloc[:1].assign(path=str(tmp_path / 'gone.png'))]), tmp_path / 'data')


# ---- the main job on the user's folders (bench.main_job with real_dir/fake_dir, as `deepfake-course run --real-dir --fake-dir`) ----

def test_main_job_runs_on_your_folders_and_detect_uses_its_calibration(tmp_path, capsys):
    from deepfake_course import bench
    from deepfake_course.cli import main as cli
    from deepfake_course.yourdata import demo_folder_pair
    real, fake = demo_folder_pair(tmp_path / 'mine', n_groups=10, images_per_group=2, videos_per_group=1, n_frames=2, size=PX)
    kw = dict(quick=True, data_root=tmp_path / 'd', device='cpu', verbose=False, log=lambda *a: None, real_dir=real, fake_dir=fake,
              size=32, detectors=['meso4'], det_epochs=1, det_batch=8, n_boot=20, jpeg=[50], blur=[1.0], resize=[0.5], noise=[4.0])
    report = bench.main_job(**kw)
    run = report.parent
    m = json.loads((run / 'metrics.json').read_text())
    assert list(m['fake_set']) == ['yours'] and m['fake_set']['yours'].startswith('yourdata/')
    assert set(m['fake_quality']['yours']) >= {'mtcnn_rate_fake', 'mtcnn_rate_real'} and m['fake_quality']['yours']['identity_transfer'] is None
    assert {r['setting'] for r in m['table']} >= {'in-distribution', 'robustness'} and m['test_identities'] >= 1
    assert [d['detector'] for d in m['detectors']] == ['meso4'] and 0 < m['detectors'][0]['threshold'] < 1
    assert 'Your data' in report.read_text() and (run / 'report.html').is_file()
    # a second call reuses every stage; another data spec in the same named folder is refused
    assert bench.main_job(**kw) == report
    assert json.loads((run / 'stages' / 'detectors_yours.json').read_text())['seconds'] == m['info']['stages']['detectors_yours']
    # `deepfake-course detect --run` scores a file with this run's detector and its validation threshold
    capsys.readouterr()
    assert cli(['detect', str(next((real / 'person00').glob('*.png'))), '--run', str(run), '--device', 'cpu', '--json']) == 0
    out = json.loads(capsys.readouterr().out)
    assert out['detector']['calibrated'] is True and out['detector']['threshold'] == m['detectors'][0]['threshold']
    assert len(out['files']) == 1 and not out['errors'] and out['faces'][0]['verdict'] in ('real', 'fake')


def test_main_job_on_missing_or_too_small_folders_says_what_is_wrong(tmp_path):
    from deepfake_course import bench
    from deepfake_course.yourdata import demo_folder_pair
    kw = dict(quick=True, data_root=tmp_path / 'd', device='cpu', verbose=False, log=lambda *a: None)
    with pytest.raises(FileNotFoundError, match='nowhere'):
        bench.main_job(real_dir=tmp_path / 'nowhere', fake_dir=tmp_path / 'nowhere2', **kw)
    real, fake = demo_folder_pair(tmp_path / 'two', n_groups=2, images_per_group=1, videos_per_group=0, size=PX)
    with pytest.raises(ValueError, match='at least 3 groups'):
        bench.main_job(real_dir=real, fake_dir=fake, **kw)
    real, fake = demo_folder_pair(tmp_path / 'four', n_groups=4, images_per_group=1, videos_per_group=0, size=PX)
    with pytest.raises(ValueError, match='test split needs at least 2'):   # one test group: no interval can resample it
        bench.main_job(real_dir=real, fake_dir=fake, size=32, **kw)
