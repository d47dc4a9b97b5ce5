"""Speed of the torch adapter: one HWA training step and one evaluation forward of a small CNN
(two convolutions, two linear layers, batch 64, 1x28x28 inputs) with the full standard model,
against the floating-point step of the same network in the same process; reported as ratios.

Usage: python benchmarks/bench_nn.py [--repeats 15]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from aimc_device import crossbar, pcm
from aimc_device import nn as anl


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def paired_ratio(fn, base, repeats: int, inner: int = 5) -> tuple[float, float, float]:
    """Median over interleaved blocks of time(fn) / time(base), and the median block times [s].

    Interleaving the two in blocks makes the ratio robust to the machine's speed drifting.
    """
    for _ in range(3):
        fn()
        base()
    ratios, t_fn, t_base = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            base()
        tb = (time.perf_counter() - t) / inner
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        tf = (time.perf_counter() - t) / inner
        ratios.append(tf / tb)
        t_fn.append(tf)
        t_base.append(tb)
    med = statistics.median
    return med(ratios), med(t_fn), med(t_base)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    fp = small_cnn()
    analog = anl.convert(copy.deepcopy(fp), crossbar.CrossbarConfig(),
                         pcm.PCMModel.preset("rasch2023"), rng=0)
    opt_fp = torch.optim.SGD(fp.parameters(), lr=0.01, momentum=0.9)
    opt_a = anl.AnalogOptimizer(torch.optim.SGD(analog.parameters(), lr=0.01, momentum=0.9),
                                analog, steps_per_epoch=1)

    def step(model, opt):
        def run():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return run

    fp.train()
    analog.train()
    r_train, t_hwa, t_fp = paired_ratio(step(analog, opt_a), step(fp, opt_fp), args.repeats)
    fp.eval()
    anl.program(analog, rng=0)
    anl.drift(analog, 3600.0, rng=1)
    analog.eval()
    with torch.no_grad():
        r_eval, t_a_eval, t_fp_eval = paired_ratio(lambda: analog(x), lambda: fp(x),
                                                   args.repeats)
    print(f"torch threads: {torch.get_num_threads()}; median of {args.repeats} paired blocks")
    print(f"{'case':<38} {'analog [ms]':>12} {'FP [ms]':>9} {'ratio':>7}")
    print(f"{'HWA training step (standard model)':<38} {1e3 * t_hwa:>12.2f} {1e3 * t_fp:>9.2f} "
          f"{r_train:>7.2f}")
    print(f"{'eval forward, programmed, t = 1 h':<38} {1e3 * t_a_eval:>12.2f} "
          f"{1e3 * t_fp_eval:>9.2f} {r_eval:>7.2f}")


if __name__ == "__main__":
    main()
