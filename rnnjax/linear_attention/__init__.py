"""Matrix-state recurrences as ops on projected ``q, k, v`` and gates: gated linear attention
(linear attention, RetNet, Mamba2's SSD, GLA) and xLSTM's mLSTM (:mod:`rnnjax.linear_attention.ops`),
the delta rule (DeltaNet, Gated DeltaNet, KDA) and RWKV-7's diagonal-plus-low-rank recurrence
(:mod:`rnnjax.linear_attention.delta`)."""

from rnnjax.cells.matrix_state import MLSTMState
from rnnjax.linear_attention.delta import delta_rule, rwkv7
from rnnjax.linear_attention.ops import gla, mlstm

__all__ = ["gla", "mlstm", "delta_rule", "rwkv7", "MLSTMState"]
