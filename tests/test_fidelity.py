"""Model-fidelity conventions: the differential pair of exact-zero weights, faults per physical
device, the torch sampler's faults and levels, the IR-drop scale, the S-shaped ADC's gain
calibration, unbounded and bounded quantisers, and programming without a device model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from aimc_device import pcm
from aimc_device.crossbar import AnalogArray, CrossbarConfig, EngineOptions
from aimc_device.crossbar import array as array_mod
from aimc_device.crossbar.state import export_state, import_state


def _opts(fast):
    """The engine options of the fast backend (where it applies) or of the torch reference."""
    return EngineOptions(backend="auto" if fast else "reference")

MODEL = pcm.PCMModel.preset("rasch2023")
G_MAX = MODEL.g_max
C0 = MODEL.prog_coeffs[0]  # sigma_P at a target of 0 S (Eq. 7) [S]


def _pruned(n=512, seed=100, frac=0.5):
    """w ~ Normal(0, 0.246) (out, in) with ``frac`` of the weights exactly 0."""
    g = np.random.default_rng(seed)
    w = g.normal(0.0, 0.246, (n, n))
    w[g.random(w.shape) < frac] = 0.0
    return w.astype(np.float32)


def _t_stat(v):
    v = np.asarray(v, dtype=np.float64)
    return v.mean() / (v.std(ddof=1) / np.sqrt(v.size))


# ------------------------------------------------------------------ 1. exact-zero weights
@pytest.mark.parametrize("pair_devices", ["active", "both"])
def test_pruned_matrix_has_no_mean_output_offset(pair_devices):
    # 50 %-pruned 512 x 512, inputs >= 0, ideal periphery, programming noise only. With the
    # zero weights on one device clipped at 0 S, every zero reads +|N(0, sigma_P(0))| and the
    # output offset is ~22 % of mean |y| (t ~ 50 over the columns); with both devices of a
    # zero-weight pair programmed the offset per column is zero-mean noise.
    w = _pruned()
    x = np.random.default_rng(1).uniform(0.0, 1.0, (256, w.shape[1])).astype(np.float32)
    arr = AnalogArray(w, CrossbarConfig.ideal(pair_devices=pair_devices), device=MODEL)
    arr.calibrate_input_range(x)
    arr.program(rng=0)
    y_ref = x.astype(np.float64) @ w.T.astype(np.float64)
    err = arr.mvm(x).astype(np.float64) - y_ref
    per_column = err.mean(axis=0)  # independent devices per column
    assert abs(_t_stat(per_column)) < 4.0
    assert abs(err.mean()) < 0.02 * np.abs(y_ref).mean()
    eps = np.linalg.norm(err, axis=1).mean() / np.linalg.norm(y_ref, axis=1).mean()
    assert eps < 0.11  # 20 % with the one-sided zeros, 9.1-9.3 % with zero-mean pairs


def _half_normal_diff(n, seed):
    """(max(c0 xi1, 0) - max(c0 xi2, 0)) / g_max: a zero weight programmed on both devices."""
    z = np.random.default_rng(seed).standard_normal((2, n))
    return (np.maximum(C0 * z[0], 0.0) - np.maximum(C0 * z[1], 0.0)) / G_MAX


@pytest.mark.parametrize("pair_devices", ["active", "both"])
def test_zero_weight_is_the_difference_of_two_programmed_devices(pair_devices):
    w = _pruned(n=256, seed=3)
    arr = AnalogArray(w, CrossbarConfig.ideal(pair_devices=pair_devices), device=MODEL)
    arr.program(rng=4)
    zero = w == 0
    got = arr.w_tiles[0].numpy()[zero].astype(np.float64)
    ref = _half_normal_diff(got.size, 5)
    assert stats.ks_2samp(got, ref).pvalue > 1e-3
    assert abs(_t_stat(got)) < 4.0
    assert np.mean(got == 0.0) == pytest.approx(0.25, abs=4 * np.sqrt(0.25 * 0.75 / got.size))
    # the devices sampled: every active device, and the other device of the zeros ("active")
    # or of every pair ("both")
    n_other = int(zero.sum()) if pair_devices == "active" else w.size
    assert arr._state.g_prog.size == w.size + n_other


def test_both_devices_shift_nonzero_weights_by_the_other_devices_mean():
    # A non-zero weight with its other device programmed toward 0 S reads
    # sign (g_active - max(c0 xi, 0)) / g_max: |w~| is lower by c0 / sqrt(2 pi) / g_max on
    # average. With only the active device modelled, the mean error of |w~| = 0.5 is zero.
    n = 128
    w = np.full((n, n), 0.5, dtype=np.float32)
    w[:, 0] = 1.0  # column scale 1: every other weight maps to w~ = 0.5
    w[::2] *= -1.0
    shift = -C0 / np.sqrt(2 * np.pi) / G_MAX
    for pair_devices, expected in (("active", 0.0), ("both", shift)):
        arr = AnalogArray(w, CrossbarConfig.ideal(pair_devices=pair_devices), device=MODEL)
        arr.program(rng=7)
        wt = arr.w_tiles[0].numpy()[:, 1:].astype(np.float64)
        mag_err = np.sign(w[:, 1:]) * wt - 0.5
        se = mag_err.std(ddof=1) / np.sqrt(mag_err.size)
        assert abs(mag_err.mean() - expected) < 4 * se, pair_devices
    assert abs(shift) > 10 * se  # the two conventions are told apart


def test_training_noise_and_evaluation_agree_for_zeros():
    # HWA training noise (pcm.perturb: Gaussian of sigma_P(0) and no read noise at 0 S) and the
    # programmed zero-weight pair are both symmetric about 0 (zero mean).
    n = 40_000
    train = pcm.perturb(np.zeros(n), MODEL, rng=8) / G_MAX
    assert abs(_t_stat(train)) < 4.0
    assert stats.ks_2samp(train, -train).pvalue > 1e-3
    assert train.std() == pytest.approx(C0 / G_MAX, rel=0.03)
    w = _pruned(n=256, seed=9, frac=0.6)
    arr = AnalogArray(w, CrossbarConfig.ideal(), device=MODEL).program(rng=10)
    ev = arr.w_tiles[0].numpy()[w == 0].astype(np.float64)
    assert abs(_t_stat(ev)) < 4.0
    assert stats.ks_2samp(ev, -ev).pvalue > 1e-3
    assert abs(train.mean() - ev.mean()) < 4 * np.hypot(train.std() / np.sqrt(n),
                                                         ev.std() / np.sqrt(ev.size))


@pytest.fixture(params=["numba", "torch"])
def sampler(request, monkeypatch):
    """Run the array on the Numba sampler (CPU) or on the torch sampler that GPU tensors take
    (forced here on CPU tensors)."""
    if request.param == "torch":
        monkeypatch.setattr(array_mod, "_numba_sampler", lambda t: False)
    return request.param


@pytest.mark.parametrize("pair_devices", ["active", "both"])
def test_pairs_survive_export_import_and_drift(sampler, pair_devices):
    w = _pruned(n=96, seed=11)
    cfg = CrossbarConfig(pair_devices=pair_devices)
    a = AnalogArray(w, cfg, device=MODEL).program(rng=12)
    b = import_state(AnalogArray(w, cfg, device=MODEL), export_state(a))
    assert isinstance(b._state.g_prog, torch.Tensor) == (sampler == "torch")
    torch.testing.assert_close(b.w_tiles[0], a.w_tiles[0], rtol=0, atol=0)
    if sampler == "numba":  # the torch sampler's draws come from torch.Generator
        for arr in (a, b):
            arr.drift(3600.0, rng=13)
        torch.testing.assert_close(b.w_tiles[0], a.w_tiles[0], rtol=0, atol=0)
        torch.testing.assert_close(b.comp, a.comp, rtol=0, atol=0)
    else:
        b.drift(3600.0, rng=13)
    # drifted zero weights keep a symmetric, zero-mean error (both devices drift and are read)
    zero = w == 0
    ev = b.w_tiles[0].numpy()[zero].astype(np.float64)
    assert abs(_t_stat(ev)) < 4.0 and np.mean(ev != 0) > 0.5


def test_state_saved_without_partners_still_loads():
    # A state written when only the active devices were modelled: (out, in) arrays, no
    # "partners"; it loads and drifts as active devices only.
    g = np.random.default_rng(14)
    w = g.normal(0.0, 0.246, (32, 48)).astype(np.float32)  # no exact zeros
    a = AnalogArray(w, device=MODEL).program(rng=15)
    state = export_state(a)
    assert "partners" not in state
    state = {k: (v.reshape(w.shape) if k in ("g_prog", "nu", "q_read") else v)
             for k, v in state.items()}
    b = import_state(AnalogArray(w, device=MODEL), state)
    for arr in (a, b):
        arr.drift(86400.0, rng=16)
    torch.testing.assert_close(b.w_tiles[0], a.w_tiles[0], rtol=0, atol=0)


def test_breakdown_keeps_the_mapping_conventions():
    from aimc_device.crossbar import nonideality_configs

    cfg = CrossbarConfig(pair_devices="both", columnwise_scaling=False, s_adc=True)
    for name, c in nonideality_configs(cfg).items():
        assert (c.pair_devices, c.columnwise_scaling) == ("both", False), name


# ------------------------------------------------------------ 2. faults per physical device
def test_fault_draws_per_device_fractions_values_and_seeding():
    import numba

    m = MODEL.replace(stuck_at_zero=0.05, stuck_at_gmax=0.03, stuck_at_random=0.07)
    n = 200_000
    stuck, g = pcm.draw_faults(n, m, rng=20)
    at_max, at_zero = stuck & (g == G_MAX), stuck & (g == 0.0)
    rand = stuck & ~at_max & ~at_zero
    for k, p in ((int(stuck.sum()), 0.15), (int(at_zero.sum()), 0.05),
                 (int(at_max.sum()), 0.03), (int(rand.sum()), 0.07)):
        assert stats.binomtest(k, n, p).pvalue > 1e-3
    assert stats.kstest(g[rand] / G_MAX, "uniform").pvalue > 1e-3
    assert np.all(g[~stuck] == 0.0)
    # device i's fault depends on (seed, i) only: any n, any thread count
    s_small, g_small = pcm.draw_faults(1000, m, rng=20)
    np.testing.assert_array_equal(s_small, stuck[:1000])
    np.testing.assert_array_equal(g_small, g[:1000])
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        s1, g1 = pcm.draw_faults(n, m, rng=20)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(s1, stuck)
    np.testing.assert_array_equal(g1, g)
    assert pcm.draw_faults(n, MODEL, rng=20) is None  # no faults in the model


@pytest.mark.parametrize("pair_devices", ["active", "both"])
def test_a_stuck_device_of_either_side_moves_the_weight(pair_devices):
    # Positive weights w~ = 0.05 with stuck_at_gmax = 0.1 per device: the other device stuck
    # at g_max (and the active one not) reads w~ ~ 0.05 - 1 (probability 0.1 x 0.9), the
    # active one stuck alone reads ~1 (0.09), both stuck ~0 (0.01).
    f = 0.1
    w = np.full((256, 256), 0.05, dtype=np.float32)
    w[:, 0] = 1.0  # column scale 1
    m = MODEL.replace(stuck_at_gmax=f)
    arr = AnalogArray(w, CrossbarConfig.ideal(pair_devices=pair_devices), device=m)
    wt = arr.program(rng=21).w_tiles[0].numpy()[:, 1:]
    n = wt.size
    flipped = int((wt < -0.8).sum())
    full = int((wt > 0.8).sum())
    both = int((wt == 0.0).sum())  # g_max - g_max
    assert stats.binomtest(flipped, n, f * (1 - f)).pvalue > 1e-3
    assert stats.binomtest(full, n, f * (1 - f)).pvalue > 1e-3
    assert stats.binomtest(both, n, f * f).pvalue > 1e-3
    assert np.all(np.abs(wt[wt < -0.8] + 0.95) < 0.1)  # 0.05 + its noise - 1
    # a stuck device neither drifts nor shows read noise: a day later a flipped weight has
    # moved by its active device's drift only (at most its 0.05), not by the stuck one's
    # (about 0.5 at this time)
    kept = arr.drift(86400.0, rng=22).w_tiles[0].numpy()[:, 1:]
    moved = np.abs(kept - wt)[wt < -0.8]
    assert np.mean(moved < 0.06) > 0.99


def test_array_faults_do_not_depend_on_thread_count():
    import numba

    w = _pruned(n=128, seed=23)
    m = MODEL.replace(stuck_at_zero=0.02, stuck_at_gmax=0.02, stuck_at_random=0.02)
    before = numba.get_num_threads()
    got = []
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            got.append(AnalogArray(w, device=m).program(rng=24).w_tiles[0].clone())
    finally:
        numba.set_num_threads(before)
    torch.testing.assert_close(got[0], got[-1], rtol=0, atol=0)


# ------------------------------------------------ 3. the torch sampler: faults and many levels
FAULTY = MODEL.replace(stuck_at_zero=0.03, stuck_at_gmax=0.02, stuck_at_random=0.05)
TORCH_LEVELS = np.array([0.0, 0.02, 0.1, 0.25, 0.5, 0.75, 1.0]) * G_MAX


def test_torch_sampler_applies_the_fault_model():
    from aimc_device.pcm.torch_ops import program_torch, read_torch

    m = MODEL.replace(stuck_at_zero=0.1)
    n = 100_000
    g = torch.full((n,), 0.5 * G_MAX, dtype=torch.float64)
    st = program_torch(g, m, generator=30)
    k = int((st.g_prog == 0).sum())  # programming noise alone never reaches 0 S at 0.5 g_max
    assert stats.binomtest(k, n, 0.1).pvalue > 1e-3
    st = program_torch(g, FAULTY, generator=31)
    stuck = st.stuck.numpy()
    for mask, p in ((stuck, 0.10), (stuck & (st.g_prog.numpy() == G_MAX), 0.02),
                    (stuck & (st.g_prog.numpy() == 0.0), 0.03)):
        assert stats.binomtest(int(mask.sum()), n, p).pvalue > 1e-3
    rand = stuck & (st.g_prog.numpy() > 0) & (st.g_prog.numpy() < G_MAX)
    assert stats.kstest(st.g_prog.numpy()[rand] / G_MAX, "uniform").pvalue > 1e-3
    assert np.all(st.nu.numpy()[stuck] == 0.0)
    g_year = read_torch(st, 3.15e7, FAULTY, generator=32)
    torch.testing.assert_close(g_year[st.stuck], st.g_prog[st.stuck], rtol=0, atol=0)
    assert float((g_year[~st.stuck] < 0.4 * G_MAX).float().mean()) > 0.9  # healthy ones drift


@pytest.mark.parametrize("t", [20.0, 3.15e7])
def test_torch_sampler_matches_numba_per_level(t):
    # Programmed and read conductances per target level, with faults, from both samplers: the
    # same distribution (two-sample KS per level).
    from aimc_device.pcm.torch_ops import program_torch, read_torch

    n = 12_000
    g = np.repeat(TORCH_LEVELS, n)
    s_nb = pcm.program(g, FAULTY, rng=33)
    r_nb = pcm.read(s_nb, t, FAULTY, rng=34)
    st = program_torch(torch.from_numpy(g), FAULTY, generator=35)
    r_t = read_torch(st, t, FAULTY, generator=36).numpy()
    for k, level in enumerate(TORCH_LEVELS):
        sl = slice(k * n, (k + 1) * n)
        for a, b in ((s_nb.g_prog, st.g_prog.numpy()), (s_nb.nu, st.nu.numpy()), (r_nb, r_t)):
            assert stats.ks_2samp(a[sl], b[sl]).pvalue > 1e-4, (level / G_MAX, t)
        assert stats.binomtest(int(st.stuck.numpy()[sl].sum()), n, 0.10).pvalue > 1e-3


def test_array_on_the_torch_sampler_has_the_faults_of_the_numba_one(monkeypatch):
    # Faults are drawn per physical device by pcm.draw_faults for either sampler: the same
    # devices are stuck, whatever the device holding the array.
    w = _pruned(n=128, seed=37)
    a = AnalogArray(w, device=FAULTY).program(rng=38)
    monkeypatch.setattr(array_mod, "_numba_sampler", lambda t: False)
    b = AnalogArray(w, device=FAULTY).program(rng=38)
    assert isinstance(b._state.g_prog, torch.Tensor)
    np.testing.assert_array_equal(b._state.stuck.numpy(), a._state.stuck)
    torch.testing.assert_close(b._partners, a._partners, rtol=0, atol=0)
    stuck = torch.from_numpy(a._state.stuck)
    torch.testing.assert_close(b._state.g_prog[stuck], torch.from_numpy(a._state.g_prog)[stuck],
                               rtol=0, atol=0)
    b.drift(3600.0, rng=39)
    b2 = import_state(AnalogArray(w, device=FAULTY), export_state(b))
    assert isinstance(b2._state.g_prog, torch.Tensor)
    torch.testing.assert_close(b2.w_tiles[0], b.w_tiles[0], rtol=0, atol=0)
    torch.testing.assert_close(b2._state.stuck, b._state.stuck, rtol=0, atol=0)


# ------------------------------------------------------------------------ 4. IR-drop scale
def _ir_reference(x, w, r_scale, g_ir=1.75e-6):
    """Eqs. 15-18 in numpy with the wire resistance scaled: g_ir -> r_scale g_ir."""
    n = w.shape[1]
    p = 1.0 - (1.0 - np.arange(n) / n) ** 2
    a = (r_scale * g_ir) * n * (np.abs(x) @ np.abs(w).T)
    c = 0.05 * a ** 3 - 0.2 * a ** 2 + 0.5 * a
    return -c * ((x * p) @ w.T)


@pytest.mark.parametrize("s", [1.0, 10.0, 37.0])
def test_ir_drop_scale_is_the_wire_resistance(s):
    from aimc_device.crossbar import analog_mvm, periphery

    g = np.random.default_rng(40)
    w = g.uniform(-1, 1, (48, 300))
    x = g.uniform(-1, 1, (64, 300))
    wt, xt = torch.from_numpy(w), torch.from_numpy(x)
    ref = _ir_reference(x, w, s)
    torch.testing.assert_close(periphery.ir_drop(xt, wt, s, 1.75e-6), torch.from_numpy(ref),
                               rtol=1e-12, atol=1e-15)
    # not a linear scale of the term: at s = 10 the term is ~15 % below 10 x the standard one
    if s == 10.0:
        ratio = np.linalg.norm(ref) / (s * np.linalg.norm(_ir_reference(x, w, 1.0)))
        assert 0.75 < ratio < 0.9
    # the whole MVM (fused Numba stage and torch path) with ir_drop = s equals ir_drop = 1 with
    # the wire resistance s r_wire, and equals W~ x~ + dy of the reference
    cfg = CrossbarConfig.ideal(ir_drop=s)
    same = CrossbarConfig.ideal(ir_drop=1.0, ir_drop_g=s * 1.75e-6)
    one, scale = torch.ones(1, dtype=torch.float64), torch.ones((1, 48), dtype=torch.float64)
    for fused in (True, False):
        y = analog_mvm(xt, [wt], cfg, one, scale, options=_opts(fused))
        torch.testing.assert_close(y, analog_mvm(xt, [wt], same, one, scale, options=_opts(fused)))
        torch.testing.assert_close(y, torch.from_numpy(x @ w.T + ref), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------- 5. S-shaped ADC gain calibration
@pytest.mark.parametrize("calibration", ["column", "tile", "none"])
def test_s_adc_columns_follow_their_transfer(calibration):
    # Ideal periphery but the S-shaped ADC, sigma_zeta = 0.3: zeta_i ~ mu (1 + 0.3 xi) per
    # column, and column i's output is f_i(z) = g_i z / (1 + zeta_i |z| / b) of its exact
    # value z with g_i = 1 + zeta_i ("column"), 1 + mu ("tile") or 1 ("none").
    mu, sz, b = 0.25, 0.3, 10.0
    g = np.random.default_rng(41)
    w = g.normal(0.0, 0.246, (2000, 64))
    x = g.uniform(-1.0, 1.0, (32, 64))
    cfg = CrossbarConfig.ideal(s_adc=True, mu_zeta=mu, sigma_zeta=sz, out_bound=b,
                               s_adc_gain=calibration)
    arr = AnalogArray(w, cfg, device=None).program(rng=42)
    zeta = arr.zeta[0].numpy()
    assert stats.kstest(zeta, "norm", args=(mu, mu * sz)).pvalue > 1e-3
    gamma = arr.gamma[0].numpy()
    z = x @ (w / gamma[:, None]).T  # exact normalised outputs, alpha = 1
    gain = {"column": 1.0 + zeta, "tile": 1.0 + mu, "none": 1.0}[calibration]
    expect = gain * z / (1.0 + zeta * np.abs(z) / b) * gamma
    np.testing.assert_allclose(arr.mvm(x), expect, rtol=1e-9, atol=1e-12)
    f_b = gain * b / (1.0 + zeta)  # each column's output at the bound
    spread = np.std(f_b / b)
    if calibration == "column":
        assert spread < 1e-12
    else:  # the column-to-column spread stays in the output
        assert spread == pytest.approx(np.std((1.0 + mu if calibration == "tile" else 1.0)
                                              / (1.0 + zeta)), rel=1e-12)
        assert spread > 0.02


def test_tile_gain_keeps_the_spread_that_column_gain_calibrates_away():
    from aimc_device.crossbar import mvm_error, nonideality_configs

    def eps(sigma, gain):
        cfg = CrossbarConfig(s_adc=True, sigma_zeta=sigma, s_adc_gain=gain)
        return mvm_error(nonideality_configs(cfg)["S-shaped ADC"], device=None, rng=2,
                         n_inputs=100)

    assert eps(0.0, "tile") == eps(0.0, "column")  # zeta_i = mu: the same gain
    # S-ADC with its bound (no bits) alone, 1000 inputs, seeds 0-2: tile 12.8-13.6 %, column
    # 12.0-12.6 %; here 1.0 point apart
    assert eps(0.5, "tile") > eps(0.5, "column") + 0.005


# ------------------------------------------- 6. converters without bits keep their bound
def test_converter_without_bits_clips_at_a_finite_bound():
    from aimc_device.crossbar import periphery

    z = torch.linspace(-5.0, 5.0, 101, dtype=torch.float64, requires_grad=True)
    q = periphery.quantize(z, None, 2.0)
    torch.testing.assert_close(q, z.detach().clamp(-2.0, 2.0))
    (g,) = torch.autograd.grad(q.sum(), z)
    torch.testing.assert_close(g, (z.detach().abs() <= 2.0).double())  # straight-through
    assert periphery.quantize(z, None, float("inf")) is z  # unbounded: no clipping
    with pytest.raises(ValueError, match="inp_bound"):
        CrossbarConfig(inp_bits=8, inp_bound=float("inf"))
    with pytest.raises(ValueError, match="out_bound"):
        CrossbarConfig(s_adc=True, out_bits=None, out_bound=float("inf"))
    ideal = CrossbarConfig.ideal()
    assert ideal.inp_bound == ideal.out_bound == float("inf")


@pytest.mark.parametrize("fused", [True, False])
def test_mvm_without_bits_clips_inputs_and_outputs(fused):
    from aimc_device.crossbar import analog_mvm

    g = np.random.default_rng(43)
    w = g.uniform(-1, 1, (24, 40))
    x = g.uniform(-2, 2, (50, 40))
    cfg = CrossbarConfig.ideal(inp_bound=0.5, out_bound=3.0)
    alpha, scale = 1.5, g.uniform(0.5, 2.0, 24)
    y = analog_mvm(torch.from_numpy(x), [torch.from_numpy(w)], cfg,
                   torch.tensor([alpha], dtype=torch.float64),
                   torch.from_numpy(scale)[None], options=_opts(fused))
    z = np.clip(x / alpha, -0.5, 0.5) @ w.T
    assert 0.05 < np.mean(np.abs(z) > 3.0) < 0.9  # the output bound matters here
    np.testing.assert_allclose(y.numpy(), np.clip(z, -3.0, 3.0) * alpha * scale, rtol=1e-12,
                               atol=1e-12)
