"""The worker of test_nn's DistributedDataParallel test, in a module of few imports (each
spawned process imports the module of its function)."""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from aimc_device import crossbar, pcm
from aimc_device import nn as anl

DEV = pcm.PCMModel.preset("rasch2023")
STD = crossbar.CrossbarConfig()


def _mlp(seed=0):  # as test_nn._mlp
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))


def ddp_worker(rank, world, out):
    # importing the package does not load Dynamo (about a second and a half per process)
    with open(f"{out}/rank{rank}.dynamo", "w") as fh:
        fh.write(str("torch._dynamo" in sys.modules))
    import torch.distributed as dist

    # a file store: no TCP port to race for
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank,
                            world_size=world)
    try:
        model = anl.convert(_mlp(0), STD, DEV, rng=0)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = anl.AnalogOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1), model,
                                  steps_per_epoch=2)
        g = torch.Generator().manual_seed(rank)
        for _ in range(2):
            x, y = torch.randn(8, 20, generator=g), torch.randint(0, 4, (8,), generator=g)
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                   f"{out}/rank{rank}.pt")
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()
