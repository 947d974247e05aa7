"""The notebooks in notebooks/ run top to bottom in a fresh kernel and hold what their sources say.

Each notebook is executed with nbclient (kernel ``python3``, a timeout per cell) with
``TVM_SPARSE_NB_QUICK=1``, which shrinks training / timing budgets; any cell error fails the test.
The stored notebooks must hold exactly the cells of their percent-format sources
(``notebooks/NN_name.py``, as ``notebooks/build_notebooks.py`` parses them), executed in order,
without errors (their outputs come from running that script, never from editing).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
CELL_TIMEOUT_S = 300


def _load_builder():
    spec = importlib.util.spec_from_file_location(
        "build_notebooks", NOTEBOOK_DIR / "build_notebooks.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


builder = _load_builder()
NAMES = list(builder.NOTEBOOKS)


def _read(name: str):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def test_every_notebook_is_stored() -> None:
    stored = sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))
    assert stored == sorted(NAMES)
    assert len(NAMES) == 5


def test_percent_format_parser() -> None:
    source = "# %% [markdown]\n# # Title\n#\n# text\n\n# %%\n# %matplotlib inline\nx = 1\n\n"
    assert builder.parse_cells(source) == [
        ("markdown", "# Title\n\ntext"),
        ("code", "%matplotlib inline\nx = 1"),
    ]
    with pytest.raises(ValueError, match="markdown"):
        builder.parse_cells("# %% [markdown]\nnot a comment\n")


@pytest.mark.parametrize("name", NAMES)
def test_stored_notebook_is_the_executed_builder_output(name: str) -> None:
    nb = _read(name)
    nbformat.validate(nb)
    expected = builder.build(name)
    got = [(c.cell_type, c.source) for c in nb.cells]
    assert got == [(c.cell_type, c.source) for c in expected.cells], (
        f"{name}.ipynb differs from notebooks/{name}.py: edit the source, rerun the builder"
    )
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        f"{name}.ipynb was not executed top to bottom in one kernel: rerun the builder"
    )
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}.ipynb stores an error: {errors[0].get('ename')}"
    assert nb.metadata.get("tvm_sparse", {}).get("executed_seconds"), "not saved by the builder"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_a_fresh_kernel(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(builder.QUICK_ENV, "1")  # the kernel inherits the environment
    nb = _read(name)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=builder.KERNEL,
        record_timing=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
