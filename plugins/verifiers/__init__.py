"""The verifier ladder: how a target checks K draft tokens, one rung a module."""
