"""HDF5 measurement campaigns <-> ``xarray.Dataset``, and device cards <-> HDF5 (never pickle).

Every file the package writes goes through :func:`atomic_output` (temporary file + rename, no
output over an input or over a file of another kind).

Layer ``io``: imports :mod:`aimc_device.pcm` only.
"""
from ._atomic import (KIND_CHECKPOINT, KIND_CONFIG, KIND_CONFIG_JSON, KIND_FIGURE, KIND_NETCDF,
                      KIND_TEXT, OutputRefusedError, atomic_output, check_folder, check_output,
                      file_kind, remove_stale_temporaries, save_figure, write_text)
from ._errors import DeviceCardError, MeasurementFormatError
from .device_card import (CARD_SCHEMA, CARD_SCHEMA_VERSION, DEVICE_MODELS, is_card_path,
                          load_device_card, load_device_model, load_device_uncertainty,
                          model_family, model_from_dict, model_to_dict, resolve_device_model,
                          save_device_model)
from .measurements import (CONDUCTANCE_UNITS, DEFAULT_REFERENCE_TEMPERATURE, SCHEMA,
                           SCHEMA_VERSION, SIMULATED_CAMPAIGN, TEMPERATURE_UNITS, TIME_UNITS,
                           DeviceExclusion, ExclusionRecord, ReadCounts, campaign_chunk_devices,
                           default_chunk_devices, device_chunk_reader, file_sha256,
                           iter_device_arrays, iter_device_chunks, read_counts, read_measurements,
                           write_measurements)

__all__ = [
    "MeasurementFormatError", "DeviceCardError", "read_measurements", "write_measurements",
    "iter_device_chunks", "iter_device_arrays", "device_chunk_reader", "file_sha256",
    "default_chunk_devices", "campaign_chunk_devices", "save_device_model",
    "load_device_model", "load_device_card", "load_device_uncertainty", "resolve_device_model",
    "is_card_path", "model_family", "model_to_dict", "model_from_dict", "DEVICE_MODELS", "SCHEMA",
    "SCHEMA_VERSION", "CARD_SCHEMA",
    "CARD_SCHEMA_VERSION", "CONDUCTANCE_UNITS", "TIME_UNITS", "TEMPERATURE_UNITS",
    "DEFAULT_REFERENCE_TEMPERATURE", "read_counts", "ReadCounts", "DeviceExclusion",
    "ExclusionRecord",
    "OutputRefusedError", "atomic_output", "check_output", "check_folder", "file_kind",
    "remove_stale_temporaries", "save_figure", "write_text", "KIND_NETCDF", "KIND_CHECKPOINT",
    "KIND_FIGURE", "KIND_TEXT", "KIND_CONFIG", "KIND_CONFIG_JSON", "SIMULATED_CAMPAIGN",
]
