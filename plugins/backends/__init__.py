"""Backends: the model servers a profile's target and draft run on."""
