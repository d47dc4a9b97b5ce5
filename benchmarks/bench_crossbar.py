"""Speed of the crossbar simulator as ratios against torch.nn.functional.linear.

512 x 512 weights, batch 256, float32, same process. Prints a table of ratios:

- "periphery only": DAC, ADC, output noise, scales on; IR drop and short-term noise off
  (target <= 1.3x);
- "standard model": the full standard model of Rasch et al. (2023) (target <= 4.5x);
- "program + drift": programming and drifting a 512 x 512 array through aimc_device.pcm
  (target <= 5x the exact forward).

Run: ``.venv/bin/python benchmarks/bench_crossbar.py [--threads 1] [--repeats N] [--strict]``.

Measured on 2 CPU cores of an x86-64 machine with AVX-512 (shared with other work), torch
2.13 CPU, 2 torch / 2 Numba threads (median paired ratio over three runs):

    periphery only     1.26x-1.28x  (target 1.3)
    standard model     2.35x-2.6x   (target 4.5; auxiliary GEMMs in bfloat16, EngineOptions.aux_bfloat16)
    program + drift    4.4x-4.8x    (target 5; the PCM sampler's Numba kernels are 2.2 ms of it)
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from aimc_device.crossbar import AnalogArray, CrossbarConfig, analog_mvm

TARGETS = {"periphery only": 1.3, "standard model": 4.5, "program + drift": 5.0}


def _best(fn, repeats: int, inner: int) -> float:
    """Best-of-``repeats`` mean time of ``inner`` calls [s] (robust on a shared machine)."""
    fn()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def run(repeats: int = 15, inner: int = 10, batch: int = 256, n: int = 512) -> dict:
    torch.manual_seed(0)
    w = torch.randn(n, n) * 0.246
    x = torch.rand(batch, n) * 2 - 1
    arr = AnalogArray(w, CrossbarConfig(), device="rasch2023")
    arr.program(rng=0)
    gen = torch.Generator().manual_seed(0)
    f = torch.nn.functional.linear
    cfgs = {
        "periphery only": CrossbarConfig(ir_drop=0.0, w_noise=0.0),
        "standard model": CrossbarConfig(),
    }
    cases = {name: (lambda cfg=cfg: analog_mvm(x, arr.w_tiles, cfg, arr.alpha, arr.out_scale,
                                                generator=gen)) for name, cfg in cfgs.items()}
    cases["program + drift"] = lambda: arr.program(rng=1).drift(3600.0, rng=2)
    inners = {name: inner for name in cases}
    inners["program + drift"] = max(2, inner // 4)
    lin = lambda: f(x, w)  # noqa: E731
    # Paired and interleaved: every block times the baseline and the case back to back, so that
    # load from other processes hits both alike; the ratio is the median over blocks of the
    # paired ratios, and the times shown are the best blocks.
    best = {name: np.inf for name in ("linear", *cases)}
    ratios = {name: [] for name in cases}
    with torch.no_grad():
        for _ in range(repeats):
            for name, fn in cases.items():
                t_l = _best(lin, 1, inners[name])
                t_c = _best(fn, 1, inners[name])
                ratios[name].append(t_c / t_l)
                best["linear"] = min(best["linear"], t_l)
                best[name] = min(best[name], t_c)
    t_lin = best.pop("linear")
    rows = {name: (best[name], float(np.median(ratios[name]))) for name in cases}
    return {"linear": t_lin, **rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15, help="paired blocks per case")
    p.add_argument("--inner", type=int, default=10, help="calls per block")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and Numba threads (default: as configured)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a ratio is over target")
    args = p.parse_args(argv)
    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    res = run(args.repeats, args.inner)
    t_lin = res.pop("linear")
    import numba

    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch / "
          f"{numba.get_num_threads()} Numba threads; "
          f"F.linear 512x512, batch 256: {t_lin * 1e3:.3f} ms")
    print(f"{'case':18s} {'best [ms]':>10s} {'ratio':>7s} {'target':>7s}  (median paired ratio)")
    ok = True
    for name, (t, r) in res.items():
        ok &= r <= TARGETS[name]
        print(f"{name:18s} {t * 1e3:10.3f} {r:7.2f} {TARGETS[name]:7.1f}"
              f"{'' if r <= TARGETS[name] else '  (over)'}")
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    raise SystemExit(main())
