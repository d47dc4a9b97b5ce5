"""Same seed, same bits.

- A reduced study of each workload (quick settings, two training batches per epoch, a small test
  set, one repeat) run twice, and once killed after a checkpoint and run again, writes the same
  result file, table and checkpoints, bit for bit.
- The Numba kernels give the same bits whichever code path LLVM takes for a loop (its vectorised
  body or its scalar fallback, chosen at run time from the buffers' addresses).
- The recipe of the reference device card (calibration/make_reference.py), on a small campaign,
  writes the same files byte for byte twice, and its check fails when a committed value differs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import pathlib

import numba
import numpy as np
import pytest
import torch

from aimc_device import io
from aimc_device.crossbar import CrossbarConfig
from aimc_device.crossbar import _kernels as crossbar_kernels
from aimc_device.pcm import _kernels as pcm_kernels
from aimc_device.study import load_dataset, run_study

#: FP epochs of the reduced study per workload (the fewest after which the model is better
#: than chance, which A* needs).
FP_EPOCHS = {"cnn": 2, "lstm": 3, "transformer": 4}
#: A reduced study: FP and 2 HWA epochs of 2 batches each (64 training images), 90 test images,
#: one repeat, evaluated 1 h after programming.
REDUCED = dict(quick=True, repeats=1, times=(3600.0,), seed=0, hwa_epochs=2,
               scheduler="synchronous", progress=False, plot=False, verbose=False)


def _reduced(workload, out_dir, **kw):
    wl_kw = {"epochs": FP_EPOCHS[workload], "n_train": 64, "test_fraction": 0.05}
    return run_study(workload, out_dir=out_dir, workload_kwargs=wl_kw, **REDUCED, **kw)


@pytest.fixture(autouse=True)
def _one_thread():
    """torch and Numba on one thread: the comparisons are between runs on the same thread
    count, and these small networks run faster on one (no thread wake-ups per operation)."""
    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    numba.set_num_threads(numba_threads)


def _fragment_heap():
    """Blocks of assorted sizes, every other one kept: the buffers of the next run land at
    other addresses relative to each other than in the run before, as in a new process."""
    rng = np.random.default_rng(0)
    blocks = [torch.empty(int(n), dtype=torch.int8) for n in rng.integers(512, 65536, 400)]
    return blocks[::2]


class Killed(Exception):
    """Stands for the process being killed right after a checkpoint was written."""


def _kill_at(phase):
    def on_epoch_end(p, epoch):
        if p == phase:
            raise Killed(f"{p} epoch {epoch}")
    return on_epoch_end


def _assert_same_result_file(a, b):
    """The two result files hold the same variables, coordinates and attributes, bit for bit
    (the phases' wall times, attribute ``timings``, aside)."""
    da, db = load_dataset(a), load_dataset(b)
    assert sorted(da.variables) == sorted(db.variables)
    for name in da.variables:
        va, vb = da[name].values, db[name].values
        assert va.dtype == vb.dtype and va.shape == vb.shape, name
        assert va.tobytes() == vb.tobytes(), f"{name}: {va} != {vb}"
        assert da[name].attrs == db[name].attrs, name
    ta, tb = (dict(d.attrs) for d in (da, db))
    assert set(json.loads(ta.pop("timings"))) == set(json.loads(tb.pop("timings")))
    assert ta == tb


def _assert_same_checkpoints(a, b):
    names = sorted(p.name for p in (a / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (b / "checkpoints").iterdir())
    assert [n.split("-")[1] for n in names] == ["fp", "hwa"]
    for name in names:
        ca, cb = (torch.load(d / "checkpoints" / name, weights_only=True) for d in (a, b))
        assert ca["epoch"] == cb["epoch"] and ca.get("history") == cb.get("history")
        assert ca["model"].keys() == cb["model"].keys()
        for key, ta in ca["model"].items():
            tb = cb["model"][key]
            assert ta.dtype == tb.dtype and ta.shape == tb.shape, key
            assert ta.numpy().tobytes() == tb.numpy().tobytes(), f"{name}: {key}"


@pytest.mark.parametrize("workload", sorted(FP_EPOCHS))
def test_reduced_study_is_bit_identical_twice_and_after_a_kill(workload, tmp_path):
    first, second, resumed = tmp_path / "first", tmp_path / "second", tmp_path / "resumed"
    _reduced(workload, first)
    ballast = _fragment_heap()
    _reduced(workload, second)
    del ballast
    with pytest.raises(Killed):  # killed after the first checkpoint (FP epoch 0) ...
        _reduced(workload, resumed, on_epoch_end=_kill_at("fp"))
    with pytest.raises(Killed):  # ... then after the first HWA checkpoint ...
        _reduced(workload, resumed, on_epoch_end=_kill_at("hwa"))
    seen = []
    _reduced(workload, resumed, on_epoch_end=lambda p, e: seen.append((p, e)))
    assert seen == [("hwa", 1)]  # ... and resumed after it
    stem = f"{workload}-study"
    for other in (second, resumed):
        _assert_same_result_file(first / f"{stem}.nc", other / f"{stem}.nc")
        assert (first / f"{stem}.txt").read_bytes() == (other / f"{stem}.txt").read_bytes()
        _assert_same_checkpoints(first, other)


def _conv_stage(mask, level_out):
    """A convolution tile's forward stage (3 channels, 3x3 kernel, 16 outputs, IR drop, noise,
    8-bit ADC, a row and a column factor) into the given mask and ADC-level buffers; returns
    the outputs and what they must be: (ADC level / s_out) row_f col_f (Eqs. 1, 5), evaluated
    in float32 in that order."""
    rng = np.random.default_rng(5)
    f32 = np.float32
    x = (rng.integers(-127, 128, (4, 6, 6, 3)) / 127).astype(f32)
    geom = np.array([3, 3, 1, 1, 1, 1, 1, 1, 6, 6, 16], dtype=np.intp)  # one group of 16
    w = rng.uniform(-1, 1, (16, 27)).astype(f32)
    row_f, col_f = np.array([0.7], f32), rng.uniform(0.5, 1.0, 16).astype(f32)
    out = np.empty((4 * 36, 16), f32)
    cfg = CrossbarConfig(out_bits=8, out_bound=10.0, ir_drop_g=1e-3 / 27)
    s_out = f32(crossbar_kernels.quantizer_levels(8, 10.0)[0])
    stage = crossbar_kernels.stage(cfg, 27, f32, 5, row_f=row_f[0])
    weights = crossbar_kernels.ConvWeights(w, w * f32(0.5), np.abs(w), np.abs(w))
    crossbar_kernels.conv_stage(x, geom, weights, stage,
                                crossbar_kernels.Outputs(out, col_f, None, mask, level_out))
    return out, level_out.astype(f32) / s_out * row_f[0] * col_f


def test_conv_stage_same_bits_on_vectorised_and_scalar_paths():
    shape = (4 * 36, 16)
    # LLVM runs a loop's vectorised body unless its overlap check of the buffers' addresses
    # fails; mask and ADC levels in one buffer make it fail: the scalar fallback runs.
    shared = np.zeros(shape, np.int8)
    outs = []
    for mask, levels in ((np.empty(shape, np.bool_), np.empty(shape, np.int8)),
                         (shared.view(np.bool_), shared)):
        out, expected = _conv_stage(mask, levels)
        assert np.abs(levels).max() > 10  # a real range of levels
        np.testing.assert_array_equal(out, expected)  # exactly (a zero level may be -0.0)
        outs.append(out.view(np.int32).tobytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("module", [crossbar_kernels, pcm_kernels], ids=lambda m: m.__name__)
def test_kernels_compiled_without_fast_math(module):
    # fast-math lets the vectorised body and the scalar fallback of a loop round differently
    kernels = [v for v in vars(module).values()
               if isinstance(v, numba.core.registry.CPUDispatcher)]
    assert len(kernels) > 5
    for kernel in kernels:
        assert not kernel.targetoptions.get("fastmath"), kernel.py_func.__name__


RECIPE = pathlib.Path(__file__).resolve().parents[1] / "calibration" / "make_reference.py"
#: A small campaign for the recipe: 5 levels x 50 devices, 3 read times, 4 repeats.
SMALL = dict(preset="rasch2023", levels=5, devices_per_level=50, times=(1.0, 100.0, 1e4),
             repeats=4, seed=1)
README = """# models/

- campaign sha256: `{}`

Worst relative deviation from the preset over the 20 levels: sigma_P 0.0 %, mu_nu 0.0 %,
sigma_nu 0.0 %, Q_s 0.0 % (read-noise coefficient +0.00 %).
""".format("0" * 64)


def _recipe():
    spec = importlib.util.spec_from_file_location("make_reference", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_recipe_is_byte_stable_and_its_check_compares(tmp_path, capsys):
    recipe = _recipe()
    models = tmp_path / "models"
    models.mkdir()
    (models / "README.md").write_text(README)
    first, second = tmp_path / "first", tmp_path / "second"
    run = dict(settings=SMALL, models_dir=str(models))
    assert recipe.main(["--out", str(first), "--update"], **run) == 0
    assert recipe.main(["--out", str(second), "--check"], **run) == 0
    for name in (recipe.CAMPAIGN, recipe.CARD, recipe.PLOT):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
        if name != recipe.CAMPAIGN:
            assert (models / name).read_bytes() == (second / name).read_bytes(), name
    assert b"Software" not in (second / recipe.PLOT).read_bytes()  # no matplotlib version
    sha = hashlib.sha256((second / recipe.CAMPAIGN).read_bytes()).hexdigest()
    text = (models / "README.md").read_text()
    assert f"campaign sha256: `{sha}`" in text
    assert "over the 5 levels: sigma_P" in text and "0.0 %, mu_nu 0.0 %" not in text
    model, prov = io.load_device_card(second / recipe.CARD)
    assert "date" not in prov and prov["source_sha256"] == sha
    # a committed model field one ulp off, or another recorded SHA-256, fails the check
    result = {"sha256": sha, "model": model}
    assert recipe.check(result, str(models)) == []
    for field in dataclasses.fields(model):
        value = getattr(model, field.name)
        if isinstance(value, float):
            other = model.replace(**{field.name: float(np.nextafter(value, np.inf))})
            io.save_device_model(other, models / recipe.CARD)
            problems = recipe.check(result, str(models))
            assert len(problems) == 1 and field.name in problems[0], field.name
    io.save_device_model(model, models / recipe.CARD)
    (models / "README.md").write_text(text.replace(sha, sha[::-1]))
    problems = recipe.check(result, str(models))
    assert len(problems) == 1 and "SHA-256" in problems[0]
    (models / recipe.CARD).unlink()
    assert any("no committed card" in p for p in recipe.check(result, str(models)))
