"""Smoke tests of the benchmark suite (benchmarks/) and the lab (benchmarks/lab/): tiny sizes,
one repeat, no timing claims; where runs write, and the indexes of the lab and the results."""

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import pytest

from benchmarks import output, run, timing

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = [name for name in ("equinox", "torch") if importlib.util.find_spec(name) is not None]


def test_presets_hold_the_target_shapes():
    args = run.resolve(run.parser().parse_args(["--quick"]))
    assert (args.batch, args.input_size, args.hidden_size, args.dtype) == (32, 128, 128, "float32")
    assert args.lengths == [64, 128, 256, 512, 1024, 2048]
    args = run.resolve(run.parser().parse_args(["--preset", "full", "--cells", "lstm,gru", "--modes", "bwd",
                                                "--lengths", "2^6", "100", "--batch", "4", "--tiny"]))
    assert args.lengths == [64, 100] and args.cells == ["lstm", "gru"] and args.modes == ["fwd+bwd"]
    assert args.batch == 4 and args.hidden_size == 8  # explicit options beat --tiny, --tiny beats the preset
    with pytest.raises(SystemExit):
        run.resolve(run.parser().parse_args(["--cells", "transformer"]))


@pytest.mark.parametrize("cores, batch, expected", [(2, 32, 2), (3, 32, 2), (16, 12, 12), (1, 7, 1), (6, 7, 1)])
def test_host_devices_auto_takes_the_most_cores_that_divide_the_batch(monkeypatch, cores, batch, expected):
    monkeypatch.setattr(run, "_cpu_count", lambda: cores)
    args = run.resolve(run.parser().parse_args(["--host-devices", "auto", "--batch", str(batch)]))
    assert args.host_devices == expected
    with pytest.raises(SystemExit):
        run.parser().parse_args(["--host-devices", "0"])


@pytest.mark.slow  # every system, both modes, plots: make test-all runs it
def test_suite_writes_json_markdown_and_plots(tmp_path, capsys):
    systems = ["rnnjax", "rnnjax-remat", "flax", "attention", *OPTIONAL]
    cells, modes, lengths = ["lstm"], ["fwd", "fwd+bwd"], [8]
    result = run.main(["--tiny", "--cells", *cells, "--lengths", *map(str, lengths), "--systems", *systems,
                       "--vmap-length", "8", "--check", "--out", str(tmp_path)])
    out = capsys.readouterr().out

    data = json.loads((tmp_path / "results.json").read_text())
    meta = data["meta"]
    assert meta["device"]["platform"] and meta["versions"]["jax"] and meta["cpu_count"] >= 1
    assert meta["command"].startswith("python -m benchmarks.run --tiny")
    got = {(r["system"], r["cell"], r["mode"], r["T"]): r for r in data["records"]}
    for mode in modes:
        expected = ["rnnjax", "rnnjax-vmap", "flax", *OPTIONAL] + (["rnnjax-remat"] if mode == "fwd+bwd" else [])
        for system in expected:
            rec = got[(system, "lstm", mode, 8)]
            assert rec["status"] == "ok", rec
            assert rec["median_s"] > 0 and rec["repeats"] == 1 and rec["per_step_us"] > 0
            if system != "torch":
                assert rec["compile_s"] > 0 and rec["memory_source"] == "xla-memory-analysis"
                assert rec["memory_bytes"] > 0
            if system in ("rnnjax-remat", "rnnjax-vmap"):  # --check: same numbers as rnnjax
                assert rec["max_abs_diff_vs_rnnjax"] < 1e-5
        assert got[("attention", "*", mode, 8)]["status"] == "ok"
    assert ("rnnjax-remat", "lstm", "fwd", 8) not in got  # remat's forward is rnnjax's
    assert set(data["derived"]["vmap_over_batched"]) == {f"lstm {m}" for m in modes}
    for mode in modes:  # the ratio comes from the two compiled calls run in alternation
        ratio = got[("rnnjax-vmap", "lstm", mode, 8)]["vmap_over_batched_interleaved"]
        assert ratio > 0 and data["derived"]["vmap_over_batched"][f"lstm {mode}"] == ratio

    md = (tmp_path / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| cell | mode | T |"))
    assert "rnnjax/flax" in header and all(s in header for s in systems)
    for mode in modes:
        assert f"| LSTM | {mode} | 8 |" in md
    # The terminal gets the compact headline table (default and fastest rnnjax, the peers,
    # ratios) and the paths; the full table stays in results.md.
    headline = "| cell | mode | rnnjax | fastest rnnjax (which) | flax | torch | rnnjax/peer | fastest/peer |"
    assert headline in out and headline in md and header not in out
    rows = {line.split(" | ")[1]: line for line in out.splitlines() if line.startswith("| LSTM |")}
    assert set(rows) == set(modes) and "(rnnjax" in rows["fwd+bwd"]
    assert str(tmp_path / "results.json") in out and str(tmp_path / "results.md") in out

    for name in ("time_memory", "time", "memory", "compile"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert set(result["files"]) >= {"json", "md", "time_memory", "time", "memory", "compile"}


@pytest.mark.slow  # a fresh process with 2 host devices: make test-all runs it
def test_host_devices_and_sharded_rnnjax_matches_unsharded(tmp_path):
    """In a fresh process: --host-devices sets XLA_FLAGS before JAX starts; the shard_map
    system (LSTM: tuple carry; LRU: complex carry; minGRU: no peer) gives rnnjax's outputs
    and gradients; rows of cells without a peer are written too. --malloc reuse is set
    (mallopt) before JAX starts and recorded."""
    script = textwrap.dedent(f"""
        import sys
        import benchmarks.run as run
        assert "jax" not in sys.modules, "benchmarks.run must not import jax at import time"
        run.main(["--tiny", "--host-devices", "2", "--systems", "rnnjax", "rnnjax-shard", "--cells", "lstm",
                  "lru", "--lengths", "8", "--vmap-length", "0", "--check", "--no-plot", "--malloc", "reuse",
                  "--out", {str(tmp_path)!r}])
        import jax
        assert jax.local_device_count() == 2
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert "--xla_force_host_platform_device_count=2" in data["meta"]["xla_flags"]
    import platform
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert data["meta"]["malloc"].startswith("glibc mallopt: M_ARENA_MAX=1"), data["meta"]["malloc"]
    assert all(r["page_faults_per_call"] >= 0 for r in data["records"] if r["status"] == "ok")
    shard = [r for r in data["records"] if r["system"] == "rnnjax-shard"]
    assert {(r["cell"], r["mode"]) for r in shard} == {(c, m) for c in ("lstm", "lru") for m in ("fwd", "fwd+bwd")}
    for rec in shard:
        assert rec["status"] == "ok", rec
        assert rec["max_abs_diff_vs_rnnjax"] < 1e-5, rec
    md = (tmp_path / "results.md").read_text()
    assert "| LRU | fwd+bwd | 8 |" in md and "rnnjax-shard" in md


def test_timing_interleaves_calls_warms_up_and_times_compilation_apart():
    calls = []
    runs = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    results = timing.compare(runs, rounds=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-ups first, then rounds in alternation
    for result in results.values():
        assert len(result.times_s) == 3 and result.first_s >= 0 and result.compile_s is None
        assert result.min_s <= result.median_s
    assert len(timing.time_calls(runs["a"], 4)) == 4 and calls.count("a") == 9

    compiled = timing.compile_ahead(lambda x, y: x * y, jnp.arange(3.0), 2.0)
    assert compiled.compile_s >= compiled.lower_s > 0
    assert compiled.run().tolist() == [0.0, 2.0, 4.0]
    result = timing.measure(compiled, repeats=2)
    assert result.compile_s == compiled.compile_s and len(result.times_s) == 2
    assert timing.minor_faults() is None or timing.minor_faults() >= 0


EXPERIMENTS = {  # module -> (smallest arguments, a line its output must hold)
    "batch_split_experiment": (["--batch", "4", "--hidden", "8", "--length", "8", "--repeats", "1"], "split4 bwd"),
    "custom_vjp_experiment": (["--batch", "4", "--hidden", "8", "--length", "8", "--repeats", "1"], "custom"),
    "hoist_experiment": (["--length", "4", "--repeats", "1"], "hoisted  fwd+bwd"),
    "layout_experiment": (["elman", "4"], "batch_major"),
    "interleaved_peers": (["--cells", "gru", "--systems", "rnnjax", "flax", "--batch", "2", "--hidden", "4",
                           "--length", "4", "--rounds", "1"], "rnnjax/flax"),
    "newton_solve": (["--sizes", "16:8", "--lengths", "8", "--batch", "2", "--hidden", "4", "--repeats", "1"],
                     "ParaGRU fwd+bwd T=8"),
    "split_transpose": (["--batch", "2", "--hidden", "4", "--length", "4", "--repeats", "1"], "split  pads in the optimised HLO: 0"),
    "data_parallel": (["--tiny", "--out", "{tmp}/data_parallel"], "| 1 device, fused |"),
    "clipped_scan": (["--tiny"], "  associative  ys"),
    "affine_scan": (["--ops", "gla_key", "--lengths", "128", "--rounds", "1"], "x time,"),
    "chunk_groups": (
        ["--ops", "gated_delta", "rwkv7", "--lengths", "128", "--rounds", "1", "--groups", "0", "2"],
        "carried-2",
    ),
    "chunk_states": (["--lengths", "128", "--repeats", "1"], "x time,"),
    "separable_span": (["--per-step", "0.5", "--length", "64", "--rounds", "1"], "bound 120: T=64"),
    "cond_checkpoint": (["--ops", "rwkv7", "--lengths", "64", "--repeats", "1"], "x time,"),
    "newton_outputs": (["--lengths", "8", "--batch", "2", "--hidden", "4", "--repeats", "1"], "newton/sequential"),
    "newton_variant": (["--tiny"], "ParaLSTM     quasi-deer  deer"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_decision_scripts_run_at_their_smallest_sizes(name, tmp_path, capsys):
    argv, expected = EXPERIMENTS[name]
    module = importlib.import_module(f"benchmarks.lab.{name}")
    module.main([a.format(tmp=tmp_path) for a in argv])
    assert expected in capsys.readouterr().out


def test_compare_hlo_ignores_names_and_locations_but_not_instructions():
    from benchmarks.lab.compare_hlo import normalised

    a = 'ENTRY %main.12 {\n  %dot.3 = f32[2,2] dot(%p.1, %p.2), metadata={op_name="a" stack_frame_id=4}\n}'
    b = 'ENTRY %main.7 {\n  %dot.9 = f32[2,2] dot(%q.5, %q.6), metadata={op_name="b" stack_frame_id=8}\n}'
    c = b.replace("dot(", "add(")
    assert normalised(a) == normalised(b) != normalised(c)


def test_runs_write_outside_the_tracked_tree_unless_told():
    """make bench on a fresh clone must leave git status clean: the suite's and the lab's
    default folders are relative to the current directory and git-ignored."""
    from benchmarks.lab import precision_drift

    defaults = [run.default_out("NVIDIA H200", "gpu"), precision_drift.parse_args([]).out]
    assert defaults[0] == Path("bench-results/nvidia-h200-gpu")
    assert all(not p.is_absolute() and p.parts[0] == output.ROOT.name for p in defaults), defaults
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = [str(p / "results.json") for p in defaults]
    ignored = subprocess.run([git, "check-ignore", *paths], check=False, cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == paths, ignored


def test_the_suite_does_not_import_the_lab():
    offenders = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("benchmarks.lab")]
    assert not offenders, offenders


def test_the_lab_and_results_indexes_list_every_entry():
    lab = ROOT / "benchmarks" / "lab"
    index = (lab / "README.md").read_text()
    scripts = [p.name for p in sorted(lab.iterdir()) if p.suffix in (".py", ".sh") and p.name != "__init__.py"]
    assert scripts and [s for s in scripts if f"| `{s}` |" not in index] == []

    results = ROOT / "benchmarks" / "results"
    index = (results / "README.md").read_text()
    entries = sorted({p.name.split(".")[0] for p in results.iterdir() if p.name != "README.md"})
    assert [e for e in entries if not re.fullmatch(r"[a-z0-9]+-[A-Za-z0-9-]+-\d{8}", e)] == []
    assert [e for e in entries if f"| `{e}" not in index] == []


@pytest.mark.slow
def test_the_linear_attention_benchmark_runs_at_its_tiny_sizes(tmp_path):
    """Every op, mode and system at T=64: times and memory for each, the Triton peers skipped
    on a CPU with a note, the Markdown table written."""
    from benchmarks import linear_attention

    out = tmp_path / "la"
    assert linear_attention.main(["--tiny", "--systems", "sequential", "chunked", "attention", "fla", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    timed = {(r["op"], r["mode"], r["system"]) for r in rows if r.get("median_ms")}
    assert len(timed) == len(linear_attention.OPS) * 2 * 3, sorted(timed)
    assert all(r.get("note") for r in rows if r["system"] == "fla")
    assert "| gla_head | 64 | fwd+bwd |" in (out / "results.md").read_text()


@pytest.mark.slow  # two fresh JAX processes
def test_the_linear_attention_benchmark_measures_rows_in_fresh_processes(tmp_path):
    """--order isolated: each row comes back from its own process with a time and memory, in
    the order asked, and a row whose process fails carries a note instead of stopping the sweep."""
    from benchmarks import linear_attention

    out = tmp_path / "la"
    argv = ["--tiny", "--order", "isolated", "--ops", "gla_head", "--modes", "fwd", "--systems", "chunked",
            "no-such-system", "--out", str(out)]  # fmt: skip
    assert linear_attention.main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["op"], r["mode"], r["system"]) for r in rows] == [("gla_head", "fwd", "chunked"),
                                                                  ("gla_head", "fwd", "no-such-system")]  # fmt: skip
    assert rows[0]["median_ms"] > 0 and rows[0]["peak_mb"] > 0
    assert "median_ms" not in rows[1] and rows[1]["note"]


@pytest.mark.slow  # two mixers compiled and trained at tiny sizes: seconds
def test_the_char_lm_mixers_benchmark_records_curves_at_its_tiny_sizes(tmp_path):
    """Attention and GLA at --tiny: per mixer, a train curve whose steps, tokens and seconds
    increase, finite bits/char, the held-out evaluations; the baselines and the table."""
    import math

    from benchmarks import char_lm_mixers

    out = tmp_path / "clm"
    char_lm_mixers.main(["--tiny", "--mixers", "attention", "gla", "--out", str(out)])
    data = json.loads((out / "results.json").read_text())
    meta = data["meta"]
    assert 0 < meta["bigram_bits"] < meta["unigram_bits"] < math.log2(meta["vocab"])
    assert meta["environment"]["jax"] and meta["config"]["threshold"] == meta["bigram_bits"]
    records = {r["mixer"]: r for r in data["records"]}
    assert sorted(records) == ["attention", "gla"] and all("error" not in r for r in records.values())
    for r in records.values():
        curve = r["curve"]
        for key in ("step", "tokens", "seconds"):
            values = [c[key] for c in curve]
            assert values[0] > 0 and all(b > a for a, b in zip(values, values[1:])), (r["mixer"], key, values)
        assert (curve[-1]["step"], curve[-1]["tokens"], curve[-1]["seconds"]) == (r["steps"], r["tokens"], r["train_s"])
        bits = [c["bits"] for c in curve] + [e["bits"] for e in r["evals"]]
        assert all(math.isfinite(b) for b in bits)  # 6 tiny steps need not lower the loss (one run rose)
        assert [e["step"] for e in r["evals"]] == [0, 3, 6] and r["evals"][-1]["bits"] == r["final_held_out_bits"]
        assert r["first_call_s"] > 0 and r["params"] > r["mixer_params"] > 0
    table = (out / "results.md").read_text()
    assert "| attention | attention |" in table and "| gla | Chunked |" in table


def test_mqar_data_is_zoologys():
    """Keys distinct from the first half of the vocabulary, each followed by its value from the
    second half; each key queried once after the pairs, labelled with its value, at an even
    offset; every other label ignored."""
    import numpy as np

    from benchmarks import recall

    pairs, seq_len, vocab = 8, 64, 256
    x, y = recall.mqar(200, seq_len, vocab, pairs, seed=3)
    assert x.shape == y.shape == (200, seq_len) and x.min() >= 0 and x.max() < vocab
    for xs, ys in zip(x, y):
        keys, values = xs[: 2 * pairs : 2], xs[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and keys.min() >= 1 and keys.max() < vocab // 2
        assert len(set(values)) == pairs and values.min() >= vocab // 2
        (queried,) = np.nonzero(ys != recall.IGNORE)
        assert len(queried) == pairs and queried.min() >= 2 * pairs and all((queried - 2 * pairs) % 2 == 0)
        answer = dict(zip(keys, values))
        assert all(ys[t] == answer[xs[t]] for t in queried)
    gaps = (np.nonzero(y != recall.IGNORE)[1] - 2 * pairs) // 2
    # The power law (a = 0.01) puts queries near the pairs: 37% of them in the first 4 of the 24
    # gaps here (1600 draws: +-1.2%), where uniform gaps would put 1/6 there.
    assert np.mean(gaps < 4) > 0.3
    with pytest.raises(ValueError, match="4 \\* pairs <= seq_len"):
        recall.mqar(2, 16, 64, 5, seed=0)


def test_selective_copying_data():
    import numpy as np

    from benchmarks import recall

    x, y = recall.selective_copying(50, 20, 4, 6, seed=1)
    assert x.shape == (50, 24) and (x[:, 20:] == 1).all()
    for xs, ys in zip(x, y):
        coloured = xs[:20][xs[:20] >= 2]
        assert len(coloured) == 4 and (ys[20:] == coloured).all() and (ys[:20] == recall.IGNORE).all()
        assert set(xs[:20]) <= {0, *range(2, 8)}


@pytest.mark.slow  # two mixers trained for 3 steps on both tasks: compiles
def test_the_recall_benchmark_runs_at_its_tiny_sizes(tmp_path):
    from benchmarks import recall

    data = recall.main(["--tiny", "--mixers", "attention", "gru", "--out", str(tmp_path)])
    got = {(r["task"], r["mixer"]) for r in data["records"]}
    assert got == {(t, m) for t in ("mqar", "copy") for m in ("attention", "gru")}
    for r in data["records"]:
        assert all(0 <= a <= 1 for a in r["accuracy"].values()) and r["params"] > 0 and r["state_floats"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["records"]) == 4 and saved["meta"]["seconds"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| attention | 16 |" in table and "| gru | 16 |" in table
