"""Mixture-of-Experts tooling: reading where a GGUF keeps its experts."""
