"""Fit throughput against a raw h5py read of the same file, and a streaming fit's peak memory.

Usage::

    python benchmarks/bench_fit.py                      # 1 GB throughput file, 3 GB streaming file
    python benchmarks/bench_fit.py --throughput-gb 0.5 --stream-gb 0   # skip the big file

1. Throughput: a campaign file of ``--throughput-gb`` is read raw with h5py (the same device
   chunks, into memory, nothing computed) and fitted with ``fit.fit_pcm(io.read_measurements())``
   and ``fit.fit_empirical(io.read_measurements())``; best of ``--repeat`` runs each, alternating,
   all from the page cache. Prints the rates [GB/s] and fit / raw for each family (from the page
   cache the raw read is a memory copy: a stricter test than part 2's file larger than RAM).
   Twice: a version-1 campaign (8 repeated reads at every time, the PCM fit's fast path) and a
   version-2 lab-like campaign of the same size (one read per time, 5 % of the reads missing: the
   general path); ``--no-v2`` skips the second, ``--no-v1`` the first. Rates and ratios are
   measured in one process, alternating, so a load from other work affects both alike; the
   absolute figures vary run to run on a shared machine. Also printed: CPU time per read
   (device x time x repeat) [ns] of each.
2. Streaming: a ``--stream-gb`` campaign file and a ``--small-gb`` one are generated block by
   block (flat memory) in a temporary folder (deleted afterwards); fits of the two run each in a
   fresh process that reports its peak RSS (resource.getrusage); flat memory means the two are
   close. ``--stream-version 2`` makes both files version-2 lab-like campaigns (one read per
   time, 5 % of the reads missing, a ``/valid`` mask). The big file is also read raw with h5py
   before and after each fit, and fit / raw is printed against the mean of the two: with a
   big file larger than RAM (``--stream-gb`` above the machine's memory) every pass reads it
   from the disk, the case this rate is about.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

from aimc_device import fit, io, pcm

TIMES = (1.0, 10.0, 100.0, 1000.0, 10000.0, 86400.0)
REPEATS = 8
LEVELS = 20
BLOCK_DEVICES = 20 * 10_000  # devices simulated per block while writing a big file


def make_file(path: str, gbytes: float, seed: int = 0, repeats: int = REPEATS,
              missing: float = 0.0) -> int:
    """Write a campaign of about ``gbytes`` GB of ``g`` block by block; returns devices.

    ``missing`` > 0: that fraction of reads is NaN and one device in 97 is marked invalid in
    ``/valid`` (schema version 2)."""
    model = pcm.PCMModel.preset("rasch2023")
    per_device = len(TIMES) * repeats * 4
    n = max(LEVELS * 10, int(gbytes * 1e9 // per_device) // LEVELS * LEVELS)
    hchunk = io.default_chunk_devices(len(TIMES), repeats, 4, 2**20)
    with h5py.File(path, "w") as f:
        f.attrs.update(schema=io.SCHEMA, schema_version=2 if missing else 1, g_max=model.g_max,
                       g_max_units="S", t0=model.t0, t0_units="s", t_read=model.t_read,
                       t_read_units="s", source="benchmarks/bench_fit.py")
        gt = f.create_dataset("g_target", shape=(n,), dtype=np.float32)
        gt.attrs["units"] = "S"
        f["time"] = np.asarray(TIMES)
        f["time"].attrs["units"] = "s"
        g = f.create_dataset("g", shape=(n, len(TIMES), repeats), dtype=np.float32,
                             chunks=(hchunk, len(TIMES), repeats))
        g.attrs["units"] = "S"
        valid = f.create_dataset("valid", shape=(n,), dtype=bool) if missing else None
        for b, start in enumerate(range(0, n, BLOCK_DEVICES)):
            m = min(BLOCK_DEVICES, n - start) // LEVELS
            ds = pcm.simulate_campaign(model, LEVELS, m, times=TIMES, repeats=repeats,
                                       rng=[seed, b], missing=missing)
            stop = start + ds.sizes["device"]
            gt[start:stop] = ds["g_target"].values
            g[start:stop] = ds["g"].values
            if valid is not None:  # version 2: one device in 97 marked invalid
                valid[start:stop] = np.arange(start, stop) % 97 != 0
    return n


def raw_read(path: str) -> tuple[float, float]:
    """Wall and CPU seconds to read all of /g with h5py in the fit's device chunks."""
    t, c = time.perf_counter(), time.process_time()
    with h5py.File(path, "r") as f:
        d = f["g"]
        k = io.default_chunk_devices(d.shape[1], d.shape[2], d.dtype.itemsize)
        k = max(d.chunks[0], k // d.chunks[0] * d.chunks[0])
        buf = np.empty((k,) + d.shape[1:], d.dtype)
        for start in range(0, d.shape[0], k):
            stop = min(d.shape[0], start + k)
            d.read_direct(buf, np.s_[start:stop], np.s_[0:stop - start])
    return time.perf_counter() - t, time.process_time() - c


FAMILIES = {"pcm": fit.fit_pcm, "empirical": fit.fit_empirical}


def fit_file(path: str, family: str = "pcm") -> tuple[float, float]:
    """Wall and CPU seconds (all threads) of the family's fit on the lazily read file."""
    t, c = time.perf_counter(), time.process_time()
    FAMILIES[family](io.read_measurements(path, check_values=False))
    return time.perf_counter() - t, time.process_time() - c


def peak_rss_of_fit(path: str, family: str = "pcm") -> dict:
    """Fit ``path`` in a fresh process; its wall time [s] and peak RSS [MB]."""
    out = subprocess.run([sys.executable, __file__, "--_fit-only", path, "--family", family],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def throughput(path: str, args, label: str, families, **kw) -> None:
    """Part 1 for one kind of campaign (``kw`` as for :func:`make_file`)."""
    n = make_file(path, args.throughput_gb, **kw)
    repeats = kw.get("repeats", REPEATS)
    nbytes = n * len(TIMES) * repeats * 4
    for fam in families:
        fit_file(path, fam)  # compile, warm the page cache
    raw_read(path)
    raw, fitted = [], {fam: [] for fam in families}
    for _ in range(args.repeat):
        raw.append(raw_read(path))
        for fam in families:
            fitted[fam].append(fit_file(path, fam))
    gb = nbytes / 1e9
    w_raw, c_raw = min(r[0] for r in raw), min(r[1] for r in raw)
    what = (f"{kw.get('missing', 0) * 100:.0f} % of reads missing" if kw.get("missing")
            else "no read missing")
    print(f"throughput, {label} campaign: {n} devices, g = {gb:.2f} GB (float32, T={len(TIMES)}, "
          f"R={repeats}, {what}), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    cells = nbytes / 4
    print(f"  raw h5py read   {gb / w_raw:6.2f} GB/s wall ({w_raw:.3f} s), CPU {c_raw:.3f} s "
          f"({c_raw / cells * 1e9:.2f} ns per read)")
    for fam in families:
        w_fit = min(r[0] for r in fitted[fam])
        c_fit = min(r[1] for r in fitted[fam])
        print(f"  fit_{fam:<10s}{gb / w_fit:6.2f} GB/s wall ({w_fit:.3f} s), CPU {c_fit:.3f} "
              f"s (all threads, {c_fit / cells * 1e9:.2f} ns per read); ratio fit / raw "
              f"{w_raw / w_fit:5.2f} wall-clock rate (page cache), {c_raw / c_fit:.2f} in "
              "CPU time")
    os.unlink(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--throughput-gb", type=float, default=1.0,
                    help="size of g [GB] for part 1; 0 skips part 1")
    ap.add_argument("--stream-gb", type=float, default=3.0,
                    help="size of g [GB] of the big file of part 2; 0 skips part 2")
    ap.add_argument("--small-gb", type=float, default=0.2,
                    help="size of g [GB] of the small file of part 2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="folder for the temporary files")
    ap.add_argument("--no-v2", action="store_true",
                    help="skip the version-2 campaign (one read per time, missing reads)")
    ap.add_argument("--no-v1", action="store_true",
                    help="skip the version-1 campaign (8 repeats, no read missing)")
    ap.add_argument("--stream-version", type=int, choices=(1, 2), default=1,
                    help="campaign of part 2: version 1 (8 repeats) or 2 (one read per time, "
                         "5 %% missing)")
    ap.add_argument("--family", choices=sorted(FAMILIES), action="append",
                    help="families to measure (default both)")
    ap.add_argument("--_fit-only", dest="fit_only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    families = args.family or ["pcm", "empirical"]
    if args.fit_only:
        wall, _ = fit_file(args.fit_only, families[0])
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB -> MB (Linux)
        print(json.dumps({"wall_s": wall, "peak_rss_mb": rss}))
        return
    tmp = tempfile.mkdtemp(prefix="aimc-bench-fit-", dir=args.dir)
    try:
        cases = [("version 1", {}), ("version 2", {"repeats": 1, "missing": 0.05})]
        for label, kw in (cases[args.no_v1:1 if args.no_v2 else 2]
                          if args.throughput_gb > 0 else []):
            throughput(os.path.join(tmp, "throughput.h5"), args, label, families, **kw)
        if args.stream_gb > 0:
            label, kw = cases[args.stream_version - 1]
            small = os.path.join(tmp, "small.h5")
            make_file(small, args.small_gb, **kw)
            big = os.path.join(tmp, "big.h5")
            t = time.perf_counter()
            n_big = make_file(big, args.stream_gb, seed=1, **kw)
            gen = time.perf_counter() - t
            size_small = os.path.getsize(small) / 1e9
            size_big = os.path.getsize(big) / 1e9
            print(f"streaming, {label} campaign: generated {n_big} devices, {size_big:.2f} GB "
                  f"in {gen:.0f} s")
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
            print(f"  the big file is {size_big / ram:.2f} x this machine's RAM ({ram:.1f} GB)"
                  + (": every pass reads it from the disk" if size_big > ram else ""))
            raw_before = raw_read(big)[0]
            for fam in families:
                a, b = peak_rss_of_fit(small, fam), peak_rss_of_fit(big, fam)
                raw_after = raw_read(big)[0]
                raw = 0.5 * (raw_before + raw_after)
                print(f"  fit_{fam} of {size_small:.2f} GB file: peak RSS "
                      f"{a['peak_rss_mb']:7.0f} MB ({a['wall_s']:.1f} s)")
                print(f"  fit_{fam} of {size_big:.2f} GB file: peak RSS {b['peak_rss_mb']:7.0f} MB "
                      f"({b['wall_s']:.1f} s, {size_big / b['wall_s']:.2f} GB/s)")
                print(f"  peak RSS ratio big / small {b['peak_rss_mb'] / a['peak_rss_mb']:.2f} "
                      f"for a file {size_big / size_small:.0f}x larger")
                print(f"  raw h5py read of the big file before and after: {raw_before:.1f} s, "
                      f"{raw_after:.1f} s ({size_big / raw:.2f} GB/s); ratio fit / raw "
                      f"{raw / b['wall_s']:.2f} wall-clock rate (target >= 0.50 for a file "
                      "larger than RAM)")
                raw_before = raw_after
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
