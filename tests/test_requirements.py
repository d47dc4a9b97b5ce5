"""Tests of aimc_device.study.requirements and of the calibration uncertainty of a fitted card.

The known-answer problem: one analog linear layer doing regression (mean squared error), with
the device noise and every periphery nonideality off except the knob under test. With output
noise sigma_out alone, each output carries alpha s_i sigma_out eps (alpha the input range, s_i
the column's digital scale), so the error is MSE(sigma) = sigma^2 K with K = alpha^2 mean(s_i^2)
and A*(sigma) = 1 - MSE / MSE_chance: the threshold for A* >= target is
sigma* = sqrt((1 - target) MSE_chance / K), which the search must bracket.
"""
from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch

from aimc_device import fit, io, nn as ann, pcm, study
from aimc_device.cli import main
from aimc_device.crossbar import CrossbarConfig
from aimc_device.study.requirements import KNOBS, SearchSettings, format_requirements_table, search_limit

QUIET = CrossbarConfig(inp_bits=None, out_bits=None, out_noise=0.0, w_noise=0.0, ir_drop=0.0,
                       drift_compensation=None)
#: A device model without programming noise, drift or read noise (the periphery alone).
EXACT = pcm.PCMModel.preset("rasch2023").scaled(programming=0, drift_mean=0, drift_spread=0,
                                                read_noise=0)


@pytest.fixture(scope="module")
def regression():
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(32, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(8, 32, generator=gen) / 4)
    x = (torch.rand(512, 32, generator=gen) * 2 - 1)
    y = lin(x).detach()
    return lin, [(x, y)], float((y**2).mean())


def mse(model, data):
    with torch.no_grad():
        return float(sum(((model(a) - b) ** 2).mean() for a, b in data) / len(data))


def _run(regression, tmp_path, cfg, knob, **kw):
    lin, data, chance = regression
    return study.requirements(model=lin, test_data=data, metric=mse, fp_error=0.0,
                              chance_error=chance, device=EXACT, cfg=cfg, knobs=[knob],
                              times=(3600.0,), scheduler="synchronous", out_dir=tmp_path,
                              plot=False, verbose=False, progress=False, **kw)


def test_output_noise_threshold_recovered_and_resumed(regression, tmp_path):
    lin, data, chance = regression
    cfg = QUIET.replace(out_noise=0.01)
    ds = _run(regression, tmp_path, cfg, "output noise", coverage=0.5, rtol=0.05)
    # the closed form, from the converted layer's input range and digital scales
    tile = ann.analog_tiles(ann.convert(lin, cfg, EXACT))[0]
    with torch.no_grad():
        scale = tile.gamma[0] * tile.kappa[0] / tile._kappa0
        k = float(tile.alpha[0] ** 2 * scale.pow(2).mean())
    sigma_star = math.sqrt((1 - 0.99) * chance / k)
    lim, bad = float(ds["limit"][0, 0]), float(ds["failing"][0, 0])
    assert str(ds["status"].values[0, 0]) == "limit" and bool(ds["monotone"][0, 0])
    assert bad / lim <= 1.05 + 1e-9                                  # the stated precision
    assert 0.98 * lim <= sigma_star <= 1.02 * bad                    # the bracket holds sigma*
    assert float(ds["headroom"][0, 0]) == pytest.approx(lim / 0.01)
    # resumed from the checkpoint: nothing is evaluated again
    calls = []

    def counting(model, d):
        calls.append(1)
        return mse(model, d)

    ds2 = study.requirements(model=lin, test_data=data, metric=counting, fp_error=0.0,
                             chance_error=chance, device=EXACT, cfg=cfg, knobs=["output noise"],
                             times=(3600.0,), coverage=0.5, rtol=0.05, scheduler="synchronous",
                             out_dir=tmp_path, plot=False, verbose=False, progress=False,
                             overwrite=True)
    assert not calls and float(ds2["limit"][0, 0]) == lim


def test_adc_bits_fewest_that_meet_the_target(regression, tmp_path):
    lin, data, chance = regression
    ds = _run(regression, tmp_path, QUIET.replace(out_bits=8), "ADC bits", target=0.999)
    bits = float(ds["limit"][0, 0])
    assert bits == int(bits) and float(ds["failing"][0, 0]) == bits - 1
    # checked directly: `bits` bits meet the target, one fewer does not
    for b, ok in ((int(bits), True), (int(bits) - 1, False)):
        model = ann.convert(lin, QUIET.replace(out_bits=b), EXACT)
        ann.program(model, rng=0)
        ann.drift(model, 3600.0, rng=1)
        a = float(ann.normalized_accuracy(mse(model, data), 0.0, chance))
        assert (a >= 0.999) is ok, (b, a)
    assert float(ds["headroom"][0, 0]) == 8 - bits


def test_a_knob_not_met_over_its_range_reports_the_best_it_reached(regression, tmp_path):
    # The S-shaped ADC bends the transfer by itself, at any spread: with a target it cannot
    # meet, the table says so and gives the best A* reached, which must be the S-ADC's own.
    ds = _run(regression, tmp_path, QUIET, "S-ADC spread", target=0.99999, coverage=0.5)
    assert str(ds["status"].values[0, 0]) == "below range"
    table = format_requirements_table(ds)
    note = next(line for line in table.splitlines() if line.startswith("not met: S-ADC"))
    best, at = (float(v) for v in note.split("A* ")[1].split(" at "))
    lin, data, chance = regression
    model = ann.convert(lin, QUIET.replace(s_adc=True, sigma_zeta=at), EXACT)
    ann.program(model, rng=0)
    ann.drift(model, 3600.0, rng=1)
    a = float(ann.normalized_accuracy(mse(model, data), 0.0, chance))
    assert best < 0.99999 and best == pytest.approx(a, abs=2e-4)  # printed to 1e-4


def test_retrain_trains_at_every_value_with_the_users_loss(regression, tmp_path, monkeypatch):
    lin, data, chance = regression
    calls = []
    train = ann.train_hwa

    def counting(model, loader, **kw):
        calls.append(kw["loss_fn"])
        return train(model, loader, **kw)

    monkeypatch.setattr(ann, "train_hwa", counting)
    ds = _run(regression, tmp_path, QUIET.replace(out_noise=0.01), "output noise",
              coverage=0.5, rtol=0.5, min_repeats=2, max_repeats=2, retrain=True,
              train_data=data, loss_fn=torch.nn.functional.mse_loss)
    points = json.loads(ds.attrs["search_points"])["output noise @ 1 h"]
    # once for the model, then once per value searched (and once for the card's repeats)
    assert len(calls) == 1 + len(points["values"]) + 1
    assert all(f is torch.nn.functional.mse_loss for f in calls)
    assert int(ds.attrs["retrain"]) == 1 and str(ds["status"].values[0, 0]) == "limit"


def _synthetic(curve):
    """evaluate(v, repeats) -> A* = curve(v) + a small deterministic spread per repeat."""
    def evaluate(v, repeats):
        return np.array([curve(v) + 1e-4 * ((r % 3) - 1) for r in repeats])
    return evaluate


def test_monotonicity_violation_reported():
    knob = KNOBS["programming noise"]
    bumpy = _synthetic(lambda v: 0.993 if v < 1.3 else (0.999 if v < 1.9 else 0.95))
    res = search_limit(bumpy, 1.0, knob, SearchSettings())
    assert not res.monotone and "monotonically" in res.message
    assert "at 1.414" in res.message and "at 1," in res.message    # the values that rose
    smooth = _synthetic(lambda v: 1.0 - 0.005 * v)                  # crosses 0.99 at v = 2
    res = search_limit(smooth, 1.0, knob, SearchSettings(rtol=0.02, coverage=0.5))
    assert res.monotone and res.message == ""
    assert res.limit <= 2.0 <= res.failing and res.failing / res.limit <= 1.02 + 1e-9


def test_knob_that_cannot_reach_the_target_alone_stops_early():
    flat = _synthetic(lambda v: 0.97 - 1e-4 * v)                   # other nonidealities dominate
    res = search_limit(flat, 1.0, KNOBS["drift spread"], SearchSettings())
    assert res.status == "below range" and "not met by this knob alone" in res.message
    assert len(res.values) == 3 and not np.isfinite(res.limit)


def test_repeats_added_only_near_the_decision():
    st = SearchSettings(min_repeats=4, max_repeats=32, coverage=0.5)
    for seed in range(3):
        noisy = np.random.default_rng(seed).normal(0.0, 0.004, 64)
        res = search_limit(lambda v, reps: np.array([1.0 - 0.005 * v + noisy[r] for r in reps]),
                           1.0, KNOBS["read noise"], st)               # A* = 0.99 at v = 2
        busiest = res.values[int(np.argmax(res.n))]
        assert max(res.n) > 4 and 1 / 1.3 < busiest / 2.0 < 1.3
        assert np.mean(res.n) < 32 / 2                                 # not everywhere
        assert res.n[res.values.index(4.0)] == 4 if 4.0 in res.values else True


def test_calibration_spread_recovers_variance_components():
    gen = np.random.default_rng(1)
    a = 0.98 + gen.normal(0, 0.01, (400, 1)) + gen.normal(0, 0.04, (400, 4))
    sp = study.calibration_spread(a)
    assert float(sp["calibration"]) == pytest.approx(0.01, rel=0.25)
    assert float(sp["repeat"]) == pytest.approx(0.04, rel=0.05)


@functools.lru_cache(maxsize=None)
def _fitted(devices_per_level):
    m = pcm.PCMModel.preset("rasch2023")
    ds = pcm.simulate_campaign(m, levels=8, devices_per_level=devices_per_level, repeats=2,
                               rng=3)
    model, report = fit.fit_pcm(ds, prior=m)
    return model, report.parameter_covariance()


def test_fit_uncertainty_kept_in_card_and_grows_with_fewer_devices(tmp_path):
    small, big = _fitted(12), _fitted(192)
    spreads = []
    for model, unc in (small, big):
        draws = unc.sample_models(model, 200, rng=0)
        g = np.array([0.5 * model.g_max])
        sp = np.std([pcm.programming_noise_std(g, d)[0] for d in draws])
        mu = np.std([pcm.drift_exponent_stats(g, d)[0][0] for d in draws])
        spreads.append((sp, mu))
    # 16 x the devices: about 4 x less spread (sqrt(16)); at least 2.5 x asked
    assert spreads[0][0] > 2.5 * spreads[1][0] and spreads[0][1] > 2.5 * spreads[1][1]
    model, unc = big
    draws = unc.sample_models(model, 400, rng=1)
    p = np.array([d.prog_coeffs for d in draws])
    np.testing.assert_allclose(p.std(axis=0), unc.stderr[:3], rtol=0.15)
    card = tmp_path / "card.h5"
    io.save_device_model(model, card, uncertainty=unc)
    back = io.load_device_uncertainty(card)
    assert back.parameters == unc.parameters
    np.testing.assert_array_equal(back.covariance, unc.covariance)
    io.save_device_model(model, tmp_path / "plain.h5")               # a card without one
    assert io.load_device_uncertainty(tmp_path / "plain.h5") is None
    assert io.load_device_model(card) == model


def test_calibration_draws_in_requirements(regression, tmp_path):
    model, unc = _fitted(12)
    lin, data, chance = regression
    ds = study.requirements(model=lin, test_data=data, metric=mse, fp_error=0.0,
                            chance_error=chance, device=model, uncertainty=unc,
                            cfg=QUIET.replace(out_noise=0.04), knobs=["output noise"],
                            times=(3600.0,), calibration_samples=3, calibration_repeats=2,
                            max_repeats=4, scheduler="synchronous", out_dir=tmp_path,
                            plot=False, verbose=False, progress=False)
    assert ds["a_star_calibration"].shape == (3, 1, 2)
    assert np.all(np.isfinite(ds["calibration_spread"])) and float(ds["repeat_spread"][0]) > 0
    analog = ann.convert(lin, QUIET.replace(drift_compensation="global"), model)
    ev = study.evaluate_calibration(analog, data, model, unc, n_models=3, metric=mse,
                                    times=(3600.0,), repeats=2, fp_error=0.0,
                                    chance_error=chance)
    assert ev["mse"].shape == (3, 2, 1) and float(ev["repeat_spread"][0]) > 0
    assert float(ev["calibration_spread"][0]) >= 0
    # the same through nn.evaluate_over_time, which propagates a fit's covariance itself
    direct = ann.evaluate_over_time(analog, data, mse, (3600.0,), 2, rng=0, fp_error=0.0,
                                    chance_error=chance, progress=False, name="mse",
                                    uncertainty=unc, calibration_samples=3)
    np.testing.assert_array_equal(direct["mse"].values, ev["mse"].values)
    assert np.ptp(ev["mse"].values.mean(axis=1)) > 0      # the device models differ
    with pytest.raises(ValueError, match="give uncertainty"):
        ann.evaluate_over_time(analog, data, mse, (3600.0,), 2, calibration_samples=3)
    with pytest.raises(ValueError, match="no fit covariance"):
        study.requirements(model=lin, test_data=data, metric=mse, fp_error=0.0,
                           chance_error=chance, device=model, calibration_samples=2,
                           out_dir=tmp_path, plot=False, verbose=False, progress=False)


def test_cli_requirements_bad_options(capsys):
    assert main(["requirements", "--min-repeats", "8", "--max-repeats", "4"]) == 2
    assert "--max-repeats" in capsys.readouterr().err
    assert main(["requirements", "--target", "1.5"]) == 2
    with pytest.raises(ValueError, match="knobs: unknown"):
        study.requirements(knobs=["flux capacitor"])
