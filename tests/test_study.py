"""Tests of aimc_device.study: the study end to end, resume, Dask equivalence, sensitivity, CLI.

Everything runs on the workloads' quick settings with few repeats. The CNN goes end to end
through the demo (campaign -> fit -> device card -> study); the faster LSTM carries the resume,
Dask and sensitivity tests. The FP models come from the session's study folder
(``_quick_models.STUDY_DIR``, seed 0): the LSTM tests run there and share its checkpoints, the
demo starts from a copy of the CNN's FP checkpoint; the resume test trains its own.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from aimc_device import study
from aimc_device.cli import main
from aimc_device.crossbar import CrossbarConfig, mvm_error
from aimc_device.crossbar.metric import standard_test_case
from aimc_device.io import load_device_model, model_from_dict, save_device_model
from aimc_device.pcm import EmpiricalModel, PCMModel
from aimc_device.study._checkpoint import atomic_save, load_checkpoint
from aimc_device.study._tasks import evaluate_task
from aimc_device.workloads import get_workload

from _quick_models import STUDY_DIR, fp_checkpoint, quick_fp

TIMES = (1.0, 3600.0)


def test_demo_quick_cnn_end_to_end(tmp_path, capsys):
    """The demo's whole chain on the RRAM-like campaign (one read per time, a bake, dead cells,
    missing reads): the fit keeps the empirical family, and the study trains and evaluates the
    CNN with that card (the PCM card's chain: test_cli_study_lstm_quick_and_device_card)."""
    out = tmp_path / "demo"
    # the FP phase is the session's (the same settings: quick CNN, seed 0): resumed, not redone
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(fp_checkpoint("cnn"), out / "checkpoints")
    assert main(["demo", "--quick", "--technology", "rram", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "HWA-trained" in text and "direct mapping" in text and "A* 1 h" in text
    assert "family chosen: empirical (auto)" in text
    for name in ("campaign.h5", "device_model.h5", "cnn-study.nc", "cnn-study.txt",
                 "cnn-study.png"):
        assert (out / name).is_file(), name
    ds = study.load_dataset(out / "cnn-study.nc")
    assert ds["error"].dims == ("variant", "time", "repeat")
    assert list(ds["variant"].values) == ["fp", "direct", "hwa"]
    assert ds.sizes == {"variant": 3, "time": 4, "repeat": 3}
    np.testing.assert_allclose(ds["time"].values, [1.0, 3600.0, 86400.0, 31536000.0])
    err = ds["error"].values
    # the FP row is the error of the FP model
    run = quick_fp("cnn")
    wl = run["workload"]
    x_test, y_test = wl.load_data()[1].tensors
    assert np.all(err[0] == float(ds["fp_error"])) and float(ds["fp_error"]) == wl.evaluate(
        run["model"])
    assert float(ds["chance_error"]) == 1 - np.bincount(y_test).max() / len(y_test)
    # the analog rows count misclassified test samples; A* = 1 - (err - fp) / (chance - fp)
    wrong = err[1:] * len(y_test)
    np.testing.assert_allclose(wrong, np.round(wrong), rtol=0, atol=1e-9)
    fp, chance = float(ds["fp_error"]), float(ds["chance_error"])
    np.testing.assert_allclose(ds["normalized_accuracy"].values, 1 - (err - fp) / (chance - fp),
                               rtol=1e-12)
    a = ds["normalized_accuracy_mean"].sel(variant="hwa").values
    assert np.all(a > 0.5)
    # provenance of the fitted device card and every setting are in the attrs
    prov = json.loads(ds.attrs["device_provenance"])
    assert prov["source"] == "device card"
    assert prov["card_path"].endswith("device_model.h5") and len(prov["card_sha256"]) == 64
    assert prov["card_source_file"].endswith("campaign.h5")
    settings = json.loads(ds.attrs["settings"])
    assert settings["workload"] == "cnn" and settings["digital"] == ["stem", "fc"]
    assert CrossbarConfig.from_dict(json.loads(ds.attrs["crossbar_config"])) == CrossbarConfig()
    card = load_device_model(out / "device_model.h5")
    assert isinstance(card, EmpiricalModel) and prov["card_family"] == "empirical"
    assert model_from_dict(json.loads(ds.attrs["device_model"])) == card


def _lstm(out_dir, scheduler, repeats=2, seed=0, **kw):
    return study.run_study("lstm", quick=True, repeats=repeats, times=TIMES, out_dir=out_dir,
                           seed=seed, scheduler=scheduler, progress=False, plot=False,
                           verbose=False, **kw)


def test_local_cluster_equals_serial():
    distributed = pytest.importorskip("distributed")
    serial = _lstm(STUDY_DIR, "synchronous")
    # one worker process: the tasks run in another process, one after the other, on the
    # worker's own cache of rebuilt models
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        remote = _lstm(STUDY_DIR, cluster.scheduler_address)
    np.testing.assert_array_equal(serial["error"].values, remote["error"].values)
    assert serial.attrs["scheduler"] == "synchronous"
    assert remote.attrs["scheduler"].startswith("tcp://")
    # each (variant v, repeat r) is one task keyed (seed, v, r), v = 1 direct, 2 hwa: new
    # device draws per repeat, the same draws wherever the task runs
    prep = study.prepare_models("lstm", quick=True, seed=0, out_dir=STUDY_DIR, progress=False)
    for v, name in ((1, "direct"), (2, "hwa")):
        for r in range(2):
            np.testing.assert_array_equal(
                evaluate_task(prep.specs[name], (0, v, r), TIMES),
                serial["error"].sel(variant=name, repeat=r).values)
    assert float(serial["error"].sel(variant=["direct", "hwa"]).std("repeat").max()) > 0


def test_resume_equals_uninterrupted(tmp_path):
    # its own training: 2 + 2 epochs of 4 batches (256 training images)
    kw = dict(workload_kwargs={"epochs": 2, "n_train": 256}, hwa_epochs=2, seed=3)
    full = _lstm(tmp_path / "a", "synchronous", repeats=1, **kw)

    class Stop(Exception):
        pass

    def stop_at(phase, epoch):
        def cb(p, e):
            if (p, e) == (phase, epoch):
                raise Stop
        return cb

    run_dir = tmp_path / "b"
    with pytest.raises(Stop):
        _lstm(run_dir, "synchronous", repeats=1, on_epoch_end=stop_at("fp", 0), **kw)
    with pytest.raises(Stop):
        _lstm(run_dir, "synchronous", repeats=1, on_epoch_end=stop_at("hwa", 0), **kw)
    seen = []
    resumed = _lstm(run_dir, "synchronous", repeats=1, on_epoch_end=lambda p, e: seen.append(
        (p, e)), **kw)
    assert seen == [("hwa", 1)]  # only the epoch after the last checkpoint ran again
    np.testing.assert_array_equal(full["error"].values, resumed["error"].values)
    cks = sorted(os.listdir(run_dir / "checkpoints"))
    assert [c.split("-")[1] for c in cks] == ["fp", "hwa"]
    # the checkpointed FP phase is the workload's own training, bit for bit
    wl = get_workload("lstm", quick=True, epochs=2, n_train=256)
    plain = wl.train_fp(wl.build_model(seed=3), seed=3, progress=False).state_dict()
    fp = torch.load(run_dir / "checkpoints" / cks[0], weights_only=True)["model"]
    assert plain.keys() == fp.keys() and all(torch.equal(plain[k], fp[k]) for k in fp)
    for c in cks:
        a = torch.load(tmp_path / "a" / "checkpoints" / c, weights_only=True)["model"]
        b = torch.load(run_dir / "checkpoints" / c, weights_only=True)["model"]
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_sensitivity_quick_two_nonidealities():
    ds = study.run_sensitivity("lstm", quick=True, nonidealities=["output noise", "ADC"],
                               n_levels=3, repeats=2, out_dir=STUDY_DIR, seed=0,
                               scheduler="synchronous", progress=False, verbose=False)
    assert list(ds["nonideality"].values) == ["output noise", "ADC"]
    eps = ds["mvm_error"].sel(nonideality="output noise").values
    eps = eps[np.isfinite(eps)]
    assert eps.size == 3  # the standard model and two levels found by root finding
    np.testing.assert_allclose(eps[-1], 0.20, atol=2e-3)  # root finding reached the target
    assert eps[0] == pytest.approx(float(ds["standard_mvm_error"]))
    assert np.all(np.diff(eps) > 0)
    adc = ds["value"].sel(nonideality="ADC").values
    assert adc[0] == 8 and np.all(np.diff(adc[np.isfinite(adc)]) == -1)
    a = ds["normalized_accuracy_mean"].values
    assert np.isfinite(a[:, 0]).all() and np.allclose(a[:, 0], a[0, 0])
    assert ds["threshold_mvm_error"].dims == ("nonideality",)
    for ext in ("nc", "txt", "png"):
        assert os.path.isfile(os.path.join(STUDY_DIR, f"lstm-sensitivity.{ext}"))


def test_find_scale_hits_target():
    w, x = standard_test_case(0, 100, (64, 64))
    v, e = study.find_scale("programming noise", 0.2, t=None, weights=w, inputs=x, seed=0)
    assert v > 1 and e == pytest.approx(0.2, abs=1e-3)
    c, d = study.NONIDEALITIES["programming noise"].apply(CrossbarConfig(),
                                                          PCMModel.preset("rasch2023"), v)
    assert mvm_error(c, d, weights=w, inputs=x, rng=0) == pytest.approx(e)
    v, e = study.find_scale("output noise", 0.05, t=None, weights=w, inputs=x, seed=0)
    assert v == pytest.approx(0.04) and e > 0.05  # already above: the standard value


def test_cli_study_lstm_quick_and_device_card(tmp_path, capsys):
    card = tmp_path / "card.h5"
    save_device_model(PCMModel.preset("rasch2023"), card, provenance={"source_file": "x.h5"})
    rc = main(["study", "--workload", "lstm", "--quick", "--repeats", "2", "--seed", "0",
               "--out", STUDY_DIR, "--device-model", str(card),
               "--scheduler", "synchronous", "--no-progress"])
    assert rc == 0
    assert "HWA-trained" in capsys.readouterr().out
    ds = study.load_dataset(os.path.join(STUDY_DIR, "lstm-study.nc"))
    assert json.loads(ds.attrs["device_provenance"])["card_source_file"] == "x.h5"
    # The command as typed and the machine are kept, and printed under the figure.
    assert ds.attrs["command"] == ("aimc-device study --workload lstm --quick --repeats 2 --seed 0 "
                                   f"--out {STUDY_DIR} --device-model {card} "
                                   "--scheduler synchronous --no-progress")
    assert f"{os.cpu_count()} logical CPUs, torch {torch.__version__}" in ds.attrs["hardware"]
    assert study.report.provenance_line(ds) == f"{ds.attrs['command']} | {ds.attrs['hardware']}"
    assert main(["study", "--workload", "lstm", "--quick", "--repeats", "0",
                 "--out", STUDY_DIR]) == 2


def test_quick_checkpoints_carry_the_resolved_quick_settings(tmp_path, monkeypatch):
    # A quick folder made with other quick settings is not resumed into another model.
    from aimc_device import workloads

    class Stop(Exception):
        pass

    def stop(phase, epoch):
        raise Stop

    names = []
    for width in (8, 6):
        monkeypatch.setitem(workloads.QUICK, "cnn", {**workloads.QUICK["cnn"], "width": width})
        with pytest.raises(Stop):
            study.prepare_models("cnn", out_dir=tmp_path, quick=True, progress=False,
                                 on_epoch_end=stop)
        names.append(set(os.listdir(tmp_path / "checkpoints")))
    assert len(names[0]) == 1 and len(names[1]) == 2  # a second FP checkpoint, not a resume


def test_checkpoint_atomic_and_settings_guard(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"epoch": 1, "settings": json.dumps({"a": 1})}, path)
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temp file left behind
    assert load_checkpoint(path, {"a": 1})["epoch"] == 1
    with pytest.raises(ValueError, match="other settings"):
        load_checkpoint(path, {"a": 2})
    assert load_checkpoint(tmp_path / "none.pt") is None
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
