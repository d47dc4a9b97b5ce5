"""A user's data are never at risk, and every setting is checked where it enters.

Data loss and silent damage: no writer (CLI or API) replaces one of its inputs (same inode:
same name, hard link or symbolic link) or a file of another kind unless told to (--force /
overwrite=True); outputs are checked before any long computation; a killed writer leaves no file
that the next write does not remove; Ctrl-C ends a command with one line and status 130; result
files get the usual 0666 & ~umask permissions.

Settings that are accepted and mean nothing: CLI options, config objects and the public
functions that take a model, data or a config refuse bad values with an error naming them.
"""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import xarray as xr

from aimc_device import fit, io, nn as ann, pcm
from aimc_device.cli import main
from aimc_device.crossbar import CrossbarConfig, mvm_error
from aimc_device.io import OutputRefusedError
from aimc_device.study import report, run_sensitivity, run_study
from aimc_device.study._checkpoint import atomic_save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_RE = re.compile(r"\.aimc-tmp-")


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _one_line_error(capsys, argv, *words) -> str:
    """main(argv) exits 2 with one line on stderr that contains every word."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture(scope="module")
def small_campaign():
    """A small campaign that stands for a measured one (not marked as simulated)."""
    ds = pcm.simulate_campaign(pcm.PCMModel.preset("rasch2023"), levels=5,
                               devices_per_level=60, times=(1.0, 10.0, 100.0, 1000.0),
                               repeats=3, rng=1)
    ds.attrs.update(technology="GST PCM", source="a lab")
    return ds


@pytest.fixture
def campaign_file(tmp_path, small_campaign):
    path = tmp_path / "X.h5"
    io.write_measurements(small_campaign, path)
    return path


@pytest.fixture(scope="module")
def card_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("card") / "card.h5"
    io.save_device_model(pcm.PCMModel.preset("rasch2023"), path)
    return path


# ------------------------------------------------------------ outputs never replace inputs
def test_fit_onto_its_own_campaign_is_refused(tmp_path, campaign_file, capsys):
    before = _sha(campaign_file)
    err = _one_line_error(capsys, ["fit", str(campaign_file), "-o", str(campaign_file),
                                   "--quiet"], "same file as the input", str(campaign_file))
    assert "--force" not in err  # no way around it: an input is never replaced
    assert _sha(campaign_file) == before
    assert main(["fit", str(campaign_file), "-o", str(campaign_file), "--quiet",
                 "--force"]) == 2
    assert _sha(campaign_file) == before
    assert sorted(os.listdir(tmp_path)) == ["X.h5"]


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_fit_onto_a_link_to_its_campaign_is_refused(tmp_path, campaign_file, capsys, link):
    out = tmp_path / "card.h5"
    (os.link if link == "hard" else os.symlink)(campaign_file, out)
    before = _sha(campaign_file)
    _one_line_error(capsys, ["fit", str(campaign_file), "-o", str(out), "--quiet", "--force"],
                    "same file as the input", str(out))
    assert _sha(campaign_file) == before
    assert os.path.samefile(out, campaign_file)  # the link itself is left alone too


def test_save_device_model_onto_a_campaign(tmp_path, campaign_file):
    before = _sha(campaign_file)
    model = pcm.PCMModel.preset("rasch2023")
    with pytest.raises(OutputRefusedError, match="holds a measurement campaign.*overwrite=True"):
        io.save_device_model(model, campaign_file)
    assert _sha(campaign_file) == before
    # The campaign it was fitted to is never replaced, overwrite or not.
    with pytest.raises(OutputRefusedError, match="same file as the input"):
        io.save_device_model(model, campaign_file, overwrite=True,
                             provenance={"source_file": str(campaign_file)})
    assert _sha(campaign_file) == before
    io.save_device_model(model, campaign_file, overwrite=True)  # told to: replaced
    assert io.load_device_model(campaign_file) == model
    assert sorted(os.listdir(tmp_path)) == ["X.h5"]


def test_fit_onto_another_campaign_needs_force(tmp_path, campaign_file, small_campaign, capsys):
    other = tmp_path / "other.h5"
    io.write_measurements(small_campaign, other)
    before = _sha(other)
    _one_line_error(capsys, ["fit", str(campaign_file), "-o", str(other), "--quiet"],
                    "holds a measurement campaign", "--force")
    assert _sha(other) == before
    assert main(["fit", str(campaign_file), "-o", str(other), "--quiet", "--force"]) == 0
    assert io.file_kind(other) == io.CARD_SCHEMA


def test_a_simulated_campaign_never_replaces_a_measured_one(tmp_path, campaign_file, capsys):
    before = _sha(campaign_file)
    argv = ["campaign", "-o", str(campaign_file), "--levels", "2", "--devices-per-level", "3",
            "--repeats", "2"]
    _one_line_error(capsys, argv, "holds a measurement campaign", "--force")
    assert _sha(campaign_file) == before
    sim = tmp_path / "sim.h5"
    argv[2] = str(sim)
    assert main(argv) == 0 and main(argv + ["--seed", "1"]) == 0  # simulated over simulated
    assert io.file_kind(sim) == io.SIMULATED_CAMPAIGN
    argv[2] = str(campaign_file)
    assert main(argv + ["--force"]) == 0  # told to


def test_a_card_replaces_a_card(tmp_path, campaign_file):
    out = tmp_path / "card.h5"
    io.save_device_model(pcm.PCMModel.preset("rasch2023"), out)
    assert main(["fit", str(campaign_file), "-o", str(out), "--quiet"]) == 0
    assert io.load_device_card(out)[1]["source_sha256"] == _sha(campaign_file)


def test_write_measurements_onto_its_source_or_a_card(tmp_path, campaign_file, card_file):
    lazy = io.read_measurements(campaign_file)
    before = _sha(campaign_file)
    with pytest.raises(OutputRefusedError, match="same file as the input"):
        io.write_measurements(lazy, campaign_file, overwrite=True)
    assert _sha(campaign_file) == before
    card_before = _sha(card_file)
    with pytest.raises(OutputRefusedError, match="holds a device card"):
        io.write_measurements(lazy, card_file)
    assert _sha(card_file) == card_before


def test_other_kinds_are_recognised(tmp_path, campaign_file, card_file, small_campaign):
    (tmp_path / "notes.txt").write_text("my notes\n")
    atomic_save({"epoch": 0}, tmp_path / "ck.pt")
    report.save_dataset(xr.Dataset({"a": ("x", np.arange(3.0))}), tmp_path / "r.nc")
    io.write_measurements(small_campaign.assign_attrs(technology="PCM (simulated)"),
                          tmp_path / "sim.h5")
    kinds = {p: io.file_kind(tmp_path / p) for p in ("notes.txt", "ck.pt", "r.nc", "X.h5",
                                                     "sim.h5")}
    assert kinds == {"notes.txt": io.KIND_TEXT, "ck.pt": io.KIND_CHECKPOINT,
                     "r.nc": io.KIND_NETCDF, "X.h5": io.SCHEMA, "sim.h5": io.SIMULATED_CAMPAIGN}
    assert io.file_kind(card_file) == io.CARD_SCHEMA
    for target in ("notes.txt", "ck.pt", "X.h5"):  # a result never replaces another kind
        with pytest.raises(OutputRefusedError):
            report.save_dataset(xr.Dataset(), tmp_path / target)
    with pytest.raises(OutputRefusedError, match="training checkpoint"):
        io.write_measurements(small_campaign, tmp_path / "ck.pt")
    with pytest.raises(OutputRefusedError, match="NetCDF"):
        atomic_save({"epoch": 1}, tmp_path / "r.nc")
    (tmp_path / "empty.h5").write_bytes(b"")
    io.write_measurements(small_campaign, tmp_path / "empty.h5")  # an empty file holds nothing
    with pytest.raises(OutputRefusedError, match="not a regular file"):
        io.check_output(os.devnull, io.CARD_SCHEMA, overwrite=True)


def test_crossbar_config_save_is_safe(tmp_path, campaign_file, card_file):
    cfg = CrossbarConfig(out_bits=6)
    before = _sha(campaign_file)
    with pytest.raises(OutputRefusedError, match="measurement campaign"):
        cfg.save(campaign_file)
    assert _sha(campaign_file) == before
    path = tmp_path / "cfg.h5"
    cfg.save(path)
    CrossbarConfig().save(path, group="standard")  # a config file gains a group
    assert CrossbarConfig.load(path) == cfg and CrossbarConfig.load(path, "standard") == \
        CrossbarConfig()
    card = tmp_path / "card.h5"
    card.write_bytes(open(card_file, "rb").read())
    cfg.save(card, overwrite=True)  # told to: the card keeps its content and gains the group
    assert io.load_device_model(card) == pcm.PCMModel.preset("rasch2023")
    assert CrossbarConfig.load(card) == cfg
    (tmp_path / "notes.json").write_text('{"a": 1}')
    with pytest.raises(OutputRefusedError, match="text file"):
        cfg.save(tmp_path / "notes.json")
    cfg.save(tmp_path / "cfg.json")
    cfg.save(tmp_path / "cfg.json")
    assert CrossbarConfig.load(tmp_path / "cfg.json") == cfg
    assert not [n for n in os.listdir(tmp_path) if TMP_RE.search(n)]


# ------------------------------------------------------------ checked before the work
def _unwritable_folder(tmp_path) -> str:
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return str(folder)
    for folder in ("/sys/kernel", "/proc/self"):  # root may write anywhere else
        try:
            os.close(os.open(os.path.join(folder, ".aimc-w"), os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError:
            return folder
    pytest.skip("no unwritable folder for this user")


def test_unwritable_output_fails_before_the_fit(tmp_path, campaign_file, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(fit, "fit_device", lambda *a, **k: calls.append(1))
    out = os.path.join(_unwritable_folder(tmp_path), "card.h5")
    err = _one_line_error(capsys, ["fit", str(campaign_file), "-o", out, "--quiet"],
                          f"{out}: cannot write into the folder")
    assert "aimc-tmp" not in err and not calls
    _one_line_error(capsys, ["fit", str(campaign_file), "-o", str(tmp_path / "no" / "c.h5")],
                    "does not exist")
    _one_line_error(capsys, ["fit", str(campaign_file), "-o",
                             str(campaign_file / "c.h5")], "is not a folder")
    _one_line_error(capsys, ["fit", str(campaign_file), "-o", str(tmp_path)], "is a folder")
    _one_line_error(capsys, ["fit", str(campaign_file), "-o", str(tmp_path / "c.h5"), "--plot",
                             str(tmp_path / "fig.h5")], "unknown figure format")
    assert not calls


def test_study_outputs_checked_before_training(tmp_path, campaign_file, monkeypatch):
    import aimc_device.study.study as study_mod

    monkeypatch.setattr(study_mod, "prepare_models",
                        lambda *a, **k: pytest.fail("trained before checking the outputs"))
    os.link(campaign_file, tmp_path / "cnn-study.nc")
    with pytest.raises(OutputRefusedError, match="cnn-study.nc: exists and holds a measurement"):
        run_study("cnn", out_dir=tmp_path, quick=True)
    with pytest.raises(OutputRefusedError, match="same file as the input"):
        run_study("cnn", device=tmp_path / "cnn-study.nc", out_dir=tmp_path, overwrite=True)
    with pytest.raises(NotADirectoryError):
        run_study("cnn", out_dir=campaign_file / "out")


# ------------------------------------------------------------ killed writers
_SLOW_WRITER = """
import sys, time
import dask.array as da
from aimc_device import io, pcm
ds = pcm.simulate_campaign(pcm.PCMModel.preset("rasch2023"), levels=4, devices_per_level=50,
                           times=(1.0, 10.0, 100.0), repeats=2, rng=0)
def slow(block, block_info=None):
    if block_info[0]["chunk-location"][0] == 2:  # the third chunk: the file is half written
        print("writing", flush=True)
        time.sleep(120)
    return block
g = da.from_array(ds["g"].values, chunks=(50, 3, 2)).map_blocks(slow, dtype=ds["g"].dtype)
io.write_measurements(ds.assign(g=(ds["g"].dims, g, ds["g"].attrs)), sys.argv[1],
                      chunk_devices=50)
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start_slow_writer(path):
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(path)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    return proc


def test_sigkill_mid_write_leaves_a_temp_that_the_next_write_removes(tmp_path, small_campaign):
    out = tmp_path / "c.h5"
    proc = _start_slow_writer(out)
    temps = [n for n in os.listdir(tmp_path) if TMP_RE.search(n)]
    assert len(temps) == 1 and temps[0].startswith(".c.h5.aimc-tmp-")
    assert os.path.getsize(tmp_path / temps[0]) > 0  # a half-written file
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    assert os.listdir(tmp_path) == temps and not out.exists()
    io.write_measurements(small_campaign, tmp_path / "other.h5")  # the next write: cleans up
    assert os.listdir(tmp_path) == ["other.h5"]


def test_interrupted_write_removes_the_temp(tmp_path, small_campaign):
    """Ctrl-C (KeyboardInterrupt) half-way through a write: no file left, nothing replaced."""
    import dask.array as da

    def interrupt(block, block_info=None):
        if block_info[0]["chunk-location"][0] == 2:
            raise KeyboardInterrupt
        return block

    g = da.from_array(small_campaign["g"].values, chunks=(60, 4, 3)).map_blocks(
        interrupt, dtype=small_campaign["g"].dtype)
    ds = small_campaign.assign(g=(small_campaign["g"].dims, g, small_campaign["g"].attrs))
    with pytest.raises(KeyboardInterrupt):
        io.write_measurements(ds, tmp_path / "c.h5", chunk_devices=60)
    assert os.listdir(tmp_path) == []


def test_temps_of_running_writers_are_kept(tmp_path, small_campaign):
    mine = tmp_path / f".c.h5.aimc-tmp-{io._atomic._HOST}-{os.getpid()}-0123abcd.h5"
    other_host = tmp_path / f".c.h5.aimc-tmp-00000000-{2**22 + 7}-0123abcd.h5"
    dead = tmp_path / f".c.h5.aimc-tmp-{io._atomic._HOST}-{2**22 + 7}-0123abcd.h5"
    for p in (mine, other_host, dead):
        p.write_bytes(b"x")
    io.write_measurements(small_campaign, tmp_path / "c.h5")
    assert sorted(os.listdir(tmp_path)) == sorted(["c.h5", mine.name, other_host.name])


_ANNOUNCED_FIT = """
import sys
import aimc_device.fit as fit
from aimc_device.cli import main
real_fit = fit.fit_device
def announced(*args, **kwargs):
    # fits again and again until the interrupt arrives, so that it lands inside a real fit
    # however fast or loaded the machine is
    print("fitting", flush=True)
    while True:
        real_fit(*args, **kwargs)
fit.fit_device = announced
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_fit(tmp_path):
    """SIGINT while `aimc-device fit` runs: one line, exit status 130, no file written."""
    camp = tmp_path / "big.h5"
    io.write_measurements(pcm.simulate_campaign(
        pcm.PCMModel.preset("rasch2023"), levels=8, devices_per_level=200, repeats=4,
        rng=2), camp)
    proc = subprocess.Popen([sys.executable, "-c", _ANNOUNCED_FIT, "fit", str(camp), "-o",
                             str(tmp_path / "card.h5"), "--quiet"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "fitting", proc.communicate()
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # the interrupt was not handled: the fit loops on
        proc.kill()
        raise
    assert proc.returncode == 130, err
    assert err.strip() == "aimc-device fit: interrupted"
    assert sorted(os.listdir(tmp_path)) == ["big.h5"]


# ------------------------------------------------------------ permissions
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_result_files_get_the_usual_permissions(tmp_path, small_campaign, umask):
    old = os.umask(umask)
    try:
        io.write_measurements(small_campaign, tmp_path / "c.h5")
        io.save_device_model(pcm.PCMModel.preset("rasch2023"), tmp_path / "m.h5")
        atomic_save({"epoch": 0}, tmp_path / "ck" / "ck.pt")
        CrossbarConfig().save(tmp_path / "cfg.json")
        ds = xr.Dataset({"a": ("x", np.arange(3.0))})
        report.write_outputs(ds, str(tmp_path / "s"), lambda d: "table",
                             lambda d, p: report.save_figure(_figure(), p), verbose=False)
    finally:
        os.umask(old)
    files = ["c.h5", "m.h5", "ck/ck.pt", "cfg.json", "s.nc", "s.txt", "s.png"]
    modes = {f: oct(os.stat(tmp_path / f).st_mode & 0o777) for f in files}
    assert modes == {f: oct(0o666 & ~umask) for f in files}


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    return fig


# ------------------------------------------------------------ settings: command line
@pytest.mark.parametrize("argv, option", [
    (["study", "--hwa-epochs", "-1"], "--hwa-epochs"),
    (["study", "--hwa-epochs", "0"], "--hwa-epochs"),
    (["study", "--repeats", "0"], "--repeats"),
    (["study", "--seed", "-3"], "--seed"),
    (["sensitivity", "--max-mvm-error", "-1"], "--max-mvm-error"),
    (["sensitivity", "--max-mvm-error", "nan"], "--max-mvm-error"),
    (["sensitivity", "--max-mvm-error", "20"], "--max-mvm-error"),
    (["sensitivity", "--levels", "1"], "--levels"),
    (["sensitivity", "--repeats", "x"], "--repeats"),
    (["mvm-error", "--n-inputs", "0"], "--n-inputs"),
    (["mvm-error", "--t", "-5"], "--t"),
    (["mvm-error", "--t", "inf"], "--t"),
    (["demo", "--repeats", "-2"], "--repeats"),
    (["campaign", "-o", "c.h5", "--levels", "0"], "--levels"),
    (["campaign", "-o", "c.h5", "--devices-per-level", "1.5"], "--devices-per-level"),
    (["campaign", "-o", "c.h5", "--repeats", "-1"], "--repeats"),
    (["campaign", "-o", "c.h5", "--times", "1,inf"], "--times"),
    (["fit", "c.h5", "-o", "m.h5", "--clip", "maybe"], "--clip"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, argv, option):
    os.chdir(tmp_path)
    _one_line_error(capsys, argv, option, f"aimc-device {argv[0]}: error")
    assert os.listdir(tmp_path) == []


def test_mvm_error_setting_names_the_field(capsys):
    _one_line_error(capsys, ["mvm-error", "--n-inputs", "5", "--t", "1", "--set",
                             "inp_bits=abc"], "CrossbarConfig.inp_bits")


# ------------------------------------------------------------ settings: API
@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(hwa_epochs=-1), ValueError, "hwa_epochs = -1"),
    (dict(hwa_epochs=2.5), ValueError, "hwa_epochs"),
    (dict(repeats=0), ValueError, "repeats = 0"),
    (dict(times=()), ValueError, "times"),
    (dict(times=(1.0, float("nan"))), ValueError, "times[1]"),
    (dict(hwa_lr=0.0), ValueError, "hwa_lr"),
    (dict(calibration_batches=0), ValueError, "calibration_batches"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(cfg={"out_bits": 6}), TypeError, "cfg: expected a CrossbarConfig"),
    (dict(hwa={"noise_scale": 2}), TypeError, "hwa: expected"),
    (dict(workload="mlp"), ValueError, "workload = 'mlp'"),
    (dict(device=3), TypeError, "device: expected"),
    (dict(digital_layers="fc"), TypeError, "digital_layers"),
    (dict(quick="yes"), TypeError, "quick"),
])
def test_run_study_checks_its_settings_first(tmp_path, monkeypatch, kwargs, exc, words):
    import aimc_device.study.study as study_mod

    monkeypatch.setattr(study_mod, "_train_fp", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(exc, match=re.escape(words)):
        run_study(**{"out_dir": tmp_path, **kwargs})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(max_mvm_error=-1), ValueError, "max_mvm_error"),
    (dict(max_mvm_error=0.01), ValueError, "must exceed the MVM error of the standard model"),
    (dict(n_levels=1), ValueError, "n_levels"),
    (dict(repeats=0), ValueError, "repeats"),
    (dict(nonidealities="ADC"), TypeError, "nonidealities"),
    (dict(nonidealities=["ADC", "gremlins"]), ValueError, "gremlins"),
    (dict(t=-1.0), ValueError, "t = -1.0"),
    (dict(iso_accuracy=1.5), ValueError, "iso_accuracy"),
    (dict(test_shape=(0, 4)), ValueError, "test_shape[0]"),
    (dict(hwa_lr=-1.0), ValueError, "hwa_lr"),
    (dict(learning_rate=0.1), TypeError, "learning_rate"),
])
def test_run_sensitivity_checks_its_settings_first(tmp_path, monkeypatch, kwargs, exc, words):
    import aimc_device.study.study as study_mod

    monkeypatch.setattr(study_mod, "_train_fp", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(exc, match=re.escape(words)):
        run_sensitivity(**{"out_dir": tmp_path, "quick": True, "n_inputs": 20, **kwargs})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(noise_scale=-1.0), ValueError, "HWAConfig.noise_scale"),
    (dict(noise_scale="1"), TypeError, "HWAConfig.noise_scale"),
    (dict(ramp_epochs=float("nan")), ValueError, "HWAConfig.ramp_epochs"),
    (dict(alpha_decay=1.0), ValueError, "HWAConfig.alpha_decay"),
    (dict(alpha_min=0.0), ValueError, "HWAConfig.alpha_min"),
    (dict(init_batches=-1), ValueError, "HWAConfig.init_batches"),
    (dict(init_batches=2.5), ValueError, "HWAConfig.init_batches"),
    (dict(clip_weights="no"), TypeError, "HWAConfig.clip_weights"),
    (dict(distill_weight=2.0), ValueError, "HWAConfig.distill_weight"),
])
def test_hwa_config_checks_each_field(kwargs, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        ann.HWAConfig(**kwargs)


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_rows="512"), "CrossbarConfig.max_rows"),
    (dict(max_rows=0), "CrossbarConfig.max_rows"),
    (dict(inp_bits=float("nan")), "CrossbarConfig.inp_bits"),
    (dict(inp_bits="abc"), "CrossbarConfig.inp_bits"),
    (dict(out_bits=[8]), "CrossbarConfig.out_bits"),
    (dict(out_noise="0.04"), "CrossbarConfig.out_noise"),
    (dict(w_noise=-0.1), "CrossbarConfig.w_noise"),
    (dict(s_adc="yes"), "CrossbarConfig.s_adc"),
    (dict(drift_compensation=["global"]), "CrossbarConfig.drift_compensation"),
])
def test_crossbar_config_checks_each_field(kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        CrossbarConfig(**kwargs)
    assert CrossbarConfig(max_rows=np.int64(256), out_noise=np.float32(0.5)).max_rows == 256


def test_convert_names_a_wrong_argument():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(TypeError, match=r"cfg: expected a CrossbarConfig, got dict; build one"):
        ann.convert(model, cfg={"out_bits": 6})
    with pytest.raises(TypeError, match="device: expected a device model"):
        ann.convert(model, device=3.0)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got dict"):
        ann.convert({"0.weight": 1})
    with pytest.raises(TypeError, match="digital"):
        ann.convert(model, digital="0")
    with pytest.raises(ValueError, match="rng = -1"):
        ann.convert(model, rng=-1)


def test_analog_layers_need_a_tensor():
    x = np.zeros((2, 4), np.float32)
    lin = ann.convert(torch.nn.Linear(4, 3))
    with pytest.raises(TypeError, match="AnalogLinear: the input must be a torch.Tensor, got "
                                        "ndarray"):
        lin(x)
    conv = ann.convert(torch.nn.Conv2d(1, 2, 3))
    with pytest.raises(TypeError, match="AnalogConv2d: the input must be a torch.Tensor"):
        conv(np.zeros((1, 1, 5, 5), np.float32))
    lstm = ann.convert(torch.nn.LSTM(4, 3))
    with pytest.raises(TypeError, match="AnalogLSTM: the input must be a torch.Tensor"):
        lstm(x)
    mha = ann.convert(torch.nn.MultiheadAttention(4, 1))
    t = torch.zeros(2, 1, 4)
    with pytest.raises(TypeError, match="AnalogMultiheadAttention: the key must be"):
        mha(t, x, t)
    assert lin(torch.as_tensor(x)).shape == (2, 3)


def test_evaluation_names_empty_or_consumed_data():
    model = ann.convert(torch.nn.Sequential(torch.nn.Linear(4, 3)),
                        device=pcm.PCMModel.preset("rasch2023"))
    batches = [(torch.zeros(5, 4), torch.zeros(5, dtype=torch.long))]
    gen = (b for b in batches)
    assert ann.classification_error(model, gen) >= 0
    with pytest.raises(ValueError, match="data yielded no batches: an iterator that was already "
                                         "consumed\\? pass a list or a DataLoader"):
        ann.classification_error(model, gen)
    with pytest.raises(ValueError, match="no batches"):
        ann.classification_error(model, [])
    with pytest.raises(TypeError, match="one-shot iterator .* pass a list or a DataLoader"):
        ann.evaluate_over_time(model, iter(batches), times=(1.0,), repeats=1, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        ann.evaluate_over_time(model, [], times=(1.0,), repeats=1, progress=False)
    with pytest.raises(TypeError, match="data: each batch must be an"):
        ann.classification_error(model, [torch.zeros(5, 4)])
    with pytest.raises(ValueError, match="repeats = 0"):
        ann.evaluate_over_time(model, batches, repeats=0, progress=False)
    with pytest.raises(TypeError, match="loader: a one-shot iterator"):
        ann.train_hwa(model, iter(batches), progress=False)


def test_program_and_drift_check_t_and_rng():
    model = ann.convert(torch.nn.Linear(4, 3), device="rasch2023")
    with pytest.raises(TypeError, match="rng = 'abc'"):
        ann.program(model, rng="abc")
    with pytest.raises(ValueError, match="rng = -2"):
        ann.program(model, rng=-2)
    ann.program(model, rng=0)
    for t, exc in ((-1.0, ValueError), (float("nan"), ValueError), ("1h", TypeError)):
        with pytest.raises(exc, match="^t = "):
            ann.drift(model, t)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        ann.program(None)


def test_fit_and_mvm_error_check_their_arguments(campaign_file, monkeypatch):
    with pytest.raises(TypeError, match="ds: expected an xarray.Dataset"):
        fit.fit_pcm(str(campaign_file))
    ds = io.read_measurements(campaign_file)
    import aimc_device.fit.pcm_fit as pcm_fit

    monkeypatch.setattr(pcm_fit, "campaign_statistics", lambda *a: pytest.fail("streamed"))
    with pytest.raises(TypeError, match="prior: expected a device model .PCMModel or EmpiricalModel., a preset name"):
        fit.fit_pcm(ds, prior={"prog_coeffs": (1, 2, 3)})
    with pytest.raises(KeyError, match="unknown PCM preset"):
        fit.fit_pcm(ds, prior="nope")
    with pytest.raises(ValueError, match="clip = 'maybe'"):
        fit.fit_pcm(ds, clip="maybe")
    with pytest.raises(ValueError, match="chunk_devices = 0"):
        fit.fit_pcm(ds, chunk_devices=0)
    with pytest.raises(ValueError, match="n_inputs = 0"):
        mvm_error(n_inputs=0)
    with pytest.raises(TypeError, match="cfg: expected a CrossbarConfig"):
        mvm_error({"out_bits": 6})
    with pytest.raises(TypeError, match="ds: expected an xarray.Dataset"):
        io.write_measurements({"g": 1}, "x.h5")
