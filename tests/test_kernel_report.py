"""The readers of benchmarks/lab/kernel_report.py (ptxas -v, nvdisasm SASS, XLA's thunk
sequence), on excerpts of real output; no GPU toolchain needed."""

from benchmarks.lab import kernel_report as kr

PTXAS = """ptxas warning : Registers are spilled to local memory in function '_forward_kernel', 12492 bytes spill stores
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_forward_kernel' for 'sm_90a'
ptxas info    : Function properties for _forward_kernel
    9144 bytes stack frame, 12492 bytes spill stores, 14340 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 9144 bytes cumulative stack size
ptxas info    : Compiling entry function '_backward_kernel' for 'sm_90a'
ptxas info    : Function properties for _backward_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 184 registers, used 1 barriers, 16 bytes smem
"""

SASS = """        .section	.text._forward_kernel,"ax",@progbits
        /*0a70*/                   HMMA.1688.F32.TF32 R4, R8, R12, R4 ;
        /*0a80*/              @!P0 HMMA.1688.F32.TF32 R16, R8, R20, R16 ;
        /*0a90*/                   HGMMA.64x128x8.F32.TF32 R24, gdesc[UR4], R24 ;
        /*0aa0*/                   FFMA R1, R2, R3, R1 ;
        /*0ab0*/               @P1 FFMA.FTZ R1, R2, R3, R1 ;
        /*0ac0*/                   FMUL R5, R6, R7 ;
        /*0ad0*/                   LDL.64 R8, [R1+0x10] ;
        /*0ae0*/                   STL [R1+0x20], R9 ;
        /*0af0*/                   LDS.128 R12, [R3] ;
        /*0b00*/                   LDG.E.128 R12, desc[UR6][R2.64] ;
        /*0b10*/                   EXIT ;
"""

THUNKS = """003: kCustomKernel [...] gemm_fusion_dot grid: [131072, 1, 1] threads: [64, 1, 1]  shared_memory: 1024 bytes
004: kCustomKernel [...] _forward_kernel grid: [2, 1, 1] threads: [256, 1, 1]  shared_memory: 73728 bytes
"""


def test_ptxas_figures_per_kernel():
    figures = kr.ptxas_entries(PTXAS)
    assert figures["_forward_kernel"] == {
        "registers": 32,
        "stack_bytes": 9144,
        "spill_store_bytes": 12492,
        "spill_load_bytes": 14340,
        "static_smem_bytes": 0,
    }
    assert figures["_backward_kernel"]["registers"] == 184
    assert figures["_backward_kernel"]["static_smem_bytes"] == 16


def test_sass_counts_classes_predicated_instructions_and_tensor_forms():
    counts = kr.sass_counts(SASS)
    assert counts["total"] == 11
    assert (counts["tensor"], counts["ffma"], counts["fmul_fadd"]) == (3, 2, 1)
    assert (counts["ldl"], counts["stl"], counts["shared"], counts["global_ld"]) == (1, 1, 1, 1)
    assert counts["tensor_forms"] == {"HGMMA.64x128x8.F32.TF32": 1, "HMMA.1688.F32.TF32": 2}


def test_launches_read_grid_threads_and_dynamic_shared_memory():
    launches = kr.launches(THUNKS)
    assert launches["_forward_kernel"] == {"grid": [2, 1, 1], "threads": [256, 1, 1], "dynamic_smem_bytes": 73728}
    assert launches["gemm_fusion_dot"]["grid"] == [131072, 1, 1]


def test_markdown_has_a_row_per_kernel_and_names_errors():
    base = {"cell": "lstm", "hidden": 128, "dtype": "float32", "precision": "default", "weights": "stream"}
    row = {**base, "program": "fwd", "role": "forward", "warps": 8, **kr.sass_counts(SASS)}
    row.update(kr.ptxas_entries(PTXAS)["_forward_kernel"], **kr.launches(THUNKS)["_forward_kernel"])
    error = {**base, "weights": "hold", "program": "fwd", "error": "JaxRuntimeError: Shared memory size limit exceeded"}
    lines = kr.markdown([row, error]).splitlines()
    assert len(lines) == 4
    assert "| 2x1x1 | 8 | 32 | 12492/14340 | 73728 | 3 | 2 | 1 | 1/1 |" in lines[2]
    assert "error: JaxRuntimeError: Shared memory" in lines[3]
