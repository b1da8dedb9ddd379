"""Where a benchmark run writes unless told: ``bench-results/`` under the current directory.

That folder is git-ignored, so a run from a checkout leaves ``git status`` clean. The
committed reference results (``benchmarks/results/``, indexed in its ``README.md``) change
only when a command names one of them with ``--out``.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path("bench-results")


def default_out(name: str) -> Path:
    """``bench-results/<name>``, relative to the current directory."""
    return ROOT / name
