"""The crossbar configuration: tile size, periphery, nonidealities, drift compensation.

Every published number of the crossbar model lives in :class:`CrossbarConfig`, with its unit and
the equation (docs/model.md) using it; functions of :mod:`aimc_device.crossbar` take a config and
hold no constant of their own.

References
----------
.. [1] M. J. Rasch et al., "Hardware-aware training for large-scale and diverse deep learning
   inference workloads using in-memory computing-based accelerators", Nat. Commun. 14, 5282
   (2023), doi:10.1038/s41467-023-40770-4, Eqs. 1, 2, 5, 14-20 (docs/model.md sections 1-3, 5-7).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import shutil
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

__all__ = ["CrossbarConfig", "DRIFT_COMPENSATION_CHOICES", "NOISE_MANAGEMENT_CHOICES",
           "BOUND_MANAGEMENT_CHOICES", "PAIR_DEVICES_CHOICES", "S_ADC_GAIN_CHOICES"]

#: Drift compensation (docs/model.md, 5): one digital factor per tile, one per column, or off.
DRIFT_COMPENSATION_CHOICES = ("global", "column", None)
#: Dynamic input scaling: none (static alpha, the standard model) or per-sample abs-max.
NOISE_MANAGEMENT_CHOICES = ("none", "abs_max")
#: Output saturation handling: none, or iterative (halve the input and repeat while saturated).
BOUND_MANAGEMENT_CHOICES = ("none", "iterative")
#: Which devices of each differential pair are programmed and modelled (see
#: CrossbarConfig.pair_devices).
PAIR_DEVICES_CHOICES = ("active", "both")
#: Gain calibration of the S-shaped ADC (see CrossbarConfig.s_adc_gain).
S_ADC_GAIN_CHOICES = ("column", "tile", "none")

#: Former fields that are simulator options (crossbar.EngineOptions), not physics: ignored when
#: a saved config holds them.
_SIMULATOR_OPTIONS = {"aux_bfloat16": "crossbar.EngineOptions(aux_bfloat16=...)"}

_CITE = "Rasch et al., Nat. Commun. 14, 5282 (2023)"


@dataclass(frozen=True)
class CrossbarConfig:
    """Crossbar tile and periphery of the analog MVM. Defaults: the standard model of [1].

    Relative quantities: inputs are in units of the input range alpha (x~ = x / alpha), weights
    in units of the column scale (w~ = w / gamma, in [-1, 1]), outputs in units of the output of
    one fully-on weight row driven by a full-scale input ("normalised output units").

    Attributes
    ----------
    max_rows : int
        Most inputs (rows) per tile; larger layers are split in near-equal parts. 512 in [1]
        (docs/model.md sec. 1).
    max_cols : int
        Most outputs (columns) per tile, 512 in [1]. Columns do not couple in this model, so the
        output dimension is never split for accuracy (docs/model.md sec. 1).
    inp_bits : int or None
        DAC resolution q_in [bit], 2^q - 1 levels (Eq. 5). 8 in [1]. None or 0: no rounding
        (unlimited resolution); the inputs are still clipped to the bound.
    inp_bound : float
        DAC bound b_in, normalised input units (Eq. 5). 1 in [1]. ``inf`` (only with no bits):
        no clipping.
    out_bits : int or None
        ADC resolution q_out [bit] (Eq. 5). 8 in [1]. None or 0: no rounding; the outputs are
        still clipped to the bound.
    out_bound : float
        ADC bound b_out, normalised output units (Eq. 5). 10 in [1]. ``inf`` (only with no
        bits): no clipping.
    out_noise : float
        Additive output noise sigma_out, normalised output units, new draw every MVM (Eq. 2).
        0.04 in [1] (about half an ADC bin).
    w_noise : float
        Short-term weight (read) noise sigma_w0 referred to the output, relative to g_max, new
        draw every MVM (Eq. 14). 0.0175 in [1].
    ir_drop : float
        Wire-resistance scale s of the IR drop, dimensionless: r_wire -> s r_wire, i.e.
        g_ir -> s g_ir in the activity a_i = s g_ir n sum_j |w~_ij| |x~_j| (Eq. 18). The IR-drop
        term dy_i = -c(a_i) sum_j w~_ij x~_j P_j (Eqs. 15-17) is cubic in s through c(a): it
        grows as c(s a) / c(a), nearly linearly for small a and less where the a^2 term of c
        matters (on the test case of Eq. 20, s = 10 gives 8.2 times the standard term, not
        10). 0 turns IR drop off. 1 in [1]. (The widely used public implementation, IBM
        aihwkit, multiplies the term itself by its ``ir_drop``.)
    ir_drop_g : float
        g_ir = r_wire * g_max_ir, dimensionless: 0.35 Ohm x 5 uS = 1.75e-6 in [1] (Eq. 18; note
        the 5 uS there, not the 25 uS g_max of the PCM model).
    s_adc : bool
        S-shaped ADC nonlinearity on or off (Eq. 19). Off in the standard model of [1].
    mu_zeta : float
        Mean saturation zeta of the S-shaped ADC, per unit of z / b_out, dimensionless (Eq. 19).
        1/4 in [1].
    sigma_zeta : float
        Relative column-to-column spread of zeta, dimensionless: zeta_i = mu_zeta (1 +
        sigma_zeta xi_i), drawn once per column at programming (Eq. 19). 0.1, an assumption:
        [1] gives no value for it in its main text.
    s_adc_gain : str
        Gain calibration of the S-shaped ADC, f_i(z) = g_i z / (1 + zeta_i |z| / b_out)
        (Eq. 19; [1] states a gain correction in words only). "column" (default): g_i =
        1 + zeta_i, each column calibrated so that f_i(+-b_out) = +-b_out, which also removes
        most of the effect of the column-to-column spread sigma_zeta; "tile": one gain
        g = 1 + mu_zeta for the tile, calibrated on the mean saturation, so that the spread
        of the columns stays in the output; "none": g = 1, the bare saturating transfer.
    drift_compensation : str or None
        "global" (one factor s_ref / s_t per tile, docs/model.md 5), "column" (one per column)
        or None.
    drift_comp_inputs : int
        Number of known +-1 input vectors fed for the drift-compensation readout s = sum |y|
        (docs/model.md sec. 5). 64 (not given in [1]; enough that s varies < 1 % between draws).
    g_max : float
        Conductance of a full-scale weight |w~| = 1 [S]. 25 uS in [1] (docs/model.md sec. 1).
    noise_management : str
        "none" (static input range alpha, [1]) or "abs_max" (alpha = max |x| per sample and tile).
    bound_management : str
        "none" ([1]) or "iterative": while an output saturates, halve the inputs of that sample
        and repeat, up to ``bound_management_iters`` times.
    bound_management_iters : int
        Most halvings of iterative bound management. 3 (a common choice; not in [1]).
    asymmetry : float
        Read-polarity asymmetry sigma_a, dimensionless: during the negative-input read phase a
        weight reads as w~ (1 + a), a ~ Normal(0, sigma_a) drawn once at programming
        (docs/model.md sec. 4, faults). 0 in [1].
    columnwise_scaling : bool
        True: one scale per column of each tile, gamma_i = max_j |w_ij| (docs/model.md sec. 1, [1]).
        False: one scale per tile, its largest |w| (what IBM aihwkit calls
        ``weight_scaling_columnwise=False``): small columns then use a smaller part of the
        conductance range and see more relative device noise.
    pair_devices : str
        Which devices of the differential pair of each weight, w~ = (g+ - g-) / g_max, are
        programmed and modelled (programming noise, drift, read noise, faults).
        "active" (default): a non-zero weight programs only the device of its sign, the other
        stays at exactly 0 S (the convention of [1], docs/model.md sec. 1); an exact-zero weight
        programs both devices toward 0 S, each with its own noise, so that its error has zero
        mean (one device alone, clipped at 0 S, would give every zero weight a positive error).
        "both": the other device of every pair is programmed toward 0 S and noisy as well, as
        in hardware; each non-zero weight then also carries the other device's (positive,
        clipped) programming error with the opposite sign.
    """

    max_rows: int = 512
    max_cols: int = 512
    inp_bits: int | None = 8
    inp_bound: float = 1.0
    out_bits: int | None = 8
    out_bound: float = 10.0
    out_noise: float = 0.04
    w_noise: float = 0.0175
    ir_drop: float = 1.0
    ir_drop_g: float = 1.75e-6
    s_adc: bool = False
    mu_zeta: float = 0.25
    sigma_zeta: float = 0.1
    s_adc_gain: str = "column"
    drift_compensation: str | None = "global"
    drift_comp_inputs: int = 64
    g_max: float = 25e-6
    noise_management: str = "none"
    bound_management: str = "none"
    bound_management_iters: int = 3
    asymmetry: float = 0.0
    columnwise_scaling: bool = True
    pair_devices: str = "active"

    #: Unit of each numeric field ("1": dimensionless or normalised units).
    UNITS: ClassVar[dict[str, str]] = {
        "max_rows": "1", "max_cols": "1", "inp_bits": "bit", "inp_bound": "1",
        "out_bits": "bit", "out_bound": "1", "out_noise": "1", "w_noise": "1",
        "ir_drop": "1", "ir_drop_g": "1", "mu_zeta": "1", "sigma_zeta": "1", "g_max": "S",
        "bound_management_iters": "1", "asymmetry": "1", "drift_comp_inputs": "1",
    }
    #: Where each default comes from.
    CITATIONS: ClassVar[dict[str, str]] = {
        "max_rows": f"{_CITE}, Methods (512 x 512 tiles)",
        "max_cols": f"{_CITE}, Methods (512 x 512 tiles)",
        "inp_bits": f"{_CITE}, Eq. 5 (8-bit DAC)",
        "inp_bound": f"{_CITE}, Eq. 5 (DAC bound 1)",
        "out_bits": f"{_CITE}, Eq. 5 (8-bit ADC)",
        "out_bound": f"{_CITE}, Eq. 5 (ADC bound 10)",
        "out_noise": f"{_CITE}, Eq. 2 (sigma_out = 0.04)",
        "w_noise": f"{_CITE}, Eq. 14 (sigma_w0 = 0.0175)",
        "ir_drop": f"{_CITE}, Eqs. 15-18 (the wire resistance as given: scale 1)",
        "ir_drop_g": f"{_CITE}, Eq. 18 (0.35 Ohm x 5 uS)",
        "mu_zeta": f"{_CITE}, Eq. 19 (mu_zeta = 1/4)",
        "sigma_zeta": "assumed: Rasch et al. (2023) give no value in the main text; a named, "
                      "overridable assumption",
        "s_adc_gain": f"{_CITE}, Eq. 19 (gain correction stated in words); per-column "
                      "calibration is the documented choice",
        "g_max": f"{_CITE}, Eq. 12 (g_max = 25 uS)",
        "drift_compensation": f"{_CITE}, Methods (global drift compensation)",
        "bound_management_iters": "common choice (IBM aihwkit); not used in the standard model",
        "drift_comp_inputs": "not given in Rasch et al. (2023); a named, overridable choice",
        "pair_devices": f"{_CITE}, Methods (only the active device of a pair modelled); exact "
                        "zeros: both devices (zero-mean error), a documented choice",
    }
    SCHEMA_VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        def integral(v) -> bool:  # an int, or a float (numpy included) with an integer value
            return (isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
                    and math.isfinite(v) and float(v) == int(v))

        for name in ("inp_bits", "out_bits"):
            v = getattr(self, name)
            if integral(v):
                object.__setattr__(self, name, int(v) if int(v) > 0 else None)
        for name in ("max_rows", "max_cols", "bound_management_iters", "drift_comp_inputs"):
            v = getattr(self, name)
            if integral(v):
                object.__setattr__(self, name, int(v))
        for name in ("inp_bound", "out_bound", "out_noise", "w_noise", "ir_drop", "ir_drop_g",
                     "mu_zeta", "sigma_zeta", "g_max", "asymmetry"):
            v = getattr(self, name)
            if isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)):
                object.__setattr__(self, name, float(v))
        for name in ("s_adc", "columnwise_scaling"):
            if isinstance(getattr(self, name), np.bool_):
                object.__setattr__(self, name, bool(getattr(self, name)))
        if isinstance(self.drift_compensation, str) and \
                self.drift_compensation in ("none", "None", ""):
            object.__setattr__(self, "drift_compensation", None)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, what: str) -> ValueError:
            return ValueError(f"CrossbarConfig.{name} = {getattr(self, name)!r}: {what}")

        for name in ("max_rows", "max_cols", "bound_management_iters", "drift_comp_inputs"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be a positive integer")
        for name in ("inp_bits", "out_bits"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 2
                                  or v > 24):
                raise bad(name, "give a resolution in bits between 2 and 24, or None/0 for no "
                                "quantiser")
        for name in ("inp_bound", "out_bound", "out_noise", "w_noise", "ir_drop", "ir_drop_g",
                     "mu_zeta", "sigma_zeta", "g_max", "asymmetry"):
            v = getattr(self, name)
            if not isinstance(v, float) or math.isnan(v):
                raise bad(name, "must be a number")
        for name in ("inp_bound", "out_bound", "g_max"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be positive")
        if math.isinf(self.g_max):
            raise bad("g_max", "must be finite")
        if self.inp_bits is not None and math.isinf(self.inp_bound):
            raise bad("inp_bound", "a DAC with bits needs a finite bound (or set inp_bits=None)")
        if self.out_bits is not None and math.isinf(self.out_bound):
            raise bad("out_bound", "an ADC with bits needs a finite bound (or set out_bits=None)")
        if self.s_adc and math.isinf(self.out_bound):
            raise bad("out_bound", "the S-shaped ADC saturates relative to a finite bound")
        for name in ("out_noise", "w_noise", "ir_drop", "ir_drop_g", "mu_zeta", "sigma_zeta",
                     "asymmetry"):
            v = getattr(self, name)
            if v < 0 or math.isinf(v):
                raise bad(name, "must be finite and >= 0")
        for name in ("s_adc", "columnwise_scaling"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False")
        if self.drift_compensation not in DRIFT_COMPENSATION_CHOICES:
            raise bad("drift_compensation", f"choose one of {DRIFT_COMPENSATION_CHOICES}")
        if self.noise_management not in NOISE_MANAGEMENT_CHOICES:
            raise bad("noise_management", f"choose one of {NOISE_MANAGEMENT_CHOICES}")
        if self.bound_management not in BOUND_MANAGEMENT_CHOICES:
            raise bad("bound_management", f"choose one of {BOUND_MANAGEMENT_CHOICES}")
        if self.s_adc_gain not in S_ADC_GAIN_CHOICES:
            raise bad("s_adc_gain", f"choose one of {S_ADC_GAIN_CHOICES}")
        if self.pair_devices not in PAIR_DEVICES_CHOICES:
            raise bad("pair_devices", f"choose one of {PAIR_DEVICES_CHOICES}")

    # ------------------------------------------------------------------ derived conditions
    @property
    def has_ir_drop(self) -> bool:
        """Whether the IR-drop term of Eqs. 15-18 is on (a non-zero wire-resistance scale and
        g_ir)."""
        return self.ir_drop > 0 and self.ir_drop_g > 0

    @property
    def has_short_term_noise(self) -> bool:
        """Whether the short-term read noise of Eq. 14 is on."""
        return self.w_noise > 0

    @property
    def has_noise(self) -> bool:
        """Whether any per-MVM draw is made (output noise, Eq. 2, or short-term noise, Eq. 14)."""
        return self.out_noise > 0 or self.w_noise > 0

    # ------------------------------------------------------------------ variants
    @classmethod
    def ideal(cls, **changes) -> "CrossbarConfig":
        """Every nonideality off: no quantisers or bounds, no noise, no IR drop, no nonlinearity.

        The tile size is kept, so mapping and tiling are still exercised.
        """
        kw = dict(inp_bits=None, inp_bound=math.inf, out_bits=None, out_bound=math.inf,
                  out_noise=0.0, w_noise=0.0, ir_drop=0.0, s_adc=False, asymmetry=0.0,
                  drift_compensation=None)
        kw.update(changes)
        return cls(**kw)

    def replace(self, **changes) -> "CrossbarConfig":
        """A copy with some fields changed (validated again)."""
        names = {f.name for f in dataclasses.fields(self)}
        for k in changes:
            if k in _SIMULATOR_OPTIONS:
                raise ValueError(f"CrossbarConfig.{k}: a simulator option, not physics; set "
                                 f"{_SIMULATOR_OPTIONS[k]} instead")
            if k not in names:
                raise ValueError(f"CrossbarConfig has no field {k!r}; fields: {sorted(names)}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """Field name -> value (JSON-safe except ``inf``, which JSON writes as Infinity)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "CrossbarConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        d = dict(d)
        d.pop("schema_version", None)
        d.pop("kind", None)
        for k in _SIMULATOR_OPTIONS:  # written by earlier versions; not part of the physics
            d.pop(k, None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"CrossbarConfig: unknown field(s) {unknown}; fields: {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        """A JSON string with the schema version."""
        return json.dumps({"kind": "CrossbarConfig", "schema_version": self.SCHEMA_VERSION,
                           **self.to_dict()}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "CrossbarConfig":
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        version = d.get("schema_version", cls.SCHEMA_VERSION)
        if version > cls.SCHEMA_VERSION:
            raise ValueError(f"CrossbarConfig schema_version {version} is newer than this "
                             f"aimc-device ({cls.SCHEMA_VERSION}); upgrade aimc-device")
        return cls.from_dict(d)

    def to_hdf5_attrs(self, attrs) -> None:
        """Write the config into an h5py ``attrs`` mapping (a group's or dataset's).

        None is written as the string "none"; each numeric field gets a ``<name>__unit`` attr.
        """
        attrs["kind"] = "CrossbarConfig"
        attrs["schema_version"] = self.SCHEMA_VERSION
        for k, v in self.to_dict().items():
            attrs[k] = "none" if v is None else v
            if k in self.UNITS:
                attrs[f"{k}__unit"] = self.UNITS[k]

    @classmethod
    def from_hdf5_attrs(cls, attrs) -> "CrossbarConfig":
        """Inverse of :meth:`to_hdf5_attrs`."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = {}
        for k in names:
            if k not in attrs:
                continue
            v = attrs[k]
            if isinstance(v, bytes):
                v = v.decode()
            if hasattr(v, "item"):
                v = v.item()
            if v == "none" and k in ("inp_bits", "out_bits", "drift_compensation"):
                v = None
            d[k] = v
        for k in ("s_adc", "columnwise_scaling"):
            if k in d:
                d[k] = bool(d[k])
        return cls(**d)

    def save(self, path, group: str = "crossbar_config", overwrite: bool = False) -> None:
        """Save to ``path``: JSON for a ``.json`` suffix, else an HDF5 group's attributes.

        Written atomically (:func:`aimc_device.io.atomic_output`): the new file is complete
        before it replaces ``path``. Into an existing HDF5 file that holds CrossbarConfig groups
        only, ``group`` is added (or replaced) in a copy that then replaces the file. Any other
        existing file (a measurement campaign, a device card, ...) is refused unless
        ``overwrite``: then the group is added to a copy of an HDF5 file, and a file of another
        format is replaced.

        Parameters
        ----------
        path : str or os.PathLike
        group : str, name of the HDF5 group
        overwrite : bool
        """
        from ..io import KIND_CONFIG, KIND_CONFIG_JSON, atomic_output, write_text

        path = os.fspath(path)
        if path.endswith(".json"):
            write_text(path, self.to_json(), KIND_CONFIG_JSON, overwrite=overwrite)
            return
        if not isinstance(group, str) or not group.strip("/"):
            raise ValueError(f"group = {group!r}: give the name of an HDF5 group")
        import h5py

        with atomic_output(path, KIND_CONFIG, overwrite=overwrite) as tmp:
            keep = os.path.isfile(path) and os.path.getsize(path) > 0 and h5py.is_hdf5(path)
            if keep:
                shutil.copyfile(path, tmp)
            with h5py.File(tmp, "a" if keep else "w") as fh:
                if group in fh:
                    del fh[group]
                self.to_hdf5_attrs(fh.create_group(group).attrs)

    @classmethod
    def load(cls, path, group: str = "crossbar_config") -> "CrossbarConfig":
        """Inverse of :meth:`save`."""
        path = str(path)
        if path.endswith(".json"):
            with open(path) as fh:
                return cls.from_json(fh.read())
        import h5py

        with h5py.File(path, "r") as fh:
            if group not in fh:
                raise KeyError(f"{path}: no group {group!r} with a CrossbarConfig; "
                               f"groups: {sorted(fh)}")
            return cls.from_hdf5_attrs(fh[group].attrs)
