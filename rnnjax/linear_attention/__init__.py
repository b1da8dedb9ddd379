"""Matrix-state recurrences as ops on projected ``q, k, v`` and gates: gated linear attention
(linear attention, RetNet, Mamba2's SSD, GLA) and xLSTM's mLSTM (:mod:`rnnjax.linear_attention.ops`)."""

from rnnjax.cells.matrix_state import MLSTMState
from rnnjax.linear_attention.ops import gla, mlstm

__all__ = ["gla", "mlstm", "MLSTMState"]
