"""Speculative decoding: records and roles (`interfaces`), the exact
acceptance rules (`accept`), the emitter (`emitter`), the loop (`loop`), and the draft-length
controller (`draftlen`). Nothing in here does HTTP."""
