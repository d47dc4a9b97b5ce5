"""Regenerate the reference campaign from the rasch2023 preset and fit it into a device card.

Usage (from the repository root)::

    python calibration/make_reference.py              # into a new temporary folder (printed)
    python calibration/make_reference.py --out DIR    # into DIR
    python calibration/make_reference.py --check     # and compare with the committed card
    python calibration/make_reference.py --update    # and replace the committed files

Writes three files into the output folder: ``rasch2023-reference.h5`` (the campaign, ~7.7 MB,
never committed: it is regenerated bit for bit from the seed), ``rasch2023-fitted.h5`` (the
device card) and ``rasch2023-fitted.png`` (data against the fit), and prints the fitted
statistics next to the published ones. Every file is the same, byte for byte, on every run with
the same package version: no timestamps (the campaign has no ``date`` attribute, the card's
provenance none either, the HDF5 objects no creation times, the PNG no software metadata).

``--check`` fails (exit status 1) unless the campaign's SHA-256 equals the one recorded in
``models/README.md`` and every model field of the card equals that of the committed
``models/rasch2023-fitted.h5`` exactly. ``--update`` copies the card and the plot into
``models/`` and writes the campaign's SHA-256 and the worst deviations from the preset into
``models/README.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import sys
import tempfile
import textwrap

import numpy as np

from aimc_device import fit, io, pcm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")
CAMPAIGN = "rasch2023-reference.h5"
CARD = "rasch2023-fitted.h5"
PLOT = "rasch2023-fitted.png"
#: The reference campaign's settings (every number of the recipe lives here).
SETTINGS = dict(preset="rasch2023", levels=20, devices_per_level=2000,
                times=(1.0, 10.0, 100.0, 1000.0, 10000.0, 86400.0), repeats=8, seed=2023)
#: Where models/README.md records the campaign's SHA-256 and the worst deviations.
_SHA_LINE = re.compile(r"(campaign sha256: `)([0-9a-f]{64})(`)")
_DEVIATIONS = re.compile(r"Worst relative deviation from the preset over the \d+ levels:.*?\)\.",
                         re.DOTALL)


def make_campaign(path: str, settings: dict) -> None:
    """Simulate the campaign of ``settings`` and write it to ``path`` (no date attribute)."""
    model = pcm.PCMModel.preset(settings["preset"])
    ds = pcm.simulate_campaign(model, settings["levels"], settings["devices_per_level"],
                               times=settings["times"], repeats=settings["repeats"],
                               rng=settings["seed"],
                               name=f"calibration/make_reference.py seed={settings['seed']}")
    del ds.attrs["date"]  # keeps the file bit-identical from run to run
    io.write_measurements(ds, path)


def deviations(model: pcm.PCMModel, preset: pcm.PCMModel, levels: int) -> dict:
    """Worst relative deviation of each fitted statistic from the preset over the target levels
    g = k / levels * g_max, k = 1..levels (fractions; the read-noise coefficient signed)."""
    x = np.arange(1, levels + 1) / levels
    g = x * preset.g_max

    def worst(a, b):
        return float(np.max(np.abs(np.asarray(a) / np.asarray(b) - 1)))

    mu, sd = pcm.drift_exponent_stats(g, model)
    mu0, sd0 = pcm.drift_exponent_stats(g, preset)
    return {"sigma_P": worst(pcm.programming_noise_std(g, model),
                             pcm.programming_noise_std(g, preset)),
            "mu_nu": worst(mu, mu0), "sigma_nu": worst(sd, sd0),
            "Q_s": worst(pcm.read_noise_q(x, model), pcm.read_noise_q(x, preset)),
            "read_noise_coeff": model.read_noise_coeff / preset.read_noise_coeff - 1}


def deviation_sentence(dev: dict, levels: int) -> str:
    """The sentence of models/README.md that records :func:`deviations`, wrapped at 100
    columns between the quantities."""
    items = [f"{k} {100 * dev[k]:.1f} %" for k in ("sigma_P", "mu_nu", "sigma_nu", "Q_s")]
    items.append(f"(read-noise coefficient {100 * dev['read_noise_coeff']:+.2f} %).")
    text = (f"Worst relative deviation from the preset over the {levels} levels: "
            + ", ".join(items[:4]) + " " + items[4])
    glued = [i.replace(" ", "\0") for i in items]  # no line break inside a quantity
    for item, g in zip(items, glued):
        text = text.replace(item, g)
    return textwrap.fill(text, width=100, break_on_hyphens=False).replace("\0", " ")


def make_reference(out_dir: str, settings: dict = SETTINGS) -> dict:
    """Write the campaign, the device card and the plot of ``settings`` into ``out_dir``.

    Returns a dict with the paths (``campaign``, ``card``, ``plot``), the campaign's ``sha256``,
    the fitted ``model``, the fit ``report`` and the worst ``deviations`` from the preset.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, name)
             for k, name in (("campaign", CAMPAIGN), ("card", CARD), ("plot", PLOT))}
    make_campaign(paths["campaign"], settings)
    sha = io.file_sha256(paths["campaign"])
    preset = pcm.PCMModel.preset(settings["preset"])
    model, report = fit.fit_pcm(io.read_measurements(paths["campaign"]), prior=preset,
                                name="rasch2023-fitted")
    # The provenance names the campaign by its recipe and SHA-256 instead of a date, so that
    # the card is the same file on every run.
    prov = dict(report.provenance, source_file=CAMPAIGN, source_sha256=sha,
                command="python calibration/make_reference.py",
                campaign_settings=repr(settings), date=None)
    io.save_device_model(model, paths["card"], provenance=prov)
    report.plot(reference=preset).savefig(paths["plot"], dpi=100, metadata={"Software": None})
    return dict(paths, sha256=sha, model=model, report=report,
                deviations=deviations(model, preset, settings["levels"]))


def check(result: dict, models_dir: str = MODELS) -> list[str]:
    """What differs between a fresh result and the committed one (empty when nothing does):
    the campaign's SHA-256 against models/README.md, each model field against the card."""
    problems = []
    readme = os.path.join(models_dir, "README.md")
    with open(readme) as fh:
        recorded = _SHA_LINE.search(fh.read())
    if recorded is None:
        problems.append(f"{readme}: no line 'campaign sha256: `<64 hex digits>`'")
    elif recorded.group(2) != result["sha256"]:
        problems.append(f"campaign SHA-256 {result['sha256']} differs from {recorded.group(2)} "
                        f"recorded in {readme}")
    card = os.path.join(models_dir, CARD)
    if not os.path.isfile(card):
        return problems + [f"{card}: no committed card (make one with --update)"]
    committed = io.load_device_model(card)
    for f in dataclasses.fields(pcm.PCMModel):
        new, old = getattr(result["model"], f.name), getattr(committed, f.name)
        if new != old:
            problems.append(f"{CARD}: {f.name} = {new!r}, committed {old!r}")
    return problems


def update(result: dict, levels: int, models_dir: str = MODELS) -> None:
    """Copy the card and the plot into ``models_dir`` and record the campaign's SHA-256 and the
    worst deviations in its README.md."""
    readme = os.path.join(models_dir, "README.md")
    with open(readme) as fh:
        text = fh.read()
    if not _SHA_LINE.search(text) or not _DEVIATIONS.search(text):
        raise SystemExit(f"{readme}: expected the line 'campaign sha256: `...`' and the "
                         "sentence 'Worst relative deviation from the preset over ...'")
    text = _SHA_LINE.sub(lambda m: m.group(1) + result["sha256"] + m.group(3), text)
    text = _DEVIATIONS.sub(lambda m: deviation_sentence(result["deviations"], levels), text)
    for key in ("card", "plot"):
        shutil.copyfile(result[key], os.path.join(models_dir, os.path.basename(result[key])))
    with open(readme, "w") as fh:
        fh.write(text)


def main(argv=None, settings: dict = SETTINGS, models_dir: str = MODELS) -> int:
    """The command line; ``settings`` and ``models_dir`` let tests run a small recipe against
    a folder of their own."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", metavar="DIR",
                    help="output folder (default: a new temporary folder)")
    ap.add_argument("--check", action="store_true",
                    help="fail unless the campaign SHA-256 and the card's model equal the "
                         "committed ones")
    ap.add_argument("--update", action="store_true",
                    help="replace the card, the plot, the SHA-256 and the deviations in models/")
    args = ap.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="aimc-reference-")
    result = make_reference(out, settings)
    print(result["report"].summary())
    print("worst relative deviation from the preset over the levels:")
    print("  " + "  ".join(f"{k} {v:+.4f}" if k == "read_noise_coeff" else f"{k} {v:.4f}"
                           for k, v in result["deviations"].items()))
    print(f"campaign sha256 {result['sha256']}")
    print(f"wrote {result['campaign']}, {result['card']} and {result['plot']}")
    status = 0
    if args.check:
        problems = check(result, models_dir)
        for line in problems:
            print(line, file=sys.stderr)
        print("check: " + ("FAILED" if problems else f"the card and the campaign equal those "
                                                       f"in {models_dir}"))
        status = 1 if problems else 0
    if args.update:
        update(result, settings["levels"], models_dir)
        print(f"updated {models_dir}: {CARD}, {PLOT}, README.md")
    return status


if __name__ == "__main__":
    sys.exit(main())
