"""A small transformer encoder on the digits as a sequence of 16 patches of 2x2 pixels (or of
other square patches, ``patch``).

References
----------
.. [1] A. Vaswani et al., "Attention is all you need", NeurIPS (2017).
.. [2] A. Dosovitskiy et al., "An image is worth 16x16 words: transformers for image
   recognition at scale", ICLR (2021).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .digits import DigitsWorkload, as_patches

__all__ = ["PatchTransformer", "TransformerWorkload"]


class PatchTransformer(nn.Module):
    """Patch embedding + learned positions, ``nn.TransformerEncoder``, mean pool, classifier.

    Layer names: ``embed`` (patch embedding), ``encoder.layers.{i}`` (each an
    ``nn.TransformerEncoderLayer`` with ``self_attn``, ``linear1``, ``linear2``), ``norm``,
    ``fc`` (classifier).

    The number of heads should be odd (default 3): torch then never takes the fused inference
    "fast path" of ``TransformerEncoderLayer`` / ``MultiheadAttention``, which reads the
    weights of ``linear1``/``linear2``/``out_proj`` directly instead of calling the modules
    and would bypass layers swapped in by a converter.

    Parameters
    ----------
    n_tokens : int
        Sequence length (patches).
    n_in : int
        Features per token (pixels per patch).
    d_model : int
        Embedding width.
    nhead : int
        Attention heads (must divide ``d_model``; odd by default, see above).
    layers : int
        Encoder layers.
    dim_ff : int
        Hidden width of the feed-forward blocks.
    dropout : float
        Dropout inside the encoder layers.
    n_classes : int
        Output classes.
    """

    def __init__(self, n_tokens: int = 16, n_in: int = 4, d_model: int = 48, nhead: int = 3,
                 layers: int = 2, dim_ff: int = 96, dropout: float = 0.1, n_classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(n_in, d_model)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=dim_ff,
                                           dropout=dropout, activation="relu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, n_classes)

    def forward(self, x):
        h = self.encoder(self.embed(x) + self.pos)      # (batch, tokens, d_model)
        return self.fc(self.norm(h.mean(dim=1)))


@dataclass
class TransformerWorkload(DigitsWorkload):
    """Transformer encoder classifier on scikit-learn's digits as 16 patches of 2x2 pixels.

    Parameters
    ----------
    patch : int
        Patch side in pixels (divides 8): ``(8 / patch)**2`` tokens of ``patch**2`` pixels;
        2 (default): 16 tokens, 1: the 64 pixels as tokens.
    d_model : int
        Embedding width.
    nhead : int
        Attention heads (odd keeps torch's fused fast path off; see :class:`PatchTransformer`).
    layers : int
        Encoder layers.
    dim_ff : int
        Feed-forward width.
    dropout : float
        Dropout inside the encoder.
    n_train, test_fraction
        See :class:`~aimc_device.workloads.digits.DigitsWorkload`.
    """

    input_shape = staticmethod(as_patches)
    name: ClassVar[str] = "transformer"
    digital_layers: ClassVar[tuple[str, ...]] = ("embed", "fc")

    epochs: int = 60
    lr: float = 2e-3
    batch_size: int = 32
    weight_decay: float = 1e-2
    optimizer: str = "adamw"
    d_model: int = 48
    nhead: int = 3
    layers: int = 2
    dim_ff: int = 96
    dropout: float = 0.1
    patch: int = 2

    def shape_inputs(self, x):
        return as_patches(x, self.patch)

    def _make_model(self):
        if 8 % self.patch:
            raise ValueError(f"TransformerWorkload.patch = {self.patch}: it must divide 8")
        return PatchTransformer((8 // self.patch) ** 2, self.patch ** 2, self.d_model,
                                self.nhead, self.layers, self.dim_ff, self.dropout,
                                self.n_classes)

