"""gpurnn: fused recurrent-network kernels with hand-written backpropagation through time."""
from .layers import GRU, LSTM, RNN, JordanRNN

__version__ = "0.1.0"
__all__ = ["RNN", "LSTM", "GRU", "JordanRNN"]
