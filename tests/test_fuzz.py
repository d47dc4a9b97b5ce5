"""Fuzz tests (hypothesis): generated campaign files and command lines.

Every case ends in success or in the package's own error: MeasurementFormatError (DeviceCardError
is one) or FitError naming the file from the API; exit status 2 with one line naming the option or
the file from the command line; never another exception, and never a file left behind in the
output folder. The runs are derandomised (the same cases every time) and small (about 10 s).
"""
from __future__ import annotations

import contextlib
import hashlib
import io as _stdio
import os
import tempfile

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import aimc_device.crossbar as crossbar
import aimc_device.crossbar.metric as metric
import aimc_device.study.demo as demo_mod
import aimc_device.study.sensitivity as sens_mod
import aimc_device.study.study as study_mod
from aimc_device import fit, io, pcm
from aimc_device.cli import main

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# A small valid campaign (4 levels x 4 devices, 3 times, 2 reads), the base of the mutations.
_BASE = pcm.simulate_campaign(pcm.PCMModel.preset("rasch2023"), levels=4, devices_per_level=4,
                              times=(1.0, 10.0, 100.0), repeats=2, rng=0)
BASE = {"g_target": _BASE["g_target"].values.astype(np.float64),
        "time": _BASE["time"].values.astype(np.float64),
        "g": _BASE["g"].values.astype(np.float64)}
BASE_ATTRS = {"g_max": 25.0, "g_max_units": "uS", "t0": 20.0, "t0_units": "s",
              "schema": io.SCHEMA, "schema_version": 1}
UNITS = {"g_target": "S", "g": "S", "time": "s"}

DTYPES = ["<f8", "<f4", ">f4", "<f2", "<i4", "<i8", "|u1", "<c8", "|b1"]
SPECIAL = [np.nan, np.inf, -np.inf, -1e-6, 0.0, 1e30]
LAYOUTS = ["contiguous", "chunked", "gzip", "lzf", "shuffle", "fletcher32"]
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                max_size=6)
# Attribute values: missing (None), numbers, strings, arrays, bytes.
_attr = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                  st.integers(-3, 3), _text, st.just(np.array([1.0, 2.0])), st.just(b"25"))
_unit = st.one_of(st.none(), st.sampled_from(["S", "uS", "µS", "mS", "nS", "s", "ms", "min",
                                              "h", "d", "V", "", "us ", "siemens"]),
                  st.integers(-1, 1), st.just(np.array([b"S", b"S"])), st.just(b"uS"))
_value = st.one_of(st.floats(0, 3e-5), st.sampled_from(SPECIAL))


MUTATIONS = ("special value", "time order", "g shape", "g_target shape", "dtype", "units",
             "root attribute", "missing dataset", "truncated")


@st.composite
def campaign_files(draw):
    """(datasets, their dtypes, their units, root attrs, layout, truncate fraction, missing)."""
    data = {k: v.copy() for k, v in BASE.items()}
    dtypes = {k: "<f8" for k in data}
    units, attrs = dict(UNITS), dict(BASE_ATTRS)
    truncate = missing = None
    if draw(st.integers(0, 3)) == 3:  # free form: tiny arrays of any content and shape
        n, t, r = (draw(st.integers(0, 4)) for _ in range(3))
        data = {"g_target": np.array(draw(st.lists(_value, min_size=n, max_size=n))),
                "time": np.array(draw(st.lists(st.floats(-1, 1e4), min_size=t, max_size=t))),
                "g": np.array(draw(st.lists(_value, min_size=n * t * r,
                                            max_size=n * t * r))).reshape(n, t, r)}
        if draw(st.booleans()):
            data["g"] = data["g"].reshape(n, t * r)  # wrong number of dimensions
    # The base (or the free-form file) with up to three changes.
    for change in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3, unique=True)):
        name = draw(st.sampled_from(sorted(data)))
        if change == "special value" and data[name].size:
            flat = data[name].reshape(-1)
            flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from(SPECIAL))
        elif change == "time order":
            data["time"] = data["time"][::-1].copy()
        elif change == "g shape" and data["g"].ndim == 3:
            data["g"] = data["g"][:, : draw(st.integers(0, 2)), : draw(st.integers(0, 2))]
        elif change == "g_target shape":
            data["g_target"] = data["g_target"][: draw(st.integers(0, 15))]
        elif change == "dtype":
            dtypes[name] = draw(st.sampled_from(DTYPES))
        elif change == "units":
            units[name] = draw(_unit)
        elif change == "root attribute":
            key = draw(st.sampled_from(sorted(BASE_ATTRS) + ["t_read", "t_read_units"]))
            attrs[key] = draw(_attr if "units" not in key else _unit)
        elif change == "missing dataset":
            missing = name
        elif change == "truncated":
            truncate = draw(st.sampled_from([0.1, 0.5, 0.9, 0.99]))
    return data, dtypes, units, attrs, draw(st.sampled_from(LAYOUTS)), truncate, missing


def _write_file(path, spec) -> None:
    data, dtypes, units, attrs, layout, truncate, missing = spec
    with h5py.File(path, "w") as f, np.errstate(all="ignore"):
        for name, arr in data.items():
            if name == missing:
                f.create_group(name)  # a group where a dataset belongs
                continue
            arr = arr.astype(dtypes[name])
            kw = {}
            if layout != "contiguous" and arr.size and arr.ndim:
                kw = {"chunks": True, "gzip": {"compression": "gzip"},
                      "lzf": {"compression": "lzf"}, "fletcher32": {"fletcher32": True},
                      "shuffle": {"shuffle": True, "compression": "gzip"}}.get(layout, kw)
            d = f.create_dataset(name, data=arr, **kw)
            if units[name] is not None:
                d.attrs["units"] = units[name]
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = value
    if truncate is not None:
        size = os.path.getsize(path)
        with open(path, "r+b") as fh:
            fh.truncate(int(size * truncate))


@contextlib.contextmanager
def _folders():
    """A fresh input folder (with the path of its campaign file) and an empty output folder."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "in"), os.path.join(tmp, "out")
        os.mkdir(src)
        os.mkdir(out)
        yield src, out, os.path.join(src, "campaign.h5")


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _files(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), folder)
                  for d, _, names in os.walk(folder) for n in names)


def _run(argv) -> tuple[int, str]:
    err = _stdio.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(_stdio.StringIO()):
        rc = main(argv)
    return rc, err.getvalue().strip()


def _one_line(rc: int, err: str, command: str) -> None:
    assert rc == 2 and len(err.splitlines()) == 1, (rc, err)
    assert err.startswith(f"aimc-device {command}: error: "), err


CASES = {"campaign files": 0, "command lines": 0}
OUTCOMES: dict[str, int] = {}


def _count(outcome: str) -> None:
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1


def _base_with(**attrs):
    """The base file's spec with some root attributes changed (explicit fuzz examples)."""
    return (BASE, {k: "<f8" for k in BASE}, UNITS, {**BASE_ATTRS, **attrs}, "chunked", None,
            None)


@FUZZ
@given(spec=campaign_files())
# Cases the fuzzer found once (a bare ValueError / TypeError from int()), kept as examples.
@example(spec=_base_with(schema_version=""))
@example(spec=_base_with(schema_version=np.array([1.0, 2.0])))
def test_fuzz_campaign_files_through_reader_fit_and_cli(spec):
    CASES["campaign files"] += 1
    with _folders() as (src, out, path):
        _write_file(path, spec)
        before = _sha(path)
        api_ok = True
        try:
            fit.fit_pcm(io.read_measurements(path))
            _count("file: fitted")
        except (io.MeasurementFormatError, fit.FitError) as exc:
            assert path in str(exc), str(exc)
            _count(f"file: {type(exc).__name__}")
            api_ok = False
        rc, err = _run(["fit", path, "-o", os.path.join(out, "card.h5"), "--quiet"])
        if api_ok:
            assert rc == 0 and _files(out) == ["card.h5"], err
            io.load_device_card(os.path.join(out, "card.h5"))
        else:
            _one_line(rc, err, "fit")
            assert path in err, err
            assert _files(out) == []
        assert _sha(path) == before and _files(src) == ["campaign.h5"]


# ------------------------------------------------------------ command lines
class _Reached(Exception):
    """The command reached its long computation with the settings accepted."""


def _reached(*args, **kwargs):
    raise _Reached()


_NUM = st.one_of(st.sampled_from(["0", "1", "2", "3", "-1", "1.5", "nan", "inf", "-inf", "1e3",
                                  "", "x", "0x10", " 2", "1_0", "9" * 30]),
                 st.integers(-3, 4).map(str), st.floats(-2, 2).map(repr))
_WORD = st.one_of(st.sampled_from(["rasch2023", "none", "nope", "", "cnn", "lstm", "ADC",
                                   "ADC,output noise", "gremlins", "fit", "fixed"]), _text)
_TIMES = st.sampled_from(["1,10,100", "10,1", "1,1", "-1,1", "1,nan", "1,inf", "", ",", "a,b",
                          "0,5", "1e3"])
_SETS = st.sampled_from(["out_bits=6", "out_noise=-1", "inp_bits=abc", "max_rows=0",
                         "nosuch=1", "novalue", "s_adc=true", "ir_drop=1e400", "w_noise=nan",
                         "drift_compensation=column", "inp_bits=2.5"])

# Per command: option -> strategy of its value (None: a flag). {OUT}, {IN} are replaced by
# paths in the example's output folder and of the example's input campaign.
_OUTPUTS = st.sampled_from(["{OUT}/x.h5", "{OUT}/missing/x.h5", "{IN}", "{OUT}",
                            "{OUT}/x.png"])
COMMANDS = {
    "campaign": {"-o": _OUTPUTS, "--preset": _WORD, "--levels": _NUM,
                 "--devices-per-level": _NUM, "--times": _TIMES, "--repeats": _NUM,
                 "--seed": _NUM, "--force": None},
    "fit": {"-o": _OUTPUTS, "--plot": st.sampled_from(["{OUT}/f.h5", "{OUT}/no/f.png", "{IN}",
                                                       "{OUT}/x.h5"]),
            "--clip": _WORD, "--prior": _WORD, "--quiet": None, "--force": None},
    "mvm-error": {"--t": _NUM, "--set": _SETS, "--device": _WORD, "--seed": _NUM,
                  "--n-inputs": _NUM},
    "study": {"--workload": _WORD, "--out": st.sampled_from(["{OUT}/s", "{IN}", "{OUT}"]),
              "--repeats": _NUM, "--seed": _NUM, "--hwa-epochs": _NUM, "--quick": None,
              "--device-model": st.sampled_from(["{IN}", "rasch2023", "nope"]),
              "--force": None},
    "sensitivity": {"--out": st.sampled_from(["{OUT}/s", "{IN}"]), "--repeats": _NUM,
                    "--levels": _NUM, "--max-mvm-error": _NUM, "--nonidealities": _WORD,
                    "--hwa-epochs": _NUM, "--quick": None},
    "demo": {"--out": st.sampled_from(["{OUT}/d", "{IN}", "{OUT}"]), "--repeats": _NUM,
             "--seed": _NUM, "--campaign": st.sampled_from(["{IN}", "{OUT}/none.h5"]),
             "--quick": None},
}


@st.composite
def command_lines(draw):
    command = draw(st.sampled_from(sorted(COMMANDS)))
    argv = [command]
    if command == "fit":
        argv.append("{IN}")
    options = COMMANDS[command]
    for name in draw(st.lists(st.sampled_from(sorted(options)), max_size=4, unique=True)):
        argv += [name] if options[name] is None else [name, draw(options[name])]
    if command in ("campaign", "fit") and "-o" not in argv and draw(st.integers(0, 5)) > 0:
        argv += ["-o", "{OUT}/x.h5"]
    if command == "campaign":  # keep the campaigns tiny when the sizes are accepted
        for name in ("--levels", "--devices-per-level", "--repeats"):
            if name not in argv:
                argv += [name, "2"]
    return argv


@pytest.fixture(scope="module")
def cheap_work():
    """Stubs for the long parts (training, the 512 x 512 MVM error): the command line and the
    checks in front of them are what is fuzzed."""
    mp = pytest.MonkeyPatch()
    mp.setattr(study_mod, "_train_fp", _reached)
    mp.setattr(demo_mod, "simulate_campaign", _reached)
    mp.setattr(demo_mod, "fit_pcm", _reached)
    mp.setattr(sens_mod, "mvm_error", lambda *a, **k: 0.05)
    real = metric.mvm_error
    w = np.random.default_rng(0).normal(0, 0.25, (4, 4))
    x = np.random.default_rng(1).uniform(-1, 1, (2, 4))

    def small(cfg=None, device=None, t=None, weights=None, inputs=None, rng=0, n_inputs=1000):
        return real(cfg, device, t, w, x, rng, n_inputs)

    mp.setattr(metric, "mvm_error", small)
    mp.setattr(crossbar, "mvm_error", small)
    yield
    mp.undo()


@FUZZ
@given(argv=command_lines())
def test_fuzz_command_lines(cheap_work, argv):
    CASES["command lines"] += 1
    with _folders() as (src, out, path):
        with h5py.File(path, "w") as f:
            for name, arr in BASE.items():
                f.create_dataset(name, data=arr).attrs["units"] = UNITS[name]
            f.attrs.update(BASE_ATTRS)
        before = _sha(path)
        args = [a.replace("{OUT}", out).replace("{IN}", path) for a in argv]
        try:
            rc, err = _run(args)
        except _Reached:
            rc, err = None, ""
        _count(f"{argv[0]}: exit {rc}" if rc is not None else f"{argv[0]}: reached the work")
        if rc == 2:
            _one_line(rc, err, argv[0])
            assert _files(out) == []
        elif rc == 0:
            assert not [f for f in _files(out) if ".aimc-tmp-" in f]
            assert argv[0] in ("campaign", "fit", "mvm-error")
        else:
            assert rc is None, (rc, err)  # stopped at the long computation
            assert _files(out) == []
        # The input is never touched; only `campaign -o IN --force` may replace it (there it is
        # no input, but an existing measured campaign).
        if not (argv[0] == "campaign" and "--force" in argv and rc == 0):
            assert _sha(path) == before
        assert _files(src) == ["campaign.h5"]


def test_fuzz_case_count():
    """Report how many cases ran (run after the fuzz tests, in file order)."""
    if not all(CASES.values()):
        pytest.skip("the fuzz tests did not run in this session")
    print(f"fuzz cases: {CASES}; outcomes: {dict(sorted(OUTCOMES.items()))}")
    assert CASES["campaign files"] >= 30 and CASES["command lines"] >= 30
