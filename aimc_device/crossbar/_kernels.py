"""Numba kernel of the crossbar's output stage: one fused, parallel pass per tile. Private.

The single definition of each periphery element is in ``periphery.py`` (torch); this kernel
restates the output-side elements in scalar form for speed on CPU (IR drop Eqs. 15-16,
short-term and output noise Eqs. 2 and 14, ADC Eq. 5, digital scales Eq. 1), and the tests
compare it with the torch path. Normal variates come from the counter-based ziggurat of the PCM
sampler, keyed by (key, element index, stream), so the same key gives the same numbers on any
thread count.

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Eqs. 1, 2, 5, 14-16.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import prange

from ..pcm._kernels import normal  # counter-based ziggurat normal of the device sampler

#: Stream number of the per-MVM draws (the PCM sampler uses streams 0-2 of 4).
STREAM_MVM = np.uint64(3)

_SIG = [
    "void({t}[:, ::1], {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], boolean, boolean, float64, "
    "float64, float64, float64, float64, float64, {t}[::1], {t}[::1], uint64, boolean, "
    "{t}[:, ::1])".format(t=t)
    for t in ("float32", "float64")
]


@nb.njit(_SIG, cache=True, parallel=True)
def output_stage(z, w_px, abs_x, x2, has_ir, has_st, unit, out_noise, w_noise, ir_k, s_out,
                 levels, row_f, col_f, key, accumulate, out):  # pragma: no cover - via tests
    """out (+)= row_f col_f Q_out(z u + dy_IR + sqrt(sigma_out^2 + sigma_i^2) xi).

    z, w_px, abs_x, x2 : (batch, cols) GEMM results W~ lev, W~ (P o lev), |W~| |lev|,
        |W~| lev^2 in input-level units (x~ = u lev); unused ones may be (0, 0)
    unit : u, normalised input per level; ir_k : ir_drop scale x g_ir x n_rows
    s_out : ADC levels per output unit (0: no ADC); levels : 2^(q-1) - 1
    row_f : (batch,) or (1,), col_f : (cols,), digital factors of Eq. 1
    """
    nb_rows, nc = z.shape
    on2 = out_noise * out_noise
    wn2 = w_noise * w_noise * unit * unit
    iru = unit * ir_k
    one_row = row_f.shape[0] == 1
    for b in prange(nb_rows):
        rf = row_f[0] if one_row else row_f[b]
        for i in range(nc):
            v = z[b, i] * unit  # Eq. 2, signal
            if has_ir:
                a = abs_x[b, i] * iru  # Eq. 18
                v -= a * (0.5 + a * (-0.2 + 0.05 * a)) * (w_px[b, i] * unit)  # Eqs. 15-16
            var = on2
            if has_st:
                var += wn2 * x2[b, i]  # Eq. 14
            if var > 0.0:
                v += math.sqrt(var) * normal(key, np.uint64(b * nc + i), STREAM_MVM)
            if s_out > 0.0:
                q = np.rint(v * s_out)  # Eq. 5, ADC
                if q > levels:
                    q = levels
                elif q < -levels:
                    q = -levels
                v = q / s_out
            r = v * rf * col_f[i]  # Eq. 1
            if accumulate:
                out[b, i] += r
            else:
                out[b, i] = r
