"""Every ```python block of each docs page runs, in order, one namespace per page
(``docs/run_examples.py``; ```py blocks are shown, not run: they need PyTorch, Keras,
several processes or JAX configured before it starts)."""

import importlib.util
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
spec = importlib.util.spec_from_file_location("run_examples", DOCS / "run_examples.py")
run_examples = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_examples)
PAGES = [page for page in run_examples.pages() if run_examples.blocks(page)]


def test_the_guides_have_examples():
    assert {"getting_started.md", "scan.md", "training.md"} <= {page.name for page in PAGES}


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(DOCS)))
def test_docs_examples_run(page):
    assert run_examples.run_page(page), f"a python block of {page.relative_to(DOCS)} failed (its output names it)"


def test_every_public_name_has_an_api_page():
    """The check ``make docs`` runs (docs/api_coverage.py), here so ``make test`` fails first."""
    spec = importlib.util.spec_from_file_location("api_coverage", DOCS / "api_coverage.py")
    api_coverage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(api_coverage)
    assert api_coverage.undocumented_names() == [], "add these to an autosummary table in docs/api/*.md"


def test_the_development_page_lists_every_module():
    """docs/development.md's layout names every file of rnnjax/, and no file that is gone."""
    root = DOCS.parent
    listed = set()
    for line in (DOCS / "development.md").read_text().split("## Layout", 1)[1].splitlines():
        word = line.split(" ", 1)[0]
        if word.startswith("rnnjax/") and word.endswith(".py"):
            listed.add(word)
    present = {str(p.relative_to(root)) for p in (root / "rnnjax").rglob("*.py")}
    assert not present - listed, f"add to docs/development.md's layout: {sorted(present - listed)}"
    assert not listed - present, f"gone from rnnjax/: {sorted(listed - present)}"
