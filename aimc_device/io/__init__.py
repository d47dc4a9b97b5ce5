"""aimc_device.io (see DESIGN.md)."""
