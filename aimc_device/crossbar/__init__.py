"""aimc_device.crossbar (see DESIGN.md)."""
