"""Execute every notebook under nbs/ with papermill and its smoke parameters (tests/smoke_params.yaml).

A new notebook is covered without touching this file. A failing cell fails the test with that cell's traceback."""
import json, pathlib
import pytest, yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
SMOKE = yaml.safe_load((ROOT / 'tests' / 'smoke_params.yaml').read_text()) or {}
REQUIRED = {'data_root', 'out_dir', 'device', 'seed'}


def discover():
    out = []
    for p in sorted(NBS.rglob('*.ipynb')):
        rel = p.relative_to(NBS).parts
        if any(s.startswith(('_', '.')) for s in rel): continue
        out.append(p)
    return out


NOTEBOOKS = discover()
key = lambda p: p.relative_to(NBS).with_suffix('').as_posix()


def parameter_cells(nb_path):
    cells = json.loads(nb_path.read_text())['cells']
    return [c for c in cells if 'parameters' in c.get('metadata', {}).get('tags', [])]


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=key)
def test_parameters_cell(nb):
    import papermill as pm
    cells = parameter_cells(nb)
    assert len(cells) == 1, f'{nb.name}: {len(cells)} cells tagged "parameters" (want exactly 1)'
    declared = set(pm.inspect_notebook(str(nb)))
    missing = REQUIRED - declared
    assert not missing, f'{nb.name}: parameters cell lacks {sorted(missing)}'
    unknown = set(SMOKE.get(key(nb), {}) or {}) - declared
    assert not unknown, f'tests/smoke_params.yaml gives {nb.name} parameters it does not declare: {sorted(unknown)}'


def test_smoke_params_name_real_notebooks():
    names = {key(p) for p in NOTEBOOKS}
    stale = set(SMOKE) - names
    assert not stale, f'tests/smoke_params.yaml names notebooks that do not exist: {sorted(stale)}'


def ipc_kernel_manager(folder):
    """A kernel manager whose kernels talk over IPC (Unix sockets in `folder`, the test's own tmp_path) instead of TCP
    ports. Two xdist workers starting kernels at once can race for the same free ports; the likely cause of a CI run
    where 10_synthfaces waited 20 minutes on a kernel that sat idle (py-spy: client and kernel both waiting)."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default
    class IPCKernelManager(AsyncKernelManager):
        @default('transport')
        def _default_transport(self): return 'ipc'
        @default('ip')
        def _default_ip(self): return str(pathlib.Path(folder) / 'ipc')   # one folder per test: no two kernels share a socket
    return IPCKernelManager


def without_export(nb_path, tmp_path):
    """A copy of the notebook without its closing `nbdev.nbdev_export()` cell: a test must not rewrite the library
    while another worker imports it (a module caught half-written fails that import); `.ci/run` checks the export.
    A lecture with exercises gets one cell more at its end: `check_exercises` proves each exercise's tests fail on the
    handout's stub (the run itself proves the solutions pass them)."""
    d = json.loads(nb_path.read_text())
    from deepfake_course.handout import is_export_cell
    d['cells'] = [c for c in d['cells'] if not is_export_cell(c)]
    if has_exercises(d):   # at the end of the solved run: every exercise's tests must fail on the handout's stub
        d['cells'].append({'cell_type': 'code', 'execution_count': None, 'id': 'dfc-check-exercises', 'metadata': {}, 'outputs': [],
                           'source': f"from deepfake_course.handout import check_exercises\ncheck_exercises(r'{nb_path}', globals())"})
    out = tmp_path / f'in-{nb_path.name}'
    out.write_text(json.dumps(d))
    return out


def has_exercises(d) -> bool:
    return any((c.get('metadata', {}).get('nbgrader') or {}).get('solution') for c in d['cells'])


def test_without_export_drops_only_the_export_cell(tmp_path):
    nb = NBS / '41_cues.ipynb'
    cells = json.loads(nb.read_text())['cells']
    kept = json.loads(without_export(nb, tmp_path).read_text())['cells']
    from deepfake_course.handout import is_export_cell
    assert not any(is_export_cell(c) for c in kept) and sum(map(is_export_cell, cells)) == 1
    assert [c['source'] for c in kept[:len(cells) - 1]] == [c['source'] for c in cells if not is_export_cell(c)]
    assert len(kept) == len(cells) - 1 + has_exercises({'cells': cells})


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=key)
def test_notebook(nb, tmp_path, session_data_root):
    import papermill as pm
    params = dict(SMOKE.get(key(nb), {}) or {})
    params.setdefault('data_root', str(session_data_root))
    params.setdefault('out_dir', str(tmp_path / 'out'))
    params.setdefault('device', 'cpu')
    # The executed notebook is written once at the end (and where a cell failed, with its error), not after every cell,
    # and the kernel is stopped at once instead of asked to exit: about 2.5 s less per notebook, a minute of the suite
    pm.execute_notebook(str(without_export(nb, tmp_path)), str(tmp_path / nb.name), parameters=params, kernel_name='python3',
                        cwd=str(nb.parent), progress_bar=False, execution_timeout=1200, kernel_manager_class=ipc_kernel_manager(tmp_path),
                        request_save_on_cell_execute=False, shutdown_kernel='immediate')
    assert (tmp_path / 'out' / 'metrics.json').exists(), f'{nb.name} recorded no figure with record(...)'
