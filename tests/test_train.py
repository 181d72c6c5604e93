"""Unit tests of deepfake_course.train: exact resume, checkpoint safety, selection on validation only, errors, DDP."""
import os, subprocess, sys, textwrap, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from deepfake_course.train import (AllReduceBatchNorm, Callback, CheckpointError, FitResult, InterruptAfter, StepLoop,
                                   default_loss, fit, load_checkpoint, make_optimizer, make_toy_images, model_info, predict,
                                   read_checkpoint, save_checkpoint, sync_batchnorm, tiny_cnn)

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


@pytest.fixture(scope='module')
def data():
    x, y = make_toy_images(64, size=16, strength=0.1, seed=0)
    xv, yv = make_toy_images(32, size=16, strength=0.1, seed=1)
    return (DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
            DataLoader(TensorDataset(xv, yv), batch_size=32))


def run(data, ckpt=None, epochs=4, init_seed=0, callbacks=(), width=4, dropout=0.2, **kw):
    torch.manual_seed(init_seed)
    m = tiny_cnn(1, width=width, dropout=dropout)
    kw = {'lr': 3e-3, 'device': 'cpu', 'seed': 0, **kw}
    return fit(m, data[0], data[1], epochs=epochs, ckpt_dir=ckpt, callbacks=callbacks, **kw)


def max_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


def same_history(a, b):
    return a.history.drop(columns='time').equals(b.history.drop(columns='time'))


CONFIGS = {
    'adamw-cosine-epoch': dict(schedule='cosine'),
    'sgd-cosine-step-clip': dict(opt='sgd', lr=0.05, schedule='cosine', schedule_per='step', grad_clip=0.5),
    'adam-plateau-patience': dict(opt='adam', schedule='plateau', plateau_patience=0, patience=10, weight_decay=1e-4),
}


@pytest.mark.parametrize('cfg', list(CONFIGS), ids=list(CONFIGS))
def test_interrupted_then_resumed_equals_uninterrupted(data, tmp_path, cfg):
    kw = CONFIGS[cfg]
    full = run(data, tmp_path / 'full', **kw)
    with pytest.raises(KeyboardInterrupt):
        run(data, tmp_path / 'cut', callbacks=[InterruptAfter(2)], **kw)
    assert read_checkpoint(tmp_path / 'cut' / 'last.pt')['epoch'] == 2
    torch.manual_seed(999); np.random.seed(999); torch.rand(50)  # the resumed process starts from another RNG state
    resumed = run(data, tmp_path / 'cut', init_seed=123, **kw)  # other initial weights: everything comes from last.pt
    assert max_diff(full.model, resumed.model) == 0.0
    assert same_history(full, resumed)
    assert (full.best_epoch, full.best_score) == (resumed.best_epoch, resumed.best_score)


def test_extending_a_run_epochs_2_then_4(data, tmp_path):
    full = run(data, tmp_path / 'full', epochs=4, schedule=None)
    part = run(data, tmp_path / 'ext', epochs=2, schedule=None)
    assert part.epochs_run == 2
    ext = run(data, tmp_path / 'ext', epochs=4, schedule=None, init_seed=5)
    assert max_diff(full.model, ext.model) == 0.0 and same_history(full, ext)
    with pytest.warns(UserWarning, match='cosine schedule planned for 2 epochs'):
        run(data, tmp_path / 'cos', epochs=2), run(data, tmp_path / 'cos', epochs=3)


def test_finished_run_is_not_retrained(data, tmp_path):
    a = run(data, tmp_path / 'r')
    calls = []

    class Count(Callback):
        def on_epoch_start(self, state): calls.append(state.epoch)
    b = run(data, tmp_path / 'r', callbacks=[Count()], init_seed=7)
    assert calls == [] and same_history(a, b) and max_diff(a.model, b.model) == 0.0


def test_truncated_last_checkpoint_clear_error_and_fallback(data, tmp_path):
    full = run(data, tmp_path / 'full')
    ck = tmp_path / 'cut'
    with pytest.raises(KeyboardInterrupt):
        run(data, ck, callbacks=[InterruptAfter(2)])
    assert read_checkpoint(ck / 'prev.pt')['epoch'] == 1
    blob = (ck / 'last.pt').read_bytes()
    (ck / 'last.pt').write_bytes(blob[: len(blob) // 3])
    with pytest.raises(CheckpointError, match=r"last\.pt' is truncated or corrupt"):
        read_checkpoint(ck / 'last.pt')
    with pytest.raises(CheckpointError, match='last.pt'):
        load_checkpoint(ck / 'last.pt', tiny_cnn(1, width=4))
    with pytest.warns(UserWarning, match=r"truncated or corrupt.*previous good checkpoint .*prev\.pt"):
        resumed = run(data, ck)
    assert max_diff(full.model, resumed.model) == 0.0 and same_history(full, resumed)
    assert (ck / 'last.pt.corrupt').exists()  # kept for inspection, out of the rotation
    assert read_checkpoint(ck / 'prev.pt')['epoch'] == 3 and read_checkpoint(ck / 'last.pt')['epoch'] == 4


def test_resume_false_starts_afresh_without_stale_checkpoints(data, tmp_path):
    old = run(data, tmp_path / 'r', epochs=3)
    assert (tmp_path / 'r' / 'prev.pt').exists()
    new = run(data, tmp_path / 'r', epochs=1, resume=False, init_seed=1)
    assert new.epochs_run == 1 and not (tmp_path / 'r' / 'prev.pt').exists()  # the old run can never be resumed into this one
    assert read_checkpoint(tmp_path / 'r' / 'best.pt')['epoch'] == 1 and max_diff(old.model, new.model) > 0


def test_no_readable_checkpoint_at_all(data, tmp_path):
    ck = tmp_path / 'bad'; ck.mkdir()
    (ck / 'last.pt').write_bytes(b'PK\x03\x04 not really a zip')
    with pytest.raises(CheckpointError, match='No readable checkpoint'):
        run(data, ck)


@pytest.mark.skipif(not Path('/proc/self/fd').exists(), reason='needs /proc to see which file is being written')
def test_interrupted_write_keeps_previous_checkpoint(data, tmp_path, monkeypatch):
    ck, real_fsync, writes = tmp_path / 'w', os.fsync, []

    def fsync(fd):  # the second write of last.pt dies half-way (a power cut before the data reached the disk)
        if '.last.pt.' in os.readlink(f'/proc/self/fd/{fd}'):
            writes.append(fd)
            if len(writes) == 2: raise KeyboardInterrupt('power cut during the write')
        return real_fsync(fd)
    monkeypatch.setattr(os, 'fsync', fsync)
    with pytest.raises(KeyboardInterrupt, match='power cut'):
        run(data, ck)
    monkeypatch.setattr(os, 'fsync', real_fsync)
    assert read_checkpoint(ck / 'last.pt')['epoch'] == 1  # the previous good file is whole
    assert read_checkpoint(ck / 'prev.pt')['epoch'] == 1  # and its copy was made before the write
    assert not [p for p in ck.iterdir() if p.name.endswith('.tmp')]  # no temporary left behind


def test_checkpoint_of_another_model_names_keys(data, tmp_path):
    run(data, tmp_path / 'r', epochs=1, schedule=None)
    with pytest.raises(CheckpointError, match=r'mismatched shapes: 0\.weight \(4, 3, 3, 3\) vs model \(8, 3, 3, 3\)'):
        run(data, tmp_path / 'r', epochs=2, width=8, schedule=None)
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 1))
    with pytest.raises(CheckpointError, match=r'missing keys: 0\.bias, 2\.weight, 2\.bias; unexpected keys: 1\.weight, 1\.bias'):
        fit(other, data[0], data[1], epochs=2, lr=3e-3, ckpt_dir=tmp_path / 'r', device='cpu', schedule=None)
    with pytest.raises(CheckpointError, match="trained with opt='adamw', this call has opt='sgd'"):
        run(data, tmp_path / 'r', epochs=2, opt='sgd', schedule=None)


def test_nan_and_inf_loss_name_epoch_and_step(data):
    class BadAt:
        def __init__(self, at, val): self.at, self.val, self.n = at, val, 0
        def __call__(self, out, y):
            self.n += 1
            loss = default_loss(out, y)
            return loss * self.val if self.n == self.at else loss
    with pytest.raises(FloatingPointError, match=r'Loss is nan at epoch 2, step 2 \(run step 6\)'):
        run(data, loss_fn=BadAt(7, float('nan')))  # 4 training + 1 validation call per epoch: call 7 = epoch 2, step 2
    with pytest.raises(FloatingPointError, match=r'Loss is inf at epoch 1, step 1'):
        run(data, loss_fn=BadAt(1, float('inf')))


def test_early_stopping_and_best_weights_from_validation(data, tmp_path):
    script = iter([0.50, 0.90, 0.70, 0.60, 0.95, 0.99])  # a made-up validation metric per epoch
    seen = []

    class Keep(Callback):
        def on_epoch_end(self, state): seen.append({k: v.clone() for k, v in state.model.state_dict().items()})
    for ckpt in (tmp_path / 'ck', None):
        script = iter([0.50, 0.90, 0.70, 0.60, 0.95, 0.99]); seen.clear()
        r = run(data, ckpt, epochs=6, patience=2, monitor='val_score', mode='max',
                metrics=lambda s, y: {'score': next(script)}, callbacks=[Keep()])
        assert r.epochs_run == 4 and r.stopped_early  # epochs 3 and 4 did not beat epoch 2
        assert (r.best_epoch, r.best_score) == (2, 0.90)
        assert all(torch.equal(v, seen[1][k]) for k, v in r.model.state_dict().items())  # epoch 2's weights
        assert not all(torch.equal(v, seen[3][k]) for k, v in r.model.state_dict().items())
    assert read_checkpoint(tmp_path / 'ck' / 'best.pt')['epoch'] == 2


def test_val_auroc_with_sklearn_and_learning(data):
    from sklearn.metrics import roc_auc_score
    r = run(data, epochs=6, dropout=0.0, monitor='val_auroc', mode='max', lr=1e-2,
            metrics=lambda s, y: {'auroc': roc_auc_score(y, s)})
    assert {'val_loss', 'val_auroc', 'train_loss', 'lr'} <= set(r.history.columns)
    assert r.history['train_loss'].iloc[-1] < r.history['train_loss'].iloc[0]
    s, y = predict(r.model, data[1], 'cpu')
    assert roc_auc_score(y, s) == pytest.approx(r.best_score, abs=1e-9)
    assert r.best_score > 0.8, r.history


def test_bad_arguments(data):
    m = tiny_cnn(1, width=4)
    for kw, msg in [(dict(monitor='train_loss'), 'validation split only'), (dict(opt='lbfgs'), 'Unknown optimiser'),
                    (dict(schedule='step'), 'Unknown schedule'), (dict(mode='up'), "mode must be 'min' or 'max'"),
                    (dict(epochs=0), 'epochs must be an integer >= 1'), (dict(grad_clip=0), 'grad_clip must be > 0'),
                    (dict(schedule_per='batch'), 'schedule_per'), (dict(metrics=3), 'metrics must be a callable'),
                    (dict(monitor='val_auroc'), "'val_auroc' is not among")]:
        with pytest.raises((ValueError, TypeError), match=msg):
            fit(m, data[0], data[1], device='cpu', **kw)
    with pytest.raises(ValueError, match='needs a validation loader'):
        fit(m, data[0], patience=2, device='cpu')
    with pytest.raises(ValueError, match='Unknown device'):
        fit(m, data[0], device='tpu')


def test_callbacks_see_every_event_and_can_stop(data):
    events = []

    class Log:  # any object with some of the methods works
        def on_fit_start(self, s): events.append('fit_start')
        def on_epoch_start(self, s): events.append(f'epoch_start{s.epoch}')
        def on_batch_end(self, s): events.append('b') if s.batch == 1 else None
        def on_epoch_end(self, s):
            events.append(f'epoch_end{s.epoch}')
            s.stop = s.epoch == 2
        def on_fit_end(self, s): events.append('fit_end')
    r = run(data, epochs=5, callbacks=[Log()])
    assert events == ['fit_start', 'epoch_start0', 'b', 'epoch_end1', 'epoch_start1', 'b', 'epoch_end2', 'fit_end']
    assert r.epochs_run == 2


def test_dict_batches_multiclass_and_predict():
    x, y = make_toy_images(24, size=16, seed=3)
    batches = [{'x': x[i:i + 8], 'y': y[i:i + 8]} for i in range(0, 24, 8)]
    torch.manual_seed(0)
    r = fit(tiny_cnn(2, width=4), batches, batches, epochs=2, device='cpu', schedule=None)
    s, lab = predict(r.model, batches, 'cpu')
    assert s.shape == (24,) and np.array_equal(lab, y.numpy()) and ((s >= 0) & (s <= 1)).all()
    r3 = fit(tiny_cnn(3, width=4), batches, epochs=1, device='cpu')
    assert predict(r3.model, batches, 'cpu')[0].shape == (24, 3)
    assert r3.best_epoch == 1 and r3.best_score is None  # without val_dl the last epoch is kept


def test_history_plot_and_result(data):
    import matplotlib; matplotlib.use('Agg')
    from sklearn.metrics import roc_auc_score
    r = run(data, epochs=2, metrics=lambda s, y: {'auroc': roc_auc_score(y, s)})
    assert isinstance(r, FitResult) and list(r.history['epoch']) == [1, 2]
    fig = r.plot()
    assert len(fig.axes) == 2 and {l.get_label() for l in fig.axes[0].lines} >= {'train_loss', 'val_loss'}


def test_progress_quiet_unless_asked(data, capfd, monkeypatch):
    monkeypatch.setenv('DFC_QUIET', '1')
    run(data, epochs=1); assert 'epoch 1' not in capfd.readouterr().err
    run(data, epochs=1, progress=True); assert 'epoch 1' in capfd.readouterr().err
    monkeypatch.setenv('DFC_QUIET', '0')
    run(data, epochs=1, progress=False); assert 'epoch 1' not in capfd.readouterr().err


def test_amp_flag_is_a_no_op_on_cpu(data):
    assert max_diff(run(data, epochs=1, amp=True).model, run(data, epochs=1, amp=False).model) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_bf16_autocast_channels_last(data, tmp_path):
    dtypes = []

    class Peek(Callback):  # record the dtype of the first convolution's output
        def on_fit_start(self, state): state.model[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    r = run(data, tmp_path / 'g', epochs=2, device='cuda', callbacks=[Peek()])
    assert dtypes and set(dtypes) == {torch.bfloat16}
    w = r.model[0].weight
    assert w.is_cuda and w.is_contiguous(memory_format=torch.channels_last)
    assert np.isfinite(r.history[['train_loss', 'val_loss']].to_numpy()).all()
    cpu_model = tiny_cnn(1, width=4, dropout=0.2)
    load_checkpoint(tmp_path / 'g' / 'best.pt', cpu_model)  # GPU checkpoints load on a CPU machine
    s_gpu, _ = predict(r.model, data[1], 'cuda'); s_cpu, _ = predict(cpu_model, data[1], 'cpu', amp=False)
    np.testing.assert_allclose(s_gpu, s_cpu, atol=0.05)  # bf16 forward vs float32 forward


def test_save_load_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0); m = tiny_cnn(1, width=4)
    p = save_checkpoint(tmp_path / 'a.pt', m, epoch=7, note='x')
    torch.manual_seed(1); m2 = tiny_cnn(1, width=4)
    ck = load_checkpoint(p, m2)
    assert ck['epoch'] == 7 and ck['note'] == 'x'
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    torch.save({'model': m.state_dict()}, tmp_path / 'plain.pt')
    with pytest.raises(CheckpointError, match='not a deepfake_course checkpoint'):
        read_checkpoint(tmp_path / 'plain.pt')


def test_checkpoint_name_config_expect_and_model_info(tmp_path):
    torch.manual_seed(0); m = tiny_cnn(1, width=4)
    p = save_checkpoint(tmp_path / 'x.pt', m, make_optimizer(m.parameters()), name='dcgan', config={'width': 4, 'sizes': (8, 16)},
                        step=12, history=[{'loss': 1.0}])
    with pytest.raises(CheckpointError, match=r"^Checkpoint '.*x\.pt' holds a 'dcgan' model, not 'faceswap-df'$"):
        load_checkpoint(p, expect='faceswap-df')
    m2 = tiny_cnn(1, width=4)
    ck = load_checkpoint(p, m2, expect='dcgan')
    assert ck['name'] == 'dcgan' and ck['config'] == {'width': 4, 'sizes': (8, 16)} and ck['step'] == 12
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    info = model_info(p)
    assert {k: info[k] for k in ('name', 'config', 'format', 'modules', 'optimizer', 'rng', 'step')} == {
        'name': 'dcgan', 'config': {'width': 4, 'sizes': (8, 16)}, 'format': 'deepfake_course.checkpoint/2', 'modules': None,
        'optimizer': True, 'rng': True, 'step': 12}
    assert info['n_weights'] == sum(v.numel() for v in m.state_dict().values()) and 'history' not in info  # scalars only
    save_checkpoint(tmp_path / 'anon.pt', m)
    with pytest.raises(CheckpointError, match="holds an unnamed model, not 'dcgan'"):
        load_checkpoint(tmp_path / 'anon.pt', m2, expect='dcgan')
    # what a safe load could not read back is refused at write time, naming the entry
    with pytest.raises(TypeError, match=r"'auc' is a numpy\.float64"):
        save_checkpoint(tmp_path / 'bad.pt', m, auc=np.float64(0.5))
    with pytest.raises(TypeError, match=r"'history'\[0\]\['s'\] is a numpy\.ndarray"):
        save_checkpoint(tmp_path / 'bad.pt', m, history=[{'s': np.zeros(2)}])
    with pytest.raises(TypeError, match='JSON-able'):
        save_checkpoint(tmp_path / 'bad.pt', m, config={'act': torch.nn.ReLU})
    with pytest.raises(TypeError, match=r"clash with the format's own keys"):
        save_checkpoint(tmp_path / 'bad.pt', m, parts=1)
    with pytest.raises(TypeError, match='non-empty string'):
        save_checkpoint(tmp_path / 'bad.pt', m, name=3)
    assert not (tmp_path / 'bad.pt').exists()


def test_several_modules_in_one_checkpoint(tmp_path):
    torch.manual_seed(0)
    G, D = tiny_cnn(1, width=4), tiny_cnn(1, width=2, norm=False)
    opts = {'G': make_optimizer(G.parameters()), 'D': make_optimizer(D.parameters(), 'sgd', lr=0.1)}
    for net, o in ((G, opts['G']), (D, opts['D'])):
        net(torch.rand(2, 3, 16, 16)).sum().backward(); o.step()
    p = save_checkpoint(tmp_path / 'gan.pt', {'G': G, 'D': D}, opts, name='dcgan', step=3)
    torch.manual_seed(1)
    G2, D2 = tiny_cnn(1, width=4), tiny_cnn(1, width=2, norm=False)
    opts2 = {'G': make_optimizer(G2.parameters()), 'D': make_optimizer(D2.parameters(), 'sgd', lr=0.1)}
    load_checkpoint(p, {'G': G2, 'D': D2}, opts2, expect='dcgan')
    for a, b in ((G, G2), (D, D2)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(opts2['G'].state_dict()['state'][0]['exp_avg'], opts['G'].state_dict()['state'][0]['exp_avg'])
    assert torch.equal(opts2['D'].state_dict()['state'][0]['momentum_buffer'], opts['D'].state_dict()['state'][0]['momentum_buffer'])
    G3 = tiny_cnn(1, width=4); load_checkpoint(p, {'G': G3})  # only the generator, to sample
    assert torch.equal(G3.state_dict()['0.weight'], G.state_dict()['0.weight'])
    assert model_info(p)['modules'] == ['G', 'D']
    with pytest.raises(CheckpointError, match=r"holds several models \(G, D\); pass a dict"):
        load_checkpoint(p, G3)
    with pytest.raises(CheckpointError, match=r"has no model named \['EMA'\]; it holds \['G', 'D'\]"):
        load_checkpoint(p, {'EMA': G3})
    with pytest.raises(CheckpointError, match=r"\[model 'D'\] does not fit Sequential: .*mismatched shapes: 0\.weight"):
        load_checkpoint(p, {'D': tiny_cnn(1, width=4, norm=False)})
    with pytest.raises(CheckpointError, match=r"holds one model, not a dict"):
        load_checkpoint(save_checkpoint(tmp_path / 'one.pt', G), {'G': G})


def test_old_and_unsafe_checkpoints_are_refused(data, tmp_path):
    m = tiny_cnn(1, width=4)
    torch.save({'format': 'deepfake_course.train/1', 'model': m.state_dict(), 'epoch': 1}, tmp_path / 'old.pt')
    with pytest.raises(CheckpointError, match=r"'.*old\.pt' was written by an older version .*; delete it or retrain"):
        read_checkpoint(tmp_path / 'old.pt')
    torch.save({'generator': 'dcgan', 'rng': np.random.get_state()}, tmp_path / 'gan_v1.pt')  # an old GAN checkpoint
    with pytest.raises(CheckpointError, match=r"gan_v1\.pt' holds Python objects a safe load refuses.*delete it or retrain"):
        load_checkpoint(tmp_path / 'gan_v1.pt', m)
    ck = tmp_path / 'run'; ck.mkdir()
    torch.save({'format': 'deepfake_course.train/1', 'model': m.state_dict(), 'epoch': 1}, ck / 'last.pt')
    with pytest.raises(CheckpointError, match='older version'):
        run(data, ck, epochs=2)


def test_fit_names_its_checkpoints_and_refuses_another_model(data, tmp_path):
    torch.manual_seed(0)
    m = tiny_cnn(1, width=4)
    m.checkpoint_name, m.checkpoint_config = 'tiny_cnn', {'n_out': 1, 'width': 4}
    fit(m, data[0], data[1], epochs=1, lr=3e-3, device='cpu', seed=0, ckpt_dir=tmp_path / 'r', schedule=None)
    for f in ('last.pt', 'best.pt'):
        info = model_info(tmp_path / 'r' / f)
        assert (info['name'], info['config'], info['epoch']) == ('tiny_cnn', {'n_out': 1, 'width': 4}, 1)
    assert read_checkpoint(tmp_path / 'r' / 'last.pt')['fit_config']['opt'] == 'adamw'
    other = tiny_cnn(1, width=4); other.checkpoint_name = 'shallownet_v3'  # same shapes, another model
    with pytest.raises(CheckpointError, match=r"last\.pt' holds a 'tiny_cnn' model, not 'shallownet_v3'"):
        fit(other, data[0], data[1], epochs=2, device='cpu', ckpt_dir=tmp_path / 'r', schedule=None)
    with pytest.raises(CheckpointError, match=r"another configuration \(width: checkpoint 4 vs now 8\)"):
        fit(tiny_cnn(1, width=4), data[0], data[1], epochs=2, device='cpu', ckpt_dir=tmp_path / 'r', schedule=None,
            name='tiny_cnn', config={'n_out': 1, 'width': 8})
    assert model_info(tmp_path / 'r' / 'last.pt')['epoch'] == 1  # nothing was trained or written by the refused calls
    r = fit(tiny_cnn(1, width=4), data[0], data[1], epochs=2, lr=3e-3, device='cpu', ckpt_dir=tmp_path / 'r', schedule=None)
    info = model_info(tmp_path / 'r' / 'last.pt')  # an unnamed call resuming the run keeps its name and config
    assert r.epochs_run == 2 and (info['name'], info['config']) == ('tiny_cnn', {'n_out': 1, 'width': 4})
    fit(m, data[0], epochs=1, device='cpu', ckpt_dir=tmp_path / 'k', schedule=None, name='judge', config={'w': 2})
    assert (model_info(tmp_path / 'k' / 'best.pt')['name'], model_info(tmp_path / 'k' / 'best.pt')['config']) == ('judge', {'w': 2})


def test_allreduce_batchnorm_is_plain_batchnorm_in_one_process():
    torch.manual_seed(0)
    m = tiny_cnn(1, width=4); ref = tiny_cnn(1, width=4); ref.load_state_dict(m.state_dict())
    bn = m[1]
    undo = sync_batchnorm(m, torch.device('cpu'))
    assert isinstance(m[1], AllReduceBatchNorm) and m[1].weight is bn.weight and m[1].running_var is bn.running_var
    x = torch.rand(6, 3, 16, 16)
    m(x).sum().backward(); ref(x).sum().backward()
    torch.testing.assert_close(m[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(bn.weight.grad, ref[1].weight.grad)
    m.eval(); ref.eval(); torch.testing.assert_close(m(x), ref(x))
    undo()
    assert m[1] is bn and type(m[1]) is torch.nn.BatchNorm2d and not m.training  # the mode follows the model


def toy_step_loop(ckpt, steps, crash_at=None, init_seed=0, every=2, name='toy-gan', config=None, resume=True):
    "Two networks, two optimisers, dropout, batches drawn with a NumPy generator: a GAN-shaped hand-written loop."
    torch.manual_seed(init_seed)
    G = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 3 * 16 * 16),
                            torch.nn.Unflatten(1, (3, 16, 16)))
    D = tiny_cnn(1, width=4, dropout=0.2)
    opt_g, opt_d = make_optimizer(G.parameters(), lr=2e-3), make_optimizer(D.parameters(), 'sgd', lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt_d, 3, 0.5)
    x, _ = make_toy_images(32, size=16, seed=2)
    pick = np.random.default_rng(0)
    loop = StepLoop({'G': G, 'D': D}, {'G': opt_g, 'D': opt_d}, schedulers={'D': sched}, steps=steps, ckpt_path=ckpt,
                    every=every, name=name, config=config or {'width': 4}, generators=[pick], device='cpu', resume=resume)
    for step in loop:
        if step == crash_at: raise KeyboardInterrupt(f'crash in step {step + 1}')
        real, z = loop.to_device(x[pick.integers(0, len(x), 8)]), torch.randn(8, 4)
        with loop.autocast():
            loss_d = default_loss(D(real), torch.zeros(8)) + default_loss(D(G(z).detach()), torch.ones(8))
        opt_d.zero_grad(); loss_d.backward(); opt_d.step(); sched.step()
        loss_g = default_loss(D(G(z)), torch.zeros(8))
        opt_g.zero_grad(); loss_g.backward(); opt_g.step()
        loop.state.setdefault('seen', []).append(int(step))
        loop.log(loss_d=loss_d, loss_g=loss_g, lr_d=sched.get_last_lr()[0])
    return loop


def test_step_loop_exact_resume(tmp_path):
    straight = toy_step_loop(tmp_path / 'straight.pt', 9)
    assert straight.step == 9 and [r['step'] for r in straight.history] == list(range(1, 10))
    assert model_info(tmp_path / 'straight.pt')['step'] == 9 and model_info(tmp_path / 'straight.pt')['modules'] == ['G', 'D']
    with pytest.raises(KeyboardInterrupt):
        toy_step_loop(tmp_path / 'cut.pt', 9, crash_at=5)  # the crash is in step 6: the checkpoint of step 4 is on disk
    assert model_info(tmp_path / 'cut.pt')['step'] == 4
    torch.manual_seed(123); np.random.seed(5); torch.rand(7)  # the resumed process starts from other RNG states
    resumed = toy_step_loop(tmp_path / 'cut.pt', 9, init_seed=7)  # and other initial weights
    assert resumed.resumed_from == 4 and resumed.step == 9
    for k in ('G', 'D'):
        assert max_diff(straight.models[k], resumed.models[k]) == 0.0, k
    assert resumed.history == straight.history and resumed.state == straight.state == {'seen': list(range(9))}
    assert max_diff(straight.models['G'], toy_step_loop(None, 9, init_seed=7).models['G']) > 0  # the check can fail
    # a finished run does nothing more; extending it continues exactly
    again = toy_step_loop(tmp_path / 'straight.pt', 9, init_seed=3)
    assert again.history == straight.history and max_diff(again.models['D'], straight.models['D']) == 0.0
    toy_step_loop(tmp_path / 'ext.pt', 5)
    assert max_diff(toy_step_loop(tmp_path / 'ext.pt', 9, init_seed=4).models['G'], straight.models['G']) == 0.0


def test_step_loop_refuses_other_runs_and_bad_arguments(tmp_path):
    toy_step_loop(tmp_path / 'a.pt', 2)
    with pytest.raises(CheckpointError, match=r"a\.pt' holds a 'toy-gan' model, not 'faceswap-df'"):
        toy_step_loop(tmp_path / 'a.pt', 4, name='faceswap-df')
    with pytest.raises(CheckpointError, match=r"another configuration \(width: checkpoint 4 vs now 8\)"):
        toy_step_loop(tmp_path / 'a.pt', 4, config={'width': 8})
    fresh = toy_step_loop(tmp_path / 'a.pt', 1, config={'width': 8}, resume=False)  # starts afresh, replaces the file
    assert fresh.resumed_from == 0 and model_info(tmp_path / 'a.pt')['config'] == {'width': 8}
    save_checkpoint(tmp_path / 'plain.pt', tiny_cnn(1, width=4), name='toy-gan')
    with pytest.raises(CheckpointError, match='not written by a StepLoop'):
        StepLoop(tiny_cnn(1, width=4), steps=3, ckpt_path=tmp_path / 'plain.pt', name='toy-gan', device='cpu')
    toy_step_loop(tmp_path / 'b.pt', 2)
    with pytest.raises(CheckpointError, match=r"holds 1 generator state\(s\), this loop has 0"):
        StepLoop({'G': torch.nn.Linear(1, 1)}, steps=3, ckpt_path=tmp_path / 'b.pt', name='toy-gan', device='cpu')
    for kw, msg in [(dict(steps=-1), 'steps must be'), (dict(steps=3, every=0), 'every must be'),
                    (dict(steps=3, generators=[np.random.RandomState(0)]), 'numpy.random.Generator or torch.Generator')]:
        with pytest.raises((ValueError, TypeError), match=msg):
            StepLoop(tiny_cnn(1, width=4), device='cpu', **kw)
    with pytest.raises(TypeError, match='models must be an nn.Module'):
        StepLoop({}, steps=2, device='cpu')


DDP_SCRIPT = '''
import os, sys, torch
from torch.utils.data import DataLoader, TensorDataset
from deepfake_course.train import fit, make_toy_images, tiny_cnn
torch.set_num_threads(1)
out, batch = sys.argv[1], int(sys.argv[2])
x, y = make_toy_images(64, size=16, strength=0.1, seed=0)
xv, yv = make_toy_images(32, size=16, strength=0.1, seed=1)
torch.manual_seed(0)
model = tiny_cnn(1, width=4, norm=True)  # BatchNorm: its statistics must be those of the global batch
r = fit(model, DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True),
        DataLoader(TensorDataset(xv, yv), batch_size=32), epochs=3, lr=0.05, opt='sgd', schedule='cosine',
        device='cpu', seed=0, ckpt_dir=os.path.join(out, 'ckpt'), patience=5)
assert type(r.model[1]) is torch.nn.BatchNorm2d, type(r.model[1])  # the model's own layers come back after fit
if int(os.environ.get('RANK', '0')) == 0:
    torch.save({'state': r.model.state_dict(), 'history': r.history.drop(columns='time')}, os.path.join(out, 'result.pt'))
# one write per rank (print writes each argument apart, and two ranks share one pipe: their words interleaved in CI)
sys.stdout.write(f"rank {os.environ.get('RANK')} world {os.environ.get('WORLD_SIZE')} done\\n"); sys.stdout.flush()
'''


def test_ddp_two_processes_equal_single_process(tmp_path):
    "Two gloo processes with batch 8 each train a BatchNorm model exactly as one process with batch 16 (SyncBatchNorm's job)."
    script = tmp_path / 'ddp_fit.py'
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {k: v for k, v in os.environ.items() if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', DFC_QUIET='1', PYTHONPATH=str(ROOT))
    (tmp_path / 'one').mkdir(); (tmp_path / 'two').mkdir()
    single = subprocess.run([sys.executable, str(script), str(tmp_path / 'one'), '16'], env=env, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                          str(script), str(tmp_path / 'two'), '8'], env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-4000:]
    assert ddp.stdout.count('world 2 done') == 2, ddp.stdout
    a = torch.load(tmp_path / 'one' / 'result.pt', weights_only=False)
    b = torch.load(tmp_path / 'two' / 'result.pt', weights_only=False)
    for k in a['state']:
        torch.testing.assert_close(b['state'][k], a['state'][k], rtol=0, atol=1e-5, msg=lambda m: f'{k}: {m}')
    assert not torch.equal(a['state']['0.weight'], tiny_cnn(1, width=4, norm=True).state_dict()['0.weight'])
    assert int(a['state']['1.num_batches_tracked']) == 12 and float(a['state']['1.running_var'].std()) > 0  # BN trained
    np.testing.assert_allclose(b['history'].to_numpy(float), a['history'].to_numpy(float), rtol=0, atol=1e-5)
    ck = read_checkpoint(tmp_path / 'two' / 'ckpt' / 'last.pt')
    assert ck['epoch'] == 3 and ck['world'] == 2  # written by rank 0, with the unwrapped model's keys
    assert all(not k.startswith('module.') for k in ck['model'])
