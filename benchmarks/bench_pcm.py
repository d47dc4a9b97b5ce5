"""Speed of PCM sampling: program + read of N devices.

The fused Numba path (aimc_device.pcm.program/read) against a plain numpy implementation and a
plain torch implementation of the same formulas, run in the same process; reported as ratios.
Usage: python benchmarks/bench_pcm.py [--sizes 1e6 1e7] [--repeats 5]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from aimc_device import pcm
from aimc_device.pcm.torch_ops import program_torch, read_torch

MODEL = pcm.PCMModel.preset("rasch2023")
T = 3600.0


def numpy_program_read(g, rng):
    """Baseline: the same statistics with numpy's generator, one pass per operation."""
    sig_p = pcm.programming_noise_std(g, MODEL)
    g_prog = np.maximum(g + sig_p * rng.standard_normal(g.shape), 0.0)
    mu, sd = pcm.drift_exponent_stats(g, MODEL)
    nu = mu + sd * rng.standard_normal(g.shape)
    g_d = g_prog * pcm.drift_factor(nu, T, MODEL)
    sig = pcm.read_noise_std(g_d, T, MODEL, g_ref=g)
    return np.maximum(g_d + sig * rng.standard_normal(g.shape), 0.0)


def best_of(fn, repeats):
    fn()  # warm-up (compilation, page faults)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"{'devices':>10} {'numba [ms]':>11} {'numpy [ms]':>11} {'torch [ms]':>11} "
          f"{'numpy/numba':>12} {'torch/numba':>12}")
    for n in (int(s) for s in args.sizes):
        g = np.random.default_rng(0).uniform(0.0, MODEL.g_max, n)
        gt = torch.from_numpy(g)
        rng = np.random.default_rng(1)

        def numba_path():
            return pcm.read(pcm.program(g, MODEL, rng=0), T, MODEL, rng=1)

        def torch_path():
            gp, nu = program_torch(gt, MODEL, generator=0)
            return read_torch(gt, gp, nu, T, MODEL, generator=1)

        t_nb = best_of(numba_path, args.repeats)
        t_np = best_of(lambda: numpy_program_read(g, rng), args.repeats)
        t_t = best_of(torch_path, args.repeats)
        print(f"{n:>10.0e} {1e3 * t_nb:>11.1f} {1e3 * t_np:>11.1f} {1e3 * t_t:>11.1f} "
              f"{t_np / t_nb:>12.1f} {t_t / t_nb:>12.1f}")


if __name__ == "__main__":
    main()
