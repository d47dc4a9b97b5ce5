"""Analog layers for the model code users bring: grouped, depthwise, padded and transposed
convolutions, GRU, attention with kdim/vdim, parametrized and third-party linear maps; the
drop-in attributes, torch.compile, autocast, and the conversion summary."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from aimc_device import crossbar, pcm
from aimc_device import nn as anl
from aimc_device.nn import tile as tile_mod

DEV = pcm.PCMModel.preset("rasch2023")
STD = crossbar.CrossbarConfig()
IDEAL = crossbar.CrossbarConfig.ideal(max_rows=16)  # small tiles: layers span several


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.fixture
def count_draws(monkeypatch):
    """The shapes of the training weight-noise draws made while the test runs."""
    draws, perturb = [], tile_mod.perturb_tensor

    def counting(g, *args, **kw):
        draws.append(tuple(g.shape))
        return perturb(g, *args, **kw)
    monkeypatch.setattr(tile_mod, "perturb_tensor", counting)
    return draws


# ------------------------------------------------------------------ ideal == floating point
CONVS = [  # (layer, input shape, crossbar tiles at max_rows=16)
    (nn.Conv2d(4, 6, 3, groups=2, padding=1, stride=2), (2, 4, 7, 7), 2 * 2),
    (nn.Conv2d(6, 6, 3, groups=6, padding=1, padding_mode="reflect"), (2, 6, 7, 7), 6),
    (nn.Conv2d(3, 5, (2, 3), padding="same", padding_mode="replicate"), (2, 3, 6, 8), 2),
    (nn.Conv1d(4, 8, 4, groups=4, padding="same", padding_mode="circular", dilation=2),
     (2, 4, 11), 4),
    (nn.Conv1d(5, 3, 3, padding="valid"), (2, 5, 9), 1),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (2, 4, 5, 5), 4),
    (nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 1), padding=(0, 1), dilation=2, groups=2),
     (2, 4, 5, 6), 2),
    (nn.ConvTranspose1d(4, 3, 4, stride=3, padding=2), (2, 4, 7), 1),
    (weight_norm(nn.Conv1d(8, 8, 6, padding=3, groups=4), dim=2), (2, 8, 10), 4),
]


@pytest.mark.parametrize("layer,shape,tiles", CONVS)
def test_convolutions_match_fp_with_their_weights_and_attributes(layer, shape, tiles):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    a, summary = anl.convert(layer, IDEAL, return_summary=True)
    a.eval()
    with torch.no_grad():
        _close(a(x), layer(x))
        _close(a(x[0]), layer(x[0]))  # unbatched
    assert summary.analog == [("", type(layer).__name__, type(a).__name__, tiles)]
    # drop-in: the effective weight in the torch layer's shape, and the geometry
    _close(a.weight, layer.weight.detach(), 1e-6)
    assert a.weight.dtype == layer.weight.dtype
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups",
                 "padding", "padding_mode"):
        assert getattr(a, attr) == getattr(layer, attr), attr
    assert a.bias is not None and torch.equal(a.bias, layer.bias)


def test_each_group_on_its_own_tiles_and_output_size():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 4, 3, groups=4, padding=1)
    a = anl.convert(conv, IDEAL)
    for g, layer in enumerate(a.group_layers):  # tile g holds group g's kernel only
        assert (layer.tile.in_features, layer.tile.out_features) == (9, 1)
        _close(layer.weight, conv.weight[g:g + 1].detach(), 1e-6)
    up = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)
    au = anl.convert(up, IDEAL).eval()
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        _close(au(x, output_size=[8, 8]), up(x, output_size=[8, 8]))


def test_hook_based_weight_norm_converts_with_its_current_weight():
    torch.manual_seed(10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm
        model = nn.Sequential(nn.utils.weight_norm(nn.Conv1d(4, 4, 3, groups=2), dim=2))
    x = torch.randn(2, 4, 6)
    model(x).sum().backward()  # leaves model[0].weight in an autograd graph
    with torch.no_grad():
        model[0].weight_g.mul_(2.0)  # an update the next forward would apply
    a = anl.convert(model, IDEAL)
    with torch.no_grad():
        _close(a(x), model(x))


@pytest.mark.parametrize("kw", [dict(num_layers=2, batch_first=True, dropout=0.0),
                                dict(num_layers=1, bidirectional=True, bias=False)])
def test_ideal_gru_matches_fp(kw):
    torch.manual_seed(2)
    gru = nn.GRU(5, 7, **kw)
    a = anl.convert(gru, IDEAL).eval()
    x, h0 = torch.randn(3, 4, 5), torch.randn(kw.get("num_layers", 1) * (
        2 if kw.get("bidirectional") else 1), 3 if kw.get("batch_first") else 4, 7)
    with torch.no_grad():
        for args in ((x,), (x, h0)):
            out_a, h_a = a(*args)
            out, h = gru(*args)
            _close(out_a, out)
            _close(h_a, h)
        _close(a(x[:, 0])[0], gru(x[:, 0])[0])  # unbatched


def test_ideal_attention_with_kdim_vdim_and_transformer_decoder():
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=3, batch_first=True).eval()
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 6, 5), torch.randn(2, 6, 3)
    a = anl.convert(mha, IDEAL).eval()
    with torch.no_grad():
        for out_a, out in zip(a(q, k, v), mha(q, k, v)):
            _close(out_a, out)
    assert a.in_proj_weight is None and a.k_proj_weight.shape == (8, 5)
    _close(a.v_proj_weight, mha.v_proj_weight.detach(), 1e-6)
    dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    ad = anl.convert(dec, IDEAL).eval()
    tgt, mem = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    with torch.no_grad():
        _close(ad(tgt, mem), dec(tgt, mem))
    _close(ad.multihead_attn.in_proj_weight, dec.multihead_attn.in_proj_weight.detach(), 1e-6)


# -------------------------------------------------------------- one weight-noise draw per call
def test_grouped_layer_draws_the_weight_noise_of_all_groups_at_once(count_draws):
    # docs/model.md sec. 8: one draw per mini-batch; a grouped layer's G tiles in one draw, the
    # gradient back to each group's own weights.
    torch.manual_seed(16)
    a = anl.convert(nn.Conv2d(8, 8, 3, groups=4, padding=1), STD, DEV, rng=0).train()
    x = torch.randn(2, 8, 5, 5)
    a(x).square().mean().backward()
    assert count_draws == [(8, 18)]  # 4 groups x 2 outputs, 2 channels x 9 kernel elements
    assert all(g.tile.weight.grad is not None and bool(g.tile.weight.grad.abs().sum() > 0)
               for g in a.group_layers)
    a.eval()
    count_draws.clear()
    with torch.no_grad():
        a(x)
    assert count_draws == []


def test_gru_and_attention_draw_their_weight_noise_once_per_call(count_draws):
    # docs/model.md sec. 8: one draw per mini-batch. A GRU reads W_hh once per time step; cross-
    # attention reads the in-projection once per input: one draw per crossbar per call.
    torch.manual_seed(4)
    gru = anl.convert(nn.GRU(3, 4, num_layers=2), STD, DEV, rng=0).train()
    out1, _ = gru(torch.randn(6, 2, 3))  # 6 time steps
    assert len(count_draws) == 4  # (W_ih, W_hh) x 2 layers
    out2, _ = gru(torch.randn(6, 2, 3))
    assert len(count_draws) == 8 and not torch.equal(out1, out2)
    out1.sum().backward()  # the held draw keeps the straight-through gradient
    assert all(t.weight.grad.abs().sum() > 0 for t in gru.analog_tiles())
    count_draws.clear()
    mha = anl.convert(nn.MultiheadAttention(8, 2, batch_first=True), STD, DEV).train()
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    for args in ((q, kv, kv), (q, kv, torch.randn(2, 5, 8)), (q, q, q)):
        mha(*args)
    assert count_draws == [(24, 8), (8, 8)] * 3  # in-projection and output projection
    count_draws.clear()
    cross = anl.convert(nn.MultiheadAttention(8, 2, kdim=5, vdim=3), STD, DEV).train()
    cross(torch.randn(3, 2, 8), torch.randn(4, 2, 5), torch.randn(4, 2, 3))
    assert sorted(count_draws) == [(8, 3), (8, 5), (8, 8), (8, 8)]


# --------------------------------------------------- third-party linear maps, summary, strict
class Conv1D(nn.Module):
    """The transposed-weight linear map of GPT-style model code: weight (in, out),
    y = x @ W + b."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return y.reshape(*x.shape[:-1], self.nf)


class TinyGPTBlock(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.wte = nn.Embedding(11, d)
        self.ln = nn.LayerNorm(d)
        self.c_attn, self.c_proj = Conv1D(3 * d, d), Conv1D(d, d)
        self.c_fc, self.mlp_proj = Conv1D(2 * d, d), Conv1D(d, 2 * d)

    def forward(self, ids):
        x = self.wte(ids)
        q, k, v = self.c_attn(self.ln(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.c_proj(att @ v)
        return x + self.mlp_proj(F.gelu(self.c_fc(x)))


def test_unregistered_linear_maps_warn_or_raise_and_registered_ones_convert():
    torch.manual_seed(5)
    block, ids = TinyGPTBlock().eval(), torch.randint(0, 11, (2, 5))
    with pytest.warns(UserWarning, match=r"4 modules with weight matrices stay digital: "
                                         r"c_attn \(Conv1D\): no analog conversion"):
        _, summary = anl.convert(block, IDEAL, return_summary=True)
    assert summary.analog == [] and [n for n, *_ in summary.unsupported] == [
        "c_attn", "c_proj", "c_fc", "mlp_proj"]
    with pytest.raises(anl.AnalogConversionError, match=r"4 linear maps .*mlp_proj \(Conv1D\)"):
        anl.convert(block, IDEAL, inplace=True, strict=True)
    assert type(block.c_attn) is Conv1D  # nothing changed before the error
    anl.register_conversion(Conv1D, linear=lambda m: (m.weight.T, m.bias))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # embeddings and norms stay digital silently
            a, summary = anl.convert(block, IDEAL, strict=True, return_summary=True)
    finally:
        anl.unregister_conversion(Conv1D)
    assert [(n, d, c, t) for n, d, c, t in summary.analog] == [
        ("c_attn", "Conv1D", "AnalogLinear", 1), ("c_proj", "Conv1D", "AnalogLinear", 1),
        ("c_fc", "Conv1D", "AnalogLinear", 1), ("mlp_proj", "Conv1D", "AnalogLinear", 1)]
    assert summary.digital == [("wte", "Embedding", "no matrix-vector product"),
                               ("ln", "LayerNorm", "no matrix-vector product")]
    assert summary.n_tiles == 4 and "4 modules on 4 crossbar tiles" in str(summary)
    with torch.no_grad():
        _close(a.eval()(ids), block(ids))
    _close(a.c_attn.weight, block.c_attn.weight.detach().T, 1e-6)


def test_summary_names_digital_choices_and_refused_layers():
    class Tokens(nn.Module):  # positional embedding and class token: added, not multiplied
        def __init__(self):
            super().__init__()
            self.pos, self.cls = nn.Parameter(torch.zeros(1, 8)), nn.Parameter(torch.zeros(1, 8))

        def forward(self, x):
            return x + self.pos

    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), Tokens(),
                          nn.LSTM(8, 4, proj_size=2), nn.Linear(2, 3))
    with pytest.warns(UserWarning, match="1 modules with weight matrices stay digital: 3 "
                                         r"\(LSTM\): nn.LSTM with proj_size"):
        a, s = anl.convert(model, STD, digital=("4",), return_summary=True)
    assert [(n, t) for n, _, _, t in s.analog] == [("0", 1)]
    assert s.digital == [("1", "BatchNorm1d", "no matrix-vector product"),
                         ("2", "Tokens", "no weight matrix"),
                         ("3", "LSTM", "nn.LSTM with proj_size > 0 is not supported; keep it "
                          "digital"),
                         ("4", "Linear", "named in digital=")]
    assert s.unsupported == [s.digital[2]]
    assert type(a[3]) is nn.LSTM and type(a[4]) is nn.Linear


# ------------------------------------------------------------------------ drop-in behaviour
def test_weight_reads_like_torch_and_fast_path_stays_analog():
    lin = anl.convert(nn.Linear(5, 3), IDEAL).double()
    assert lin.weight.dtype == torch.float64 and lin.weight.shape == (3, 5)
    assert (lin.in_features, lin.out_features, lin.bias.shape) == (5, 3, (3,))
    # An encoder layer with digital attention and analog feed-forward layers: its fused
    # inference kernel would read linear1.weight and compute digitally; it must not run.
    torch.manual_seed(6)
    enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    coarse = crossbar.CrossbarConfig.ideal(inp_bits=3, inp_bound=1.0)
    a = anl.convert(enc, coarse, digital=("self_attn",)).eval()
    x = torch.randn(2, 3, 8)
    y_slow = a(x)  # gradient enabled: the ordinary path
    with torch.no_grad():
        y = a(x)
        assert not torch.allclose(y, enc(x), atol=1e-3)  # the 3-bit inputs show
    _close(y, y_slow.detach())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, groups=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(2.0 * x)).flatten(1)).log_softmax(-1)


def test_torch_compile_trains_and_evaluates_without_recompiling():
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    torch.manual_seed(7)
    a = anl.convert(Net(), STD, DEV)
    counter = CompileCounter()
    compiled = torch.compile(a, backend=counter)
    opt = torch.optim.SGD(a.parameters(), lr=0.01)
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,))
    frames = []
    for mode in ("train", "eval"):
        a.train(mode == "train")
        for step in range(3):
            with torch.set_grad_enabled(mode == "train"):
                loss = F.nll_loss(compiled(x), y)
            if mode == "train":
                opt.zero_grad()
                loss.backward()
                opt.step()
                anl.set_noise_scale(a, 0.5 + step)  # HWA noise ramp: no guard on it
            frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[:3] == [frames[0]] * 3 and frames[3:] == [frames[3]] * 3
    with torch.no_grad():  # the compiled model computes what the eager one does
        anl.reseed(a, 1)
        y_eager = a(x)
        anl.reseed(a, 1)
        _close(compiled(x), y_eager, 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_analog_in_float32_and_returns_autocast_dtype(dtype):
    torch.manual_seed(8)
    model = anl.convert(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), IDEAL,
                        digital=("0",))
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with torch.autocast("cpu", dtype=dtype):
        h = model[1](model[0](x))
        out = model(x)
        loss = F.cross_entropy(out, y)
    loss.backward()
    assert h.dtype == dtype and out.dtype == dtype
    _close(out, model[2](h.float()).to(dtype), 0)  # float32 analog MVM, then the cast
    assert model[2].tile.weight.grad.dtype == torch.float32
    assert model[2].tile.weight.grad.abs().sum() > 0 and model[0].weight.grad.abs().sum() > 0


def test_new_layers_program_drift_and_round_trip_state_dict():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2, padding=1, padding_mode="reflect"),
                          nn.ConvTranspose1d(4, 3, 2, stride=2), nn.GRU(6, 5, batch_first=True))
    x = torch.randn(2, 4, 3)  # the GRU reads (batch=2, time=3, 6)

    def run(m):
        with torch.no_grad():
            return m[2](m[1](m[0](x)).transpose(1, 2).reshape(2, 3, 6))[0]
    a = anl.convert(model, STD, DEV, rng=0).eval()
    anl.program(a, rng=1)
    anl.drift(a, 3600.0, rng=2)
    state = a.state_dict()
    b = anl.convert(model, STD, DEV, rng=5).eval()
    b.load_state_dict(state)
    anl.reseed(a, 3)
    anl.reseed(b, 3)
    assert all(t.is_programmed for t in anl.analog_tiles(b)) and len(anl.analog_tiles(b)) == 5
    torch.testing.assert_close(run(a), run(b), rtol=0, atol=0)


# ------------------------------------------------------------ grouped convolutions, one read
def test_grouped_layer_reads_all_groups_at_once_as_one_layer_per_group_would():
    # Each group keeps its own tiles (programming, drift, input ranges): read in one grouped
    # call, the layer gives what its groups give one by one (noise off: to rounding; an ADC
    # decision apart at most), in evaluation after programming and in a training step's
    # gradients; init_input_ranges sets each group's range from that group's channels.
    torch.manual_seed(11)
    quiet = crossbar.CrossbarConfig(out_noise=0.0, w_noise=0.0, max_rows=16)
    conv = nn.Conv2d(6, 4, 3, groups=2, padding=1)
    a = anl.convert(conv, quiet, DEV, rng=0)
    x = torch.randn(3, 6, 5, 5) * torch.linspace(0.5, 3.0, 6).reshape(6, 1, 1)
    anl.init_input_ranges(a, [x])
    alphas = torch.cat([layer.tile.alpha.detach() for layer in a.group_layers])
    _close(alphas, x.abs().amax(dim=(0, 2, 3)))  # one tile per channel: its abs-max

    def per_group(inp):
        parts = torch.split(inp, 3, dim=1)
        y = torch.cat([layer(p) for layer, p in zip(a.group_layers, parts)], dim=1)
        return y + a.bias.reshape(-1, 1, 1)

    a.train()
    anl.set_noise_scale(a, 0.0)
    for run in (a, per_group):
        a.zero_grad()
        run(x).square().sum().backward()
        if run is a:
            grads = [p.grad.clone() for p in a.parameters()]
    _close(torch.cat([g.flatten() for g in grads]),
           torch.cat([p.grad.flatten() for p in a.parameters()]), 1e-4)
    anl.program(a, rng=1)
    anl.drift(a, 3600.0, rng=2)
    a.eval()
    with torch.no_grad():
        y, y_groups = a(x), per_group(x)
    level = crossbar.periphery.quantizer_step(quiet.out_bits, quiet.out_bound)
    diff = (y - y_groups).abs()
    assert float((diff > 1e-5).float().mean()) <= 0.01 and float(diff.max()) < 2 * level * float(
        max(t.alpha.detach().max() * t._array.out_scale.max() for t in a.analog_tiles()))
    assert "group_layers.1.tile.prog_w" in a.state_dict() or any(  # one tile set per group
        k.startswith("group_layers.1.tile.prog_") for k in a.state_dict())


def test_grouped_layer_noise_matches_one_layer_per_group():
    # With the standard model's noise, the grouped read and the group-by-group read have the
    # same output distribution (KS on the outputs minus their noiseless values).
    torch.manual_seed(12)
    conv = nn.Conv2d(8, 8, 3, groups=8, padding=1)
    a = anl.convert(conv, STD, DEV, rng=0)
    anl.program(a, rng=1)
    a.eval()
    x = torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        quiet = dict(out_noise=0.0, w_noise=0.0)
        for t in a.analog_tiles():
            t.cfg = t.cfg.replace(**quiet)
        clean = a(x)
        for t in a.analog_tiles():
            t.cfg = STD
        grouped = torch.cat([(a(x) - clean).flatten() for _ in range(3)])
        parts = torch.split(x, 1, dim=1)
        one_by_one = torch.cat([(torch.cat([g(p) for g, p in zip(a.group_layers, parts)], 1)
                                 + a.bias.reshape(-1, 1, 1) - clean).flatten()
                                for _ in range(3)])
    assert stats.ks_2samp(grouped.numpy(), one_by_one.numpy()).pvalue > 1e-3
    assert float(grouped.std()) > 0


# ------------------------------------------------------------------- recurrent weights by name
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_recurrent_layers_expose_torch_weights_by_name(cls):
    torch.manual_seed(13)
    rnn = cls(5, 4, num_layers=2, bidirectional=True)
    a = anl.convert(rnn, IDEAL).double()
    assert a._flat_weights_names == rnn._flat_weights_names
    for name in rnn._flat_weights_names:
        mine = getattr(a, name)
        assert mine.dtype == torch.float64 and mine.shape == getattr(rnn, name).shape, name
        if name.startswith("weight") or cls is nn.GRU:
            _close(mine, getattr(rnn, name).detach().double(), 1e-6)
    for k in ("l0", "l1_reverse"):  # the LSTM adds its two biases in one digital vector
        _close(getattr(a, f"bias_ih_{k}") + getattr(a, f"bias_hh_{k}"),
               (getattr(rnn, f"bias_ih_{k}") + getattr(rnn, f"bias_hh_{k}")).detach().double())
    assert [len(w) for w in a.all_weights] == [4] * 4
    with pytest.raises(AttributeError):
        a.weight_ih_l2


# --------------------------------------------------------------------- whole-model casts
def test_a_cast_after_programming_keeps_the_programmed_state():
    a = anl.convert(nn.Sequential(nn.Linear(6, 5)), STD, DEV, rng=0).eval()
    anl.program(a, rng=1)
    anl.drift(a, 3600.0, rng=2)
    before = {k: v.clone() for k, v in a.state_dict().items() if ".prog_" in k}
    a.half()
    after = {k: v for k, v in a.state_dict().items() if ".prog_" in k}
    assert before and after.keys() == before.keys()
    for k, v in before.items():  # the same record, bit for bit, in its own dtype
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert a[0].tile.weight.dtype == torch.float16  # the parameters are cast


def test_programmed_operands_are_copied_once_per_state_and_seeded_by_programming():
    # A layer that computes in another dtype (or on another device) than its programmed array
    # copies the array once per programmed or drifted state; the same seed, the same outputs.
    torch.manual_seed(15)
    fp, x = nn.Sequential(nn.Linear(6, 5)), torch.randn(4, 6, dtype=torch.float64)
    outs = []
    for _ in range(2):
        a = anl.convert(fp, STD, DEV, rng=0).eval()
        anl.program(a, rng=1)
        a.double()  # the programmed array stays in float32
        tile = a[0].tile
        w = tile.operands(x.device, torch.float64)["w_tiles"][0]
        assert w.dtype == torch.float64 and tile._array.w_tiles[0].dtype == torch.float32
        assert tile.operands(x.device, torch.float64)["w_tiles"][0] is w  # kept
        with torch.no_grad():
            outs.append(a(x))
        anl.drift(a, 3600.0, rng=2)
        w_d = tile.operands(x.device, torch.float64)["w_tiles"][0]
        assert w_d is not w and not torch.equal(w_d, w)  # a drifted state: a new copy
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    arr = tile._array
    assert arr.mvm_generator_on(torch.device("cpu")) is arr.mvm_generator


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_model_cast_as_a_whole_runs_analog_in_float32_or_64(dtype):
    torch.manual_seed(14)
    fp = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(),
                       nn.Linear(4 * 4 * 4, 3))
    quiet = STD.replace(out_noise=0.0, w_noise=0.0)  # device noise, no per-MVM draws
    a = anl.convert(fp, quiet, DEV, rng=0).to(dtype)
    x = torch.randn(2, 2, 4, 4)
    a.train()
    out = a(x.to(dtype))
    assert out.dtype == dtype
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in a.parameters()
               if p.requires_grad and p.grad is not None)
    assert a[3].tile.weight.grad.abs().sum() > 0
    anl.program(a, rng=1)
    a.eval()
    with torch.no_grad():
        y = a(x.to(dtype))
        ref = anl.convert(fp, quiet, DEV, rng=0).to(torch.float64 if dtype == torch.float64
                                                    else torch.float32)
        ref.load_state_dict(a.state_dict())
        ref.eval()
        y, y_ref = a(x.to(dtype)), ref(x.to(dtype).to(ref[0].weight.dtype))
    assert y.dtype == dtype
    _close(y.double(), y_ref.to(dtype).double(), 0)  # float32 (64) analog, then the cast
