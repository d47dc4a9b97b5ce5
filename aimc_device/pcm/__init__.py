"""PCM device physics: parameters, programming noise, drift, 1/f read noise, faults.

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Eqs. 7-13 (MODEL.md section 4).
"""
from .campaign import simulate_campaign
from .devices import ProgrammedState, check_conductance, draw_faults, perturb, program, read
from .formulas import (
    drift_exponent_stats,
    drift_factor,
    programming_noise_std,
    read_noise_q,
    read_noise_std,
    read_noise_time_factor,
    relative_conductance,
    stuck_conductance,
)
from .params import PCMModel

__all__ = [
    "PCMModel", "ProgrammedState", "program", "read", "perturb", "draw_faults",
    "simulate_campaign",
    "programming_noise_std", "drift_exponent_stats", "drift_factor", "read_noise_q",
    "read_noise_std", "read_noise_time_factor", "relative_conductance", "stuck_conductance",
    "check_conductance",
]
