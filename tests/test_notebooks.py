"""Every notebook runs top to bottom on the demo checkpoints shipped in the repo.

The notebooks end each section with an assertion that a numpy re-derivation
equals the module's own intermediate output, so a notebook that drifts from
gemma.py or gemma2.py fails here, not only when a reader runs it.
"""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebooks)

NOTEBOOKS = run_notebooks.notebooks()


def test_there_are_notebooks_to_run():
    assert len(NOTEBOOKS) >= 3, f"expected the three walkthrough notebooks in {run_notebooks.NOTEBOOKS}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_without_error(path):
    run_notebooks.execute(path)  # raises CellExecutionError, with the cell and traceback, on any error
