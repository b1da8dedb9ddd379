"""Run the Python examples of the documentation pages, to check that they work as written.

Every `` ```python `` block of a page runs, in order, in one namespace per page (later blocks
use names from earlier ones), in a temporary working directory. `` ```py `` blocks are shown
but not run: they need PyTorch, Keras, several processes, or a JAX configured before it
starts.

    .venv/bin/python docs/run_examples.py                          # every page
    .venv/bin/python docs/run_examples.py docs/getting_started.md  # some pages

Prints each block's time; exits with status 1 naming the page and block that failed.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

DOCS = Path(__file__).resolve().parent
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def pages() -> list[Path]:
    skip = {"_build", "generated", "notebooks"}
    return sorted(p for p in DOCS.rglob("*.md") if not skip & set(p.relative_to(DOCS).parts))


def blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def run_page(page: Path) -> bool:
    """Run ``page``'s blocks in one namespace; print times; False on the first failure."""
    module = types.ModuleType("docs_example")  # a real module: dataclasses look their class's module up
    sys.modules[module.__name__] = module
    namespace = module.__dict__
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            for index, code in enumerate(blocks(page)):
                start = time.perf_counter()
                try:
                    exec(compile(code, f"{page.name} python block {index}", "exec"), namespace)
                except Exception:
                    traceback.print_exc()
                    print(f"FAILED {page.relative_to(DOCS)} block {index}: {code.strip().splitlines()[0]!r}")
                    return False
                print(f"  {page.relative_to(DOCS)} block {index}: {time.perf_counter() - start:.1f} s", flush=True)
        finally:
            os.chdir(cwd)
    return True


def main(argv: list[str]) -> int:
    chosen = [Path(a).resolve() for a in argv] or pages()
    failed = [p for p in chosen if blocks(p) and not run_page(p)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
