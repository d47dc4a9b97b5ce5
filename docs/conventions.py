"""Print the figures of docs/model.md, section 13: the effect of each convention where the paper
is silent, as the MVM error eps_M (Eq. 20) of a 512 x 512 tile.

    python docs/conventions.py            # about a minute on 2 CPU cores

Every figure is one call of :func:`aimc_device.crossbar.mvm_error` (or the same computation on a
pruned matrix), seed 0, so the table is the same on every run.
"""
from __future__ import annotations

import numpy as np

from aimc_device import pcm
from aimc_device.crossbar import AnalogArray, CrossbarConfig, mvm_error

PRESET = pcm.PCMModel.preset("rasch2023")
AIHWKIT = pcm.PCMModel.preset("rasch2023-aihwkit")


def pruned_case(n=512, frac=0.5, n_inputs=256, seed=100):
    """A 50 %-pruned w ~ N(0, 0.246) (n x n) and inputs uniform in [0, 1) (ReLU-like)."""
    g = np.random.default_rng(seed)
    w = g.normal(0.0, 0.246, (n, n))
    w[g.random(w.shape) < frac] = 0.0
    x = np.random.default_rng(seed + 1).uniform(0.0, 1.0, (n_inputs, n))
    return w.astype(np.float32), x.astype(np.float32)


def pruned_error(pair_devices: str) -> tuple[float, float]:
    """eps_M and the mean output offset relative to mean |y| of the pruned case, ideal
    periphery, programming noise only."""
    w, x = pruned_case()
    arr = AnalogArray(w, CrossbarConfig.ideal(pair_devices=pair_devices), device=PRESET)
    arr.calibrate_input_range(x)
    arr.program(rng=0)
    y = x.astype(np.float64) @ w.T.astype(np.float64)
    err = arr.mvm(x).astype(np.float64) - y
    eps = np.linalg.norm(err, axis=1).mean() / np.linalg.norm(y, axis=1).mean()
    return float(eps), float(abs(err.mean()) / np.abs(y).mean())


def rows():
    std = CrossbarConfig()
    yield "standard model, right after programming", mvm_error(std, PRESET)
    yield "standard model, read at t = 0", mvm_error(std, PRESET, t=0.0)
    yield "  both devices of every pair simulated", mvm_error(std.replace(pair_devices="both"),
                                                               PRESET, t=0.0)
    yield "  one scale per tile, not per column", mvm_error(
        std.replace(columnwise_scaling=False), PRESET, t=0.0)
    yield "  read noise at t + t0, scaled by g_P (rasch2023-aihwkit)", mvm_error(std, AIHWKIT,
                                                                                 t=0.0)
    yield "  all three", mvm_error(std.replace(pair_devices="both", columnwise_scaling=False),
                                   AIHWKIT, t=0.0)
    for f in ("stuck_at_zero", "stuck_at_gmax", "stuck_at_random"):
        yield f"  1 % of the devices {f.replace('_', ' ')}", mvm_error(
            std, PRESET.replace(**{f: 0.01}))
    for gain in ("column", "tile"):
        yield f"  S-shaped ADC, sigma_zeta 0.5, gain per {gain}", mvm_error(
            std.replace(s_adc=True, sigma_zeta=0.5, s_adc_gain=gain), PRESET)
    for scale in (1.0, 10.0):
        yield f"IR drop alone, wire resistance x{scale:g}", mvm_error(
            CrossbarConfig.ideal(ir_drop=scale))
    for pair in ("active", "both"):
        eps, offset = pruned_error(pair)
        yield f"50 %-pruned, inputs >= 0, programming only, pairs '{pair}'", eps
        yield f"  its mean output offset / mean |y|", offset


def main():
    for name, value in rows():
        print(f"{name:64s} {100 * value:6.2f} %")


if __name__ == "__main__":
    main()
