"""``rj.Kernel()``: a dense cell's recurrence in one GPU kernel per direction
(:mod:`rnnjax.engines.kernel`)."""

from __future__ import annotations

from typing import ClassVar

from rnnjax.cell import Cell, frozen
from rnnjax.engines import kernel
from rnnjax.methods.base import Method, methods_for


@frozen
class Kernel(Method):
    """A dense cell's whole recurrence in one GPU kernel per direction (Pallas; Triton on
    NVIDIA GPUs): the input products of all steps as one large product, then one kernel
    that loops over the steps with the carry on chip and the cell's own ``update`` traced
    in; its backward is one reverse kernel plus large products (:mod:`rnnjax.engines.kernel`).
    Dense cells: ``rj.Elman``, ``rj.LSTM``, ``rj.GRU`` with ``reset_after=True``, yours
    (:class:`rnnjax.cell.DenseCell`), and those inside ``rj.Mixed(..., carry_mode="keep")``.

    Args:
      block_batch: batch rows per kernel program (programs run in parallel, one per block);
        a power of two, at least 16 on a GPU.
      precision: the float32 products': ``"default"`` (TF32 on the GPU's tensor cores, as
        XLA's default and PyTorch's cuDNN RNNs), ``"highest"`` (full float32), or ``None``:
        what ``jax_default_matmul_precision`` says (unset: ``"default"``), like XLA's products.
      num_warps: Triton warps per program (8: no register spills at width 128; measured by
        ``benchmarks/lab/kernel_report.py``, see ``benchmarks/lab/DECISIONS.md``).
      weights: ``"stream"`` (read ``W_h`` from L2 at every step: any size) or ``"hold"``
        (read it once and keep it on chip: only where it fits in a multiprocessor's
        registers and shared memory, e.g. 16-bit or small ``W_h``).
      interpret: run the kernels in Pallas' interpreter (``None``: where the default backend
        is not a GPU). Interpreted, the engine is exact but slow: it is how the tests check
        it on CPU. ``rj.Auto()`` never picks this method on CPU.

    Gradients equal autodiff's up to float rounding (a ``jax.custom_vjp``); higher derivatives
    (``jax.hessian``, grad of grad) go through a ``lax.scan`` of the same steps; forward mode
    alone (``jax.jvp``) is refused, naming ``rj.Sequential()``. float64 runs in float64
    interpreted and is refused on a GPU, where carry widths must be powers of two.
    """

    name: ClassVar[str] = "kernel"
    block_batch: int = 16
    precision: str | None = None
    num_warps: int = 8
    weights: str = "stream"
    interpret: bool | None = None

    def __post_init__(self):
        kernel.check_options(self.block_batch, self.precision, self.num_warps, self.weights, self.interpret)

    def check(self, cell: Cell) -> None:
        if kernel.dense_cell_of(cell) is None:
            raise ValueError(
                f"rj.Kernel() needs a dense cell (rj.Elman, rj.LSTM, rj.GRU with reset_after=True: "
                f"rnnjax.cell.DenseCell), alone or in rj.Mixed(..., carry_mode='keep'); {type(cell).__name__} "
                f"with this configuration is not one. Methods that can run it: {methods_for(cell)}"
            )

    def run(self, cell, params, seqs):
        return kernel.run(
            cell,
            params,
            seqs,
            block_batch=int(self.block_batch),
            precision=self.precision,
            interpret=self.interpret,
            num_warps=int(self.num_warps),
            weights=self.weights,
        )
