"""Smoke test of the demonstration `make demo` runs (a few steps, a small model)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import rnnjax as rj

DEMO = Path(__file__).resolve().parents[1] / "examples" / "char_lm.py"


@pytest.mark.slow  # trains, samples and checkpoints the demo model: make test-all runs it
def test_char_lm_demo_runs_and_reports(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("char_lm", DEMO)
    char_lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(char_lm)
    result = char_lm.main(steps=3, hidden=16, batch=4, window=16, checkpoint_dir=str(tmp_path))
    assert np.isfinite(result["model_bits"])
    assert result["bigram_bits"] < result["unigram_bits"]  # the baselines are computed, not fixed
    assert all(text.startswith(prompt) and len(text) == len(prompt) + 160 for prompt, text in result["samples"].items())
    out = capsys.readouterr().out
    assert "held-out cross-entropy" in out and "train loss" in out
    assert result["restored_identical"] and rj.train.checkpoint_steps(tmp_path) == [3]  # trained via rnnjax.train
