"""The GPU path: every analog layer, the device samplers of both families (faults included),
programming, drift and the evaluation over time on CUDA tensors, autocast and torch.compile there.

Marked ``cuda`` and skipped where no CUDA device exists (``pytest -m cuda`` runs only these).
On CUDA tensors the MVM runs on the torch reference of the engine and the devices are sampled by
the torch samplers of :mod:`aimc_device.pcm`; the statistics are checked against the Numba
samplers of the CPU (two-sample KS), the layers against floating point and the CPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from aimc_device import crossbar, fit, pcm
from aimc_device import nn as anl
from aimc_device.pcm import empirical_torch, torch_ops

pytestmark = pytest.mark.cuda

MODEL = pcm.PCMModel.preset("rasch2023")
G_MAX = MODEL.g_max
FAULTY = MODEL.replace(stuck_at_zero=0.03, stuck_at_gmax=0.02, stuck_at_random=0.05)
STD = crossbar.CrossbarConfig(max_rows=16)  # the standard model on small tiles
IDEAL = crossbar.CrossbarConfig.ideal(max_rows=16)


@pytest.fixture
def gpu() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


# (name, module factory, input shapes): one of each layer kind nn.convert takes
LAYERS = [
    ("linear", lambda: nn.Linear(24, 10), [(5, 24)]),
    ("linear 3-d", lambda: nn.Linear(24, 10), [(2, 5, 24)]),
    ("conv2d", lambda: nn.Conv2d(4, 6, 3, padding=1, stride=2), [(2, 4, 7, 7)]),
    ("grouped conv2d, reflect", lambda: nn.Conv2d(6, 6, 3, groups=3, padding=1,
                                                   padding_mode="reflect"), [(2, 6, 7, 7)]),
    ("depthwise conv1d, circular", lambda: nn.Conv1d(4, 8, 4, groups=4, padding="same",
                                                     padding_mode="circular"), [(2, 4, 11)]),
    ("conv-transpose2d", lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1,
                                                    output_padding=1), [(2, 4, 5, 5)]),
    ("conv-transpose1d, groups", lambda: nn.ConvTranspose1d(4, 6, 4, stride=3, padding=2,
                                                            groups=2), [(2, 4, 7)]),
    ("weight-norm conv1d", lambda: weight_norm(nn.Conv1d(8, 8, 3, padding=1, groups=4), dim=2),
     [(2, 8, 10)]),
    ("lstm", lambda: nn.LSTM(6, 8, num_layers=2, batch_first=True), [(3, 5, 6)]),
    ("gru, bidirectional", lambda: nn.GRU(6, 8, bidirectional=True), [(5, 3, 6)]),
    ("attention, kdim/vdim", lambda: nn.MultiheadAttention(8, 2, kdim=5, vdim=3,
                                                           batch_first=True),
     [(2, 4, 8), (2, 6, 5), (2, 6, 3)]),
    ("transformer encoder layer", lambda: nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.0, batch_first=True), [(2, 6, 16)]),
]
IDS = [name for name, _, _ in LAYERS]


def _inputs(shapes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device) for s in shapes]


@pytest.mark.parametrize("name,make,shapes", LAYERS, ids=IDS)
def test_each_layer_is_floating_point_when_ideal_and_matches_the_cpu(gpu, name, make, shapes):
    torch.manual_seed(0)
    fp = make().eval()
    a = anl.convert(fp, IDEAL).eval()
    xs = _inputs(shapes, "cpu")
    with torch.no_grad():
        want = _first(fp(*xs))
        cpu = _first(a(*xs))
        a.to(gpu)
        got = _first(a(*[x.to(gpu) for x in xs]))
    assert got.device.type == "cuda", name
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.cpu(), cpu, rtol=1e-4, atol=1e-4)
    w = getattr(a, "weight", None)
    if isinstance(w, torch.Tensor):  # the drop-in .weight lives where the layer does
        assert w.device.type == "cuda", name


@pytest.mark.parametrize("name,make,shapes", LAYERS, ids=IDS)
def test_each_layer_trains_programs_drifts_and_evaluates_on_cuda(gpu, name, make, shapes):
    # Hardware-aware training with device noise (faults included) from the torch sampler,
    # then programming, drift to one day and noisy evaluation: all on the GPU.
    torch.manual_seed(1)
    a = anl.convert(make(), STD, FAULTY, rng=0).to(gpu)
    xs = _inputs(shapes, gpu, seed=1)
    opt = anl.AnalogOptimizer(torch.optim.SGD(a.parameters(), lr=1e-2), a, steps_per_epoch=1)
    a.train()
    before = [p.detach().clone() for p in a.parameters()]
    out = _first(a(*xs))
    assert out.device.type == "cuda" and bool(torch.isfinite(out).all()), name
    out.square().mean().backward()
    grads = [p.grad for p in a.parameters() if p.grad is not None]
    assert grads and all(g.device.type == "cuda" and bool(torch.isfinite(g).all())
                         for g in grads), name
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, a.parameters())), name
    anl.program(a, rng=2)
    anl.drift(a, 86400.0, rng=3)
    a.eval()
    with torch.no_grad():
        y1, y2 = _first(a(*xs)), _first(a(*xs))
    assert y1.device.type == "cuda" and bool(torch.isfinite(y1).all()), name
    assert not torch.equal(y1, y2), name  # read and output noise: a new draw per call
    for tile in anl.analog_tiles(a):  # the programmed weights copied to the GPU once, kept
        ops = tile.operands(y1.device, torch.float32)
        assert ops["w_tiles"][0].device.type == "cuda", name
        assert ops["w_tiles"][0] is tile.operands(y1.device, torch.float32)["w_tiles"][0]


def test_programming_on_cuda_is_reproducible_by_seed(gpu):
    # The same seeds, the same programmed weights and the same noisy outputs on the GPU (the
    # per-MVM stream there seeded at programming).
    fp = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                       nn.Linear(8 * 6 * 6, 10))
    x = torch.randn(4, 3, 6, 6, device=gpu)
    outs = []
    for _ in range(2):
        a = anl.convert(fp, STD, FAULTY, rng=5).to(gpu)
        anl.program(a, rng=6)
        anl.drift(a, 3600.0, rng=7)
        a.eval()
        with torch.no_grad():
            outs.append([a(x), a(x)] + [t._array.w_tiles[0] for t in anl.analog_tiles(a)])
    assert not torch.equal(outs[0][0], outs[0][1])  # a new noise draw per call
    for v1, v2 in zip(*outs):
        torch.testing.assert_close(v1, v2, rtol=0, atol=0)


# --------------------------------------------------------------------- the device samplers
LEVELS = np.array([0.0, 0.02, 0.1, 0.25, 0.5, 0.75, 1.0]) * G_MAX


@pytest.mark.parametrize("t", [20.0, 3.15e7])
def test_pcm_sampler_on_cuda_matches_numba_per_level(gpu, t):
    n = 12_000
    g = np.repeat(LEVELS, n)
    s_nb = pcm.program(g, FAULTY, rng=33)
    r_nb = pcm.read(s_nb, t, FAULTY, rng=34)
    st = torch_ops.program_torch(torch.from_numpy(g).to(gpu), FAULTY, generator=35)
    assert st.g_prog.device.type == "cuda" and st.stuck.device.type == "cuda"
    r_t = torch_ops.read_torch(st, t, FAULTY, generator=36)
    assert r_t.device.type == "cuda"
    gp, nu, rt, stuck = (v.cpu().numpy() for v in (st.g_prog, st.nu, r_t, st.stuck))
    for k, level in enumerate(LEVELS):
        sl = slice(k * n, (k + 1) * n)
        for a, b in ((s_nb.g_prog, gp), (s_nb.nu, nu), (r_nb, rt)):
            assert stats.ks_2samp(a[sl], b[sl]).pvalue > 1e-4, (level / G_MAX, t)
        assert stats.binomtest(int(stuck[sl].sum()), n, 0.10).pvalue > 1e-3
    np.testing.assert_array_equal(rt[stuck], gp[stuck])  # stuck devices do not drift


def test_training_noise_on_cuda_has_the_numba_distribution(gpu):
    g = torch.full((40_000,), 0.4 * G_MAX, dtype=torch.float64)
    p_nb = anl.perturb_tensor(g, MODEL, rng=23)  # CPU tensor: the Numba kernel
    p_t = anl.perturb_tensor(g.to(gpu), MODEL, rng=23)
    assert p_t.device.type == "cuda"
    assert stats.ks_2samp(p_nb.numpy(), p_t.cpu().numpy()).pvalue > 1e-3


@pytest.fixture(scope="module")
def empirical():
    ds = pcm.simulate_rram_campaign(levels=8, devices_per_level=300, rng=11)
    return fit.fit_empirical(ds, times=ds["equivalent_time"].values)[0]


def test_empirical_sampler_on_cuda_matches_numba(gpu, empirical):
    model = empirical.replace(stuck_at_zero=0.05)
    g = np.repeat(model.levels[[1, 4, 7]], 6000) * model.g_max
    state = pcm.program(g, model, rng=1)
    ts = empirical_torch.program_torch(torch.as_tensor(g).to(gpu), model, generator=2)
    assert ts.z.device.type == "cuda"
    for t in (10.0, 4e4, 3.15e7):  # inside the measured times and extrapolated to 1 year
        r_nb = pcm.read(state, t, model, rng=3)
        r_t = empirical_torch.read_torch(ts, t, model, generator=4)
        assert r_t.device.type == "cuda"
        r_t = r_t.cpu().numpy()
        for k in range(3):
            rows = slice(6000 * k, 6000 * (k + 1))
            assert stats.ks_2samp(r_nb[rows], r_t[rows]).pvalue > 1e-3, (k, t)
    p_nb = pcm.perturb(g, model, t=20.0, rng=5)
    p_t = empirical_torch.perturb_torch(torch.as_tensor(g).to(gpu), model, t=20.0, generator=6)
    assert stats.ks_2samp(p_nb, p_t.cpu().numpy()).pvalue > 1e-3


def test_empirical_card_runs_the_whole_chain_on_cuda(gpu, empirical):
    torch.manual_seed(2)
    fp = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                       nn.Linear(4 * 5 * 5, 3))
    a = anl.convert(fp, STD, empirical, rng=0).to(gpu)
    x = torch.randn(6, 2, 5, 5, device=gpu)
    a.train()
    a(x).square().mean().backward()
    anl.program(a, rng=1)
    anl.drift(a, 3.15e7, rng=2)
    a.eval()
    with torch.no_grad():
        y = a(x)
    assert y.device.type == "cuda" and bool(torch.isfinite(y).all())


# -------------------------------------------------------------------- evaluation over time
def test_evaluate_over_time_on_cuda_is_reproducible(gpu):
    torch.manual_seed(3)
    fp = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(64, 12)
    labels = fp(x).argmax(1)  # the floating-point model is right by construction
    a = anl.convert(fp, STD, MODEL, rng=0).to(gpu)
    data = [(x.to(gpu), labels.to(gpu))]
    runs = [anl.evaluate_over_time(a, data, times=(1.0, 3600.0, 3.15e7), repeats=2, rng=4,
                                   progress=False) for _ in range(2)]
    err = runs[0]["error"].values
    assert err.shape == (2, 3) and np.all((err >= 0) & (err <= 1))
    np.testing.assert_array_equal(err, runs[1]["error"].values)


# ---------------------------------------------------------------- autocast and torch.compile
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cuda_trains_and_returns_the_autocast_dtype(gpu, dtype):
    torch.manual_seed(4)
    fp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    a = anl.convert(fp, STD, MODEL, rng=0).to(gpu)
    x = torch.randn(8, 16, device=gpu)
    a.train()
    with torch.autocast("cuda", dtype=dtype):
        out = a(x)
    assert out.dtype == dtype
    out.float().square().mean().backward()
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in a.parameters())
    anl.program(a, rng=1)
    a.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        y = a(x)
    assert y.dtype == dtype and bool(torch.isfinite(y).all())


def test_torch_compile_on_cuda_trains_and_evaluates(gpu):
    torch.manual_seed(5)
    fp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    quiet = STD.replace(out_noise=0.0, w_noise=0.0)  # no per-call noise: compiled == eager
    a = anl.convert(fp, quiet, MODEL, rng=0).to(gpu)
    compiled = torch.compile(a)
    x = torch.randn(8, 16, device=gpu)
    a.train()
    for _ in range(2):
        compiled(x).square().mean().backward()
    anl.program(a, rng=1)
    a.eval()
    with torch.no_grad():
        y = compiled(x)
        ref = a(x)
    assert y.device.type == "cuda" and bool(torch.isfinite(y).all())
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
