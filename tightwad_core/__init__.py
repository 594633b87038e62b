"""Tightwad: a speculative-decoding proxy and home-cluster toolkit."""

from __future__ import annotations

__version__ = "0.1.0"
