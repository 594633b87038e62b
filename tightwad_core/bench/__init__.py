"""Measurement: `tightwad bench` (`run`), its report (`report`) and the
user-space link emulator (`link`) that puts a slow network on one machine."""
