"""The counter-based random numbers of the device sampler, for other layers' Numba kernels.

The crossbar's per-MVM noise draws from the same generator as the device sampler (one
definition, in the PCM kernels): the SplitMix64 finaliser of ``key + golden * counter`` and the
256-layer ziggurat (Marsaglia & Tsang 2000). A variate depends only on (key, counter), never on
how a loop is split among threads. All functions are Numba-compiled and callable from other
Numba kernels.

- :data:`FAST`: the counter space of the two-variates-per-hash draws (element i: ``FAST + i``);
- :func:`hash_counter` (key, counter) -> 64 random bits;
- :func:`half_normal_rect` (32 random bits) -> an N(0, 1) variate in float32 when the bits fall
  in their ziggurat layer's rectangle (about 99 % of draws), else NaN, which
  :func:`finish_variate` completes;
- :func:`normals_block` (key, e0, m, out, stream) fills ``out`` with the N(0, 1) variates
  e0 ... e0 + m - 1 of a stream.
"""
from ._kernels import FAST, finish_variate, half_normal_rect, normals_block
from ._kernels import _hash as hash_counter

__all__ = ["FAST", "hash_counter", "finish_variate", "half_normal_rect", "normals_block"]
