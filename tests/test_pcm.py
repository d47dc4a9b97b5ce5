"""PCM device physics: published values, formulas, Numba kernels against a numpy reference,
samplers against scipy.stats, determinism across thread counts, and the torch mirror."""
from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from scipy import stats

from aimc_device import pcm
from aimc_device.pcm import _kernels as K
from aimc_device.pcm.torch_ops import perturb_tensor, perturb_torch, program_torch, read_torch

MODEL = pcm.PCMModel.preset("rasch2023")
G_MAX = 25e-6
LEVELS = np.array([0.05, 0.1, 0.25, 0.5, 0.75, 1.0]) * G_MAX


# --------------------------------------------------------------------------- plain numpy reference
# docs/model.md section 4, written out independently of aimc_device.pcm.formulas.
def ref_sigma_p(g):
    x = g / G_MAX
    return 0.26348e-6 + 1.9650e-6 * x - 1.1731e-6 * x**2


def ref_mu_nu(g):
    return np.clip(-0.0155 * np.log(g / G_MAX) + 0.0244, 0.049, 0.1)


def ref_sigma_nu(g):
    return np.clip(-0.0125 * np.log(g / G_MAX) - 0.0059, 0.008, 0.045)


def ref_q(x):
    return np.minimum(0.0088 * x ** (-0.65), 0.2)


def ref_read_std(g_d, g_target, t):
    return g_d * ref_q(g_target / G_MAX) * np.sqrt(np.log((t + 250e-9) / (2 * 250e-9)))


# --------------------------------------------------------------------------------- parameters
def test_preset_pins_published_values():
    # Rasch et al., Nat. Commun. 14, 5282 (2023), Eqs. 7-11 (docs/model.md section 4)
    m = MODEL
    assert m.g_max == 25e-6 and m.t0 == 20.0 and m.t_read == 250e-9
    assert m.prog_coeffs == (0.26348e-6, 1.9650e-6, -1.1731e-6)
    assert m.drift_mean_coeffs == (-0.0155, 0.0244) and m.drift_mean_bounds == (0.049, 0.1)
    assert m.drift_std_coeffs == (-0.0125, -0.0059) and m.drift_std_bounds == (0.008, 0.045)
    assert (m.read_noise_coeff, m.read_noise_exponent, m.read_noise_max) == (0.0088, -0.65, 0.2)
    assert "10.1038/s41467-023-40770-4" in m.citation
    assert not m.has_faults


def test_unknown_preset_lists_known():
    with pytest.raises(KeyError, match="rasch2023"):
        pcm.PCMModel.preset("nope")


@pytest.mark.parametrize("field,value,match", [
    ("g_max", -1e-6, "g_max"),
    ("drift_mean_bounds", (0.1, 0.049), "inverted"),
    ("drift_std_bounds", (0.05, 0.01), "drift_std_bounds"),
    ("t_read", 0.0, "t_read"),
    ("prog_coeffs", (-1e-6, 0.0, 0.0), "prog_coeffs"),
    ("stuck_at_zero", 1.5, "stuck_at_zero"),
    ("read_noise_time", "later", "read_noise_time"),
    ("read_noise_coeff", float("nan"), "read_noise_coeff"),
])
def test_validation_names_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        MODEL.replace(**{field: value})


def test_model_is_frozen_and_round_trips_dict():
    with pytest.raises(Exception):
        MODEL.g_max = 1.0  # type: ignore[misc]
    assert pcm.PCMModel(**MODEL.to_dict()) == MODEL


# ---------------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_formulas_match_reference(dtype):
    g = LEVELS.astype(dtype)
    np.testing.assert_allclose(pcm.programming_noise_std(g, MODEL), ref_sigma_p(LEVELS), rtol=1e-6)
    mu, sd = pcm.drift_exponent_stats(g, MODEL)
    np.testing.assert_allclose(mu, ref_mu_nu(LEVELS), rtol=1e-6)
    np.testing.assert_allclose(sd, ref_sigma_nu(LEVELS), rtol=1e-6)
    assert pcm.programming_noise_std(g, MODEL).dtype == dtype
    np.testing.assert_allclose(pcm.read_noise_std(g, 3600.0, MODEL),
                               ref_read_std(LEVELS, LEVELS, 3600.0), rtol=1e-5)


def test_formulas_same_on_torch():
    gt = torch.tensor(LEVELS)
    np.testing.assert_allclose(pcm.programming_noise_std(gt, MODEL).numpy(), ref_sigma_p(LEVELS))
    mu, sd = pcm.drift_exponent_stats(gt, MODEL)
    np.testing.assert_allclose(mu.numpy(), ref_mu_nu(LEVELS))
    np.testing.assert_allclose(sd.numpy(), ref_sigma_nu(LEVELS))


def test_published_curve_values():
    # Spot values from Eqs. 7, 9, 10 at x = 1 and x = 0.1 (hand-computed from the coefficients).
    x1 = np.array([G_MAX])
    assert pcm.programming_noise_std(x1, MODEL)[0] == pytest.approx(1.05538e-6, rel=1e-6)
    mu, sd = pcm.drift_exponent_stats(np.array([0.1 * G_MAX]), MODEL)
    assert mu[0] == pytest.approx(0.0600903, rel=1e-5)  # -0.0155 ln 0.1 + 0.0244
    assert sd[0] == pytest.approx(0.0228822, rel=1e-5)  # -0.0125 ln 0.1 - 0.0059
    assert pcm.read_noise_q(np.array([1.0]), MODEL)[0] == pytest.approx(0.0088)
    assert pcm.read_noise_q(np.array([1e-6]), MODEL)[0] == 0.2  # the cap


def test_read_noise_time_conventions():
    t = 1.0
    paper = pcm.read_noise_time_factor(t, MODEL)
    aihw = pcm.read_noise_time_factor(t, MODEL.replace(read_noise_time="t_plus_t0"))
    assert paper == pytest.approx(np.sqrt(np.log((1.0 + 250e-9) / 500e-9)))
    assert aihw == pytest.approx(np.sqrt(np.log((21.0 + 250e-9) / 500e-9)))
    assert pcm.read_noise_time_factor(0.0, MODEL) == 0.0  # log < 0 -> no noise


# ------------------------------------------------------------------- kernels vs numpy reference
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_program_kernel_deterministic_parts(dtype):
    # No programming noise and zero drift-exponent spread: the kernel must equal the reference.
    m = MODEL.replace(prog_coeffs=(0.0, 0.0, 0.0), drift_std_bounds=(0.0, 0.0))
    g = np.linspace(0.01, 1.0, 1001).astype(dtype) * G_MAX
    s = pcm.program(g, m, rng=3)
    assert s.g_prog.dtype == dtype and s.nu.dtype == dtype
    np.testing.assert_array_equal(s.g_prog, g)
    np.testing.assert_allclose(s.nu, ref_mu_nu(g.astype(np.float64)),
                               rtol=1e-6 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_read_kernel_deterministic_drift(dtype):
    m = MODEL.replace(read_noise_coeff=0.0)
    g = np.linspace(0.01, 1.0, 1001).astype(dtype) * G_MAX
    s = pcm.program(g, m, rng=4)
    t = 86400.0
    g_t = pcm.read(s, t, m, rng=5)
    ref = s.g_prog.astype(np.float64) * ((t + 20.0) / 20.0) ** (-s.nu.astype(np.float64))
    np.testing.assert_allclose(g_t, ref, rtol=1e-6 if dtype == np.float32 else 1e-12)


def test_perturb_with_zero_scale_is_identity():
    g = np.linspace(-1, 1, 101) * G_MAX
    np.testing.assert_array_equal(pcm.perturb(g, MODEL, scale=0.0, rng=1), g)


# -------------------------------------------------------------- samplers, statistically
@numba.njit(cache=True)
def _fill_standard_normal(key, out):
    """out[i] = the kernels' normal variate of element i (stream STREAM_READ)."""
    for i in range(out.shape[0]):
        out[i] = K.normal(key, np.uint64(i), np.uint64(K.STREAM_READ))


def test_ziggurat_normal_matches_scipy():
    out = np.empty(400_000)
    _fill_standard_normal(np.uint64(12345), out)
    assert stats.kstest(out, "norm").pvalue > 1e-3
    assert abs(out.mean()) < 5 / np.sqrt(out.size)
    assert out.var() == pytest.approx(1.0, abs=5 * np.sqrt(2 / out.size))
    assert abs(stats.kurtosis(out)) < 5 * np.sqrt(24 / out.size)
    # the tail beyond the ziggurat's base (|x| > R) must be populated at the normal rate
    tail = np.mean(np.abs(out) > 3.6541528853610088)
    expect = 2 * stats.norm.sf(3.6541528853610088)
    assert abs(tail - expect) < 5 * np.sqrt(expect / out.size)


@pytest.mark.parametrize("level", [0.1, 0.5, 1.0])
def test_programming_and_drift_draws_follow_model(level):
    n = 50_000
    g = np.full(n, level * G_MAX)
    s = pcm.program(g, MODEL, rng=7)
    z = (s.g_prog - g) / ref_sigma_p(g)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    zn = (s.nu - ref_mu_nu(g)) / ref_sigma_nu(g)
    assert stats.kstest(zn, "norm").pvalue > 1e-3
    # a formula off by 10 % in sigma would fail this
    assert np.std(z) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("t", [1.0, 3600.0, 3.15e7])
def test_read_noise_follows_eq11(t):
    n = 50_000
    g = np.full(n, 0.3 * G_MAX)
    s = pcm.program(g, MODEL, rng=8)
    g_d = s.g_prog * ((t + 20.0) / 20.0) ** (-s.nu)
    g_t = pcm.read(s, t, MODEL, rng=9)
    z = (g_t - g_d) / ref_read_std(g_d, g, t)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert np.std(z) == pytest.approx(1.0, abs=0.02)


def test_read_draws_change_with_seed_but_not_programming():
    s = pcm.program(np.full(1000, 0.5 * G_MAX), MODEL, rng=1)
    a, b = pcm.read(s, 3600.0, MODEL, rng=1), pcm.read(s, 3600.0, MODEL, rng=2)
    # both reads share the programmed state: their difference is read noise alone
    sig = ref_read_std(s.g_prog * ((3620 / 20) ** -s.nu), s.g_target, 3600.0)
    assert np.std((a - b) / sig) == pytest.approx(np.sqrt(2), rel=0.1)


# --------------------------------------------------------------------------------- determinism
def test_same_seed_same_bits_on_any_thread_count():
    g = np.random.default_rng(0).uniform(0, G_MAX, 200_001).astype(np.float32)
    before = numba.get_num_threads()
    try:
        results = []
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            s = pcm.program(g, MODEL, rng=42)
            results.append((s.g_prog, s.nu, pcm.read(s, 3600.0, MODEL, rng=43),
                            pcm.perturb(g, MODEL, rng=44)))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(results[0], results[-1]):
        np.testing.assert_array_equal(a, b)
    s2 = pcm.program(g, MODEL, rng=42)
    np.testing.assert_array_equal(s2.g_prog, results[0][0])
    assert not np.array_equal(pcm.program(g, MODEL, rng=41).g_prog, s2.g_prog)


def test_generator_advances_between_calls():
    # two calls on one Generator draw independently: the difference of the two programming
    # errors has sqrt(2) sigma_P, their correlation is 0 (+-5 / sqrt(n))
    gen = np.random.default_rng(5)
    n = 20_000
    g = np.full(n, 0.5 * G_MAX)
    z1, z2 = ((pcm.program(g, MODEL, rng=gen).g_prog - g) / ref_sigma_p(g) for _ in range(2))
    assert np.std(z1 - z2) == pytest.approx(np.sqrt(2), rel=0.03)
    assert abs(np.corrcoef(z1, z2)[0, 1]) < 5 / np.sqrt(n)


def test_shape_is_kept():
    # an n-d array is programmed and read element by element as its flat (C-order) view
    g = np.random.default_rng(1).uniform(0.1, 1.0, (3, 4, 5)) * G_MAX
    s, flat = pcm.program(g, MODEL, rng=0), pcm.program(g.ravel(), MODEL, rng=0)
    assert s.g_prog.shape == s.nu.shape == (3, 4, 5)
    np.testing.assert_array_equal(s.g_prog.ravel(), flat.g_prog)
    np.testing.assert_array_equal(s.nu.ravel(), flat.nu)
    r = pcm.read(s, 1.0, MODEL, rng=0)
    assert r.shape == (3, 4, 5)
    np.testing.assert_array_equal(r.ravel(), pcm.read(flat, 1.0, MODEL, rng=0))


# ------------------------------------------------------------------------------------- faults
def test_stuck_at_faults():
    m = MODEL.replace(stuck_at_zero=0.02, stuck_at_gmax=0.01, stuck_at_random=0.03)
    n = 100_000
    s = pcm.program(np.full(n, 0.5 * G_MAX), m, rng=11)
    frac = s.stuck.mean()
    assert frac == pytest.approx(0.06, abs=5 * np.sqrt(0.06 * 0.94 / n))
    assert np.mean(s.g_prog == 0.0) == pytest.approx(0.02, abs=5 * np.sqrt(0.02 / n))
    assert np.mean(s.g_prog == G_MAX) == pytest.approx(0.01, abs=5 * np.sqrt(0.01 / n))
    g_t = pcm.read(s, 3.15e7, m, rng=12)
    np.testing.assert_array_equal(g_t[s.stuck], s.g_prog[s.stuck])  # stuck devices do not drift


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("g,match", [
    (np.array([1e-6, np.nan]), "NaN"),
    (np.array([1e-6, -1e-6]), "negative"),
    (np.array([12.5]), "siemens"),
    (np.array(["a"]), "numeric"),
])
def test_bad_conductance(g, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pcm.program(g, MODEL, rng=0)


def test_bad_time():
    s = pcm.program(np.full(4, 1e-6), MODEL, rng=0)
    with pytest.raises(ValueError, match="time"):
        pcm.read(s, -1.0, MODEL)


# --------------------------------------------------------------------------------- torch mirror
def test_torch_mirror_same_distributions():
    n = 40_000
    g = np.full(n, 0.4 * G_MAX)
    gt = torch.from_numpy(g)
    s = pcm.program(g, MODEL, rng=21)
    st = program_torch(gt, MODEL, generator=21)
    assert stats.ks_2samp(s.g_prog, st.g_prog.numpy()).pvalue > 1e-3
    assert stats.ks_2samp(s.nu, st.nu.numpy()).pvalue > 1e-3
    r_nb = pcm.read(s, 86400.0, MODEL, rng=22)
    r_t = read_torch(st, 86400.0, MODEL, generator=22)
    assert stats.ks_2samp(r_nb, r_t.numpy()).pvalue > 1e-3
    p_nb = perturb_tensor(gt, MODEL, rng=23)  # CPU: the Numba kernel
    p_t = perturb_torch(gt, MODEL, generator=23)
    assert stats.ks_2samp(p_nb.numpy(), p_t.numpy()).pvalue > 1e-3
    # and both have the predicted spread: sigma_P and 20 s of read noise added in quadrature
    expect = np.hypot(ref_sigma_p(g[0]), ref_read_std(g[0], g[0], 20.0))
    assert p_t.std().item() == pytest.approx(expect, rel=0.03)
    assert p_nb.std().item() == pytest.approx(expect, rel=0.03)


def test_perturb_tensor_cpu_no_copy_and_dtype():
    # on CPU the tensor goes through pcm.perturb's kernel: the same numbers, in its dtype,
    # the input left as it was
    g = torch.linspace(-1, 1, 64 * 32, dtype=torch.float32).reshape(64, 32) * G_MAX
    before = g.clone()
    out = perturb_tensor(g, MODEL, rng=0)
    assert out.dtype == torch.float32 and out.shape == g.shape
    np.testing.assert_array_equal(out.numpy().ravel(),
                                  pcm.perturb(g.numpy().ravel(), MODEL, rng=0))
    assert torch.equal(g, before) and float((out - g).abs().max()) > 0
    torch.testing.assert_close(out, perturb_tensor(g, MODEL, rng=0), rtol=0, atol=0)


def test_paired_variates_of_programming_are_normal_and_independent():
    # Programming draws its two variates (programming error, drift exponent) from the two
    # 32-bit halves of one hash (a 23-bit-mantissa ziggurat): check both, their tails and
    # their independence on 400k devices.
    m = MODEL.replace(drift_std_bounds=(0.01, 0.01), drift_mean_bounds=(0.05, 0.05))
    n = 400_000
    g = np.full(n, 0.5 * G_MAX)
    s = pcm.program(g, m, rng=2024)
    z1 = (s.g_prog - g) / ref_sigma_p(g)
    z2 = (s.nu - 0.05) / 0.01
    r = 3.6541528853610088
    expect = 2 * stats.norm.sf(r)
    for z in (z1, z2):
        assert stats.kstest(z, "norm").pvalue > 1e-3
        assert abs(z.mean()) < 5 / np.sqrt(n) and abs(z.var() - 1) < 5 * np.sqrt(2 / n)
        assert abs(np.mean(np.abs(z) > r) - expect) < 5 * np.sqrt(expect / n)
    assert abs(np.corrcoef(z1, z2)[0, 1]) < 5 / np.sqrt(n)


def test_read_with_other_read_noise_parameters_recomputes_q():
    # Q_s is computed once at programming; a read with a model of other read-noise parameters
    # must use that model's Q_s (here twice the coefficient: twice the noise).
    n = 50_000
    g = np.full(n, 0.3 * G_MAX)
    s = pcm.program(g, MODEL, rng=5)
    other = MODEL.replace(read_noise_coeff=2 * MODEL.read_noise_coeff)
    g_d = s.g_prog * ((3620.0 / 20.0) ** (-s.nu))
    z = (pcm.read(s, 3600.0, other, rng=6) - g_d) / ref_read_std(g_d, g, 3600.0)
    assert np.std(z) == pytest.approx(2.0, rel=0.02)
    z = (pcm.read(s, 3600.0, MODEL, rng=6) - g_d) / ref_read_std(g_d, g, 3600.0)
    assert np.std(z) == pytest.approx(1.0, rel=0.02)


def test_rectangle_step_is_half_normal_or_nan():
    """The SIMD rectangle step gives half_normal's variate (float32) or NaN where half_normal
    goes on to its wedge and tail tests."""
    halves = np.random.default_rng(2).integers(0, 2**32, 200_000, dtype=np.uint64)
    rect = np.array([K.half_normal_rect(h) for h in halves[:20_000]])
    full = np.array([K.half_normal(np.uint64(9), h, np.uint64(i), np.uint64(3))
                     for i, h in enumerate(halves[:20_000])])
    inside = ((halves[:20_000] >> np.uint64(9)) & np.uint64(0x7FFFFF)) < \
        K._KI23[(halves[:20_000] & np.uint64(0xFF)).astype(np.intp)]
    np.testing.assert_array_equal(np.isnan(rect), ~inside)
    np.testing.assert_allclose(rect[inside], full[inside], rtol=2e-7)
    # the share outside the rectangles is that of the table, mean over layers of 1 - k_i / 2^23:
    # 1.49 % for the 256 layers of the normal ziggurat (Marsaglia & Tsang 2000)
    expect = float(np.mean(1.0 - K._KI23.astype(np.float64) / 2.0 ** 23))
    assert expect == pytest.approx(0.01492, abs=1e-4)
    assert (~inside).mean() == pytest.approx(expect, abs=5 * np.sqrt(expect / 20_000))


@pytest.mark.parametrize("unit", [1.0, G_MAX])  # siemens, or weights normalised to g_max
@pytest.mark.parametrize("top,rtol", [(1.0, 2e-4), (2.0, 2e-4), (9.0, 5e-3)])
def test_perturb_draws_the_formula_std_times_its_normals(unit, top, rtol):
    # pcm.perturb interpolates sqrt(sigma_P^2 + sigma_read^2) (Eqs. 7, 10-11) in a table; with
    # the kernel's own normals (seeded key, stream STREAM_PROGRAM) the output must be
    # g + scale std(|g|) z with the std of the formulas to the documented accuracy (worst at
    # the read-noise clip, included here), in siemens and in units of g_max.
    from aimc_device._random import derive_key
    from aimc_device.pcm.devices import perturb_flat
    from aimc_device.pcm.formulas import read_noise_q, training_noise_std
    x_clip = (MODEL.read_noise_max / MODEL.read_noise_coeff) ** (1 / MODEL.read_noise_exponent)
    assert read_noise_q(0.99 * x_clip, MODEL) == pytest.approx(MODEL.read_noise_max)
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.uniform(-1, 1, 20_000) ** 3 * top, [0.0, 1e-9, -top],
                        np.linspace(0.9, 1.1, 2001) * x_clip])
    g = x * G_MAX / unit
    out = perturb_flat(g, MODEL, t=20.0, scale=0.7, rng=5, unit=unit)
    z = np.empty(g.size + 1)
    K.normals_block(derive_key(5), 0, g.size, z, np.uint64(K.STREAM_PROGRAM))
    std = np.hypot(*training_noise_std(g * unit, 20.0, MODEL)) / unit
    np.testing.assert_allclose((out - g) / z[:g.size], 0.7 * std, rtol=rtol)
