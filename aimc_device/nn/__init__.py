"""The torch adapter: analog layers, convert(), hardware-aware training, evaluation over time.

Implements MODEL.md sections 8 and 9 on top of :mod:`aimc_device.crossbar` and
:mod:`aimc_device.pcm`; no physics is restated here.

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), doi:10.1038/s41467-023-40770-4.
"""
from ..pcm.torch_ops import perturb_tensor
from ._memory import retain_freed_memory
from .convert import (
    analog_layers,
    analog_tiles,
    convert,
    drift,
    forget_programming,
    program,
    reseed,
    set_noise_scale,
)
from .evaluation import (
    PAPER_TIMES,
    classification_error,
    evaluate_over_time,
    normalized_accuracy,
    standard_error,
)
from .layers import (
    AnalogConv1d,
    AnalogConv2d,
    AnalogLayer,
    AnalogLinear,
    AnalogLSTM,
    AnalogMultiheadAttention,
)
from .tile import AnalogTile
from .training import (
    AnalogOptimizer,
    HWAConfig,
    distillation_loss,
    hwa_loss,
    init_input_ranges,
    train_hwa,
)

__all__ = [
    "convert", "program", "drift", "forget_programming", "analog_tiles", "analog_layers",
    "set_noise_scale", "reseed", "AnalogTile", "AnalogLayer", "AnalogLinear", "AnalogConv1d",
    "AnalogConv2d", "AnalogLSTM", "AnalogMultiheadAttention", "HWAConfig", "AnalogOptimizer",
    "init_input_ranges", "distillation_loss", "hwa_loss", "train_hwa", "evaluate_over_time",
    "classification_error", "normalized_accuracy", "standard_error", "PAPER_TIMES",
    "perturb_tensor", "retain_freed_memory",
]
