"""aimc_device.fit (see DESIGN.md)."""
