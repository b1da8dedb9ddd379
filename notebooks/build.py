"""Build the notebooks from their sources: ``NN_name.py`` -> ``NN_name.ipynb``.

Each notebook's source of truth is a plain Python file in the "percent" format that
Jupytext, VS Code and Spyder read: ``# %%`` starts a code cell, ``# %% [markdown]`` a
Markdown cell whose lines are comments. Sources are reviewable as code; the ``.ipynb``
files (built and executed here, outputs and plots included) are what people open.

    python notebooks/build.py            # build and execute every notebook
    python notebooks/build.py 01         # only those whose name starts with 01
    python notebooks/build.py --no-run   # build without executing (no outputs)

``tests/test_notebooks.py`` executes every notebook and checks each ``.ipynb`` still
matches its source.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 600  # per cell; the notebooks themselves aim at < 2 minutes in all


def sources() -> list[Path]:
    return sorted(p for p in HERE.glob("[0-9][0-9]_*.py"))


def parse(source: str) -> nbformat.NotebookNode:
    """A notebook (no outputs) from percent-format ``source``."""
    cells, kind, lines = [], None, []

    def flush():
        text = "\n".join(lines).strip("\n")
        if kind == "markdown":
            text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in text.split("\n"))
            cells.append(nbformat.v4.new_markdown_cell(text))
        elif kind == "code" and text:
            cells.append(nbformat.v4.new_code_cell(text))

    for line in source.split("\n"):
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path = HERE) -> float:
    """Run ``nb`` in place in a fresh kernel; returns the wall time in seconds."""
    from nbclient import NotebookClient

    start = time.perf_counter()
    NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prefixes", nargs="*", help="build only notebooks whose name starts with one of these")
    parser.add_argument("--no-run", action="store_true", help="do not execute (no outputs)")
    args = parser.parse_args(argv)
    for path in sources():
        if args.prefixes and not any(path.name.startswith(p) for p in args.prefixes):
            continue
        nb = parse(path.read_text())
        if not args.no_run:
            seconds = execute(nb)
            print(f"{path.stem}: executed in {seconds:.1f} s", file=sys.stderr)
        nbformat.write(nb, path.with_suffix(".ipynb"))


if __name__ == "__main__":
    main()
