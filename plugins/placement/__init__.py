"""Placement strategies: which device of a cluster each layer (or expert) goes to."""
