"""Unit tests of deepfake_course.data.manifest and deepfake_course.data.datasets (notebooks 11_datasets, 11a_facedatasets).

Every real-data loader runs on a tiny fixture tree built here, in the data set's official layout."""
import json, os, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from deepfake_course.core import write_mp4
from deepfake_course.data import manifest as manifest_module
from deepfake_course.data.audio import N_MELS
from deepfake_course.data.manifest import (MANIFEST_COLUMNS, SPLITS, LeakError, ManifestError, assign_splits, check_no_leak,
                                           concat_manifests, load_celeba, load_celebdf, load_dfdc, load_ffhq, load_ffpp, load_ffpp_dfd,
                                           load_folder_tree, load_lrw, make_manifest, read_manifest, split_groups, split_summary, tiny_image,
                                           tiny_video, validate_manifest, write_manifest)
from deepfake_course.data.datasets import ClipDataset, FaceDataset, make_real_samples, real_samples
from deepfake_course.media import BadFileError, check_image, check_video, load_image, read_video, video_info


def row(path, label=0, split='train', **kw):
    return dict(path=str(path), label=label, source=kw.pop('source', 'fx'), split=split, **kw)


def truncate(p: Path, keep: float = 0.5):
    data = p.read_bytes(); p.write_bytes(data[:int(len(data) * keep)])


# ---------------------------------------------------------------- schema, read, write
def test_schema_errors_name_the_problem():
    df = make_manifest([row('a.png'), row('b.png', 1, 'test')])
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    with pytest.raises(ManifestError, match='lacks the column.s. source'): validate_manifest(df.drop(columns=['source']))
    with pytest.raises(ManifestError, match=r"label must be 0 \(real\) or 1 \(fake\); got \['3'\] at row 1 \(b.png\)"):
        validate_manifest(df.assign(label=[0, 3]))
    with pytest.raises(ManifestError, match="split must be one of train, val, test"): validate_manifest(df.assign(split=['train', 'testing']))
    with pytest.raises(ManifestError, match="kind must be"): validate_manifest(df.assign(kind=['image', 'video']))
    with pytest.raises(ManifestError, match="'frame' must hold integers"): validate_manifest(df.assign(frame=[-1, 0.5]))
    with pytest.raises(ManifestError, match="clip_id must be unique"):
        make_manifest([row('a.npz', kind='clip', clip_id='x'), row('b.npz', kind='clip', clip_id='x')])
    with pytest.raises(TypeError): validate_manifest([1, 2])


def test_write_read_roundtrip_relative_and_atomic(tmp_path):
    (tmp_path / 'img').mkdir()
    for n in 'ab': tiny_image(tmp_path / 'img' / f'{n}.png')
    df = make_manifest([row(tmp_path / 'img/a.png', extra='x'), row(tmp_path / 'img/b.png', 1, extra='')])
    out = write_manifest(df, tmp_path)
    text = out.read_text()
    assert 'img/a.png' in text and str(tmp_path) not in text          # stored relative
    assert sorted(p.name for p in tmp_path.iterdir()) == ['img', 'manifest.csv']  # no temporary file left
    back = read_manifest(tmp_path, check_exists=True)
    assert back.path.tolist() == [str(tmp_path / 'img/a.png'), str(tmp_path / 'img/b.png')]
    assert back.extra.tolist() == ['x', ''] and back.clip_id.tolist() == ['', '']
    # moving the manifest elsewhere keeps the files reachable
    write_manifest(back, tmp_path / 'sub' / 'deeper')
    assert read_manifest(tmp_path / 'sub' / 'deeper' / 'manifest.csv', check_exists=True).path.tolist() == back.path.tolist()
    (tmp_path / 'img/b.png').unlink()
    with pytest.raises(FileNotFoundError, match='1 listed file.s. are missing'): read_manifest(tmp_path, check_exists=True)
    with pytest.raises(FileNotFoundError, match='holds no manifest.csv'): read_manifest(tmp_path / 'img')
    (tmp_path / 'broken.csv').write_text('path,label\n"a.png,0\n')
    with pytest.raises(ManifestError): read_manifest(tmp_path / 'broken.csv')


def test_concat_keeps_free_columns_and_unique_clips(tmp_path):
    a = make_manifest([row('a.png', dataset='x')])
    b = make_manifest([row('b.mp4', 1, kind='clip', clip_id='c1')])
    both = concat_manifests([a, b])
    assert len(both) == 2 and both.dataset.tolist() == ['x', '']
    with pytest.raises(ManifestError, match='c1'): concat_manifests([b, b])
    write_manifest(a, tmp_path)
    assert len(concat_manifests([tmp_path, b])) == 2


# ---------------------------------------------------------------- splits and leaks
def toy(n_ids=10, per=5):
    rows = [row(f'{i}_{k}.png', identity=i) for i in range(n_ids) for k in range(per)]
    rows += [row(f'f{i}.png', 1, identity=i, target_identity=(i + 1) % n_ids) for i in range(0, n_ids, 2)]
    return make_manifest(rows)


def test_split_by_identity_keeps_pairs_together_and_is_seeded():
    df = toy()
    g = split_groups(df, 'identity')
    assert g.nunique() == 5                              # fakes tie (0,1), (2,3), ...
    s = assign_splits(df, 'identity', seed=3)
    assert check_no_leak(s, 'identity') is True
    assert set(s.split) == set(SPLITS)
    assert s.split.tolist() == assign_splits(df, 'identity', seed=3).split.tolist()
    assert any(assign_splits(df, 'identity', seed=k).split.tolist() != s.split.tolist() for k in range(4, 10))
    with pytest.raises(ValueError, match='summing to 1'): assign_splits(df, fractions=(0.8, 0.3, 0.1))
    with pytest.raises(ValueError, match='cannot split 1 group'): assign_splits(df[df.identity <= 1].reset_index(drop=True))


def test_split_cover_gives_every_split_both_labels():
    sides = make_manifest([row(f'{lab}{i}.png', int(lab == 'f'), identity=i + 10 * (lab == 'f')) for lab in 'rf' for i in range(3)]
                          + [row('s.png', 0, identity=20), row('s2.png', 1, identity=20), row('x.png', 0, identity=30)])
    for seed in range(10):
        df = assign_splits(sides, 'identity', seed=seed, cover='label')
        assert df.groupby('split').label.nunique().to_dict() == {'test': 2, 'train': 2, 'val': 2}
        assert check_no_leak(df, 'identity')
    # without cover a split can miss one label; with cover=None the split is exactly the old one
    assert any(assign_splits(sides, 'identity', seed=s).groupby('split').label.nunique().min() < 2 for s in range(10))
    toy = make_manifest([row(f'{i}_{k}.png', identity=i) for i in range(7) for k in range(i + 1)])
    assert assign_splits(toy, seed=4).split.tolist() == assign_splits(toy, seed=4, cover=None).split.tolist()
    # the minimum: as many groups holding each label as splits (a group holding both counts for both)
    few = sides[~sides.path.isin(['r0.png', 'r1.png', 'x.png'])]          # real: r2 and the shared group 20
    with pytest.raises(ValueError, match=r"needs at least 3 groups holding each value \(one per split\); 2 group\(s\) hold label=0"):
        assign_splits(few, 'identity', cover='label')
    assert set(assign_splits(few, 'identity', fractions=(0.5, 0.5, 0), cover='label').split) == {'train', 'val'}
    with pytest.raises(ValueError, match="cannot cover 'kind'"): assign_splits(sides.drop(columns='kind'), cover='kind')


def test_split_fractions_by_clip_are_close():
    df = make_manifest([row(f'c{c}_{f}.png', identity=c % 7, clip_id=f'c{c}', frame=f) for c in range(100) for f in range(3)])
    s = assign_splits(df, 'clip_id', fractions=(0.6, 0.2, 0.2), seed=0)
    share = s.split.value_counts(normalize=True)
    assert abs(share['train'] - 0.6) < 0.03 and abs(share['val'] - 0.2) < 0.03
    assert check_no_leak(s, 'clip_id')
    with pytest.raises(LeakError, match='identities in more than one split'): check_no_leak(s, 'identity')


def test_leak_check_names_leaking_groups():
    df = toy(4, 3)
    leaky = df.assign(split=(['train', 'test'] * len(df))[:len(df)])
    with pytest.raises(LeakError) as e: check_no_leak(leaky, 'identity')
    assert '0 (test, train)' in str(e.value)
    clips = make_manifest([row(f'{f}.png', clip_id='clipA', frame=f, split=s) for f, s in enumerate(['train', 'val'])])
    with pytest.raises(LeakError, match=r'clipA \(train, val\)'): check_no_leak(clips, 'clip_id')
    # identities of different datasets are different people
    assert check_no_leak(df.assign(dataset=['a'] * 12 + ['b'] * 2, split=['train'] * 12 + ['test'] * 2), 'identity')
    summ = split_summary(assign_splits(toy(), seed=0))
    assert summ.rows.sum() == len(toy()) and list(summ.columns) == ['rows', 'real', 'fake', 'identities', 'clips']


def test_leak_check_counts_target_identity_and_every_pair_of_splits():
    # a test fake whose target (identity 3) is a training person
    swap = make_manifest([row('r3.png', identity=3), row('f.png', 1, 'test', identity=8, target_identity=3)])
    with pytest.raises(LeakError, match=r'1 identity in more than one split: 3 \(test, train\)'): check_no_leak(swap, 'identity')
    # only val and test share a person (a fake's target): caught too, and so is train/val
    vt = make_manifest([row('a.png', identity=1), row('b.png', split='val', identity=2), row('c.png', 1, 'test', identity=9, target_identity=2)])
    with pytest.raises(LeakError, match=r'1 identity in more than one split: 2 \(test, val\)'): check_no_leak(vt, 'identity')
    with pytest.raises(LeakError, match=r'1 identity in more than one split: 1 \(train, val\)'): check_no_leak(vt.assign(identity=[1, 1, 9]), 'identity')
    # several keys at once, with what was checked first in the message
    with pytest.raises(LeakError, match=r'^here: 1 identity'): check_no_leak(vt, ('clip_id', 'identity'), where='here')
    assert check_no_leak(vt.assign(split=['train', 'test', 'test']), ('identity', 'clip_id'))
    with pytest.raises(ValueError, match="no column 'id_split'"): check_no_leak(vt, column='id_split')


# ---------------------------------------------------------------- files and video
def test_video_roundtrip_and_truncation(tmp_path):
    p = tiny_video(tmp_path / 'v.mp4', n_frames=7, size=32)
    info = check_video(p)
    assert info['frames'] == 7 and info['has_audio'] and info['fps'] == 25
    frames, fps, wav = read_video(p)
    assert frames.shape == (7, 32, 32, 3) and frames.dtype == np.uint8 and wav.dtype == np.float32
    assert abs(len(wav) - 7 * 640) < 2048
    assert video_info(p)['n_frames'] == 7 and read_video(p, start=5)[0].shape[0] == 2
    truncate(p)
    with pytest.raises(BadFileError, match='v.mp4'): check_video(p)
    (tmp_path / 'x.mp4').write_bytes(b'\x00' * 100)
    with pytest.raises(BadFileError, match='x.mp4'): read_video(tmp_path / 'x.mp4')
    with pytest.raises(ValueError, match='T×H×W×3'): write_mp4(tmp_path / 'y.mp4', np.zeros((2, 8, 8), np.uint8))
    # float T×3×H×W tensors are accepted
    write_mp4(tmp_path / 't.mp4', torch.rand(3, 3, 16, 16))
    assert read_video(tmp_path / 't.mp4', audio=False)[0].shape == (3, 16, 16, 3)


def test_check_image_finds_truncated_files(tmp_path):
    for fmt in ['png', 'jpg']:
        p = tiny_image(tmp_path / f'a.{fmt}', 64)
        assert check_image(p) == (64, 64)
        truncate(p, 0.6)
        with pytest.raises(BadFileError, match=f'a.{fmt}'): check_image(p)


# ---------------------------------------------------------------- FaceDataset
def test_face_dataset_converts_every_mode(tmp_path):
    paths = [tiny_image(tmp_path / 'rgb.png', 20), tiny_image(tmp_path / 'l.png', 16, 'L'), tiny_image(tmp_path / 'rgba.png', 16, 'RGBA'),
             tiny_image(tmp_path / 'i16.png', 16, 'I;16'), tiny_image(tmp_path / 'p.png', 16, 'P'), tiny_image(tmp_path / 'cmyk.jpg', 16, 'CMYK'),
             tiny_image(tmp_path / 'bw.png', 16, '1'), tiny_image(tmp_path / 'la.png', 16, 'LA')]
    with Image.open(tmp_path / 'i16.png') as im: assert im.mode.startswith('I;16')
    df = make_manifest([row(p, i % 2, 'train' if i < 6 else 'test') for i, p in enumerate(paths)])
    ds = FaceDataset(df, size=12)
    assert len(ds) == 8 and list(ds.df.columns[:9]) == list(MANIFEST_COLUMNS)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 12, 12) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and y == i % 2
    a16 = np.asarray(Image.open(tmp_path / 'i16.png')).astype(np.float64) / 65535
    np.testing.assert_allclose(load_image(tmp_path / 'i16.png')[1].numpy(), a16, atol=1e-6)
    g = load_image(tmp_path / 'l.png'); assert torch.equal(g[0], g[1])
    rgba = np.asarray(Image.open(tmp_path / 'rgba.png')).astype(np.float32) / 255
    np.testing.assert_allclose(load_image(tmp_path / 'rgba.png').permute(1, 2, 0).numpy(), rgba[..., :3] * rgba[..., 3:], atol=1e-6)
    assert len(FaceDataset(df, split='test')) == 2 and len(FaceDataset(df, split=['train', 'test'])) == 8
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert xb.shape == (8, 3, 12, 12) and yb.tolist() == [0, 1] * 4
    assert torch.equal(FaceDataset(df, transform=lambda x: x * 0)[0][0], torch.zeros(3, 20, 20))
    with pytest.raises(ValueError, match="no image rows in split 'val'"): FaceDataset(df, split='val')
    with pytest.raises(ValueError, match='split must be train, val or test'): FaceDataset(df, split='dev')


def test_face_dataset_exif_orientation_and_bad_file(tmp_path):
    im = Image.fromarray(np.zeros((10, 20, 3), np.uint8))
    ex = im.getexif(); ex[0x0112] = 6   # rotate 90° on display
    im.save(tmp_path / 'rot.jpg', exif=ex)
    assert load_image(tmp_path / 'rot.jpg').shape == (3, 20, 10)
    p = tiny_image(tmp_path / 'cut.png', 64); truncate(p)
    ds = FaceDataset(make_manifest([row(p)]))
    with pytest.raises(BadFileError, match='cut.png'): ds[0]


def test_face_and_clip_datasets_refuse_leaky_manifests(tmp_path):
    a, b = tiny_image(tmp_path / 'a.png'), tiny_image(tmp_path / 'b.png', seed=1)
    leaky = make_manifest([row(a, identity=4), row(b, 1, 'test', identity=6, target_identity=4)])
    for split in (None, 'train', 'test'):     # every split is checked before one is chosen
        with pytest.raises(LeakError, match=r'FaceDataset on a DataFrame: 1 identity in more than one split: 4 \(test, train\)'):
            FaceDataset(leaky, split=split)
    write_manifest(leaky, tmp_path / 'm')
    with pytest.raises(LeakError, match=r'FaceDataset on .*m: 1 identity'): FaceDataset(tmp_path / 'm')
    # a person split over two manifests (the real one in one, the fake in the other) is found too
    with pytest.raises(LeakError, match=r'4 \(test, train\)'): FaceDataset([leaky.iloc[:1], leaky.iloc[1:]], split='train')
    assert len(FaceDataset(leaky.assign(split='test'), split='test')) == 2
    v = tiny_video(tmp_path / 'v.mp4', n_frames=3, size=16, audio=False)
    clips = make_manifest([row(v, split='val', kind='clip', clip_id='v', identity=2),
                           row(v, 1, 'test', kind='clip', clip_id='w', identity=5, target_identity=2)])
    with pytest.raises(LeakError, match=r'ClipDataset on a DataFrame: 1 identity in more than one split: 2 \(test, val\)'):
        ClipDataset(clips, split='val')
    frame_leak = make_manifest([row(v, kind='clip', clip_id='v'), row(a, split='test', clip_id='v', frame=0)])
    with pytest.raises(LeakError, match=r'1 clip_id group\(s\) in more than one split: v \(test, train\)'): ClipDataset(frame_leak, split='train')


# ---------------------------------------------------------------- ClipDataset
def test_clip_dataset_npz_and_video(tmp_path):
    T = 12
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 16)[None, :, None, None] * np.array([200, 120, 60])      # smooth frames H.264 keeps well
    frames = (ramp + 40 * np.arange(T)[:, None, None, None] / T).clip(0, 255).astype(np.uint8).repeat(16, 2)
    frames = np.ascontiguousarray(frames.transpose(0, 2, 1, 3))
    np.savez(tmp_path / 'a.npz', frames=frames, mel=np.arange(80 * 4 * T, dtype=np.float32).reshape(80, 4 * T), fps=25)
    tiny_video(tmp_path / 'b.mp4', n_frames=T, size=16)
    tiny_video(tmp_path / 'c.mp4', n_frames=T, size=16, audio=False)
    tiny_video(tmp_path / 'd.mp4', n_frames=3, size=16, seed=5)
    df = make_manifest([row(tmp_path / f, int(f == 'b.mp4'), kind='clip', clip_id=f) for f in ['a.npz', 'b.mp4', 'c.mp4', 'd.mp4']])
    ds = ClipDataset(df, n_frames=5, size=8, start='center')
    it = ds[0]
    assert it['frames'].shape == (5, 3, 8, 8) and it['mel'].shape == (N_MELS, 20) and it['has_audio']
    assert torch.equal(it['mel'][0], torch.arange(4 * 3, 4 * 3 + 20, dtype=torch.float32))   # frames 3..7 -> mel columns 12..31
    raw = ClipDataset(df.iloc[:1], n_frames=5, start='center')[0]['frames']
    assert torch.equal(raw, torch.from_numpy(frames[3:8]).permute(0, 3, 1, 2).float() / 255)
    b = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert b['frames'].shape == (4, 5, 3, 8, 8) and b['mel'].shape == (4, N_MELS, 20)
    assert b['has_audio'].tolist() == [True, True, False, True] and b['label'].tolist() == [0, 1, 0, 0]
    short = ClipDataset(df.iloc[3:], n_frames=5)[0]['frames']       # 3-frame clip padded by its last frame
    assert torch.equal(short[2], short[4])
    with pytest.raises(BadFileError, match='c.mp4: the clip has no sound'): ClipDataset(df.iloc[2:3], n_frames=2, audio=True)[0]
    assert ClipDataset(df, n_frames=2, audio=False)[1]['mel'].shape == (N_MELS, 0)
    r1 = ClipDataset(df.iloc[:1], n_frames=3, start='random', seed=1); r2 = ClipDataset(df.iloc[:1], n_frames=3, start='random', seed=1)
    assert torch.equal(r1[0]['frames'], r2[0]['frames'])
    with pytest.raises(ValueError, match='no clip rows'): ClipDataset(make_manifest([row(tmp_path / 'x.png')]))
    with pytest.raises(ValueError, match="start must be"): ClipDataset(df, start='middle')


def test_mp4_sound_stays_in_sync(tmp_path):
    "AAC priming is dropped: sound read from an mp4 lines up with the frames, and its mel with the npz mel."
    from deepfake_course.data.audio import log_mel
    sr, T = 16000, 25
    rng = np.random.default_rng(0)
    wav = np.zeros(sr, np.float32); wav[6000:12000] = 0.5 * np.sin(2 * np.pi * 300 * np.arange(6000) / sr) * rng.uniform(0.5, 1, 6000)
    ramp = np.linspace(0, 1, 16)[None, :, None, None] * np.array([200, 120, 60])      # smooth frames H.264 keeps well
    frames = (ramp + 40 * np.arange(T)[:, None, None, None] / T).clip(0, 255).astype(np.uint8).repeat(16, 2)
    frames = np.ascontiguousarray(frames.transpose(0, 2, 1, 3))
    write_mp4(tmp_path / 'c.mp4', frames, audio=wav)
    back = read_video(tmp_path / 'c.mp4')[2]
    assert abs(int(np.argmax(np.abs(back) > 0.1)) - int(np.argmax(np.abs(wav) > 0.1))) < 80
    np.savez(tmp_path / 'c.npz', frames=frames, audio=(wav * 32767).astype(np.int16), mel=log_mel(wav).numpy(), fps=25)
    df = make_manifest([row(tmp_path / 'c.npz', kind='clip', clip_id='c')])
    a, v = ClipDataset(df, n_frames=10, start='center')[0], ClipDataset(df, n_frames=10, start='center', prefer='video')[0]
    assert a['mel'].shape == v['mel'].shape == (N_MELS, 40)
    assert np.corrcoef(a['mel'].flatten(), v['mel'].flatten())[0, 1] > 0.95
    assert (a['frames'] - v['frames']).abs().mean() < 0.02
    with pytest.raises(ValueError, match="prefer must be"): ClipDataset(df, prefer='mp4')


# ---------------------------------------------------------------- real-data loaders
def test_folder_tree(tmp_path):
    root = tmp_path / 'tree'
    for i in range(6):
        tiny_image(root / 'real' / f'{i}.png', seed=i)
        tiny_image(root / 'fake' / 'gan' / f'{i}.jpg', seed=10 + i)
    tiny_video(root / 'fake' / 'swap' / 'v.mp4', size=16)
    df = load_folder_tree(root, seed=0)
    assert len(df) == 13 and int(df.label.sum()) == 7 and set(df.source) == {'real', 'gan', 'swap'}
    assert set(df.split) <= set(SPLITS) and df.attrs['n_bad'] == 0
    assert df.loc[df.kind == 'clip', 'clip_id'].tolist() == ['tree/fake/swap/v']
    # an already split tree keeps its split
    sp = tmp_path / 'split'
    for s in SPLITS:
        for lab in ('real', 'fake'): tiny_image(sp / s / lab / 'x.png')
    d2 = load_folder_tree(sp)
    assert sorted(d2.split) == sorted(list(SPLITS) * 2)
    (root / 'fake').rename(root / 'fakes')
    with pytest.raises(FileNotFoundError, match=r"expected the folder '.*tree/fake'; found 'fakes': rename it to 'fake'"): load_folder_tree(root)


def test_folder_tree_bad_files_error_or_skip(tmp_path):
    root = tmp_path / 't'
    for i in range(3): tiny_image(root / 'real' / f'{i}.png', 32, seed=i); tiny_image(root / 'fake' / f'{i}.jpg', 32, seed=i)
    truncate(root / 'real' / '1.png'); (root / 'fake' / '2.jpg').write_bytes(b'garbage')
    with pytest.raises(BadFileError, match=r'1\.png'): load_folder_tree(root)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        df = load_folder_tree(root, skip_bad=True)
    assert df.attrs['n_bad'] == 2 and len(df) == 4 and any('skipped 2 bad file' in str(x.message) for x in w)
    assert len(load_folder_tree(root, verify=False)) == 6


def make_celeba(root, n=9, kaggle=False):
    img = root / 'img_align_celeba' / ('img_align_celeba' if kaggle else '')
    for i in range(1, n + 1): tiny_image(img / f'{i:06d}.jpg', seed=i)
    if kaggle:
        (root / 'list_eval_partition.csv').write_text('image_id,partition\n' + ''.join(f'{i:06d}.jpg,{(i - 1) * 3 // n}\n' for i in range(1, n + 1)))
    else:
        (root / 'Eval').mkdir(parents=True)
        (root / 'Eval' / 'list_eval_partition.txt').write_text(''.join(f'{i:06d}.jpg {(i - 1) * 3 // n}\n' for i in range(1, n + 1)))
        (root / 'Anno').mkdir()
        (root / 'Anno' / 'identity_CelebA.txt').write_text(''.join(f'{i:06d}.jpg {(i - 1) // 3 + 10}\n' for i in range(1, n + 1)))


def test_celeba(tmp_path):
    make_celeba(tmp_path / 'c')
    df = load_celeba(tmp_path / 'c')
    assert len(df) == 9 and set(df.split) == set(SPLITS) and set(df.identity) == {10, 11, 12} and (df.label == 0).all()
    assert check_no_leak(df, 'identity')
    make_celeba(tmp_path / 'k', kaggle=True)
    assert len(load_celeba(tmp_path / 'k')) == 9
    truncate(tmp_path / 'c' / 'img_align_celeba' / '000004.jpg', 0.3)
    with pytest.raises(BadFileError, match='000004.jpg'): load_celeba(tmp_path / 'c')
    assert load_celeba(tmp_path / 'c', skip_bad=True).attrs['n_bad'] == 1
    (tmp_path / 'c' / 'img_align_celeba' / '000005.jpg').unlink()
    with pytest.raises(FileNotFoundError, match='000005.jpg'): load_celeba(tmp_path / 'c')
    assert load_celeba(tmp_path / 'c', skip_bad=True).attrs['n_bad'] == 2
    (tmp_path / 'c' / 'img_align_celeba').rename(tmp_path / 'c' / 'images')
    with pytest.raises(FileNotFoundError, match="expected the folder '.*img_align_celeba'"): load_celeba(tmp_path / 'c')
    (tmp_path / 'k' / 'list_eval_partition.csv').unlink()
    with pytest.raises(FileNotFoundError, match='list_eval_partition.txt'): load_celeba(tmp_path / 'k')


def test_ffhq(tmp_path):
    for i in [0, 1, 1500, 60000]: tiny_image(tmp_path / 'f' / 'images1024x1024' / f'{i // 1000 * 1000:05d}' / f'{i:05d}.png', seed=i)
    df = load_ffhq(tmp_path / 'f')
    assert df.split.tolist() == ['train', 'train', 'train', 'val'] and (df.source == 'ffhq').all()
    with pytest.raises(FileNotFoundError, match='thumbnails128x128'): load_ffhq(tmp_path / 'f', folder='thumbnails128x128')
    with pytest.raises(FileNotFoundError, match="thumbnails128x128 or images1024x1024"): load_ffhq(tmp_path)


def make_ffpp(root, methods=('Deepfakes', 'FaceSwap'), c='c23'):
    pairs = {'train': [['000', '001'], ['002', '003']], 'val': [['004', '005']], 'test': [['006', '007']]}
    for s, pr in pairs.items():
        (root / 'splits').mkdir(parents=True, exist_ok=True); (root / 'splits' / f'{s}.json').write_text(json.dumps(pr))
        for a, b in pr:
            for v in (a, b): tiny_video(root / 'original_sequences/youtube' / c / 'videos' / f'{v}.mp4', n_frames=3, size=16, audio=False)
            for m in methods:
                for t, src in ((a, b), (b, a)): tiny_video(root / 'manipulated_sequences' / m / c / 'videos' / f'{t}_{src}.mp4', n_frames=3, size=16, audio=False)


def test_ffpp(tmp_path):
    root = tmp_path / 'FF'
    make_ffpp(root)
    df = load_ffpp(root)
    assert len(df) == 8 + 2 * 8 and int(df.label.sum()) == 16 and (df.kind == 'clip').all()
    assert check_no_leak(df, 'identity') and check_no_leak(df, 'clip_id')
    assert split_summary(df).loc['train', 'rows'] == 12
    r = df.set_index('clip_id').loc['ffpp/ffpp-faceswap/c23/004_005']
    assert (r.identity, r.target_identity, r.split) == (5, 4, 'val')
    assert set(load_ffpp(root, methods=['Deepfakes']).source) == {'ffpp-original', 'ffpp-deepfakes'}
    with pytest.raises(FileNotFoundError, match=r"original_sequences/youtube/c40'"): load_ffpp(root, compression='c40')
    with pytest.raises(ValueError, match='compression must be one of'): load_ffpp(root, compression='c0')
    with pytest.raises(FileNotFoundError, match='manipulated_sequences/Face2Face'): load_ffpp(root, methods=['Face2Face'])
    (root / 'splits' / 'val.json').unlink()
    with pytest.raises(FileNotFoundError, match='val.json'): load_ffpp(root)
    (root / 'splits' / 'val.json').write_text(json.dumps([['004', '005']]))
    (root / 'splits' / 'test.json').write_text(json.dumps([['006', '005']]))
    with pytest.raises(LeakError, match="video 005 is listed in both val.json and test.json"): load_ffpp(root)
    (root / 'splits' / 'test.json').write_text(json.dumps([['006', '007']]))
    truncate(root / 'manipulated_sequences/Deepfakes/c23/videos/006_007.mp4')
    with pytest.raises(BadFileError, match='006_007.mp4'): load_ffpp(root)
    with pytest.warns(UserWarning, match='skipped 1 bad file'):
        assert load_ffpp(root, skip_bad=True).attrs['n_bad'] == 1


def make_dfd(root, actors=range(1, 10), c='c23'):
    for a in actors: tiny_video(root / 'original_sequences/actors' / c / 'videos' / f'{a:02d}__outside_talk.mp4', n_frames=3, size=16, audio=False, seed=a)
    (root / 'manipulated_sequences/DeepFakeDetection' / c / 'videos').mkdir(parents=True, exist_ok=True)


def test_ffpp_dfd(tmp_path):
    root = tmp_path / 'FF'
    make_dfd(root)
    fakes = root / 'manipulated_sequences/DeepFakeDetection/c23/videos'
    reals = load_ffpp_dfd(root, seed=3)
    assert len(reals) == 9 and (reals.label == 0).all() and reals.attrs['dropped'] == []
    split = dict(zip(reals.identity, reals.split))
    by = {s: sorted(a for a, t in split.items() if t == s) for s in SPLITS}
    assert all(len(v) >= 2 for v in by.values())                      # 9 actors: 5/2/2
    for k, s in enumerate(SPLITS): tiny_video(fakes / f'{by[s][0]:02d}_{by[s][1]:02d}__outside_talk__ABCD{k:04d}.mp4', n_frames=3, size=16, audio=False)
    tiny_video(fakes / f'{by["train"][0]:02d}_{by["test"][0]:02d}__outside_talk__ZZZZ0000.mp4', n_frames=3, size=16, audio=False)
    with pytest.warns(UserWarning, match=r'1 of 4 fake video\(s\) join actors of two splits: dropped'):
        df = load_ffpp_dfd(root, seed=3)
    assert df.attrs['dropped'] == [f'ffpp-dfd/ffpp-deepfakedetection/c23/{by["train"][0]:02d}_{by["test"][0]:02d}__outside_talk__ZZZZ0000']
    assert len(df) == 12 and df.groupby('split').label.nunique().to_dict() == {'test': 2, 'train': 2, 'val': 2}
    r = df[df.label == 1].set_index('experiment').loc['ABCD0000']       # TT_SS: the source actor SS is the face shown
    assert (r.target_identity, r.identity, r.split, r.scene, r.dataset) == (by['train'][0], by['train'][1], 'train', 'outside_talk', 'ffpp-dfd')
    assert check_no_leak(df, 'identity') and check_no_leak(df, 'clip_id')
    assert df.split.tolist() == load_ffpp_dfd(root, seed=3).split.tolist()
    with pytest.raises(FileNotFoundError, match=r"original_sequences/actors/c40'"): load_ffpp_dfd(root, compression='c40')
    with pytest.raises(ValueError, match='compression must be one of'): load_ffpp_dfd(root, compression='hq')
    tiny_video(fakes / '01_02_outside.mp4', n_frames=3, size=16, audio=False)
    with pytest.raises(ValueError, match=r'01_02_outside.mp4 \(expected <target actor>_<source actor>__<scene>__<experiment id>\)'): load_ffpp_dfd(root)
    (fakes / '01_02_outside.mp4').unlink()
    (root / 'manipulated_sequences' / 'DeepFakeDetection').rename(root / 'manipulated_sequences' / 'DeepFakeDetections')
    with pytest.raises(FileNotFoundError, match="found 'DeepFakeDetections': rename it to 'DeepFakeDetection'"): load_ffpp_dfd(root)


def make_celebdf(root, youtube='YouTube-real'):
    for k, n in enumerate(['id0_0000', 'id0_0001', 'id1_0000', 'id2_0000']): tiny_video(root / 'Celeb-real' / f'{n}.mp4', n_frames=3, size=16, seed=k)
    for k, n in enumerate(['id0_id1_0000', 'id1_id0_0000', 'id2_id1_0000']): tiny_video(root / 'Celeb-synthesis' / f'{n}.mp4', n_frames=3, size=16, seed=9 + k)
    for k in range(2): tiny_video(root / youtube / f'{k:05d}.mp4', n_frames=3, size=16, seed=20 + k)
    (root / 'List_of_testing_videos.txt').write_text('1 YouTube-real/00001.mp4\n1 Celeb-real/id2_0000.mp4\n0 Celeb-synthesis/id2_id1_0000.mp4\n')


def test_celebdf(tmp_path):
    root = tmp_path / 'Celeb-DF-v2'
    make_celebdf(root, youtube='Youtube-real')      # a common variant spelling is accepted
    # the official test list shares people with other clips: refused by name, or the training clips that show them dropped
    with pytest.raises(LeakError, match=r'official split: 1 identity in more than one split: celebdf:1 \(test, train\)'):
        load_celebdf(root, on_leak='raise')
    with pytest.warns(UserWarning, match=r'3 training clip\(s\) show or change people of the official test list \(identities 1\)'):
        df = load_celebdf(root)
    dropped = df.attrs['dropped']
    assert len(df) + len(dropped) == 9 and int(df.label.sum()) == 1
    assert dropped == ['celebdf/Celeb-real/id1_0000', 'celebdf/Celeb-synthesis/id0_id1_0000', 'celebdf/Celeb-synthesis/id1_id0_0000']
    assert df.groupby('split').size().to_dict() == {'test': 3, 'train': 3}
    r = df.set_index('clip_id').loc['celebdf/Celeb-synthesis/id2_id1_0000']
    assert (r.identity, r.target_identity, r.label) == (1, 2, 1)
    assert check_no_leak(df, 'identity') and check_no_leak(df, 'clip_id')
    v = load_celebdf(root, val_fraction=0.4, seed=0)
    assert set(v.split) == set(SPLITS) and (v.split == 'test').sum() == 3 and check_no_leak(v, 'identity')
    with pytest.raises(ValueError, match='on_leak must be'): load_celebdf(root, on_leak='keep')
    (root / 'Celeb-synthesis').rename(root / 'Celeb_synthesis_videos')
    with pytest.raises(FileNotFoundError, match="found 'Celeb_synthesis_videos': rename it to 'Celeb-synthesis'"): load_celebdf(root)
    (root / 'Celeb_synthesis_videos').rename(root / 'Celeb-synthesis')
    (root / 'Youtube-real' / '00001.mp4').unlink()
    with pytest.raises(FileNotFoundError, match='00001.mp4'): load_celebdf(root)
    assert load_celebdf(root, skip_bad=True).attrs['n_bad'] == 1
    (root / 'List_of_testing_videos.txt').write_text('YouTube-real/00001.mp4\n')
    with pytest.raises(ValueError, match='line 1'): load_celebdf(root)


def make_dfdc(root, n=4, parts=2):
    for k in range(parts):
        meta = {}
        for i in range(n):
            meta[f'r{k}{i}.mp4'] = dict(label='REAL', split='train', original=None)
            meta[f'f{k}{i}.mp4'] = dict(label='FAKE', split='train', original=f'r{k}{i}.mp4')
        if k == 0: meta['f00b.mp4'] = dict(label='FAKE', split='train', original='r00.mp4')   # a second fake of one original
        for j, name in enumerate(meta): tiny_video(root / f'dfdc_train_part_{k}' / name, n_frames=3, size=16, audio=False, seed=10 * k + j)
        (root / f'dfdc_train_part_{k}' / 'metadata.json').write_text(json.dumps(meta))


def test_dfdc(tmp_path):
    root = tmp_path / 'dfdc'
    make_dfdc(root)
    df = load_dfdc(root, seed=1)
    assert len(df) == 17 and int(df.label.sum()) == 9 and set(df.part) == {'dfdc_train_part_0', 'dfdc_train_part_1'}
    assert df.groupby('split').label.nunique().to_dict() == {'test': 2, 'train': 2, 'val': 2}
    assert df.groupby('group').split.nunique().max() == 1 and df.groupby('group').identity.nunique().max() == 1
    r = df.set_index('clip_id').loc['dfdc/dfdc_train_part_0/f00b']
    assert (r.label, r.group, r.original, r.source) == (1, 'r00', 'r00.mp4', 'dfdc-fake')
    assert df.identity.nunique() == 8 and check_no_leak(df, 'identity') and check_no_leak(df, 'clip_id')
    assert len(load_dfdc(root / 'dfdc_train_part_1', seed=1)) == 8        # one part given directly
    assert load_dfdc(root, seed=1).split.tolist() == df.split.tolist()
    (root / 'dfdc_train_part_1' / 'f13.mp4').unlink()
    with pytest.raises(FileNotFoundError, match=r'1 video\(s\) listed in metadata.json are missing, e.g. .*dfdc_train_part_1/f13.mp4'): load_dfdc(root)
    skipped = load_dfdc(root, skip_bad=True)
    assert len(skipped) == 16 and skipped.attrs['n_bad'] == 1 and 'f13.mp4: missing' in skipped.attrs['bad_files'][0]
    meta = json.loads((root / 'dfdc_train_part_1' / 'metadata.json').read_text())
    meta['f13.mp4'] = dict(label='fake?', split='train', original='r13.mp4')
    (root / 'dfdc_train_part_1' / 'metadata.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r'the entry of f13.mp4 should have "label": "REAL" or "FAKE"'): load_dfdc(root, skip_bad=True)
    meta['f13.mp4'] = dict(label='FAKE', split='train', original=None)
    (root / 'dfdc_train_part_1' / 'metadata.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='the fake f13.mp4 names no "original" video'): load_dfdc(root)
    (root / 'dfdc_train_part_1' / 'metadata.json').unlink()
    with pytest.raises(FileNotFoundError, match=r"expected the file '.*dfdc_train_part_1/metadata.json'"): load_dfdc(root)
    with pytest.raises(FileNotFoundError, match='expected the training parts'): load_dfdc(tmp_path)
    with pytest.raises(FileNotFoundError, match='does not exist'): load_dfdc(tmp_path / 'nowhere')


def test_lrw(tmp_path):
    root = tmp_path / 'lipread_mp4'
    for w in ['ABOUT', 'ZERO']:
        for k, s in enumerate(SPLITS): tiny_video(root / w / s / f'{w}_{k + 1:05d}.mp4', n_frames=4, size=16, seed=k)
    df = load_lrw(root)
    assert len(df) == 6 and set(df.word) == {'ABOUT', 'ZERO'} and sorted(df.split) == sorted(list(SPLITS) * 2)
    assert len(load_lrw(root, splits=['test'])) == 2 and len(load_lrw(root, words=['ZERO'])) == 3
    truncate(root / 'ZERO' / 'val' / 'ZERO_00002.mp4')
    with pytest.raises(BadFileError, match='ZERO_00002.mp4'): load_lrw(root)
    assert load_lrw(root, skip_bad=True).attrs['n_bad'] == 1
    with pytest.raises(FileNotFoundError, match="expected the folder '.*lipread_mp4/HELLO'"): load_lrw(root, words=['HELLO'])
    for s in SPLITS: (root / 'ABOUT' / s).rename(root / 'ABOUT' / f'{s}_set')
    with pytest.raises(FileNotFoundError, match="ABOUT/train'"): load_lrw(root)
    with pytest.raises(FileNotFoundError, match='expected word folders'): load_lrw(tmp_path)


def test_loaders_refuse_leaky_splits(tmp_path, monkeypatch):
    # CelebA: a person in the train and the test partition
    make_celeba(tmp_path / 'c')
    ids = tmp_path / 'c' / 'Anno' / 'identity_CelebA.txt'
    ids.write_text(ids.read_text().replace('000009.jpg 12', '000009.jpg 10'))
    with pytest.raises(LeakError, match=r"CelebA at .*: 1 identity in more than one split: celeba:10 \(test, train\)"): load_celeba(tmp_path / 'c')
    # FaceForensics++: a fake joining a train video and a val video
    ff = tmp_path / 'FF'
    make_ffpp(ff, methods=('Deepfakes',))
    tiny_video(ff / 'manipulated_sequences/Deepfakes/c23/videos/000_004.mp4', n_frames=3, size=16, audio=False)
    with pytest.raises(LeakError, match=r'1 fake video\(s\) join people of two splits: 000_004.mp4 \(identity 0 in train, identity 4 in val\)'):
        load_ffpp(ff)
    # folder trees and LRW carry no identities and put the split in every clip id: their last check is shown on a tampered read
    sp, lrw = tmp_path / 'split', tmp_path / 'lipread_mp4'
    for s in SPLITS:
        for lab in ('real', 'fake'): tiny_image(sp / s / lab / 'x.png')
        tiny_video(lrw / 'ABOUT' / s / 'ABOUT_00001.mp4', n_frames=3, size=16, audio=False)
    assert check_no_leak(load_folder_tree(sp), 'identity') and check_no_leak(load_lrw(lrw), 'clip_id')
    real_finish = manifest_module._finish
    monkeypatch.setattr(manifest_module, '_finish', lambda *a: real_finish(*a).assign(identity=7))
    with pytest.raises(LeakError, match=r"real/fake folder tree .*: 1 identity in more than one split: split:7 \(test, train, val\)"): load_folder_tree(sp)
    with pytest.raises(LeakError, match=r"LRW at .*: 1 identity in more than one split: lrw:7 \(test, train, val\)"): load_lrw(lrw)


# ---------------------------------------------------------------- real samples
def test_real_samples():
    r = real_samples()
    assert r['lfw_faces'].shape == (100, 3, 25, 25) and r['lfw_nonfaces'].shape == (100, 3, 25, 25)
    assert r['astronaut'].shape == (3, 512, 512) and r['grace_hopper'].shape[0] == 3
    for v in r.values(): assert v.dtype == torch.float32 and 0 <= v.min() and v.max() <= 1
    assert r['lfw_faces'].std() > 0.05
    assert all(v.shape[-2:] == (32, 32) for v in real_samples(size=32).values())


def test_make_real_samples_manifest(tmp_path):
    p = make_real_samples(tmp_path, size=16)
    assert p.parent == tmp_path.resolve() / 'real-samples' and make_real_samples(tmp_path, size=16) == p
    df = read_manifest(p, check_exists=True)
    assert len(df) == 102 and (df.label == 0).all() and set(df.split) == {'test'}
    x, y = FaceDataset(p)[101]
    assert x.shape == (3, 16, 16) and y == 0
    assert not [q for q in (tmp_path / 'real-samples').iterdir() if q.name.startswith('.')]   # no half-built folder left
    with pytest.raises(ValueError, match='size must be'): make_real_samples(tmp_path, size=3)
