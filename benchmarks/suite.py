"""Speed of the analog layers across a suite of shapes, each case a ratio against the
floating-point module in the same process (interleaved timing blocks, median of the blocks).

(a) ``nn.Linear``, in/out features in {128, 512, 2048}, rows (vectors) in {64, 1024, 8192}, as a
    2-d input (rows, in) and as a 3-d token input (8, rows / 8, in);
(b) the convolutions of a ResNet-20-like CNN (3x3, 16-64 channels, 32x32 down to 8x8, with the
    stride-2 transitions), its 1x1 shortcuts, depthwise 3x3 layers and grouped 3x3 layers
    (ResNeXt-like: 8 and 32 groups), batch 32;
(c) whole networks: that CNN (batch 32 and 128), a 2-layer transformer encoder (d 256 and 512,
    sequence 64 and 256, batch 8) and a 2-layer LSTM (256 hidden, sequence 64, batch 32).

Every case runs the evaluation forward after programming (``nn.program``) with the full
standard model (``CrossbarConfig()``) and periphery only (no IR drop, no short-term noise);
whole networks also run the hardware-aware training step (forward, backward, SGD step). The
table gives the median and the worst ratio of each group, split by the inputs per tile (at
least 512, or fewer), against the targets below. A layer that ``nn.convert`` leaves digital is
listed as such and left out of the ratios.

Usage: python benchmarks/suite.py [--quick] [--threads 2] [--device cpu|cuda] [--json FILE]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from aimc_device import crossbar, pcm
from aimc_device import nn as anl

#: (group, model) -> (target median, worst for >= 512 inputs per tile, worst for fewer).
TARGETS = {
    ("layers eval", "periphery"): (1.3, 1.5, 2.2),
    ("layers eval", "full"): (3.0, 4.0, 5.0),
    ("networks eval", "full"): (None, 4.0, 4.0),
    ("networks HWA", "full"): (None, 2.5, 2.5),
}

CONFIGS = {"full": crossbar.CrossbarConfig(),
           "periphery": crossbar.CrossbarConfig(ir_drop=0.0, w_noise=0.0)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_ratio(fn, base, device, budget: float) -> tuple[float, float, float]:
    """Median over interleaved blocks of time(fn) / time(base), and the median block times [s];
    about ``budget`` seconds in all (at least 3 blocks)."""
    def timed(f, n):
        _sync(device)
        t = time.perf_counter()
        for _ in range(n):
            f()
        _sync(device)
        return (time.perf_counter() - t) / n

    fn(), base()  # warm-up (compilation, caches)
    once = timed(fn, 1) + timed(base, 1)
    inner = max(1, min(20, int(0.1 / max(once, 1e-6))))
    blocks = max(3, min(15, int(budget / max(once * inner, 1e-6))))
    ratios, t_fn, t_base = [], [], []
    for _ in range(blocks):
        tb = timed(base, inner)
        tf = timed(fn, inner)
        ratios.append(tf / tb)
        t_fn.append(tf)
        t_base.append(tb)
    med = statistics.median
    return med(ratios), med(t_fn), med(t_base)


# ------------------------------------------------------------------------------ networks
class _Block(nn.Module):
    """The basic residual block of ResNet-20 (He et al. 2016), 1x1 shortcut when the shape
    changes."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = None if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


def resnet20(n_classes: int = 10) -> nn.Module:
    """ResNet-20 for 3x32x32 images: 3 stages of 3 blocks, 16/32/64 channels."""
    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    c = 16
    for c_out, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(_Block(c, c_out, stride if i == 0 else 1))
            c = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, n_classes)]
    return nn.Sequential(*layers)


class _Encoder(nn.Module):
    """A transformer encoder (torch layers, batch first) with a linear read-out."""

    def __init__(self, d, heads, layers=2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.enc(x))


class _LSTM(nn.Module):
    def __init__(self, n_in=128, hidden=256, layers=2):
        super().__init__()
        self.lstm = nn.LSTM(n_in, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


# ------------------------------------------------------------------------------ cases
def linear_cases(quick: bool):
    feats = (128, 512, 2048)
    rows = (64, 1024) if quick else (64, 1024, 8192)
    for n_in in feats:
        for n_out in ((n_in,) if quick else feats):
            for r in rows:
                for dims in (2, 3):
                    shape = (r, n_in) if dims == 2 else (8, r // 8, n_in)
                    yield (f"Linear {n_in}->{n_out}, x {tuple(shape)}",
                           lambda n_in=n_in, n_out=n_out: nn.Linear(n_in, n_out), shape, n_in)


def conv_cases(quick: bool):
    b = 32
    convs = [  # (c_in, c_out, kernel, stride, groups, size)
        (3, 16, 3, 1, 1, 32), (16, 16, 3, 1, 1, 32), (16, 32, 3, 2, 1, 32),
        (32, 32, 3, 1, 1, 16), (32, 64, 3, 2, 1, 16), (64, 64, 3, 1, 1, 8),
        (16, 32, 1, 2, 1, 32), (64, 64, 1, 1, 1, 8),  # 1x1
        (32, 32, 3, 1, 32, 16), (64, 64, 3, 1, 64, 16), (64, 64, 3, 1, 64, 8),  # depthwise
        (64, 64, 3, 1, 8, 16), (128, 128, 3, 1, 32, 8),  # grouped (ResNeXt-like)
    ]
    if quick:
        convs = convs[1:2] + convs[4:7] + convs[8:10] + convs[11:12]
    for c_in, c_out, k, s, g, size in convs:
        rows_per_tile = min(c_in // g * k * k, 512)
        kind = "depthwise " if g == c_in else (f"grouped (g {g}) " if g > 1 else "")
        yield (f"{kind}Conv2d {c_in}->{c_out} {k}x{k}/{s}, {size}x{size}",
               lambda c_in=c_in, c_out=c_out, k=k, s=s, g=g: nn.Conv2d(
                   c_in, c_out, k, s, k // 2, groups=g), (b, c_in, size, size), rows_per_tile)


def network_cases(quick: bool):
    for b in ((32,) if quick else (32, 128)):
        yield f"ResNet-20, batch {b}", resnet20, (b, 3, 32, 32), 144
    for d, seq in (((256, 64),) if quick else ((256, 64), (512, 64), (256, 256), (512, 256))):
        yield (f"transformer d {d}, seq {seq}, batch 8",
               lambda d=d: _Encoder(d, 8 if d == 512 else 4), (8, seq, d), d)
    yield "LSTM 128->256 x2, seq 64, batch 32", _LSTM, (32, 64, 128), 128 + 256


def _analog(fp, cfg, device):
    """The converted model on ``device``, or None where nn.convert leaves it digital (or
    refuses it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analog = anl.convert(copy.deepcopy(fp), cfg, pcm.PCMModel.preset("rasch2023"), rng=0)
    except ValueError:
        return None
    if not list(anl.analog_tiles(analog)):
        return None
    return analog.to(device)


def _loss(out):
    return out.float().square().mean()


def run_layer(make, shape, cfg, device, budget):
    torch.manual_seed(0)
    fp = make().to(device).eval()
    analog = _analog(fp, cfg, device)
    if analog is None:
        return None
    anl.program(analog, rng=0)
    analog.eval()
    x = torch.randn(shape, device=device)
    with torch.no_grad():
        return paired_ratio(lambda: analog(x), lambda: fp(x), device, budget)


def run_network(make, shape, cfg, device, budget):
    torch.manual_seed(0)
    fp = make().to(device)
    analog = _analog(fp, cfg, device)
    if analog is None:
        return None, None
    x = torch.randn(shape, device=device)
    opt_fp = torch.optim.SGD(fp.parameters(), lr=1e-3, momentum=0.9)
    opt_a = anl.AnalogOptimizer(torch.optim.SGD(analog.parameters(), lr=1e-3, momentum=0.9),
                                analog, steps_per_epoch=1)

    def step(model, opt):
        def run():
            opt.zero_grad()
            _loss(model(x)).backward()
            opt.step()
        return run

    fp.train()
    analog.train()
    hwa = paired_ratio(step(analog, opt_a), step(fp, opt_fp), device, budget)
    fp.eval()
    anl.program(analog, rng=0)
    analog.eval()
    with torch.no_grad():
        ev = paired_ratio(lambda: analog(x), lambda: fp(x), device, budget)
    return ev, hwa


# ------------------------------------------------------------------------------ report
def summarise(results):
    """(group, model, wide) -> list of ratios; wide: >= 512 inputs per tile."""
    groups = {}
    for r in results:
        if r["ratio"] is None:
            continue
        groups.setdefault((r["group"], r["model"], r["rows_per_tile"] >= 512), []).append(
            r["ratio"])
    return groups


def table(results, device) -> str:
    lines = [f"{'group':<15} {'model':<10} {'inputs/tile':<12} {'n':>3} {'median':>7} "
             f"{'worst':>7}  {'target (median, worst)':<24} worst case"]
    for (group, model, wide), ratios in sorted(summarise(results).items()):
        t_med, t_wide, t_narrow = TARGETS.get((group.replace("linear", "layers").replace(
            "conv", "layers"), model), (None, None, None)) if device == "cpu" else (None,) * 3
        worst = max(ratios)
        case = max((r for r in results if r["group"] == group and r["model"] == model
                    and (r["rows_per_tile"] >= 512) == wide and r["ratio"] is not None),
                   key=lambda r: r["ratio"])["case"]
        t_worst = t_wide if wide else t_narrow
        target = "-" if t_worst is None else (
            f"<= {t_med}, <= {t_worst}" if t_med else f"<= {t_worst}")
        lines.append(f"{group:<15} {model:<10} {'>= 512' if wide else '< 512':<12} "
                     f"{len(ratios):>3} {statistics.median(ratios):>7.2f} {worst:>7.2f}  "
                     f"{target:<24} {case}")
    digital = sorted({r["case"] for r in results if r["ratio"] is None})
    if digital:
        lines.append("left digital by nn.convert (not in the ratios): " + "; ".join(digital))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a subset of each group (minutes)")
    ap.add_argument("--threads", type=int, default=2, help="torch and Numba threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timing per case (default 1.5, quick 0.6)")
    ap.add_argument("--json", default=None, help="write every case's figures to this file")
    ap.add_argument("--only", default=None, help="run the groups whose name contains this")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    budget = args.budget or (0.6 if args.quick else 1.5)
    if device.type == "cpu":
        import numba
        torch.set_num_threads(args.threads)
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    anl.retain_freed_memory()  # training scripts opt in: fewer page faults per step
    print(f"device {device}, torch threads {torch.get_num_threads()}, torch {torch.__version__}"
          f", {'quick' if args.quick else 'full'} suite", flush=True)
    results = []
    t0 = time.perf_counter()

    def record(group, model, case, rows_per_tile, res):
        ratio, t_a, t_fp = res if res is not None else (None, None, None)
        results.append(dict(group=group, model=model, case=case, rows_per_tile=rows_per_tile,
                            ratio=ratio, t_analog=t_a, t_fp=t_fp))
        shown = "left digital" if res is None else (
            f"{ratio:6.2f}x  ({1e3 * t_a:8.2f} ms vs {1e3 * t_fp:8.2f} ms)")
        print(f"  {group:<14} {model:<10} {case:<44} {shown}", flush=True)

    for group, cases in (("linear eval", linear_cases), ("conv eval", conv_cases)):
        if args.only and args.only not in group:
            continue
        for case, make, shape, rows in cases(args.quick):
            for model, cfg in CONFIGS.items():
                record(group, model, case, rows, run_layer(make, shape, cfg, device, budget))
    if not args.only or args.only in "networks":
        for case, make, shape, rows in network_cases(args.quick):
            for model, cfg in CONFIGS.items():
                ev, hwa = run_network(make, shape, cfg, device, budget)
                record("networks eval", model, case, rows, ev)
                record("networks HWA", model, case, rows, hwa)
    print(f"\n{time.perf_counter() - t0:.0f} s; ratios analog / floating point, same process\n")
    print(table(results, device.type))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=str(device), threads=torch.get_num_threads(),
                           quick=args.quick, results=results), fh, indent=1)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
