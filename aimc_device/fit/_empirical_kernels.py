"""Numba kernels of the empirical fit's streaming pass over a device chunk.

Per (level, time) a histogram of one read per device, d = g / g_max - x (the deviation from the
target, relative to g_max), in bins of constant relative width: the bin of |d| is read from the
float32 bits of |d| -- its exponent and the ``MANT_BITS`` leading mantissa bits -- so every bin
is 2^-MANT_BITS (0.8 %) of |d| wide, from 2^-18 (~4e-6, below: one central bin) to 4 (above:
the last bin), whatever the scale of the spread. Counts are integers and the extremes are kept
as minima and maxima, so the merged histograms do not depend on how chunks are split among
threads. The float sums (moments, trend residuals) are returned per chunk and added in chunk
order by the caller; the repeat variances come from the sampled devices (:func:`sample_rows`).

Two kernels fill them: :func:`chunk_kernel`, one device at a time (any number of reads per time,
per-device times), and :func:`one_read_kernel` for one read per time at shared times, in SIMD
passes over a level's devices (compared with chunk_kernel in the tests). The plain numpy
reference of the binning is in the tests.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from numba.core import types
from numba.extending import overload


_FM1 = np.uint64(0xFF51AFD7ED558CCD)
_FM2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


@nb.njit("uint64(uint64, uint64)", cache=True, inline="always")
def device_hash(key, i):  # pragma: no cover - via tests
    """A 64-bit hash of (key, device index): MurmurHash3's fmix64 finaliser of key ^ index
    (A. Appleby, MurmurHash3, public domain), for order-independent device samples."""
    z = key ^ (i * _FM2 + _FM1)
    z = (z ^ (z >> _S33)) * _FM1
    z = (z ^ (z >> _S33)) * _FM2
    return z ^ (z >> _S33)


#: Leading mantissa bits of |d| that select a bin within an octave.
MANT_BITS = 7
#: Biased float32 exponents of the smallest and the first excluded octave of |d|: 2^-18 .. 2^2.
E_LO = 127 - 18
E_HI = 127 + 2
N_SIDE = (E_HI - E_LO) << MANT_BITS
N_BINS = 2 * N_SIDE + 1
CENTER = N_SIDE
#: Float sums per (level, time) of one chunk: missing reads (devices without a read), the sum
#: of squared deviations of repeated reads from their mean (sampled devices), its dof.
N_CELL_SUMS = 3
#: Sums per level: devices used, excluded, stuck, trend residual sum of squares, its dof.
N_LEVEL_SUMS = 5
_MASK = (1 << MANT_BITS) - 1


def bin_edges() -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper edges of every bin of d (relative to g_max), in bin order."""
    pos = np.arange(N_SIDE)
    scale = np.ldexp(1.0, (pos >> MANT_BITS) + E_LO - 127)
    lo = scale * (1.0 + (pos & _MASK) / (1 << MANT_BITS))
    hi = scale * (1.0 + ((pos & _MASK) + 1) / (1 << MANT_BITS))
    small = np.ldexp(1.0, E_LO - 127)
    return (np.concatenate([-hi[::-1], [-small], lo]),
            np.concatenate([-lo[::-1], [small], hi]))


@nb.njit(cache=True, inline="always")
def bin_of(d):  # pragma: no cover - via tests
    """The bin of deviation d, from the bits of float32(|d|)."""
    b = np.float32(abs(d)).view(np.uint32)
    e = np.int64(b >> np.uint32(23)) - E_LO  # < 0: |d| below the first octave
    pos = (e << MANT_BITS) | np.int64((b >> np.uint32(23 - MANT_BITS)) & np.uint32(_MASK))
    pos = min(max(pos, -1), N_SIDE - 1)  # -1: the central bin
    sign = 2 * np.int64(d > 0) - 1  # branch-free: the sign of d is unpredictable
    return CENTER + sign * (pos + 1)


@nb.njit(cache=True, inline="always")
def bin_of_simd(d):  # pragma: no cover - via tests
    """:func:`bin_of` in the form LLVM vectorises (AVX2 has no 64-bit product; in a scalar
    loop bin_of's form is the faster): the bits from bit 23 - MANT_BITS up of float32(|d|),
    the sign applied by xor and subtraction. Equal to bin_of for every d (tested)."""
    b = np.float32(abs(d)).view(np.int32)
    pos = (b >> (23 - MANT_BITS)) - (E_LO << MANT_BITS)  # < 0: below the first octave
    pos = min(max(pos, -1), N_SIDE - 1)  # -1: the central bin
    neg = np.int64(d > 0) - 1  # 0 for d > 0, else -1 (all bits)
    return CENTER + (((pos + 1) ^ neg) - neg)


@nb.njit(cache=True, inline="always")
def _level(levels, v):  # pragma: no cover - via tests
    k = np.searchsorted(levels, v)
    if k < levels.shape[0] and levels[k] == v:
        return k
    return -1


@nb.njit(cache=True, inline="always")
def _first(g, i, m):  # pragma: no cover - via tests
    """The first repeat of device i at time m that was read (NaN if none)."""
    for r in range(g.shape[2]):
        v = g[i, m, r]
        if v == v:
            return v
    return g[i, m, 0]


@nb.njit(cache=True, inline="always")
def _is_stuck(g, i, inv_gmax, stuck_below):  # pragma: no cover - via tests
    """All reads of device i below stuck_below (relative), and at least one read."""
    top = -1.0
    for m in range(g.shape[1]):
        v = _first(g, i, m)
        if v == v:
            top = max(top, v * inv_gmax)
    return top >= 0 and top < stuck_below


# Reassociation lets LLVM vectorise the repeat sums; no "nnan"/"ninf", the NaN checks stay.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}


@nb.njit(cache=True, inline="always")
def _repeats(g, i, m, v0):  # pragma: no cover - via tests
    """(reads, sum and sum of squares of (read - v0)) of the repeats of device i at time m."""
    k = 0
    acc = 0.0
    acc2 = 0.0
    for r in range(g.shape[2]):
        v = g[i, m, r]
        if v == v:
            dv = np.float64(v) - v0
            acc += dv
            acc2 += dv * dv
            k += 1
    return k, acc, acc2


@nb.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def first_bad_device(g):  # pragma: no cover - via tests
    """The first device (index in the chunk) with a negative or infinite read, or -1: a
    branch-free pass over all reads (NaN passes), then a search only when one is found."""
    flat = g.reshape(-1)
    bad = False
    for j in range(flat.shape[0]):
        v = flat[j]
        bad |= (v < 0) | (v == np.inf)
    if not bad:
        return -1
    per = g.shape[1] * g.shape[2]
    for j in range(flat.shape[0]):
        if flat[j] < 0 or flat[j] == np.inf:
            return j // per
    return -1


@nb.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def chunk_kernel(g, g_target, use, levels, x_lv, inv_gmax, s, stuck_below, hist, lohi, sums,
                 lvl, tsum):  # pragma: no cover - via tests
    """Add one device chunk to the histograms and sums of the empirical fit.

    Parameters
    ----------
    g : (n, T, R) reads [S], NaN = not read (checked for negative or infinite reads by
    :func:`first_bad_device`); g_target : (n,) [S]; use : (n,) bool, False for devices left
    out; levels : (K,) sorted distinct targets [S] (g_target's dtype); x_lv : (K,) relative
    targets; inv_gmax : 1 / g_max [1/S]; s : (n or 1, T) log-times ln((t + t0) / t0) (NaN: that
    read is taken as missing); stuck_below : a device whose reads all lie below this relative
    conductance is stuck (<= 0: no rule);
    hist : (K, T, >= N_BINS) int32 or int64, lohi : (K, T, 2) min and max of d -- both
    accumulated; sums : (K, T, N_CELL_SUMS) (column 0), lvl : (K, N_LEVEL_SUMS), tsum : (T, 2)
    sum of s and reads per time (per-device times only) -- zeroed, this chunk's.

    The histogram takes one read per device and time (the first repeat that was read); the
    trend residuals (columns 3, 4 of ``lvl``) are summed for R = 1 only; the spread of repeated
    reads (columns 1, 2 of ``sums``) comes from the sampled devices (:func:`sample_rows`).
    """
    n, t_n, r_n = g.shape
    per_device = s.shape[0] > 1
    last = g_target[0] if n else g_target.dtype.type(0)
    lev = _level(levels, last) if n else -1
    for i in range(n):
        if g_target[i] != last:  # devices of a level are usually stored together
            last = g_target[i]
            lev = _level(levels, last)
        if lev < 0:
            continue
        if not use[i]:
            lvl[lev, 1] += 1.0
            continue
        if stuck_below > 0 and _is_stuck(g, i, inv_gmax, stuck_below):
            lvl[lev, 2] += 1.0
            continue
        lvl[lev, 0] += 1.0
        si = i if per_device else 0
        x = x_lv[lev]
        cnt = 0
        s_ref = 0.0
        y_ref = 0.0
        ax = 0.0
        ay = 0.0
        axx = 0.0
        axy = 0.0
        ayy = 0.0
        for m in range(t_n):
            sm = s[si, m]
            v0 = g[i, m, 0]
            if v0 != v0:
                v0 = _first(g, i, m)
            if v0 != v0 or sm != sm:
                sums[lev, m, 0] += 1.0
                continue
            y = v0 * inv_gmax
            d = y - x
            hist[lev, m, bin_of(d)] += 1
            lohi[lev, m, 0] = min(lohi[lev, m, 0], d)
            lohi[lev, m, 1] = max(lohi[lev, m, 1], d)
            if per_device:
                tsum[m, 0] += sm
                tsum[m, 1] += 1.0
            if r_n == 1:  # one read per time: the device's line in log time (shifted sums)
                if cnt == 0:
                    s_ref = sm
                    y_ref = y
                dx = sm - s_ref
                dy = y - y_ref
                ax += dx
                ay += dy
                axx += dx * dx
                axy += dx * dy
                ayy += dy * dy
            cnt += 1
        if r_n == 1 and cnt >= 3:
            sxx = axx - ax * ax / cnt
            sxy = axy - ax * ay / cnt
            syy = ayy - ay * ay / cnt
            lvl[lev, 3] += max(syy - (sxy * sxy / sxx if sxx > 0 else 0.0), 0.0)
            lvl[lev, 4] += cnt - 2


@nb.njit(cache=True, nogil=True)
def sample_rows(g, pos, rows, lev, use, inv_gmax, s, stuck_below, sample,
                sums):  # pragma: no cover - via tests
    """Copy the reads of the sampled devices ``pos`` of a chunk (arguments as for
    :func:`chunk_kernel`, ``use`` after every rule) into sample[rows] (their first read per
    time relative to g_max; NaN where none or its time is NaN, and for a device left out or
    stuck), and, with repeated reads, add the sum of squared deviations of the repeats from
    their mean (relative to g_max^2; shifted by the first read) and its dof to sums[lev, time,
    1 and 2]."""
    t_n, r_n = g.shape[1], g.shape[2]
    per_device = s.shape[0] > 1
    for p in range(pos.shape[0]):
        i = pos[p]
        row = rows[p]
        dropped = (not use[i]) or (stuck_below > 0 and _is_stuck(g, i, inv_gmax, stuck_below))
        si = i if per_device else 0
        for m in range(t_n):
            v0 = _first(g, i, m)
            if dropped or s[si, m] != s[si, m] or v0 != v0:
                sample[row, m] = np.nan
                continue
            sample[row, m] = v0 * inv_gmax
            if r_n >= 2:
                k, acc, acc2 = _repeats(g, i, m, v0)
                if k >= 2:
                    a = acc * inv_gmax
                    sums[lev[p], m, 1] += acc2 * inv_gmax * inv_gmax - a * a / k
                    sums[lev[p], m, 2] += k - 1


@nb.njit(cache=True, inline="always")
def _sift_down(hh, ii, lev, size):  # pragma: no cover - via tests
    j = 0
    while True:
        c = 2 * j + 1
        if c >= size:
            return
        if c + 1 < size and hh[lev, c + 1] > hh[lev, c]:
            c += 1
        if hh[lev, c] <= hh[lev, j]:
            return
        hh[lev, c], hh[lev, j] = hh[lev, j], hh[lev, c]
        ii[lev, c], ii[lev, j] = ii[lev, j], ii[lev, c]
        j = c


@nb.njit(cache=True, nogil=True)
def bottom_k_add(g_target, offset, levels, use, key, hh, ii, size,
                 counts):  # pragma: no cover - via tests
    """Add a chunk of devices (indices ``offset`` + 0, 1, ...) to per-level max-heaps of the
    k = ``hh.shape[1]`` smallest :func:`device_hash` (key, index) among those with ``use``;
    ``hh`` (K, k) uint64, ``ii`` (K, k) int64 (-1 padded), ``size`` (K,), ``counts`` (K,)
    (devices per level) are updated in place. Chunk after chunk in any order, the result is
    that of one pass over all devices (the k smallest hashes do not depend on the order)."""
    k = hh.shape[1]
    n = g_target.shape[0]
    hashes = np.empty(min(n, _HASH_BLOCK), np.uint64)
    flags = np.empty(min(n, _HASH_BLOCK), np.uint8)
    cand = np.empty(min(n, _HASH_BLOCK), np.int64)
    a = 0
    while a < n:  # one run of devices with the same target (levels are usually stored so)
        v = g_target[a]
        e = a + 1
        while e < n and g_target[e] == v:
            e += 1
        lev = _level(levels, v)
        for p in range(a, e if lev >= 0 else a, _HASH_BLOCK):
            q = min(e, p + _HASH_BLOCK)
            top = hh[lev, 0] if size[lev] == k else _HASH_TOP
            counts[lev] += _hash_pass(key, offset + p, use[p:q], top, hashes, flags)
            n_cand = 0
            for j in range(q - p):  # branch-free list of the candidates
                cand[n_cand] = j
                n_cand += flags[j]
            for c in range(n_cand):  # the few that enter the heap (all, until it is full)
                j = cand[c]
                h = hashes[j]
                if not (size[lev] < k or h < hh[lev, 0]):
                    continue
                i = offset + p + j
                if size[lev] < k:  # max-heap: append and sift up
                    c = size[lev]
                    hh[lev, c] = h
                    ii[lev, c] = i
                    size[lev] += 1
                    while c > 0:
                        parent = (c - 1) // 2
                        if hh[lev, parent] >= hh[lev, c]:
                            break
                        hh[lev, parent], hh[lev, c] = hh[lev, c], hh[lev, parent]
                        ii[lev, parent], ii[lev, c] = ii[lev, c], ii[lev, parent]
                        c = parent
                else:
                    hh[lev, 0] = h
                    ii[lev, 0] = i
                    _sift_down(hh, ii, lev, size[lev])
        a = e


#: Devices hashed at once by :func:`bottom_k_add`.
_HASH_BLOCK = 4096


_HASH_TOP = np.uint64(np.iinfo(np.uint64).max)


@nb.njit(cache=True, nogil=True)
def _hash_pass(key, first, use, top, out, flags):  # pragma: no cover - via tests
    """out[j] = device_hash(key, first + j) for the devices of ``use``, flags[j] = 1 where
    ``use`` keeps the device and its hash is below ``top`` (a SIMD loop); returns how many
    ``use`` keeps."""
    kept = 0
    for j in range(use.shape[0]):
        h = device_hash(key, np.uint64(first + j))
        u = use[j]
        out[j] = h
        flags[j] = u & (h < top)
        kept += u
    return kept


def bottom_k_state(n_levels: int, k: int):
    """Empty heaps for :func:`bottom_k_add`: (hh, ii, size, counts)."""
    return (np.zeros((n_levels, k), np.uint64), np.full((n_levels, k), -1, np.int64),
            np.zeros(n_levels, np.int64), np.zeros(n_levels, np.int64))


def bottom_k(g_target, levels, use, k, key):
    """Per level the ``k`` devices of smallest :func:`device_hash` (key, index) among those
    with ``use`` (a uniform, order-independent sample), and the devices per level.

    Returns
    -------
    (idx (K, k) int64 device indices, -1 padded; size (K,); counts (K,))
    """
    hh, ii, size, counts = bottom_k_state(levels.shape[0], k)
    bottom_k_add(g_target, 0, levels, use, key, hh, ii, size, counts)
    return ii, size, counts


@nb.njit(cache=True, nogil=True)
def device_hashes(key, n):  # pragma: no cover - via tests
    """device_hash(key, i) for i < n: a random order of the devices, for deterministic
    splits."""
    out = np.empty(n, np.uint64)
    for i in range(n):
        out[i] = device_hash(key, np.uint64(i))
    return out


# ------------------------------------------------------- one read per time at shared times
#: Histogram columns of :func:`one_read_kernel`: the N_BINS bins, then reads not taken, then
#: reads of devices left out (both emptied into the chunk's sums at the end of each run).
MISSING = N_BINS
DROPPED = N_BINS + 1
HIST_COLUMNS = N_BINS + 2
#: Devices per pass of :func:`one_read_kernel` (its work arrays stay in the cache).
PASS_DEVICES = 1024
#: Sums may be reassociated (SIMD reductions, in an order fixed by the compiled code: the same
#: on any thread count); no "nnan"/"ninf".
_SUMS = {"reassoc", "contract", "nsz"}
_F32_2 = np.float32(2.0)
_F32_3 = np.float32(3.0)


@nb.njit(inline="always", error_model="numpy")
def _trend_point(code, g, sk, inv_gmax, x, ms, md):  # pragma: no cover - via tests
    """(binned, s_k - ms, d - md) of one read in float32 (d = g / g_max - x), (False, 0, 0)
    for a read not binned: loads done by the caller, selects on values (a SIMD loop)."""
    ok = code < N_BINS
    d = np.float32(g) * inv_gmax - x
    return ok, (sk - ms if ok else np.float32(0.0)), (d - md if ok else np.float32(0.0))


def _bits(x):  # pragma: no cover - compiled only
    """The bits of a float32 or float64 x as an integer of its width, and of such an integer
    as the float (compiled code, see the overload). For floats >= 0 the order of the bits is
    the order of the values."""
    raise NotImplementedError("_bits runs in compiled code only")


_BITS_OF = {types.float32: (np.float32, np.int32), types.float64: (np.float64, np.int64),
            types.int32: (np.int32, np.float32), types.int64: (np.int64, np.float64)}


@overload(_bits, jit_options={"cache": True})
def _bits_impl(x):
    cast, view = _BITS_OF[x]
    return lambda x: cast(x).view(view)


@nb.njit(nogil=True, error_model="numpy")
def _code_row(g, act, x, inv_gmax, codes, lo, hi, bits_max, bits_min):  # pragma: no cover
    """Codes of the reads g of one time (a SIMD loop), see :func:`one_read_kernel`; (min, max)
    of lo, hi and the bits of the reads binned (bits_max, bits_min: the largest and smallest
    integers of their width), and True when a read is negative or +inf."""
    bad = False
    for j in range(g.shape[0]):
        v = g[j]
        active = act[j] != 0
        ok = (v == v) & active
        b = bin_of_simd(np.float64(v) * inv_gmax - x)
        bits = _bits(v)
        codes[j] = np.int32(b if ok else (MISSING if active else DROPPED))
        lo = min(lo, bits if ok else bits_max)
        hi = max(hi, bits if ok else bits_min)
        bad |= (v < 0.0) | (v == np.inf)
    return lo, hi, bad


@nb.njit(nogil=True, error_model="numpy")
def _transpose(g, m, out, s):  # pragma: no cover - via tests
    """out[k * PASS_DEVICES + j] = g[j * T + k] for the m devices of g (SIMD shuffles); T =
    len(s), a tuple."""
    t_n = len(s)
    for j in range(m):
        for k in range(t_n):
            out[k * PASS_DEVICES + j] = g[j * t_n + k]


@nb.njit(nogil=True, fastmath=_SUMS, error_model="numpy")
def _trend_pass(gt, codes, x, inv_gmax, s, m):  # pragma: no cover - via tests
    """(sum over the m devices read at >= 3 times of their residual sum of squares around their
    line in s (a tuple of the T float32 log-times), its dof); SIMD across devices, in float32
    per device."""
    t_n = len(s)
    zero, one = np.float32(0.0), np.float32(1.0)
    rss_sum = zero
    dof = zero
    x32 = np.float32(x)
    c32 = np.float32(inv_gmax)
    for j in range(m):
        n = zero
        ss = zero
        sd = zero
        for k in range(t_n):
            r = k * PASS_DEVICES + j
            ok, sk, dk = _trend_point(codes[r], gt[r], s[k], c32, x32, zero, zero)
            n += one if ok else zero
            ss += sk
            sd += dk
        inv_n = one / (n if n > zero else one)
        ms = ss * inv_n
        md = sd * inv_n
        sxx = zero
        sxy = zero
        syy = zero
        for k in range(t_n):
            r = k * PASS_DEVICES + j
            _, ds, dd = _trend_point(codes[r], gt[r], s[k], c32, x32, ms, md)
            sxx += ds * ds
            sxy += ds * dd
            syy += dd * dd
        rss = syy - sxy * sxy / (sxx if sxx > zero else one)
        three = (n >= _F32_3) & (rss > zero)
        rss_sum += rss if three else zero
        dof += n - _F32_2 if n >= _F32_3 else zero
    return np.float64(rss_sum), np.float64(dof)


@nb.njit(cache=True, nogil=True)
def _one_read(g, g_target, use, levels, x_lv, inv_gmax, s, stuck_below, hist, lohi, sums, lvl,
              bits_max, bits_min):  # pragma: no cover - via tests
    """:func:`one_read_kernel`'s kernel; s a tuple of the T float32 log-times."""
    t_n = len(s)
    n = g_target.shape[0]
    g3 = g.reshape(n, t_n, 1)
    act = np.empty(PASS_DEVICES, np.uint8)
    gt = np.empty(PASS_DEVICES * t_n, g.dtype)
    codes = np.empty(PASS_DEVICES * t_n, np.int32)
    lo = np.full(t_n, bits_max)
    hi = np.full(t_n, bits_min)
    bad = False
    a = 0
    while a < n:  # one run of devices with the same target
        target = g_target[a]
        e = a + 1
        while e < n and g_target[e] == target:
            e += 1
        lev = _level(levels, target)
        if lev < 0:
            a = e
            continue
        x = x_lv[lev]
        lo[:] = bits_max
        hi[:] = bits_min
        for p in range(a, e, PASS_DEVICES):
            q = min(e, p + PASS_DEVICES)
            m = q - p
            excluded = 0.0
            stuck = 0.0
            for j in range(m):  # devices left out
                ok = use[p + j]
                excluded += 0.0 if ok else 1.0
                if ok and stuck_below > 0 and _is_stuck(g3, p + j, inv_gmax, stuck_below):
                    ok = False
                    stuck += 1.0
                act[j] = ok
            _transpose(g[p * t_n:q * t_n], m, gt, s)
            for k in range(t_n):
                r0 = k * PASS_DEVICES
                lo[k], hi[k], bad_k = _code_row(gt[r0:r0 + m], act[:m], x, inv_gmax,
                                                codes[r0:r0 + m], lo[k], hi[k], bits_max,
                                                bits_min)
                bad |= bad_k
            rss, dof = _trend_pass(gt, codes, x, inv_gmax, s, m)
            lvl[lev, 0] += m - excluded - stuck
            lvl[lev, 1] += excluded
            lvl[lev, 2] += stuck
            lvl[lev, 3] += rss
            lvl[lev, 4] += dof
            for k in range(t_n):  # one histogram at a time (it stays in the L1 cache)
                row = hist[lev, k]
                cb = codes[k * PASS_DEVICES:k * PASS_DEVICES + m]
                for j in range(m):
                    row[cb[j]] += 1
        for k in range(t_n):
            sums[lev, k, 0] += hist[lev, k, MISSING]
            hist[lev, k, MISSING] = 0
            hist[lev, k, DROPPED] = 0
            if lo[k] <= hi[k]:  # a read binned: its d as in chunk_kernel
                d_lo = np.float64(_bits(lo[k])) * inv_gmax - x
                d_hi = np.float64(_bits(hi[k])) * inv_gmax - x
                lohi[lev, k, 0] = min(lohi[lev, k, 0], d_lo)
                lohi[lev, k, 1] = max(lohi[lev, k, 1], d_hi)
        a = e
    return bad


def one_read_kernel(t_n: int, float64: bool = False):
    """:func:`chunk_kernel` for one read per time (R = 1) at read times shared by all devices,
    for ``t_n`` times and float32 reads (float64 with ``float64``; compiled per number of
    times, which LLVM takes from the length of a tuple of the log-times and unrolls the loops
    over, and cached on disk): the same histograms, extremes and sums,
    from SIMD passes over a level's devices and one scalar loop that adds the histogram
    counts.

    ``chunk(g, g_target, use, levels, x_lv, inv_gmax, s, stuck_below, hist, lohi, sums, lvl)
    -> bool`` takes the arguments of :func:`chunk_kernel` (but ``tsum``) with g: (n * T,)
    reads [S] (device-major), s: (T,) log-times, and hist of
    HIST_COLUMNS columns (the last two kept empty); it returns True when a read is negative or
    +inf (the sums are then not valid: the caller raises, naming it).

    Per run of devices with the same target, PASS_DEVICES devices at a time: (1) the reads
    copied time-major; (2) per time, the bin of each read's deviation d = g / g_max - x in
    float64, MISSING for a read not taken, DROPPED for a device left out, and the extremes of
    d: the bits of a float >= 0 (as an integer of its width) are in the order of the values,
    and d is a non-decreasing function of g, so the extremes of d are those of the reads,
    found as integer reductions (which LLVM vectorises; a float min it does not); (3) per device
    read at >= 3 times, the residual sum of squares of its line in s by least squares from
    centred sums, max(S_dd - S_sd^2 / S_ss, 0), and its dof n - 2, added up over the pass, all
    in float32 (rounding ~1e-6 of the read-noise variance, far below its standard error:
    tested against chunk_kernel); (4) per time the bin counts, a scalar loop over one
    histogram at a time.
    """

    bt = np.int64 if float64 else np.int32
    big, small = bt(np.iinfo(bt).max), bt(np.iinfo(bt).min)

    def chunk(g, g_target, use, levels, x_lv, inv_gmax, s, stuck_below, hist, lohi, sums, lvl):
        s32 = tuple(np.asarray(s, np.float32))
        if len(s32) != t_n:
            raise ValueError(f"one_read_kernel: {len(s32)} log-times for t_n = {t_n}")
        return _one_read(g, g_target, use, levels, x_lv, inv_gmax, s32, stuck_below, hist,
                         lohi, sums, lvl, big, small)

    return chunk
