"""The README's Python examples run as written, in order, in one namespace (those that need
no PyTorch or Keras object, and not those that configure JAX's devices, which only a fresh
process can do: tests/multidevice_checks.py runs that path)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
RUNNABLE = [b for b in BLOCKS if not any(k in b for k in ("torch_module", "keras_layer", "jax_num_cpu_devices"))]


def test_readme_has_examples():
    assert len(RUNNABLE) >= 1  # the first example; the guides' examples run in tests/test_docs.py


@pytest.mark.slow  # about 100 s of compiles: make test-all runs it
def test_readme_examples_run():
    namespace = {}
    exec("import jax, jax.numpy as jnp, rnnjax as rj\n", namespace)
    for index, block in enumerate(RUNNABLE):  # later blocks may use names from earlier ones
        first_line = block.strip().split("\n")[0]
        try:
            exec(compile(block, f"README.md python block {index}", "exec"), namespace)
        except Exception as error:  # name the block, keep the traceback
            pytest.fail(f"README python block {index} ({first_line!r}) failed: {error!r}")
