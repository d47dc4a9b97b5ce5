"""The analog engine on a CUDA device: a correctness check against the CPU reference, then the
speed suite (``suite.py``) on the GPU, printed as one table. Runs in a few minutes.

Every layer runs on CUDA tensors through the torch reference of the MVM (the Numba backend is
for CPU tensors only); device noise for hardware-aware training comes from the torch sampler.
The ratios are against the floating-point modules on the same GPU, in the same process.

Usage: python benchmarks/gpu_check.py [--full] [--device cuda:0]
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import suite  # noqa: E402  (benchmarks/suite.py)

from aimc_device.crossbar import CrossbarConfig, EngineOptions, analog_conv, analog_mvm  # noqa: E402


def correctness(device) -> list[str]:
    """Max |GPU - CPU reference| / ADC level of the MVM and the convolution, noise off, for the
    standard periphery and the options the fast CPU backend does not serve."""
    rows = []
    g = torch.Generator().manual_seed(0)
    w = [torch.rand(64, 288, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2)]
    x = torch.randn(128, 576, generator=g, dtype=torch.float64)
    img = torch.randn(4, 64, 8, 8, generator=g, dtype=torch.float64)
    alpha = torch.full((2,), 2.0, dtype=torch.float64)
    scale = torch.rand(2, 64, generator=g, dtype=torch.float64) + 0.5
    ref = EngineOptions(backend="reference")
    level = 20.0 / 254 * float((alpha[:, None] * scale).max())
    for name, extra in (("standard", {}), ("S-shaped ADC", {"s_adc": True}),
                        ("abs-max noise management", {"noise_management": "abs_max"}),
                        ("iterative bound management", {"bound_management": "iterative"})):
        cfg = CrossbarConfig(out_noise=0.0, w_noise=0.0, **extra)
        on = [t.to(device) for t in w], cfg, alpha.to(device), scale.to(device)
        d = (analog_mvm(x.to(device), *on).cpu() - analog_mvm(x, w, cfg, alpha, scale,
                                                                options=ref)).abs().max()
        line = f"MVM {name:<28} max |GPU - CPU| = {float(d) / level:.3g} ADC levels"
        if name in ("standard", "S-shaped ADC"):
            kw = dict(channel_sizes=[32, 32], kernel_size=(3, 3), padding=(1, 1))
            d = (analog_conv(img.to(device), *on, **kw).cpu()
                 - analog_conv(img, w, cfg, alpha, scale, options=ref, **kw)).abs().max()
            line += f"; convolution {float(d) / level:.3g}"
        rows.append(line)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--full", action="store_true", help="the full suite (longer)")
    ap.add_argument("--json", default=None, help="write every case's figures to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    t0 = time.perf_counter()
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    checks = correctness(device)
    results = suite.main(["--device", str(device), "--budget", "0.5"]
                         + ([] if args.full else ["--quick"])
                         + ([] if args.json is None else ["--json", args.json]))
    print("\n" + "\n".join(checks))
    print(f"\ngpu_check: {time.perf_counter() - t0:.0f} s")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
