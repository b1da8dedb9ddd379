"""One module per cell family."""

from rnnjax.cells.elman import Elman, ElmanParams
from rnnjax.cells.gru import GRU, GRUParams
from rnnjax.cells.lstm import LSTM, LSTMParams, LSTMState
