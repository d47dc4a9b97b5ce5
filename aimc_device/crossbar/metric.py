"""The MVM error, the model's fingerprint (docs/model.md section 7, Eq. 20).

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Eq. 20 and Methods (the 512 x 512 test
   case with w ~ Normal(0, 0.246), x ~ Uniform(-1, 1)).
"""
from __future__ import annotations

import numpy as np

from .._checks import check_float, check_instance, check_int
from .._random import as_generator
from ..io import resolve_device_model
from .array import AnalogArray
from .config import CrossbarConfig

__all__ = ["mvm_error", "standard_test_case", "nonideality_configs", "mvm_error_breakdown",
           "TEST_CASE_SHAPE", "TEST_CASE_W_STD", "EVALUATION_TIMES"]

#: The standard test case of [1]: a 512 x 512 tile (out, in).
TEST_CASE_SHAPE = (512, 512)
#: Standard deviation of the test-case weights, w ~ Normal(0, 0.246) [1].
TEST_CASE_W_STD = 0.246
#: Evaluation times after programming of [1] (docs/model.md sec. 9): 1 s, 1 h, 1 day, 1 year [s].
EVALUATION_TIMES = {"1 s": 1.0, "1 h": 3600.0, "1 day": 86400.0, "1 year": 365.25 * 86400.0}


def standard_test_case(rng=0, n_inputs: int = 1000, shape=TEST_CASE_SHAPE):
    """Weights (out, in) ~ Normal(0, 0.246) and inputs (n, in) ~ Uniform(-1, 1) of Eq. 20 [1]."""
    gen = as_generator(rng)
    w = gen.normal(0.0, TEST_CASE_W_STD, size=shape)
    x = gen.uniform(-1.0, 1.0, size=(n_inputs, shape[1]))
    return w, x


def mvm_error(cfg: CrossbarConfig | None = None, device=None, t: float | None = None,
              weights=None, inputs=None, rng=0, n_inputs: int = 1000) -> float:
    """Relative MVM error eps_M = mean_k ||y_k - y~_k|| / mean_k ||y_k|| (Eq. 20).

    Parameters
    ----------
    cfg : CrossbarConfig or None (the standard model)
    device : PCMModel, EmpiricalModel, preset name, device card path or None
        None: ideal devices (only the periphery); a model of either family: its programming,
        and with ``t`` its state at time t (PCM: drift and 1/f read noise).
    t : float or None, time after programming [s]; None: right after programming, no drift
    weights : array (out, in) or None, default the paper's test case
    inputs : array (n, in) or None, default n_inputs draws of Uniform(-1, 1)
    rng : int, numpy.random.Generator or None; one seed fixes test case, devices and noise
    n_inputs : int, inputs of the default test case

    Returns
    -------
    float, eps_M, dimensionless.
    """
    check_instance(cfg, "cfg", CrossbarConfig, "a CrossbarConfig", allow_none=True)
    if t is not None:
        t = check_float(t, "t", lo=0.0)
    n_inputs = check_int(n_inputs, "n_inputs", lo=1)
    gen = as_generator(rng)
    if weights is None or inputs is None:
        w0, x0 = standard_test_case(gen, n_inputs,
                                    TEST_CASE_SHAPE if weights is None else np.shape(weights))
        weights = w0 if weights is None else weights
        inputs = x0 if inputs is None else inputs
    w = np.asarray(weights, dtype=np.float64)
    x = np.asarray(inputs, dtype=np.float64)
    array = AnalogArray(w.astype(np.float32), cfg, device=resolve_device_model(device))
    array.calibrate_input_range(x)
    array.program(rng=gen)
    if t is not None:
        array.drift(t, rng=gen)
    y_ref = x @ w.T
    y = array.mvm(x.astype(np.float32)).astype(np.float64)
    return float(np.linalg.norm(y - y_ref, axis=1).mean() / np.linalg.norm(y_ref, axis=1).mean())


def _ideal_like(cfg: CrossbarConfig) -> CrossbarConfig:
    """The ideal periphery with ``cfg``'s tiles and mapping conventions (tile size, g_max,
    column-wise scales, devices of the differential pair)."""
    return CrossbarConfig.ideal(max_rows=cfg.max_rows, max_cols=cfg.max_cols, g_max=cfg.g_max,
                                columnwise_scaling=cfg.columnwise_scaling,
                                pair_devices=cfg.pair_devices)


def nonideality_configs(cfg: CrossbarConfig | None = None) -> dict[str, CrossbarConfig]:
    """Each nonideality of ``cfg`` alone on top of the ideal configuration (with ``cfg``'s tiles
    and mapping conventions), by name.

    Names: "DAC", "ADC", "output noise", "short-term noise", "IR drop", "S-shaped ADC",
    "read asymmetry" (only those that ``cfg`` switches on). The S-shaped ADC keeps the ADC's
    bound (the range it saturates in, and clips at) but not its bits.
    """
    cfg = CrossbarConfig() if cfg is None else cfg
    ideal = _ideal_like(cfg)
    parts = {
        "DAC": dict(inp_bits=cfg.inp_bits, inp_bound=cfg.inp_bound),
        "ADC": dict(out_bits=cfg.out_bits, out_bound=cfg.out_bound),
        "output noise": dict(out_noise=cfg.out_noise),
        "short-term noise": dict(w_noise=cfg.w_noise),
        "IR drop": dict(ir_drop=cfg.ir_drop, ir_drop_g=cfg.ir_drop_g),
        "S-shaped ADC": dict(s_adc=cfg.s_adc, mu_zeta=cfg.mu_zeta, sigma_zeta=cfg.sigma_zeta,
                             s_adc_gain=cfg.s_adc_gain, out_bound=cfg.out_bound),
        "read asymmetry": dict(asymmetry=cfg.asymmetry),
    }
    on = {
        "DAC": bool(cfg.inp_bits), "ADC": bool(cfg.out_bits), "output noise": cfg.out_noise > 0,
        "short-term noise": cfg.w_noise > 0, "IR drop": cfg.ir_drop * cfg.ir_drop_g > 0,
        "S-shaped ADC": cfg.s_adc, "read asymmetry": cfg.asymmetry > 0,
    }
    return {name: ideal.replace(**kw) for name, kw in parts.items() if on[name]}


def mvm_error_breakdown(cfg: CrossbarConfig | None = None, device="rasch2023", rng=0,
                        times=EVALUATION_TIMES, n_inputs: int = 1000) -> dict[str, float]:
    """eps_M of each nonideality alone, of the whole periphery, with the devices, and over time.

    Returns an ordered dict: one row per nonideality alone (ideal devices), "PCM programming"
    ("empirical programming" for an empirical model; ideal periphery, the devices),
    "periphery (all)", "total" (periphery + devices, no drift), then "total @ <time>" for each
    of ``times`` with drift and drift compensation. ``device`` as in :func:`mvm_error`.
    """
    check_instance(cfg, "cfg", CrossbarConfig, "a CrossbarConfig", allow_none=True)
    check_int(n_inputs, "n_inputs", lo=1)
    cfg = CrossbarConfig() if cfg is None else cfg
    model = resolve_device_model(device)
    out = {}
    for name, c in nonideality_configs(cfg).items():
        out[name] = mvm_error(c, device=None, rng=rng, n_inputs=n_inputs)
    ideal = _ideal_like(cfg)
    if model is not None:
        label = "PCM" if model.family == "pcm" else model.family
        out[f"{label} programming"] = mvm_error(ideal, device=model, rng=rng, n_inputs=n_inputs)
    out["periphery (all)"] = mvm_error(cfg, device=None, rng=rng, n_inputs=n_inputs)
    if model is not None:
        out["total"] = mvm_error(cfg, device=model, rng=rng, n_inputs=n_inputs)
        for label, t in (times or {}).items():
            out[f"total @ {label}"] = mvm_error(cfg, device=model, t=t, rng=rng,
                                                n_inputs=n_inputs)
    return out
