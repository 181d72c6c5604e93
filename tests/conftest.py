"""Shared fixtures: one data root per test session (caches live only inside the run), quiet progress bars,
and a per-notebook timing table printed at the end."""
import os, pathlib, time
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault('DFC_QUIET', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('DFC_STATIC', '1')  # widgets draw their static fallback only (deepfake_course.widgets)
if os.environ.get('PYTEST_XDIST_WORKER'):  # two workers on two cores: one thread each (kernels inherit it)
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    os.environ.setdefault('MKL_NUM_THREADS', '1')
NOTEBOOK_TIMES: dict[str, float] = {}


@pytest.fixture(scope='module')
def one_thread():
    "One intra-op torch thread for a test module (small convolutions gain nothing from more, and lose much on a busy machine)."
    import torch
    old = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope='session')
def session_data_root(tmp_path_factory):
    "A data root shared by every test of this run (and by xdist workers), so built data is reused."
    env = os.environ.get('DFC_TEST_DATA')
    if env:
        p = pathlib.Path(env)
    else:
        base = tmp_path_factory.getbasetemp()
        base = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
        p = base / 'dfc-data'
    p.mkdir(parents=True, exist_ok=True)
    return p


def pytest_terminal_summary(terminalreporter):
    times = {}
    for rep in terminalreporter.stats.get('passed', []) + terminalreporter.stats.get('failed', []):
        if rep.when == 'call' and 'test_notebook[' in rep.nodeid:
            times[rep.nodeid.split('[', 1)[1].rstrip(']')] = rep.duration
    if times:
        terminalreporter.section('notebook times (s)')
        for name, t in sorted(times.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f'{t:8.1f}  {name}')
        terminalreporter.write_line(f'{sum(times.values()):8.1f}  total')
