"""The crossbar simulator: mapping, tiles, periphery, drift compensation, MVM error.

Implements docs/model.md sections 1, 2, 3, 5, 6 and 7 on top of :mod:`aimc_device.pcm`.

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), doi:10.1038/s41467-023-40770-4.
"""
from . import periphery
from .config import CrossbarConfig
from .mapping import conductance_targets, map_weights, split_sizes, tile_slices
from .mvm import analog_conv, analog_mvm
from .options import EngineOptions, engine_options
from .array import AnalogArray
from .metric import EVALUATION_TIMES, mvm_error, mvm_error_breakdown, nonideality_configs

__all__ = ["CrossbarConfig", "periphery", "split_sizes", "tile_slices", "map_weights",
           "conductance_targets", "analog_mvm", "analog_conv", "EngineOptions", "engine_options",
           "AnalogArray", "mvm_error", "mvm_error_breakdown", "nonideality_configs",
           "EVALUATION_TIMES"]
