#!/usr/bin/env python3
"""Build the notebooks of this folder from their percent-format sources, execute them, save them.

    python notebooks/build_notebooks.py             # build + execute + save every notebook
    python notebooks/build_notebooks.py 02 04       # only those whose name starts so
    python notebooks/build_notebooks.py --quick     # TVM_SPARSE_NB_QUICK=1, nothing saved
    python notebooks/build_notebooks.py --out DIR   # save into DIR instead (a trial run)

The sources ``NN_name.py`` are the truth: jupytext-style percent format, a ``# %%`` line opens a
code cell and a ``# %% [markdown]`` line a markdown cell whose lines are ``# `` comments; a
``# %magic`` line in a code cell is that IPython magic. Edit a source, then rebuild
(``tests/test_notebooks.py`` checks that the stored notebooks hold exactly these cells, executed
in order, and runs each in a fresh kernel with ``TVM_SPARSE_NB_QUICK=1``, which shrinks
budgets). The stored outputs are the ones this script's normal (not quick) run produced on the
machine named in each notebook's metadata; run it on an otherwise idle machine, since notebooks
02 and 03 time kernels and models.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from tvm_sparse.testing import NOTEBOOK_QUICK_ENV as QUICK_ENV

HERE = Path(__file__).resolve().parent
KERNEL = "python3"
CELL_TIMEOUT_S = 600
NOTEBOOKS = {p.stem: p for p in sorted(HERE.glob("[0-9][0-9]_*.py"))}
_MARKER = re.compile(r"# %%( \[markdown\])?$")
_MAGIC = re.compile(r"# (%[a-z].*)$")


def parse_cells(text: str) -> list[tuple[str, str]]:
    """The ``(kind, source)`` cells of a percent-format source, kind "code" or "markdown"."""
    cells: list[tuple[str, list[str]]] = []
    for number, line in enumerate(text.splitlines(), 1):
        marker = _MARKER.match(line)
        if marker:
            cells.append(("markdown" if marker.group(1) else "code", []))
        elif not cells:
            if line.strip():
                raise ValueError(f"line {number}: text before the first '# %%' cell marker")
        elif cells[-1][0] == "markdown":
            if line and line != "#" and not line.startswith("# "):
                raise ValueError(f"line {number}: a markdown cell line must be a '# ' comment")
            cells[-1][1].append(line[2:])
        else:
            magic = _MAGIC.match(line)
            cells[-1][1].append(magic.group(1) if magic else line)
    return [(kind, "\n".join(lines).strip("\n")) for kind, lines in cells]


def build(name: str):
    """The unexecuted notebook ``name`` (an nbformat NotebookNode)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, source) in enumerate(parse_cells(NOTEBOOKS[name].read_text())):
        new = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(new(source, id=f"{name[:2]}-{i:02d}"))  # stable ids: small rebuild diffs
    return nb


def execute(nb, timeout: int = CELL_TIMEOUT_S) -> float:
    """Run ``nb`` top to bottom in a fresh kernel started in this folder; returns seconds."""
    from nbclient import NotebookClient

    t0 = time.perf_counter()
    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=KERNEL,
        record_timing=False,
        resources={"metadata": {"path": str(HERE)}},
    ).execute()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="name prefixes, e.g. 02 04 (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ENV}=1, save nothing here")
    parser.add_argument("--out", type=Path, help="write the executed notebooks there instead")
    args = parser.parse_args(argv)
    import nbformat

    from tvm_sparse.benchmarking import machine_description

    names = [n for n in NOTEBOOKS if not args.only or any(n.startswith(p) for p in args.only)]
    if args.quick:
        os.environ[QUICK_ENV] = "1"
    else:
        os.environ.pop(QUICK_ENV, None)
    machine = machine_description()
    total = 0.0
    for name in names:
        nb = build(name)
        seconds = execute(nb)
        total += seconds
        print(f"{name}: executed in {seconds:.1f} s", flush=True)
        if args.out or not args.quick:
            nb.metadata["tvm_sparse"] = {
                "executed_seconds": round(seconds, 1),
                "quick": args.quick,
                "machine": {k: machine.get(k) for k in ("cpu", "cores", "tvm", "torch")},
            }
            (args.out or HERE).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, (args.out or HERE) / f"{name}.ipynb")
    print(f"total: {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
