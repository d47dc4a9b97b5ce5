"""aimc_device.study (see DESIGN.md)."""
