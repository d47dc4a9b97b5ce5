"""The analog MVM engine: the fast CPU backend (Numba) against the torch reference, drawn over
shapes, tilings and configurations (hypothesis); noise independent of grad mode; the precision
options with their tolerance; the CUDA path (tests marked ``cuda``, skipped without a GPU)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from aimc_device import crossbar
from aimc_device.crossbar import CrossbarConfig, EngineOptions, analog_conv, analog_mvm
from aimc_device.crossbar.mvm import _fast_backend

FAST = EngineOptions(aux_bfloat16=False)  # the fast backend, everything in the working dtype
REFERENCE = EngineOptions(backend="reference")
PROPERTY = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
CUDA = [pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@st.composite
def tiled_layers(draw, max_tile=48):
    """(x, w_tiles, alpha, out_scale) of a random layer: 1-3 tiles of 1-48 rows, 1-20 outputs,
    1-40 input vectors, inputs partly beyond the input range."""
    sizes = draw(st.lists(st.integers(1, max_tile), min_size=1, max_size=3))
    n_out = draw(st.integers(1, 20))
    batch = draw(st.integers(1, 40))
    g = _gen(draw(st.integers(0, 2 ** 31)))
    w = [torch.rand(n_out, n, generator=g, dtype=torch.float64) * 2 - 1 for n in sizes]
    x = torch.randn(batch, sum(sizes), generator=g, dtype=torch.float64) * 1.5
    alpha = torch.rand(len(sizes), generator=g, dtype=torch.float64) + 0.5
    scale = torch.rand(len(sizes), n_out, generator=g, dtype=torch.float64) + 0.5
    return x, w, alpha, scale


def _configs(noise: bool):
    """Configurations of the elements the fast backend implements (noise on or off)."""
    return st.builds(
        CrossbarConfig, inp_bits=st.sampled_from([None, 4, 8]),
        inp_bound=st.sampled_from([1.0, 0.5]), out_bits=st.sampled_from([None, 6, 8]),
        out_bound=st.sampled_from([2.0, 10.0]), ir_drop=st.sampled_from([0.0, 1.0, 3e3]),
        out_noise=st.just(0.04) if noise else st.just(0.0),
        w_noise=st.sampled_from([0.0, 0.05]) if noise else st.just(0.0))


def _assert_close_up_to_adc_ties(a, b, cfg, factor, rtol):
    """a == b to ``rtol``, but for outputs where the two backends' rounding of the products
    put a pre-ADC value on either side of an ADC decision: those differ by one ADC level (at
    most 1 % of the outputs, and at least one allowed)."""
    diff = (a - b).abs()
    off = diff > rtol * (1.0 + b.abs())
    if cfg.out_bits:
        level = torch.as_tensor(crossbar.periphery.quantizer_step(cfg.out_bits, cfg.out_bound)
                                * factor)
        assert bool((diff <= 1.001 * level.expand_as(diff)).all())
        assert int(off.sum()) <= max(1, 0.01 * off.numel())
    else:
        assert not bool(off.any()), float(diff.max())


@PROPERTY
@given(layer=tiled_layers(), cfg=_configs(noise=False), dtype=st.sampled_from(["f32", "f64"]))
def test_fast_backend_equals_reference_without_noise(layer, cfg, dtype):
    # With the noise off the two backends compute the same function: outputs (to rounding, an
    # ADC decision apart where rounding tips it) and gradients.
    dt = torch.float32 if dtype == "f32" else torch.float64
    x, w, alpha, scale = (t.to(dt) if isinstance(t, torch.Tensor) else [u.to(dt) for u in t]
                          for t in layer)
    assert _fast_backend(x, cfg, None, FAST) and not _fast_backend(x, cfg, None, REFERENCE)
    rtol = 1e-4 if dt == torch.float32 else 1e-9
    factor = (alpha[:, None] * scale).max()
    outs, grads = [], []
    for options in (FAST, REFERENCE):
        with torch.no_grad():
            outs.append(analog_mvm(x, w, cfg, alpha, scale, options=options))
        leaves = [x.clone().requires_grad_(), *(u.clone().requires_grad_() for u in w)]
        y = analog_mvm(leaves[0], leaves[1:], cfg, alpha, scale, options=options)
        _assert_close_up_to_adc_ties(y.detach(), outs[-1], cfg, factor, rtol)  # grad mode
        grads.append(torch.autograd.grad(y.sum(), leaves))
    _assert_close_up_to_adc_ties(outs[0], outs[1], cfg, factor, rtol)
    if dt == torch.float64 and not torch.equal(outs[0], outs[1]):
        return  # an ADC decision apart: the straight-through masks differ there
    for g_fast, g_ref in zip(*grads):
        torch.testing.assert_close(g_fast, g_ref, rtol=rtol, atol=rtol)


@PROPERTY
@given(layer=tiled_layers(max_tile=64), cfg=_configs(noise=True), seed=st.integers(0, 1000))
def test_fast_backend_noise_has_the_reference_distribution(layer, cfg, seed):
    # With noise, the outputs minus the noiseless outputs, divided by their standard deviation
    # f_i sqrt(sigma_out^2 + sigma_w0^2 sum_j |w~_ij| x~_j^2) per tile (Eqs. 2, 14; no ADC
    # here), are N(0, 1) on both backends (KS), and the two samples agree with each other.
    cfg = cfg.replace(out_bits=None, out_bound=math.inf)
    x, w, alpha, scale = layer
    clean = analog_mvm(x, w, cfg.replace(out_noise=0.0, w_noise=0.0), alpha, scale,
                       options=REFERENCE)
    var = torch.zeros_like(clean)
    start = 0
    for k, wk in enumerate(w):
        xt = crossbar.periphery.quantize(x[:, start:start + wk.shape[1]] / alpha[k],
                                         cfg.inp_bits, cfg.inp_bound)
        start += wk.shape[1]
        var += (alpha[k] * scale[k]) ** 2 * (cfg.out_noise ** 2
                                             + cfg.w_noise ** 2 * (xt * xt) @ wk.abs().T)
    reps = max(1, 2000 // clean.numel())
    samples = {}
    for name, options in (("fast", FAST), ("reference", REFERENCE)):
        gen = _gen(seed)
        z = [(analog_mvm(x, w, cfg, alpha, scale, generator=gen, options=options) - clean)
             / var.sqrt() for _ in range(reps)]
        samples[name] = torch.cat([t.reshape(-1) for t in z]).numpy()
        assert stats.kstest(samples[name], "norm").pvalue > 1e-4, name
        assert samples[name].std() == pytest.approx(1.0, abs=6 / math.sqrt(samples[name].size))
    assert stats.ks_2samp(samples["fast"], samples["reference"]).pvalue > 1e-4


@PROPERTY
@given(seed=st.integers(0, 2 ** 31), c_in=st.integers(1, 6), c_out=st.integers(1, 7),
       k=st.sampled_from([(1, 1), (3, 3), (3, 2)]), stride=st.sampled_from([1, 2]),
       max_rows=st.sampled_from([9, 18, 512]), cfg=_configs(noise=False))
def test_fast_convolution_equals_reference_without_noise(seed, c_in, c_out, k, stride, max_rows,
                                                         cfg):
    # The convolution tiles of the fast backend (the Numba stage on the image for few rows,
    # oneDNN products otherwise) against the reference convolution path.
    g = _gen(seed)
    n_k = k[0] * k[1]
    sizes = crossbar.mvm.conv_channel_split(c_in, n_k, max(max_rows, n_k))
    w = [torch.rand(c_out, c * n_k, generator=g, dtype=torch.float64) * 2 - 1 for c in sizes]
    x = torch.randn(2, c_in, 7, 6, generator=g, dtype=torch.float64) * 1.5
    alpha = torch.rand(len(sizes), generator=g, dtype=torch.float64) + 0.5
    scale = torch.rand(len(sizes), c_out, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(c_out, generator=g, dtype=torch.float64)
    kw = dict(channel_sizes=sizes, kernel_size=k, stride=(stride, stride),
              padding=(k[0] // 2, k[1] // 2), dilation=(1, 1), bias=bias)
    y_fast = analog_conv(x, w, cfg, alpha, scale, options=FAST, **kw)
    y_ref = analog_conv(x, w, cfg, alpha, scale, options=REFERENCE, **kw)
    _assert_close_up_to_adc_ties(y_fast, y_ref, cfg, (alpha[:, None] * scale).max(), 1e-9)


def _grouped_conv(seed, groups, c_g, o_g, k, max_rows, dims=2):
    """A grouped convolution's operands: x, tiles, alpha (n_tiles, groups), out_scale, bias,
    keywords, and its full weight (out, c_g, *k)."""
    g = _gen(seed)
    k = (k,) * dims
    n_k = math.prod(k)
    sizes = crossbar.mvm.conv_channel_split(c_g, n_k, max(max_rows, n_k))
    n_out = groups * o_g
    w = torch.rand(n_out, c_g * n_k, generator=g, dtype=torch.float64) * 2 - 1
    tiles = list(torch.split(w, [c * n_k for c in sizes], dim=1))
    x = torch.randn(2, groups * c_g, *(7, 6)[:dims], generator=g, dtype=torch.float64) * 1.5
    alpha = torch.rand(len(sizes), groups, generator=g, dtype=torch.float64) + 0.5
    scale = torch.rand(len(sizes), n_out, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(n_out, generator=g, dtype=torch.float64)
    kw = dict(channel_sizes=sizes, kernel_size=k, padding=tuple(v // 2 for v in k))
    return x, tiles, alpha, scale, bias, kw, w.reshape(n_out, c_g, *k)


@settings(PROPERTY, max_examples=6)
@given(seed=st.integers(0, 2 ** 31), groups=st.integers(2, 4), c_g=st.integers(1, 4),
       o_g=st.integers(1, 3), k=st.sampled_from([1, 3]), max_rows=st.sampled_from([9, 512]),
       dims=st.sampled_from([1, 2]), cfg=_configs(noise=False))
def test_grouped_convolution_equals_one_convolution_per_group(seed, groups, c_g, o_g, k,
                                                              max_rows, dims, cfg):
    # A grouped convolution holds each group on its own tiles: read at once (one call), it
    # computes what one ungrouped analog convolution per group computes, on both backends,
    # outputs and gradients (to x, the tiles and the per-(tile, group) input ranges).
    x, tiles, alpha, scale, bias, kw, _ = _grouped_conv(seed, groups, c_g, o_g, k, max_rows,
                                                        dims)
    factor = (alpha.amax() * scale).max()
    weights = torch.sin(torch.arange(2 * groups * o_g * 7 * 6, dtype=torch.float64))
    results = {}
    for name, options in (("fast", FAST), ("reference", REFERENCE)):
        leaves = [t.clone().requires_grad_() for t in (x, alpha, *tiles)]
        xl, al, tl = leaves[0], leaves[1], leaves[2:]
        y = analog_conv(xl, tl, cfg, al, scale, groups=groups, bias=bias, options=options, **kw)
        cols = [slice(g * o_g, (g + 1) * o_g) for g in range(groups)]
        parts = [analog_conv(xl[:, g * c_g:(g + 1) * c_g], [t[cols[g]] for t in tl], cfg,
                             al[:, g], scale[:, cols[g]], bias=bias[cols[g]], options=options,
                             **kw) for g in range(groups)]
        y_groups = torch.cat(parts, dim=1)
        _assert_close_up_to_adc_ties(y.detach(), y_groups.detach(), cfg, factor, 1e-9)
        with torch.no_grad():  # evaluation: the same function (the DAC in integer levels)
            y_eval = analog_conv(x, tiles, cfg, alpha, scale, groups=groups, bias=bias,
                                 options=options, **kw)
        _assert_close_up_to_adc_ties(y_eval, y.detach(), cfg, factor, 1e-9)
        w = weights[:y.numel()].reshape(y.shape)
        results[name] = (y.detach(), torch.autograd.grad((y * w).sum(), leaves),
                         torch.autograd.grad((y_groups * w).sum(), leaves))
        if torch.equal(y, y_groups):
            for a, b in zip(*results[name][1:]):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    _assert_close_up_to_adc_ties(results["fast"][0], results["reference"][0], cfg, factor, 1e-9)
    if torch.equal(results["fast"][0], results["reference"][0]):
        for a, b in zip(results["fast"][1], results["reference"][1]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("options", [FAST, REFERENCE], ids=["fast", "reference"])
def test_grouped_convolution_ideal_is_torch_and_noise_per_tile(options):
    # Ideal periphery: torch's grouped convolution. With noise (no ADC), the outputs minus the
    # noiseless ones over f sqrt(sigma_out^2 + sigma_w0^2 sum_j |w~_ij| x~_j^2) (Eqs. 2, 14),
    # the sum over the rows of each group's own tile, are N(0, 1) (KS).
    groups, c_g, o_g = 3, 2, 2
    x, tiles, alpha, scale, bias, kw, w = _grouped_conv(5, groups, c_g, o_g, 3, 512)
    y = analog_conv(x, tiles, CrossbarConfig.ideal(), alpha, torch.ones_like(scale),
                    groups=groups, bias=bias, options=options, **kw)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, bias, padding=1,
                                                             groups=groups),
                               rtol=1e-5, atol=1e-5)
    cfg = CrossbarConfig(out_bits=None, out_bound=math.inf, ir_drop=0.0, w_noise=0.2)
    clean = analog_conv(x, tiles, cfg.replace(out_noise=0.0, w_noise=0.0), alpha, scale,
                        groups=groups, options=options, **kw)
    a_in = alpha[0].repeat_interleave(c_g).reshape(1, -1, 1, 1)
    xt = crossbar.periphery.quantize(x / a_in, cfg.inp_bits, cfg.inp_bound)
    f = (alpha[0].repeat_interleave(o_g) * scale[0]).reshape(1, -1, 1, 1)
    var = f ** 2 * (cfg.out_noise ** 2 + cfg.w_noise ** 2 * torch.nn.functional.conv2d(
        xt * xt, w.abs(), padding=1, groups=groups))
    gen = _gen(1)
    z = torch.cat([((analog_conv(x, tiles, cfg, alpha, scale, groups=groups, generator=gen,
                                 options=options, **kw) - clean) / var.sqrt()).reshape(-1)
                   for _ in range(8)]).numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert z.std() == pytest.approx(1.0, abs=6 / math.sqrt(z.size))


@pytest.mark.parametrize("options", [FAST, REFERENCE], ids=["fast", "reference"])
@pytest.mark.parametrize("layer", ["linear", "conv", "conv few rows", "depthwise",
                                   "1x1 stride 2"])
def test_noise_is_drawn_the_same_with_and_without_grad(options, layer):
    # The same generator state gives the same draw whether a gradient is taken or not (on the
    # fast backend: every path of a convolution tile, in training and in evaluation).
    g = _gen(0)
    cfg = CrossbarConfig(max_rows=40)
    w = [torch.rand(6, 36, generator=g) * 2 - 1 for _ in range(2)]
    alpha, scale = torch.ones(2), torch.rand(2, 6, generator=g) + 0.5
    if layer == "linear":
        x = torch.randn(5, 72, generator=g)

        def run(inp, gen):
            return analog_mvm(inp, w, cfg, alpha, scale, generator=gen, options=options)
    elif layer == "1x1 stride 2":  # evaluation reads every second row and column only
        x = torch.randn(2, 8, 7, 6, generator=g)
        w1 = [torch.rand(6, 8, generator=g) * 2 - 1]

        def run(inp, gen):
            return analog_conv(inp, w1, cfg, alpha[:1], scale[:1], channel_sizes=[8],
                               kernel_size=(1, 1), stride=(2, 2), generator=gen,
                               options=options)
    elif layer != "conv":  # 9 rows per tile: the convolution tile runs whole in Numba
        groups = 3 if layer == "depthwise" else 1
        x = torch.randn(2, 3, 5, 5, generator=g)
        w1 = [torch.rand(6, 27 // groups, generator=g) * 2 - 1]
        a1 = torch.rand(1, groups, generator=g) + 0.5

        def run(inp, gen):
            return analog_conv(inp, w1, cfg, a1, scale[:1], channel_sizes=[3 // groups],
                               kernel_size=(3, 3), padding=(1, 1), groups=groups,
                               generator=gen, options=options)
    else:
        x = torch.randn(2, 8, 5, 5, generator=g)

        def run(inp, gen):
            return analog_conv(inp, w, cfg, alpha, scale, channel_sizes=[4, 4],
                               kernel_size=(3, 3), padding=(1, 1), generator=gen,
                               options=options)
    with torch.no_grad():
        y0 = run(x, _gen(7))
    y1 = run(x.clone().requires_grad_(), _gen(7))
    assert y1.requires_grad
    torch.testing.assert_close(y1.detach(), y0, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(run(x, _gen(8)).detach(), y0)  # a new state, a new draw


def test_aux_bfloat16_moves_outputs_by_little():
    # EngineOptions.aux_bfloat16: the auxiliary products (IR drop, short-term noise variance) in
    # bfloat16. With the same draws, the outputs move by a small fraction of the output noise
    # they sit in (documented: std of the change < 5 % of sigma_out; 2.6 % here), IR drop at 3x
    # its standard size so that the term matters.
    g = _gen(3)
    cfg = CrossbarConfig(out_bits=None, out_bound=math.inf, ir_drop=3.0)
    w = [torch.randn(256, 512, generator=g).clamp(-2.5, 2.5) / 2.5]
    x = torch.rand(256, 512, generator=g)
    one, scale = torch.ones(1), torch.ones(1, 256)
    y = {aux: analog_mvm(x, w, cfg, one, scale, generator=_gen(1),
                         options=EngineOptions(aux_bfloat16=aux)) for aux in (True, False)}
    change = (y[True] - y[False]).std().item()
    assert 0 < change < 0.05 * cfg.out_noise


def test_options_and_their_context():
    with pytest.raises(ValueError, match="EngineOptions.backend"):
        EngineOptions(backend="gpu")
    with pytest.raises(ValueError, match="EngineOptions"):
        CrossbarConfig().replace(aux_bfloat16=False)
    assert "aux_bfloat16" not in CrossbarConfig().to_dict()
    old = dict(CrossbarConfig().to_dict(), aux_bfloat16=True)  # a config saved by 0.1
    assert CrossbarConfig.from_dict(old) == CrossbarConfig()
    x = torch.randn(3, 8)
    cfg = CrossbarConfig()
    assert _fast_backend(x, cfg, None, crossbar.options.current_options())
    with crossbar.engine_options(backend="reference"):
        assert not _fast_backend(x, cfg, None, crossbar.options.current_options())
    assert _fast_backend(x, cfg, None, crossbar.options.current_options())
    for other in (cfg.replace(s_adc=True), cfg.replace(noise_management="abs_max"),
                  cfg.replace(bound_management="iterative")):
        assert not _fast_backend(x, other, None, FAST)
    assert not _fast_backend(x.to(torch.bfloat16), cfg, None, FAST)


@pytest.mark.parametrize("extra", [{}, {"s_adc": True}, {"noise_management": "abs_max"},
                                   {"inp_bits": None, "out_bits": None}])
def test_equal_tiles_read_as_one_batch_equal_the_tile_by_tile_reference(extra):
    # The reference reads equal tiles as one batch (one product per term for all tiles); the
    # model is that of each tile read on its own and the outputs summed (Eq. 1).
    from aimc_device.crossbar.mvm import _reference_tile

    g = _gen(8)
    cfg = CrossbarConfig(out_noise=0.0, w_noise=0.0, max_rows=16, **extra)
    w = [torch.rand(6, 16, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(3)]
    x = torch.randn(7, 48, generator=g, dtype=torch.float64) * 2
    alpha = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    scale = torch.rand(3, 6, generator=g, dtype=torch.float64) + 0.5
    zeta = [torch.rand(6, generator=g, dtype=torch.float64) for _ in range(3)] \
        if cfg.s_adc else None
    y = analog_mvm(x, w, cfg, alpha, scale, zeta=zeta, options=REFERENCE)
    want = sum(_reference_tile(x[:, 16 * k:16 * (k + 1)], w[k], cfg, alpha[k], scale[k], None,
                               None, None if zeta is None else zeta[k]) for k in range(3))
    _assert_close_up_to_adc_ties(y, want, cfg, float((alpha[:, None] * scale).max()), 1e-9)
    noisy = CrossbarConfig(max_rows=16, **extra)  # with noise: the same distribution
    draws = [analog_mvm(x[:1], w, noisy, alpha, scale, zeta=zeta, options=REFERENCE,
                        generator=torch.Generator().manual_seed(s))[0, 0] for s in range(400)]
    tiled = [sum(_reference_tile(x[:1, 16 * k:16 * (k + 1)], w[k], noisy, alpha[k], scale[k],
                                 gen, None, None if zeta is None else zeta[k])
                 for k in range(3))[0, 0]
             for gen in (torch.Generator().manual_seed(1000 + s) for s in range(400))]
    assert stats.ks_2samp(torch.stack(draws).numpy(), torch.stack(tiled).numpy()).pvalue > 1e-3


def test_eval_constants_follow_in_place_changes_of_the_operands():
    # The fast backend keeps what it derives from alpha, out_scale and the weights between
    # calls without gradient; an in-place change of any of them must show in the next call.
    g = _gen(7)
    cfg = CrossbarConfig(out_noise=0.0, w_noise=0.0, ir_drop=0.0)
    w = [torch.rand(8, 12, generator=g) * 2 - 1 for _ in range(2)]
    x = torch.randn(5, 24, generator=g)
    alpha, scale = torch.ones(2), torch.rand(2, 8, generator=g) + 0.5

    def fresh():
        return analog_mvm(x, [t.clone() for t in w], cfg, alpha.clone(), scale.clone())

    with torch.no_grad():
        y = analog_mvm(x, w, cfg, alpha, scale)
        torch.testing.assert_close(y, fresh(), rtol=0, atol=0)
        for change in (lambda: alpha.mul_(2.0), lambda: scale[1].mul_(3.0),
                       lambda: w[0].mul_(0.5), lambda: w[1][2].zero_()):
            change()
            y_new = analog_mvm(x, w, cfg, alpha, scale)
            assert not torch.equal(y_new, y)
            torch.testing.assert_close(y_new, fresh(), rtol=0, atol=0)
            y = y_new


@pytest.mark.parametrize("cfg", [CrossbarConfig(max_rows=40),
                                 CrossbarConfig(max_rows=40, ir_drop=0.0, w_noise=0.0)],
                         ids=["full", "periphery"])
def test_eval_in_blocks_of_rows_equals_one_block(cfg, monkeypatch):
    # A call without gradient of many rows runs in blocks of rows; the draws are keyed by the
    # row of the call, so the numbers are those of one block, noise included.
    from aimc_device.crossbar import _fast
    g = _gen(11)
    w = [torch.rand(6, 36, generator=g) * 2 - 1 for _ in range(2)]
    alpha, scale = torch.ones(2), torch.rand(2, 6, generator=g) + 0.5
    x = torch.randn(37, 72, generator=g)
    with torch.no_grad():
        whole = analog_mvm(x, w, cfg, alpha, scale, generator=_gen(5), options=FAST)
        monkeypatch.setattr(_fast, "EVAL_BLOCK_BYTES", 10 * 6 * 4)  # blocks of 10 rows
        assert _fast._row_block(37, 6, 4) == 10
        blocks = analog_mvm(x, w, cfg, alpha, scale, generator=_gen(5), options=FAST)
        other = analog_mvm(x, w, cfg, alpha, scale, generator=_gen(6), options=FAST)
    torch.testing.assert_close(blocks, whole, rtol=0, atol=0)
    assert not torch.equal(other, whole)  # noise is on: another key, other numbers


def test_config_derived_conditions():
    cfg = CrossbarConfig()
    assert cfg.has_ir_drop and cfg.has_short_term_noise and cfg.has_noise
    assert not cfg.replace(ir_drop_g=0.0).has_ir_drop
    assert not CrossbarConfig.ideal().has_noise
    assert CrossbarConfig.ideal(w_noise=0.01).has_noise


# ------------------------------------------------------------------------------ CUDA
def cuda(test):
    """Mark a test ``cuda`` and skip it where no CUDA device exists."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(),
                                               reason="needs a CUDA device")(test))


@cuda
@pytest.mark.parametrize("extra", [{}, {"s_adc": True}, {"noise_management": "abs_max"},
                                   {"bound_management": "iterative"}])
def test_cuda_mvm_and_conv_match_the_cpu_reference(extra):
    # Every path runs on CUDA tensors through the torch reference, with the numbers of the CPU.
    g = _gen(2)
    cfg = CrossbarConfig(out_noise=0.0, w_noise=0.0, max_rows=64, **extra)
    w = [torch.rand(16, 36, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2)]
    x = torch.randn(20, 72, generator=g, dtype=torch.float64) * 2
    alpha, scale = torch.ones(2, dtype=torch.float64), torch.ones(2, 16, dtype=torch.float64)
    dev = torch.device("cuda")
    on = [x.to(dev), [t.to(dev) for t in w], cfg, alpha.to(dev), scale.to(dev)]
    y_gpu = analog_mvm(*on)
    assert y_gpu.device.type == "cuda"
    _assert_close_up_to_adc_ties(y_gpu.cpu(), analog_mvm(x, w, cfg, alpha, scale,
                                                         options=REFERENCE), cfg, 1.0, 1e-9)
    if extra and "s_adc" not in extra:
        return  # per-vector management: analog_mvm on unfolded inputs only
    img = torch.randn(2, 8, 6, 6, generator=g, dtype=torch.float64)
    kw = dict(channel_sizes=[4, 4], kernel_size=(3, 3), padding=(1, 1))
    y_gpu = analog_conv(img.to(dev), *on[1:], **kw)
    _assert_close_up_to_adc_ties(y_gpu.cpu(), analog_conv(img, w, cfg, alpha, scale,
                                                          options=REFERENCE, **kw),
                                 cfg, 1.0, 1e-9)
    noisy = CrossbarConfig(max_rows=64, **extra)  # and with noise, from a CUDA generator
    y = analog_mvm(on[0], on[1], noisy, on[3], on[4],
                   generator=torch.Generator(dev).manual_seed(0))
    assert y.device.type == "cuda" and bool(torch.isfinite(y).all())


@cuda
def test_cuda_networks_train_program_and_evaluate():
    # An analog CNN and LSTM on CUDA: a hardware-aware training step (device noise from the
    # torch sampler), programming, drift and an evaluation forward, all on the GPU tensors.
    from torch import nn

    from aimc_device import nn as anl
    dev = torch.device("cuda")
    torch.manual_seed(0)
    models = {
        "cnn": (nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(8 * 8 * 8, 10)), torch.randn(4, 3, 8, 8)),
        "lstm": (nn.LSTM(6, 8, batch_first=True), torch.randn(4, 5, 6)),
    }
    for name, (fp, x) in models.items():
        a = anl.convert(fp, CrossbarConfig(), "rasch2023", rng=0).to(dev)
        x = x.to(dev)
        a.train()
        out = a(x)
        out = out[0] if isinstance(out, tuple) else out
        assert out.device.type == "cuda", name
        out.square().mean().backward()
        assert all(p.grad is None or p.grad.device.type == "cuda" for p in a.parameters())
        anl.program(a, rng=0)
        anl.drift(a, 3600.0, rng=1)
        a.eval()
        with torch.no_grad():
            y = a(x)
        y = y[0] if isinstance(y, tuple) else y
        assert y.device.type == "cuda" and bool(torch.isfinite(y).all()), name


def test_stage_keys_in_one_draw_equal_one_draw_per_tile():
    # linear_eval takes the keys of all its tiles in one draw of the generator: the same keys,
    # and the same generator state after, as one draw per tile (analog_conv's tiles)
    from aimc_device.crossbar import _fast
    g1, g2 = _gen(4), _gen(4)
    assert _fast.stage_keys(g1, 5) == [_fast.stage_key(g2) for _ in range(5)]
    assert torch.equal(g1.get_state(), g2.get_state())
