"""The README's Python examples run as written (those that need no PyTorch or Keras object)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
RUNNABLE = [b for b in BLOCKS if "torch_module" not in b and "keras_layer" not in b]


def test_readme_has_examples():
    assert len(RUNNABLE) >= 2


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_readme_example_runs(index):
    namespace = {}
    exec("import jax, jax.numpy as jnp, rnnjax as rj\n", namespace)
    for block in RUNNABLE[: index + 1]:  # later blocks may use names from earlier ones
        exec(compile(block, f"README.md block {index}", "exec"), namespace)
