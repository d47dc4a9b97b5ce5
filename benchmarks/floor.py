"""Where the time of an analog Linear layer's evaluation goes, against its floor on this machine.

For each case of the Linear grid of ``suite.py`` (a programmed ``nn.Linear``, evaluation forward,
full standard model and periphery only), three ratios against the floating-point layer in the
same process (interleaved blocks, median of the blocks):

- products: the matrix products the equations need, alone, as the engine computes them: per
  tile of at most ``max_rows`` inputs the signal W~ x~ (Eq. 2) and, with the full model, the
  IR-drop shape (W~ o P) x~ (Eq. 15) and |W~| against [|x~|; x~^2] (Eqs. 14, 18), in float32
  (docs/model.md sections 3 and 6);
- + stage: those products and the engine's output stage on them (noise draws, IR drop, ADC,
  digital factors; one Numba pass per tile), still without the DAC and the Python path of a
  call;
- layer: the analog layer as a model calls it (``suite.py``'s figure).

The products are the floor of any implementation of these equations in the baseline's precision;
the stage adds a fixed cost per output; the rest of the layer's time is the DAC and the cost of a
call (module, tile, engine). Median and worst per group (at least 512 inputs per tile, or fewer).

Usage: python benchmarks/floor.py [--quick] [--threads 2] [--budget S]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings

import numba
import numpy as np
import torch
from suite import CONFIGS, linear_cases, paired_ratio

from aimc_device import nn as anl
from aimc_device import pcm
from aimc_device.crossbar import _fast
from aimc_device.crossbar import _kernels as _K
from aimc_device.crossbar.options import current_options


def _parts(analog: torch.nn.Module, rows: int, cfg):
    """Closures running the layer's products alone, and its products and output stages, on
    integer DAC levels of ``rows`` inputs (their values do not change the work)."""
    w_tiles = [w.detach() for w in analog.tile.operands(torch.device("cpu"), torch.float32)[
        "w_tiles"]]
    options = current_options()
    gen = torch.Generator().manual_seed(0)
    levels = [torch.randint(-127, 128, (rows, w.shape[1]), generator=gen).float()
              for w in w_tiles]
    out = torch.empty((rows, w_tiles[0].shape[0]))
    col_f = np.ones(out.shape[1], dtype=np.float32)
    stages = [_K.stage(cfg, w.shape[1], np.float32, 1, unit=1 / 127, accumulate=k > 0)
              for k, w in enumerate(w_tiles)]

    def products():
        return [_fast._aux_products(lev, w, cfg, options, torch.nn.functional.linear(lev, w))
                for lev, w in zip(levels, w_tiles)]

    def with_stage():
        outputs = _K.Outputs(out.numpy(), col_f, None, None, None)
        for p, s in zip(products(), stages):
            _K.output_stage(p, s, outputs)

    return products, with_stage


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the quick Linear cases of suite.py")
    ap.add_argument("--threads", type=int, default=2, help="torch and Numba threads")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timing per ratio (default 1.0, quick 0.5)")
    args = ap.parse_args(argv)
    budget = args.budget or (0.5 if args.quick else 1.0)
    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    anl.retain_freed_memory()
    cpu = torch.device("cpu")
    print(f"torch threads {torch.get_num_threads()}, torch {torch.__version__}", flush=True)
    rows_out = []
    for case, make, shape, rows_per_tile in linear_cases(args.quick):
        for model, cfg in CONFIGS.items():
            torch.manual_seed(0)
            fp = make().eval()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                analog = anl.convert(copy.deepcopy(fp), cfg, pcm.PCMModel.preset("rasch2023"),
                                     rng=0)
            anl.program(analog, rng=0)
            analog.eval()
            x = torch.randn(shape)
            products, with_stage = _parts(analog, int(np.prod(shape[:-1])), cfg)
            with torch.no_grad():
                got = [paired_ratio(f, lambda: fp(x), cpu, budget)[0]
                       for f in (products, with_stage, lambda: analog(x))]
            rows_out.append((model, rows_per_tile >= 512, *got))
            print(f"  {model:<10} {case:<40} products {got[0]:5.2f}x  + stage {got[1]:5.2f}x"
                  f"  layer {got[2]:5.2f}x", flush=True)
    print(f"\n{'model':<10} {'inputs/tile':<12} {'n':>3}  {'products':>15}  {'+ stage':>15}  "
          f"{'layer':>15}   (median / worst)")
    for model in CONFIGS:
        for wide in (True, False):
            sel = [r[2:] for r in rows_out if r[0] == model and r[1] == wide]
            if not sel:
                continue
            cols = "  ".join(f"{statistics.median(c):6.2f} / {max(c):6.2f}" for c in zip(*sel))
            print(f"{model:<10} {'>= 512' if wide else '< 512':<12} {len(sel):>3}  {cols}")
    return rows_out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
