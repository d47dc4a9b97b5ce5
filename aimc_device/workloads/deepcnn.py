"""A deep plain CNN on the 8x8 digits: the depth at which analog noise starts to matter.

``depth`` 3x3 convolutions of ``width`` channels, each followed by BatchNorm and ReLU, at the
full 8x8 resolution (zero padding, stride 1), then global average pooling and one linear layer.
No shortcuts: every layer's analog error passes through every later layer, as in the deep
networks of the paper, so direct mapping loses accuracy with depth while the floating-point
model still trains in minutes on two CPU cores.

References
----------
.. [1] K. Simonyan and A. Zisserman, "Very deep convolutional networks for large-scale image
   recognition", ICLR (2015) (plain stacks of 3x3 convolutions).
.. [2] S. Ioffe and C. Szegedy, "Batch normalization", ICML (2015).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .digits import DigitsWorkload, as_images

__all__ = ["PlainCNN", "DeepCNNWorkload"]


class PlainCNN(nn.Module):
    """``depth`` x (3x3 conv -> BatchNorm -> ReLU) at 8x8, global average pool, linear.

    Layer names: ``features.0`` (first convolution, 1 -> ``width`` channels), ``features.3``,
    ``features.6``, ... (the ``width`` -> ``width`` convolutions; every third module of
    ``features`` is a convolution, each followed by its BatchNorm and ReLU), ``fc`` (classifier).

    Parameters
    ----------
    depth : int
        Number of convolutions (>= 1).
    width : int
        Channels of every convolution.
    n_classes : int
        Output classes.
    """

    def __init__(self, depth: int = 16, width: int = 32, n_classes: int = 10):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"PlainCNN: depth = {depth} and width = {width} must be >= 1")
        layers: list[nn.Module] = []
        c_in = 1
        for _ in range(depth):
            layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU()]
            c_in = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, n_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.features(x))))


@dataclass
class DeepCNNWorkload(DigitsWorkload):
    """Deep plain CNN (:class:`PlainCNN`) on scikit-learn's digits as 1x8x8 images.

    The first convolution (one input channel: 9 rows per crossbar column) and the classifier
    stay digital by default, as for the ``cnn`` workload; everything between them is analog.

    Parameters
    ----------
    depth : int
        Number of 3x3 convolutions.
    width : int
        Channels of every convolution.
    n_train, test_fraction
        See :class:`~aimc_device.workloads.digits.DigitsWorkload`.
    """

    input_shape = staticmethod(as_images)
    name: ClassVar[str] = "deepcnn"
    digital_layers: ClassVar[tuple[str, ...]] = ("features.0", "fc")

    epochs: int = 30
    lr: float = 0.05
    batch_size: int = 32
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    depth: int = 16
    width: int = 32

    def _make_model(self):
        return PlainCNN(self.depth, self.width, self.n_classes)
