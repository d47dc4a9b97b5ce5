"""The calibration uncertainty of a fitted device model: its parameters' covariance.

A fit estimates each statistic of a device model from a finite campaign; the estimates carry a
covariance (from the fits' Jacobians, :mod:`aimc_device.fit`). :class:`ParameterCovariance`
keeps it with the names of the parameters it covers and draws *plausible device models*:
models whose fitted parameters are drawn from the multivariate normal N(theta_hat, C) of the
fit (the large-sample distribution of a least-squares estimate). Evaluating a network on such
draws separates the spread of its accuracy that comes from the calibration (a finite campaign)
from the spread that comes from programming the devices again.

Parameters are named ``field`` or ``field[i]`` after the fields of the model
(``prog_coeffs[1]``, ``drift_mean_bounds[0]``, ``read_noise_coeff``); those the fit did not
estimate (taken from a prior, a clip not reached by the data) are left out and stay fixed.

References
----------
.. [1] W. H. Press et al., Numerical Recipes, 3rd ed., Cambridge University Press (2007),
   section 15.6 (confidence limits on estimated model parameters: the covariance of a
   least-squares fit and Monte Carlo draws from it).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

from .._random import as_generator

__all__ = ["ParameterCovariance"]

_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?$")


def _split(name: str) -> tuple[str, int | None]:
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"parameter name {name!r}: expected 'field' or 'field[i]'")
    return m.group(1), (int(m.group(2)) if m.group(2) is not None else None)


@dataclass(frozen=True)
class ParameterCovariance:
    """Covariance of the fitted parameters of a device model.

    Attributes
    ----------
    parameters : tuple of str
        Names ``field`` or ``field[i]`` of the model's numeric fields, in the order of
        ``covariance``.
    values : ndarray (P,)
        The fitted values, in the units of each field (``PCMModel.UNITS``).
    covariance : ndarray (P, P)
        Their covariance, in the product of the fields' units; symmetric, positive
        semi-definite.
    """

    parameters: tuple
    values: np.ndarray
    covariance: np.ndarray

    def __post_init__(self):
        names = tuple(str(p) for p in self.parameters)
        object.__setattr__(self, "parameters", names)
        vals = np.asarray(self.values, dtype=np.float64).reshape(-1)
        cov = np.asarray(self.covariance, dtype=np.float64)
        object.__setattr__(self, "values", vals)
        object.__setattr__(self, "covariance", cov)
        p = len(names)
        if len(set(names)) != p:
            raise ValueError(f"ParameterCovariance.parameters: duplicate names in {names}")
        for n in names:
            _split(n)
        if vals.shape != (p,) or cov.shape != (p, p):
            raise ValueError(f"ParameterCovariance: {p} parameters need values ({p},) and a "
                             f"({p}, {p}) covariance; got {vals.shape} and {cov.shape}")
        if not (np.all(np.isfinite(vals)) and np.all(np.isfinite(cov))):
            raise ValueError("ParameterCovariance: values and covariance must be finite")
        if p and not np.allclose(cov, cov.T, rtol=1e-8, atol=0.0):
            raise ValueError("ParameterCovariance.covariance: not symmetric")
        if p and np.linalg.eigvalsh(0.5 * (cov + cov.T)).min() < -1e-9 * max(
                float(np.abs(np.diag(cov)).max()), 1e-300):
            raise ValueError("ParameterCovariance.covariance: not positive semi-definite")

    @property
    def stderr(self) -> np.ndarray:
        """Standard error of each parameter (units of its field)."""
        return np.sqrt(np.clip(np.diag(self.covariance), 0.0, None))

    def relative_stderr(self) -> dict:
        """``{name: stderr / |value|}`` (dimensionless; inf where the value is 0)."""
        with np.errstate(divide="ignore"):
            rel = self.stderr / np.abs(self.values)
        return dict(zip(self.parameters, rel.tolist()))

    def check_model(self, model) -> None:
        """Raise ValueError when ``model`` lacks a parameter (names a field it does not have)."""
        for name in self.parameters:
            field, i = _split(name)
            if not hasattr(model, field):
                raise ValueError(f"ParameterCovariance: {type(model).__name__} has no field "
                                 f"{field!r} (parameter {name!r})")
            v = getattr(model, field)
            if i is not None and (not isinstance(v, tuple) or i >= len(v)):
                raise ValueError(f"ParameterCovariance: {type(model).__name__}.{field} has no "
                                 f"element {i} (parameter {name!r})")

    def apply(self, model, theta):
        """``model`` with the parameters set to ``theta`` (P,), validated by the model."""
        fields: dict = {}
        for name, v in zip(self.parameters, np.asarray(theta, dtype=np.float64)):
            field, i = _split(name)
            if i is None:
                fields[field] = float(v)
            else:
                cur = list(fields.get(field, getattr(model, field)))
                cur[i] = float(v)
                fields[field] = tuple(cur)
        return dataclasses.replace(model, **fields)

    def sample_models(self, model, n: int, rng=None, max_tries: int = 50) -> list:
        """``n`` plausible device models: ``model`` with its fitted parameters drawn from
        N(``values``, ``covariance``).

        A draw that is not a valid model (a negative programming-noise polynomial, an inverted
        clip range) is drawn again (the normal truncated to valid models).

        Parameters
        ----------
        model : PCMModel (or any frozen dataclass with the named fields)
        n : int, number of models
        rng : int, numpy.random.Generator or None
        max_tries : int, draws per model before giving up

        Returns
        -------
        list of models, each named ``"<name> (calibration draw k)"``.

        Raises
        ------
        ValueError
            When ``max_tries`` draws in a row are invalid (the covariance is far too wide for
            the model's constraints).
        """
        self.check_model(model)
        gen = as_generator(rng)
        out = []
        # SVD square root: works for a singular (semi-definite) covariance too
        u, s, _ = np.linalg.svd(0.5 * (self.covariance + self.covariance.T))
        root = u * np.sqrt(np.clip(s, 0.0, None))
        for k in range(int(n)):
            for _ in range(max_tries):
                theta = self.values + root @ gen.standard_normal(self.values.size)
                try:
                    m = self.apply(model, theta)
                except ValueError:
                    continue
                out.append(dataclasses.replace(m, name=f"{model.name} (calibration draw {k})"))
                break
            else:
                raise ValueError(f"ParameterCovariance.sample_models: {max_tries} draws in a row "
                                 f"gave no valid {type(model).__name__}; the covariance is too "
                                 "wide for the model's constraints")
        return out

    def to_dict(self) -> dict:
        """Plain lists (the inverse of ``ParameterCovariance(**d)``)."""
        return {"parameters": list(self.parameters), "values": self.values.tolist(),
                "covariance": self.covariance.tolist()}
