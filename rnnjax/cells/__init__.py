"""One module per cell family."""

from rnnjax.cells.convlstm import ConvLSTM, ConvLSTMParams, ConvLSTMState
from rnnjax.cells.deltanet import DeltaNet, DeltaNetParams, GatedDeltaNet, GatedDeltaNetParams
from rnnjax.cells.elman import Elman, ElmanParams
from rnnjax.cells.gla import GLA, GLAParams
from rnnjax.cells.gru import GRU, GRUParams
from rnnjax.cells.indrnn import IndRNN, IndRNNParams
from rnnjax.cells.lru import LRU, LRUParams
from rnnjax.cells.lstm import LSTM, LSTMParams, LSTMState
from rnnjax.cells.mamba2 import Mamba2, Mamba2Params
from rnnjax.cells.mgu import MGU, MGUParams
from rnnjax.cells.minimal import MinGRU, MinGRUParams, MinLSTM, MinLSTMParams
from rnnjax.cells.mlstm import MLSTM, MLSTMParams
from rnnjax.cells.para import ParaGRU, ParaGRUParams, ParaLSTM, ParaLSTMParams, ParaLSTMState
from rnnjax.cells.rglru import RGLRU, RGLRUParams
from rnnjax.cells.rwkv7 import RWKV7, RWKV7Params
from rnnjax.cells.slstm import SLSTM, SLSTMParams, SLSTMState

__all__ = [
    "Elman",
    "ElmanParams",
    "GRU",
    "GRUParams",
    "LSTM",
    "LSTMParams",
    "LSTMState",
    "MGU",
    "MGUParams",
    "IndRNN",
    "IndRNNParams",
    "MinGRU",
    "MinGRUParams",
    "MinLSTM",
    "MinLSTMParams",
    "LRU",
    "LRUParams",
    "RGLRU",
    "RGLRUParams",
    "ConvLSTM",
    "ConvLSTMParams",
    "ConvLSTMState",
    "ParaGRU",
    "ParaGRUParams",
    "ParaLSTM",
    "ParaLSTMParams",
    "ParaLSTMState",
    "SLSTM",
    "SLSTMParams",
    "SLSTMState",
    "GLA",
    "GLAParams",
    "Mamba2",
    "Mamba2Params",
    "MLSTM",
    "MLSTMParams",
    "DeltaNet",
    "DeltaNetParams",
    "GatedDeltaNet",
    "GatedDeltaNetParams",
    "RWKV7",
    "RWKV7Params",
]
