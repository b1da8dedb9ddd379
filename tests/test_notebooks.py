"""Every notebook runs top to bottom, and each committed ``.ipynb`` matches its source.

The notebooks assert their own claims (accuracy above the baseline, equalities with the
batched call, ...), so executing them without an error is the test.
"""

import importlib.util
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
spec = importlib.util.spec_from_file_location("notebook_build", NOTEBOOKS / "build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
SOURCES = build.sources()


def test_there_are_notebooks():
    assert [p.stem[:2] for p in SOURCES] == [f"{i:02d}" for i in range(1, len(SOURCES) + 1)]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_committed_notebook_matches_its_source(source):
    built = build.parse(source.read_text())
    committed = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells], (
        f"{source.with_suffix('.ipynb').name} is stale: run `python notebooks/build.py {source.stem[:2]}`"
    )
    assert any(c.get("outputs") for c in committed.cells if c.cell_type == "code"), "committed without outputs: build it executed"


@pytest.mark.slow  # 30 s to 5 min each (they train models): make test-all runs them
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_runs(source):
    # The notebooks keep one JAX device: on jax 0.10.2 two CPU devices sometimes wedge
    # (benchmarks/lab/two_device_hang.py), which once aborted notebook 02's all-reduce and once
    # hung it for the 600 s cell timeout.
    nb = build.parse(source.read_text())
    build.execute(nb)  # raises nbclient.exceptions.CellExecutionError on any failing cell
    images = sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs)
    assert images >= 1, f"{source.stem} shows no plot"


def test_parse_percent_format():
    nb = build.parse("# %% [markdown]\n# # Title\n# text\n\n# %%\nx = 1\n\n# %%\nprint(x)\n")
    assert [(c.cell_type, c.source) for c in nb.cells] == [("markdown", "# Title\ntext"), ("code", "x = 1"), ("code", "print(x)")]
