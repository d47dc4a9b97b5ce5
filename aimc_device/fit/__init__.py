"""Statistics from measurements: fit a device model (the PCM model or the empirical family) to a
campaign, with a report; a hold-out test for any family; the choice between the families
(:func:`fit_device`).

Layer ``fit``: imports :mod:`aimc_device.pcm` and :mod:`aimc_device.io` only.
"""
from ._stats import (CampaignChunk, CampaignStats, FitError, campaign_statistics,
                     iter_campaign_chunks)
from .criterion import Criterion
from .choice import DECISION_RULE, DeviceFitReport, fit_device
from .empirical_fit import EmpiricalFitReport, fit_empirical
from .holdout import HoldoutResult, compare_to_model, holdout_ks, split_devices
from .pcm_fit import check_plausible, fit_drift, fit_pcm, fit_programming_noise, fit_read_noise
from .report import ComponentFit, FitReport
from .temperature import (ActivationEnergy, bake_temperatures, equivalent_time,
                          fit_activation_energy, resolve_activation_energy)

__all__ = ["fit_pcm", "fit_programming_noise", "fit_drift", "fit_read_noise",
           "campaign_statistics", "CampaignStats", "FitReport", "ComponentFit", "FitError",
           "equivalent_time", "resolve_activation_energy", "fit_activation_energy",
           "ActivationEnergy", "check_plausible", "iter_campaign_chunks", "CampaignChunk",
           "bake_temperatures", "fit_empirical", "EmpiricalFitReport", "holdout_ks",
           "HoldoutResult", "split_devices", "compare_to_model", "fit_device",
           "DeviceFitReport", "DECISION_RULE", "Criterion"]
