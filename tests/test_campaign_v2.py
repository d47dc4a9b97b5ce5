"""Campaign schema version 2 and the fits on lab-like data: one read per time, reads not taken,
per-device read times, bakes (temperature acceleration), excluded devices, implausible input."""
from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest

from aimc_device import fit, io, pcm
from aimc_device.cli import main
from aimc_device.fit import FitError
from aimc_device.io import MeasurementFormatError
from test_cli_device import _bad  # one line on stderr, exit status 2, nothing written

PRESET = pcm.PCMModel.preset("rasch2023")
X = np.arange(1, 21) / 20
K_B = 8.617333262e-5  # Boltzmann constant [eV/K] (CODATA 2018)
E_TRUE = 0.8          # activation energy of the test campaigns [eV]
# Reads at 1 s ... 1000 s at 300 K, a 1 h bake at 85 degC ending with read 4, a read at room
# temperature, a 30 min bake at 125 degC, and a read after a day.
NOMINAL = np.array([1.0, 10.0, 100.0, 1000.0, 4600.0, 8200.0, 10000.0, 86400.0])
TEMPS = np.array([300.0, 300.0, 300.0, 300.0, 358.15, 300.0, 398.15, 300.0])


def _jittered(n: int, nominal: np.ndarray, seed: int = 5, groups: int = 16) -> np.ndarray:
    """(n, T) read times: devices read in ``groups`` blocks, each with its own times [s]."""
    rng = np.random.default_rng(seed)
    jit = np.exp(0.1 * rng.standard_normal((groups, nominal.size)))
    t = nominal[None, :] * jit[rng.integers(0, groups, n)]
    return np.maximum.accumulate(t, axis=1) * (1.0 + 1e-9 * np.arange(nominal.size))


def _rel_err(fitted, truth):
    return np.abs(np.asarray(fitted) / np.asarray(truth) - 1.0)


@pytest.fixture(scope="module")
def lab_fit():
    """20 levels x 2000 devices, one read per time, 5 % of reads missing, per-device times,
    bakes at 85 and 125 degC; E_a fitted."""
    truth = PRESET.replace(activation_energy=E_TRUE)
    ds = pcm.simulate_campaign(truth, 20, 2000, times=_jittered(40000, NOMINAL), repeats=1,
                               rng=3, temperature=TEMPS, missing=0.05)
    before = ds.copy(deep=True)
    model, report = fit.fit_pcm(ds, prior=PRESET)
    return ds, before, model, report


def test_lab_campaign_recovers_preset_and_activation_energy(lab_fit):
    """Same tolerances as the round trip with repeats: sigma_P 3 %, mu_nu 3 %, sigma_nu 5 %,
    Q_s coefficient and exponent 5 %; E_a within 2 % (its standard error is about 0.5 %)."""
    ds, before, model, report = lab_fit
    assert ds.identical(before)
    g = X * PRESET.g_max
    assert _rel_err(pcm.programming_noise_std(g, model),
                    pcm.programming_noise_std(g, PRESET)).max() < 0.03
    mu, sd = pcm.drift_exponent_stats(g, model)
    mu0, sd0 = pcm.drift_exponent_stats(g, PRESET)
    assert _rel_err(mu, mu0).max() < 0.03
    assert _rel_err(sd, sd0).max() < 0.05
    assert abs(model.read_noise_coeff / PRESET.read_noise_coeff - 1) < 0.05
    assert abs(model.read_noise_exponent / PRESET.read_noise_exponent - 1) < 0.05
    assert abs(model.activation_energy / E_TRUE - 1) < 0.02
    ea = report["activation_energy"]
    assert abs(ea.coeffs[0] - E_TRUE) < 4 * ea.stderr[0]
    assert model.reference_temperature == 300.0


def test_lab_report_goodness_and_sources(lab_fit):
    ds, _, model, report = lab_fit
    assert set(report.components) == {"programming_noise", "drift_mean", "drift_std",
                                      "read_noise", "activation_energy"}
    for name in ("programming_noise", "drift_mean", "drift_std", "read_noise"):
        cf = report[name]
        assert cf.identified and cf.source == "fitted"
        assert 0.2 < cf.chi2_reduced < 3.0, (name, cf.chi2_reduced)
        assert cf.r_squared > 0.9
        assert cf.aic == pytest.approx(cf.chi2 + 2 * cf.n_params)
        assert cf.bic == pytest.approx(cf.chi2 + cf.n_params * np.log(cf.x.size))
    assert "scatter of each device around its own drift line" in report["read_noise"].notes
    missing = np.isnan(ds["g"].values).sum(axis=(0, 2))
    np.testing.assert_array_equal(report.missing_reads, missing)
    assert report.activation_energy["identified"]
    assert "fitted to bakes at 358.15 K, 398.15 K" in report.activation_energy["source"]
    text = report.summary()
    assert "activation energy" in text and "reads not taken per time" in text
    assert len(report.plot(reference=PRESET).axes) == 5


def test_two_read_times_take_read_noise_from_the_named_prior(tmp_path):
    ds = pcm.simulate_campaign(PRESET, 8, 300, times=(10.0, 1000.0), repeats=1, rng=2)
    prior = PRESET.replace(read_noise_coeff=0.01, read_noise_exponent=-0.6, name="lab-prior")
    model, report = fit.fit_pcm(ds, prior=prior)
    cf = report["read_noise"]
    assert not cf.identified
    assert cf.source.startswith("from prior lab-prior, not identified by these data")
    assert (model.read_noise_coeff, model.read_noise_exponent) == (0.01, -0.6)
    assert report["drift_mean"].identified
    assert "from prior lab-prior" in report["programming_noise"].notes
    assert "FROM PRIOR LAB-PRIOR, NOT IDENTIFIED" in report.summary()
    io.save_device_model(model, tmp_path / "m.h5", report.provenance)
    _, prov = io.load_device_card(tmp_path / "m.h5")
    assert prov["component_read_noise"].startswith("from prior lab-prior, not identified")
    assert prov["component_drift_mean"].startswith("fitted: chi2_red")


def test_one_bake_temperature_needs_an_activation_energy():
    temps = np.array([300.0, 300.0, 300.0, 358.15, 300.0])
    truth = PRESET.replace(activation_energy=0.6)
    ds = pcm.simulate_campaign(truth, 6, 300, times=(1.0, 100.0, 1000.0, 4600.0, 86400.0),
                               repeats=2, rng=4, temperature=temps)
    with pytest.raises(FitError, match=r"temperature: .*bakes at one temperature \(358\.15 K\)"
                                       r".*--activation-energy"):
        fit.fit_pcm(ds, prior=PRESET)
    model, report = fit.fit_pcm(ds, prior=PRESET, activation_energy=0.6)
    assert model.activation_energy == 0.6 and "given" in report.activation_energy["source"]
    ds.attrs["activation_energy"] = 0.6
    model2, report2 = fit.fit_pcm(ds, prior=PRESET)
    assert model2 == model.replace(name=model2.name, citation=model2.citation)
    assert "campaign attribute" in report2.activation_energy["source"]
    # a wrong E_a maps the bake to the wrong time: the drift comes out wrong
    g = np.unique(ds["g_target"].values)  # the measured levels
    wrong, _ = fit.fit_pcm(ds, prior=PRESET, activation_energy=0.0)
    mu0 = pcm.drift_exponent_stats(g, PRESET)[0]
    assert _rel_err(pcm.drift_exponent_stats(g, model)[0], mu0).max() < 0.05
    assert _rel_err(pcm.drift_exponent_stats(g, wrong)[0], mu0).max() > 0.2


def test_equivalent_time_by_hand():
    t = np.array([[10.0, 20.0, 50.0], [12.0, 25.0, 40.0]])
    temp = np.array([300.0, 400.0, 350.0])
    af = np.exp(0.5 / K_B * (1 / 300.0 - 1 / temp))
    want = np.cumsum(np.diff(t, axis=1, prepend=0.0) * af, axis=1)
    np.testing.assert_allclose(pcm.equivalent_time(t, temp, 0.5, 300.0), want, rtol=1e-9)
    assert pcm.arrhenius_factor(358.15, 1.0, 300.0) == pytest.approx(
        np.exp(1.0 / K_B * (1 / 300.0 - 1 / 358.15)), rel=1e-9)
    assert pcm.arrhenius_factor(358.15, 1.0, 300.0) == pytest.approx(534.4, rel=1e-3)
    ds = pcm.simulate_campaign(PRESET, 2, 3, times=t[[0, 1, 0, 1, 0, 1]], repeats=1, rng=0,
                               temperature=temp)
    np.testing.assert_allclose(fit.equivalent_time(ds, 0.5), want[[0, 1, 0, 1, 0, 1]])
    shared = pcm.simulate_campaign(PRESET, 2, 3, times=t[0], repeats=1, rng=0, temperature=temp)
    np.testing.assert_allclose(fit.equivalent_time(shared, 0.5), want[0])
    assert fit.equivalent_time(shared, 0.5, reference_temperature=400.0)[1] == pytest.approx(
        10 * np.exp(0.5 / K_B * (1 / 400 - 1 / 300)) + 10.0)


# ------------------------------------------------------------------------- schema version 2
@pytest.fixture(scope="module")
def v2_small():
    ds = pcm.simulate_campaign(PRESET, 4, 30, times=_jittered(120, NOMINAL[:5], groups=4),
                               repeats=2,
                               rng=7, temperature=TEMPS[:5], missing=0.1)
    valid = np.ones(120, bool)
    valid[[3, 50]] = False
    return ds.assign(valid=(("device",), valid))


def test_v2_round_trip_exact(tmp_path, v2_small):
    path = tmp_path / "v2.h5"
    io.write_measurements(v2_small, path, chunk_devices=37)
    with h5py.File(path) as f:
        assert f.attrs["schema_version"] == 2
        assert f["time"].shape == (120, 5) and f["temperature"].attrs["units"] == "K"
    back = io.read_measurements(path, chunk_devices=40)
    for name in ("g", "g_target", "read_time", "temperature", "valid"):
        np.testing.assert_array_equal(back[name].values, v2_small[name].values, err_msg=name)
    np.testing.assert_array_equal(back["time"].values, v2_small["time"].values)
    assert back["read_time"].chunks[0][0] == 40  # streamed by device chunks, like g
    for key in ("g_max", "t0", "t_read", "reference_temperature"):
        assert back.attrs[key] == v2_small.attrs[key]
    assert back.attrs["schema_version"] == 2
    assert back.attrs["n_missing_reads"] == int(np.isnan(v2_small["g"].values).sum())
    assert back.attrs["n_invalid_devices"] == 2
    again = tmp_path / "again.h5"
    io.write_measurements(back, again)
    third = io.read_measurements(again)
    for name in ("g", "read_time", "temperature", "valid"):
        np.testing.assert_array_equal(third[name].values, v2_small[name].values)


def test_v1_campaign_is_written_and_read_as_version_1(tmp_path):
    ds = pcm.simulate_campaign(PRESET, 3, 10, times=(1.0, 10.0, 100.0), repeats=2, rng=1)
    io.write_measurements(ds, tmp_path / "c.h5")
    with h5py.File(tmp_path / "c.h5") as f:
        assert f.attrs["schema_version"] == 1
        assert set(f) == {"g", "g_target", "time"} and f["time"].ndim == 1
    back = io.read_measurements(tmp_path / "c.h5")
    assert set(back.data_vars) == {"g", "g_target"}
    np.testing.assert_array_equal(back["g"].values, ds["g"].values)
    assert back.attrs["reference_temperature"] == 300.0 and back.attrs["n_missing_reads"] == 0


def test_v1_lab_file_with_measurement_temperature(tmp_path):
    path = tmp_path / "lab.h5"
    with h5py.File(path, "w") as f:
        f["g_target"] = np.repeat([5.0, 10.0, 20.0], 4).astype(np.float32)
        f["g_target"].attrs["units"] = "uS"
        f["g"] = np.repeat([5.0, 10.0, 20.0], 4)[:, None, None] * np.ones((1, 3, 2), np.float32)
        f["g"].attrs["units"] = "uS"
        f["time"] = [1.0, 2.0, 3.0]
        f["time"].attrs["units"] = "min"
        f.attrs.update(g_max=25.0, g_max_units="uS", t0=20.0, t0_units="s", schema_version=1,
                       temperature=25.0, temperature_units="degC")
    ds = io.read_measurements(path)
    assert ds.attrs["reference_temperature"] == pytest.approx(298.15)
    assert ds.attrs["temperature"] == 25.0 and ds.attrs["schema_version"] == 1
    np.testing.assert_allclose(ds["time"].values, [60.0, 120.0, 180.0])


def test_read_counts(tmp_path):
    ds = pcm.simulate_campaign(PRESET, 2, 10, times=(1.0, 10.0, 100.0), repeats=2, rng=2)
    g = ds["g"].values
    g[0, 1, 0] = g[4, 2, :] = np.nan
    g[7] = np.nan                    # never read: dead
    g[9] = 1e-12                     # reads ~0 S: dead
    valid = np.ones(20, bool)
    valid[12] = False
    ds = ds.assign(valid=(("device",), valid))
    io.write_measurements(ds, tmp_path / "c.h5")
    counts = io.read_counts(io.read_measurements(tmp_path / "c.h5"), chunk_devices=3)
    miss = np.isnan(g)
    np.testing.assert_array_equal(counts.missing_per_device, miss.sum(axis=(1, 2)))
    np.testing.assert_array_equal(counts.missing_per_time, miss.sum(axis=(0, 2)))
    assert counts.dead.tolist() == [7, 9] and counts.invalid.tolist() == [12]
    assert counts.n_missing == 9 and "9 of 120 reads missing (2, 3, 4 per time)" in \
        counts.summary()


@pytest.mark.parametrize("edit, match", [
    (lambda f: f["temperature"].attrs.__setitem__("units", "F"),
     r"/temperature: unknown units 'F'"),
    (lambda f: f["temperature"].__setitem__(2, -300.0), r"/temperature: temperatures must be"),
    (lambda f: f["time"].__setitem__((5, 3), 1.0), r"/time: read times of device 5 not "
                                                   r"increasing"),
    (lambda f: f["time"].__setitem__((8, 0), np.nan), r"/time: NaN or inf at index \(8, 0\)"),
    (lambda f: (f.__delitem__("valid"), f.__setitem__("valid", np.full(120, 2, np.int8))),
     r"/valid: values of dtype int8 that are not 0/1"),
    (lambda f: f["g"].__setitem__((6, 1, 0), -1e-7), r"/g: negative conductance"),
    (lambda f: f["g"].__setitem__((6, 1, 0), np.inf), r"/g: inf at index \(6, 1, 0\)"),
])
def test_v2_bad_fields(tmp_path, v2_small, edit, match):
    path = tmp_path / "bad.h5"
    io.write_measurements(v2_small, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    with pytest.raises(MeasurementFormatError, match=r"bad\.h5: " + match):
        io.read_measurements(path, check_values=True)


def test_valid_as_integers_and_celsius(tmp_path, v2_small):
    path = tmp_path / "c.h5"
    io.write_measurements(v2_small, path)
    with h5py.File(path, "r+") as f:
        v = f["valid"][()]
        del f["valid"]
        f["valid"] = v.astype(np.uint8)
        f["temperature"][...] = f["temperature"][()] - 273.15
        f["temperature"].attrs["units"] = "degC"
    ds = io.read_measurements(path)
    np.testing.assert_array_equal(ds["valid"].values, v2_small["valid"].values)
    np.testing.assert_allclose(ds["temperature"].values, v2_small["temperature"].values,
                               rtol=1e-12)


# ------------------------------------------------------------------------------- exclusion
def test_exclusion_spec():
    e = io.DeviceExclusion.parse("0-9, 17,stuck,dead,outside:0.1uS:30uS")
    assert e.ranges == ((0, 10), (17, 18)) and e.stuck and e.dead
    assert e.outside == pytest.approx((1e-7, 3e-5))
    for bad, match in (("3-1", "runs backwards"), ("sticky", "unknown item 'sticky'"),
                       ("outside:1uS", "outside:LO:HI"), ("outside:1kS:2uS", "not a conductance"),
                       ("outside:3uS:2uS", "LO must be below HI")):
        with pytest.raises(ValueError, match=match):
            io.DeviceExclusion.parse(bad)


def test_exclusion_rules_on_reads():
    g_max = 25e-6
    rng = np.random.default_rng(0)
    g = 10e-6 * (1 + 0.05 * rng.standard_normal((8, 4, 2)))
    g[1] = 0.0                      # dead (and stuck at 0: dead comes first)
    g[2] = np.nan                   # dead: never read
    g[3] = g_max * 0.999            # stuck at g_max
    g[4] = 0.02 * g_max             # stuck near 0, above ~0 S
    g[5, 2, 1] = 40e-6              # one read above the range
    g[6] = 10e-6                    # constant mid-range: not stuck
    rec = io.ExclusionRecord()
    codes = io.DeviceExclusion.parse("dead,stuck,outside:0:30uS,7").codes(100, g, g_max)
    assert codes.tolist() == [0, 3, 3, 4, 4, 5, 0, 0]
    codes = io.DeviceExclusion.parse("dead,stuck,outside:0:30uS,107").codes(100, g, g_max)
    assert codes.tolist() == [0, 3, 3, 4, 4, 5, 0, 2]
    rec.add(100, codes)
    assert rec.counts() == {"valid": 0, "index": 1, "dead": 2, "stuck": 2, "outside": 1}
    assert rec.devices("dead") == "101-102" and rec.devices("index") == "107"
    assert rec.mask(110)[[101, 102, 103, 104, 105, 107]].all() and rec.mask(110).sum() == 6


def test_exclusion_record_counts_exactly_and_keeps_few_runs(monkeypatch):
    # the record's memory does not grow with the file: beyond MAX_RUNS runs per reason only
    # counts are kept; counts and the number of runs stay exact for any chunking
    from aimc_device.io import measurements

    monkeypatch.setattr(measurements, "MAX_RUNS", 5)
    rng = np.random.default_rng(0)
    for _ in range(50):
        codes = (rng.random(300) < 0.3) * rng.integers(1, 3, 300)
        cuts = np.r_[0, np.sort(rng.choice(np.arange(1, 300), 6, replace=False)), 300]
        rec = io.ExclusionRecord()
        for a, b in zip(cuts[:-1], cuts[1:]):
            rec.add(int(a), codes[a:b].astype(np.uint8))
        for code, reason in io.measurements.EXCLUSION_REASONS.items():
            idx = np.flatnonzero(codes == code)
            runs = 0 if idx.size == 0 else 1 + int(np.sum(np.diff(idx) != 1))
            assert rec.counts()[reason] == idx.size
            assert len(rec.runs[reason]) == min(runs, 5)
            assert len(rec.runs[reason]) + rec.runs_left_out[reason] == runs
    with pytest.raises(ValueError, match="only the first are kept"):
        rec.mask(300)


def test_exclude_in_fit_report_and_card(tmp_path, capsys):
    faulty = PRESET.replace(stuck_at_gmax=0.01)
    ds = pcm.simulate_campaign(faulty, 6, 200, times=(1.0, 10.0, 100.0, 1000.0), repeats=2,
                               rng=6)
    stuck = np.flatnonzero(np.ptp(ds["g"].values.reshape(1200, -1), axis=1) == 0)
    assert stuck.size > 3
    ds["g"].values[20, :, :] = np.nan  # dead
    path = tmp_path / "c.h5"
    io.write_measurements(ds, path)
    card = tmp_path / "m.h5"
    assert main(["fit", str(path), "-o", str(card), "--exclude", "0-4,dead,stuck",
                 "--quiet"]) == 0
    _, prov = io.load_device_card(card)
    assert prov["excluded_devices"].startswith(f"{5 + 1 + stuck.size} device(s) dropped: ")
    assert "5 excluded by index (0-4)" in prov["excluded_devices"]
    assert "1 dead (all reads missing or ~0 S) (20)" in prov["excluded_devices"]
    assert f"{stuck.size} stuck" in prov["excluded_devices"]
    assert "--exclude 0-4,dead,stuck" in prov["command"]
    model, report = fit.fit_pcm(io.read_measurements(path), prior=PRESET,
                                exclude="0-4,dead,stuck")
    assert report.exclusions["stuck"]["count"] == stuck.size
    kept, _ = fit.fit_pcm(io.read_measurements(path), prior=PRESET)
    # stuck devices at g_max (no drift) pull the drift of the top levels down when kept
    assert kept.drift_mean_bounds[0] < model.drift_mean_bounds[0]


# ------------------------------------------------------------------- fast and general paths
def _reference_sums(ds, t_eq, repeats_mode):
    """Plain numpy restatement of general_kernel's per-level sums (see fit._kernels)."""
    g = ds["g"].values.astype(np.float64)
    g_max, t0 = ds.attrs["g_max"], ds.attrs["t0"]
    cnt = np.sum(~np.isnan(g), axis=2)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = np.nanmean(g, axis=2)
        s2 = np.nanvar(g, axis=2, ddof=1) if g.shape[2] > 1 else np.zeros_like(m)
        rel = np.where(cnt >= 2, s2 / (cnt * m * m), 0.0)
        y = np.log(m / g_max) + (0.5 * rel if repeats_mode else 0.0)
    L = np.broadcast_to(np.log1p(t_eq / t0), m.shape)
    levels, inv = np.unique(ds["g_target"].values, return_inverse=True)
    out = {k: np.zeros(levels.size) for k in ("n", "sum_nu", "sum_nu2", "sum_var_nu", "sum_gp",
                                              "sum_gp2")}
    t_n = g.shape[1]
    out["rss"] = np.zeros(levels.size)
    out["lt"] = np.zeros((levels.size, t_n, 7))
    for key in ("s2", "g2", "dof", "h1", "hf"):
        out[key] = np.zeros((levels.size, t_n))
    f2 = np.broadcast_to(np.log((t_eq + ds.attrs["t_read"]) / (2 * ds.attrs["t_read"])),
                         m.shape)
    for i in range(g.shape[0]):
        p = cnt[i] > 0
        lev = inv[i]
        out["lt"][lev, :, 6] += g.shape[2] - cnt[i]
        if p.sum() < 2 or np.any(m[i, p] <= 0):
            continue
        A = np.vstack([np.ones(p.sum()), L[i, p]]).T
        (inter, slope), *_ = np.linalg.lstsq(A, y[i, p], rcond=None)
        v, w = np.linalg.pinv(A)          # least-squares weights of intercept and slope
        var_s, var_i = (w**2) @ rel[i, p], (v**2) @ rel[i, p]
        gp = g_max * np.exp(inter - 0.5 * var_i)
        for key, val in (("n", 1.0), ("sum_nu", -slope), ("sum_nu2", slope**2),
                         ("sum_var_nu", var_s), ("sum_gp", gp), ("sum_gp2", gp**2)):
            out[key][lev] += val
        for col, val in enumerate((1.0, f2[i, p], w, w * w, v, v * v)):
            out["lt"][lev, p, col] += val
        two = p & (cnt[i] >= 2)
        out["s2"][lev, two] += s2[i, two]
        out["g2"][lev, two] += m[i, two] ** 2 - s2[i, two] / cnt[i, two]
        out["dof"][lev, two] += cnt[i, two] - 1
        if p.sum() >= 3:
            out["rss"][lev] += np.sum((y[i, p] - A @ [inter, slope]) ** 2)
            h = v + w * L[i, p]
            out["h1"][lev, p] += 1 - h
            out["hf"][lev, p] += (1 - h) * f2[i, p]
    return out


@pytest.mark.parametrize("repeats", [1, 3])
def test_general_kernel_matches_numpy_reference(repeats):
    ds = pcm.simulate_campaign(PRESET, 4, 60, times=_jittered(240, NOMINAL[:5], seed=9,
                                                              groups=4),
                               repeats=repeats, rng=8, missing=0.15)
    st = fit.campaign_statistics(ds, chunk_devices=70)
    ref = _reference_sums(ds, ds["read_time"].values, repeats > 1)
    # the kernel takes ln(g) in float32 (like the fast path): ~1e-7 relative on each log
    for key in ("n", "sum_nu", "sum_nu2", "sum_var_nu", "sum_gp", "sum_gp2"):
        np.testing.assert_allclose(getattr(st, key), ref[key], rtol=1e-5, atol=1e-30,
                                   err_msg=key)
    sd = lambda s: np.sqrt(s["sum_nu2"] / s["n"] - (s["sum_nu"] / s["n"]) ** 2)  # noqa: E731
    np.testing.assert_allclose(sd({k: getattr(st, k) for k in ("sum_nu", "sum_nu2", "n")}),
                               sd(ref), rtol=1e-4)
    np.testing.assert_allclose(st.rn_rss, ref["rss"], rtol=1e-4)
    np.testing.assert_allclose(st.lt, ref["lt"], rtol=1e-9, atol=1e-9)
    for key in ("s2", "g2", "dof", "h1", "hf"):
        np.testing.assert_allclose(getattr(st, f"rn_{key}"), ref[key], rtol=1e-6, atol=1e-24,
                                   err_msg=key)
    assert st.chunks_fast == 0 and st.chunks_general == 4


@pytest.mark.parametrize("reference", ["target", "programmed"])
def test_lines_kernel_matches_numpy_reference_and_general_kernel(reference, monkeypatch):
    """One read per time at shared read times (lines_kernel): reads not taken, a device read at
    two times, one read once, a read of 0 S, excluded devices."""
    ds = pcm.simulate_campaign(PRESET, 4, 60, times=NOMINAL[:6], repeats=1, rng=8, missing=0.15)
    g = ds["g"].values
    g[3, :4, 0] = np.nan   # two reads: a line, no residuals
    g[5, 1:, 0] = np.nan   # one read: no line
    g[7, 2, 0] = 0.0       # a read of 0 S: no line
    prior = PRESET.replace(read_noise_reference=reference)
    calls = []
    real = fit._stats.lines_kernel
    monkeypatch.setattr(fit._stats, "lines_kernel",
                        lambda t_n: calls.append(t_n) or real(t_n))
    st = fit.campaign_statistics(ds, prior, chunk_devices=70)
    assert calls == [6] * 4
    general = fit.campaign_statistics(ds, prior, chunk_devices=70, general=True)
    # general_kernel rounds ln g to float32 too, but each in its own way: ~1e-7 on each log,
    # up to ~1e-6 on an intercept extrapolated to t = 0
    for key in ("n_total", "n", "n_unusable", "n_excluded", "rn_n", "rn_nrss", "rn_dof"):
        np.testing.assert_array_equal(getattr(st, key), getattr(general, key), err_msg=key)
    for key in ("sum_nu", "sum_nu2", "sum_gp", "sum_gp2", "rn_x", "lt", "rn_h1", "rn_hf"):
        np.testing.assert_allclose(getattr(st, key), getattr(general, key), rtol=1e-5,
                                   atol=1e-12 * np.abs(getattr(general, key)).max(),
                                   err_msg=key)
    np.testing.assert_allclose(st.rn_rss, general.rn_rss, rtol=1e-4)
    if reference == "target":
        ref = _reference_sums(ds, ds["time"].values, False)
        for key in ("n", "sum_nu", "sum_nu2", "sum_gp", "sum_gp2"):
            np.testing.assert_allclose(getattr(st, key), ref[key], rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(st.rn_rss, ref["rss"], rtol=1e-4)
        np.testing.assert_allclose(st.lt, ref["lt"], rtol=1e-12, atol=1e-12)
        for key in ("h1", "hf"):
            np.testing.assert_allclose(getattr(st, f"rn_{key}"), ref[key], rtol=1e-12,
                                       atol=1e-12, err_msg=key)
    # devices dropped by `valid`: counted, not fitted, their missing reads still counted
    valid = np.ones(ds.sizes["device"], bool)
    valid[[3, 10, 11, 100]] = False
    ds["valid"] = ("device", valid)
    dropped = fit.campaign_statistics(ds, prior, chunk_devices=70)
    general = fit.campaign_statistics(ds, prior, chunk_devices=70, general=True)
    assert dropped.n_excluded.sum() == 4
    for key in ("n", "n_excluded", "n_unusable", "rn_n"):
        np.testing.assert_array_equal(getattr(dropped, key), getattr(general, key), err_msg=key)
    np.testing.assert_allclose(dropped.lt, general.lt, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(dropped.sum_nu, general.sum_nu, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lines_kernel_odd_reads_and_dtypes_match_general_kernel(dtype):
    # reads outside float32's normal range (a subnormal one; 1e-45 S in float64) take np.log
    # in lines_kernel too; float64 reads are logged from their float32 rounding
    ds = pcm.simulate_campaign(PRESET, 4, 90, times=NOMINAL[:5], repeats=1, rng=6, missing=0.1,
                               dtype=dtype)
    g = ds["g"].values
    g[4, 1, 0] = 1e-40
    g[8, 3, 0] = 1e-45 if dtype == np.float64 else 2e-39
    st = fit.campaign_statistics(ds, chunk_devices=100)
    general = fit.campaign_statistics(ds, chunk_devices=100, general=True)
    for key in ("n", "n_unusable", "rn_nrss"):
        np.testing.assert_array_equal(getattr(st, key), getattr(general, key), err_msg=key)
    for key in ("sum_nu", "sum_nu2", "sum_gp", "sum_gp2", "lt", "rn_h1"):
        np.testing.assert_allclose(getattr(st, key), getattr(general, key), rtol=1e-5,
                                   err_msg=key)
    np.testing.assert_allclose(st.rn_rss, general.rn_rss, rtol=1e-4)


@pytest.mark.parametrize("value, match", [(-1e-7, r"negative conductance .*\(6, 2, 0\)"),
                                          (np.inf, r"inf at index \(6, 2, 0\)")])
def test_fits_of_one_read_per_time_name_a_bad_read(value, match):
    # lines_kernel and one_read_kernel find the read; the error names it
    ds = pcm.simulate_campaign(PRESET, 4, 60, times=NOMINAL[:5], repeats=1, rng=2, missing=0.1)
    ds["g"].values[6, 2, 0] = value
    with pytest.raises(MeasurementFormatError, match=match):
        fit.campaign_statistics(ds, chunk_devices=50)
    with pytest.raises(MeasurementFormatError, match="negative or infinite conductance at "
                                                     "device 6"):
        fit.fit_empirical(ds, chunk_devices=50)


def test_float32_logs_leave_the_fit_unchanged_well_below_its_standard_errors(monkeypatch):
    # lines_kernel takes ln(g / g_max) in float32 arithmetic (a polynomial, ~1 float32 rounding);
    # general_kernel from np.log in float64: the fitted coefficients agree to < 1 % of their
    # standard errors
    ds = pcm.simulate_campaign(PRESET, 8, 150, times=NOMINAL[:6], repeats=1, rng=4,
                               missing=0.05)
    _, fast = fit.fit_pcm(ds, prior=PRESET)
    monkeypatch.setattr(fit._stats, "MAX_PATTERN_TIMES", 0)  # every chunk: general_kernel
    _, ref = fit.fit_pcm(ds, prior=PRESET)
    for name, cf in ref.components.items():
        ok = np.isfinite(cf.stderr)
        diff = np.abs(fast.components[name].coeffs[ok] - cf.coeffs[ok])
        assert np.all(diff < 0.01 * cf.stderr[ok]), name


def test_lines_kernel_same_result_on_any_thread_count():
    ds = pcm.simulate_campaign(PRESET, 4, 500, times=NOMINAL[:6], repeats=1, rng=9, missing=0.1)
    one = fit.campaign_statistics(ds, chunk_devices=300, n_workers=1)
    three = fit.campaign_statistics(ds, chunk_devices=300, n_workers=3)
    for key in ("sum_nu", "sum_nu2", "sum_gp2", "lt", "rn_rss", "rn_h1", "rn_hf"):
        np.testing.assert_array_equal(getattr(one, key), getattr(three, key), err_msg=key)


def test_lines_kernel_hands_a_chunk_with_too_many_patterns_to_general_kernel():
    from aimc_device.fit._kernels import MAX_PATTERNS

    times = np.geomspace(1.0, 1e5, 11)
    ds = pcm.simulate_campaign(PRESET, 2, 1500, times=times, repeats=1, rng=2, missing=0.5)
    g = ds["g"].values[:, :, 0]
    assert np.unique(np.isnan(g) @ (1 << np.arange(11))).size > MAX_PATTERNS
    st = fit.campaign_statistics(ds, chunk_devices=3000)
    general = fit.campaign_statistics(ds, chunk_devices=3000, general=True)
    for key in ("n", "sum_nu", "lt", "rn_rss", "rn_h1"):
        np.testing.assert_array_equal(getattr(st, key), getattr(general, key), err_msg=key)


def test_log_cells_matches_numpy_over_the_whole_float32_range():
    # lines_kernel's logarithm (the same _log_read): float32 arithmetic from the bits of the
    # read, within about one float32 rounding of the exact value, np.log for the reads outside
    # float32's normal range; NaN stays NaN (a read not taken), 0 S gives -inf
    from aimc_device.fit._kernels import log_cells

    rng = np.random.default_rng(3)
    every_exponent = np.ldexp(1.0 + rng.random(254 * 20), np.repeat(np.arange(-126, 128), 20))
    x = np.concatenate([rng.uniform(1e-7, 3e-5, 5000), 10.0 ** rng.uniform(-37, 38, 5000),
                        every_exponent, np.sqrt([0.5, 2.0]), np.nextafter(np.sqrt(0.5), [0, 1]),
                        [np.nan, 0.0, 1e-40, 1e-45, 1.1754942e-38, 1.1754944e-38,
                         np.float32(3.4e38), 1.0, 25e-6]])
    x = x.astype(np.float32)
    ln_gmax = np.log(25e-6)
    with np.errstate(divide="ignore"):
        ref = np.log(x.astype(np.float64)) - ln_gmax
    for g in (x, x.astype(np.float64)):
        out = np.empty(x.size, np.float32)
        assert not log_cells(g, ln_gmax, out)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
        np.testing.assert_array_equal(out[~np.isfinite(ref)], ref[~np.isfinite(ref)])
        ok = np.isfinite(ref)
        err = np.abs(out[ok] - ref[ok]) / np.maximum(1.0, np.abs(ref[ok]))
        assert err.max() < 1.5e-7, (g.dtype, err.max(), x[ok][np.argmax(err)])
    # float64 reads beyond float32's range take np.log; negative or +inf reads are reported
    big = np.array([1e-300, 1e-50, 1e50, 1e300, 1e-6])
    out = np.empty(big.size, np.float32)
    assert not log_cells(big, ln_gmax, out)
    np.testing.assert_allclose(out, (np.log(big) - ln_gmax).astype(np.float32), rtol=1e-7)
    for bad in (-1e-6, np.inf, -0.0 - 1e-40):
        assert log_cells(np.array([1e-6, bad], np.float32), ln_gmax, np.empty(2, np.float32))


def test_exp_cells_matches_numpy():
    # lines_kernel's exp of ln(g_P / g_max) (the same _exp_f32), float32 within |x| < 87
    from aimc_device.fit._kernels import exp_cells

    rng = np.random.default_rng(4)
    v = np.concatenate([rng.uniform(-30.0, 2.0, 5000), rng.uniform(-86.9, 86.9, 5000),
                        np.arange(-86, 87) * np.log(2.0), [0.0, -86.99, 86.99]]).astype(np.float32)
    out = np.empty(v.size, np.float32)
    exp_cells(v, out)
    want = np.exp(v.astype(np.float64))
    np.testing.assert_allclose(out, want, rtol=2.5e-7, atol=0)


def test_fast_path_matches_general_path():
    ds = pcm.simulate_campaign(PRESET, 5, 300, repeats=3, rng=10)
    fast = fit.campaign_statistics(ds, chunk_devices=256)
    general = fit.campaign_statistics(ds, chunk_devices=256, general=True)
    assert fast.chunks_fast == 6 and general.chunks_general == 6
    for key in ("n", "sum_nu", "sum_nu2", "sum_var_nu", "sum_gp", "sum_gp2", "sum_gp2_var",
                "rn_n", "rn_s2", "rn_g2", "rn_dof"):
        # the fast path computes logs and the lines in float32
        np.testing.assert_allclose(getattr(fast, key), getattr(general, key), rtol=2e-5,
                                   err_msg=key)
    # a chunk with a read not taken takes the general path; the others stay fast
    ds["g"].values[700, 2, 1] = np.nan
    mixed = fit.campaign_statistics(ds, chunk_devices=256)
    assert (mixed.chunks_fast, mixed.chunks_general) == (5, 1)


# ----------------------------------------------------------------- bad input, one per case
@pytest.fixture
def bad_file(tmp_path):
    def make(edit=None, devices=40, levels=4):
        ds = pcm.simulate_campaign(PRESET, levels, devices, times=(1.0, 10.0, 100.0, 1000.0),
                                   repeats=2, rng=1)
        if edit is not None:
            ds = edit(ds)
        path = tmp_path / "bad.h5"
        io.write_measurements(ds, path)
        return path
    return make


def _fit_argv(path, *extra):
    return ["fit", str(path), "-o", str(path.parent / "m.h5"), "--quiet", *extra]


def test_reads_in_siemens_labelled_microsiemens(tmp_path, bad_file, capsys):
    path = bad_file()
    with h5py.File(path, "r+") as f:
        f["g"].attrs["units"] = "uS"  # values in S
        f["g_target"][...] = f["g_target"][()] * 1e6
        f["g_target"].attrs["units"] = "uS"
    _bad(capsys, _fit_argv(path), tmp_path, "bad.h5: /g and /g_target: reads and targets are of "
                                            "different scales")


def test_level_without_spread(tmp_path, bad_file, capsys):
    def copy_targets(ds):
        g = ds["g"].values
        g[:40] = ds["g_target"].values[:40, None, None]
        return ds
    _bad(capsys, _fit_argv(bad_file(copy_targets)), tmp_path,
         "bad.h5: /g: the level g_target = 6.25e-06 S has a spread across devices below 1e-06")


def test_targets_above_g_max(tmp_path, bad_file, capsys):
    path = bad_file()
    with h5py.File(path, "r+") as f:
        f.attrs["g_max"] = 20e-6
    _bad(capsys, _fit_argv(path), tmp_path, "bad.h5: /g_target: targets up to 2.5e-05 S exceed "
                                            "g_max = 2e-05 S")


def test_constant_reads(tmp_path, bad_file, capsys):
    def freeze(ds):
        g = ds["g"].values
        g[...] = g[:, :1, :1]  # each device its own value, the same at every read
        return ds
    _bad(capsys, _fit_argv(bad_file(freeze)), tmp_path, "bad.h5: /g: constant reads")


def test_level_with_one_device(tmp_path, bad_file, capsys):
    def odd_target(ds):
        ds["g_target"].values[17] = 7.77e-6
        return ds
    _bad(capsys, _fit_argv(bad_file(odd_target)), tmp_path,
         "bad.h5: /g_target: 1 level(s) with a single device (g_target = 7.77e-06 S)")


def test_all_devices_excluded(tmp_path, bad_file, capsys):
    _bad(capsys, _fit_argv(bad_file(), "--exclude", "0-159"), tmp_path,
         "bad.h5: g: all 160 devices are excluded")
    _bad(capsys, _fit_argv(bad_file(), "--exclude", "400"), tmp_path,
         "exclude: device 400 does not exist")


def test_bad_exclude_spec(tmp_path, bad_file, capsys):
    _bad(capsys, _fit_argv(bad_file(), "--exclude", "0-3,broken"), tmp_path,
         "exclude: unknown item 'broken'")


# --------------------------------------------------------------------------- device cards
def test_card_keeps_activation_energy_and_old_cards_load(tmp_path):
    model = PRESET.replace(activation_energy=0.37, reference_temperature=298.15)
    io.save_device_model(model, tmp_path / "m.h5")
    assert io.load_device_model(tmp_path / "m.h5") == model
    with h5py.File(tmp_path / "m.h5", "r+") as f:
        assert f["model/activation_energy"].attrs["units"] == "eV"
        assert f["model/reference_temperature"].attrs["units"] == "K"
        del f["model/activation_energy"], f["model/reference_temperature"]
    old = io.load_device_model(tmp_path / "m.h5")
    assert (old.activation_energy, old.reference_temperature) == (0.0, 300.0)
    assert old == model.replace(activation_energy=0.0, reference_temperature=300.0)


def test_iter_campaign_chunks(v2_small):
    rec = io.ExclusionRecord()
    chunks = list(fit.iter_campaign_chunks(v2_small, exclude="7-9", activation_energy=0.5,
                                           chunk_devices=50, record=rec))
    assert [(c.start, c.stop) for c in chunks] == [(0, 50), (50, 100), (100, 120)]
    np.testing.assert_array_equal(np.concatenate([c.g for c in chunks]), v2_small["g"].values)
    np.testing.assert_allclose(np.concatenate([c.t_eq for c in chunks]),
                               fit.equivalent_time(v2_small, 0.5))
    keep = np.concatenate([c.keep for c in chunks])
    assert np.flatnonzero(~keep).tolist() == [3, 7, 8, 9, 50]
    assert rec.counts()["index"] == 3 and rec.counts()["valid"] == 2
    with pytest.raises(FitError, match="no activation energy"):
        next(fit.iter_campaign_chunks(v2_small))
