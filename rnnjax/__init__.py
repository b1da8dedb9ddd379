"""rnnjax: recurrent neural networks for JAX, written as pure functions.

>>> import jax, jax.numpy as jnp, rnnjax as rj
>>> cell = rj.LSTM(hidden_size=8)
>>> params = cell.init(jax.random.key(0), input_size=3)
>>> ys, (h, c) = rj.scan(cell, params, jnp.ones((5, 3)))
>>> ys.shape
(5, 8)
"""

from rnnjax import distributed, inspect, interop, linear_attention, parallel, train
from rnnjax.cell import Cell, ClippedLinearCell, DenseCell, LinearCell, StructuredJacobian
from rnnjax.cells import (
    GLA,
    GRU,
    LRU,
    LSTM,
    MGU,
    MLSTM,
    RGLRU,
    RWKV7,
    SLSTM,
    ConvLSTM,
    DeltaNet,
    Elman,
    GatedDeltaNet,
    IndRNN,
    Mamba2,
    MinGRU,
    MinLSTM,
    ParaGRU,
    ParaLSTM,
)
from rnnjax.layers import RNN, Bidirectional, Stack
from rnnjax.methods import Associative, Auto, Chunked, Kernel, Method, Newton, Sequential, TimeSharded
from rnnjax.precision import Mixed
from rnnjax.scan import scan

__version__ = "0.1.0"

__all__ = [
    "Cell",
    "LinearCell",
    "ClippedLinearCell",
    "DenseCell",
    "StructuredJacobian",
    "Elman",
    "LSTM",
    "GRU",
    "MGU",
    "IndRNN",
    "MinGRU",
    "MinLSTM",
    "LRU",
    "RGLRU",
    "ConvLSTM",
    "ParaGRU",
    "ParaLSTM",
    "SLSTM",
    "GLA",
    "Mamba2",
    "MLSTM",
    "DeltaNet",
    "GatedDeltaNet",
    "RWKV7",
    "RNN",
    "Bidirectional",
    "Stack",
    "Mixed",
    "scan",
    "Method",
    "Sequential",
    "Associative",
    "Chunked",
    "Newton",
    "Kernel",
    "Auto",
    "TimeSharded",
    "distributed",
    "inspect",
    "interop",
    "linear_attention",
    "parallel",
    "train",
]
