"""Serving modes: `direct` relays, `speculative` drafts and verifies."""
