"""Small networks and data sets that need no download.

The topologies of the paper's study, all on scikit-learn's handwritten digits (shipped with
the package):

=========== ============================================== ====================
name        model                                          input
=========== ============================================== ====================
cnn         ResNet-style CNN (3 stages of basic blocks)    1x8x8 image
deepcnn     plain CNN, 16 x (3x3 conv, BatchNorm, ReLU)    1x8x8 image
lstm        ``nn.LSTM`` + ``fc`` on the last hidden state  8 rows of 8 pixels
transformer ``nn.TransformerEncoder`` (2 layers, d=48)     16 patches of 2x2
=========== ============================================== ====================

Examples
--------
>>> from aimc_device.workloads import get_workload
>>> wl = get_workload("cnn")
>>> model = wl.train_fp(wl.build_model(seed=0), seed=0)
>>> err = wl.evaluate(model)                          # test error, a fraction
>>> a_star = 1 - (err - err) / (wl.chance_error - err)
"""
from __future__ import annotations

from ._base import Workload, chance_error, epoch_seed, scoped_seed
from .cnn import CNNWorkload, ResNetDigits
from .deepcnn import DeepCNNWorkload, PlainCNN
from .lstm import LSTMClassifier, LSTMWorkload
from .transformer import PatchTransformer, TransformerWorkload

__all__ = ["WORKLOADS", "QUICK", "get_workload", "Workload", "CNNWorkload", "DeepCNNWorkload",
           "LSTMWorkload", "TransformerWorkload", "ResNetDigits", "PlainCNN", "LSTMClassifier",
           "PatchTransformer", "chance_error", "epoch_seed", "scoped_seed"]

#: Registry: name -> workload class.
WORKLOADS: dict[str, type[Workload]] = {
    "cnn": CNNWorkload,
    "deepcnn": DeepCNNWorkload,
    "lstm": LSTMWorkload,
    "transformer": TransformerWorkload,
}

#: The quick demonstration settings (``get_workload(name, quick=True)``, the ``--quick`` option of
#: ``aimc-device study``, ``sensitivity`` and ``demo``): a smaller model and fewer epochs, so that
#: a workload trains in seconds on a laptop CPU; not the recipe of the full study.
QUICK: dict[str, dict] = {
    "cnn": dict(epochs=4, width=8),
    "deepcnn": dict(epochs=6, width=16),  # all 16 layers, 16 channels
    "lstm": dict(epochs=8, hidden=32),
    "transformer": dict(epochs=8, d_model=24, dim_ff=48),
}


def get_workload(name: str, quick: bool = False, **kw) -> Workload:
    """A workload by name.

    Parameters
    ----------
    name : {"cnn", "deepcnn", "lstm", "transformer"}
        Registry name.
    quick : bool
        Use the quick demonstration settings of :data:`QUICK` (fewer epochs, a smaller model).
    **kw
        Overrides of the workload's fields (``epochs``, ``lr``, ``batch_size``, ``seed``,
        model sizes, ...); they win over the quick settings.

    Returns
    -------
    Workload
    """
    try:
        cls = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose one of {sorted(WORKLOADS)}") from None
    settings = dict(QUICK[name]) if quick else {}
    settings.update(kw)
    return cls(quick=quick, **settings)
