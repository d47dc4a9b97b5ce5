"""The benchmark scripts' own pieces that reach into the engine (run here on tiny shapes, so that
a change of the engine cannot leave them broken unnoticed)."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aimc_device import crossbar, pcm
from aimc_device import nn as anl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
floor = pytest.importorskip("floor")


@pytest.mark.parametrize("full", [True, False])
def test_floor_times_the_engines_products_and_stage(full):
    cfg = crossbar.CrossbarConfig() if full else crossbar.CrossbarConfig(ir_drop=0.0,
                                                                          w_noise=0.0)
    torch.manual_seed(0)
    fp = torch.nn.Linear(40, 6)
    analog = anl.convert(copy.deepcopy(fp), cfg.replace(max_rows=16),
                         pcm.PCMModel.preset("rasch2023"), rng=0)
    anl.program(analog, rng=0)
    analog.eval()
    products, with_stage = floor._parts(analog, 8, analog.tile.cfg)
    got = products()
    assert len(got) == len(analog.tile.tile_sizes) == 3  # one per tile: 14 + 13 + 13 inputs
    for p in got:
        assert p.z.shape == (8, 6)
        assert (p.w_px is not None) == full and (p.x2 is not None) == full
    with_stage()  # the stage on those products runs (outputs are its own buffer)
    assert np.isfinite(got[0].z).all()
