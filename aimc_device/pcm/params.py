"""Parameter objects of the PCM device model.

Every published or fitted number of the device model lives here, in :class:`PCMModel`, with its
unit and citation. Functions in :mod:`aimc_device.pcm` take a model; none of them holds a constant.

References
----------
.. [1] M. J. Rasch et al., "Hardware-aware training for large-scale and diverse deep learning
   inference workloads using in-memory computing-based accelerators", Nat. Commun. 14, 5282
   (2023), doi:10.1038/s41467-023-40770-4, Eqs. 7-13.
.. [2] S. R. Nandakumar et al., "Phase-change memory models for deep learning training and
   inference", ICECS (2019).
.. [3] V. Joshi et al., "Accurate deep neural network inference using computational phase-change
   memory", Nat. Commun. 11, 2473 (2020).
.. [4] JEDEC JEP122, "Failure Mechanisms and Models for Semiconductor Devices": the Arrhenius
   acceleration factor AF = exp(E_a / k_B (1/T_use - 1/T_stress)) of a thermally activated
   mechanism.
.. [5] D. Ielmini, S. Lavizzari, D. Sharma, A. L. Lacaita, "Temperature acceleration of
   structural relaxation in amorphous Ge2Sb2Te5", Appl. Phys. Lett. 92(19) (2008),
   doi:10.1063/1.2930680, and "Reliability impact of chalcogenide-structure relaxation in
   phase-change memory (PCM) cells - Part I: Experimental study", IEEE Trans. Electron Devices
   56(5), 1070-1077 (2009), doi:10.1109/TED.2009.2016397:
   drift (structural relaxation) of PCM is thermally activated; an anneal at a higher
   temperature reaches the state of a longer time at a lower one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

__all__ = ["PCMModel", "READ_NOISE_TIME_CHOICES", "READ_NOISE_REFERENCE_CHOICES", "scale_note"]

#: How the time enters the 1/f read-noise log term (docs/model.md section 4, Eq. 11).
#: "t": ln((t + T_read) / (2 T_read)) as printed in [1];
#: "t_plus_t0": ln((t + t0 + T_read) / (2 T_read)), the time since the start of programming, as in
#: the widely used public implementation (IBM aihwkit's PCMLikeNoiseModel).
READ_NOISE_TIME_CHOICES = ("t", "t_plus_t0")
#: Which relative conductance sets Q_s(x) (Eq. 10): "target" x = g^/g_max as in [1];
#: "programmed" x = g_P/g_max as in aihwkit.
READ_NOISE_REFERENCE_CHOICES = ("target", "programmed")


def scale_note(**factors: float) -> str:
    """Check the factors of a model's ``scaled`` (finite, >= 0) and describe those that are
    not 1 ("programming x2, read_noise x0.5"); "" when all are 1."""
    for k, v in factors.items():
        if not (np.isfinite(v) and v >= 0):
            raise ValueError(f"scaled: {k} = {v!r}: a factor must be finite and >= 0")
    return ", ".join(f"{k} x{v:g}" for k, v in factors.items() if v != 1.0)


def check_stuck_fractions(model, bad) -> None:
    """The stuck-at fractions of a device model lie in [0, 1] and add up to at most 1;
    ``bad(field, what)`` makes the error."""
    fractions = ("stuck_at_zero", "stuck_at_gmax", "stuck_at_random")
    for name in fractions:
        if not 0.0 <= getattr(model, name) <= 1.0:
            raise bad(name, "a fraction of devices must lie in [0, 1]")
    if sum(getattr(model, n) for n in fractions) > 1.0:
        raise bad("stuck_at_zero", "the stuck-at fractions add up to more than 1")


@dataclass(frozen=True)
class PCMModel:
    """Statistics of a PCM device: programming noise, drift, 1/f read noise, faults.

    All conductances in siemens [S], times in seconds [s]. ``x = g_target / g_max`` is the
    relative target conductance, a pure number in [0, 1].

    Attributes
    ----------
    g_max : float
        Maximum programmable conductance [S]. 25 uS in [1].
    prog_coeffs : tuple of 3 float
        Programming-noise polynomial (c0, c1, c2) [S]: sigma_P = c0 + c1 x + c2 x^2 (Eq. 7).
    t0 : float
        Duration of programming; drift is referred to it [s] (Eq. 8). 20 s in [1].
    drift_mean_coeffs : tuple of 2 float
        (slope, intercept) of mu_nu = slope * ln x + intercept, dimensionless (Eq. 9).
    drift_mean_bounds : tuple of 2 float
        (low, high) clip of mu_nu, dimensionless.
    drift_std_coeffs : tuple of 2 float
        (slope, intercept) of sigma_nu = slope * ln x + intercept, dimensionless (Eq. 9).
    drift_std_bounds : tuple of 2 float
        (low, high) clip of sigma_nu, dimensionless.
    read_noise_coeff : float
        Prefactor of Q_s(x) = coeff * x^exponent, dimensionless (Eq. 10).
    read_noise_exponent : float
        Exponent of Q_s, dimensionless (Eq. 10).
    read_noise_max : float
        Cap of Q_s, dimensionless (Eq. 10).
    t_read : float
        Duration of one read, T_read [s] (Eq. 11). 250 ns in [1].
    read_noise_time : str
        "t" or "t_plus_t0": which time enters the log of Eq. 11 (see READ_NOISE_TIME_CHOICES).
    read_noise_reference : str
        "target" or "programmed": which conductance sets Q_s (see READ_NOISE_REFERENCE_CHOICES).
    stuck_at_zero, stuck_at_gmax, stuck_at_random : float
        Fractions of devices stuck at 0 S, at g_max, or at a uniform random conductance in
        [0, g_max], drawn per physical device (in a crossbar either device of a differential
        pair); a stuck device neither drifts nor shows read noise. 0 in the standard model.
    activation_energy : float
        Activation energy E_a of the time evolution [eV]: a time dt spent at temperature T
        counts as dt exp(E_a / k_B (1/T_ref - 1/T)) at the reference temperature (Arrhenius
        acceleration [4], applied to PCM drift as in [5]). 0 (no acceleration) in the presets:
        [1] gives no temperature dependence; a fit to a campaign with bakes sets it.
    reference_temperature : float
        Temperature T_ref [K] at which the statistics hold (the times of Eqs. 8-11 are
        equivalent times at T_ref). 300 K in the presets (room temperature; [1] states none).
    name : str
        A short label (preset name or campaign name).
    citation : str
        Where the numbers come from: a publication, or the campaign a fit used.
    """

    g_max: float = 25e-6
    prog_coeffs: tuple[float, float, float] = (0.26348e-6, 1.9650e-6, -1.1731e-6)
    t0: float = 20.0
    drift_mean_coeffs: tuple[float, float] = (-0.0155, 0.0244)
    drift_mean_bounds: tuple[float, float] = (0.049, 0.1)
    drift_std_coeffs: tuple[float, float] = (-0.0125, -0.0059)
    drift_std_bounds: tuple[float, float] = (0.008, 0.045)
    read_noise_coeff: float = 0.0088
    read_noise_exponent: float = -0.65
    read_noise_max: float = 0.2
    t_read: float = 250e-9
    read_noise_time: str = "t"
    read_noise_reference: str = "target"
    stuck_at_zero: float = 0.0
    stuck_at_gmax: float = 0.0
    stuck_at_random: float = 0.0
    activation_energy: float = 0.0
    reference_temperature: float = 300.0
    name: str = "custom"
    citation: str = ""

    #: Units of each numeric field, written next to it in device cards.
    UNITS: ClassVar[dict[str, str]] = {
        "g_max": "S", "prog_coeffs": "S", "t0": "s",
        "drift_mean_coeffs": "1", "drift_mean_bounds": "1",
        "drift_std_coeffs": "1", "drift_std_bounds": "1",
        "read_noise_coeff": "1", "read_noise_exponent": "1", "read_noise_max": "1",
        "t_read": "s", "stuck_at_zero": "1", "stuck_at_gmax": "1", "stuck_at_random": "1",
        "activation_energy": "eV", "reference_temperature": "K",
    }
    #: Numeric fields added after the first device cards; a card without them gets the default.
    OPTIONAL_FIELDS: ClassVar[tuple[str, ...]] = ("activation_energy", "reference_temperature")

    _PRESETS: ClassVar[dict[str, dict]] = {
        "rasch2023": dict(
            name="rasch2023",
            citation=(
                "M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), doi:10.1038/s41467-023-40770-4, "
                "Eqs. 7-11 (statistics from Nandakumar et al., ICECS 2019, and Joshi et al., "
                "Nat. Commun. 11, 2473, 2020)"
            ),
        ),
        # Same statistics, with the time and Q_s reference of IBM aihwkit's PCMLikeNoiseModel.
        "rasch2023-aihwkit": dict(
            name="rasch2023-aihwkit",
            read_noise_time="t_plus_t0",
            read_noise_reference="programmed",
            citation=(
                "M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Eqs. 7-11, with the read-noise "
                "time (t + t0) and Q_s(g_P) conventions of IBM aihwkit's PCMLikeNoiseModel"
            ),
        ),
    }

    def __post_init__(self) -> None:
        # Normalise sequences to tuples of float so that equality and hashing are exact.
        for name in ("prog_coeffs", "drift_mean_coeffs", "drift_mean_bounds",
                     "drift_std_coeffs", "drift_std_bounds"):
            object.__setattr__(self, name, tuple(float(v) for v in np.ravel(getattr(self, name))))
        for f in dataclasses.fields(self):
            if f.name in self.UNITS and not isinstance(getattr(self, f.name), tuple):
                object.__setattr__(self, f.name, float(getattr(self, f.name)))
        self._validate()

    def _validate(self) -> None:
        def bad(field_name: str, what: str) -> ValueError:
            return ValueError(f"PCMModel.{field_name} = {getattr(self, field_name)!r}: {what}")

        for name in self.UNITS:
            vals = np.atleast_1d(np.asarray(getattr(self, name), dtype=float))
            if not np.all(np.isfinite(vals)):
                raise bad(name, "must be finite")
        expected = {"prog_coeffs": 3, "drift_mean_coeffs": 2, "drift_mean_bounds": 2,
                    "drift_std_coeffs": 2, "drift_std_bounds": 2}
        for name, n in expected.items():
            if len(getattr(self, name)) != n:
                raise bad(name, f"needs exactly {n} values")
        for name in ("g_max", "t0", "t_read", "read_noise_max", "reference_temperature"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")
        for name in ("drift_mean_bounds", "drift_std_bounds"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise bad(name, "clip range is inverted: give (low, high) with low <= high")
        if self.drift_std_bounds[0] < 0:
            raise bad("drift_std_bounds", "a standard deviation cannot be negative")
        if self.read_noise_coeff < 0:
            raise bad("read_noise_coeff", "must be >= 0")
        if self.activation_energy < 0:
            raise bad("activation_energy", "must be >= 0 [eV] (0: no temperature acceleration)")
        x = np.linspace(0.0, 1.0, 101)
        if np.any(self.prog_coeffs[0] + self.prog_coeffs[1] * x + self.prog_coeffs[2] * x**2 < 0):
            raise bad("prog_coeffs", "the noise polynomial is negative somewhere on x in [0, 1]")
        check_stuck_fractions(self, bad)
        if self.read_noise_time not in READ_NOISE_TIME_CHOICES:
            raise bad("read_noise_time", f"choose one of {READ_NOISE_TIME_CHOICES}")
        if self.read_noise_reference not in READ_NOISE_REFERENCE_CHOICES:
            raise bad("read_noise_reference", f"choose one of {READ_NOISE_REFERENCE_CHOICES}")

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def preset(cls, name: str) -> "PCMModel":
        """A published device model by name.

        Parameters
        ----------
        name : str
            One of :meth:`presets`; "rasch2023" is the statistics of [1] (docs/model.md section 4).

        Raises
        ------
        KeyError
            For an unknown name; the message lists the known presets.
        """
        try:
            return cls(**cls._PRESETS[name])
        except KeyError:
            raise KeyError(
                f"unknown PCM preset {name!r}; known presets: {sorted(cls._PRESETS)}"
            ) from None

    @classmethod
    def presets(cls) -> list[str]:
        """Names accepted by :meth:`preset`."""
        return sorted(cls._PRESETS)

    def replace(self, **changes) -> "PCMModel":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def scaled(self, *, programming: float = 1.0, drift_mean: float = 1.0,
               drift_spread: float = 1.0, read_noise: float = 1.0,
               stuck: float = 1.0) -> "PCMModel":
        """A model with its statistics scaled by factors (>= 0; all 1: this model).

        - ``programming`` scales sigma_P (Eq. 7): ``prog_coeffs``;
        - ``drift_mean`` scales mu_nu (Eq. 9): ``drift_mean_coeffs`` and ``drift_mean_bounds``
          (clip(f a ln x + f b, f lo, f hi) = f mu_nu);
        - ``drift_spread`` scales sigma_nu (Eq. 9) alike;
        - ``read_noise`` scales Q_s (Eq. 10): ``read_noise_coeff`` and ``read_noise_max``
          (the cap is kept at 0, where the coefficient is 0);
        - ``stuck`` scales the three stuck-at fractions (zero stays zero; set fractions with
          :meth:`replace`).

        The same knobs as :meth:`aimc_device.pcm.EmpiricalModel.scaled`.
        """
        note = scale_note(programming=programming, drift_mean=drift_mean,
                          drift_spread=drift_spread, read_noise=read_noise, stuck=stuck)
        if not note:
            return self

        def times(values, f):
            return tuple(f * v for v in values)

        return self.replace(
            prog_coeffs=times(self.prog_coeffs, programming),
            drift_mean_coeffs=times(self.drift_mean_coeffs, drift_mean),
            drift_mean_bounds=times(self.drift_mean_bounds, drift_mean),
            drift_std_coeffs=times(self.drift_std_coeffs, drift_spread),
            drift_std_bounds=times(self.drift_std_bounds, drift_spread),
            read_noise_coeff=self.read_noise_coeff * read_noise,
            read_noise_max=self.read_noise_max * (read_noise if read_noise > 0 else 1.0),
            stuck_at_zero=self.stuck_at_zero * stuck, stuck_at_gmax=self.stuck_at_gmax * stuck,
            stuck_at_random=self.stuck_at_random * stuck, name=f"{self.name} ({note})",
            citation=f"{self.citation}; scaled: {note}" if self.citation else f"scaled: {note}")

    @property
    def family(self) -> str:
        """The device-model family: "pcm"."""
        return "pcm"

    def to_dict(self) -> dict:
        """Field name -> value, tuples as lists; the inverse of ``PCMModel(**d)``."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @property
    def has_faults(self) -> bool:
        """True when any stuck-at fraction is non-zero."""
        return (self.stuck_at_zero + self.stuck_at_gmax + self.stuck_at_random) > 0.0
