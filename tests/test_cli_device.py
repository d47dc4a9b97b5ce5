"""``aimc-device campaign`` and ``aimc-device fit`` through main([...])."""
from __future__ import annotations

import os

import h5py
import pytest

from aimc_device import fit, io, pcm
from aimc_device.cli import main


@pytest.fixture(scope="module")
def campaign_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "c.h5"
    rc = main(["campaign", "-o", str(path), "--levels", "5", "--devices-per-level", "100",
               "--times", "1,10,100,1000", "--repeats", "3", "--seed", "4"])
    assert rc == 0
    return path


def test_campaign_writes_schema(campaign_file):
    ds = io.read_measurements(campaign_file)
    assert dict(ds.sizes) == {"device": 500, "time": 4, "repeat": 3}
    assert ds.attrs["schema"] == io.SCHEMA


def test_campaign_same_seed_same_data(tmp_path, campaign_file):
    again = tmp_path / "again.h5"
    main(["campaign", "-o", str(again), "--levels", "5", "--devices-per-level", "100",
          "--times", "1,10,100,1000", "--repeats", "3", "--seed", "4"])
    with h5py.File(again) as a, h5py.File(campaign_file) as b:
        assert (a["g"][()] == b["g"][()]).all()


def test_fit_writes_card_and_plot(tmp_path, campaign_file, capsys):
    out, fig = tmp_path / "m.h5", tmp_path / "fit.png"
    assert main(["fit", str(campaign_file), "-o", str(out), "--plot", str(fig)]) == 0
    model, prov = io.load_device_card(out)
    # the card holds what fit.fit_pcm gives on the campaign (prior: the rasch2023 preset)
    want, report = fit.fit_pcm(io.read_measurements(campaign_file),
                               prior=pcm.PCMModel.preset("rasch2023"))
    assert model == want
    assert prov["source_sha256"] == io.file_sha256(campaign_file)
    assert prov["fit_function"] == "aimc_device.fit.fit_pcm"
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size > 10_000
    assert report.summary() in capsys.readouterr().out


def _bad(capsys, argv, tmp_path, match):
    before = set(os.listdir(tmp_path))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert set(os.listdir(tmp_path)) == before  # nothing written


def test_fit_not_hdf5(tmp_path, capsys):
    bad = tmp_path / "notes.h5"
    bad.write_text("hello")
    _bad(capsys, ["fit", str(bad), "-o", str(tmp_path / "m.h5"), "--quiet"], tmp_path,
         "not an HDF5 file")


def test_fit_missing_file(tmp_path, capsys):
    _bad(capsys, ["fit", str(tmp_path / "nope.h5"), "-o", str(tmp_path / "m.h5")], tmp_path,
         "no such file")


def test_fit_unsupported_data(tmp_path, capsys):
    one = tmp_path / "one.h5"
    main(["campaign", "-o", str(one), "--levels", "1", "--devices-per-level", "20",
          "--repeats", "2"])
    _bad(capsys, ["fit", str(one), "-o", str(tmp_path / "m.h5"), "--quiet"], tmp_path,
         "usable target level")


def test_campaign_bad_preset(tmp_path, capsys):
    _bad(capsys, ["campaign", "-o", str(tmp_path / "c.h5"), "--preset", "nope"], tmp_path,
         "unknown PCM preset")


def test_campaign_bad_times(tmp_path, capsys):
    _bad(capsys, ["campaign", "-o", str(tmp_path / "c.h5"), "--times", "10,1"], tmp_path,
         "times")
