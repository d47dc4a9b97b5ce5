"""aimc_device.io: campaign files (lazy read, atomic write, bad input) and device cards."""
from __future__ import annotations

import datetime
import os

import h5py
import numpy as np
import pytest

import aimc_device
from aimc_device import io, pcm
from aimc_device.io import MeasurementFormatError


@pytest.fixture(scope="module")
def campaign():
    return pcm.simulate_campaign(pcm.PCMModel.preset("rasch2023"), levels=4, devices_per_level=50,
                                 times=(1.0, 10.0, 100.0), repeats=3, rng=3)


@pytest.fixture
def good_file(tmp_path, campaign):
    path = tmp_path / "c.h5"
    io.write_measurements(campaign, path)
    return path


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)
    return path


def test_round_trip_lazy_and_exact(good_file, campaign):
    ds = io.read_measurements(good_file, chunk_devices=64)
    assert ds["g"].dims == ("device", "time", "repeat")
    assert hasattr(ds["g"].data, "dask") and ds["g"].data.chunks[0][0] == 64
    assert ds["g"].attrs["units"] == "S" and ds["time"].attrs["units"] == "s"
    np.testing.assert_array_equal(ds["g"].values, campaign["g"].values)
    np.testing.assert_array_equal(ds["g_target"].values, campaign["g_target"].values)
    np.testing.assert_array_equal(ds["time"].values, campaign["time"].values)
    assert ds.attrs["g_max"] == campaign.attrs["g_max"] and ds.attrs["t0"] == 20.0
    assert ds.attrs["source_file"] == str(good_file)


def test_iter_device_chunks_covers_file(good_file, campaign):
    parts = list(io.iter_device_chunks(good_file, chunk_devices=70))
    assert [p.sizes["device"] for p in parts] == [70, 70, 60]
    g = np.concatenate([p["g"].values for p in parts])
    np.testing.assert_array_equal(g, campaign["g"].values)


def test_units_converted_to_si(tmp_path, campaign):
    path = tmp_path / "us.h5"
    with h5py.File(path, "w") as f:
        f["g_target"] = campaign["g_target"].values * 1e6
        f["g_target"].attrs["units"] = "uS"
        f["g"] = campaign["g"].values * 1e6
        f["g"].attrs["units"] = "uS"
        f["time"] = campaign["time"].values / 60.0
        f["time"].attrs["units"] = "min"
        f.attrs.update(g_max=25.0, g_max_units="uS", t0=20.0, t0_units="s")
    ds = io.read_measurements(path)
    np.testing.assert_allclose(ds["g"].values, campaign["g"].values, rtol=1e-6)
    np.testing.assert_allclose(ds["time"].values, campaign["time"].values)
    assert ds.attrs["g_max"] == pytest.approx(25e-6)


def test_write_is_atomic(tmp_path, campaign):
    path = tmp_path / "c.h5"
    path.write_bytes(b"old")
    bad = campaign.copy(deep=True)
    bad["g"].values[5, 1, 0] = np.inf  # (NaN is a read not taken, schema version 2)
    with pytest.raises(MeasurementFormatError, match="inf"):
        io.write_measurements(bad, path, overwrite=True)
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["c.h5"]  # no temporary left behind


def test_write_does_not_mutate(tmp_path, campaign):
    before = campaign.copy(deep=True)
    io.write_measurements(campaign, tmp_path / "c.h5")
    assert campaign.identical(before)


# ---------------------------------------------------------------- bad input, one test per case
def test_not_hdf5(tmp_path):
    path = tmp_path / "data.h5"
    path.write_text("device,g\n1,2e-6\n")
    with pytest.raises(MeasurementFormatError, match=r"data\.h5: file: not an HDF5 file"):
        io.read_measurements(path)


def test_truncated(good_file):
    size = os.path.getsize(good_file)
    with open(good_file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(MeasurementFormatError, match="truncated"):
        io.read_measurements(good_file, check_values=True)


def test_missing_dataset(good_file):
    _edit(good_file, lambda f: f.__delitem__("time"))
    with pytest.raises(MeasurementFormatError, match=r"/time: missing dataset"):
        io.read_measurements(good_file)


def test_wrong_shape(good_file):
    def fn(f):
        g = f["g"][()]
        del f["g"]
        f["g"] = g[:, :2, :]
        f["g"].attrs["units"] = "S"
    _edit(good_file, fn)
    with pytest.raises(MeasurementFormatError, match=r"/g: wrong shape"):
        io.read_measurements(good_file)


def test_wrong_dtype(good_file):
    def fn(f):
        g = f["g_target"][()]
        del f["g_target"]
        f["g_target"] = (g * 1e9).astype(np.int32)
        f["g_target"].attrs["units"] = "nS"
    _edit(good_file, fn)
    with pytest.raises(MeasurementFormatError, match=r"/g_target: wrong dtype int32.*float32"):
        io.read_measurements(good_file)


def test_nan_or_inf(good_file):
    def fn(f):
        f["g"][3, 1, 2] = np.inf
    _edit(good_file, fn)
    with pytest.raises(MeasurementFormatError, match=r"/g: inf at index \(3, 1, 2\)"):
        io.read_measurements(good_file, check_values=True)
    # deferred check: streaming consumers find it chunk by chunk
    ds = io.read_measurements(good_file, check_values=False)
    with pytest.raises(MeasurementFormatError, match="inf at index"):
        list(io.iter_device_chunks(ds, chunk_devices=16))


def test_negative_conductance(good_file):
    def fn(f):
        f["g"][7, 0, 0] = -1e-6
    _edit(good_file, fn)
    with pytest.raises(MeasurementFormatError, match=r"/g: negative conductance .*\(7, 0, 0\)"):
        io.read_measurements(good_file)


def test_times_not_increasing(good_file):
    def fn(f):
        f["time"][2] = 5.0
    _edit(good_file, fn)
    with pytest.raises(MeasurementFormatError, match=r"/time: read times not increasing"):
        io.read_measurements(good_file)


def test_missing_units(good_file):
    _edit(good_file, lambda f: f["g"].attrs.__delitem__("units"))
    with pytest.raises(MeasurementFormatError, match=r"/g: missing units"):
        io.read_measurements(good_file)


def test_unknown_units(good_file):
    def fn(f):
        f["time"].attrs["units"] = "fortnights"
    _edit(good_file, fn)
    with pytest.raises(MeasurementFormatError, match=r"/time: unknown units 'fortnights'"):
        io.read_measurements(good_file)


def test_missing_root_attribute(good_file):
    _edit(good_file, lambda f: f.attrs.__delitem__("g_max"))
    with pytest.raises(MeasurementFormatError, match=r"attrs\['g_max'\]: missing"):
        io.read_measurements(good_file)


def test_errors_are_value_errors():
    assert issubclass(MeasurementFormatError, ValueError)
    assert issubclass(io.DeviceCardError, ValueError)


# ---------------------------------------------------------------------------- device cards
def test_device_card_round_trip_exact(tmp_path, good_file):
    model = pcm.PCMModel.preset("rasch2023-aihwkit").replace(
        prog_coeffs=(0.1e-6 / 3, 2.0e-6 / 7, -1e-6 / 11), stuck_at_zero=0.01)
    path = tmp_path / "m.h5"
    io.save_device_model(model, path, {"source_file": str(good_file),
                                       "fit_function": "aimc_device.fit.fit_pcm"})
    loaded, prov = io.load_device_card(path)
    assert loaded == model
    assert io.load_device_model(path) == model
    assert prov["source_sha256"] == io.file_sha256(good_file)
    assert prov["fit_function"] == "aimc_device.fit.fit_pcm"
    assert prov["package_version"] == aimc_device.__version__
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(
        prov["date"])
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=10)  # ISO 8601, UTC
    with h5py.File(path) as f:
        assert f.attrs["schema"] == io.CARD_SCHEMA and f.attrs["schema_version"] == 1
        for name, unit in pcm.PCMModel.UNITS.items():
            assert f["model"][name].attrs["units"] == unit
        assert f["model/prog_coeffs"].dtype == np.float64  # no pickle: plain datasets


def test_device_card_bad_units(tmp_path):
    path = tmp_path / "m.h5"
    io.save_device_model(pcm.PCMModel(), path)
    _edit(path, lambda f: f["model/g_max"].attrs.__setitem__("units", "uS"))
    with pytest.raises(io.DeviceCardError, match=r"/model/g_max: units 'uS'"):
        io.load_device_model(path)


def test_device_card_missing_field(tmp_path):
    path = tmp_path / "m.h5"
    io.save_device_model(pcm.PCMModel(), path)
    _edit(path, lambda f: f["model"].__delitem__("t0"))
    with pytest.raises(io.DeviceCardError, match=r"/model/t0: missing field"):
        io.load_device_model(path)


def test_campaign_file_is_not_a_device_card(good_file):
    with pytest.raises(io.DeviceCardError, match="not a device card"):
        io.load_device_model(good_file)


@pytest.mark.parametrize("layout", [
    {"chunks": (37, 3, 3)},                    # raw chunks: read with os.preadv
    {"chunks": None},                          # contiguous: one preadv
    {"chunks": (37, 3, 3), "compression": "gzip"},  # filtered: through HDF5
    {"chunks": (37, 1, 3)},                    # chunks split a device: through HDF5
])
def test_chunk_reader_reads_every_layout_exactly(tmp_path, campaign, layout):
    path = tmp_path / "c.h5"
    io.write_measurements(campaign, path)
    g = campaign["g"].values
    with h5py.File(path, "r+") as f:
        del f["g"]
        d = f.create_dataset("g", data=g, **layout)
        d.attrs["units"] = "S"
    ds = io.read_measurements(path)
    read = io.device_chunk_reader(ds)
    out = np.full((100,) + g.shape[1:], -1.0, g.dtype)
    for start, stop in ((0, 80), (30, 110), (111, 200), (199, 200)):  # unaligned, across chunks
        got = read(start, stop, out)
        np.testing.assert_array_equal(got, g[start:stop])
        assert np.shares_memory(got, out)
    np.testing.assert_array_equal(read(5, 17), g[5:17])  # no buffer: a fresh array


def test_chunk_reader_reports_a_truncated_file(tmp_path, campaign):
    path = tmp_path / "c.h5"
    io.write_measurements(campaign, path)
    g = campaign["g"].values
    with h5py.File(path, "r+") as f:
        del f["g"]
        d = f.create_dataset("g", data=g, chunks=(50, 3, 3))
        d.attrs["units"] = "S"
        end = max(s.byte_offset + s.size for s in
                  (d.id.get_chunk_info(i) for i in range(d.id.get_num_chunks())))
    ds = io.read_measurements(path, check_values=False)
    with open(path, "r+b") as f:
        f.truncate(end - 100)
    read = io.device_chunk_reader(ds)
    with pytest.raises(MeasurementFormatError, match=r"c\.h5: g: .*end early.*truncated"):
        read(0, 200, np.empty_like(g))
