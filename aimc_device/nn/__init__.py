"""The torch adapter: analog layers, convert(), hardware-aware training, evaluation over time.

Implements docs/model.md sections 8 and 9 on top of :mod:`aimc_device.crossbar` and
:mod:`aimc_device.pcm`; no physics is restated here.

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), doi:10.1038/s41467-023-40770-4.
"""
from ..pcm.torch_ops import perturb_tensor
from ._memory import retain_freed_memory
from .convert import (
    AnalogConversionError,
    ConversionSummary,
    analog_layers,
    analog_tiles,
    convert,
    drift,
    forget_programming,
    program,
    register_conversion,
    reseed,
    set_noise_scale,
    unregister_conversion,
)
from .evaluation import (
    PAPER_TIMES,
    calibration_spread,
    classification_error,
    evaluate_over_time,
    normalized_accuracy,
    standard_error,
    with_hardware,
)
from .layers import (
    AnalogConv1d,
    AnalogConv2d,
    AnalogConvTranspose1d,
    AnalogConvTranspose2d,
    AnalogGRU,
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
    hwa_param_groups,
    init_input_ranges,
    train_hwa,
    train_mode,
)

__all__ = [
    "convert", "program", "drift", "forget_programming", "analog_tiles", "analog_layers",
    "set_noise_scale", "reseed", "register_conversion", "unregister_conversion",
    "ConversionSummary", "AnalogConversionError", "AnalogTile", "AnalogLayer", "AnalogLinear",
    "AnalogConv1d", "AnalogConv2d", "AnalogConvTranspose1d", "AnalogConvTranspose2d",
    "AnalogLSTM", "AnalogGRU", "AnalogMultiheadAttention", "HWAConfig", "AnalogOptimizer",
    "init_input_ranges", "distillation_loss", "hwa_loss", "hwa_param_groups", "train_mode",
    "train_hwa", "evaluate_over_time", "with_hardware", "calibration_spread",
    "classification_error", "normalized_accuracy", "standard_error", "PAPER_TIMES",
    "perturb_tensor", "retain_freed_memory",
]
