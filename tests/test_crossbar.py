"""Tests of aimc_device.crossbar: config, mapping, periphery, MVM, array, MVM error."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from aimc_device.crossbar import (
    AnalogArray,
    CrossbarConfig,
    EngineOptions,
    analog_mvm,
    map_weights,
    mvm_error,
    mvm_error_breakdown,
    nonideality_configs,
    periphery,
    split_sizes,
)
from aimc_device.crossbar.metric import standard_test_case

F = torch.nn.functional.linear


def _opts(fast):
    """The engine options of the fast backend (where it applies) or of the torch reference."""
    return EngineOptions(backend="auto" if fast else "reference")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _case(out=40, inp=1100, batch=64, seed=0, dtype=torch.float64):
    g = _gen(seed)
    w = torch.randn(out, inp, generator=g, dtype=dtype) * 0.246
    x = torch.rand(batch, inp, generator=g, dtype=dtype) * 2 - 1
    return w, x


def _q(z, bits, bound):
    """Eq. 5 written out: 2^q - 1 levels of width 2 b / (2^q - 2), clipped to [-b, b]; without
    bits only the clip."""
    if not bits:
        return torch.clamp(z, -bound, bound)
    step = 2.0 * bound / (2 ** bits - 2)
    return torch.clamp(torch.round(z / step) * step, -bound, bound)


def _ir_term(xt, w, scale, g_ir):
    """IR drop of one tile written out (Eqs. 15-18): -c(a) sum_j w~_ij x~_j P_j."""
    n = w.shape[1]
    p = 1.0 - (1.0 - torch.arange(n, dtype=w.dtype) / n) ** 2
    a = scale * g_ir * n * (xt.abs() @ w.abs().T)
    return -(0.05 * a ** 3 - 0.2 * a ** 2 + 0.5 * a) * ((xt * p) @ w.T)


def _plain_mvm(arr, x):
    """The output of an AnalogArray without per-MVM noise, written out plainly from Eqs. 1, 2, 5,
    15-19 and the documented options (noise and bound management, read asymmetry, S-shaped ADC),
    from the array's own weights, ranges, digital factors and draws: an independent reference
    of analog_mvm."""
    cfg = arr.cfg
    y = 0.0
    for k, (w, sl) in enumerate(zip(arr.w_tiles, arr.slices)):
        xk = x[:, sl]
        if cfg.noise_management == "abs_max":
            a = xk.abs().amax(dim=1, keepdim=True)
        else:
            a = arr.alpha[k] * torch.ones(len(x), 1, dtype=x.dtype)
        iters = cfg.bound_management_iters if cfg.bound_management == "iterative" else 0
        for it in range(iters + 1):
            xt = _q(xk / a, cfg.inp_bits, cfg.inp_bound)
            z = xt @ w.T
            if cfg.ir_drop * cfg.ir_drop_g > 0:
                z = z + _ir_term(xt, w, cfg.ir_drop, cfg.ir_drop_g)
            if arr.asymmetry is not None:  # negative inputs read w~ (1 + a_ij)
                z = z - (-xt).clamp(min=0) @ (w * arr.asymmetry[k]).T
            if cfg.s_adc:  # f(z) = (1 + zeta) z / (1 + zeta |z| / b), f(+-b) = +-b
                zeta = arr.zeta[k]
                z = (1 + zeta) * z / (1 + zeta * z.abs() / cfg.out_bound)
            sat = (z.abs() >= cfg.out_bound).any(dim=1, keepdim=True)
            if it == iters or not bool(sat.any()):
                break
            a = torch.where(sat, 2 * a, a)  # bound management: halve the inputs, repeat
        y = y + a * arr.out_scale[k] * _q(z, cfg.out_bits, cfg.out_bound)
    return y


# ---------------------------------------------------------------------------------- config
class TestConfig:
    def test_defaults_are_the_standard_model(self):
        c = CrossbarConfig()
        assert (c.max_rows, c.inp_bits, c.inp_bound, c.out_bits, c.out_bound) == (512, 8, 1.0, 8,
                                                                                  10.0)
        assert (c.out_noise, c.w_noise, c.ir_drop, c.ir_drop_g) == (0.04, 0.0175, 1.0, 1.75e-6)
        assert c.drift_compensation == "global" and not c.s_adc and c.g_max == 25e-6
        assert set(CrossbarConfig.CITATIONS) <= {f for f in c.to_dict()}

    def test_ideal_and_replace(self):
        i = CrossbarConfig.ideal()
        assert i.inp_bits is None and i.out_bits is None and i.out_noise == 0 and i.ir_drop == 0
        assert CrossbarConfig(out_bits=0).out_bits is None
        assert CrossbarConfig().replace(out_noise=0.1).out_noise == 0.1
        with pytest.raises(ValueError, match="no field 'nope'"):
            CrossbarConfig().replace(nope=1)

    def test_json_and_hdf5_round_trip(self, tmp_path):
        c = CrossbarConfig(out_bits=None, out_bound=math.inf, drift_compensation="column",
                           asymmetry=0.02)
        assert CrossbarConfig.from_json(c.to_json()) == c
        for name in ("c.json", "c.h5"):
            c.save(tmp_path / name)
            assert CrossbarConfig.load(tmp_path / name) == c
        d = CrossbarConfig().replace(drift_compensation=None)
        d.save(tmp_path / "d.h5")
        assert CrossbarConfig.load(tmp_path / "d.h5") == d

    @pytest.mark.parametrize("field,value", [
        ("out_noise", -0.1), ("inp_bits", 1), ("max_rows", 0), ("out_bound", 0.0),
        ("drift_compensation", "sometimes"), ("noise_management", "max"),
        ("bound_management", "x"), ("w_noise", float("nan")), ("g_max", -1.0),
    ])
    def test_bad_field_is_named(self, field, value):
        with pytest.raises(ValueError, match=f"CrossbarConfig.{field}"):
            CrossbarConfig(**{field: value})

    def test_unknown_key_in_dict(self):
        with pytest.raises(ValueError, match="unknown field"):
            CrossbarConfig.from_dict({"out_noisee": 0.1})


# ---------------------------------------------------------------------------------- mapping
def test_split_sizes_near_equal():
    assert split_sizes(1100, 512) == [367, 367, 366]
    assert split_sizes(512, 512) == [512]
    assert split_sizes(513, 512) == [257, 256]
    for n in (1, 77, 1024, 1537):
        s = split_sizes(n, 512)
        assert sum(s) == n and max(s) <= 512 and max(s) - min(s) <= 1
    with pytest.raises(ValueError, match="n = 0"):
        split_sizes(0, 512)


def test_map_weights_columnwise():
    w, _ = _case(out=8, inp=30)
    w[3] = 0.0
    tiles, gamma = map_weights(w, [15, 15])
    assert gamma.shape == (2, 8) and len(tiles) == 2
    for k, t in enumerate(tiles):
        assert t.abs().max() <= 1.0
        torch.testing.assert_close(t * gamma[k][:, None], w[:, 15 * k:15 * (k + 1)])
        assert torch.all(t.abs().amax(dim=1)[torch.arange(8) != 3] == 1.0)
    assert torch.all(tiles[0][3] == 0)


# ---------------------------------------------------------------------------------- quantiser
@pytest.mark.parametrize("bits,bound", [(8, 1.0), (4, 10.0), (3, 2.0)])
def test_quantizer_levels_clip_and_ste(bits, bound):
    z = torch.linspace(-2 * bound, 2 * bound, 20001, dtype=torch.float64, requires_grad=True)
    q = periphery.quantize(z, bits, bound)
    levels = torch.unique(q.detach())
    assert len(levels) == 2 ** bits - 1
    assert levels.min() == -bound and levels.max() == bound
    step = periphery.quantizer_step(bits, bound)
    torch.testing.assert_close(torch.diff(levels), torch.full_like(levels[1:], step))
    assert (q.detach() - z.detach()).abs()[z.detach().abs() <= bound].max() <= step / 2 + 1e-12
    q.sum().backward()
    inside = z.detach().abs() <= bound
    assert torch.all(z.grad[inside] == 1.0) and torch.all(z.grad[~inside] == 0.0)
    # no bits: unlimited resolution, the bound still clips
    torch.testing.assert_close(periphery.quantize(z.detach(), None, bound),
                               z.detach().clamp(-bound, bound))


# ---------------------------------------------------------------------------------- MVM
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("shape", [(40, 1100), (600, 1030), (7, 512)])
def test_ideal_reproduces_exact_product(shape, fused):
    w, x = _case(*shape)
    bias = torch.linspace(-1, 1, shape[0], dtype=w.dtype)
    arr = AnalogArray(w, CrossbarConfig.ideal(), device=None, bias=bias)
    assert arr.n_tiles == math.ceil(shape[1] / 512)
    y = analog_mvm(x, arr.w_tiles, arr.cfg, arr.alpha, arr.out_scale, options=_opts(fused)) + bias
    torch.testing.assert_close(y, x @ w.T + bias, rtol=1e-10, atol=1e-10)
    # numpy in -> numpy out, after programming ideal devices and drifting them
    arr.program(rng=0).drift(3600.0, rng=1)
    yn = arr.mvm(x.numpy())
    assert isinstance(yn, np.ndarray)
    np.testing.assert_allclose(yn, (x @ w.T + bias).numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(arr.mvm(x[0].numpy()), yn[0], rtol=1e-12, atol=1e-12)


def test_fused_path_matches_torch_path():
    w, x = _case(out=64, inp=700, batch=128, dtype=torch.float32)
    tiles, gamma = map_weights(w, split_sizes(700, 512))
    alpha = torch.ones(2)
    for cfg in (CrossbarConfig(out_noise=0.0, w_noise=0.0), CrossbarConfig(out_noise=0.0,
                w_noise=0.0, noise_management="abs_max")):
        a = analog_mvm(x, tiles, cfg, alpha, gamma, options=_opts(True))
        b = analog_mvm(x, tiles, cfg, alpha, gamma, options=_opts(False))
        # rounding may flip an ADC level on a handful of outputs, never more than one level
        step = periphery.quantizer_step(8, 10.0) * gamma.max() * 1.001
        diff = (a - b).abs()
        assert diff.max() <= 2 * step and (diff > 1e-4).float().mean() < 0.01
    # with noise: same distribution of the error
    cfg = CrossbarConfig(ir_drop=0.0, out_bits=None, out_bound=math.inf)
    ideal = analog_mvm(x, tiles, CrossbarConfig.ideal(), alpha, gamma)
    ea = (analog_mvm(x, tiles, cfg, alpha, gamma, generator=_gen(1), options=_opts(True)) - ideal)
    eb = (analog_mvm(x, tiles, cfg, alpha, gamma, generator=_gen(1), options=_opts(False)) - ideal)
    assert abs(ea.std() / eb.std() - 1) < 0.03 and abs(ea.mean()) < 0.01


@pytest.mark.parametrize("fused", [True, False])
def test_output_stage_equals_the_periphery_reference(fused):
    # The fused Numba stage and the torch path against one tile composed from the reference
    # functions of crossbar.periphery (Eqs. 2, 5, 14-18): equal with the noise off, the same
    # distribution of the noise when on.
    w, x = _case(out=48, inp=300, batch=40)
    w = w / w.abs().amax(dim=1, keepdim=True)
    alpha = torch.tensor([0.8], dtype=torch.float64)
    scale = torch.rand(1, 48, generator=_gen(4), dtype=torch.float64) + 0.5

    def reference(x, cfg, gen=None):
        xt = periphery.quantize(x / alpha, cfg.inp_bits, cfg.inp_bound)  # DAC
        z = F(xt, w) + periphery.ir_drop(xt, w, cfg.ir_drop, cfg.ir_drop_g)
        if gen is not None:
            z = periphery.output_noise(z + periphery.short_term_noise(xt, w, cfg.w_noise, gen),
                                       cfg.out_noise, gen)
        return alpha * scale[0] * periphery.quantize(z, cfg.out_bits, cfg.out_bound)  # ADC

    cfg = CrossbarConfig(out_bound=20.0, out_noise=0.0, w_noise=0.0, ir_drop=3.0)
    y = analog_mvm(x, [w], cfg, alpha, scale, options=_opts(fused))
    ref = reference(x, cfg)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    no_ir = reference(x, cfg.replace(ir_drop=0.0))
    assert float((ref - no_ir).abs().max()) > 1e-2 * float(ref.abs().max())  # IR drop counts
    # the noise in float32 (ADC off): 5000 MVMs of one input vector
    w, alpha, scale, x = w.float(), alpha.float(), scale.float(), x.float()
    noisy = cfg.replace(ir_drop=0.0, out_bits=None, out_bound=math.inf, out_noise=0.04,
                        w_noise=0.05)
    clean = reference(x[:1], noisy)
    xr = x[:1].expand(5000, -1)
    err = (analog_mvm(xr, [w], noisy, alpha, scale, generator=_gen(5), options=_opts(fused))
           - clean) / (alpha * scale[0])
    ref_err = (reference(xr, noisy, _gen(6)) - clean) / (alpha * scale[0])
    assert stats.ks_2samp(err.ravel().numpy(), ref_err.ravel().numpy()).pvalue > 1e-3
    # per output: the variance of both (5000 draws: +-2 % each) and their means (0)
    ratio = err.var(dim=0) / ref_err.var(dim=0)
    assert float(ratio.mean()) == pytest.approx(1.0, abs=0.015)
    assert float(ratio.min()) > 0.88 and float(ratio.max()) < 1.13
    assert float(err.mean(dim=0).abs().max()) < 5 * float(ref_err.std()) / math.sqrt(5000)


@pytest.mark.parametrize("fused", [True, False])
def test_output_noise_has_its_std_on_zero_input(fused):
    cfg = CrossbarConfig.ideal(out_noise=0.04, w_noise=0.0175)  # w_noise: nothing on x = 0
    w = torch.randn(256, 128, generator=_gen(0))
    x = torch.zeros(400, 128)
    y = analog_mvm(x, [w.clamp(-1, 1)], cfg, torch.ones(1), torch.ones(1, 256),
                   generator=_gen(3), options=_opts(fused))
    assert abs(float(y.std()) / 0.04 - 1) < 0.02 and abs(float(y.mean())) < 0.001


@pytest.mark.parametrize("fused", [True, False])
def test_short_term_noise_std_follows_eq14(fused):
    cfg = CrossbarConfig.ideal(w_noise=0.0175)
    tiles, _ = map_weights(torch.randn(64, 256, generator=_gen(0)), [256])
    x = torch.rand(1, 256, generator=_gen(1)).expand(4000, 256).contiguous()
    y = analog_mvm(x, tiles, cfg, torch.ones(1), torch.ones(1, 64), generator=_gen(2),
                   options=_opts(fused))
    want = 0.0175 * torch.sqrt(F(x[:1] ** 2, tiles[0].abs()))[0]  # Eq. 14
    ratio = y.std(dim=0) / want
    assert abs(float(ratio.mean()) - 1) < 0.02
    torch.testing.assert_close(y.mean(dim=0), F(x[:1], tiles[0])[0], atol=5e-3, rtol=0)


def test_ir_drop_lowers_far_rows_more():
    cfg = CrossbarConfig.ideal(ir_drop=1.0)
    n = 512
    w = torch.full((4, n), 0.8, dtype=torch.float64)
    near = torch.zeros(1, n, dtype=torch.float64)
    far = near.clone()
    near[0, :128] = 1.0
    far[0, -128:] = 1.0
    one = (torch.ones(1, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64))
    for fused in (True, False):
        y_near = analog_mvm(near, [w], cfg, *one, options=_opts(fused))
        y_far = analog_mvm(far, [w], cfg, *one, options=_opts(fused))
        exact = 0.8 * 128
        d_near, d_far = exact - y_near[0, 0].item(), exact - y_far[0, 0].item()
        assert 0 <= d_near < d_far
        # size: a = g_ir n sum|w||x|, dy = -c(a) sum w x P (Eqs. 15-18)
        a = 1.75e-6 * n * exact
        c = 0.05 * a ** 3 - 0.2 * a ** 2 + 0.5 * a
        p = periphery.ir_drop_profile(n, torch.float64)
        assert d_far == pytest.approx(c * 0.8 * float(p[-128:].sum()), rel=1e-6)
        assert d_near == pytest.approx(c * 0.8 * float(p[:128].sum()), rel=1e-6)
    # float32 with the auxiliary GEMMs in bfloat16: the IR-drop term within 1 %
    w32, far32 = w.float(), far.float()
    one32 = (torch.ones(1), torch.ones(1, 4))
    d32 = 0.8 * 128 - analog_mvm(far32, [w32], cfg, *one32)[0, 0].item()
    assert d32 == pytest.approx(d_far, rel=0.01)


def _eps(y, y_ref):
    """Eq. 20: mean_k ||y_k - y~_k|| / mean_k ||y_k||."""
    return float((y - y_ref).norm(dim=1).mean() / y_ref.norm(dim=1).mean())


def test_each_nonideality_alone_matches_its_closed_form():
    # eps_M of each nonideality alone on the standard test case (Eq. 20, 100 inputs), against
    # the array's output written out from the equations (deterministic terms) or the expected
    # norm of the Gaussian error (noise terms: E||e|| = sqrt(sum_i var_i) to < 0.1 % for 512
    # outputs; over 100 inputs the mean norm scatters by ~0.3 %).
    cfgs = nonideality_configs(CrossbarConfig(s_adc=True, asymmetry=0.05))
    assert set(cfgs) == {"DAC", "ADC", "output noise", "short-term noise", "IR drop",
                         "S-shaped ADC", "read asymmetry"}
    assert mvm_error(CrossbarConfig.ideal(), n_inputs=100) < 1e-6
    w, x = standard_test_case(np.random.default_rng(0), 100)  # mvm_error's draws for rng=0
    w, x = torch.from_numpy(w), torch.from_numpy(x)
    y_ref = x @ w.T
    gamma = w.abs().amax(dim=1)
    wt = w / gamma[:, None]
    alpha = x.abs().max()  # calibrate_input_range: the abs-max of the inputs
    xs = x / alpha
    for name, cfg in cfgs.items():
        eps = mvm_error(cfg, n_inputs=100)
        if name in ("output noise", "short-term noise"):
            var = (cfg.w_noise ** 2 * (xs ** 2 @ wt.abs().T) + cfg.out_noise ** 2) * (
                alpha * gamma) ** 2  # Eqs. 2, 14
            want = float(var.sum(dim=1).sqrt().mean() / y_ref.norm(dim=1).mean())
            assert eps == pytest.approx(want, rel=0.015), name
            continue
        if name in ("S-shaped ADC", "read asymmetry"):  # draws of the array: its own state
            gen = np.random.default_rng(0)
            standard_test_case(gen, 100)
            arr = AnalogArray(w.numpy().astype(np.float32), cfg, device=None)
            arr.calibrate_input_range(x.numpy())
            arr.program(rng=gen)
            y = _plain_mvm(arr, x.float()).double()
        else:  # DAC, ADC, IR drop: deterministic
            z = _q(xs, cfg.inp_bits, cfg.inp_bound) @ wt.T
            if name == "IR drop":
                z = z + _ir_term(xs, wt, cfg.ir_drop, cfg.ir_drop_g)
            y = alpha * gamma * _q(z, cfg.out_bits, cfg.out_bound)
        # float32 arrays; the IR-drop products run in bfloat16 (EngineOptions.aux_bfloat16)
        assert eps == pytest.approx(_eps(y, y_ref), rel=0.01 if name == "IR drop" else 1e-3), name


def test_gradients_flow_with_straight_through():
    # The standard model (noise, IR drop, DAC, ADC of 8 bits, here with a bound of 20 so that
    # no output comes near it): the noise, IR-drop and ADC terms enter as constants (no
    # gradient through them, the ADC's straight-through mask is 1 everywhere). So the gradients
    # to the inputs and weights are those of the model with the DAC alone (the same mask);
    # y is linear in the output scales s_k, whose gradient is alpha_k sum_b Q(z_k); and
    # alpha's gradient differs from the DAC-only one by the change of sum_b s_k Q(z_k) alone
    # (each tile's part y_k from a run with the other tile's scales at 0: the same noise
    # draws, which depend on the generator alone).
    w, x = _case(out=16, inp=600, batch=8, dtype=torch.float32)
    x = x * 1.2  # some inputs beyond alpha = 1: the DAC's mask matters
    tiles, gamma = map_weights(w, split_sizes(600, 512))
    std = CrossbarConfig(out_bound=20.0)

    def run(cfg, scale):
        leaves = [x.clone().requires_grad_(), torch.ones(2, requires_grad=True),
                  scale.clone().requires_grad_(), *[t.clone().requires_grad_() for t in tiles]]
        y = analog_mvm(leaves[0], leaves[3:], cfg, leaves[1], leaves[2], generator=_gen(0))
        return y.detach(), torch.autograd.grad(y.sum(), leaves)

    with torch.no_grad():
        z = torch.cat([F(x[:, sl].clamp(-1, 1), t)
                       for sl, t in zip((slice(0, 300), slice(300, 600)), tiles)])
    assert float(z.abs().max()) < 15.0  # far from the ADC bound: its mask is 1 everywhere
    one_tile = [gamma * torch.tensor([[1.0], [0.0]]), gamma * torch.tensor([[0.0], [1.0]])]
    grads = {}
    for name, cfg in (("noisy", std), ("clean", CrossbarConfig.ideal(inp_bits=8, inp_bound=1.0))):
        _, g = run(cfg, gamma)
        parts = [run(cfg, s)[0] for s in one_tile]  # y_k = alpha_k s_k Q(z_k)
        for k in range(2):  # d sum(y) / d s_k = alpha_k sum_b Q(z_k) = sum_b y_k / s_k
            torch.testing.assert_close(g[2][k] * gamma[k], parts[k].sum(dim=0), rtol=1e-5,
                                       atol=1e-5)
        grads[name] = (g, parts)
    (g_n, y_n), (g_c, y_c) = grads["noisy"], grads["clean"]
    for k in (0, 3, 4):  # x and the two tiles: the same
        torch.testing.assert_close(g_n[k], g_c[k], rtol=1e-5, atol=1e-6)
    assert float(g_c[0].abs().min()) == 0.0  # clipped inputs get no gradient
    for k in range(2):  # alpha_k = 1
        torch.testing.assert_close(g_n[1][k] - g_c[1][k], (y_n[k] - y_c[k]).sum(), rtol=1e-4,
                                   atol=1e-4)
    assert float((y_n[0] - y_c[0]).abs().max()) > 0.05  # the noise is there
    # ideal config: the gradient is the exact one of x W^T
    xg = x.clone().requires_grad_()
    y = analog_mvm(xg, tiles, CrossbarConfig.ideal(), torch.ones(2), gamma)
    y.sum().backward()
    torch.testing.assert_close(xg.grad, torch.ones(8, 16) @ w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw", [dict(s_adc=True, sigma_zeta=0.3), dict(asymmetry=0.05),
                                dict(bound_management="iterative", out_bound=4.0),
                                dict(noise_management="abs_max"),
                                dict(drift_compensation="column")])
def test_options_match_the_plain_reference(kw):
    # Each option through the array's life cycle (programmed PCM devices drifted to 60 s, IR
    # drop, DAC, ADC): the output equals the plain reference written out from the equations
    # and the option's documented rule, from the array's own state (per-MVM noise off).
    w, x = _case(out=32, inp=600, batch=16)
    x[:, :300] *= 0.4  # the second tile sees larger inputs: abs-max ranges differ per row
    cfg = CrossbarConfig(out_noise=0.0, w_noise=0.0, **kw)
    arr = AnalogArray(w, cfg, device="rasch2023").program(rng=0).drift(60.0, rng=1)
    y = arr.mvm(x)
    torch.testing.assert_close(y, _plain_mvm(arr, x), rtol=1e-9, atol=1e-9)
    # the option acts: the same array without it gives other numbers
    base = CrossbarConfig(out_noise=0.0, w_noise=0.0, out_bound=cfg.out_bound)
    other = AnalogArray(w, base, device="rasch2023").program(rng=0).drift(60.0, rng=1)
    assert float((y - other.mvm(x)).abs().max()) > 1e-3, kw


def test_bound_management_avoids_saturation():
    w = torch.full((4, 512), 1.0)
    x = torch.full((2, 512), 0.5)  # exact output 256, far above the ADC bound of 10
    cfg = CrossbarConfig.ideal(out_bits=8, out_bound=10.0)
    y0 = analog_mvm(x, [w], cfg, torch.ones(1), torch.ones(1, 4))
    y1 = analog_mvm(x, [w], cfg.replace(bound_management="iterative",
                                        bound_management_iters=6), torch.ones(1),
                    torch.ones(1, 4))
    assert torch.allclose(y0, torch.full_like(y0, 10.0))
    torch.testing.assert_close(y1, torch.full_like(y1, 256.0), rtol=0.01, atol=0)


# ---------------------------------------------------------------------------------- life cycle
def test_drift_compensation_restores_output_scale_after_a_year():
    w, x = _case(out=256, inp=512, batch=200, dtype=torch.float32)
    cfg = CrossbarConfig.ideal()
    arr = AnalogArray(w, cfg.replace(drift_compensation="global"), device="rasch2023")
    arr.program(rng=0)
    s0 = float(arr.mvm(x).abs().mean())
    arr.drift(365.25 * 86400, rng=1)
    s1 = float(arr.mvm(x).abs().mean())
    # restored to 0.1-0.4 % over seeds of weights and inputs (random +-1 reference inputs)
    assert s1 / s0 == pytest.approx(1.0, abs=0.008)
    # the factor is the drift it undid: the uncompensated array shrank by 1 / comp (~ 0.51)
    raw = AnalogArray(w, cfg, device="rasch2023").program(rng=0).drift(365.25 * 86400, rng=1)
    s_raw = float(raw.mvm(x).abs().mean())
    assert float(arr.comp.mean()) == pytest.approx(s0 / s_raw, rel=0.008)
    assert s_raw / s0 < 0.6
    col = AnalogArray(w, cfg.replace(drift_compensation="column"), device="rasch2023")
    col.program(rng=0)
    sc0 = col.mvm(x).abs().mean(dim=0)
    col.drift(365.25 * 86400, rng=1)
    assert float(col.mvm(x).abs().mean(dim=0).mean() / sc0.mean()) == pytest.approx(1, abs=0.008)


def test_determinism():
    w, x = _case(out=32, inp=700, batch=16, dtype=torch.float32)

    def run(p, d, m):
        arr = AnalogArray(w, CrossbarConfig(asymmetry=0.02), device="rasch2023")
        return arr.program(rng=p).drift(3600.0, rng=d).mvm(x, rng=m)

    a = run(0, 1, 2)
    torch.testing.assert_close(a, run(0, 1, 2), rtol=0, atol=0)
    for other in (run(9, 1, 2), run(0, 9, 2), run(0, 1, 9)):
        assert (a - other).abs().max() > 1e-3
    # the per-MVM stream seeded by program(): the same sequence of outputs
    arr1 = AnalogArray(w, CrossbarConfig(), device="rasch2023").program(rng=5)
    arr2 = AnalogArray(w, CrossbarConfig(), device="rasch2023").program(rng=5)
    torch.testing.assert_close(arr1.mvm(x), arr2.mvm(x), rtol=0, atol=0)
    assert mvm_error(n_inputs=50, rng=3) == mvm_error(n_inputs=50, rng=3)


def test_bad_input_is_named():
    w, x = _case(out=8, inp=20, batch=4)
    arr = AnalogArray(w, device=None)
    with pytest.raises(ValueError, match="x: shape"):
        arr.mvm(x[:, :10])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x: contains NaN"):
        arr.mvm(bad)
    wn = w.clone()
    wn[1, 1] = float("inf")
    with pytest.raises(ValueError, match="weights: contains NaN"):
        AnalogArray(wn)
    with pytest.raises(ValueError, match="weights: expected a non-empty 2-d"):
        AnalogArray(np.zeros(5))
    with pytest.raises(ValueError, match="bias: shape"):
        AnalogArray(w, bias=np.zeros(3))
    with pytest.raises(ValueError, match="input_range"):
        arr.input_range = -1.0
    with pytest.raises(RuntimeError, match="program"):
        AnalogArray(w).drift(1.0)
    with pytest.raises(ValueError, match="t = "):
        AnalogArray(w).program(rng=0).drift(-1.0)
    with pytest.raises(ValueError, match="alpha: shape"):
        analog_mvm(x, arr.w_tiles, arr.cfg, torch.ones(3), arr.out_scale)
    with pytest.raises(ValueError, match="out_scale: shape"):
        analog_mvm(x, arr.w_tiles, arr.cfg, arr.alpha, torch.ones(1, 3))


def test_calibrate_input_range():
    w, x = _case(out=8, inp=1100, batch=32)
    arr = AnalogArray(w, device=None)
    x[:, 0] = 7.0
    a = arr.calibrate_input_range(x)
    want = [float(x[:, sl].abs().max()) for sl in arr.slices]  # abs-max per tile's inputs
    assert a.tolist() == want and want[0] == 7.0 and want[1] < 1.0
    arr.calibrate_input_range(x, quantile=0.5)
    np.testing.assert_allclose(arr.alpha, [float(x[:, sl].abs().median()) for sl in arr.slices],
                               rtol=1e-3)


# ---------------------------------------------------------------------------------- MVM error
def test_mvm_error_of_the_standard_model():
    # eps_M (Eq. 20) of the standard model on the paper's test case: the periphery alone 6.5 %
    # (ADC clipping dominates); with the devices 10.8 % after programming, 12.6 % at 1 s,
    # 13.4 % at 1 h, 19.3 % at 1 year (means over seeds 0-5; seed 0 with 1000 inputs, the
    # default of `aimc-device mvm-error`: 6.4, 10.7, 12.5, 13.5, 19.3 %). Tolerances: 4 times
    # the scatter over seeds (0.15 points for the periphery with 1000 inputs; 0.13, 0.11,
    # 0.03, 0.08 points with 200).
    periph = mvm_error(CrossbarConfig(), device=None, n_inputs=1000)
    assert periph == pytest.approx(0.0648, abs=0.006)
    eps = [mvm_error(CrossbarConfig(), device="rasch2023", t=t, n_inputs=200)
           for t in (None, 1.0, 3600.0, 3.15e7)]
    for e, want, tol in zip(eps, (0.1082, 0.1258, 0.1344, 0.1925),
                            (0.005, 0.0045, 0.0015, 0.0035)):
        assert e == pytest.approx(want, abs=tol)


def test_paper_mvm_error_with_aihwkit_conventions():
    # The paper quotes about 15 % for the standard model without drift (docs/model.md 7). The
    # model as specified (column scales, read noise from t = 0) gives about 11 %; the paper's
    # figure is met with the conventions of its public implementation: devices read right after
    # programming carry t0 = 20 s of 1/f noise with Q_s from g_P, and one weight scale per tile.
    # (14.4 % over seeds 0-5, scatter 0.3 points: the tolerance is 4 times that)
    cfg = CrossbarConfig(columnwise_scaling=False)
    eps = mvm_error(cfg, device="rasch2023-aihwkit", t=0.0, n_inputs=200)
    assert eps == pytest.approx(0.144, abs=0.013)
    faithful = mvm_error(CrossbarConfig(), device="rasch2023", t=None, n_inputs=200)
    assert faithful < eps - 0.02


def test_tile_wise_scaling_shares_one_gamma_per_tile():
    w = torch.randn(6, 10, dtype=torch.float64)
    tiles, gamma = map_weights(w, [4, 6], columnwise=False)
    assert torch.all(gamma[0] == w[:, :4].abs().max())
    assert torch.all(gamma[1] == w[:, 4:].abs().max())
    torch.testing.assert_close(torch.cat([t * g[:, None] for t, g in zip(tiles, gamma)], 1), w)
    assert max(t.abs().max() for t in tiles) == 1.0
    arr = AnalogArray(w.numpy(), CrossbarConfig.ideal(columnwise_scaling=False, max_rows=6),
                      device=None)
    x = np.random.default_rng(0).normal(size=(3, 10))
    np.testing.assert_allclose(arr.mvm(x), x @ w.numpy().T, rtol=1e-9, atol=1e-9)


def test_cli_mvm_error(capsys):
    from aimc_device.cli import main

    assert main(["mvm-error", "--t", "3600", "--n-inputs", "20", "--set", "out_bits=6"]) == 0
    eps = mvm_error(CrossbarConfig(out_bits=6), device="rasch2023", t=3600.0, n_inputs=20, rng=0)
    assert capsys.readouterr().out.strip() == f"eps_M at t = 3600 s: {100 * eps:.2f} %"
    assert main(["mvm-error", "--set", "out_noise=-1"]) == 2
    assert "CrossbarConfig.out_noise" in capsys.readouterr().err


def test_fused_kernel_normals_are_standard_and_thread_independent():
    from aimc_device.crossbar import _kernels as K

    z = np.zeros((400, 501))
    cfg = CrossbarConfig(out_noise=1.0, w_noise=0.0, ir_drop=0.0, out_bits=None,
                         out_bound=math.inf)
    products = K.Products(z, None, None, None, np.zeros(6, np.intp))
    stage = K.stage(cfg, 501, z.dtype, 11)
    a, b = np.empty_like(z), np.empty_like(z)
    K.output_stage(products, stage, K.Outputs(a, np.ones(501), None, None, None), parallel=True)
    K.output_stage(products, stage, K.Outputs(b, np.ones(501), None, None, None), parallel=False)
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all()  # every variate outside its rectangle was completed
    assert stats.kstest(a.ravel(), "norm").pvalue > 1e-3
    assert abs(np.corrcoef(a[:, :-1:2].ravel(), a[:, 1::2].ravel())[0, 1]) < 0.01


def test_s_adc_saturates_and_keeps_the_range():
    z = torch.linspace(-10, 10, 201, dtype=torch.float64)
    f = periphery.s_adc(z, 0.25, 10.0)
    torch.testing.assert_close(f[[0, -1]], z[[0, -1]])  # f(+-b) = +-b: mean slope kept
    assert torch.all(f[101:-1] > z[101:-1])  # concave for z > 0: compresses large outputs
    assert torch.all(torch.diff(f) > 0)


def test_read_asymmetry_acts_on_negative_inputs_only():
    w = torch.rand(8, 64, generator=_gen(0), dtype=torch.float64) * 2 - 1
    a = periphery.draw_asymmetry(w.shape, 0.1, _gen(1), torch.float64)
    pos = torch.rand(4, 64, generator=_gen(2), dtype=torch.float64)
    assert torch.all(periphery.asymmetry_delta(pos, w, a) == 0)
    d = periphery.asymmetry_delta(-pos, w, a)
    torch.testing.assert_close(d, -F(pos, w * a))
    big = periphery.draw_asymmetry((256, 256), 0.1, _gen(3), torch.float64).ravel().numpy()
    assert stats.kstest(big / 0.1, "norm").pvalue > 1e-3  # a_ij ~ N(0, sigma_a)
    assert big.std() == pytest.approx(0.1, rel=0.015)  # 65536 draws: +-0.3 %


def test_cli_table(capsys):
    from aimc_device.cli import main

    assert main(["mvm-error", "--n-inputs", "20", "--set", "s_adc=true"]) == 0
    lines = capsys.readouterr().out.splitlines()[2:]
    table = {ln[:28].strip(): float(ln[28:]) for ln in lines}
    rows = mvm_error_breakdown(CrossbarConfig(s_adc=True), device="rasch2023", rng=0,
                               n_inputs=20)
    assert list(table) == list(rows) == [
        "DAC", "ADC", "output noise", "short-term noise", "IR drop", "S-shaped ADC",
        "PCM programming", "periphery (all)", "total", "total @ 1 s", "total @ 1 h",
        "total @ 1 day", "total @ 1 year"]
    np.testing.assert_allclose([table[k] for k in rows], [100 * v for v in rows.values()],
                               atol=0.0051)


def test_device_faults_through_the_array():
    from aimc_device.pcm import PCMModel

    w, x = _case(out=64, inp=256, batch=32, dtype=torch.float32)
    model = PCMModel.preset("rasch2023").replace(stuck_at_zero=0.3)
    arr = AnalogArray(w, CrossbarConfig.ideal(), device=model).program(rng=0)
    zero = arr.w_tiles[0] == 0
    tol = 5 * math.sqrt(0.3 * 0.7 / zero.numel())  # binomial: 5 standard deviations
    assert float(zero.float().mean()) == pytest.approx(0.3, abs=tol)
    arr.drift(3600.0, rng=1)
    assert bool((arr.w_tiles[0] == 0)[zero].all())  # stuck devices stay stuck
    assert float((arr.w_tiles[0] == 0).float().mean()) == pytest.approx(0.3, abs=tol)
    # a random 30 % of the weights lost: ||dy|| / ||y|| ~ sqrt(0.3 + 0.7 eps_P^2), eps_P the
    # error of the healthy devices (programming noise and 1 h of drift and read noise)
    healthy = AnalogArray(w, CrossbarConfig.ideal(), device="rasch2023").program(rng=0)
    exact = x @ w.T
    eps_p = float((healthy.drift(3600.0, rng=1).mvm(x) - exact).norm() / exact.norm())
    eps = float((arr.mvm(x) - exact).norm() / exact.norm())
    assert eps == pytest.approx(math.sqrt(0.3 + 0.7 * eps_p ** 2), rel=0.06)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dac_kernel_matches_torch_quantizer(dtype):
    from aimc_device.crossbar import _kernels as K

    rng = np.random.default_rng(5)
    x = rng.uniform(-3, 3, (300, 700)).astype(dtype)
    x[4, 250] = np.nan
    x[5, 300] = 0.5 / 127 * 1.7  # a tie after scaling: rounds half to even like torch
    for start, n, row_inv in ((200, 300, np.array([1 / 1.7], dtype)),
                              (0, 700, (1 / rng.uniform(0.5, 3, 300)).astype(dtype))):
        lev = np.empty((300, n), dtype)
        for kernel in (K.dac_levels_serial, K.dac_levels_parallel):
            kernel(x, start, row_inv, 127.0, 127.0, lev)
            ref = torch.from_numpy(x[:, start:start + n] * (dtype(127.0) * row_inv[:, None]))
            ref = ref.round().clamp(-127, 127).numpy()
            np.testing.assert_array_equal(lev, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "one_channel"])
def test_image_dac_kernel_matches_torch_quantizer(dtype, layout):
    # The image DAC of a convolution's evaluation: integer levels with a range per channel,
    # laid out channels last, from an NCHW or a channels-last batch.
    from aimc_device.crossbar import _kernels as K

    rng = np.random.default_rng(6)
    c = 1 if layout == "one_channel" else 5
    x = torch.from_numpy(rng.uniform(-3, 3, (3, c, 7, 9)).astype(dtype))
    x[1, 0, 2, 3] = np.nan
    x[2, -1, 4, 4] = 0.5 / 127 * 1.7  # a tie after scaling: rounds half to even like torch
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    inv = (1 / rng.uniform(0.5, 3, c)).astype(dtype)
    inv[-1] = dtype(1 / 1.7)
    ref = (x * torch.from_numpy(dtype(127.0) * inv).reshape(1, -1, 1, 1)).round().clamp(-127, 127)
    for kernel in (K.dac_image_serial, K.dac_image_parallel):
        lev = np.empty((3, 7, 9, c), dtype)
        kernel(x.permute(0, 2, 3, 1).numpy(), inv, 127.0, 127.0, lev)
        np.testing.assert_array_equal(lev, ref.permute(0, 2, 3, 1).numpy())
