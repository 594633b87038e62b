"""Speculative decoding: records and roles (`interfaces`), the exact
acceptance rules (`sampling`), the loop (`loop`), and the draft-length
controller (`draftlen`). Nothing in here does HTTP."""
