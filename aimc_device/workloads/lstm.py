"""An LSTM sequence classifier: each digit read row by row (8 time steps of 8 pixels), or in
shorter runs of pixels for longer sequences (``pixels_per_step``).

References
----------
.. [1] S. Hochreiter and J. Schmidhuber, "Long short-term memory", Neural Comput. 9 (1997).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .digits import DigitsWorkload, as_rows

__all__ = ["LSTMClassifier", "LSTMWorkload"]


class LSTMClassifier(nn.Module):
    """``nn.LSTM`` (batch_first) over the sequence, then ``fc`` on the last hidden state.

    Layer names: ``lstm``, ``fc``.

    Parameters
    ----------
    n_in : int
        Features per time step.
    hidden : int
        LSTM hidden size.
    layers : int
        Stacked LSTM layers.
    n_classes : int
        Output classes.
    """

    def __init__(self, n_in: int = 8, hidden: int = 64, layers: int = 1, n_classes: int = 10):
        super().__init__()
        self.lstm = nn.LSTM(n_in, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, n_classes)

    def forward(self, x):
        out, _ = self.lstm(x)          # (batch, time, hidden)
        return self.fc(out[:, -1])


@dataclass
class LSTMWorkload(DigitsWorkload):
    """LSTM classifier on scikit-learn's digits read as a sequence of pixel runs.

    Parameters
    ----------
    hidden : int
        LSTM hidden size.
    layers : int
        Stacked LSTM layers.
    pixels_per_step : int
        Pixels read per time step, in raster order (must divide 64): 8 (default) reads the
        8 rows, 4 reads 16 half rows, 1 reads the 64 pixels one by one. Shorter steps make
        longer recurrences, over which the analog error of the recurrent weights accumulates.
    n_train, test_fraction
        See :class:`~aimc_device.workloads.digits.DigitsWorkload`.
    """

    input_shape = staticmethod(as_rows)
    name: ClassVar[str] = "lstm"
    digital_layers: ClassVar[tuple[str, ...]] = ("fc",)

    epochs: int = 40
    lr: float = 5e-3
    batch_size: int = 32
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    hidden: int = 64
    layers: int = 1
    pixels_per_step: int = 8

    def shape_inputs(self, x):
        return as_rows(x, self.pixels_per_step)

    def _make_model(self):
        return LSTMClassifier(self.pixels_per_step, self.hidden, self.layers, self.n_classes)

