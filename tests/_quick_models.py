"""Models trained once per test session and shared, read-only, by the test modules.

Training dominates the suite's run time. Each workload's quick floating-point model (seed 0)
is trained once, by the study's checkpointed FP phase, in one session folder (``STUDY_DIR``):
the tests that need the model share it, and the study tests that run in ``STUDY_DIR`` (or copy
its checkpoints) resume from it instead of training again. A test that changes a model works
on a copy (``aimc_device.nn.convert`` copies).
"""
from __future__ import annotations

import functools
import glob
import os
import tempfile

import torch

from aimc_device import study
from aimc_device.workloads import get_workload

_TMP = tempfile.TemporaryDirectory(prefix="aimc-device-tests-")  # removed at exit
#: The session's study folder (checkpoints of seed ``SEED``, quick settings).
STUDY_DIR = _TMP.name
SEED = 0


class _FPDone(Exception):
    """Raised after the checkpoint of the last FP epoch: stops the study before HWA training."""


def fp_checkpoint(name: str) -> str:
    """Path of the FP checkpoint of workload ``name`` (quick, seed 0) in ``STUDY_DIR``."""
    quick_fp(name)
    (path,) = glob.glob(os.path.join(STUDY_DIR, "checkpoints", f"{name}-fp-*.pt"))
    return path


@functools.lru_cache(maxsize=None)
def quick_fp(name: str) -> dict:
    """The FP model of workload ``name`` with its quick settings, seed 0, in eval mode.

    Returns a dict: ``workload`` and ``model``.
    """
    wl = get_workload(name, quick=True)
    if not glob.glob(os.path.join(STUDY_DIR, "checkpoints", f"{name}-fp-*.pt")):
        def stop(phase, epoch):
            if phase == "fp" and epoch == wl.epochs - 1:
                raise _FPDone

        try:
            study.prepare_models(name, quick=True, seed=SEED, out_dir=STUDY_DIR,
                                 progress=False, on_epoch_end=stop)
        except _FPDone:
            pass
    (path,) = glob.glob(os.path.join(STUDY_DIR, "checkpoints", f"{name}-fp-*.pt"))
    model = wl.build_model(seed=SEED)
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    return dict(workload=wl, model=model.eval())
