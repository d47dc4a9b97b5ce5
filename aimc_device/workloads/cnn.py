"""A small ResNet-style CNN on the 8x8 digits (the paper's ResNet / CIFAR-10, scaled down).

References
----------
.. [1] K. He, X. Zhang, S. Ren and J. Sun, "Deep residual learning for image recognition",
   CVPR (2016).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .digits import DigitsWorkload, as_images

__all__ = ["BasicBlock", "ResNetDigits", "CNNWorkload"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1-conv) shortcut.

    Parameters
    ----------
    c_in, c_out : int
        Input and output channels.
    stride : int
        Stride of the first convolution (and of the shortcut).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetDigits(nn.Module):
    """ResNet for 1x8x8 inputs: stem conv, three stages of basic blocks, pooling, classifier.

    Layer names: ``stem`` (first conv), ``stage1``-``stage3``, ``fc`` (classifier).
    8x8 -> 8x8 (width w) -> 4x4 (2w) -> 2x2 (4w) -> global average -> ``fc``.

    Parameters
    ----------
    width : int
        Channels of the first stage.
    blocks : int
        Basic blocks per stage.
    n_classes : int
        Output classes.
    """

    def __init__(self, width: int = 16, blocks: int = 1, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.stem_relu = nn.ReLU()

        def stage(c_in, c_out, stride):
            return nn.Sequential(BasicBlock(c_in, c_out, stride),
                                 *[BasicBlock(c_out, c_out) for _ in range(blocks - 1)])

        self.stage1 = stage(width, width, 1)
        self.stage2 = stage(width, 2 * width, 2)
        self.stage3 = stage(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * width, n_classes)

    def forward(self, x):
        x = self.stem_relu(self.stem_bn(self.stem(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(self.flatten(self.pool(x)))


@dataclass
class CNNWorkload(DigitsWorkload):
    """ResNet-style CNN on scikit-learn's digits as 1x8x8 images.

    Parameters
    ----------
    width : int
        Channels of the first stage (16 -> 32 -> 64).
    blocks : int
        Basic blocks per stage.
    n_train, test_fraction
        See :class:`~aimc_device.workloads.digits.DigitsWorkload`.
    """

    input_shape = staticmethod(as_images)
    name: ClassVar[str] = "cnn"
    digital_layers: ClassVar[tuple[str, ...]] = ("stem", "fc")

    epochs: int = 30
    lr: float = 0.05
    batch_size: int = 32
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    width: int = 16
    blocks: int = 1

    def _make_model(self):
        return ResNetDigits(self.width, self.blocks, self.n_classes)

