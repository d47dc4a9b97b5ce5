"""Serial and parallel builds of a Numba kernel keep separate on-disk caches.

Numba keys its cache by name, source line, signature and bytecode, not by compile flags: two
builds of one Python function used to share one entry, and a process ran whichever build was
compiled first for both (aimc_device.pcm.numba_builds).
"""
import os
import subprocess
import sys
import textwrap

from aimc_device.crossbar import _kernels as XK
from aimc_device.pcm import _empirical_kernels as EK
from aimc_device.pcm import _kernels as PK
from aimc_device.pcm import numba_builds

PAIRS = [(XK._output_stage_serial, XK._output_stage_parallel),
         (XK.dac_levels_serial, XK.dac_levels_parallel),
         (XK.dac_image_serial, XK.dac_image_parallel),
         (XK._stage_backward_serial, XK._stage_backward_parallel),
         (PK._perturb_serial, PK._perturb_parallel),
         (EK._read_serial, EK._read_parallel),
         (EK._quantile_serial, EK._quantile_parallel)]


def test_package_builds_have_own_names_and_flags():
    for serial, parallel in PAIRS:
        assert serial.py_func.__code__ is parallel.py_func.__code__  # one source
        assert serial.py_func.__qualname__ != parallel.py_func.__qualname__  # two cache files
        assert not serial.targetoptions.get("parallel")
        assert parallel.targetoptions.get("parallel")


KERNEL = textwrap.dedent('''
    import importlib.util, sys
    import numpy as np
    from numba import prange

    # the helper's file alone: importing the package would compile its own kernels into the
    # fresh cache folder
    spec = importlib.util.spec_from_file_location("numba_builds", sys.argv[3])
    builds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builds)
    serial_and_parallel = builds.serial_and_parallel

    def _twice(x, out):
        for i in prange(x.shape[0]):
            out[i] = 2.0 * x[i]

    twice_serial, twice_parallel = serial_and_parallel(_twice)
    ''')

RUN = textwrap.dedent('''
    import sys, numpy as np
    sys.path.insert(0, sys.argv[1])
    import builds_probe as m
    k = getattr(m, "twice_" + sys.argv[2])
    x = np.arange(5.0); out = np.empty(5)
    k(x, out)
    assert (out == 2 * x).all()
    print(len(k.stats.cache_hits), len(k.stats.cache_misses))
    ''')


def test_serial_build_does_not_load_the_parallel_builds_cache(tmp_path):
    (tmp_path / "builds_probe.py").write_text(KERNEL)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    helper = numba_builds.__file__

    def run(which):
        out = subprocess.run([sys.executable, "-c", RUN, str(tmp_path), which, helper], env=env,
                             check=True, capture_output=True, text=True)
        hits, misses = map(int, out.stdout.split())
        return hits, misses

    assert run("parallel") == (0, 1)  # compiled and written to the cache
    assert run("serial") == (0, 1)  # its own build, not the parallel one from the cache
    assert run("serial") == (1, 0)  # and its own cache entry thereafter
    assert run("parallel") == (1, 0)
