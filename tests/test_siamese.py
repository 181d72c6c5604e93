"""FakeTalkerDetect (nbs/33_faketalkerdetect.ipynb): the branch, the Siamese network, its inputs' errors, leaks, resume."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from deepfake_course.detect import siamese as ftd
from deepfake_course.detect.core import (FaceTensorSet, DetectionData, build_detector, list_detectors, save_detector,
                                         load_detector, train_detector, score_faces)
from deepfake_course.data.manifest import LeakError
from deepfake_course.train import InterruptAfter

pytestmark = pytest.mark.usefixtures('one_thread')   # small convolutions: one torch thread (conftest)
W, FC = (8, 16, 16, 16, 8), 32


def faces(n, label, split='train', seed=0, clip='c'):
    "Random uint8 faces whose fakes are brighter: a learnable toy task."
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, 64, 64, generator=g) * 160 + 80 * label).byte()
    df = pd.DataFrame(dict(label=label, split=split, identity=seed, target_identity=-1, source='toy',
                           clip_id=[f'{clip}{seed}-{i // 4}' for i in range(n)], frame=[i % 4 for i in range(n)]))
    return FaceTensorSet(x, df)


def toy_data():
    cat = lambda a, b: FaceTensorSet(torch.cat([a.x, b.x]), pd.concat([a.df, b.df], ignore_index=True))
    return DetectionData(cat(faces(24, 0, 'train', 1), faces(24, 1, 'train', 2)), cat(faces(8, 0, 'val', 3), faces(8, 1, 'val', 4)),
                         cat(faces(8, 0, 'test', 5), faces(8, 1, 'test', 6)), 'toy/set')


def test_same_padding_like_keras():
    conv = ftd.SameConv2d(3, 2, 11, 4)
    assert conv(torch.rand(1, 3, 64, 64)).shape == (1, 2, 16, 16)
    box = ftd.SameConv2d(1, 1, 11, 4); torch.nn.init.ones_(box.weight)
    out = box(torch.ones(1, 1, 64, 64))[0, 0]
    assert out[8, 0] == 88 and out[8, -1] == 77          # 3 padded columns on the left, 4 on the right (TensorFlow's rule)


def test_branch_registered_no_bn():
    names = set(list_detectors()['name'])
    assert {'faketalker_alexnet', 'faketalker_siamese'} <= names
    net = build_detector('faketalker_alexnet', widths=W, fc=FC)
    assert net(torch.rand(2, 3, 64, 64)).shape == (2,)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    with pytest.raises(ValueError, match='5 convolutions'): ftd.AlexNetLike((8, 8))


def test_contrastive_loss_and_distance():
    d, y = torch.tensor([0.5, 0.5, 2.0]), torch.tensor([0., 1., 1.])
    assert math.isclose(ftd.contrastive_loss(d, y, 1.4).item(), (0.25 + 0.81) / 3, rel_tol=1e-5)
    assert math.isclose(ftd.contrastive_loss(torch.zeros(1), torch.ones(1)).item(), 1.96, rel_tol=1e-5)   # default margin 1.4
    assert math.isclose(ftd.pair_distance(torch.zeros(1, 2), torch.tensor([[3., 4.]])).item(), 5.0, rel_tol=1e-6)


def test_released_embedding_is_degenerate_ours_is_not():
    x = torch.rand(12, 3, 64, 64)
    s1 = ftd.SiameseNet(ftd.AlexNetLike(W, FC), embedding='sigmoid', n_refs=2)
    assert torch.equal(torch.unique(s1.embed(x)), torch.ones(1))
    s2 = ftd.SiameseNet(ftd.AlexNetLike(W, FC), emb_dim=8, n_refs=2)
    assert torch.unique(s2.embed(x)).numel() > 12


def test_bad_inputs_name_the_value():
    fs = faces(6, 0)
    with pytest.raises(ValueError, match='k=50 reference shots requested but only 6 real faces'): ftd.reference_shots(fs, 50)
    y = np.r_[np.zeros(20), np.ones(20)]
    for bad in (0, 1, 1.5, -0.1, 95):
        with pytest.raises(ValueError, match=f'got {bad!r}'): ftd.ratio_subset(y, bad)
        with pytest.raises(ValueError, match=f'got {bad!r}'): ftd.ratio_threshold(y, y, bad)
    sub = ftd.ratio_subset(np.r_[np.zeros(200), np.ones(50)], 0.95, seed=0)
    assert len(sub) == 200 + 11 and abs((sub < 200).mean() - 0.95) < 0.01
    m = build_detector('faketalker_siamese', widths=W, fc=FC, emb_dim=8, n_refs=3)
    with pytest.raises(ValueError, match='n_refs=3'): ftd.finetune_siamese(m, fs.x[:2], fs)


def test_pretrain_and_finetune_resume_exactly(tmp_path):
    data = toy_data()
    kw = dict(epochs=3, lr=1e-3, batch_size=16, opt='adam', schedule=None, device='cpu', seed=0)
    def branch():
        torch.manual_seed(0); return build_detector('faketalker_alexnet', widths=W, fc=FC)   # the same initial weights each time
    full = train_detector(branch(), data, ckpt_dir=tmp_path / 'a', **kw).model
    with pytest.raises(KeyboardInterrupt):
        train_detector(branch(), data, ckpt_dir=tmp_path / 'b', callbacks=[InterruptAfter(1)], **kw)
    resumed = train_detector(branch(), data, ckpt_dir=tmp_path / 'b', **kw).model
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()): assert torch.equal(a, b), k
    ck = save_detector(full, tmp_path / 'pre.pt')
    refs, fakes = ftd.reference_shots(data.train, 6, 0).x, data.train.x[-4:]
    fk = dict(n_pairs=48, epochs=3, lr=1e-3, batch_size=16, augment=None, device='cpu', seed=0)
    build = lambda: build_detector('faketalker_siamese', backbone_ckpt=str(ck), widths=W, fc=FC, emb_dim=8, n_refs=6)
    s_full = ftd.finetune_siamese(build(), refs, data.val, fakes, ckpt_dir=tmp_path / 's1', **fk).model
    with pytest.raises(KeyboardInterrupt):
        ftd.finetune_siamese(build(), refs, data.val, fakes, ckpt_dir=tmp_path / 's2', callbacks=[InterruptAfter(2)], **fk)
    s_res = ftd.finetune_siamese(build(), refs, data.val, fakes, ckpt_dir=tmp_path / 's2', **fk).model
    for (k, a), b in zip(s_full.state_dict().items(), s_res.state_dict().values()): assert torch.equal(a, b), k
    # the fine-tuned detector round-trips through the one checkpoint format, references and threshold included
    back = load_detector(save_detector(s_full, tmp_path / 'siam.pt'), expect='faketalker_siamese')
    assert torch.equal(back.refs, s_full.refs) and torch.equal(back.threshold, s_full.threshold)
    np.testing.assert_allclose(score_faces(back, data.test, 'cpu')['score'], score_faces(s_full, data.test, 'cpu')['score'])


def test_talking_data_refuses_leaks(tmp_path):
    from deepfake_course.data.fakes import FakeSetWriter
    clips = ftd.talking_clips(tmp_path, n_identities=9, clips_per_identity=1, clip_frames=6, size=64, seed=0)
    split = clips.groupby('identity')['split'].first()
    te, tr = [int(i) for i in split[split == 'test'].index], [int(i) for i in split[split == 'train'].index]
    cid = dict(zip(clips['identity'], clips['clip_id']))
    frame = ftd.read_clip(clips['path'].iloc[0])['frames'][0]

    def fake_set(name, rows):
        with FakeSetWriter('toy-talk', dict(name=name), tmp_path) as w:
            for split_, ident, target, drive in rows:
                for k in range(2):
                    w.add_image(frame, split=split_, identity=ident, target_identity=target, clip_id=f'toy-{name}-{drive}',
                                frame=k, driving_clip=drive)
        return w.name
    ok = fake_set('ok', [(s, ids[0], ids[1], cid[ids[1]]) for s, ids in
                         (('test', te), ('train', tr), ('val', [int(i) for i in split[split == 'val'].index]))])
    data = ftd.talking_data(clips, ok, tmp_path)
    assert set(data.test.df['identity']) <= set(te) and len(data.test) == 6 * len(te) + 2
    bad_clip = fake_set('clip', [('test', te[0], te[1], cid[tr[0]])])          # a test fake made from a training clip
    with pytest.raises(LeakError, match='driving_clip'): ftd.talking_data(clips, bad_clip, tmp_path)
    bad_id = fake_set('ident', [('test', tr[0], te[1], cid[te[1]])])            # a training person shown in a test fake
    with pytest.raises(LeakError, match='identit'): ftd.talking_data(clips, bad_id, tmp_path)
