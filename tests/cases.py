"""The cell configurations every generic test (tests/test_cells.py, tests/test_scan.py) runs over.

Add a cell here and it is checked against the plain-loop reference, with and without jit,
under vmap, with check_grads and for recompilation. Keep hidden sizes small: every entry
costs several compilations.
"""

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj

INPUT_SIZE = 3
SPATIAL = (4, 4)  # (H, W) of ConvLSTM inputs

CELL_CASES = {
    "elman": rj.Elman(5),
    "elman_relu_nobias": rj.Elman(5, activation="relu", use_bias=False),
    "lstm": rj.LSTM(5),
    "lstm_proj_peephole": rj.LSTM(5, proj_size=3, peephole=True),
    "gru": rj.GRU(5),
    "gru_reset_before": rj.GRU(5, reset_after=False),
    # Cells of other families are appended below, one or two configurations each.
    "mgu": rj.MGU(5),
    "mgu_nobias_relu": rj.MGU(5, use_bias=False, activation="relu"),
    "indrnn": rj.IndRNN(5),
    "indrnn_tanh_clipped": rj.IndRNN(5, activation="tanh", recurrent_max_abs=0.5),
    "mingru": rj.MinGRU(5),
    "minlstm": rj.MinLSTM(5),
    "minlstm_identity_nobias": rj.MinLSTM(5, candidate="identity", use_bias=False),
    "lru": rj.LRU(5),
    "lru_ring": rj.LRU(5, r_min=0.5, r_max=0.99, max_phase=0.5),
    "rglru": rj.RGLRU(INPUT_SIZE, num_heads=3),  # width = input size; 1 x 1 gate blocks
    "convlstm": rj.ConvLSTM(2, kernel_size=3),
    "paragru": rj.ParaGRU(5),
    "paralstm": rj.ParaLSTM(5),
    "mlstm": rj.MLSTM(heads=2, qk_head_size=4, v_head_size=4),
    "gla": rj.GLA(heads=2, key_size=4, value_size=4),
    "mamba2": rj.Mamba2(heads=2, head_size=4, state_size=4),
    "deltanet": rj.DeltaNet(heads=2, key_size=4, value_size=4),
    "gated_deltanet": rj.GatedDeltaNet(heads=2, key_size=4, value_size=4),
    # The key width (2 * 4) need not be the input's (3); w_out starts at zero (the reference's).
    "rwkv7": rj.RWKV7(hidden_size=3, heads=2, head_size=4, decay_rank=4, a_rank=4, gate_rank=4),
    # w_h random: its default init is zeros (the reference's).
    "slstm": rj.SLSTM(4, num_heads=2, recurrent_kernel_init=jax.nn.initializers.normal(0.5)),
}


def step_shape(cell, batch_shape=()):
    """Shape of one step's input for ``cell`` with the given batch shape."""
    if cell.input_ndim == 3:
        return (*batch_shape, *SPATIAL, INPUT_SIZE)
    return (*batch_shape, INPUT_SIZE)


def seq_shape(cell, batch_shape, steps):
    """Shape of a sequence ``xs`` for ``cell``: ``(*batch, T, *features)``."""
    step = step_shape(cell, ())
    return (*batch_shape, steps, *step)


def normal(seed, shape, dtype=jnp.float32):
    """Standard normal test data of ``shape`` from NumPy's generator seeded with ``seed`` (an int).

    ``jax.random.normal`` compiles once per shape and dtype, about 1 s each on a CPU: over the
    suite's many small shapes that cost more than the tests. NumPy compiles nothing.
    """
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def uniform(seed, shape, low, high, dtype=jnp.float32):
    """Uniform test data on ``[low, high)``, from NumPy's generator as in :func:`normal`."""
    return jnp.asarray(np.random.default_rng(seed).uniform(low, high, shape).astype(dtype))


def random_case(cell, steps, key=0, dtype=jnp.float32, batch=(3,)):
    """``(params, xs, carry)`` for ``cell``: random params and inputs, a non-zero initial carry."""
    params = cell.init(jax.random.key(key), INPUT_SIZE, dtype)
    xs = np.random.default_rng(key).standard_normal(seq_shape(cell, batch, steps)).astype(dtype)
    x0 = np.take(xs, 0, axis=len(batch)) if steps else np.zeros(step_shape(cell, batch), dtype)
    carry = jax.tree.map(lambda c: jnp.asarray(np.asarray(c) + 0.3, c.dtype), cell.carry_for(jnp.asarray(x0), dtype))
    return params, jnp.asarray(xs), carry
