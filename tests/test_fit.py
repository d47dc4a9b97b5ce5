"""aimc_device.fit: round trip against the preset, embedded errors, streaming, bad data."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from aimc_device import fit, io, pcm
from aimc_device.fit import FitError

PRESET = pcm.PCMModel.preset("rasch2023")
X = np.arange(1, 21) / 20


def _campaign(model=PRESET, levels=20, devices=2000, repeats=4, rng=11, **kw):
    return pcm.simulate_campaign(model, levels=levels, devices_per_level=devices,
                                 repeats=repeats, rng=rng, **kw)


def _rel_err(fitted, truth):
    return np.abs(np.asarray(fitted) / np.asarray(truth) - 1.0)


@pytest.fixture(scope="module")
def reference_fit():
    ds = _campaign()
    before = ds.copy(deep=True)
    model, report = fit.fit_pcm(ds)
    return ds, before, model, report


def test_round_trip_recovers_preset(reference_fit):
    """20 levels x 2000 devices: sigma_P within 3 %, mu_nu 3 %, sigma_nu 5 %, coeff 5 %."""
    _, _, model, _ = reference_fit
    g = X * PRESET.g_max
    err_p = _rel_err(pcm.programming_noise_std(g, model), pcm.programming_noise_std(g, PRESET))
    mu, sd = pcm.drift_exponent_stats(g, model)
    mu0, sd0 = pcm.drift_exponent_stats(g, PRESET)
    assert err_p.max() < 0.03, err_p
    assert _rel_err(mu, mu0).max() < 0.03
    assert _rel_err(sd, sd0).max() < 0.05
    assert abs(model.read_noise_coeff / PRESET.read_noise_coeff - 1) < 0.05
    assert abs(model.read_noise_exponent / PRESET.read_noise_exponent - 1) < 0.05
    assert model.g_max == PRESET.g_max and model.t0 == PRESET.t0
    assert model.read_noise_time == "t" and model.read_noise_reference == "target"


def test_fit_does_not_mutate(reference_fit):
    ds, before, _, _ = reference_fit
    assert ds.identical(before)


def test_report(reference_fit):
    _, _, model, report = reference_fit
    assert set(report.components) == {"programming_noise", "drift_mean", "drift_std",
                                      "read_noise"}
    g = lambda cf: cf.x * PRESET.g_max  # noqa: E731
    curves = {  # each component's form, from the fitted model and from the truth
        "programming_noise": lambda m, cf: pcm.programming_noise_std(g(cf), m),
        "drift_mean": lambda m, cf: pcm.drift_exponent_stats(g(cf), m)[0],
        "drift_std": lambda m, cf: pcm.drift_exponent_stats(g(cf), m)[1],
        "read_noise": lambda m, cf: pcm.read_noise_q(cf.x, m),
    }
    for name, cf in report.components.items():
        assert cf.coeffs.shape == cf.stderr.shape
        assert cf.residuals.shape == cf.x.shape == cf.data.shape == (20,)
        np.testing.assert_allclose(cf.fitted, curves[name](model, cf), rtol=1e-9)
        # chi-square tests at p = 1e-3 each way: the per-level data and their standard errors
        # against the fit (K - fitted parameters degrees of freedom) and against the truth (K)
        dof = cf.x.size - cf.n_params
        p_fit = stats.chi2.sf(cf.chi2_reduced * dof, dof)
        chi2_true = float(np.sum(((cf.data - curves[name](PRESET, cf)) / cf.data_se) ** 2))
        p_true = stats.chi2.sf(chi2_true, cf.x.size)
        assert 1e-3 < p_fit < 1 - 1e-3 and 1e-3 < p_true < 1 - 1e-3, (name, p_fit, p_true)
        w = 1 / cf.data_se ** 2  # weighted R^2
        mean = np.sum(w * cf.data) / np.sum(w)
        assert cf.r_squared == pytest.approx(1 - cf.chi2_reduced * dof / np.sum(
            w * (cf.data - mean) ** 2), rel=1e-9)
    pn = report["programming_noise"]
    assert np.all(np.abs(pn.coeffs - PRESET.prog_coeffs) < 4 * pn.stderr + 1e-9)
    assert report.model is model and "fit_pcm" in report.provenance["fit_function"]
    assert "c0" in report.summary()
    fig = report.plot(reference=PRESET)
    assert len(fig.axes) == 4
    assert isinstance(report.to_dict()["components"]["read_noise"]["coeffs"]["coeff"]["value"],
                      float)


def test_standard_errors_match_the_scatter_over_campaigns():
    # Each component's per-level estimates scatter around the true curve by their reported
    # standard errors: over 6 campaigns x 20 levels, the mean of ((data - truth) / se)^2 is 1
    # (+-0.13; the tolerance is 4 times that: a standard error off by 1.5x fails).
    g = lambda cf: cf.x * PRESET.g_max  # noqa: E731
    truth = {"programming_noise": lambda cf: pcm.programming_noise_std(g(cf), PRESET),
             "drift_mean": lambda cf: pcm.drift_exponent_stats(g(cf), PRESET)[0],
             "drift_std": lambda cf: pcm.drift_exponent_stats(g(cf), PRESET)[1],
             "read_noise": lambda cf: pcm.read_noise_q(cf.x, PRESET)}
    z2 = {name: [] for name in truth}
    for seed in range(6):
        _, report = fit.fit_pcm(_campaign(devices=500, rng=100 + seed))
        for name, cf in report.components.items():
            z2[name].append(((cf.data - truth[name](cf)) / cf.data_se) ** 2)
    for name, v in z2.items():
        assert np.mean(v) == pytest.approx(1.0, abs=4 * np.sqrt(2 / np.size(v))), name


def test_doubled_programming_noise_is_recovered():
    wrong = PRESET.replace(prog_coeffs=tuple(2 * c for c in PRESET.prog_coeffs))
    model, _ = fit.fit_pcm(_campaign(wrong, devices=1000, rng=5))
    g = X * PRESET.g_max
    ratio = pcm.programming_noise_std(g, model) / pcm.programming_noise_std(g, PRESET)
    # At x < 0.15 the doubled noise reaches 0 S (g_P is clipped at 0, Eq. 7), which narrows the
    # measured spread; above, the doubling is recovered.
    assert np.all(np.abs(ratio[X >= 0.15] - 2.0) < 0.08), ratio
    assert np.all(ratio > 1.8), ratio


def test_changed_drift_and_read_noise_are_recovered():
    wrong = PRESET.replace(drift_mean_coeffs=(-0.02, 0.03), read_noise_coeff=0.015,
                           read_noise_exponent=-0.5)
    params, comps = fit.fit_drift(_campaign(wrong, devices=1000, rng=6))
    assert params["drift_mean_coeffs"][0] == pytest.approx(-0.02, rel=0.1)
    p, _ = fit.fit_read_noise(_campaign(wrong, devices=300, rng=7))
    assert p["read_noise_coeff"] == pytest.approx(0.015, rel=0.03)
    assert p["read_noise_exponent"] == pytest.approx(-0.5, rel=0.03)


def test_fixed_clip_keeps_prior_bounds():
    params, comps = fit.fit_drift(_campaign(devices=300, rng=8), clip="fixed")
    assert params["drift_mean_bounds"] == PRESET.drift_mean_bounds
    assert params["drift_std_bounds"] == PRESET.drift_std_bounds
    assert "clip=fixed" in comps["drift_mean"].notes


def test_aihwkit_conventions_round_trip():
    model = pcm.PCMModel.preset("rasch2023-aihwkit")
    fitted, report = fit.fit_pcm(_campaign(model, devices=800, rng=9), prior=model)
    assert fitted.read_noise_reference == "programmed"
    assert fitted.read_noise_coeff == pytest.approx(model.read_noise_coeff, rel=0.05)
    assert fitted.read_noise_exponent == pytest.approx(model.read_noise_exponent, rel=0.05)


def test_streaming_matches_in_memory(tmp_path):
    ds = _campaign(levels=6, devices=200, rng=2)
    io.write_measurements(ds, tmp_path / "c.h5")
    lazy = io.read_measurements(tmp_path / "c.h5", chunk_devices=97)
    whole = fit.campaign_statistics(ds)
    streamed = fit.campaign_statistics(lazy)
    for name in ("n", "sum_nu", "sum_nu2", "sum_gp2", "rn_s2", "rn_g2"):
        np.testing.assert_allclose(getattr(streamed, name), getattr(whole, name), rtol=1e-9)
    m1, _ = fit.fit_pcm(ds)
    m2, rep = fit.fit_pcm(lazy)
    assert m1.prog_coeffs == pytest.approx(m2.prog_coeffs, rel=1e-9)
    assert rep.provenance["source_file"] == str(tmp_path / "c.h5")


def _numpy_reference_sums(ds):
    """Plain numpy restatement of the kernels' per-level sums (see aimc_device.fit._kernels)."""
    g = ds["g"].values.astype(np.float64)
    r = g.shape[2]
    m, s2 = g.mean(axis=2), g.var(axis=2, ddof=1)
    L = np.log((ds["time"].values + ds.attrs["t0"]) / ds.attrs["t0"])
    w = (L - L.mean()) / np.sum((L - L.mean()) ** 2)
    v = 1.0 / L.size - L.mean() * w
    rel = s2 / (r * m * m)
    y = np.log(m) + 0.5 * rel
    nu = -(y @ w)
    gp = np.exp(y @ v - 0.5 * (rel @ (v * v)))
    levels, inv = np.unique(ds["g_target"].values, return_inverse=True)
    k = levels.size
    sums = {"sum_nu": nu, "sum_nu2": nu * nu, "sum_var_nu": rel @ (w * w), "sum_gp": gp,
            "sum_gp2": gp * gp, "sum_gp2_var": gp * gp * (rel @ (v * v))}
    out = {key: np.bincount(inv, weights=val, minlength=k) for key, val in sums.items()}
    out["n"] = np.bincount(inv, minlength=k).astype(float)
    out["rn_s2"] = np.stack([np.bincount(inv, weights=s2[:, j], minlength=k)
                             for j in range(L.size)], axis=1)
    out["rn_g2"] = np.stack([np.bincount(inv, weights=(m * m - s2 / r)[:, j], minlength=k)
                             for j in range(L.size)], axis=1)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_matches_numpy_reference(dtype):
    ds = _campaign(levels=5, devices=300, rng=4, dtype=dtype)
    st = fit.campaign_statistics(ds, chunk_devices=256)
    ref = _numpy_reference_sums(ds)
    for key, val in ref.items():
        # float32 log in the kernel: agreement to ~1e-6 relative on the means
        np.testing.assert_allclose(getattr(st, key), val, rtol=2e-5, atol=1e-30, err_msg=key)
    # and the spread of nu, the statistic most sensitive to rounding
    sd = lambda s: np.sqrt(s["sum_nu2"] / s["n"] - (s["sum_nu"] / s["n"]) ** 2)  # noqa: E731
    np.testing.assert_allclose(sd({k: getattr(st, k) for k in ("sum_nu", "sum_nu2", "n")}),
                               sd(ref), rtol=1e-4)


def test_same_result_on_any_thread_count():
    ds = _campaign(levels=5, devices=2000, rng=12)
    one = fit.campaign_statistics(ds, chunk_devices=700, n_workers=1)
    three = fit.campaign_statistics(ds, chunk_devices=700, n_workers=3)
    for key in ("sum_nu", "sum_nu2", "sum_gp2", "rn_s2", "rn_g2"):
        np.testing.assert_array_equal(getattr(one, key), getattr(three, key))


def test_one_level_only():
    with pytest.raises(FitError, match="usable target level"):
        fit.fit_pcm(_campaign(levels=np.array([0.5]), devices=50))


def test_read_noise_not_identified_needs_a_named_prior():
    ds = _campaign(levels=4, devices=50, repeats=1, times=(10.0, 1000.0))
    with pytest.raises(FitError, match=r"read noise is not identified.*name a prior"):
        fit.fit_pcm(ds)


def test_all_zero_conductance():
    ds = _campaign(levels=4, devices=50)
    ds = ds.assign(g=ds["g"] * 0)
    with pytest.raises(FitError, match="all-zero conductance"):
        fit.fit_pcm(ds)


def test_bad_value_found_while_streaming(tmp_path):
    ds = _campaign(levels=4, devices=100)
    io.write_measurements(ds, tmp_path / "c.h5")
    import h5py

    with h5py.File(tmp_path / "c.h5", "r+") as f:
        f["g"][333, 2, 1] = np.inf  # (NaN is a read not taken)
    lazy = io.read_measurements(tmp_path / "c.h5", check_values=False, chunk_devices=128)
    with pytest.raises(io.MeasurementFormatError, match=r"c\.h5: /g: inf at index "
                                                        r"\(333, 2, 1\)"):
        fit.fit_pcm(lazy)


def test_fit_errors_are_value_errors():
    assert issubclass(FitError, ValueError)


@pytest.mark.parametrize("repeats", [2, 3, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moments_kernel_matches_numpy(repeats, dtype):
    from aimc_device.fit._kernels import moments_kernel

    rng = np.random.default_rng(repeats)
    g = (rng.uniform(1e-6, 25e-6, (500, 4, 1)) *
         (1 + 0.01 * rng.standard_normal((500, 4, repeats)))).astype(dtype)
    g[0, 0, :] = 3e-6  # no spread
    m, s2, rel, x = (np.empty(2000, np.float32) for _ in range(4))
    assert moments_kernel(repeats)(g.reshape(-1), np.float32(1 / 25e-6), m, s2, rel, x) == 0
    g64 = g.astype(np.float64).reshape(-1, repeats)
    m_ref, s2_ref = g64.mean(axis=1), g64.var(axis=1, ddof=1)
    np.testing.assert_allclose(m, m_ref, rtol=3e-7)
    np.testing.assert_allclose(s2, s2_ref, rtol=2e-4 if dtype == np.float32 else 1e-6,
                               atol=1e-6 * s2_ref.max())
    assert s2[0] == 0.0
    np.testing.assert_allclose(rel, s2_ref / (repeats * m_ref**2), rtol=3e-4, atol=1e-12)
    np.testing.assert_allclose(x, m_ref / 25e-6, rtol=3e-7)
    for bad in (np.nan, np.inf, -1e-9):
        h = g.copy()
        h[7, 2, repeats - 1] = bad
        assert moments_kernel(repeats)(h.reshape(-1), np.float32(1 / 25e-6), m, s2, rel, x) == 1
