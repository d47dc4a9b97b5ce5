"""Tests of aimc_device.study: the study end to end, resume, Dask equivalence, sensitivity, CLI.

Everything runs on the workloads' quick settings with few repeats (the whole file takes well
under two minutes on 2 cores). The CNN goes end to end through the demo (campaign -> fit ->
device card -> study); the faster LSTM carries the resume, Dask and sensitivity tests.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from aimc_device import study
from aimc_device.cli import main
from aimc_device.crossbar import CrossbarConfig, mvm_error
from aimc_device.crossbar.metric import standard_test_case
from aimc_device.io import save_device_model
from aimc_device.pcm import PCMModel
from aimc_device.study._checkpoint import atomic_save, load_checkpoint

TIMES = (1.0, 3600.0)


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    """One output folder whose checkpoints (LSTM quick) the tests below share."""
    return tmp_path_factory.mktemp("study")


def test_demo_quick_cnn_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "HWA-trained" in text and "direct mapping" in text and "A* 1 h" in text
    for name in ("campaign.h5", "device_model.h5", "cnn-study.nc", "cnn-study.txt",
                 "cnn-study.png"):
        assert (out / name).is_file(), name
    ds = study.load_dataset(out / "cnn-study.nc")
    assert ds["error"].dims == ("variant", "time", "repeat")
    assert list(ds["variant"].values) == ["fp", "direct", "hwa"]
    assert ds.sizes == {"variant": 3, "time": 4, "repeat": 3}
    np.testing.assert_allclose(ds["time"].values, [1.0, 3600.0, 86400.0, 31536000.0])
    err = ds["error"].values
    assert np.all((err >= 0) & (err <= 1))
    # the FP row is the FP error; the analog rows are real measurements, not copies
    assert np.all(err[0] == float(ds["fp_error"]))
    assert float(ds["chance_error"]) > 0.8
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
    PCMModel(**json.loads(ds.attrs["device_model"]))  # a valid model


def _lstm(shared_dir, scheduler, repeats=2, **kw):
    return study.run_study("lstm", quick=True, repeats=repeats, times=TIMES, out_dir=shared_dir,
                           seed=3, scheduler=scheduler, progress=False, plot=False,
                           verbose=False, **kw)


def test_local_cluster_equals_serial(shared_dir):
    distributed = pytest.importorskip("distributed")
    serial = _lstm(shared_dir, "synchronous")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        remote = _lstm(shared_dir, cluster.scheduler_address)
    np.testing.assert_array_equal(serial["error"].values, remote["error"].values)
    assert serial.attrs["scheduler"] == "synchronous"
    assert remote.attrs["scheduler"].startswith("tcp://")
    # new device draws per repeat: the repeats are not all the same
    assert serial["error"].sel(variant=["direct", "hwa"]).std("repeat").max() >= 0


def test_resume_equals_uninterrupted(tmp_path):
    kw = dict(workload_kwargs={"epochs": 2}, hwa_epochs=2)
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
    for c in cks:
        a = torch.load(tmp_path / "a" / "checkpoints" / c, weights_only=True)["model"]
        b = torch.load(run_dir / "checkpoints" / c, weights_only=True)["model"]
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_sensitivity_quick_two_nonidealities(shared_dir):
    ds = study.run_sensitivity("lstm", quick=True, nonidealities=["output noise", "ADC"],
                               n_levels=3, repeats=2, out_dir=shared_dir, seed=3,
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
        assert (shared_dir / f"lstm-sensitivity.{ext}").is_file()


def test_find_scale_hits_target():
    w, x = standard_test_case(0, 100, (64, 64))
    v, e = study.find_scale("programming noise", 0.2, t=None, weights=w, inputs=x, seed=0)
    assert v > 1 and e == pytest.approx(0.2, abs=1e-3)
    c, d = study.NONIDEALITIES["programming noise"].apply(CrossbarConfig(),
                                                          PCMModel.preset("rasch2023"), v)
    assert mvm_error(c, d, weights=w, inputs=x, rng=0) == pytest.approx(e)
    v, e = study.find_scale("output noise", 0.05, t=None, weights=w, inputs=x, seed=0)
    assert v == pytest.approx(0.04) and e > 0.05  # already above: the standard value


def test_cli_study_lstm_quick_and_device_card(shared_dir, tmp_path, capsys):
    card = tmp_path / "card.h5"
    save_device_model(PCMModel.preset("rasch2023"), card, provenance={"source_file": "x.h5"})
    rc = main(["study", "--workload", "lstm", "--quick", "--repeats", "2", "--seed", "3",
               "--out", str(shared_dir), "--device-model", str(card),
               "--scheduler", "synchronous", "--no-progress"])
    assert rc == 0
    assert "HWA-trained" in capsys.readouterr().out
    ds = study.load_dataset(shared_dir / "lstm-study.nc")
    assert json.loads(ds.attrs["device_provenance"])["card_source_file"] == "x.h5"
    assert main(["study", "--workload", "lstm", "--quick", "--repeats", "0",
                 "--out", str(shared_dir)]) == 2


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
