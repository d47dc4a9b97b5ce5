"""Regenerate the reference campaign from the rasch2023 preset and fit it into a device card.

Usage (from the repository root)::

    python calibration/make_reference.py            # writes the two files below
    python calibration/make_reference.py --check    # also fails unless the campaign's SHA-256
                                                    # matches the one recorded in models/README.md

Writes ``calibration/rasch2023-reference.h5`` (the campaign, ~7.7 MB, git-ignored: it is
regenerated bit for bit from the seed) and ``models/rasch2023-fitted.h5`` (the device card,
committed) with ``models/rasch2023-fitted.png`` (data against the fit), and prints the fitted
statistics next to the published ones.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np

from aimc_device import fit, io, pcm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAMPAIGN = "calibration/rasch2023-reference.h5"
CARD = "models/rasch2023-fitted.h5"
PLOT = "models/rasch2023-fitted.png"
#: The reference campaign's settings (every number of the recipe lives here).
SETTINGS = dict(preset="rasch2023", levels=20, devices_per_level=2000,
                times=(1.0, 10.0, 100.0, 1000.0, 10000.0, 86400.0), repeats=8, seed=2023)


def make_campaign(path: str) -> None:
    model = pcm.PCMModel.preset(SETTINGS["preset"])
    ds = pcm.simulate_campaign(model, SETTINGS["levels"], SETTINGS["devices_per_level"],
                               times=SETTINGS["times"], repeats=SETTINGS["repeats"],
                               rng=SETTINGS["seed"],
                               name=f"calibration/make_reference.py seed={SETTINGS['seed']}")
    del ds.attrs["date"]  # keeps the file bit-identical from run to run
    io.write_measurements(ds, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="fail unless the campaign SHA-256 matches models/README.md")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    make_campaign(CAMPAIGN)
    sha = io.file_sha256(CAMPAIGN)
    preset = pcm.PCMModel.preset(SETTINGS["preset"])
    model, report = fit.fit_pcm(io.read_measurements(CAMPAIGN), prior=preset,
                                name="rasch2023-fitted")
    prov = dict(report.provenance, source_file=CAMPAIGN, source_sha256=sha,
                command="python calibration/make_reference.py",
                campaign_settings=repr(SETTINGS))
    io.save_device_model(model, CARD, provenance=prov)
    report.plot(reference=preset).savefig(PLOT, dpi=100)
    print(report.summary())
    x = np.arange(1, SETTINGS["levels"] + 1) / SETTINGS["levels"]
    g = x * preset.g_max
    err = lambda a, b: float(np.max(np.abs(np.asarray(a) / np.asarray(b) - 1)))  # noqa: E731
    mu, sd = pcm.drift_exponent_stats(g, model)
    mu0, sd0 = pcm.drift_exponent_stats(g, preset)
    print("worst relative error against the preset over the levels:")
    sig, sig0 = pcm.programming_noise_std(g, model), pcm.programming_noise_std(g, preset)
    print(f"  sigma_P {err(sig, sig0):.4f}  mu_nu {err(mu, mu0):.4f}  sigma_nu {err(sd, sd0):.4f}"
          f"  Q_s {err(pcm.read_noise_q(x, model), pcm.read_noise_q(x, preset)):.4f}"
          f"  read_noise_coeff {model.read_noise_coeff / preset.read_noise_coeff - 1:+.4f}")
    print(f"campaign {CAMPAIGN} sha256 {sha}")
    print(f"wrote {CARD} and {PLOT}")
    if args.check:
        text = open(os.path.join(ROOT, "models", "README.md")).read()
        recorded = re.search(r"sha256[^0-9a-f]*([0-9a-f]{64})", text)
        if not recorded or recorded.group(1) != sha:
            print("campaign SHA-256 differs from models/README.md", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
