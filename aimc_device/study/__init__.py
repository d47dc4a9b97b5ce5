"""The paper's workflow: train FP, map directly or HWA-train, program, evaluate over time.

Results are xarray Datasets saved as NetCDF (h5netcdf); the evaluations (repeats x times x
variants, and the sensitivity grid) are independent tasks on Dask.

Examples
--------
>>> from aimc_device import study
>>> ds = study.run_study("cnn", quick=True, repeats=3, scheduler="synchronous")  # doctest: +SKIP
>>> print(study.format_table(ds))                                               # doctest: +SKIP

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), doi:10.1038/s41467-023-40770-4.
"""
from .demo import run_demo
from .report import (format_sensitivity_table, format_table, load_dataset, plot_sensitivity,
                     plot_studies, plot_study, save_dataset)
from .requirements import KNOBS, calibration_spread, evaluate_calibration, requirements
from .sensitivity import NONIDEALITIES, find_scale, run_sensitivity
from .study import (HWA_EPOCHS, HWA_NOISE_SCALE, VARIANTS, hwa_recipe, prepare_models,
                    resolve_device, run_study)

__all__ = ["run_study", "prepare_models", "resolve_device", "run_sensitivity", "find_scale",
           "run_demo", "NONIDEALITIES", "VARIANTS", "HWA_EPOCHS", "HWA_NOISE_SCALE", "hwa_recipe",
           "format_table", "plot_study", "plot_studies", "format_sensitivity_table",
           "plot_sensitivity", "save_dataset", "load_dataset", "requirements", "KNOBS",
           "calibration_spread", "evaluate_calibration"]
