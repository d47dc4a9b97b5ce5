"""aimc_device.workloads (see DESIGN.md)."""
