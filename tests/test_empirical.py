"""The empirical device-model family and the RRAM-like test campaigns: the generator's physics,
the fit recovering its generator's distributions (KS per level and time), the hold-out test,
interpolation and extrapolation rules, the Numba sampler against a numpy reference (exact) and
the torch sampler (KS), determinism across thread counts, the scaling knobs, device cards."""
from __future__ import annotations

import math
import pickle

import h5py
import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from aimc_device import fit, io, pcm
from aimc_device.fit import _empirical_kernels as FK
from aimc_device.pcm import _kernels as K
from aimc_device.pcm.empirical import DEFAULT_PROBS
from aimc_device.pcm.empirical_torch import perturb_torch, program_torch, read_torch

G_MAX = 100e-6
ZN = special.ndtri(DEFAULT_PROBS)


@pytest.fixture(scope="module")
def campaign():
    """The default RRAM-like campaign: 31 levels, one read per time, a bake, dead cells, NaN."""
    return pcm.simulate_rram_campaign(levels=31, devices_per_level=300, rng=11)


@pytest.fixture(scope="module")
def fitted(campaign):
    return fit.fit_empirical(campaign, times=campaign["equivalent_time"].values)


def toy_model(**kw) -> pcm.EmpiricalModel:
    """Three levels, three times: Gaussian spreads that broaden, medians relaxing toward 0.5."""
    lv = np.array([0.2, 0.5, 0.9])
    tm = np.array([1.0, 100.0, 1e4])
    sig = 0.02 * np.array([1.0, 1.5, 2.0])
    med = lv[:, None] - 0.01 * np.log10(tm)[None, :] * (lv[:, None] - 0.5)
    q = np.clip(med[..., None] + sig[None, :, None] * ZN, 0.0, None)
    args = dict(g_max=G_MAX, levels=lv, times=tm, probs=DEFAULT_PROBS, quantiles=q,
                read_noise=np.full((3, 3), 0.005), rank_correlation=np.full((3, 2), 0.8), t0=1.0)
    args.update(kw)
    return pcm.EmpiricalModel(**args)


# ------------------------------------------------------------------- numpy references
def ref_locate(model, g):
    tab = model.tables
    x = np.abs(np.asarray(g, dtype=np.float64)) / model.g_max
    f = np.where(x > tab.x_top, x / tab.x_top, 1.0)
    xq = np.minimum(x, tab.x_top)
    gi = np.clip(np.searchsorted(tab.grid, xq, side="right") - 1, 0, tab.grid.size - 2)
    wx = np.clip((xq - tab.grid[gi]) / (tab.grid[gi + 1] - tab.grid[gi]), 0.0, 1.0)
    return gi, wx, f


def ref_time(model, t):
    nodes = model.tables.s_nodes
    s = math.log1p(t / model.t0)
    if s <= nodes[0]:
        return 0, 0.0
    if s >= nodes[-1]:
        return nodes.size - 2, 1.0
    n = int(np.searchsorted(nodes, s, side="right")) - 1
    return n, (s - nodes[n]) / (nodes[n + 1] - nodes[n])


def ref_quantile(model, g, t, z):
    """The rules of the EmpiricalModel docstring on its tables, in numpy."""
    tab = model.tables
    gi, wx, f = ref_locate(model, g)
    n, w = ref_time(model, t)
    zn, q = tab.znodes, tab.q
    j = np.clip(np.searchsorted(zn, z, side="right") - 1, 0, zn.size - 2)
    wz = np.clip((z - zn[j]) / (zn[j + 1] - zn[j]), 0.0, 1.0)  # held beyond the end nodes

    def corner(gg, nn):
        return q[gg, nn, j] + wz * (q[gg, nn, j + 1] - q[gg, nn, j])

    a = corner(gi, n) + w * (corner(gi, n + 1) - corner(gi, n))
    b = corner(gi + 1, n) + w * (corner(gi + 1, n + 1) - corner(gi + 1, n))
    return np.maximum((a + wx * (b - a)) * f, 0.0) * model.g_max


def ref_read(model, state, t, read_seed):
    """EmpiricalModel.read in numpy: the rank chain from the counter-based normals."""
    tab = model.tables
    g = state.g_target.astype(np.float64)
    gi, wx, _ = ref_locate(model, g)
    n, w = ref_time(model, t)
    m_meas = model.times.size
    key_read = np.uint64(np.random.SeedSequence(read_seed).generate_state(1, np.uint64)[0])
    zd = np.empty(g.size)
    for i in range(g.size):
        z = float(state.z0[i])
        nodes = [z]
        for m in range(min(n + 1, m_meas - 1)):
            r = tab.rho[gi[i], m] + wx[i] * (tab.rho[gi[i] + 1, m] - tab.rho[gi[i], m])
            eta = K.normal(state.key, np.uint64(i * (m_meas - 1) + m), np.uint64(1))
            z = r * z + np.sqrt(max(1.0 - r * r, 0.0)) * eta
            nodes.append(z)
        if n + 1 <= m_meas - 1:
            r = tab.rho[gi[i], n] + wx[i] * (tab.rho[gi[i] + 1, n] - tab.rho[gi[i], n])
            zd[i] = ((1 - w) * nodes[n] + w * nodes[n + 1]) / np.sqrt(
                (1 - w) ** 2 + w * w + 2 * w * (1 - w) * r)
        else:
            zd[i] = nodes[n]
    bt = tab.b
    a = bt[gi, n] + w * (bt[gi, n + 1] - bt[gi, n])
    c = bt[gi + 1, n] + w * (bt[gi + 1, n + 1] - bt[gi + 1, n])
    b = a + wx * (c - a)
    xi = np.array([K.normal(key_read, np.uint64(i), np.uint64(K.STREAM_READ))
                   for i in range(g.size)])
    return ref_quantile(model, g, t, np.sqrt(np.maximum(1 - b * b, 0.0)) * zd + b * xi)


# ----------------------------------------------------------------------- the generator
def test_rram_campaign_contract_and_physics(campaign):
    ds = campaign
    assert ds["g"].dims == ("device", "time", "repeat") and ds.sizes["repeat"] == 1
    assert ds.attrs["g_max"] == G_MAX and ds.attrs["schema_version"] == 2
    assert ds["temperature"].attrs["units"] == "K" and ds["g"].attrs["units"] == "S"
    # equivalent time of the bake: 30 min x exp(Ea/kB (1/300 K - 1/353.15 K)), Ea = 1 eV
    factor = np.exp(1.0 / 8.617333262e-5 * (1 / 300.0 - 1 / 353.15))
    t_eq = ds["equivalent_time"].values
    assert t_eq[5] - t_eq[4] == pytest.approx(1800.0 * factor, rel=1e-9)
    assert t_eq[4] == 3600.0 and factor == pytest.approx(337.8, rel=1e-3)
    missing = np.isnan(ds["g"].values).mean()
    assert 0.005 < missing < 0.02  # 1 % missing reads
    g = ds["g"].values[:, :, 0] / G_MAX
    dead = ds["dead"].values
    assert 0.002 < dead.mean() < 0.01 and np.nanmax(g[dead]) < 0.02
    x = ds["g_target"].values / G_MAX
    lo, hi = (x < 0.2) & ~dead, (x > 0.8) & ~dead
    shift_lo = np.nanmedian(g[lo, -1] - g[lo, 0])
    shift_hi = np.nanmedian(g[hi, -1] - g[hi, 0])
    assert shift_lo > 0.01 and shift_hi < -0.01  # relaxation in both directions
    mid = (np.abs(x - 0.5) < 0.05) & ~dead
    assert np.nanstd(g[mid, -1] - x[mid]) > 2 * np.nanstd(g[mid, 0] - x[mid])  # broadening
    skew = stats.skew(g[hi, -1] - x[hi], nan_policy="omit")
    assert skew < -0.3  # skewed toward the relaxation center
    again = pcm.simulate_rram_campaign(levels=31, devices_per_level=300, rng=11)
    np.testing.assert_array_equal(again["g"].values, ds["g"].values)


# --------------------------------------------------------------- the fit and the KS criterion
def test_fit_recovers_its_generator_ks_per_level_and_time(campaign, fitted):
    model, report = fitted
    assert model.levels.size == 31 and model.times.size == 7
    np.testing.assert_allclose(model.times, campaign["equivalent_time"].values)
    # the model's reads against a fresh campaign of the same device: two-sample KS per level
    fresh = pcm.simulate_rram_campaign(levels=31, devices_per_level=300, rng=12)
    res = fit.compare_to_model(model, fresh, times=fresh["equivalent_time"].values,
                               n_fit=report.n_devices, draws=4)
    # (two campaigns of the device compared directly pass at the same rates: a level whose
    # devices happen to relax more fails at several times, as its reads are correlated)
    per_time = res.fraction_passing_per_time(0.01)
    assert res.fraction_passing(0.01) >= 0.95 and np.all(per_time >= 0.9), per_time
    # and against the data it was fitted on, with the model's draws as the reference
    same = fit.compare_to_model(model, campaign, times=campaign["equivalent_time"].values,
                                draws=4)
    assert np.all(same.fraction_passing_per_time(0.01) >= 0.95)
    assert report.read_noise_identified and "line in ln" in report.read_noise_source
    assert np.nanmax(report.ks_statistic) < 0.05
    # the model's reads keep the devices' ranks between times as the data do
    k = [3, 15, 27]
    g = np.repeat(model.levels[k], 3000) * G_MAX
    state = pcm.program(g, model, rng=8)
    reads = np.stack([pcm.read(state, t, model, rng=9 + m) for m, t in enumerate(model.times)])
    for a, lev in enumerate(k):
        z = special.ndtri((stats.rankdata(reads[:, a * 3000:(a + 1) * 3000], axis=1) - 0.5)
                          / 3000)
        rho = [np.corrcoef(z[m], z[m + 1])[0, 1] for m in range(model.times.size - 1)]
        np.testing.assert_allclose(rho, report.rank_correlation_measured[lev], atol=0.06)


def test_fit_quantiles_are_the_hazen_quantiles_of_the_reads(campaign, fitted):
    _, report = fitted
    g = campaign["g"].values[:, :, 0] / G_MAX
    x = campaign["g_target"].values / G_MAX
    for k in (0, 12, 30):
        rows = x == np.unique(x)[k]
        for m in (0, 4, 6):
            d = g[rows, m][np.isfinite(g[rows, m])] - report.levels[k]
            expected = np.quantile(d, DEFAULT_PROBS, method="hazen")
            got = report.quantiles_measured[k, m] - report.levels[k]
            # binned reads: within a bin (0.8 % of |d|) of the exact order statistics
            tol = 2 ** -FK.MANT_BITS * np.maximum(np.abs(expected), 1e-3) + 1e-9
            assert np.all(np.abs(got - expected) <= tol)
            assert report.n_reads[k, m] == d.size


def test_trend_read_noise_recovers_the_generator_when_devices_relax_straight():
    # relaxation linear in ln(1 + t / tau) = ln((t + t0) / t0) (tau = t0), no random walk:
    # the scatter around each device's line is its read noise alone
    params = pcm.RRAMCampaignParams(broaden=(0.0, 0.0), dead_fraction=0.0)
    ds = pcm.simulate_rram_campaign(params, levels=4, devices_per_level=400, rng=3,
                                    temperatures=None)
    model, rep = fit.fit_empirical(ds)
    expected = params.read_noise[0] + params.read_noise[1] * model.levels
    np.testing.assert_allclose(model.read_noise[:, 0], expected, rtol=0.06)


def test_holdout_ks_passes_for_the_fit_and_fails_without_relaxation(campaign):
    teq = campaign["equivalent_time"].values
    res = fit.holdout_ks(campaign, times=teq, seed=0, draws=4)
    assert res.family == "empirical" and res.fraction_passing(0.01) >= 0.93
    assert res.n_test.sum() > 0.45 * np.isfinite(campaign["g"].values).sum()

    def no_relaxation(ds, **kw):
        model, rep = fit.fit_empirical(ds, **kw)
        return model.scaled(drift_mean=0.0), rep

    bad = fit.holdout_ks(campaign, no_relaxation, times=teq, seed=0, draws=4)
    late = bad.fraction_passing_per_time(0.01)[-2:]
    assert np.all(late < 0.5) and bad.fraction_passing_per_time(0.01)[0] > 0.9


def test_split_is_half_of_each_level_and_deterministic():
    gt = np.repeat([1.0, 2.0, 3.0], [5, 6, 7])
    a, b = fit.split_devices(gt, seed=3)
    assert np.intersect1d(a, b).size == 0 and a.size + b.size == gt.size
    assert [int((gt[a] == v).sum()) for v in (1, 2, 3)] == [3, 3, 4]
    np.testing.assert_array_equal(fit.split_devices(gt, seed=3)[0], a)
    assert not np.array_equal(fit.split_devices(gt, seed=4)[0], a)


def test_fit_is_independent_of_threads_and_nearly_of_chunks(campaign):
    teq = campaign["equivalent_time"].values
    a, _ = fit.fit_empirical(campaign, times=teq, chunk_devices=977, n_workers=1)
    b, _ = fit.fit_empirical(campaign, times=teq, chunk_devices=977, n_workers=2)
    assert a == b
    c, _ = fit.fit_empirical(campaign, times=teq, chunk_devices=4096)
    np.testing.assert_array_equal(c.quantiles, a.quantiles)  # integer histograms
    # float sums' order; the trend residuals of one read per time are summed in float32 over
    # passes of PASS_DEVICES devices (runs split differently by other chunks): ~1e-7
    np.testing.assert_allclose(c.read_noise, a.read_noise, rtol=1e-6)


def test_read_noise_from_repeats_matches_the_pcm_formula():
    model = pcm.PCMModel.preset("rasch2023")
    ds = pcm.simulate_campaign(model, levels=5, devices_per_level=600, repeats=6, rng=1,
                               times=(10.0, 1000.0))
    fitted, report = fit.fit_empirical(ds)
    assert report.read_noise_source.startswith("repeated reads")
    g = np.repeat(fitted.levels * model.g_max, 20000)
    state = pcm.program(g, model, rng=2)
    for m, t in enumerate(fitted.times):
        # the rms over devices of the 1/f read noise of the drifted conductance (Eqs. 8, 11)
        g_d = state.g_prog * ((t + model.t0) / model.t0) ** -state.nu
        sig = pcm.read_noise_std(g_d, t, model, g_ref=g).reshape(-1, 20000)
        expected = np.sqrt(np.mean(sig**2, axis=1)) / model.g_max
        np.testing.assert_allclose(fitted.read_noise[:, m], expected, rtol=0.05)


def test_missing_reads_per_device_times_exclude_and_stuck_cells():
    ds = pcm.simulate_rram_campaign(levels=6, devices_per_level=200, rng=5,
                                    read_time_jitter=0.3)
    teq = ds["equivalent_time"].values
    assert teq.shape == (1200, 7)
    model, rep = fit.fit_empirical(ds, times=teq, stuck_below=0.02)
    assert rep.n_missing.sum() == np.isnan(ds["g"].values).sum() - _missing_of_stuck(ds)
    assert rep.n_stuck.sum() == ds["dead"].values.sum()
    assert model.stuck_at_zero == pytest.approx(ds["dead"].values.mean())
    assert rep.time_spread.max() > 0 and "per-device read times" in " ".join(rep.notes)
    # node times: the mean log-time of the reads
    s = np.log1p(teq / ds.attrs["t0"])
    s = np.where(np.isnan(ds["g"].values[:, :, 0]) | ds["dead"].values[:, None], np.nan, s)
    np.testing.assert_allclose(model.times, np.expm1(np.nanmean(s, axis=0)), rtol=1e-9)
    # exclude by index, by mask and by rule give the same fit
    dead = np.flatnonzero(ds["dead"].values)
    by_index, r1 = fit.fit_empirical(ds, times=teq, exclude=dead)
    by_mask, _ = fit.fit_empirical(ds, times=teq, exclude=ds["dead"].values)

    def rule(start, g_target, g):
        return np.nanmax(g[:, :, 0], axis=1) < 0.02 * G_MAX

    by_rule, _ = fit.fit_empirical(ds, times=teq, exclude=rule)
    assert by_index == by_mask and by_index.stuck_at_zero == 0.0
    # a rule sees the reads chunk by chunk: the same distributions; its sampled devices for the
    # rank correlations lose the excluded ones
    np.testing.assert_array_equal(by_rule.quantiles, by_index.quantiles)
    np.testing.assert_allclose(by_rule.rank_correlation, by_index.rank_correlation, atol=0.03)
    assert r1.n_excluded.sum() == dead.size


def _missing_of_stuck(ds):
    return int(np.isnan(ds["g"].values[ds["dead"].values]).sum())


def test_fit_errors_name_the_problem(campaign):
    teq = campaign["equivalent_time"].values
    with pytest.raises(fit.FitError, match="bakes"):
        fit.fit_empirical(campaign)
    ds = campaign.copy()
    ds["g_target"] = ds["g_target"] * 2
    with pytest.raises(fit.FitError, match="exceed g_max"):
        fit.fit_empirical(ds, times=teq)
    with pytest.raises(fit.FitError, match="every device is excluded"):
        fit.fit_empirical(campaign, times=teq, exclude=np.ones(campaign.sizes["device"], bool))
    one = campaign.isel(device=slice(0, 302))  # the second level keeps two devices
    with pytest.raises(fit.FitError, match="fewer than 3 usable devices"):
        fit.fit_empirical(one, times=teq)
    ds = campaign.copy()
    ds["g"] = ds["g"] * 1e6  # reads in uS labelled S
    with pytest.raises(fit.FitError, match="not of one scale"):
        fit.fit_empirical(ds, times=teq)
    ds = campaign.copy()
    ds["g"] = ds["g"] * 0 + ds["g_target"]
    with pytest.raises(fit.FitError, match="constant"):
        fit.fit_empirical(ds, times=teq)
    ds = campaign.copy(deep=True)
    ds["g"][5, 2, 0] = -1e-6
    with pytest.raises(io.MeasurementFormatError, match="device 5"):
        fit.fit_empirical(ds, times=teq)


def test_read_noise_not_identified_needs_a_named_prior():
    ds = pcm.simulate_rram_campaign(levels=5, devices_per_level=100, rng=2,
                                    times=(1.0, 1800.0), temperatures=(300.0, 353.15))
    teq = ds["equivalent_time"].values
    with pytest.raises(fit.FitError, match="not identified"):
        fit.fit_empirical(ds, times=teq)
    prior = pcm.PCMModel.preset("rasch2023")
    model, rep = fit.fit_empirical(ds, times=teq, prior=prior)
    assert not rep.read_noise_identified
    assert "not identified by these data" in model.read_noise_source
    assert "not identified" in rep.provenance["read_noise"]
    expected = pcm.read_noise_std(model.levels * G_MAX, teq[1], prior) / G_MAX
    np.testing.assert_allclose(model.read_noise[:, 1], expected)
    const, _ = fit.fit_empirical(ds, times=teq, prior=1e-7)
    np.testing.assert_allclose(const.read_noise, 1e-7 / G_MAX)


# --------------------------------------------------------------- interpolation rules
def test_quantiles_at_levels_and_times_are_the_table():
    model = toy_model()
    for k, x in enumerate(model.levels):
        for m, t in enumerate(model.times):
            got = model.quantile_z(np.full(ZN.size, x * G_MAX), t, ZN) / G_MAX
            np.testing.assert_allclose(got, model.quantiles[k, m], atol=1e-12)


def test_targets_outside_the_levels_scale_the_nearest_level():
    model = toy_model()
    p = np.array([0.01, 0.3, 0.5, 0.9])
    low = model.quantile(0.05 * G_MAX, 100.0, p)
    np.testing.assert_allclose(low, 0.25 * model.quantile(0.2 * G_MAX, 100.0, p), rtol=1e-12)
    high = model.quantile(1.2 * G_MAX, 100.0, p)
    np.testing.assert_allclose(high, (1.2 / 0.9) * model.quantile(0.9 * G_MAX, 100.0, p),
                               rtol=1e-12)
    assert np.all(model.quantile(0.0, 100.0, p) == 0.0)
    np.testing.assert_allclose(model.read_noise_std([0.1 * G_MAX, 1.8 * G_MAX], 1.0),
                               [0.5 * 0.005 * G_MAX, 2 * 0.005 * G_MAX], rtol=1e-12)


def test_time_rules_log_interpolation_extrapolation_horizon():
    model = toy_model(horizon=1e8)
    x = 0.5 * G_MAX
    p = np.array([0.05, 0.5, 0.95])
    q = [model.quantile(x, t, p) for t in model.times]
    np.testing.assert_allclose(model.quantile(x, 0.0, p), q[0])        # before: the first
    s = np.log1p(model.times / model.t0)
    t_mid = np.expm1(0.3 * s[1] + 0.7 * s[2])                            # linear in ln(1 + t/t0)
    np.testing.assert_allclose(model.quantile(x, t_mid, p), 0.3 * q[1] + 0.7 * q[2], rtol=1e-12)
    t_ext = 1e6                                                          # continued linearly
    r = (np.log1p(t_ext) - s[2]) / (s[2] - s[1])
    np.testing.assert_allclose(model.quantile(x, t_ext, p), q[2] + r * (q[2] - q[1]),
                               rtol=1e-9)
    np.testing.assert_allclose(model.quantile(x, 1e9, p), model.quantile(x, 1e8, p))  # held
    # a continued spread that would cross is clipped to [0, max] and kept ordered
    narrowing = toy_model(quantiles=toy_model().quantiles[:, ::-1], horizon=1e12)
    far = narrowing.quantile(0.2 * G_MAX, 1e12, DEFAULT_PROBS)
    assert np.all(np.diff(far) >= 0) and far.min() >= 0


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 1e7), st.integers(2, 5), st.integers(1, 4))
def test_interpolation_is_monotone_in_x_and_in_p(seed, t, k, m):
    rng = np.random.default_rng(seed)
    lv = np.sort(rng.choice(np.linspace(0.05, 1.0, 40), k, replace=False))
    tm = np.sort(rng.choice(np.geomspace(1.0, 1e5, 30), m, replace=False))
    probs = np.sort(rng.choice(np.linspace(0.002, 0.998, 200), 9, replace=False))
    # monotone in level and in probability, arbitrary spreads and shifts in time
    inc = rng.exponential(0.02, (k, m, probs.size))
    q = np.cumsum(inc, axis=2) + lv[:, None, None] - 0.05
    q = np.maximum.accumulate(np.clip(q + rng.normal(0, 0.01, (1, m, 1)), 0, None), axis=0)
    model = pcm.EmpiricalModel(g_max=G_MAX, levels=lv, times=tm, probs=probs, quantiles=q,
                               read_noise=np.zeros((k, m)),
                               rank_correlation=np.ones((k, m - 1)), horizon=1e7)
    xs = np.linspace(0.0, 1.2, 301) * G_MAX
    for p in (0.0005, 0.1, 0.5, 0.97, 0.9995):
        assert np.all(np.diff(model.quantile(xs, t, p)) >= 0)
    ps = np.linspace(0.0005, 0.9995, 301)
    for x in (0.01, lv[0], 0.5 * (lv[0] + lv[-1]), lv[-1], 1.1):
        assert np.all(np.diff(model.quantile(x * G_MAX, t, ps)) >= 0)


# -------------------------------------------------------------------- the samplers
def test_numba_quantiles_match_numpy_reference_exactly():
    model = toy_model()
    rng = np.random.default_rng(0)
    g = rng.uniform(0, 1.3, 2000) * G_MAX
    z = rng.normal(0, 1.5, 2000)
    for t in (0.0, 3.0, 100.0, 5e3, 1e6, 1e9):
        np.testing.assert_array_equal(model.quantile_z(g, t, z), ref_quantile(model, g, t, z))


@pytest.mark.parametrize("t", [0.5, 100.0, 2e3, 1e7])
def test_numba_read_matches_numpy_reference(t):
    model = toy_model()
    g = np.random.default_rng(1).uniform(0, 1.1, 300) * G_MAX
    state = model.program(g, rng=7)
    np.testing.assert_array_equal(
        state.z0, [K.normal(state.key, np.uint64(i), np.uint64(0)) for i in range(g.size)])
    np.testing.assert_allclose(pcm.read(state, t, model, rng=9), ref_read(model, state, t, 9),
                               rtol=1e-13, atol=0)


def test_reads_follow_the_table_and_the_copula():
    model = toy_model()
    g = np.full(40000, 0.5 * G_MAX)
    state = pcm.program(g, model, rng=3)
    assert isinstance(state, pcm.EmpiricalState)
    a = pcm.read(state, 100.0, model, rng=4)
    p = special.ndtr(np.linspace(-6, 6, 4001))
    q = model.quantile(0.5 * G_MAX, 100.0, p)
    assert stats.kstest(a, lambda v: np.interp(v, q, p)).pvalue > 1e-3
    # two reads at one time differ by the read noise (near the median: sqrt(2) sigma_read)
    b = pcm.read(state, 100.0, model, rng=5)
    core = np.abs(a - np.median(a)) < 0.02 * G_MAX
    assert np.std((a - b)[core]) == pytest.approx(np.sqrt(2) * 0.005 * G_MAX, rel=0.1)
    # ranks persist between measured times with the device rho times the read parts
    c = pcm.read(state, 1e4, model, rng=6)
    b_read = 0.005 / 0.03  # sigma_read / sigma_c at t = 100 s (sigma 0.02 x 1.5)
    b_late = 0.005 / 0.04
    expected = 0.8 * np.sqrt(1 - b_read**2) * np.sqrt(1 - b_late**2)
    zs = special.ndtri((stats.rankdata(np.c_[a, c], axis=0) - 0.5) / a.size)
    assert np.corrcoef(zs.T)[0, 1] == pytest.approx(expected, abs=0.015)


def test_same_seed_same_bits_on_any_thread_count():
    model = toy_model(stuck_at_zero=0.01, stuck_at_random=0.01)
    g = np.random.default_rng(0).uniform(0, G_MAX, 100_001).astype(np.float32)
    before = numba.get_num_threads()
    try:
        out = []
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            s = pcm.program(g, model, rng=42)
            out.append((s.z0, s.g_stuck, pcm.read(s, 5e3, model, rng=43),
                        pcm.perturb(g, model, rng=44)))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(out[0], out[-1]):
        np.testing.assert_array_equal(a, b)
    # a device's numbers depend on (seed, index) only: a prefix (the serial build of the kernel)
    # reads what the whole array (the parallel build) read
    s = pcm.program(g, model, rng=42)
    head = pcm.EmpiricalState(g_target=s.g_target[:1000], z0=s.z0[:1000], key=s.key)
    ok = ~s.stuck[:1000]
    np.testing.assert_array_equal(pcm.read(head, 5e3, model, rng=43)[ok], out[0][2][:1000][ok])
    assert out[0][2].dtype == np.float32
    assert np.mean(out[0][2] == 0) == pytest.approx(0.01, abs=0.002)


def test_torch_sampler_matches_numba_sampler(fitted):
    model, _ = fitted
    g = np.repeat(model.levels[[2, 15, 28]], 6000) * G_MAX
    state = pcm.program(g, model, rng=1)
    tstate = program_torch(torch.as_tensor(g), model, generator=2)
    for t in (10.0, 4e4, 7e5):
        r_nb = pcm.read(state, t, model, rng=3)
        r_t = read_torch(tstate, t, model, generator=4).numpy()
        for k in range(3):
            rows = slice(6000 * k, 6000 * (k + 1))
            assert stats.ks_2samp(r_nb[rows], r_t[rows]).pvalue > 1e-3
    # the joint law: rank correlation between two times
    a, b = (pcm.read(state, t, model, rng=5) for t in (10.0, 7e5))
    c, d = (read_torch(tstate, t, model, generator=6).numpy()
            for t in (10.0, 7e5))
    rows = slice(6000, 12000)
    assert stats.spearmanr(a[rows], b[rows])[0] == pytest.approx(
        stats.spearmanr(c[rows], d[rows])[0], abs=0.04)
    # the dispatch of pcm.torch_ops
    from aimc_device.pcm import torch_ops

    s2 = torch_ops.program_torch(torch.as_tensor(g[:10]), model, generator=1)
    assert s2.z.shape == (10, model.times.size) and s2.stuck is None
    np.testing.assert_array_equal(torch_ops.read_torch(s2, 10.0, model, generator=3).numpy(),
                                  read_torch(s2, 10.0, model, generator=3).numpy())


def test_training_noise_perturb_numba_and_torch(fitted):
    model, _ = fitted
    x = model.levels[10]
    g = np.full(50000, x * G_MAX)
    std = model.training_noise_std(x * G_MAX, 20.0)
    q = model.quantile(x * G_MAX, 20.0, (np.arange(20000) + 0.5) / 20000)
    assert std == pytest.approx(np.std(q), rel=0.02)  # the distribution's std, no shift
    out = pcm.perturb(g, model, t=20.0, scale=0.5, rng=1)
    assert np.std(out - g) == pytest.approx(0.5 * std, rel=0.03)
    assert abs(np.mean(out - g)) < 0.01 * std
    out_t = perturb_torch(torch.as_tensor(g), model, t=20.0, scale=0.5, generator=2).numpy()
    assert stats.ks_2samp(out, out_t).pvalue > 1e-3


# ------------------------------------------------------------------------ knobs
def test_scaled_knobs_empirical():
    model = toy_model()
    assert model.scaled() is model
    width = lambda m, k, t: 0.5 * (  # noqa: E731
        m.quantile_z(m.levels[k] * G_MAX, t, 1.0) - m.quantile_z(m.levels[k] * G_MAX, t, -1.0))
    b = 0.005 / 0.02
    dev0 = 0.02 * np.sqrt(1 - b * b)  # the device's part of the spread at the first time
    double = model.scaled(programming=2.0)
    assert width(double, 1, 1.0) / G_MAX == pytest.approx(np.hypot(2 * dev0, 0.005), rel=1e-6)
    flat = model.scaled(drift_mean=0.0)
    med = [flat.median(0.9 * G_MAX, t) for t in model.times]
    np.testing.assert_allclose(med, med[0], rtol=1e-12)
    quiet = model.scaled(read_noise=0.0)
    assert np.all(quiet.read_noise == 0)
    s = quiet.program(np.full(1000, 0.5 * G_MAX), rng=1)
    np.testing.assert_array_equal(quiet.read(s, 50.0, rng=2), quiet.read(s, 50.0, rng=3))
    steady = model.scaled(drift_spread=0.0)
    w = [width(steady, 2, t) for t in model.times]
    np.testing.assert_allclose(w, w[0], rtol=0.05)
    assert model.scaled(stuck=3.0).stuck_at_zero == 0.0
    with pytest.raises(ValueError, match="factor"):
        model.scaled(programming=-1)


def test_scaled_knobs_pcm():
    m = pcm.PCMModel.preset("rasch2023")
    s = m.scaled(programming=2, drift_mean=0.5, drift_spread=3, read_noise=0.5, stuck=2)
    g = np.array([0.1, 0.5, 1.0]) * m.g_max
    np.testing.assert_allclose(pcm.programming_noise_std(g, s), 2 * pcm.programming_noise_std(g, m))
    mu, sd = pcm.drift_exponent_stats(g, s)
    mu0, sd0 = pcm.drift_exponent_stats(g, m)
    np.testing.assert_allclose(mu, 0.5 * mu0)
    np.testing.assert_allclose(sd, 3 * sd0)
    np.testing.assert_allclose(pcm.read_noise_q(g / m.g_max, s),
                               0.5 * pcm.read_noise_q(g / m.g_max, m))
    assert m.scaled() is m and m.scaled(read_noise=0).read_noise_coeff == 0


# ---------------------------------------------------------------------- device cards
def test_empirical_card_round_trip_exact(tmp_path, fitted):
    model, report = fitted
    path = tmp_path / "rram.h5"
    io.save_device_model(model, path, report.provenance)
    loaded, prov = io.load_device_card(path)
    assert isinstance(loaded, pcm.EmpiricalModel) and loaded == model
    assert io.load_device_model(path) == model
    assert prov["fit_function"] == "aimc_device.fit.fit_empirical"
    assert prov["read_noise"] == model.read_noise_source
    with h5py.File(path) as f:
        assert f.attrs["family"] == "empirical" and f.attrs["schema_version"] == 2
        assert f["model/quantiles"].attrs["units"] == "1"
        assert f["model/times"].attrs["units"] == "s"
        assert f["model/activation_energy"].attrs["units"] == "eV"
        f_t_read = f["model/t_read"][()]
    assert f_t_read == model.t_read
    unknown = model.replace(activation_energy=None, t_read=None)
    io.save_device_model(unknown, path)
    assert io.load_device_model(path) == unknown
    with h5py.File(path, "a") as f:
        f["model/levels"].attrs["units"] = "uS"
    with pytest.raises(io.DeviceCardError, match="/model/levels: units 'uS'"):
        io.load_device_model(path)


def test_model_pickles_without_its_tables():
    model = toy_model()
    model.tables  # built
    again = pickle.loads(pickle.dumps(model))
    assert again == model and again._cache == {} and len(pickle.dumps(model)) < 20_000
    np.testing.assert_array_equal(again.quantile(0.5 * G_MAX, 50.0, DEFAULT_PROBS),
                                  model.quantile(0.5 * G_MAX, 50.0, DEFAULT_PROBS))


def test_old_pcm_card_without_family_still_loads(tmp_path):
    model = pcm.PCMModel.preset("rasch2023")
    path = tmp_path / "old.h5"
    io.save_device_model(model, path)
    with h5py.File(path, "a") as f:
        assert f.attrs["schema_version"] == 1 and f.attrs["family"] == "pcm"
        del f.attrs["family"]
    assert io.load_device_model(path) == model
    with h5py.File(path, "a") as f:
        f.attrs["family"] = "memristor"
    with pytest.raises(io.DeviceCardError, match="unknown family"):
        io.load_device_model(path)


# ------------------------------------------------------------------ the binning kernel
def test_histogram_bins_hold_their_values():
    lo, hi = FK.bin_edges()
    assert lo.size == FK.N_BINS and np.all(hi > lo) and np.all(lo[1:] == hi[:-1])
    d = np.concatenate([np.random.default_rng(0).normal(0, s, 2000)
                        for s in (1e-5, 1e-3, 0.05, 0.5)])
    idx = np.array([FK.bin_of(v) for v in d])
    v = np.abs(d).astype(np.float32).astype(float) * np.sign(d)  # binned in float32
    assert np.all((lo[idx] <= v) & (v <= hi[idx]))
    big = d[np.abs(d) > 1e-4]
    width = (hi - lo)[np.array([FK.bin_of(v) for v in big])] / np.abs(big)
    assert width.max() < 2 ** -FK.MANT_BITS * 1.01  # 0.8 % of |d|
    # the form one_read_kernel vectorises gives the same bins, over every octave and beyond
    edge = np.concatenate([lo, hi, np.nextafter(lo, 0), np.nextafter(hi, 10)])
    d = np.concatenate([d, edge, -edge, [0.0, -0.0, 1e-30, -1e-30, 10.0, -10.0, np.inf,
                                         -np.inf, np.nan]])
    np.testing.assert_array_equal([FK.bin_of_simd(v) for v in d], [FK.bin_of(v) for v in d])


def _chunk_inputs(dtype):
    """A chunk of one read per time at shared times: reads not taken, a device never read, a
    read of 0 S, devices left out, stuck cells (dead), and a level whose target is not a
    level (skipped)."""
    ds = pcm.simulate_rram_campaign(levels=5, devices_per_level=700, rng=12, temperatures=None,
                                    dtype=dtype)
    g = np.ascontiguousarray(ds["g"].values)
    g[3] = np.nan
    g[10, 2] = 0.0
    gt = ds["g_target"].values.copy()
    levels = np.unique(gt)
    gt[-5:] = levels[-1] * 1.5
    g_max = ds.attrs["g_max"]
    use = np.ones(gt.size, bool)
    use[::37] = False
    s = np.log1p(ds["time"].values / ds.attrs["t0"])
    return g, gt, levels, g_max, use, s


def _run_chunk(kernel, g, gt, levels, g_max, use, s, stuck):
    k, t_n = levels.size, g.shape[1]
    hist = np.zeros((k, t_n, FK.HIST_COLUMNS), np.int32)
    lohi = np.empty((k, t_n, 2))
    lohi[..., 0], lohi[..., 1] = np.inf, -np.inf
    sums, lvl = np.zeros((k, t_n, FK.N_CELL_SUMS)), np.zeros((k, FK.N_LEVEL_SUMS))
    x_lv = levels.astype(np.float64) / g_max
    if kernel is FK.chunk_kernel:
        FK.chunk_kernel(g, gt, use, levels, x_lv, 1.0 / g_max, s[None], stuck, hist, lohi, sums,
                        lvl, np.zeros((t_n, 4)))
        bad = False
    else:
        bad = kernel(g.reshape(-1), gt, use, levels, x_lv, 1.0 / g_max, s, stuck, hist, lohi,
                     sums, lvl)
    return bad, hist, lohi, sums, lvl


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_read_kernel_matches_chunk_kernel(dtype):
    """The SIMD kernel for one read per time at shared times against the general one (itself
    checked against numpy above and by the fits): the same integer histograms, extremes and
    counts; the trend residuals (float32 per pass) to ~1e-6, far below the read noise's
    standard error (1 / sqrt(2 dof) ~ 1 %)."""
    g, gt, levels, g_max, use, s = _chunk_inputs(dtype)
    for stuck in (-1.0, 0.05):
        kernel = FK.one_read_kernel(g.shape[1], dtype == np.float64)
        bad, hist, lohi, sums, lvl = _run_chunk(kernel, g, gt, levels, g_max, use, s, stuck)
        _, hist0, lohi0, sums0, lvl0 = _run_chunk(FK.chunk_kernel, g, gt, levels, g_max, use, s,
                                                  stuck)
        assert not bad
        np.testing.assert_array_equal(hist[..., FK.N_BINS:], 0)
        np.testing.assert_array_equal(hist[..., :FK.N_BINS], hist0[..., :FK.N_BINS])
        np.testing.assert_array_equal(lohi, lohi0)
        np.testing.assert_array_equal(sums, sums0)
        np.testing.assert_array_equal(lvl[:, :3], lvl0[:, :3])
        np.testing.assert_array_equal(lvl[:, 4], lvl0[:, 4])
        np.testing.assert_allclose(lvl[:, 3], lvl0[:, 3], rtol=2e-6)
        assert (lvl[:, 2].sum() > 0) == (stuck > 0)  # the dead cells are stuck cells
    g[7, 4, 0] = -1e-9
    assert _run_chunk(kernel, g, gt, levels, g_max, use, s, -1.0)[0]
    g[7, 4, 0] = np.inf
    assert _run_chunk(kernel, g, gt, levels, g_max, use, s, -1.0)[0]


@pytest.mark.parametrize("chunk, workers", [(311, 1), (311, 2), (5000, 2)])
def test_sample_is_the_smallest_hashes_per_level_whatever_the_chunks(chunk, workers,
                                                                     monkeypatch):
    # the sampled devices (rank correlations) are picked thread by thread, chunk by chunk: the
    # k smallest hashes of the indices among the devices kept, as in one pass over all devices;
    # the stream copies their reads
    from aimc_device.fit import empirical_fit as EF

    monkeypatch.setattr(EF, "_SAMPLE_CHUNK", chunk)
    ds = pcm.simulate_rram_campaign(levels=4, devices_per_level=900, rng=4, temperatures=None)
    g, gt, g_max = ds["g"].values, ds["g_target"].values, ds.attrs["g_max"]
    levels = np.unique(gt)
    use = np.ones(gt.size, bool)
    use[::11] = False
    k = 250
    idx, size, counts = FK.bottom_k(gt, levels, use, k, EF._SAMPLE_KEY)
    keep = lambda a, b, buf=None: use[a:b].copy()  # noqa: E731
    sampled = EF._sample(ds, "", levels, g_max, keep, k, workers)
    np.testing.assert_array_equal(sampled[3], size)
    np.testing.assert_array_equal(sampled[4], counts)
    sample = EF._stream(ds, "", levels, levels / g_max, g_max, ds.attrs["t0"],
                        ds["time"].values, None, keep, None, None, sampled, k, chunk, False,
                        workers)[5]
    for lev in range(levels.size):
        want = g[np.sort(idx[lev, :size[lev]]), :, 0].astype(float) * (1.0 / g_max)
        np.testing.assert_array_equal(sample[lev * k:lev * k + size[lev]], want)
