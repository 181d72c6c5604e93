"""Every lecture (10 onwards) opens with objectives and its run time and ends with a summary and at least three nbgrader
exercises; its handout strips the solutions and runs up to the exercises.

That each exercise's solution passes its tests and that its tests fail without it is checked at the end of the lecture's
own smoke run (tests/test_notebooks.py appends `check_exercises`)."""
import json, pathlib, re
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
LECTURES = sorted(p for p in NBS.glob('*.ipynb') if re.match(r'\d\d', p.name) and p.name[:2] >= '09')   # 09_ethics onwards
# lectures whose exercises are still prose: each must still lack them (so the list shrinks as they land)
PENDING = set()


def cells(nb): return json.loads(nb.read_text())['cells']
def markdown(nb): return [''.join(c['source']) for c in cells(nb) if c['cell_type'] == 'markdown']


@pytest.mark.parametrize('nb', LECTURES, ids=lambda p: p.stem)
def test_lecture_frame(nb):
    from deepfake_course.handout import find_exercises
    from deepfake_course.site import lecture_summary
    md = markdown(nb); about = lecture_summary(nb)   # what the site's index reads: a paragraph that opens with the bold word
    assert about['objectives'] and any('**Objectives' in t for t in md[:4]), f'{nb.name}: no **Objectives.** paragraph in its first cells'
    assert about['run_time'] and any('**Run time' in t for t in md[:4]), f'{nb.name}: no **Run time** paragraph in its first cells'
    assert any(re.search(r'^#+ .*Summary', t, re.M | re.I) for t in md), f'{nb.name}: no Summary section'
    ex = find_exercises(nb)
    if nb.stem in PENDING:
        assert len(ex) < 3, f'{nb.name} has its exercises now: remove it from PENDING'
        return
    assert len(ex) >= 3, f'{nb.name}: {len(ex)} nbgrader exercises, want at least 3'
    first = ex.solution_cell.min()
    summary = max(i for i, c in enumerate(cells(nb)) if c['cell_type'] == 'markdown' and re.search(r'^#+ .*Summary', ''.join(c['source']), re.M | re.I))
    assert summary < first, f'{nb.name}: the exercises come after the summary'


WITH_EXERCISES = sorted(p for p in NBS.glob('*.ipynb') if any((c.get('metadata', {}).get('nbgrader') or {}).get('solution') for c in cells(p)))


def test_every_lecture_is_checked():
    assert set(LECTURES) - set(WITH_EXERCISES) <= {NBS / f'{n}.ipynb' for n in PENDING}


@pytest.mark.parametrize('nb', WITH_EXERCISES, ids=lambda p: p.stem)
def test_stubs_hide_the_solutions(nb):
    "The handout's cells before the exercises are the lecture's own, and no line of an answer survives in the stubs."
    from deepfake_course.handout import find_exercises, stub_notebook, BEGIN_SOLUTION, END_SOLUTION
    from deepfake_course.handout import read_notebook
    src = read_notebook(nb); stub = stub_notebook(src); ex = find_exercises(src)
    first = int(ex.solution_cell.min())
    assert [c.source for c in stub.cells[:first]] == [c.source for c in src.cells[:first]]
    for i in ex.solution_cell:
        s = src.cells[i].source
        answer = s[s.index(BEGIN_SOLUTION) + len(BEGIN_SOLUTION):s.index(END_SOLUTION)]
        kept = set(stub.cells[i].source.splitlines())
        leaked = [l for l in answer.splitlines() if l.strip() and not l.strip().startswith('#') and l in kept and l not in s[:s.index(BEGIN_SOLUTION)]]
        assert not leaked, f'{nb.name}, cell {i}: answer lines left in the stub: {leaked}'
        assert 'raise NotImplementedError()' in stub.cells[i].source


@pytest.mark.parametrize('nb', WITH_EXERCISES, ids=lambda p: p.stem)
def test_stubs_are_nbgraders(nb):
    "The course's `stub_notebook` (no nbgrader import, fast enough to run after every lecture) writes what nbgrader's `ClearSolutions` writes."
    import copy
    from nbgrader.preprocessors import ClearSolutions
    from deepfake_course.handout import read_notebook, stub_notebook
    src = read_notebook(nb); theirs = copy.deepcopy(src)
    ClearSolutions().preprocess(theirs, {'language': 'python'})
    assert [c.source for c in stub_notebook(src).cells] == [c.source for c in theirs.cells]


def test_handout_runs_up_to_the_exercises(tmp_path, session_data_root):
    "A real handout (nbgrader's generate_assignment, smoke sizes baked in) runs until the first stub, which raises."
    import nbformat, papermill as pm
    from deepfake_course.handout import handout, find_exercises
    nb = NBS / '11b_fakes.ipynb'
    h = handout(nb, tmp_path / 'handouts', quick=True, params={'data_root': str(session_data_root), 'out_dir': str(tmp_path / 'out'), 'device': 'cpu'})
    student = nbformat.read(str(h), as_version=4)
    from deepfake_course.handout import is_export_cell
    assert not any(is_export_cell(c) for c in student.cells)
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(h), str(tmp_path / 'ran.ipynb'), kernel_name='python3', cwd=str(NBS), progress_bar=False)
    assert e.value.ename == 'NotImplementedError'
    ran = nbformat.read(str(tmp_path / 'ran.ipynb'), as_version=4)
    failed = [i for i, c in enumerate(ran.cells) if any(o.get('output_type') == 'error' for o in c.get('outputs', []))]
    first = next(i for i, c in enumerate(ran.cells) if (c.metadata.get('nbgrader') or {}).get('solution'))
    assert failed == [first], (failed, first)
