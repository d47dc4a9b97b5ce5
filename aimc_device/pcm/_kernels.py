"""Numba kernels that sample the PCM model: one fused, parallel pass over the devices.

Private. The public wrappers are in ``devices.py``; the formulas' single definition is in
``formulas.py`` and the tests compare both (deterministic parts to float tolerance, random parts
with Kolmogorov-Smirnov tests).

Random numbers come from a counter-based generator: the SplitMix64 finaliser applied to
``key + golden * counter`` with the counter built from the element index, a stream number and a
draw number. A device's numbers therefore depend only on (seed, index), never on how the loop is
split among threads: same seed, same bits, on any thread count. Normal variates use the 256-layer
ziggurat of Marsaglia & Tsang (2000), about one hash and one multiply per variate.

No kernel is compiled with fast-math: with it, a loop's vectorised body and its scalar fallback
(chosen by LLVM at run time from the buffers' addresses) may round differently, and the same seed
would no longer give the same bits from run to run.

References
----------
.. [1] G. Marsaglia, W. W. Tsang, "The ziggurat method for generating random variables",
   J. Stat. Softw. 5(8) (2000).
.. [2] G. L. Steele, D. Lea, C. H. Flood, "Fast splittable pseudorandom number generators",
   OOPSLA (2014) (SplitMix64).
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import prange

from .numba_builds import serial_and_parallel

# --- Ziggurat tables (256 layers, 52-bit mantissa), built once from the recurrence of [1]. -----
_ZIG_R = 3.6541528853610088  # right edge of the base layer
_ZIG_V = 0.00492867323399  # area of each layer under exp(-x^2/2)
_M52 = float(2**52)


def _ziggurat_tables():
    ki = np.zeros(256, dtype=np.uint64)
    wi = np.zeros(256, dtype=np.float64)
    fi = np.zeros(256, dtype=np.float64)
    dn = tn = _ZIG_R
    q = _ZIG_V / math.exp(-0.5 * dn * dn)
    ki[0] = np.uint64((dn / q) * _M52)
    ki[1] = 0
    wi[0] = q / _M52
    wi[255] = dn / _M52
    fi[0] = 1.0
    fi[255] = math.exp(-0.5 * dn * dn)
    for i in range(254, 0, -1):
        dn = math.sqrt(-2.0 * math.log(_ZIG_V / dn + math.exp(-0.5 * dn * dn)))
        ki[i + 1] = np.uint64((dn / tn) * _M52)
        tn = dn
        fi[i] = math.exp(-0.5 * dn * dn)
        wi[i] = dn / _M52
    return ki, wi, fi


_KI, _WI, _FI = _ziggurat_tables()

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_S8, _S1, _S11 = np.uint64(8), np.uint64(1), np.uint64(11)
_MASK8 = np.uint64(0xFF)
_MASK52 = np.uint64(0x000FFFFFFFFFFFFF)
_ONE = np.uint64(1)
_DRAWS = np.uint64(64)  # counters reserved per (element, stream): ample for ziggurat rejections
_STREAMS = np.uint64(4)
_INV53 = 1.0 / float(2**53)

#: Stream numbers: each kind of draw has its own counters (programming draws its pair of
#: variates, programming error and drift exponent, from stream 0; a device's fault its two
#: uniforms from stream 1).
STREAM_PROGRAM, STREAM_FAULT, STREAM_READ = 0, 1, 2


@nb.njit("uint64(uint64, uint64)", cache=True, inline="always")
def _hash(key, ctr):
    """SplitMix64 output for counter ``ctr`` of the stream keyed ``key`` [2]."""
    z = key + _GOLDEN * (ctr + _ONE)
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@nb.njit("float64(uint64, uint64)", cache=True, inline="always")
def _uniform(key, ctr):
    """Uniform variate in [0, 1) with 53 random bits."""
    return float(_hash(key, ctr) >> _S11) * _INV53


@nb.njit("float64(uint64, uint64, uint64)", cache=True, inline="always")
def normal(key, index, stream):
    """Standard normal variate for (key, element index, stream): ziggurat of [1]."""
    base = (index * _STREAMS + stream) * _DRAWS
    j = np.uint64(0)
    x = 0.0
    while j < _DRAWS - np.uint64(3):
        r = _hash(key, base + j)
        j += _ONE
        idx = np.intp(r & _MASK8)
        r = r >> _S8
        sign = r & _ONE
        rabs = (r >> _S1) & _MASK52
        x = float(rabs) * _WI[idx]
        if sign:
            x = -x
        if rabs < _KI[idx]:
            return x  # about 99 % of draws end here
        if idx == 0:  # the tail beyond R
            while j < _DRAWS - np.uint64(2):
                xx = -math.log1p(-_uniform(key, base + j)) / _ZIG_R
                yy = -math.log1p(-_uniform(key, base + j + _ONE))
                j += np.uint64(2)
                if yy + yy > xx * xx:
                    return -(_ZIG_R + xx) if sign else _ZIG_R + xx
        else:
            u = _uniform(key, base + j)
            j += _ONE
            if (_FI[idx - 1] - _FI[idx]) * u + _FI[idx] < math.exp(-0.5 * x * x):
                return x
    return x  # unreachable in practice (probability < 1e-60)


# --- Two variates per hash: 32 random bits each (8 layer, 1 sign, 23 mantissa bits). ---------
# Used where 2^-23 resolution of the underlying uniform is ample (noise amplitudes).
_KI23 = (_KI >> np.uint64(29)).astype(np.uint64)
_WI23 = _WI * float(2 ** 29)
_M23 = np.uint64(0x7FFFFF)
_S9 = np.uint64(9)
_S32 = np.uint64(32)
_MASK32 = np.uint64(0xFFFFFFFF)
_SIX = np.uint64(6)
# Counter spaces, disjoint from each other and from normal()'s (index * 4 + stream) * 64 + j:
FAST = np.uint64(1) << np.uint64(63)  # the one hash of element i: FAST + i
_RETRY = FAST + (np.uint64(1) << np.uint64(62))  # wedge / tail draws of variate c: _RETRY + 64 c


@nb.njit("float64(uint64, uint64, intp, float64, boolean, uint64)", cache=True)
def _finish(key, ctr, idx, x, neg, stream):  # pragma: no cover - via tests
    """Complete a 32-bit ziggurat attempt outside the rectangle: the wedge or tail test of [1],
    else an independent full retry with :func:`normal`. ``ctr`` numbers the variate."""
    base = _RETRY + (ctr << _SIX)
    if idx == 0:  # tail beyond R
        for j in range(31):
            xx = -math.log1p(-_uniform(key, base + np.uint64(2 * j + 1))) / _ZIG_R
            yy = -math.log1p(-_uniform(key, base + np.uint64(2 * j + 2)))
            if yy + yy > xx * xx:
                return -(_ZIG_R + xx) if neg else _ZIG_R + xx
    elif (_FI[idx - 1] - _FI[idx]) * _uniform(key, base) + _FI[idx] < math.exp(-0.5 * x * x):
        return -x if neg else x  # wedge
    return normal(key, ctr, stream)  # rejected: an independent full retry (own counters)


@nb.njit("float64(uint64, uint64, uint64, uint64)", cache=True, inline="always")
def half_normal(key, half, ctr, stream):  # pragma: no cover - via tests
    """N(0, 1) from the 32 random bits ``half`` (8 layer, 1 sign, 23 mantissa) of variate ctr."""
    idx = np.intp(half & _MASK8)
    rabs = (half >> _S9) & _M23
    x = float(np.int64(rabs)) * _WI23[idx]
    neg = ((half >> _S8) & np.uint64(1)) == np.uint64(1)
    if rabs < _KI23[idx]:
        return -x if neg else x
    return _finish(key, ctr, idx, x, neg, stream)


# float32 copies of the 23-bit tables for SIMD loops (exact: the layer edges fit in 23 bits).
_KI23_I32 = _KI23.astype(np.int32)
_WI23_F32 = _WI23.astype(np.float32)
_M23_U32 = np.uint32(0x7FFFFF)


@nb.njit("float32(uint64)", cache=True, inline="always")
def half_normal_rect(half):  # pragma: no cover - via tests
    """The rectangle step of :func:`half_normal` in float32, branch-free so that loops over it
    vectorise: the variate when it falls inside its layer's rectangle (about 99 % of draws), else
    NaN, and the caller completes that one with ``half_normal(key, half, ctr, stream)``."""
    h = np.uint32(half)
    idx = np.intp(h & np.uint32(0xFF))
    rabs = np.int32((h >> np.uint32(9)) & _M23_U32)
    x = np.float32(rabs) * _WI23_F32[idx]
    x = -x if (h & np.uint32(0x100)) != np.uint32(0) else x
    return x if rabs < _KI23_I32[idx] else np.float32(np.nan)


@nb.njit("UniTuple(float64, 2)(uint64, uint64, uint64)", cache=True, inline="always")
def normal_pair(key, index, stream):  # pragma: no cover - via tests
    """Two independent N(0, 1) variates for element ``index`` from one 64-bit hash."""
    r = _hash(key, FAST + index)
    c = index << _S1
    return (half_normal(key, r & _MASK32, c, stream),
            half_normal(key, r >> _S32, c + _ONE, stream))


@nb.njit("void(uint64, float64[::1], float64[::1])", cache=True, parallel=True)
def fault_uniforms(key, u_kind, u_value):  # pragma: no cover - exercised via tests
    """The two uniform variates in [0, 1) of device i's fault (see
    :func:`aimc_device.pcm.formulas.stuck_conductance`), counters of stream STREAM_FAULT: the
    same numbers for device i on any thread count."""
    for i in prange(u_kind.shape[0]):
        base = (np.uint64(i) * _STREAMS + np.uint64(STREAM_FAULT)) * _DRAWS
        u_kind[i] = _uniform(key, base)
        u_value[i] = _uniform(key, base + _ONE)


# The kernels compute in the precision of the arrays: every scalar parameter comes in that
# dtype, so float32 devices take float32 logs and exponentials (twice as fast) and float64
# devices keep float64 throughout. ``floor`` is the smallest relative conductance put into a log.
_PROGRAM_SIG = [
    "void({t}[::1], {t}, {t}, {t}, {t}, {t}, {t}, {t}, {t}, {t}, {t}, {t}, {t}, {t}, {t}, {t}, "
    "boolean, {t}, uint64, {t}[::1], {t}[::1], {t}[::1])".format(t=t)
    for t in ("float32", "float64")
]


@nb.njit(_PROGRAM_SIG, cache=True, parallel=True, fastmath=False)
def program_kernel(g_target, g_max, c0, c1, c2, ma, mb, mlo, mhi, sa, sb, slo, shi, q_coeff,
                   q_exp, q_max, q_from_programmed, floor, key, g_prog, nu, q):
    """Programming (Eq. 7, clipped at 0), drift-exponent draw (Eq. 9) and the device's
    read-noise amplitude Q_s (Eq. 10, of the target or of g_P), fused.

    g_target, g_prog [S]; nu, q dimensionless; the other scalars as in PCMModel.
    """
    n = g_target.shape[0]
    for i in prange(n):
        g = abs(g_target[i])
        x = g / g_max
        sig_p = c0 + x * (c1 + x * c2)  # Eq. 7
        z_prog, z_drift = normal_pair(key, np.uint64(i), np.uint64(STREAM_PROGRAM))
        gp = max(g + sig_p * z_prog, 0.0)
        g_prog[i] = gp
        lnx = math.log(max(x, floor))
        mu = min(max(ma * lnx + mb, mlo), mhi)  # Eq. 9
        sd = min(max(sa * lnx + sb, slo), shi)
        nu[i] = mu + sd * z_drift
        if q_from_programmed:
            lnx = math.log(max(g_prog[i] / g_max, floor))
        q[i] = min(q_coeff * math.exp(q_exp * lnx), q_max)  # Eq. 10


_READ_SIG = [
    "void({t}[::1], {t}[::1], {t}[::1], {t}, {t}, uint64, {t}[::1])".format(t=t)
    for t in ("float32", "float64")
]


@nb.njit(_READ_SIG, cache=True, parallel=True, fastmath=False)
def read_kernel(g_prog, nu, q, log_drift, time_factor, key, out):
    """Drift (Eq. 8) and 1/f read noise (Eqs. 11-12), fused; result clipped at 0 (Eq. 12).

    g_prog [S]; nu, q (= Q_s, Eq. 10) dimensionless; log_drift = ln((t + t0)/t0);
    time_factor = sqrt(ln((t_eff + T_read)/(2 T_read))); out [S].
    """
    n = g_prog.shape[0]
    for i in prange(n):
        gd = g_prog[i] * math.exp(-nu[i] * log_drift)  # Eq. 8
        sig = abs(gd) * q[i] * time_factor  # Eq. 11
        out[i] = max(gd + sig * normal(key, np.uint64(i), np.uint64(STREAM_READ)), 0.0)  # Eq. 12


@nb.njit(cache=True, inline="always")
def finish_variate(key, base, j, e, stream):  # pragma: no cover - via tests
    """Variate j of a block whose pairs hash at base + j // 2 (the low 32 bits for even j, the
    high for odd), completed beyond its rectangle by :func:`half_normal` as variate e."""
    r = _hash(key, base + np.uint64(j // 2))
    half = r >> _S32 if j % 2 else r & _MASK32
    return half_normal(key, half, np.uint64(e), stream)


@nb.njit(cache=True)
def normals_block(key, e0, m, out, stream):  # pragma: no cover - via tests
    """out[:m] = standard normals of variates e0 .. e0 + m - 1 (e0 even): the pair (2h, 2h + 1)
    from the two halves of the one hash FAST + h, the rectangle step of :func:`half_normal` as a
    SIMD loop, then the ~1.5 % outside their rectangle one by one (counter = variate index,
    ``stream`` for their retries). The same numbers as :func:`normal_pair` of element h."""
    base = FAST + np.uint64(e0 // 2)
    for h in range((m + 1) // 2):
        r = _hash(key, base + np.uint64(h))
        out[2 * h] = half_normal_rect(r & _MASK32)
        out[2 * h + 1] = half_normal_rect(r >> _S32)
    for j in range(m):
        if out[j] != out[j]:
            out[j] = finish_variate(key, base, j, e0 + j, stream)


#: Devices per work item of :func:`perturb_kernel` (an even number).
_PERTURB_BLOCK = 4096


def _perturb(g, table, inv_h, scale, key, out):  # pragma: no cover - via tests
    """The HWA training noise: out = g + scale std(|g|) xi, std the combined standard deviation
    of the programming and read noise interpolated linearly in ``table`` (std at |g| = k h,
    h = 1 / inv_h; |g| beyond the table takes its last interval's line), one variate per device
    (variate i of stream STREAM_PROGRAM), blocks of devices (in parallel in
    :func:`perturb_kernel`).

    g, table, out : C order, one dtype; inv_h, scale in that dtype.
    """
    n = g.shape[0]
    last = table.shape[0] - 2
    for blk in prange((n + _PERTURB_BLOCK - 1) // _PERTURB_BLOCK):
        i0 = blk * _PERTURB_BLOCK
        m = min(n, i0 + _PERTURB_BLOCK) - i0
        z = np.empty(_PERTURB_BLOCK, dtype=g.dtype)
        normals_block(key, i0, m, z, np.uint64(STREAM_PROGRAM))
        for k in range(m):
            i = i0 + k
            a = abs(g[i]) * inv_h
            j = min(np.intp(a), last)
            lo = table[j]
            std = lo + (a - j) * (table[j + 1] - lo)
            out[i] = g[i] + scale * std * z[k]


_perturb_serial, _perturb_parallel = serial_and_parallel(_perturb)
#: Devices from which :func:`perturb_kernel` runs in parallel: below, waking the thread pool
#: costs more than the work (about 0.2 ms per call inside a training step on a 2-core x86-64
#: machine).
PERTURB_PARALLEL_MIN = 1 << 15


def perturb_kernel(g, table, inv_h, scale, key, out):
    """:func:`_perturb`, on the thread pool for large arrays (the same numbers either way)."""
    kernel = _perturb_parallel if g.shape[0] >= PERTURB_PARALLEL_MIN else _perturb_serial
    kernel(g, table, inv_h, scale, key, out)
