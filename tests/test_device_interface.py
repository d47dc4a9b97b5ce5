"""One device-model interface: the family choice of ``fit.fit_device`` (hold-out KS, stated rule),
the resolver every ``device=`` / ``--device`` goes through (models, presets, cards of either
family), and the consumers with an empirical model: the crossbar array's saved state, the Dask
task spec, ``aimc-device fit --family`` and ``aimc-device mvm-error --device CARD``.

The whole chain (campaign -> fit -> card -> study) with an empirical card fitted from an
RRAM-like campaign runs in ``tests/test_study.py`` (the quick demo)."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from aimc_device import crossbar, fit, io, pcm
from aimc_device.cli import main
from aimc_device.crossbar.state import export_state, import_state
from aimc_device.fit.choice import chance_limit
from aimc_device.study._tasks import ModelSpec


def _rram(levels=8, devices=200, seed=3):
    """An RRAM-like campaign as a lab has it (without the generator's truth)."""
    ds = pcm.simulate_rram_campaign(levels=levels, devices_per_level=devices, rng=seed)
    return ds.drop_vars(["dead", "equivalent_time"])


@pytest.fixture(scope="module")
def rram_fit():
    return fit.fit_device(_rram(), prior="rasch2023", seed=1, draws=4)


@pytest.fixture(scope="module")
def empirical_card(tmp_path_factory, rram_fit):
    model, report = rram_fit
    path = tmp_path_factory.mktemp("cards") / "rram.h5"
    io.save_device_model(model, path, report.provenance)
    return path


# ------------------------------------------------------------------------- the family choice
def test_fit_device_keeps_the_family_the_holdout_supports(rram_fit):
    # RRAM-like data: the PCM forms fail the hold-out beyond chance, the empirical family not
    model, rep = rram_fit
    assert rep.family == "empirical" and rep.choice == "auto"
    assert isinstance(model, pcm.EmpiricalModel) and model is rep.models["empirical"]
    fail_p, cells_p = rep.failing("pcm")
    fail_e, cells_e = rep.failing("empirical")
    assert cells_p == cells_e == 8 * 7  # every (level, time) cell tested
    assert fail_p > chance_limit(cells_p) >= fail_e
    assert f"{fail_p} of {cells_p} cells for PCM" in rep.reason and "beyond chance" in rep.reason
    # the provenance a card carries states the rule, the decision and both hold-out results
    prov = rep.provenance
    assert prov["family"] == "empirical" and prov["family_rule"] == fit.DECISION_RULE
    assert prov["holdout_pcm"].startswith(f"{cells_p - fail_p} of {cells_p}")
    assert prov["family_fit_function"] == "aimc_device.fit.fit_empirical"
    assert prov["activation_energy_source"].startswith("campaign attribute")  # E_a of the bake
    # the plot data: measured and predicted quantiles of both families at four levels
    assert rep.qq["measured"].shape == rep.qq["empirical"].shape == (4, 7, 50)
    text = rep.summary()
    assert "family chosen: empirical (auto)" in text and "hold-out KS per time" in text
    # the information criteria: the empirical family describes RRAM-like reads better on the
    # fitted half (AIC, BIC despite its thousands of table entries) and on the held-out half
    crit = rep.criteria()
    assert rep.better("heldout") == rep.better("aic") == rep.better("bic") == "empirical"
    assert crit["empirical"].heldout_per_read > crit["pcm"].heldout_per_read + 1.0
    assert crit["pcm"].n_params == sum(c.n_params for c in rep.pcm.components.values()
                                       if c.identified)
    assert crit["empirical"].n_params > 100 * crit["pcm"].n_params
    assert "criterion: heldout favours empirical; aic favours empirical" in text
    # the per-level hold-out results, one line per level
    per_level = text.split("hold-out KS per level")[1].splitlines()[1:9]
    assert [ln.split(":")[0].strip() for ln in per_level] == [
        f"x = {x:.4g}" for x in rep.holdout["pcm"].levels]
    ok = rep.holdout["pcm"].passing(rep.alpha).sum(axis=1)
    assert [f"pcm {k}/7 times pass" in ln for k, ln in zip(ok, per_level)] == [True] * 8


def test_fit_device_keeps_pcm_on_pcm_data_and_a_given_family():
    preset = pcm.PCMModel.preset("rasch2023")
    ds = pcm.simulate_campaign(preset, levels=5, devices_per_level=150, repeats=2,
                               times=(1.0, 100.0, 1e4), rng=5)
    model, rep = fit.fit_device(ds, prior=preset, seed=2, draws=4)
    assert rep.family == "pcm" and isinstance(model, pcm.PCMModel)
    fail, cells = rep.failing("pcm")
    assert cells == 15 and fail <= chance_limit(cells) and "PCM within chance" in rep.reason
    # PCM-generated reads: the PCM family's Normal has the better criteria
    assert rep.better("heldout") == rep.better("aic") == rep.better("bic") == "pcm"
    # the PCM model is the one fit_pcm gives (the choice adds nothing to the fit)
    alone, _ = fit.fit_pcm(ds, prior=preset)
    assert model == alone
    # a family given is fitted alone and kept, with its own hold-out result
    model, rep = fit.fit_device(ds, family="empirical", prior=preset, seed=2, draws=2)
    assert rep.family == "empirical" and rep.choice == "given" and set(rep.models) == {"empirical"}
    assert "empirical" in rep.holdout and "pcm" not in rep.holdout
    with pytest.raises(ValueError, match="family = 'rram'"):
        fit.fit_device(ds, family="rram")


def test_criterion_densities_match_references():
    from scipy import stats

    from aimc_device.fit.criterion import (Criterion, read_log_likelihood,
                                           table_log_density)
    from aimc_device.pcm.empirical import DEFAULT_PROBS

    # the piecewise density of a Normal's quantile table: a density (integral 1) close to the
    # Normal's in its body, with tails that decay
    q = stats.norm.ppf(DEFAULT_PROBS, loc=10.0, scale=2.0)
    v = np.linspace(-20.0, 40.0, 600_001)
    f = np.exp(table_log_density(v, q, DEFAULT_PROBS, 1e-9))
    assert abs(np.sum(f) * (v[1] - v[0]) - 1.0) < 1e-4
    body = (v > 7.0) & (v < 13.0)  # |z| < 1.5: segments 0.13 sigma wide
    np.testing.assert_allclose(f[body], stats.norm.pdf(v[body], 10.0, 2.0), rtol=0.1)
    assert f[0] < 1e-12 and f[-1] < 1e-12
    # the other families: a Normal with the mean and spread of the model's own reads
    rng = np.random.default_rng(0)
    g_target = np.repeat([1e-6, 2e-6], 50)
    g = g_target[:, None] * (1 + 0.1 * rng.standard_normal((100, 2)))
    sims = g_target[None, :, None] * (1 + 0.1 * rng.standard_normal((4, 100, 2)))
    levels, ll, n = read_log_likelihood(None, g_target, g, np.array([1.0, 2.0]), 25e-6,
                                        sims=sims)
    s = sims[:, 50:, 1].ravel()
    want = stats.norm.logpdf(g[50:, 1], s.mean(), s.std(ddof=1)).sum()
    assert n.tolist() == [[50, 50], [50, 50]] and abs(ll[1, 1] - want) < 1e-9 * abs(want)
    c = Criterion("x", 3, levels, np.ones(2), ll, n, ll, n)
    assert np.isclose(c.aic, 6 - 2 * ll.sum()) and np.isclose(c.bic, 3 * np.log(200) - 2 * ll.sum())


def test_chance_limit_is_the_binomial_quantile():
    # a correct model's failing cells (Binomial(n, alpha)) exceed the limit with <= 1 % chance
    from scipy import stats

    for n in (15, 56, 112, 620):
        k = chance_limit(n)
        assert stats.binom.sf(k, n, 0.01) <= 0.01 < stats.binom.sf(k - 1, n, 0.01)


# ------------------------------------------------------------------------------ the resolver
def test_resolve_device_model_every_form(tmp_path, empirical_card, rram_fit):
    preset = pcm.PCMModel.preset("rasch2023")
    pcm_card = tmp_path / "pcm.h5"
    io.save_device_model(preset, pcm_card, {"source_file": "lab.h5"})
    emp = rram_fit[0]
    assert io.resolve_device_model(preset) is preset
    assert io.resolve_device_model("rasch2023") == preset
    assert io.resolve_device_model(str(pcm_card)) == preset
    assert io.resolve_device_model(empirical_card) == emp  # os.PathLike
    assert io.resolve_device_model(None) is None
    assert io.resolve_device_model(None, default="rasch2023") == preset
    model, prov = io.resolve_device_model(str(empirical_card), provenance=True)
    assert model == emp and prov["family"] == "empirical" and prov["source"] == "device card"
    assert prov["card_sha256"] == io.file_sha256(empirical_card)
    assert prov["card_family"] == "empirical"
    assert io.model_from_dict(json.loads(json.dumps(io.model_to_dict(emp)))) == emp
    assert io.model_from_dict(preset.to_dict()) == preset  # a PCM dict without "family"
    with pytest.raises(TypeError, match="--device: expected a device model"):
        io.resolve_device_model(3.0, what="--device")
    with pytest.raises(FileNotFoundError, match="nope.h5: no such device card"):
        io.resolve_device_model(str(tmp_path / "nope.h5"))
    with pytest.raises(KeyError, match="nope"):
        io.resolve_device_model("nope")


# ---------------------------------------------------------------------------- the consumers
@pytest.mark.parametrize("sampler", ["numba", "torch"])
def test_array_state_round_trip_empirical(rram_fit, sampler, monkeypatch):
    """An array programmed with an empirical model, saved and restored, reads on exactly as the
    original, with the Numba sampler (CPU) and with the torch sampler (other devices; forced
    here on CPU)."""
    if sampler == "torch":
        monkeypatch.setattr(crossbar.array, "_numba_sampler", lambda t: False)
    model = rram_fit[0]
    w = np.random.default_rng(0).normal(0, 0.25, (16, 24)).astype(np.float32)
    cfg = crossbar.CrossbarConfig(max_rows=16)
    a = crossbar.AnalogArray(w, cfg, device=model)
    a.program(rng=4)
    st = export_state(a)
    assert ({"z0", "key"} if sampler == "numba" else {"z"}) <= set(st) and "g_prog" not in st
    b = import_state(crossbar.AnalogArray(w, cfg, device=model), st)
    for t in (60.0, 7e5):
        a.drift(t, rng=9)
        b.drift(t, rng=9)
        torch.testing.assert_close(a.w_tiles, b.w_tiles, rtol=0, atol=0)
    with pytest.raises(ValueError, match="programmed with a device model of the empirical family"):
        import_state(crossbar.AnalogArray(w, cfg, device="rasch2023"), st)


def test_task_spec_carries_an_empirical_model_through_pickle(rram_fit):
    model = rram_fit[0]
    net = torch.nn.Sequential(torch.nn.Linear(6, 4))
    from aimc_device import nn as ann

    analog = ann.convert(net, device=model, rng=0)
    spec = ModelSpec.from_model("cnn", {}, 0, crossbar.CrossbarConfig(), model, (), analog)
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and io.model_from_dict(again.device) == model
    assert json.loads(json.dumps(again.device))["family"] == "empirical"


def test_cli_fit_family_and_mvm_error_with_an_empirical_card(tmp_path, capsys, empirical_card,
                                                             rram_fit):
    camp = tmp_path / "rram.h5"
    io.write_measurements(_rram(levels=4, devices=60, seed=8), camp)
    card = tmp_path / "card.h5"
    assert main(["fit", str(camp), "-o", str(card), "--family", "empirical", "--quiet"]) == 0
    model, prov = io.load_device_card(card)
    assert isinstance(model, pcm.EmpiricalModel) and prov["family_choice"] == "given"
    assert "--family empirical" in prov["command"]
    capsys.readouterr()
    assert main(["mvm-error", "--device", str(empirical_card), "--t", "3600",
                 "--n-inputs", "20", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    want = crossbar.mvm_error(device=rram_fit[0], t=3600.0, rng=1, n_inputs=20)
    assert f"{100 * want:.2f} %" in out
