"""HDF5 measurement campaigns <-> ``xarray.Dataset``, and device cards <-> HDF5 (never pickle).

Layer ``io``: imports :mod:`aimc_device.pcm` only.
"""
from ._errors import DeviceCardError, MeasurementFormatError
from .device_card import (CARD_SCHEMA, CARD_SCHEMA_VERSION, load_device_card, load_device_model,
                          save_device_model)
from .measurements import (CONDUCTANCE_UNITS, DEFAULT_REFERENCE_TEMPERATURE, SCHEMA,
                           SCHEMA_VERSION, TEMPERATURE_UNITS, TIME_UNITS, DeviceExclusion,
                           ExclusionRecord, ReadCounts, campaign_chunk_devices,
                           default_chunk_devices, device_chunk_reader, file_sha256,
                           iter_device_arrays, iter_device_chunks, read_counts, read_measurements,
                           write_measurements)

__all__ = [
    "MeasurementFormatError", "DeviceCardError", "read_measurements", "write_measurements",
    "iter_device_chunks", "iter_device_arrays", "device_chunk_reader", "file_sha256",
    "default_chunk_devices", "campaign_chunk_devices", "save_device_model",
    "load_device_model", "load_device_card", "SCHEMA", "SCHEMA_VERSION", "CARD_SCHEMA",
    "CARD_SCHEMA_VERSION", "CONDUCTANCE_UNITS", "TIME_UNITS", "TEMPERATURE_UNITS",
    "DEFAULT_REFERENCE_TEMPERATURE", "read_counts", "ReadCounts", "DeviceExclusion",
    "ExclusionRecord",
]
