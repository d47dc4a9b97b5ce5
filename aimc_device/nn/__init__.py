"""aimc_device.nn (see DESIGN.md)."""
