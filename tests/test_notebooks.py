"""Every notebook in notebooks/ runs from a fresh kernel (and so its committed outputs can be
regenerated with ``uv run python tests/test_notebooks.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def execute(path: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook,
        timeout=600,  # a guard against a hung kernel, not a speed test
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    return notebook


def test_there_are_notebooks() -> None:
    names = [path.name for path in NOTEBOOKS]
    assert {"01_explore.ipynb", "02_rank_tradeoffs.ipynb", "03_tensorized.ipynb"} <= set(names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs_and_shows_tables_and_figures(path: Path) -> None:
    notebook = execute(path)
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert any("image/png" in out.get("data", {}) for out in outputs), "no figure"
    assert notebook.cells[-1].cell_type == "markdown"
    assert notebook.cells[-1].source.startswith("## What you saw")


if __name__ == "__main__":  # regenerate the committed outputs
    for notebook_path in NOTEBOOKS if len(sys.argv) < 2 else map(Path, sys.argv[1:]):
        nbformat.write(execute(notebook_path), notebook_path)
        print("executed", notebook_path)
