"""Exceptions of the io layer."""
from __future__ import annotations

__all__ = ["MeasurementFormatError", "DeviceCardError"]


class MeasurementFormatError(ValueError):
    """A measurement file (or Dataset) does not follow the campaign schema.

    The message names the file, the field and the fix (docs/measurement-format.md).
    """

    def __init__(self, path, field: str, problem: str, fix: str = ""):
        self.path = str(path)
        self.field = field
        self.problem = problem
        self.fix = fix
        msg = f"{self.path}: {field}: {problem}"
        if fix:
            msg += f"; {fix}"
        super().__init__(msg)


class DeviceCardError(MeasurementFormatError):
    """A device card (HDF5 PCM model) is missing a field, has a wrong unit or an unknown schema."""
