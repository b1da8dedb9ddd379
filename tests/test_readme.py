"""The README's Python examples run as written, in order, in one namespace of a fresh Python
process (the first one exposes the CPU cores as devices, which only a process that has not
used JAX yet can do); those that need a PyTorch or Keras object are left out."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
RUNNABLE = [b for b in BLOCKS if not any(k in b for k in ("torch_module", "keras_layer"))]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_examples_are_valid_python(index):
    compile(BLOCKS[index], f"README.md python block {index}", "exec")  # a SyntaxError fails it


@pytest.mark.slow  # about 100 s of compiles: make test-all runs it
def test_readme_examples_run(tmp_path):
    script = tmp_path / "readme_examples.py"
    script.write_text("\n\n".join(f"# README python block {i}\n{block}" for i, block in enumerate(RUNNABLE)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"README examples failed:\n{proc.stderr[-4000:]}"
