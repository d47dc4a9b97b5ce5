"""Device physics: the PCM model of the paper (parameters, programming noise, drift, 1/f read
noise, faults) and the empirical family of measured distributions (``empirical.py``).

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Eqs. 7-13 (docs/model.md section 4).
"""
from .campaign import simulate_campaign
from .devices import (ProgrammedState, check_conductance, draw_faults, perturb, program,
                      programmed_conductance, read)
from .empirical import EmpiricalModel, EmpiricalState
from .formulas import (
    arrhenius_factor,
    drift_exponent_stats,
    equivalent_time,
    drift_factor,
    programming_noise_std,
    read_noise_q,
    read_noise_std,
    read_noise_time_factor,
    relative_conductance,
    stuck_conductance,
)
from .params import PCMModel
from .rram import RRAMCampaignParams, simulate_rram_campaign
from .uncertainty import ParameterCovariance

__all__ = [
    "PCMModel", "ProgrammedState", "program", "read", "perturb", "draw_faults",
    "programmed_conductance",
    "simulate_campaign", "EmpiricalModel", "EmpiricalState", "simulate_rram_campaign",
    "RRAMCampaignParams", "programming_noise_std", "drift_exponent_stats", "drift_factor",
    "read_noise_q", "read_noise_std", "read_noise_time_factor", "relative_conductance",
    "stuck_conductance", "check_conductance", "arrhenius_factor", "equivalent_time",
    "ParameterCovariance",
]
