"""Statistics from measurements: fit a device model (the PCM model or the empirical family) to a
campaign, with a report; a hold-out test for any family.

Layer ``fit``: imports :mod:`aimc_device.pcm` and :mod:`aimc_device.io` only.
"""
from ._stats import CampaignStats, FitError, campaign_statistics
from .empirical_fit import EmpiricalFitReport, fit_empirical
from .holdout import HoldoutResult, compare_to_model, holdout_ks, split_devices
from .pcm_fit import fit_drift, fit_pcm, fit_programming_noise, fit_read_noise
from .report import ComponentFit, FitReport

__all__ = ["fit_pcm", "fit_programming_noise", "fit_drift", "fit_read_noise",
           "campaign_statistics", "CampaignStats", "FitReport", "ComponentFit", "FitError",
           "fit_empirical", "EmpiricalFitReport", "holdout_ks", "HoldoutResult", "split_devices",
           "compare_to_model"]
