"""Layers and inputs shared by the linen and NNX wrapper tests."""

import jax
import jax.numpy as jnp

import rnnjax as rj
from tests.cases import normal

D = 3
XS = normal(1, (2, 6, D))
LENGTHS = jnp.array([6, 3])
RESETS = jnp.zeros((2, 6), bool).at[0, 3].set(True).at[1, 1].set(True)

CASES = {
    "elman_cell": rj.Elman(4),  # a cell directly: wrapped as rj.RNN(cell)
    "lstm_proj": rj.RNN(rj.LSTM(4, proj_size=2)),
    "bigru": rj.Bidirectional(rj.RNN(rj.GRU(4))),
    "stack_dropout": rj.Stack([rj.RNN(rj.GRU(4)), rj.RNN(rj.LSTM(4, peephole=True))], dropout=0.3),
    "lru": rj.LRU(4),
    "mlstm": rj.MLSTM(heads=2, qk_head_size=2, v_head_size=3),  # a matrix-state cell: rj.Chunked() by default
}
EXPECTED_PARAMS = {
    "elman_cell": {"w_x": (3, 4), "w_h": (4, 4), "b": (4,)},
    "lstm_proj": {"w_x": (3, 16), "w_h": (2, 16), "b": (16,), "w_proj": (4, 2)},
    "bigru": {d: {"w_x": (3, 12), "w_h": (4, 12), "b_x": (12,), "b_h": (12,)} for d in ("forward", "backward")},
    "stack_dropout": {
        "layers_0": {"w_x": (3, 12), "w_h": (4, 12), "b_x": (12,), "b_h": (12,)},
        "layers_1": {"w_x": (4, 16), "w_h": (4, 16), "b": (16,), "w_peep": (3, 4)},
    },
    "lru": {"nu_log": (4,), "theta_log": (4,), "gamma_log": (4,), "b_re": (3, 4), "b_im": (3, 4),
            "c_re": (4, 3), "c_im": (4, 3), "d": (3,)},
    "mlstm": {"w": (3, 20), "w_gates": (3, 4), "b_gates": (4,), "norm": (2, 3), "w_out": (6, 3)},
}
