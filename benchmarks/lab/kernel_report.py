"""Offline H100 report of ``rj.Kernel()``'s kernels: registers, spills, shared memory, grid and
the SASS instruction mix, from XLA's own GPU compiler on a machine without a GPU.

For each dense cell (Elman, LSTM, GRU), width, dtype (float32; bfloat16 as
``rj.Mixed(cell, "bfloat16")``) and ``weights`` ("stream", "hold"), it compiles ahead of time,
for a compile-only H100 (sm_90a), the forward pass (one forward kernel) and the gradient (the
forward kernel that keeps the carries, then the reverse kernel), runs ptxas (``-v``) and
nvdisasm on the PTX that XLA dumps, and counts per kernel: tensor-core instructions
(``HMMA``/``HGMMA``), FMA-unit ones (``FFMA``; ``FMUL``/``FADD`` beside them), local-memory
accesses (``LDL``/``STL``), shared-memory ones (``LDS``/``STS``/``LDSM``) and global loads.
The recipe is ``../shared/tools/gpu_offline/recipe.md``; its toolchain is not a dependency of
rnnjax and lives in its own virtual environment:

    python3 -m venv .venv-gpu-offline
    .venv-gpu-offline/bin/pip install "jax[cuda12-local]==0.10.2" absl-py optax \\
        nvidia-cuda-nvcc-cu12 nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump
    PYTHONPATH=. .venv-gpu-offline/bin/python -m benchmarks.lab.kernel_report            # everything
    PYTHONPATH=. .venv-gpu-offline/bin/python -m benchmarks.lab.kernel_report --cells lstm \\
        --widths 128 --dtypes float32 --weights stream --keep-sass

Writes ``report.json`` and ``report.md`` under ``bench-results/kernel-report/`` (git-ignored)
unless ``--out`` says otherwise, and prints the Markdown table. The parsing functions at the
top need only the standard library (``tests/test_kernel_report.py``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

# ---- reading the compiler's reports (standard library only) ----------------------------------

# An instruction line of `nvdisasm -c`: `/*0a70*/  @!P0 HMMA.1688.F32.TF32 R4, R8, R12, R4 ;`
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)")

# Instruction classes counted per kernel: name -> opcodes (the part before the first dot).
CLASSES = {
    "tensor": ("HMMA", "HGMMA", "IMMA", "IGMMA"),
    "ffma": ("FFMA",),
    "fmul_fadd": ("FMUL", "FADD"),
    "ldl": ("LDL",),
    "stl": ("STL",),
    "shared": ("LDS", "STS", "LDSM"),
    "global_ld": ("LDG",),
    "global_st": ("STG",),
}


def sass_counts(sass: str) -> dict:
    """Instruction counts of ``nvdisasm -c`` output: ``total``, each class of :data:`CLASSES`,
    and ``tensor_forms`` (each tensor-core opcode with its modifiers, e.g.
    ``HMMA.1688.F32.TF32``: the shape and the operand type)."""
    counts = dict.fromkeys(CLASSES, 0)
    counts["total"] = 0
    forms: dict[str, int] = {}
    by_opcode = {op: name for name, ops in CLASSES.items() for op in ops}
    for op, mods in _SASS_OP.findall(sass):
        counts["total"] += 1
        if op in by_opcode:
            counts[by_opcode[op]] += 1
        if by_opcode.get(op) == "tensor":
            forms[op + mods] = forms.get(op + mods, 0) + 1
    counts["tensor_forms"] = dict(sorted(forms.items()))
    return counts


def ptxas_entries(text: str) -> dict:
    """``{kernel: figures}`` from ``ptxas -v`` output: ``registers``, ``stack_bytes``,
    ``spill_store_bytes``, ``spill_load_bytes``, ``static_smem_bytes``."""
    out = {}
    for m in re.finditer(r"Compiling entry function '([^']+)'(.*?)(?=Compiling entry function|\Z)", text, re.S):
        body, d = m.group(2), {}
        if r := re.search(r"Used (\d+) registers", body):
            d["registers"] = int(r.group(1))
        if r := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", body):
            d["stack_bytes"], d["spill_store_bytes"], d["spill_load_bytes"] = map(int, r.groups())
        r = re.search(r"(\d+) bytes smem", body)
        d["static_smem_bytes"] = int(r.group(1)) if r else 0
        out[m.group(1)] = d
    return out


def launches(thunks: str) -> dict:
    """``{kernel: {"grid": [x, y, z], "threads": [x, y, z], "dynamic_smem_bytes": n}}`` from
    XLA's ``*thunk_sequence.txt`` (the kernel launches of a compiled program), lines such as
    ``004: kCustomKernel [...] _forward_kernel grid: [2, 1, 1] threads: [128, 1, 1]  shared_memory: 73728 bytes``."""
    out = {}
    for m in re.finditer(
        r"(\S+) grid: \[(\d+), (\d+), (\d+)\] threads: \[(\d+), (\d+), (\d+)\]\s+"
        r"shared_memory: (\d+) bytes",
        thunks,
    ):
        n = [int(g) for g in m.groups()[1:]]
        out[m.group(1)] = {"grid": n[:3], "threads": n[3:6], "dynamic_smem_bytes": n[6]}
    return out


def markdown(rows: list[dict]) -> str:
    """The report as one Markdown table, a row per kernel."""
    head = (
        "cell",
        "H",
        "dtype",
        "precision",
        "weights",
        "program",
        "kernel",
        "grid",
        "warps",
        "regs",
        "spill st/ld B",
        "smem B",
        "tensor",
        "FFMA",
        "FMUL+FADD",
        "LDL/STL",
        "LDS/STS",
        "LDG",
        "tensor forms",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['cell']} | {r['hidden']} | {r['dtype']} | {r['precision']} | {r['weights']} | "
                f"{r['program']} | error: {r['error'][:120]} |" + " |" * (len(head) - 7)
            )
            continue
        forms = ", ".join(f"{k} {v}" for k, v in r["tensor_forms"].items()) or "-"
        smem = r.get("static_smem_bytes", 0) + r.get("dynamic_smem_bytes", 0)
        lines.append(
            "| "
            + " | ".join(
                str(x)
                for x in (
                    r["cell"],
                    r["hidden"],
                    r["dtype"],
                    r["precision"],
                    r["weights"],
                    r["program"],
                    r["role"],
                    "x".join(map(str, r.get("grid", ["?"]))),
                    r.get("warps", "?"),
                    r.get("registers", "?"),
                    f"{r.get('spill_store_bytes', '?')}/{r.get('spill_load_bytes', '?')}",
                    smem,
                    r["tensor"],
                    r["ffma"],
                    r["fmul_fadd"],
                    f"{r['ldl']}/{r['stl']}",
                    r["shared"],
                    r["global_ld"],
                    forms,
                )
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


# ---- compiling for a compile-only H100 -------------------------------------------------------

# A trimmed copy of XLA's specs/h100_sxm.txtpb, as ../shared/tools/gpu_offline/offline_ptxas.py.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472
  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84942979072 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def _cuda_root(out: Path) -> Path:
    """A CUDA root made of symlinks to the pip wheels' ptxas (12.9, what XLA uses), nvdisasm and
    libdevice, so XLA and this script run the same tools."""
    site = Path(sysconfig.get_paths()["purelib"])
    root = out / "cudaroot"
    (root / "bin").mkdir(parents=True, exist_ok=True)
    (root / "nvvm" / "libdevice").mkdir(parents=True, exist_ok=True)
    tools = {
        "bin/ptxas": [site / "nvidia/cuda_nvcc/bin/ptxas", site / "triton/backends/nvidia/bin/ptxas"],
        "bin/nvdisasm": [site / "nvidia/cu13/bin/nvdisasm", site / "triton/backends/nvidia/bin/nvdisasm"],
        "nvvm/libdevice/libdevice.10.bc": [
            site / "nvidia/cuda_nvcc/nvvm/libdevice/libdevice.10.bc",
            site / "triton/backends/nvidia/lib/libdevice.10.bc",
        ],
    }
    for dst, srcs in tools.items():
        src = next((s for s in srcs if s.exists()), None)
        if src is None:
            sys.exit(f"{dst.split('/')[-1]} not found under {site}: install the toolchain (see --help)")
        if not (root / dst).is_symlink():
            (root / dst).symlink_to(src)
    return root


def _setup(out: Path) -> Path:
    """Environment for the compile-only device; must run before jax is imported."""
    if "jax" in sys.modules:
        sys.exit("kernel_report must set up CUDA before jax is imported")
    root = _cuda_root(out)
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    os.environ["CUDA_ROOT"] = str(root)
    os.environ["PATH"] = f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return root


def _run(cmd) -> tuple[int, str]:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return r.returncode, r.stdout + r.stderr


def compile_case(
    cell_name, hidden, dtype, precision, weights, program, *, batch, steps, root, keep, num_warps, block_batch
):
    """Rows (one per Pallas kernel) of one program compiled for the H100."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    import rnnjax as rj

    topo = topologies.get_topology_desc("h100", "cuda", target_config=H100_TARGET_CONFIG, topology="1x1x1")
    sharding = SingleDeviceSharding(topo.devices[0])
    base = {"elman": rj.Elman, "lstm": rj.LSTM, "gru": rj.GRU}[cell_name](hidden)
    cell = base if dtype == "float32" else rj.Mixed(base, dtype)
    method = rj.Kernel(
        weights=weights, precision=precision, interpret=False, num_warps=num_warps, block_batch=block_batch
    )
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)  # noqa: E731
    params = jax.tree.map(spec, jax.eval_shape(lambda: base.init(jax.random.key(0), hidden)))
    xs = spec(jax.ShapeDtypeStruct((batch, steps, hidden), jnp.float32))

    def forward(p, xs):
        return rj.scan(cell, p, xs, method=method)[0]

    def loss(p, xs):
        return jnp.sum(forward(p, xs).astype(jnp.float32) ** 2)

    fn = forward if program == "fwd" else jax.grad(loss, argnums=(0, 1))
    label = f"{cell_name}-{hidden}-{dtype}-{precision}-{weights}-{program}"
    tmp = Path(tempfile.mkdtemp(prefix=label, dir=root.parent))
    try:
        jax.jit(fn).trace(params, xs).lower(lowering_platforms=("cuda",)).compile(
            compiler_options={"xla_dump_to": str(tmp)}
        )
        thunks = "".join(Path(f).read_text() for f in glob.glob(str(tmp / "*thunk_sequence.txt")))
        grid = launches(thunks)
        rows = []
        for ptx in sorted(tmp.glob("*.ptx")):
            if not re.search(r"\.entry _(forward|backward)_kernel", ptx.read_text()):
                continue  # XLA's own fusions (the input product, transposes, casts)
            cubin = ptx.with_suffix(".cubin")
            rc, out = _run(
                [str(root / "bin/ptxas"), "-arch=sm_90a", "--warn-on-spills", "-v", str(ptx), "-o", str(cubin)]
            )
            if rc:
                raise RuntimeError(f"ptxas failed on {ptx.name}: {out[-500:]}")
            _, sass = _run([str(root / "bin/nvdisasm"), "-c", str(cubin)])
            for kernel, figs in ptxas_entries(out).items():
                funcs = re.split(r"\.section\s+\.text\.", sass)
                body = next((f for f in funcs if f.startswith(kernel)), sass)
                rows.append({"kernel": kernel, **figs, **grid.get(kernel, {}), **sass_counts(body)})
                if keep:
                    dest = keep / f"{label}-{kernel}"
                    shutil.copy(ptx, dest.with_suffix(".ptx"))
                    dest.with_suffix(".sass").write_text(body)
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _role(program, kernel):
    """Which kernel of ``rj.Kernel()`` a row is: the plain forward, the forward that keeps the
    carries (the gradient's), or the reverse kernel."""
    if kernel.startswith("_backward_kernel"):
        return "reverse"
    return "forward" if program == "fwd" else "forward+carries"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--cells", nargs="+", default=["elman", "lstm", "gru"], choices=["elman", "lstm", "gru"])
    p.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument(
        "--precisions",
        nargs="+",
        default=["default", "highest"],
        choices=["default", "highest"],
        help="float32 products: TF32 (default) or three TF32 passes (highest); 16-bit rows use their own",
    )
    p.add_argument("--weights", nargs="+", default=["stream", "hold"], choices=["stream", "hold"])
    p.add_argument("--programs", nargs="+", default=["fwd", "grad"], choices=["fwd", "grad"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1024)
    p.add_argument("--num-warps", type=int, default=None, help="rj.Kernel's num_warps (default: its own)")
    p.add_argument("--block-batch", type=int, default=None, help="rj.Kernel's block_batch (default: its own)")
    p.add_argument("--keep-sass", action="store_true", help="keep each kernel's PTX and SASS beside the report")
    p.add_argument("--out", type=Path, default=Path("bench-results/kernel-report"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    root = _setup(args.out.resolve())
    keep = None
    if args.keep_sass:
        keep = args.out / "sass"
        keep.mkdir(exist_ok=True)

    import rnnjax as rj

    defaults = rj.Kernel()
    warps = args.num_warps or defaults.num_warps
    block_batch = args.block_batch or defaults.block_batch
    cases = [
        (c, h, d, prec, w, prog)
        for c in args.cells
        for h in args.widths
        for d in args.dtypes
        for prec in (args.precisions if d == "float32" else ["default"])
        for w in args.weights
        for prog in args.programs
    ]
    rows = []
    for cell, hidden, dtype, precision, weights, program in cases:
        case = {
            "cell": cell,
            "hidden": hidden,
            "dtype": dtype,
            "precision": precision if dtype == "float32" else "-",
            "weights": weights,
            "program": program,
            "batch": args.batch,
            "steps": args.steps,
            "warps": warps,
            "block_batch": block_batch,
        }
        t0 = time.perf_counter()
        try:
            kernels = compile_case(
                cell,
                hidden,
                dtype,
                precision,
                weights,
                program,
                batch=args.batch,
                steps=args.steps,
                root=root,
                keep=keep,
                num_warps=warps,
                block_batch=block_batch,
            )
        except Exception as e:  # noqa: BLE001 -- a configuration that does not compile is a finding
            rows.append({**case, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            print(f"{cell} H={hidden} {dtype} {precision} {weights} {program}: {rows[-1]['error']}", flush=True)
        else:
            rows += [{**case, "role": _role(program, k["kernel"]), **k} for k in kernels]
            print(
                f"{cell} H={hidden} {dtype} {precision} {weights} {program}: {len(kernels)} kernels, "
                f"{time.perf_counter() - t0:.1f} s",
                flush=True,
            )
        # Written after every case: a long run stopped early keeps what it compiled.
        table = markdown(rows)
        (args.out / "report.json").write_text(json.dumps(rows, indent=1))
        (args.out / "report.md").write_text(table)
    print()
    print(table)
    print(f"written: {args.out / 'report.md'}, {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
