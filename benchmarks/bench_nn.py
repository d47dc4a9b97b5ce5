"""Speed of the torch adapter: one HWA training step and one evaluation forward of a small CNN
(two convolutions, two linear layers, batch 64, 1x28x28 inputs) with the full standard model,
against the floating-point step of the same network in the same process; reported as ratios,
with all four layers analog and with the first convolution kept digital (one input channel:
its nine-row tiles make the periphery, which scales with the outputs, dominate).

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


def _case(fp: nn.Module, x, y, repeats: int, digital=()) -> dict:
    """Paired ratios of the HWA training step and the programmed evaluation forward."""
    analog = anl.convert(copy.deepcopy(fp), crossbar.CrossbarConfig(),
                         pcm.PCMModel.preset("rasch2023"), rng=0, digital=digital)
    fp = copy.deepcopy(fp)
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
    train = paired_ratio(step(analog, opt_a), step(fp, opt_fp), repeats)
    fp.eval()
    anl.program(analog, rng=0)
    anl.drift(analog, 3600.0, rng=1)
    analog.eval()
    with torch.no_grad():
        evaluation = paired_ratio(lambda: analog(x), lambda: fp(x), repeats)
    return {"train": train, "eval": evaluation}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    fp = small_cnn()
    print(f"torch threads: {torch.get_num_threads()}; median of {args.repeats} paired blocks")
    print(f"{'case':<52} {'analog [ms]':>12} {'FP [ms]':>9} {'ratio':>7}")
    for label, digital in (("all four layers analog", ()),
                           ("first convolution digital", ("0",))):
        res = _case(fp, x, y, args.repeats, digital)
        for what, name in (("train", "HWA training step"), ("eval", "eval forward, t = 1 h")):
            r, t_a, t_fp = res[what]
            print(f"{name + ', ' + label:<52} {1e3 * t_a:>12.2f} {1e3 * t_fp:>9.2f} {r:>7.2f}")


if __name__ == "__main__":
    main()
